"""A federation whose processes fail: real SuperLink and SuperNodes on 127.0.0.1, a center
killed mid-round, the coordinator killed and resumed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from processes import free_port_block, medfound_env, three_centers

pytestmark = [pytest.mark.slow, pytest.mark.long]

CENTERS = ("center_0", "center_1", "center_2")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return three_centers(tmp_path_factory.mktemp("robust"))


def test_a_center_killed_mid_round_and_a_killed_coordinator_resuming(phantoms: Path,
                                                                     tmp_path: Path) -> None:
    """Real SuperLink and SuperNodes on 127.0.0.1, two rounds, quorum of two.

    center_2's SuperNode is killed (SIGKILL) while it trains round 1: the round completes with
    the other two once the SuperLink declares it gone, and center_2 rejoins. Then the
    coordinator (the ServerApp process) is killed during round 2, and `resume=true` finishes
    the run from the state of round 1 — with center_2 back in."""
    env = medfound_env()
    port = free_port_block(8)
    out = tmp_path / "FED"
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> subprocess.Popen:
        procs[name] = subprocess.Popen([sys.executable, "-m", "medfound", *args], env=env,
                                       stdout=open(tmp_path / f"{name}.log", "w"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return procs[name]

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

    def rounds_done() -> int:
        try:
            return json.loads((out / "metrics.json").read_text())["rounds_completed"]
        except (OSError, ValueError):
            return 0

    def join(center: str, n: int) -> None:
        start(f"{center}_{n}", "center", "join", "--superlink", f"127.0.0.1:{port}", "--data",
              str(phantoms / center), "--work", str(tmp_path / "work" / center), "--insecure",
              "--port", str(port + 2 + n))

    federate = [sys.executable, "-m", "medfound", "run", "federate", "fed.mode=deployment",
                f"data.root={phantoms}", f"fed.centers=[{','.join(CENTERS)}]",
                "fed.min_centers=2", "fed.rounds=2", "fed.round_timeout_s=300",
                "fed.cross_site=false", "experiment=phantoms_smoke", "trainer.progress=false",
                "data.num_patches_per_image=1", "fed.eval_bootstraps=10",
                "network.sw_roi_size=[144,144,96]", f"fed.deployment.superlink=127.0.0.1:{port}",
                "fed.deployment.insecure=true", f"out_dir={out}"]
    try:
        start("superlink", "fed", "superlink", "--address", f"127.0.0.1:{port}", "--insecure")
        wait_for(lambda: "Uvicorn running" in log("superlink"), 60, "the SuperLink")
        for n, center in enumerate(CENTERS):
            join(center, n)
        wait_for(lambda: all("SuperNode ID" in log(f"{c}_{n}") for n, c in enumerate(CENTERS)),
                 120, "three SuperNodes")
        procs["run"] = subprocess.Popen(federate, env=env, stdout=open(tmp_path / "run.log", "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

        # A center crashes while it trains; it comes back (same folders, new process).
        wait_for(lambda: "Receiving: train message" in log("center_2_2"), 180,
                 "center_2 to receive round 1")
        os.killpg(procs["center_2_2"].pid, signal.SIGKILL)
        procs.pop("center_2_2").wait(timeout=30)
        join("center_2", 3)
        wait_for(lambda: "SuperNode ID" in log("center_2_3"), 120, "center_2 to rejoin")

        # The coordinator dies in round 2, after round 1's state was written.
        wait_for(lambda: rounds_done() >= 1, 300, "round 1")
        link = psutil.Process(procs["superlink"].pid)
        serverapps = [p for p in link.children(recursive=True)
                      if any("flwr-serverapp" in part for part in p.cmdline())]
        assert serverapps, "no ServerApp process under the SuperLink"
        for proc in serverapps:
            proc.kill()
        os.killpg(procs["run"].pid, signal.SIGKILL)
        procs.pop("run").wait(timeout=30)
        assert rounds_done() == 1

        resumed = subprocess.run([*federate, "resume=true"], env=env, capture_output=True,
                                 text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "resuming after round 1" in resumed.stdout + log("superlink")
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)

    metrics = json.loads((out / "metrics.json").read_text())
    first, second = metrics["rounds"]
    # Round 1: the quorum's two updates were aggregated; center_2's node was reported gone.
    assert first["aggregated"] and first["train"]["accepted"] == ["center_0", "center_1"]
    assert len(first["train"]["failed"]) == 1
    assert "Node Unavailable" in first["train"]["failed"][0]["reason"]
    assert first["train"]["failed"][0]["center"] == "center_2"  # named by its query reply
    # Round 2, run by the resumed coordinator: center_2 is back.
    assert second["aggregated"] and second["train"]["accepted"] == list(CENTERS)
    assert [g["round"] for g in metrics["global"]] == [1, 2]
    # Round 1's model was scored by the resumed coordinator's round-2 train message.
    assert first["evaluate"]["in_round"] == 2 and not first["evaluate"]["pending"]
    assert json.loads((out / "model" / "model.json").read_text())["provenance"]["rounds"] == 2
    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                 if any(str(tmp_path) in part for part in (p.info["cmdline"] or []))]
    assert leftovers == []
