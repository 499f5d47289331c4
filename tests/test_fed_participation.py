"""Who takes part in each round (medfound.fed.participation): fed.centers=all, seeded draws
(fed.fraction, fed.centers_per_round), the k-of-n deadline (fed.replies_per_round), and the
record of who was connected, drawn, replied and late — in unit tests and in a simulation of
20 centers; 115 centers in the long suite."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medfound.data.phantoms import make_phantoms
from medfound.errors import MedfoundError
from medfound.fed.participation import draw, sample_size
from medfound.fed.settings import FedSettings, all_centers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = yaml.safe_load((CONFIGS / "federate.yaml").read_text())
SMOKE = ["fed.mode=simulation", "experiment=phantoms_smoke", "trainer.progress=false",
         "data.num_patches_per_image=1", "fed.eval_bootstraps=10",
         "network.sw_roi_size=[144,144,96]", "fed.cross_site=false"]


def settings(centers: list[str], **fed) -> FedSettings:
    return FedSettings.from_config({**BASE, "fed": {**BASE["fed"], "centers": centers,
                                                    "strategy": {"name": "fedavg"}, **fed}})


NAMES = [f"c{i:03d}" for i in range(40)]


def test_a_round_draws_a_share_or_a_number_of_the_connected_centers_and_at_least_min_centers():
    assert sample_size(115, 0.1, None, 2) == 12  # ⌈11.5⌉
    assert sample_size(115, None, 20, 2) == 20
    assert sample_size(115, None, None, 2) == 115  # every connected center
    assert sample_size(10, 0.05, None, 3) == 3  # at least fed.min_centers
    assert sample_size(2, None, 20, 3) == 2  # never more than are connected
    assert sample_size(30, 0.2, None, 2) == 6  # exactly 6, not 7 (float rounding)


def test_the_draw_is_seeded_by_seed_and_round_over_the_centers_names():
    s = settings(NAMES, fraction=0.25)
    known = {100 + i: name for i, name in enumerate(NAMES)}
    first = draw(known, known, 3, s, seed=0)
    assert len(first) == 10 and first == sorted(first)
    assert draw(known, known, 3, s, seed=0) == first  # a resumed run draws the same
    # Node ids do not matter, names do: the same centers under other node ids.
    renumbered = {9000 - i: name for i, name in enumerate(NAMES)}
    assert sorted(renumbered[n] for n in draw(renumbered, renumbered, 3, s, seed=0)) == \
        sorted(known[n] for n in first)
    others = {tuple(draw(known, known, r, s, seed=0)) for r in range(1, 9)}
    assert len(others) == 8  # each round its own draw
    assert draw(known, known, 3, s, seed=1) != first
    # Only connected centers that gave their name are drawn.
    connected = list(known)[:12] + [7]  # node 7 never said who it is
    picked = draw(connected, known, 3, s, seed=0)
    assert set(picked) <= set(list(known)[:12]) and len(picked) == 3  # ⌈0.25 × 12⌉
    # Without fed.fraction / fed.centers_per_round: every connected node, named or not.
    assert draw(connected, known, 3, settings(NAMES), seed=0) == sorted(connected)


@pytest.mark.parametrize(("fed", "expected"), [
    ({"fraction": 0}, "fed.fraction"),
    ({"fraction": 1.5}, "fed.fraction"),
    ({"fraction": 0.5, "centers_per_round": 4}, "fed.fraction and fed.centers_per_round"),
    ({"centers_per_round": 1}, "fed.centers_per_round"),  # below fed.min_centers (2)
    ({"centers_per_round": 41}, "fed.centers_per_round"),
    ({"replies_per_round": 6, "centers_per_round": 5}, "more than the 5 centers drawn"),
    ({"fraction": 0.5, "privacy": {"dp": "client"}}, "fed.privacy.dp does not combine"),
    ({"centers_per_round": 5, "privacy": {"secagg": True}}, "fed.privacy.secagg does not combine"),
    ({"replies_per_round": 5, "privacy": {"secagg": True}}, "fed.replies_per_round: SecAgg+"),
])
def test_participation_settings_name_the_key_a_user_got_wrong(fed: dict, expected: str) -> None:
    with pytest.raises(MedfoundError, match=re.escape(expected)):
        settings(NAMES, **fed)


def test_fed_centers_all_lists_the_center_folders_of_data_root(tmp_path: Path) -> None:
    for name in ("site_b", "site_a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "datalist.json").write_text("{}")
    (tmp_path / "notes").mkdir()  # no datalist.json: not a center
    assert all_centers(tmp_path) == ["site_a", "site_b"]
    with pytest.raises(MedfoundError, match="no center folder"):
        all_centers(tmp_path / "notes")
    with pytest.raises(MedfoundError, match="no such data folder"):
        all_centers(tmp_path / "missing")
    with pytest.raises(MedfoundError, match=re.escape("or all (every center folder")):
        settings("all")  # only the recipe resolves it


def federate(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medfound", "run", "federate", *SMOKE,
                           *overrides], capture_output=True, text=True, check=False, timeout=1800)


def check_record(out: Path, n: int, drawn: int, replies: int, rounds: int, **fed) -> dict:
    """The run's record says who was connected, drawn, replied and late, every round (`fed`:
    the run's participation keys)."""
    metrics = json.loads((out / "metrics.json").read_text())
    names = sorted(f"center_{i}" for i in range(n))
    assert metrics["rounds_completed"] == rounds and metrics["centers"] == names
    known = dict(enumerate(names))
    s = settings(names, **fed)
    for record in metrics["rounds"]:
        taking = record["participation"]
        assert taking["connected"] == n and taking["available"] == names
        assert len(taking["sampled"]) == drawn
        # The draw is the seeded one: the same names as `draw` gives for this round.
        assert taking["sampled"] == sorted(known[i] for i in draw(known, known, record["round"],
                                                                   s, seed=0))
        replied = set(record["train"]["centers"]) | {f["center"] for f in record["train"]["failed"]}
        assert replied <= set(taking["sampled"]) and len(replied) == replies
        assert taking["late"] == sorted(set(taking["sampled"]) - replied)
        assert record["aggregated"] and record["train"]["accepted"] == sorted(replied)
        assert set(record["train"]["timing"]) == {"exchange_s", "screen_s", "aggregate_s"}
    contribution = json.loads((out / "contribution.json").read_text())["centers"]
    for center, row in contribution.items():
        assert row["sampled_rounds"] == [r["round"] for r in metrics["rounds"]
                                         if center in r["participation"]["sampled"]]
        assert row["late_rounds"] == [r["round"] for r in metrics["rounds"]
                                      if center in r["participation"]["late"]]
        assert row["rounds"] == [r["round"] for r in metrics["rounds"]
                                 if center in r["train"]["centers"]]
    return metrics


@pytest.mark.long
def test_20_centers_each_round_draws_four_and_closes_after_three_replies(tmp_path: Path) -> None:
    root = make_phantoms(tmp_path / "phantoms", centers=20, cases=1, seed=3, size="small",
                         progress=False)
    out = tmp_path / "FED"
    res = federate(f"data.root={root}", "fed.centers=all", "fed.rounds=2", "fed.fraction=0.2",
                   "fed.replies_per_round=3", f"out_dir={out}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_record(out, n=20, drawn=4, replies=3, rounds=2, fraction=0.2, replies_per_round=3)
    assert "4 of 20 centers drawn, 1 late" in res.stdout


@pytest.mark.long
@pytest.mark.timeout(2400)
def test_115_centers_on_one_machine(tmp_path: Path) -> None:
    """115 phantom centers of one case each; each round draws 20 and closes after 16."""
    root = make_phantoms(tmp_path / "phantoms", centers=115, cases=1, seed=0, size="small",
                         progress=False)
    out = tmp_path / "FED"
    res = federate(f"data.root={root}", "fed.centers=all", "fed.rounds=2",
                   "fed.centers_per_round=20", "fed.replies_per_round=16", f"out_dir={out}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = check_record(out, n=115, drawn=20, replies=16, rounds=2, centers_per_round=20,
                           replies_per_round=16)
    assert (out / "model" / "model.json").is_file()
    assert sum(len(r["participation"]["sampled"]) for r in metrics["rounds"]) == 40
