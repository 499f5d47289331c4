"""The ClientApp as a center runs it: Flower's ClientApp called with real messages, on a real
phantom center, training with the real loop (no simulation engine needed to talk to it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from medfound.data.phantoms import make_phantoms
from medfound.fed.audit import read_audit
from medfound.fed.client_app import Site, make_client_app
from medfound.fed.params import decode_arrays, payload_bytes, shared_state, to_arrays
from medfound.fed.protocol import task_spec, versions
from medfound.train import detection as task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMOKE = {"spacing_mm": [2.8125, 2.8125, 3.0], "patch_size": [64, 64, 32],
         "sw_roi_size": [144, 144, 96]}


def _yaml(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fed_client") / "phantoms"
    make_phantoms(root, centers=3, cases=3, seed=5, size="small", progress=False)
    return root


@pytest.fixture(scope="module")
def cfg() -> dict:
    return {"network": {**_yaml("network/retinanet_tiny.yaml"), **SMOKE},
            "trainer": {**_yaml("trainer/default.yaml"), "schedule": "constant",
                        "warmup_epochs": 0, "progress": False},
            "data": {**_yaml("data/phantoms.yaml"), "num_patches_per_image": 1}, "seed": 0}


def instruction(kind: str, cfg: dict, rnd: int, arrays: ArrayRecord | None = None,
                versions_: dict | None = None, run_tag: str = "run1") -> Message:
    """What the coordinator sends a center for round `rnd`."""
    if arrays is None:
        network, _ = task.build(cfg["network"], seed=cfg["seed"])
        arrays = to_arrays(network.state_dict())
    config = ConfigRecord({"task": task_spec(cfg, local_epochs=1, transfer_dtype="float32",
                                             eval_bootstraps=10, run_tag=run_tag),
                           "versions": json.dumps(versions_ or versions()),
                           "server-round": rnd})
    metadata = Metadata(run_id=1, message_id=f"{kind}-{rnd}", src_node_id=0, dst_node_id=5,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=600.0,
                        message_type=kind)
    return Message(RecordDict({"arrays": arrays, "config": config}), metadata=metadata)


def call(site: Site, msg: Message) -> Message:
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    return make_client_app([site])(msg, context)


def site_for(root: Path, center: str, tmp: Path) -> Site:
    return Site(center=center, data_dir=root / center, work_dir=tmp / "work" / center,
                audit_file=tmp / "audit" / f"{center}.jsonl")


def test_a_center_trains_on_its_data_and_sends_only_weights_and_loss_numbers(
        phantoms: Path, cfg: dict, tmp_path: Path) -> None:
    site = site_for(phantoms, "center_2", tmp_path)
    network, _ = task.build(cfg["network"], seed=cfg["seed"])
    sent = to_arrays(network.state_dict())
    reply = call(site, instruction(MessageType.TRAIN, cfg, 1, sent))

    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics", "center"}
    assert dict(reply.content["center"]) == {"name": "center_2"}
    shared = shared_state(network.state_dict())
    arrays = reply.content["arrays"]
    assert list(arrays) == list(shared)  # the floating-point state only: no integer counters
    assert all(arrays[k].dtype == "float32" and tuple(arrays[k].shape) == tuple(v.shape)
               for k, v in shared.items())
    trained = decode_arrays(arrays)
    assert any(not np.array_equal(trained[k], v.numpy()) for k, v in shared.items())
    metrics = dict(reply.content["metrics"])
    datalist = json.loads((phantoms / "center_2" / "datalist.json").read_text())
    assert metrics["num-examples"] == len(datalist["training"])  # the weight FedAvg uses
    assert set(metrics) == {"num-examples", "train/loss", "train/classification",
                            "train/box_regression", "train/seconds"}
    assert metrics["train/seconds"] > 0

    # The audit log holds exactly what left: size and hash of this payload.
    (entry,) = read_audit(site.audit_file)
    payload = payload_bytes(reply.content)
    assert (entry["round"], entry["kind"], entry["bytes"]) == (1, "train", len(payload))
    assert entry["sha256"] == hashlib.sha256(payload).hexdigest()
    assert entry["metrics"] == sorted(metrics)


def test_a_resent_round_gives_the_same_update_and_the_next_round_continues_local_state(
        phantoms: Path, cfg: dict, tmp_path: Path) -> None:
    site = site_for(phantoms, "center_2", tmp_path)
    first = decode_arrays(call(site, instruction(MessageType.TRAIN, cfg, 1)).content["arrays"])
    again = decode_arrays(call(site, instruction(MessageType.TRAIN, cfg, 1)).content["arrays"])
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])

    call(site, instruction(MessageType.TRAIN, cfg, 2))
    state = torch.load(site.work_dir / "rounds" / "run1" / "0002" / "checkpoints" / "last.pt",
                       weights_only=True)
    assert state["epoch"] == 2  # one local epoch per round, counted across rounds

    # A new run (another run tag) starts afresh and drops the old run's local state.
    call(site, instruction(MessageType.TRAIN, cfg, 1, run_tag="run2"))
    assert sorted(p.name for p in (site.work_dir / "rounds").iterdir()) == ["run2"]


def test_a_train_message_can_first_score_the_weights_it_brings(
        phantoms: Path, cfg: dict, tmp_path: Path) -> None:
    """fed.evaluate_with_train: round 2's train message carries round 1's global model; the
    reply's "evaluate-metrics" are what an evaluate message for round 1 would have given."""
    center = next(c for c in ("center_0", "center_1", "center_2")
                  if any(e["box"] for e in json.loads(
                      (phantoms / c / "datalist.json").read_text()).get("validation", [])))
    site = site_for(phantoms, center, tmp_path)
    network, _ = task.build(cfg["network"], seed=cfg["seed"])
    weights = to_arrays(network.state_dict())
    call(site, instruction(MessageType.TRAIN, cfg, 1, weights))
    separate = dict(call(site, instruction(MessageType.EVALUATE, cfg, 1, weights)).content["metrics"])
    msg = instruction(MessageType.TRAIN, cfg, 2, weights)
    msg.content["config"]["evaluate-received"] = True
    reply = call(site, msg)
    assert set(reply.content.keys()) == {"arrays", "metrics", "center", "evaluate-metrics"}
    assert dict(reply.content["evaluate-metrics"]) == separate and "cpm" in separate
    assert reply.content["metrics"]["evaluate/seconds"] > 0
    assert read_audit(site.audit_file)[-1]["metrics"] == sorted(
        [*reply.content["metrics"], *separate])


def test_a_center_evaluates_the_global_model_on_its_validation_split(
        phantoms: Path, cfg: dict, tmp_path: Path) -> None:
    for center in ("center_0", "center_1", "center_2"):
        site = site_for(phantoms, center, tmp_path)
        reply = call(site, instruction(MessageType.EVALUATE, cfg, 1))
        assert set(reply.content.keys()) == {"metrics", "center"}
        metrics = dict(reply.content["metrics"])
        datalist = json.loads((phantoms / center / "datalist.json").read_text())
        validation = datalist.get("validation", [])
        nodules = sum(len(e["box"]) for e in validation)
        assert metrics["num-examples"] == len(validation)
        assert metrics["n_nodules"] == nodules
        if nodules:
            assert 0.0 <= metrics["cpm"] <= 1.0
            assert sorted(k for k in metrics if k.startswith("froc/")) == sorted(
                f"froc/{r}" for r in ("0.125", "0.25", "0.5", "1", "2", "4", "8"))
        else:  # no nodules, no sensitivity to share
            assert set(metrics) == {"num-examples", "n_nodules"}


def test_a_center_refuses_a_coordinator_with_other_versions(phantoms: Path, cfg: dict,
                                                            tmp_path: Path) -> None:
    site = site_for(phantoms, "center_0", tmp_path)
    old = {**versions(), "flwr": "1.5.0"}
    reply = call(site, instruction(MessageType.TRAIN, cfg, 1, versions_=old))
    assert reply.has_error()
    assert "flwr 1.5.0 at the coordinator" in reply.error.reason
    (entry,) = read_audit(site.audit_file)
    assert entry["kind"] == "error" and entry["bytes"] == len(reply.error.reason.encode())


def test_a_failure_at_a_center_keeps_its_details_at_the_center(phantoms: Path, cfg: dict,
                                                              tmp_path: Path) -> None:
    # A folder name that identifies a patient must not travel in an error message.
    folder = tmp_path / "DOE^JANE_P1234567"
    folder.mkdir()
    (folder / "datalist.json").write_text('{"training": [{"image": "missing_study", "box": []}]}')
    site = Site(center="center_x", data_dir=folder, work_dir=tmp_path / "work",
                audit_file=tmp_path / "audit.jsonl")
    reply = call(site, instruction(MessageType.TRAIN, cfg, 1))
    assert reply.has_error()
    assert reply.error.reason == ("train failed at center center_x: MedfoundError "
                                  "(details stay in the center's log)")
    assert "DOE^JANE" in (tmp_path / "work" / "center.log").read_text()


def test_under_a_supernode_the_node_config_names_the_center_and_its_folders(
        phantoms: Path, cfg: dict, tmp_path: Path) -> None:
    from medfound.errors import MedfoundError
    from medfound.fed.client_app import app

    node_config = {"center": "center_2", "data-dir": str(phantoms / "center_2"),
                   "work-dir": str(tmp_path / "node")}
    context = Context(run_id=1, node_id=9, node_config=node_config, state=RecordDict(),
                      run_config={})
    reply = app(instruction(MessageType.EVALUATE, cfg, 3), context)
    assert dict(reply.content["center"]) == {"name": "center_2"}
    (entry,) = read_audit(tmp_path / "node" / "audit" / "center_2.jsonl")
    assert (entry["center"], entry["round"], entry["kind"]) == ("center_2", 3, "evaluate")

    bare = Context(run_id=1, node_id=9, node_config={"center": "center_2"}, state=RecordDict(),
                   run_config={})
    with pytest.raises(MedfoundError, match="lacks data-dir, work-dir"):
        app(instruction(MessageType.EVALUATE, cfg, 3), bare)


def test_a_centers_worker_process_replies_as_the_clientapp_does_in_process(
        phantoms: Path, cfg: dict, tmp_path: Path) -> None:
    """`medfound center join` runs the ClientApp in one long-lived worker (a real process on a
    real Unix socket); the relay Flower loads per message returns the worker's reply. The
    update equals the in-process one (up to float rounding: oneDNN may pick other kernels in
    another process); the worker serves message after message; without a worker the relay runs
    the ClientApp itself."""
    import subprocess
    import sys
    import time

    from medfound.fed.worker import client_app as relay_app

    sock = tmp_path / "w.sock"
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "medfound.fed.worker", "--socket", str(sock)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sock.exists(), (tmp_path / "worker.log").read_text()

        def node(name: str, socket_path: Path) -> Context:
            return Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                           node_config={"center": "center_2", "data-dir": str(phantoms / "center_2"),
                                        "work-dir": str(tmp_path / name),
                                        "worker-socket": str(socket_path)})

        relayed = relay_app(instruction(MessageType.TRAIN, cfg, 1), node("relayed", sock))
        local = call(site_for(phantoms, "center_2", tmp_path / "local"),
                     instruction(MessageType.TRAIN, cfg, 1))
        assert not relayed.has_error()
        assert relayed.metadata.reply_to_message_id == "train-1"
        ours, theirs = decode_arrays(relayed.content["arrays"]), decode_arrays(local.content["arrays"])
        for key in theirs:  # two processes: the same numbers up to float rounding
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6)
        # The worker audited the reply as it left: the log names this payload's hash.
        (entry,) = read_audit(tmp_path / "relayed" / "audit" / "center_2.jsonl")
        assert entry["sha256"] == hashlib.sha256(payload_bytes(relayed.content)).hexdigest()

        evaluated = relay_app(instruction(MessageType.EVALUATE, cfg, 1), node("relayed", sock))
        assert dict(evaluated.content["center"]) == {"name": "center_2"}
        assert worker.poll() is None
        assert (tmp_path / "worker.log").read_text().count("message done") == 2

        # No worker listening: the relay runs the ClientApp in its own process.
        alone = relay_app(instruction(MessageType.EVALUATE, cfg, 1),
                          node("alone", tmp_path / "nobody.sock"))
        assert dict(alone.content["metrics"]) == dict(evaluated.content["metrics"])
    finally:
        worker.kill()
        worker.wait()
        log.close()


def test_the_relay_flower_loads_per_message_imports_no_torch() -> None:
    """What a SuperNode's per-message process imports: Flower and the standard library only
    (torch, MONAI and MLflow stay in the worker)."""
    import subprocess
    import sys

    code = ("import sys, medfound.fed.worker; "
            "print(sorted(m for m in ('torch', 'monai', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
