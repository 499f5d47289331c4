"""A center's outbound audit log and `medfound center audit`: what left the center, in full."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medfound.cli import main
from medfound.fed.audit import AuditLog, read_audit, verify_log
from medfound.fed.chain import ChainLog, NodeKey, head_path, verify_chain
from medfound.fed.deployment import join_command, make_center_keys


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
    assert set(first) == {"time", "center", "round", "kind", "direction", "bytes", "sha256",
                          "metrics", "seq", "prev"}
    assert first["direction"] == "sent" and first["seq"] == 0 and first["prev"] == "0" * 64
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
    assert out[0].split() == ["time", "(UTC)", "center", "round", "dir", "kind", "bytes",
                              "sha256", "metrics"]
    rows = [line for line in out if line.startswith("20")]
    assert len(rows) == 4
    assert rows[0].split()[1:6] == ["center_1", "1", "out", "train", "400,000"]
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
    assert verify_chain(path).ok  # one writer at a time: every record chains to the last


# --- the hash chain and its signatures -----------------------------------------------------------


def _signed_log(tmp_path: Path, n: int = 5) -> tuple[Path, Path, Path]:
    """A center's log of `n` records signed with a real node key; (log, key, public key)."""
    key, pub = make_center_keys(tmp_path / "keys", "center_0")
    log = tmp_path / "audit" / "center_0.jsonl"
    audit = AuditLog(log, "center_0", signing_key=key)
    for i in range(n):
        audit.record(round=i // 2 + 1, kind="train" if i % 2 else "evaluate",
                     payload=bytes([i]) * (100 + i), direction="sent" if i % 2 else "received")
    return log, key, pub


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def _verify(capsys, log: Path, pub: Path | None = None) -> tuple[int, str]:
    rc = main(["center", "audit", "--verify", str(log)] + (["--public-key", str(pub)] if pub else []))
    return rc, capsys.readouterr().out


def test_a_signed_log_verifies_against_the_centers_public_key(tmp_path: Path, capsys) -> None:
    log, _, pub = _signed_log(tmp_path)
    records = [json.loads(line) for line in _lines(log)]
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["key"].startswith("SHA256:") and r["sig"] for r in records)
    head = json.loads(head_path(log).read_text())
    assert head["count"] == 5 and head["public_key"].startswith("ecdsa-sha2-nistp384 ")
    rc, out = _verify(capsys, log, pub)
    assert rc == 0 and out.strip().endswith("OK: every record chains to the one before and its "
                                            "signature verifies")
    assert f"from {pub}" in out and "nothing removed at the end" in out
    # The CLI's table shows both directions.
    assert main(["center", "audit", str(log)]) == 0
    table = capsys.readouterr().out
    assert "received: 3 messages" in table and " in   evaluate" in table


def test_an_edited_signed_record_is_named(tmp_path: Path, capsys) -> None:
    log, _, pub = _signed_log(tmp_path)
    lines = _lines(log)
    edited = json.loads(lines[2])
    edited["bytes"] = 1  # the count of what left, made smaller
    _write(log, lines[:2] + [json.dumps(edited)] + lines[3:])
    rc, out = _verify(capsys, log, pub)
    assert rc == 1
    assert "FAILED: line 3 (record 2) was edited or forged: its signature does not verify" in out


def test_a_record_re_signed_with_another_key_is_a_forgery(tmp_path: Path, capsys) -> None:
    log, _, pub = _signed_log(tmp_path)
    other, other_pub = make_center_keys(tmp_path / "mallory", "center_0")
    lines = _lines(log)
    # Mallory rewrites the whole log and its head with her key: a chain whole in itself...
    forged = tmp_path / "forged" / "center_0.jsonl"
    chain = ChainLog(forged, key=NodeKey(other))
    for line in lines:
        record = json.loads(line)
        chain.append({k: v for k, v in record.items() if k not in ("seq", "prev", "key", "sig")})
    rc, out = _verify(capsys, forged)
    assert rc == 0 and "the log's own claim" in out and "pass --public-key" in out
    # ...which the center's registered key refuses, naming the first record.
    rc, out = _verify(capsys, forged, pub)
    assert rc == 1 and "FAILED: line 1 (record 0) is signed by another key" in out
    # A single record forged with her key inside the real log.
    record = json.loads(lines[3])
    record["bytes"] = 7
    record["key"] = json.loads(_lines(forged)[0])["key"]
    record["sig"] = json.loads(_lines(forged)[3])["sig"]
    _write(log, lines[:3] + [json.dumps(record)] + lines[4:])
    rc, out = _verify(capsys, log)  # without --public-key the head's key still catches it
    assert rc == 1 and "line 4 (record 3) is signed by another key" in out
    assert verify_log(log, other_pub).problem.startswith("line 1 (record 0) is signed by another")


def test_removed_reordered_inserted_and_truncated_records_are_named(tmp_path: Path,
                                                                    capsys) -> None:
    log, _, pub = _signed_log(tmp_path, n=6)
    lines = _lines(log)
    cases = {
        "removed": (lines[:2] + lines[3:], "record 2 was removed (between line 2 and line 3)"),
        "removed first": (lines[1:], "record 0 was removed (before line 1)"),
        "reordered": (lines[:1] + [lines[2], lines[1]] + lines[3:],
                      "records were reordered: record 1 is at line 3, after record 2 at line 2"),
        "inserted": (lines[:3] + [lines[1].replace('"bytes": 101', '"bytes": 5')] + lines[3:],
                     "line 4 was inserted: it is not signed by the center's key and the chain "
                     "runs around it"),
        "copied": (lines[:3] + [lines[1]] + lines[3:],
                   "line 4 claims record 1, which line 2 already holds"),
        "truncated": (lines[:4], "the log was truncated: the head names 6 records, the log "
                                 "holds 4; records 4–5 were removed at the end"),
        "not JSON": (lines[:1] + ["{broken"] + lines[2:], "line 2 is not a JSON record"),
    }
    for name, (tampered, expected) in cases.items():
        _write(log, tampered)
        rc, out = _verify(capsys, log, pub)
        assert rc == 1 and f"FAILED: {expected}" in out, (name, out)
    _write(log, lines)
    assert _verify(capsys, log, pub)[0] == 0
    # The head rewritten to match the truncated log is not signed by the center.
    head = json.loads(head_path(log).read_text())
    head["count"] = 4
    head_path(log).write_text(json.dumps(head))
    _write(log, lines[:4])
    rc, out = _verify(capsys, log, pub)
    assert rc == 1 and "the head file center_0.head.json is not signed by the center's key" in out
    # No head at all: the chain verifies, and the report says what cannot be seen without it.
    head_path(log).unlink()
    rc, out = _verify(capsys, log, pub)
    assert rc == 0 and "no head file" in out and "medfound fed reconcile" in out


def test_an_unsigned_log_is_chained_and_says_it_is_unsigned(tmp_path: Path, capsys) -> None:
    log = tmp_path / "center_1.jsonl"
    audit = AuditLog(log, "center_1")
    for i in range(4):
        audit.record(round=1, kind="train", payload=bytes([i]) * 10)
    rc, out = _verify(capsys, log)
    assert rc == 0 and "signatures: none — the records are chained but not signed" in out
    lines = _lines(log)
    edited = lines[1].replace('"bytes": 10', '"bytes": 11')
    _write(log, lines[:1] + [edited] + lines[2:])
    rc, out = _verify(capsys, log)
    assert rc == 1 and "FAILED: line 2 (record 1) was edited: its hash is not the one record 2 " \
                       "(line 3) chains to" in out
    _write(log, lines[:3] + [lines[3].replace('"bytes": 10', '"bytes": 12')])
    rc, out = _verify(capsys, log)  # the last record has no successor: the head names its hash
    assert rc == 1 and "the last record is not the one the head names" in out
    assert main(["center", "audit", str(log), "--public-key", str(log)]) == 2  # needs --verify


def test_a_joining_center_signs_its_log_with_its_node_key(tmp_path: Path) -> None:
    from medfound.fed.client_app import Site

    key, _ = make_center_keys(tmp_path / "keys", "center_0")
    data = tmp_path / "center_0"
    data.mkdir()
    (data / "datalist.json").write_text("{}")
    cmd = join_command(superlink="127.0.0.1:9092", center="center_0", data=str(data),
                       work=str(tmp_path / "work"), insecure=False,
                       root_certificates=str(key), auth_key=str(key))
    config = cmd[cmd.index("--node-config") + 1]
    assert f'audit-key="{key.resolve()}"' in config
    site = Site.from_node_config({"center": "center_0", "data-dir": str(data),
                                  "work-dir": str(tmp_path / "work"), "audit-key": str(key)})
    site.audit_log().record(round=1, kind="query", payload=b"x")
    assert "sig" in json.loads(site.audit_file.read_text())
