"""A center's outbound audit log: one JSON line per message that left the center.

    {"time": "2025-01-31T12:00:00.123456+00:00", "center": "center_0", "round": 3,
     "kind": "train", "bytes": 391204, "sha256": "9f2c…", "metrics": ["num-examples", ...]}

``kind`` is the message type the center answered ("train", "evaluate"; "cross-site" for the
evaluations of other centers' models after the last round), or "error" when it
answered with an error (the reason it sent is what was hashed and counted). ``bytes`` and
``sha256`` are over the exact payload (`medfound.fed.params.payload_bytes`); with
``keep_payloads`` the payload itself is also kept as ``<log stem>/<sha256>.bin`` beside the
log, so an auditor can open what was sent and check it against the hash.

`medfound center audit FILE` prints a log as a table with totals (`format_audit`). This module
needs only the standard library: a center can audit without torch or Flower installed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medfound.errors import MedfoundError

__all__ = ["AuditLog", "audit_totals", "format_audit", "read_audit"]

FIELDS = ("time", "center", "round", "kind", "bytes", "sha256", "metrics")


class AuditLog:
    """Appends records to ``path`` (created with its folder on first use)."""

    def __init__(self, path: str | Path, center: str, keep_payloads: bool = False):
        self.path = Path(path)
        self.center = center
        self.keep_payloads = keep_payloads

    def record(self, *, round: int, kind: str, payload: bytes,
               metric_names: Iterable[str] = ()) -> dict[str, Any]:
        """Log one outbound message; returns the record written."""
        digest = hashlib.sha256(payload).hexdigest()
        entry = {"time": datetime.now(timezone.utc).isoformat(), "center": self.center,
                 "round": int(round), "kind": kind, "bytes": len(payload), "sha256": digest,
                 "metrics": sorted(metric_names)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.keep_payloads:
            folder = self.path.with_suffix("")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{digest}.bin").write_bytes(payload)
        line = (json.dumps(entry) + "\n").encode()
        # One write on an O_APPEND descriptor: lines from concurrent writers never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return entry


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    """The records of an audit log; `MedfoundError` naming the file and line if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise MedfoundError("no such audit log", path=path,
                            hint="a center's log is FED/audit/<center>.jsonl")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise MedfoundError(f"line {n} is not JSON ({err.msg})", path=path,
                                hint="an audit log has one JSON object per line") from None
        missing = [k for k in FIELDS if k not in entry] if isinstance(entry, dict) else FIELDS
        if missing:
            raise MedfoundError(f"line {n} is not an audit record (missing {', '.join(missing)})",
                                path=path)
        records.append(entry)
    return records


def audit_totals(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{"messages", "bytes", "by_kind": {kind: {"messages", "bytes"}}, "rounds"}."""
    by_kind: dict[str, dict[str, int]] = {}
    for r in records:
        k = by_kind.setdefault(r["kind"], {"messages": 0, "bytes": 0})
        k["messages"] += 1
        k["bytes"] += int(r["bytes"])
    return {"messages": len(records), "bytes": sum(int(r["bytes"]) for r in records),
            "by_kind": by_kind, "rounds": len({r["round"] for r in records})}


def format_audit(records: Sequence[dict[str, Any]]) -> str:
    """A table of the records (one row per message) followed by the totals."""
    header = f"{'time (UTC)':<19}  {'center':<12} {'round':>5}  {'kind':<10} {'bytes':>12}  " \
             f"{'sha256':<12}  metrics"
    rows = [header, "-" * len(header)]
    for r in records:
        rows.append(f"{str(r['time'])[:19]:<19}  {str(r['center'])[:12]:<12} {r['round']:>5}  "
                    f"{r['kind']:<10} {int(r['bytes']):>12,}  {r['sha256'][:12]:<12}  "
                    f"{', '.join(r['metrics'])}")
    t = audit_totals(records)
    kinds = "; ".join(f"{k} {v['messages']} ({v['bytes']:,} bytes)"
                      for k, v in sorted(t["by_kind"].items()))
    rows.append("-" * len(header))
    rows.append(f"total: {t['messages']} messages, {t['bytes']:,} bytes over {t['rounds']} "
                f"rounds" + (f" — {kinds}" if kinds else ""))
    return "\n".join(rows)
