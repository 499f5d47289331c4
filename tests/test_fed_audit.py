"""A center's outbound audit log and `medfound center audit`: what left the center, in full."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medfound.cli import main
from medfound.fed.audit import AuditLog, read_audit


def test_each_outbound_message_is_one_json_line_with_its_hash_size_and_metric_names(
        tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit" / "center_0.jsonl", "center_0", keep_payloads=True)
    weights, scores = b"\x00weights" * 1000, b"scores"
    log.record(round=1, kind="train", payload=weights, metric_names=["train/loss", "num-examples"])
    log.record(round=1, kind="evaluate", payload=scores, metric_names=["cpm", "num-examples"])
    log.record(round=2, kind="error", payload=b"train failed at center center_0: OSError")

    lines = (tmp_path / "audit" / "center_0.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert set(first) == {"time", "center", "round", "kind", "bytes", "sha256", "metrics"}
    assert first["center"] == "center_0" and first["round"] == 1 and first["kind"] == "train"
    assert first["bytes"] == len(weights)
    assert first["sha256"] == hashlib.sha256(weights).hexdigest()
    assert first["metrics"] == ["num-examples", "train/loss"]
    assert first["time"].endswith("+00:00")  # UTC
    # With keep_payloads an auditor can open what was sent and check it against the hash.
    kept = tmp_path / "audit" / "center_0" / f"{first['sha256']}.bin"
    assert kept.read_bytes() == weights
    assert [r["kind"] for r in read_audit(tmp_path / "audit" / "center_0.jsonl")] == \
        ["train", "evaluate", "error"]


def test_center_audit_prints_a_table_with_totals(tmp_path: Path, capsys) -> None:
    path = tmp_path / "center_1.jsonl"
    log = AuditLog(path, "center_1")
    for rnd in (1, 2):
        log.record(round=rnd, kind="train", payload=b"w" * 400_000, metric_names=["train/loss"])
        log.record(round=rnd, kind="evaluate", payload=b"m" * 100, metric_names=["cpm"])

    assert main(["center", "audit", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["time", "(UTC)", "center", "round", "kind", "bytes", "sha256",
                              "metrics"]
    rows = [line for line in out if line.startswith("20")]
    assert len(rows) == 4
    assert rows[0].split()[1:5] == ["center_1", "1", "train", "400,000"]
    assert out[-1] == ("total: 4 messages, 800,200 bytes over 2 rounds — evaluate 2 (200 bytes); "
                       "train 2 (800,000 bytes)")

    assert main(["center", "audit", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["totals"]["bytes"] == 800_200 and len(doc["records"]) == 4


def test_a_missing_or_damaged_log_is_one_clear_line(tmp_path: Path, capsys) -> None:
    assert main(["center", "audit", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such audit log" in err[0]

    damaged = tmp_path / "damaged.jsonl"
    AuditLog(damaged, "c").record(round=1, kind="train", payload=b"x")
    with damaged.open("a") as f:
        f.write('{"time": "2025-01-01", "round": 1}\nnot json\n')
    assert main(["center", "audit", str(damaged)]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 2" in err and "missing" in err and str(damaged) in err


@pytest.mark.parametrize("n", [1, 50])
def test_appends_never_interleave(tmp_path: Path, n: int) -> None:
    import threading

    path = tmp_path / "log.jsonl"
    log = AuditLog(path, "c")
    threads = [threading.Thread(target=log.record,
                                kwargs={"round": i, "kind": "train", "payload": bytes(i)})
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["round"] for r in read_audit(path)) == list(range(n))
