"""A center under a hostile or failing coordinator, over real Flower processes on 127.0.0.1
(`medfound fed superlink`, `medfound center join` with its worker, `flwr run`):

- a malicious coordinator's ServerApp sends hostile run tags and round numbers; the center
  replies with errors, writes nothing outside its work folder, and serves a valid message after;
- the SuperLink is killed and restarted: with its database the center reconnects, without it
  the center joins again, and when the SuperLink stays away the join exits non-zero."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfound.data.phantoms import make_phantoms
from medfound.fed.deployment import _toml_string, write_app, write_connection
from processes import Processes, free_port_block
from test_fed_hostile_center import snapshot, victim_beside

pytestmark = [pytest.mark.slow, pytest.mark.long]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The coordinator's ServerApp: every case of the spec in one batch to the one center, then a
# valid evaluate message and a query; what came back is written to spec["out"].
HOSTILE_APP = '''
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from medfound.fed.params import to_arrays
    from medfound.fed.protocol import task_spec, versions
    from medfound.train import detection as task

    spec = json.loads(str(context.run_config["hostile-spec"]))
    cfg = spec["cfg"]
    network, _ = task.build(cfg["network"], seed=cfg["seed"])
    arrays = to_arrays(network.state_dict())
    deadline = time.time() + 120
    while not (nodes := sorted(grid.get_node_ids())) and time.time() < deadline:
        time.sleep(1)
    node = nodes[0]

    def message(kind, run_tag, rnd, extra=None):
        t = json.loads(task_spec(cfg, local_epochs=1, transfer_dtype="float32",
                                 eval_bootstraps=10, run_tag="run1"))
        t["run_tag"] = run_tag
        config = {"task": json.dumps(t), "versions": json.dumps(versions()), "server-round": rnd}
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({**config, **(extra or {})})})
        return Message(content, dst_node_id=node, message_type=kind)

    def exchange(messages):
        ids = list(grid.push_messages(messages))
        replies, deadline = {}, time.time() + 600
        while len(replies) < len(ids) and time.time() < deadline:
            for reply in grid.pull_messages([i for i in ids if i not in replies]):
                replies[reply.metadata.reply_to_message_id] = reply
            time.sleep(0.2)
        return [replies.get(i) for i in ids]

    def result(label, reply):
        if reply is None:
            return {"label": label, "error": True, "reason": "no reply"}
        if reply.has_error():
            return {"label": label, "error": True, "reason": str(reply.error.reason)}
        return {"label": label, "error": False, "keys": sorted(reply.content.keys()),
                "center": dict(reply.content["center"]) if "center" in reply.content else None}

    hostile = [message(c["kind"], c["run_tag"], c["round"], c.get("extra")) for c in spec["cases"]]
    results = [result(c["label"], r) for c, r in zip(spec["cases"], exchange(hostile))]
    valid = message(MessageType.EVALUATE, "run1", 1)
    query = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                    message_type=MessageType.QUERY)
    results += [result("valid", r) for r in exchange([valid])]
    results += [result("query", r) for r in exchange([query])]
    Path(spec["out"]).write_text(json.dumps(results))
'''


def _yaml(name: str) -> dict:
    import yaml

    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_deploy") / "phantoms"
    return make_phantoms(root, centers=1, cases=2, seed=5, size="small", progress=False)


def test_a_malicious_coordinator_over_real_flower_processes(phantoms: Path, tmp_path: Path) -> None:
    port = free_port_block(4)
    procs = Processes(tmp_path)
    site_root = tmp_path / "site"
    work = site_root / "work"
    victim = victim_beside(site_root)
    before_victim, before_outside = snapshot(victim), snapshot(site_root, skip=work)

    cfg = {"network": {**_yaml("network/retinanet_tiny.yaml"), "spacing_mm": [2.8125, 2.8125, 3.0],
                       "patch_size": [64, 64, 32], "sw_roi_size": [144, 144, 96]},
           "trainer": {**_yaml("trainer/default.yaml"), "progress": False},
           "data": {**_yaml("data/phantoms.yaml"), "num_patches_per_image": 1}, "seed": 0}
    cases = [{"label": f"run_tag={tag!r}"[:40], "kind": kind, "run_tag": tag, "round": 99999}
             for kind, tag in [("train", "../../victim"), ("train", str(victim)), ("train", ""),
                               ("train", "v" * 10_240), ("evaluate", 7), ("evaluate", "../..")]]
    cases += [{"label": f"round={rnd!r}", "kind": "train", "run_tag": "run1", "round": rnd}
              for rnd in (-1, 10**12, "1/../..", 1.5)]
    cases.append({"label": "cross-site", "kind": "evaluate", "run_tag": "run1", "round": 1,
                  "extra": {"cross-site-models": json.dumps(["../../victim"])}})
    out = tmp_path / "replies.json"
    spec = {"cfg": cfg, "cases": cases, "out": str(out)}

    app = write_app(tmp_path / "app", "")
    pyproject = (app / "pyproject.toml").read_text()
    pyproject = pyproject.replace('serverapp = "medfound.fed.coordinator_app:server_app"',
                                  'serverapp = "hostile_app:app"')
    pyproject = pyproject.replace('medfound-config = ""', "hostile-spec = "
                                  + _toml_string(json.dumps(spec)))
    (app / "pyproject.toml").write_text(pyproject)
    (app / "hostile_app.py").write_text(HOSTILE_APP)
    write_connection(tmp_path / "flwr", f"127.0.0.1:{port}", None, insecure=True)
    try:
        procs.superlink("superlink", port, tmp_path / "superlink.db")
        join = procs.start("center", "center", "join", "--superlink", f"127.0.0.1:{port}",
                           "--data", str(phantoms / "center_0"), "--work", str(work),
                           "--insecure", "--port", str(port + 2))
        procs.wait_for(lambda: "SuperNode ID" in procs.log("center"), 180, "the center to join")
        run = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(app), "medfound",
                              "--stream"], env={**procs.env, "FLWR_HOME": str(tmp_path / "flwr")},
                             capture_output=True, text=True, timeout=600)
        assert out.is_file(), run.stdout[-3000:] + run.stderr[-3000:] + procs.log("superlink")[-3000:]
        assert join.poll() is None  # the center is still serving
    finally:
        procs.stop_all()

    replies = json.loads(out.read_text())
    by_label = {r["label"]: r for r in replies}
    for case in cases:
        reply = by_label[case["label"]]
        assert reply["error"] and "center center_0 refused the" in reply["reason"], reply
        assert "invalid" in reply["reason"] and len(reply["reason"]) < 400
    assert by_label["valid"] == {"label": "valid", "error": False, "keys": ["center", "metrics"],
                                 "center": {"name": "center_0"}}
    assert by_label["query"]["center"] == {"name": "center_0"}
    # Nothing outside the center's work folder was written or deleted.
    assert snapshot(victim) == before_victim
    assert snapshot(site_root, skip=work) == before_outside
    # Every refusal is in the center's audit log.
    kinds = [r["kind"] for line in (work / "audit" / "center_0.jsonl").read_text().splitlines()
             if (r := json.loads(line))["direction"] == "sent"]
    assert kinds == ["error"] * len(cases) + ["evaluate", "query"]


def test_center_join_reconnects_rejoins_and_gives_up_non_zero(phantoms: Path,
                                                              tmp_path: Path) -> None:
    port = free_port_block(4)
    procs = Processes(tmp_path)
    try:
        procs.superlink("link1", port, tmp_path / "link.db")
        join = procs.start("center", "center", "join", "--superlink", f"127.0.0.1:{port}",
                           "--data", str(phantoms / "center_0"), "--work", str(tmp_path / "work"),
                           "--insecure", "--port", str(port + 2),
                           env={"MEDFOUND_JOIN_MAX_WAIT_S": "25"})
        procs.wait_for(lambda: procs.log("center").count("SuperNode ID") == 1, 180, "the center")
        first_id = procs.log("center").split("SuperNode ID:")[1].split()[0]

        # A TLS join against this plain SuperLink says so at once, instead of retrying forever.
        (tmp_path / "ca.crt").write_text("a CA certificate\n")
        bad = subprocess.run([sys.executable, "-m", "medfound", "center", "join", "--superlink",
                              f"127.0.0.1:{port}", "--data", str(phantoms / "center_0"),
                              "--root-certificates", str(tmp_path / "ca.crt")],
                             env=procs.env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "does not serve TLS" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr

        # The SuperLink dies and comes back with its database: the same node reconnects.
        procs.stop("link1", signal.SIGKILL)
        procs.wait_for(lambda: "Connection attempt failed" in procs.log("center"), 60,
                       "the center to notice")
        procs.superlink("link2", port, tmp_path / "link.db")
        procs.wait_for(lambda: "Connection successful" in procs.log("center"), 120,
                       "the center to reconnect")
        assert join.poll() is None and procs.log("center").count("SuperNode ID") == 1

        # It comes back without its state: the center joins again as a new node.
        procs.stop("link2", signal.SIGKILL)
        procs.superlink("link3", port, tmp_path / "other.db")
        procs.wait_for(lambda: procs.log("center").count("SuperNode ID") == 2, 180,
                       "the center to join again")
        assert "no longer knows this center" in procs.log("center")
        assert procs.log("center").split("SuperNode ID:")[2].split()[0] != first_id
        assert join.poll() is None

        # It stays away: the join gives up after its wait budget, non-zero, with one line.
        procs.stop("link3", signal.SIGKILL)
        started = time.time()
        rc = join.wait(timeout=180)
        assert rc == 75, procs.log("center")[-3000:]
        assert 20 < time.time() - started < 120
        last = procs.log("center").strip().splitlines()[-1]
        assert last.startswith("error: gave up joining: the SuperLink at 127.0.0.1:"), last
    finally:
        procs.stop_all()
