"""Lying centers in a real Flower simulation: the coordinator refuses their replies, logs why,
and the global model is the FedAvg of the honest centers only.

Two honest centers train on phantoms with medfound's ClientApp. Three more virtual nodes
run a ClientApp that lies instead of training (a real Flower message path: the lies go
through the simulation's SuperLink to the ServerApp like any reply):

    node  name it starts with   round 1                         round 2 / evaluations
    2     center_2              metric "x/../y"                 answers as center_0, +100 on
                                                                every weight / NaN cpm
    3     center_3              10⁹ training cases              NaN weights / metric "x/../y"
    4     center_4              a weight of the wrong shape     NaN case count / answers as
                                                                center_1

Run as a script (`python THIS_FILE OUT ROOT`), this file is that federation's launcher.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HONEST = ["center_0", "center_1"]
LIARS = ["center_2", "center_3", "center_4"]
OVERRIDES = ["fed.mode=simulation", f"fed.centers=[{','.join(HONEST + LIARS)}]",
             "fed.min_centers=2", "fed.rounds=2", "experiment=phantoms_smoke",
             "trainer.progress=false", "data.num_patches_per_image=1", "fed.eval_bootstraps=10",
             "network.sw_roi_size=[144,144,96]", "fed.audit_payloads=true",
             "fed.simulation.cpus=2", "fed.simulation.cpus_per_center=1"]


# --- the launcher (run in a subprocess: Ray and Flower get a process of their own) ----------


def _lie(pid: int, msg, evaluate: bool):
    """A liar's reply to `msg`: no training, the received weights (or garbage) sent back."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    config = msg.content["config"]
    rnd = int(config["server-round"])
    name = LIARS[pid - len(HONEST)]
    if evaluate:
        models = json.loads(config["cross-site-models"]) if "cross-site-models" in config else None
        metrics = {"num-examples": 1, "cpm": 0.5}
        if pid == 2:
            metrics["cpm"] = float("nan")
        elif pid == 3:
            metrics["x/../y"] = 1.0
        else:
            name = "center_1"
        records = ({f"metrics:{m}": MetricRecord(metrics) for m in models} if models is not None
                   else {"metrics": MetricRecord(metrics)})
        return Message(RecordDict({**records, "center": ConfigRecord({"name": name})}), reply_to=msg)
    arrays = {k: np.array(a.numpy(), dtype=np.float32) for k, a in msg.content["arrays"].items()}
    cases, metrics = 3, {"train/loss": 0.5}
    if pid == 2 and rnd == 1:
        metrics["x/../y"] = 1.0
    elif pid == 2:
        name, arrays = "center_0", {k: v + 100 for k, v in arrays.items()}
    elif pid == 3 and rnd == 1:
        cases = 10**9
    elif pid == 3:
        arrays = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
    elif pid == 4 and rnd == 1:
        first = sorted(arrays)[0]
        arrays[first] = np.zeros(arrays[first].size + 1, np.float32)
    else:
        cases = float("nan")
    return Message(RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": cases, **metrics}),
        "center": ConfigRecord({"name": name})}), reply_to=msg)


def launch(out: Path, root: Path, extra: list[str]) -> None:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from medfound.fed.client_app import Site, make_client_app
    from medfound.fed.server_app import make_server_app

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("federate", overrides=[*OVERRIDES, *extra, f"data.root={root}",
                                             f"out_dir={out}"])
    config = OmegaConf.to_container(cfg, resolve=True)
    honest = make_client_app([Site(center=c, data_dir=root / c, work_dir=out / "centers" / c,
                                   audit_file=out / "audit" / f"{c}.jsonl", keep_payloads=True)
                              for c in HONEST])
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return honest(msg, context) if pid < len(HONEST) else _lie(pid, msg, evaluate=False)

    @app.query()
    def query(msg: Message, context: Context) -> Message:  # who a node is: liars say theirs
        from flwr.app import ConfigRecord, RecordDict

        pid = int(context.node_config["partition-id"])
        if pid < len(HONEST):
            return honest(msg, context)
        return Message(RecordDict({"center": ConfigRecord({"name": LIARS[pid - len(HONEST)]})}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return honest(msg, context) if pid < len(HONEST) else _lie(pid, msg, evaluate=True)

    run_simulation(server_app=make_server_app(config, OmegaConf.to_yaml(cfg)), client_app=app,
                   num_supernodes=len(HONEST) + len(LIARS),
                   backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                 "logging_level": "ERROR"}})


# --- the test -----------------------------------------------------------------------------


def _train_payloads(out: Path, center: str, rnd: int) -> list:
    """The RecordDicts `center` sent for training in round `rnd`, from its audit log."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from medfound.fed.audit import read_audit

    found = []
    for entry in read_audit(out / "audit" / f"{center}.jsonl"):
        if entry["kind"] == "train" and entry["round"] == rnd:
            proto = ProtoRecordDict()
            proto.ParseFromString((out / "audit" / center / f"{entry['sha256']}.bin").read_bytes())
            found.append(recorddict_from_proto(proto))
    return found


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from medfound.data.phantoms import make_phantoms

    root = tmp_path_factory.mktemp("hostile") / "phantoms"
    make_phantoms(root, centers=2, cases=3, seed=5, size="small", progress=False)
    return root


@pytest.mark.slow
def test_lying_centers_are_refused_and_the_model_is_the_honest_centers_fedavg(
        phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "FED"
    res = subprocess.run([sys.executable, __file__, str(out), str(phantoms)], capture_output=True,
                         text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    _check_run(out)


def _check_run(out: Path) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds_completed"] == 2
    first, second = metrics["rounds"]
    for record in (first, second):
        assert record["aggregated"] and record["train"]["accepted"] == HONEST
    # Nothing of a refused reply is recorded; center_3's NaN update passed the gate (its
    # name and metrics are in order) and screening rejected it.
    assert sorted(first["train"]["centers"]) == HONEST
    assert sorted(second["train"]["centers"]) == [*HONEST, "center_3"]
    reasons = {r: {(i["center"], i["reason"]) for i in rec["train"]["rejected"]}
               for r, rec in ((1, first), (2, second))}

    def has(rnd: int, center: str, text: str) -> bool:
        return any(c == center and text in why for c, why in reasons[rnd])

    assert has(1, "center_2", "metric name 'x/../y' is not allowed")
    assert has(1, "center_3", "'num-examples' must be a case count in 1..1000000")
    assert has(1, "center_4", "has shape")
    assert has(2, "center_2", "claims to be 'center_0', but node")
    assert has(2, "center_3", "holds NaN or Inf")
    assert has(2, "center_4", "'num-examples'")
    # The evaluations: only the honest centers' scores count.
    evaluate = second["evaluate"]
    assert sorted(evaluate["centers"]) == HONEST and len(evaluate["rejected"]) == 3
    assert sorted(first["evaluate"]["centers"]) == HONEST
    cross = metrics["cross_site"]
    assert list(cross["models"]) == ["global"] and sorted(cross["models"]["global"]) == HONEST
    assert len(cross["rejected"]) == 3
    # Every refusal, with its reason and node, in one list.
    refused = metrics["rejected_replies"]
    assert {i["exchange"] for i in refused} == {"train", "evaluate", "cross-site"}
    assert all(i["reason"] and isinstance(i["node"], int) for i in refused)
    assert "x/../y" not in json.dumps(metrics["global"]) + json.dumps(second["train"]["aggregate"])

    # The global model: the case-weighted mean of the honest centers' round-2 updates.
    sent = {c: _train_payloads(out, c, 2) for c in HONEST}
    assert all(len(v) == 1 for v in sent.values())
    counts = {c: float(p[0]["metrics"]["num-examples"]) for c, p in sent.items()}
    total = sum(counts.values())
    final = torch.load(out / "server" / "state.pt", weights_only=True)["model"]
    keys = list(sent["center_0"][0]["arrays"].keys())
    assert set(keys) == set(final)
    for key in keys:
        mean = sum(counts[c] / total * sent[c][0]["arrays"][key].numpy().astype(np.float64)
                   for c in HONEST)
        np.testing.assert_allclose(final[key].numpy(), mean.astype(np.float32), rtol=1e-6,
                                   atol=1e-7, err_msg=key)
    assert (out / "model" / "model.json").is_file()
    # Cross-site validation sent the global model only (fed.share_local_models is off).
    for center in HONEST:
        assert metrics["privacy"]["flows"][center]["received"]["cross_site_models"] == ["global"]
        assert _cross_site_answers(out, center) == [["metrics:global"]]


def _cross_site_answers(out: Path, center: str) -> list[list[str]]:
    """The metric records of each cross-site reply in `center`'s audit log: one
    "metrics:<model>" per model the center was sent."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from medfound.fed.audit import read_audit

    answers = []
    for entry in read_audit(out / "audit" / f"{center}.jsonl"):
        if entry["kind"] == "cross-site":
            proto = ProtoRecordDict()
            proto.ParseFromString((out / "audit" / center / f"{entry['sha256']}.bin").read_bytes())
            answers.append(list(recorddict_from_proto(proto).metric_records))
    return answers


@pytest.mark.long
def test_under_dp_no_center_receives_another_centers_update_as_the_privacy_report_says(
        phantoms: Path, tmp_path: Path) -> None:
    """fed.privacy.dp=server with cross-site validation on (its default): every center's
    audit log shows it answered for the global model only, as the report's flows say."""
    from medfound.fed.audit import read_audit

    out = tmp_path / "FED"
    fed = [f"data.root={phantoms}", f"out_dir={out}", "fed.mode=simulation",
           f"fed.centers=[{','.join(HONEST)}]", "fed.rounds=1", "fed.privacy.dp=server",
           "fed.audit_payloads=true", *[o for o in OVERRIDES if o.split("=")[0] not in (
               "fed.mode", "fed.centers", "fed.rounds")]]
    res = subprocess.run([sys.executable, "-m", "medfound", "run", "federate", *fed],
                         capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())["privacy"]
    assert set(report["epsilon"]) == set(HONEST)
    for center in HONEST:
        flow = report["flows"][center]
        assert flow["received"]["local_updates_of"] == []
        assert flow["received"]["cross_site_models"] == ["global"]
        assert flow["summary"].endswith("cross-site: the global model only")
        records = read_audit(out / "audit" / f"{center}.jsonl")
        assert [r["round"] for r in records if r["kind"] == "train"] == flow["sent"]["train_rounds"]
        # A center answers one "metrics:<model>" per model it was sent: the global one only.
        assert _cross_site_answers(out, center) == [["metrics:global"]]
    table = (out / "cross_site.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in table[1:]] == ["global"]

    again = [o for o in fed if not o.startswith("out_dir=")]
    refused = subprocess.run([sys.executable, "-m", "medfound", "run", "federate", *again,
                              f"out_dir={tmp_path / 'FED2'}", "fed.share_local_models=true"],
                             capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2 and "fed.share_local_models=true" in refused.stderr
    assert "Traceback" not in refused.stderr


if __name__ == "__main__":
    launch(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
