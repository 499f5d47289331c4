"""The tamper-evident audit trail on the logs of a real federation (Flower's simulation engine,
two phantom centers, one round): each center's chained log, the coordinator's receipts, what
`center audit --verify` names when a record is edited, removed, reordered, inserted or cut off,
and what `fed reconcile` lists when one side lacks a message."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medfound.cli import main
from medfound.data.phantoms import make_phantoms
from medfound.fed.audit import read_audit, read_receipts, reconcile
from medfound.fed.chain import ChainLog, head_path, verify_chain

pytestmark = pytest.mark.slow

CENTERS = ["center_0", "center_1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trail")
    make_phantoms(root / "phantoms", centers=2, cases=3, seed=5, size="small", progress=False)
    out = root / "FED"
    res = subprocess.run(
        [sys.executable, "-m", "medfound", "run", "federate", "fed.mode=simulation",
         f"fed.centers=[{','.join(CENTERS)}]", "experiment=phantoms_smoke",
         "trainer.progress=false", "data.num_patches_per_image=1", "fed.eval_bootstraps=10",
         "network.sw_roi_size=[144,144,96]", f"data.root={root / 'phantoms'}", "fed.rounds=1",
         "fed.cross_site=false", f"out_dir={out}"],
        capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


def _copy(run: Path, tmp_path: Path, center: str = "center_0") -> Path:
    """A copy of a center's log and its head to tamper with."""
    log = tmp_path / f"{center}.jsonl"
    shutil.copy(run / "audit" / f"{center}.jsonl", log)
    shutil.copy(head_path(run / "audit" / f"{center}.jsonl"), head_path(log))
    return log


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def test_every_message_is_on_both_sides_with_the_same_hash(run: Path, capsys) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    receipts = read_receipts(run / "receipts.jsonl")
    assert verify_chain(run / "receipts.jsonl").ok
    for center in CENTERS:
        log = run / "audit" / f"{center}.jsonl"
        records = read_audit(log, direction=None)
        # What arrived and what left, in order: the name query, the train message and its
        # reply, the last model's evaluate message and its scores.
        assert [(r["direction"], r["kind"]) for r in records] == [
            ("received", "query"), ("sent", "query"), ("received", "train"), ("sent", "train"),
            ("received", "evaluate"), ("sent", "evaluate")]
        # The center's count of what it was sent is the coordinator's count of what it sent.
        got = sum(r["bytes"] for r in records if r["direction"] == "received")
        assert got == metrics["bytes_per_center"][center]["received"]
        assert main(["center", "audit", "--verify", str(log)]) == 0
        out = capsys.readouterr().out
        assert "chained but not signed" in out and "nothing removed at the end" in out
        result = reconcile(log, run / "receipts.jsonl")
        assert result["matched"] == len(records) == 6
        assert result["only_center"] == [] and result["only_coordinator"] == []
        assert main(["fed", "reconcile", "--center-log", str(log), "--receipts",
                     str(run / "receipts.jsonl")]) == 0
        assert "every message is on both sides" in capsys.readouterr().out
    # The train message is the same content for both centers, so the same hash; each reply
    # is the center's own.
    sent_train = {r["sha256"] for r in receipts if r["direction"] == "sent" and r["kind"] == "train"}
    assert len(sent_train) == 1
    assert len({r["sha256"] for r in receipts
                if r["direction"] == "received" and r["kind"] == "train"}) == 2


def test_verify_names_the_first_record_edited_removed_reordered_inserted_or_cut(
        run: Path, tmp_path: Path, capsys) -> None:
    log = _copy(run, tmp_path)
    lines = _lines(log)
    train = json.loads(lines[3])
    assert train["kind"] == "train" and train["direction"] == "sent"
    smaller = json.dumps({**train, "bytes": 1000})  # the update said to be small
    cases = {
        "edited": (lines[:3] + [smaller] + lines[4:],
                   "line 4 (record 3) was edited: its hash is not the one record 4 (line 5) "
                   "chains to"),
        "removed": (lines[:3] + lines[4:], "record 3 was removed (between line 3 and line 4)"),
        "reordered": (lines[:2] + [lines[3], lines[2]] + lines[4:],
                      "records were reordered: record 2 is at line 4, after record 3 at line 3"),
        "inserted": (lines[:4] + [lines[3]] + lines[4:],
                     "line 5 claims record 3, which line 4 already holds"),
        "truncated": (lines[:4], "the log was truncated: the head names 6 records, the log "
                                 "holds 4; records 4–5 were removed at the end"),
    }
    for name, (tampered, expected) in cases.items():
        _write(log, tampered)
        rc = main(["center", "audit", "--verify", str(log)])
        out = capsys.readouterr().out
        assert rc == 1 and f"FAILED: {expected}" in out, (name, out)


def test_reconcile_lists_the_message_one_side_lacks(run: Path, tmp_path: Path, capsys) -> None:
    # The center's log rewritten without its train reply, chain and head made anew: the log
    # is whole in itself (it is not signed), and only the coordinator's receipts show the lie.
    original = read_audit(run / "audit" / "center_0.jsonl", direction=None)
    forged = tmp_path / "forged" / "center_0.jsonl"
    chain = ChainLog(forged)
    for r in original:
        if not (r["direction"] == "sent" and r["kind"] == "train"):
            chain.append({k: v for k, v in r.items() if k not in ("seq", "prev", "line")})
    assert verify_chain(forged).ok
    rc = main(["fed", "reconcile", "--center-log", str(forged), "--receipts",
               str(run / "receipts.jsonl")])
    out = capsys.readouterr().out
    assert rc == 1
    result = reconcile(forged, run / "receipts.jsonl")
    (missing,) = result["only_coordinator"]
    update = next(r for r in original if r["direction"] == "sent" and r["kind"] == "train")
    assert missing["sha256"] == update["sha256"] and missing["direction"] == "received"
    assert missing["bytes"] == update["bytes"] and missing["round"] == 1
    assert result["only_center"] == []
    assert "only in the coordinator's receipts (center_0's log does not have it):" in out
    assert "coordinator received" in out and missing["sha256"][:16] in out

    # The other way: the coordinator's receipt of what it sent center_0 for training removed.
    receipts = tmp_path / "receipts.jsonl"
    lines = _lines(run / "receipts.jsonl")
    node = next(r["node"] for r in read_receipts(run / "receipts.jsonl") if r["center"] == "center_0")
    drop = next(i for i, line in enumerate(lines) if (r := json.loads(line))["node"] == node
                and r["direction"] == "sent" and r["kind"] == "train")
    _write(receipts, lines[:drop] + lines[drop + 1:])
    result = reconcile(run / "audit" / "center_0.jsonl", receipts)
    (extra,) = result["only_center"]
    assert extra["direction"] == "received" and extra["kind"] == "train"
    assert result["only_coordinator"] == []
    assert result["receipts_chain"] is not None and "removed" in result["receipts_chain"]


def test_contribution_json_counts_what_each_center_did(run: Path) -> None:
    """Without fed.contribution the record is the coordinator's bookkeeping only."""
    doc = json.loads((run / "contribution.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert doc["effect"] is None and "fed.contribution=true" in doc["method"]
    assert not (run / "contribution.png").exists()
    for center in CENTERS:
        per = doc["centers"][center]
        assert per["rounds"] == [1] and per["accepted_rounds"] == [1]
        assert per["accepted_updates"] == 1 and per["rejected_updates"] == 0
        assert per["cases"] == metrics["rounds"][0]["train"]["centers"][center]["num-examples"]
        assert per["bytes"] == metrics["bytes_per_center"][center]
