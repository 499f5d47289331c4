"""A hostile coordinator against a center: Flower's ClientApp called with real flwr Messages
whose fields are crafted (run tags and rounds that would be paths, sizes that would take the
machine down, values of the wrong type). The center refuses each with an error reply, records
it in its audit log, writes nothing outside its work folder, deletes nothing it did not name,
and then serves a valid message as before."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from medfound.data.phantoms import make_phantoms
from medfound.errors import MedfoundError
from medfound.fed.audit import read_audit
from medfound.fed.client_app import Site, _prune_rounds, inside, make_client_app
from medfound.fed.params import to_arrays
from medfound.fed.protocol import InvalidMessage, read_task, task_spec, versions
from medfound.train import detection as task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMOKE = {"spacing_mm": [2.8125, 2.8125, 3.0], "patch_size": [64, 64, 32],
         "sw_roi_size": [144, 144, 96]}


def _yaml(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "phantoms"
    make_phantoms(root, centers=1, cases=2, seed=5, size="small", progress=False)
    return root


@pytest.fixture(scope="module")
def cfg() -> dict:
    return {"network": {**_yaml("network/retinanet_tiny.yaml"), **SMOKE},
            "trainer": {**_yaml("trainer/default.yaml"), "schedule": "constant",
                        "warmup_epochs": 0, "progress": False},
            "data": {**_yaml("data/phantoms.yaml"), "num_patches_per_image": 1}, "seed": 0}


@pytest.fixture(scope="module")
def arrays(cfg: dict) -> ArrayRecord:
    network, _ = task.build(cfg["network"], seed=cfg["seed"])
    return to_arrays(network.state_dict())


def message(kind: str, cfg: dict, arrays: ArrayRecord, *, rnd=1, run_tag="run1",
            edit=None, config_extra: dict | None = None) -> Message:
    """A coordinator's message; `edit(task_dict)` changes the task JSON before it is sent."""
    spec = json.loads(task_spec(cfg, local_epochs=1, transfer_dtype="float32",
                                eval_bootstraps=10, run_tag="run1"))
    spec["run_tag"] = run_tag
    if edit is not None:
        edit(spec)
    text = spec if isinstance(spec, str) else json.dumps(spec)
    config = ConfigRecord({"task": text, "versions": json.dumps(versions()), "server-round": rnd,
                           **(config_extra or {})})
    metadata = Metadata(run_id=1, message_id=f"{kind}-x", src_node_id=0, dst_node_id=5,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=600.0,
                        message_type=kind)
    return Message(RecordDict({"arrays": arrays, "config": config}), metadata=metadata)


def call(site: Site, msg: Message) -> Message:
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    return make_client_app([site])(msg, context)


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file and folder under `folder` (not under `skip`): its kind and content hash."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            continue
        for name in dirnames:
            if here / name != skip:
                tree[str((here / name).relative_to(folder))] = "dir"
        for name in filenames:
            path = here / name
            tree[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def victim_beside(site_root: Path) -> Path:
    """A sibling of the work folder that looks like a center's studies and round folders."""
    victim = site_root / "victim"
    for sub in ("0001", "0002", "99999"):
        (victim / sub).mkdir(parents=True)
        (victim / sub / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + sub.encode())
    (victim / "checkpoints").mkdir()
    (victim / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    return victim


def _set(path: str, value):
    """An edit that sets task[path] (dotted) to `value`."""
    def edit(spec: dict) -> None:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


BAD_RUN_TAGS = ["../../victim", "../victim", "..", ".", "", "a" * 10_240, "run/../../victim",
                "x\x00y", "victim/0001", "ünïcode", 7, None, ["run1"], {"a": 1}, True]
BAD_ROUNDS = [-1, 10**12, "1/../..", "3", 1.5, True, b"1"]
# (field the reply names, an edit of the task) for the other knobs a message carries
BAD_FIELDS = [
    ("eval_bootstraps", _set("eval_bootstraps", 10**9)),
    ("local_epochs", _set("local_epochs", 0)),
    ("local_epochs", _set("local_epochs", "1")),
    ("seed", _set("seed", -5)),
    ("data.num_workers", _set("data.num_workers", 10**6)),
    ("data.batch_size", _set("data.batch_size", 0)),
    ("data.cache", _set("data.cache", "../../victim")),
    ("trainer.device", _set("trainer.device", "cuda:../../x")),
    ("trainer.lr", _set("trainer.lr", 1e30)),
    ("network.patch_size", _set("network.patch_size", [100_000, 100_000, 100_000])),
    ("network.sw_roi_size", _set("network.sw_roi_size", [4096, 4096, 4096])),
    ("network.block_inplanes", _set("network.block_inplanes", [10**7, 1, 1, 1])),
    ("task.network.spacing_mm", _set("network.spacing_mm", [0.001, 0.001, 0.001])),
    ("task.task.modalities.ct.spacing_mm",
     _set("task", {"name": "pretrain", "modalities": {"ct": {"spacing_mm": [1e-4, 1, 1]}}})),
    ("transfer_dtype", _set("transfer_dtype", "object")),
    ("exchange", _set("exchange", "everything")),
    ("task.name", _set("task", {"name": "rm -rf"})),
    ("train_only", _set("train_only", ["../x"])),
    ("task.data.comment", _set("data.comment", "x" * 10_000)),
    ("task.data.deep", _set("data.deep", [[[[[[[[[[1]]]]]]]]]])),
    ("task.network.hns_pool_size", _set("network.hns_pool_size", 10**40)),
]


def test_hostile_run_tags_rounds_and_knobs_are_refused_and_nothing_outside_is_touched(
        phantoms: Path, cfg: dict, arrays: ArrayRecord, tmp_path: Path) -> None:
    site_root = tmp_path / "site"
    work = site_root / "work"
    site = Site(center="center_0", data_dir=phantoms / "center_0", work_dir=work,
                audit_file=work / "audit" / "center_0.jsonl")
    victim = victim_beside(site_root)
    before_victim, before_outside = snapshot(victim), snapshot(site_root, skip=work)

    hostile: list[tuple[str, Message]] = []
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        for tag in BAD_RUN_TAGS + [str(victim), str(victim / "0001")]:
            hostile.append(("run_tag", message(kind, cfg, arrays, rnd=99999, run_tag=tag)))
        for rnd in BAD_ROUNDS:
            hostile.append(("server-round", message(kind, cfg, arrays, rnd=rnd)))
    for field, edit in BAD_FIELDS:
        hostile.append((field, message(MessageType.TRAIN, cfg, arrays, edit=edit)))
    hostile += [
        ("task", message(MessageType.TRAIN, cfg, arrays, config_extra={"task": "[1, 2]"})),
        ("task", message(MessageType.TRAIN, cfg, arrays, config_extra={"task": '{"seed": NaN}'})),
        ("task", message(MessageType.TRAIN, cfg, arrays, config_extra={"task": "x" * (2 << 20)})),
        ("proximal-mu", message(MessageType.TRAIN, cfg, arrays,
                                config_extra={"proximal-mu": float("inf")})),
        ("evaluate-received", message(MessageType.TRAIN, cfg, arrays,
                                      config_extra={"evaluate-received": "yes"})),
        ("cross-site-models", message(MessageType.EVALUATE, cfg, arrays,
                                      config_extra={"cross-site-models": '["../../victim"]'})),
        ("cross-site-models", message(MessageType.EVALUATE, cfg, arrays,
                                      config_extra={"cross-site-models": "global"})),
    ]
    for field, msg in hostile:
        reply = call(site, msg)
        assert reply.has_error(), field
        reason = reply.error.reason
        assert reason.startswith("center center_0 refused the "), reason
        assert f"invalid {field}" in reason or f"invalid task.{field}" in reason, (field, reason)
        assert len(reason) < 400  # the hostile value is not echoed back at length

    # Each refusal is in the center's audit log (an error reply is what left) and its log.
    records = read_audit(site.audit_file)
    assert [r["kind"] for r in records] == ["error"] * len(hostile)
    assert {r["round"] for r in records} <= {-1, 1, 99999}
    assert (work / "center.log").read_text().count("failed:") == len(hostile)
    # Nothing outside the work folder was written, changed or deleted.
    assert snapshot(victim) == before_victim
    assert snapshot(site_root, skip=work) == before_outside
    assert not (work / "rounds").exists()  # refused before any work was done

    # The center still serves a valid message: a round trains, and its state is where it belongs.
    reply = call(site, message(MessageType.TRAIN, cfg, arrays, rnd=1, run_tag="run1"))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert (work / "rounds" / "run1" / "0001" / "checkpoints" / "last.pt").is_file()
    assert snapshot(victim) == before_victim
    assert snapshot(site_root, skip=work) == before_outside


def test_keys_that_are_the_centers_business_are_dropped_not_used(cfg: dict) -> None:
    """root / cache_dir name the coordinator's folders; a center never takes them from a
    message (its cache lives in its work folder)."""
    spec = json.loads(task_spec(cfg, local_epochs=1, transfer_dtype="float32",
                                eval_bootstraps=10, run_tag="abc123"))
    spec["data"].update({"cache_dir": "/etc", "root": "/", "cache": "disk"})
    task_ = read_task({"task": json.dumps(spec), "server-round": 2})
    assert "cache_dir" not in task_["data"] and "root" not in task_["data"]
    assert (task_["round"], task_["run_tag"], task_["proximal_mu"]) == (2, "abc123", 0.0)
    with pytest.raises(InvalidMessage, match="invalid server-round"):
        read_task({"task": json.dumps(spec), "server-round": 100_001})


def test_pruning_deletes_only_round_folders_medfound_named_and_never_through_a_link(
        tmp_path: Path) -> None:
    work = tmp_path / "work"
    rounds = work / "rounds"
    victim = victim_beside(tmp_path)
    before = snapshot(victim)
    for folder in ("run1/0001", "run1/0002", "run1/0005", "old/0003"):
        (rounds / folder / "checkpoints").mkdir(parents=True)
        (rounds / folder / "checkpoints" / "last.pt").write_bytes(b"state")
    (rounds / "run1" / "notes").mkdir()
    (rounds / "run1" / "1").mkdir()  # not a name medfound gives a round folder
    (rounds / "old" / "README.txt").write_text("an operator's file")
    (rounds / "run1" / "0003").symlink_to(victim / "0001", target_is_directory=True)
    (rounds / "linked").symlink_to(victim, target_is_directory=True)
    (rounds / "not.a.tag").mkdir()
    (rounds / "not.a.tag" / "0001").mkdir()

    _prune_rounds(rounds, "run1", keep_from=4)

    assert sorted(p.name for p in (rounds / "run1").iterdir()) == ["0003", "0005", "1", "notes"]
    assert sorted(p.name for p in (rounds / "old").iterdir()) == ["README.txt"]  # not emptied
    assert (rounds / "not.a.tag" / "0001").is_dir() and (rounds / "linked").is_symlink()
    assert snapshot(victim) == before


def test_a_work_folder_whose_rounds_link_out_of_it_is_refused(
        phantoms: Path, cfg: dict, arrays: ArrayRecord, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    victim = victim_beside(tmp_path)
    (work / "rounds").symlink_to(victim, target_is_directory=True)
    with pytest.raises(MedfoundError, match="outside the center's work folder"):
        inside(work, work / "rounds" / "run1")
    assert inside(work, work / "mlflow" / "run1") == (work / "mlflow" / "run1").resolve()
    before = snapshot(victim)
    site = Site(center="center_0", data_dir=phantoms / "center_0", work_dir=work,
                audit_file=work / "audit" / "center_0.jsonl")
    reply = call(site, message(MessageType.TRAIN, cfg, arrays))
    assert reply.has_error() and "MedfoundError" in reply.error.reason
    assert snapshot(victim) == before


def test_a_query_message_gets_the_centers_name_only(phantoms: Path, tmp_path: Path) -> None:
    """A coordinator can learn which center a node is before its first reply (to log a center
    that dies mid-round by name)."""
    site = Site(center="center_0", data_dir=phantoms / "center_0", work_dir=tmp_path / "work",
                audit_file=tmp_path / "work" / "audit" / "center_0.jsonl")
    metadata = Metadata(run_id=1, message_id="q", src_node_id=0, dst_node_id=5,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=600.0,
                        message_type=MessageType.QUERY)
    reply = call(site, Message(RecordDict({"config": ConfigRecord({})}), metadata=metadata))
    assert not reply.has_error()
    assert list(reply.content.keys()) == ["center"]
    assert dict(reply.content["center"]) == {"name": "center_0"}
    (entry,) = read_audit(site.audit_file)
    assert entry["kind"] == "query" and entry["metrics"] == []


def test_a_message_of_a_type_the_center_does_not_serve_is_refused_and_audited(
        phantoms: Path, cfg: dict, arrays: ArrayRecord, tmp_path: Path) -> None:
    site = Site(center="center_0", data_dir=phantoms / "center_0", work_dir=tmp_path / "work",
                audit_file=tmp_path / "work" / "audit" / "center_0.jsonl")
    kinds = ["train.evil", "evaluate.x", "system", "query.drop_tables"]  # Flower refuses others
    for kind in kinds:
        reply = call(site, message(kind, cfg, arrays))
        assert reply.has_error() and "refused a message of type" in reply.error.reason
        assert len(reply.error.reason) < 200
    assert [r["kind"] for r in read_audit(site.audit_file)] == ["error"] * len(kinds)
    assert (tmp_path / "work" / "center.log").read_text().count("refused a message") == len(kinds)
    served = call(site, message(MessageType.QUERY, cfg, arrays))
    assert dict(served.content["center"]) == {"name": "center_0"}


def test_a_hostile_dp_clipping_norm_is_refused_and_audited(
        phantoms: Path, cfg: dict, arrays: ArrayRecord, tmp_path: Path) -> None:
    """Client-side DP clipping takes its norm from the message; Flower's mod raised on a text
    there, past the audit log."""
    site = Site(center="center_0", data_dir=phantoms / "center_0", work_dir=tmp_path / "work",
                audit_file=tmp_path / "work" / "audit" / "center_0.jsonl")
    norms = ["abc", -1.0, float("nan"), 0, True]
    for norm in norms:
        reply = call(site, message(MessageType.TRAIN, cfg, arrays,
                                   config_extra={"clipping_norm": norm}))
        assert reply.has_error() and "invalid clipping_norm" in reply.error.reason, norm
    assert [r["kind"] for r in read_audit(site.audit_file)] == ["error"] * len(norms)
    assert not (tmp_path / "work" / "rounds").exists()
