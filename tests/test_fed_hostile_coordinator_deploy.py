"""A lying center over real Flower processes: SuperLink, two honest `center join` SuperNodes
and a third SuperNode whose worker (the process medfound's relay ClientApp hands each
message to, medfound.fed.worker's wire format) lies instead of training:

    round 1      10⁹ training cases, the received weights sent back
    round 2      answers as center_0, +100 on every weight
    evaluations  a metric named "x/../y"

The run completes with the honest centers, each lie is refused and logged with its reason,
and the global model is the FedAvg of the honest centers' round-2 updates (read back from
their audit logs' kept payloads).

Run as a script (`python THIS_FILE SOCKET`), this file is the lying worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from processes import free_port_block, medfound_env

pytestmark = [pytest.mark.slow, pytest.mark.long]

HONEST = ["center_0", "center_1"]


def _lie(msg):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    if msg.metadata.message_type == "query":
        return Message(RecordDict({"center": ConfigRecord({"name": "center_2"})}), reply_to=msg)
    config = msg.content["config"]
    if msg.metadata.message_type == "evaluate":
        models = json.loads(config["cross-site-models"]) if "cross-site-models" in config else None
        metrics = MetricRecord({"num-examples": 1, "x/../y": 1.0})
        records = ({f"metrics:{m}": metrics for m in models} if models is not None
                   else {"metrics": metrics})
        return Message(RecordDict({**records, "center": ConfigRecord({"name": "center_2"})}),
                       reply_to=msg)
    rnd = int(config["server-round"])
    arrays = {k: np.array(a.numpy(), dtype=np.float32) for k, a in msg.content["arrays"].items()}
    name, cases = "center_2", 10**9
    if rnd > 1:
        name, cases, arrays = "center_0", 3, {k: v + 100 for k, v in arrays.items()}
    return Message(RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": cases, "train/loss": 0.5}),
        "center": ConfigRecord({"name": name})}), reply_to=msg)


def serve_lies(path: Path) -> None:
    """medfound.fed.worker's loop, with `_lie` in place of medfound's ClientApp."""
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from medfound.fed.worker import _receive, _send

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        print(f"lying worker: ready on {path}", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                message = message_from_proto(ProtoMessage.FromString(_receive(conn)))
                context = _receive(conn)  # its state goes back unchanged
                reply = _lie(message)
                print(f"lying worker: answered a {message.metadata.message_type} message",
                      flush=True)
                _send(conn, message_to_proto(reply).SerializeToString(), _state_of(context))


def _state_of(context_bytes: bytes) -> bytes:
    from flwr.common.serde import context_from_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext

    context = context_from_proto(ProtoContext.FromString(context_bytes))
    return recorddict_to_proto(context.state).SerializeToString()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from medfound.data.phantoms import make_phantoms

    root = tmp_path_factory.mktemp("hostile_deploy") / "phantoms"
    make_phantoms(root, centers=2, cases=3, seed=5, size="small", progress=False)
    return root


def test_a_lying_supernode_is_refused_and_the_model_is_the_honest_centers_fedavg(
        phantoms: Path, tmp_path: Path) -> None:
    from medfound.fed.deployment import join_command

    env = medfound_env()
    port = free_port_block(8)
    out = tmp_path / "FED"
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, cmd: list[str]) -> None:
        procs[name] = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / f"{name}.log", "w"),
                                       stderr=subprocess.STDOUT, start_new_session=True)

    def log(name: str) -> str:
        path = tmp_path / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait_for(condition, seconds: float, what: str) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if condition():
                return
            time.sleep(0.5)
        tails = "\n".join(f"--- {n}\n{log(n)[-1500:]}" for n in procs)
        raise AssertionError(f"timed out waiting for {what}\n{tails}")

    medfound = [sys.executable, "-m", "medfound"]
    sock = Path(f"/tmp/medfound-liar-{os.getpid()}-{port}.sock")
    try:
        start("superlink", [*medfound, "fed", "superlink", "--address", f"127.0.0.1:{port}",
                            "--insecure"])
        wait_for(lambda: "Uvicorn running" in log("superlink"), 60, "the SuperLink")
        for n, center in enumerate(HONEST):
            start(center, [*medfound, "center", "join", "--superlink", f"127.0.0.1:{port}",
                           "--data", str(phantoms / center), "--work", str(tmp_path / "work" / center),
                           "--insecure", "--port", str(port + 2 + n), "--keep-payloads"])
        start("liar_worker", [sys.executable, __file__, str(sock)])
        wait_for(sock.exists, 60, "the lying worker")
        start("liar", join_command(superlink=f"127.0.0.1:{port}", center="center_2",
                                   data=str(phantoms / "center_0"), work=str(tmp_path / "work" / "liar"),
                                   insecure=True, runtime_port=port + 5, worker_socket=str(sock)))
        wait_for(lambda: all("SuperNode ID" in log(n) for n in [*HONEST, "liar"]), 120,
                 "three SuperNodes")
        run = subprocess.run(
            [*medfound, "run", "federate", "fed.mode=deployment", f"data.root={phantoms}",
             "fed.centers=[center_0,center_1,center_2]", "fed.min_centers=2", "fed.rounds=2",
             "fed.round_timeout_s=300", "experiment=phantoms_smoke", "trainer.progress=false",
             "data.num_patches_per_image=1", "fed.eval_bootstraps=10",
             "network.sw_roi_size=[144,144,96]", f"fed.deployment.superlink=127.0.0.1:{port}",
             "fed.deployment.insecure=true", f"out_dir={out}"],
            env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + log("superlink")[-3000:]
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        sock.unlink(missing_ok=True)

    assert "answered a train message" in log("liar_worker")
    metrics = json.loads((out / "metrics.json").read_text())
    first, second = metrics["rounds"]
    for record in (first, second):
        assert record["aggregated"] and record["train"]["accepted"] == HONEST
        assert sorted(record["train"]["centers"]) == HONEST
    [one] = first["train"]["rejected"]
    assert one["center"] == "center_2" and "1..1000000" in one["reason"]
    [two] = second["train"]["rejected"]
    assert two["center"] == "center_2" and "claims to be 'center_0', but node" in two["reason"]
    assert [i["center"] for i in second["evaluate"]["rejected"]] == ["center_2"]
    assert "x/../y" in second["evaluate"]["rejected"][0]["reason"]
    assert [i["center"] for i in metrics["cross_site"]["rejected"]] == ["center_2"]
    assert {i["exchange"] for i in metrics["rejected_replies"]} == {"train", "evaluate", "cross-site"}

    # The global model: the case-weighted mean of the honest centers' round-2 updates, as
    # their audit logs kept them.
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from medfound.fed.audit import read_audit

    sent = {}
    for center in HONEST:
        audit = tmp_path / "work" / center / "audit"
        [entry] = [e for e in read_audit(audit / f"{center}.jsonl")
                   if e["kind"] == "train" and e["round"] == 2]
        proto = ProtoRecordDict()
        proto.ParseFromString((audit / center / f"{entry['sha256']}.bin").read_bytes())
        sent[center] = recorddict_from_proto(proto)
    counts = {c: float(r["metrics"]["num-examples"]) for c, r in sent.items()}
    final = torch.load(out / "server" / "state.pt", weights_only=True)["model"]
    for key in final:
        mean = sum(counts[c] / sum(counts.values())
                   * sent[c]["arrays"][key].numpy().astype(np.float64) for c in HONEST)
        np.testing.assert_allclose(final[key].numpy(), mean.astype(np.float32), rtol=1e-6,
                                   atol=1e-7, err_msg=key)


if __name__ == "__main__":
    serve_lies(Path(sys.argv[1]))
