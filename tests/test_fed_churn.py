"""Churn in a real deployment: a center that joins after round 1, one that leaves and comes
back. The run goes on, and FED/metrics.json and FED/contribution.json say who was connected,
drawn and took part in which round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from processes import Processes, free_port_block, three_centers

pytestmark = [pytest.mark.slow, pytest.mark.long]

CENTERS = ("center_0", "center_1", "center_2")
ROUNDS = 8


def test_centers_join_late_leave_and_come_back_and_the_record_says_who_took_part(
        tmp_path: Path) -> None:
    phantoms = three_centers(tmp_path)
    out = tmp_path / "FED"
    port = free_port_block(8)
    run = Processes(tmp_path)

    def rounds() -> list[dict]:
        try:
            return json.loads((out / "metrics.json").read_text())["rounds"]
        except (OSError, ValueError):
            return []

    def join(center: str, n: int) -> None:
        run.start(f"{center}_{n}", "center", "join", "--superlink",
                  f"127.0.0.1:{port}", "--data", str(phantoms / center),
                  "--work", str(tmp_path / "work" / center), "--insecure",
                  "--port", str(port + 2 + n))
        run.wait_for(lambda: "SuperNode ID" in run.log(f"{center}_{n}"), 120, f"{center} to join")

    try:
        run.superlink("superlink", port)
        join("center_0", 0)
        join("center_1", 1)
        federation = run.start(
            "run", "run", "federate", "fed.mode=deployment", f"data.root={phantoms}",
            "fed.centers=all", "fed.min_centers=2", f"fed.rounds={ROUNDS}",
            "fed.round_timeout_s=300", "fed.cross_site=false", "experiment=phantoms_smoke",
            "trainer.progress=false", "data.num_patches_per_image=1", "fed.eval_bootstraps=10",
            "network.sw_roi_size=[144,144,96]", f"fed.deployment.superlink=127.0.0.1:{port}",
            "fed.deployment.insecure=true", f"out_dir={out}")
        # center_2 joins once round 1 is done.
        run.wait_for(lambda: len(rounds()) >= 1, 400, "round 1")
        join("center_2", 2)
        # center_2 takes part; then center_1 leaves ...
        run.wait_for(lambda: any("center_2" in r["train"]["accepted"] for r in rounds()), 400,
                     "a round with center_2")
        run.stop("center_1_1")  # SIGTERM: the center leaves ...
        # ... and comes back with a new SuperNode. Until the SuperLink declares the old node
        # gone (missed heartbeats) the name stays bound to it, so center_1 misses a round.
        join("center_1", 3)
        run.wait_for(lambda: federation.poll() is not None, 900, "the run to end")
        assert federation.returncode == 0, run.log("run")[-3000:]
    finally:
        run.stop_all()

    record = rounds()
    assert [r["round"] for r in record] == list(range(1, ROUNDS + 1))
    took_part = {c: [r["round"] for r in record if c in r["train"]["accepted"]] for c in CENTERS}
    connected = {c: [r["round"] for r in record if c in r["participation"]["available"]]
                 for c in CENTERS}
    # center_2 was not there in round 1, joined, and took part.
    assert 1 not in connected["center_2"] and took_part["center_2"]
    assert took_part["center_0"] == list(range(1, ROUNDS + 1))
    # center_1: in round 1, then missing from at least one round, then back by the last one.
    gaps = [r for r in range(2, ROUNDS + 1) if r not in took_part["center_1"]]
    assert 1 in took_part["center_1"] and gaps and ROUNDS in took_part["center_1"]
    assert any(r > gaps[0] for r in took_part["center_1"])
    for r in record:  # every round went on with the centers it had
        assert r["aggregated"] and len(r["train"]["accepted"]) >= 2
        assert set(r["train"]["accepted"]) <= set(r["participation"]["sampled"])
    contribution = json.loads((out / "contribution.json").read_text())["centers"]
    for c in CENTERS:
        assert contribution[c]["rounds"] == took_part[c]
        assert contribution[c]["connected_rounds"] == connected[c]
