"""A center's audit log (every message it sent and received) and the coordinator's receipts.

    {"time": "2025-01-31T12:00:00.123456+00:00", "center": "center_0", "round": 3,
     "kind": "train", "direction": "sent", "bytes": 391204, "sha256": "9f2c…",
     "metrics": ["num-examples", ...], "seq": 7, "prev": "51ab…", "key": "SHA256:…", "sig": "…"}

``direction`` is "sent" for a reply that left the center and "received" for a message the
coordinator sent it. ``kind`` is the message type ("train", "evaluate", "query"; "cross-site"
for the evaluations of other centers' models after the last round; ``secagg-<stage>`` for the
SecAgg+ steps), or "error" when the center answered with an error (the reason it sent is what
was hashed and counted). ``bytes`` and ``sha256`` are over the exact content
(`medfound.fed.params.payload_bytes`, the same function the coordinator hashes with); with
``keep_payloads`` each sent payload is also kept as ``<log stem>/<sha256>.bin`` beside the
log, so an auditor can open what was sent and check it against the hash.

The log is a hash chain signed with the center's node key where it has one
(medfound.fed.chain: ``seq``, ``prev``, ``key``, ``sig``, and ``<stem>.head.json``). The
coordinator keeps ``FED/receipts.jsonl``, a chain of the same form with one receipt per message
it sent or received (hash, size, time, node, center, direction, round, kind): `reconcile`
lists every message one side has and the other has not.

`medfound center audit FILE [--verify] [--public-key PUB]` prints a log as a table with totals
(`format_audit`) or checks it (`format_verification`); `medfound fed reconcile` compares a
center's log with the receipts (`format_reconcile`). Reading, writing and the table need only
the standard library: a center can audit without torch or Flower installed.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medfound.errors import MedfoundError
from medfound.fed.chain import ChainLog, Verification, node_key, read_lines, verify_chain

__all__ = ["AuditLog", "ReceiptLog", "audit_totals", "format_audit", "format_reconcile",
           "format_verification", "read_audit", "read_receipts", "reconcile", "verify_log"]

FIELDS = ("time", "center", "round", "kind", "bytes", "sha256", "metrics")
RECEIPT_FIELDS = ("time", "node", "center", "round", "kind", "direction", "bytes", "sha256")
DIRECTIONS = ("sent", "received")


class AuditLog:
    """Appends a center's records to ``path`` (created with its folder on first use), chained
    and, with `signing_key` (the path of the center's node key), signed."""

    def __init__(self, path: str | Path, center: str, keep_payloads: bool = False,
                 signing_key: str | Path | None = None):
        self.path = Path(path)
        self.center = center
        self.keep_payloads = keep_payloads
        self._chain = ChainLog(self.path, node_key(signing_key))

    def record(self, *, round: int, kind: str, payload: bytes,
               metric_names: Iterable[str] = (), direction: str = "sent") -> dict[str, Any]:
        """Log one message (`direction` "sent": a reply leaving the center; "received": what
        the coordinator sent it); returns the record written."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        digest = hashlib.sha256(payload).hexdigest()
        entry = {"time": datetime.now(timezone.utc).isoformat(), "center": self.center,
                 "round": int(round), "kind": kind, "direction": direction,
                 "bytes": len(payload), "sha256": digest, "metrics": sorted(metric_names)}
        if self.keep_payloads and direction == "sent":
            folder = self.path.with_suffix("")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{digest}.bin").write_bytes(payload)
        return self._chain.append(entry)


class ReceiptLog:
    """The coordinator's receipts (FED/receipts.jsonl): one chained record per message it sent
    (``direction`` "sent") or received, with the sha256 and size of its content."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._chain = ChainLog(self.path)

    def record(self, *, direction: str, node: int, center: str | None, round: int, kind: str,
               payload: bytes | None = None, digest: str | None = None, size: int | None = None,
               origin: str | None = None) -> dict[str, Any]:
        """One receipt: the content's `payload`, or its `digest` and `size` when the caller
        already hashed it (one content sent to many nodes is hashed once). `origin`
        "superlink": an error the SuperLink made for a node that stopped answering."""
        if payload is not None:
            digest, size = hashlib.sha256(payload).hexdigest(), len(payload)
        entry = {"time": datetime.now(timezone.utc).isoformat(), "node": int(node),
                 "center": center, "round": int(round), "kind": kind, "direction": direction,
                 "bytes": int(size or 0), "sha256": digest}
        if origin:
            entry["origin"] = origin
        return self._chain.append(entry)


def read_audit(path: str | Path, direction: str | None = "sent") -> list[dict[str, Any]]:
    """The records of a center's audit log (`direction`: "sent", the default, is what left
    the center; "received"; None: all); `MedfoundError` naming the file and line if it is not
    one. Records written before logs had a direction count as sent."""
    return [r for r in _read(path, FIELDS, "a center's log is FED/audit/<center>.jsonl")
            if direction is None or r.setdefault("direction", "sent") == direction]


def read_receipts(path: str | Path) -> list[dict[str, Any]]:
    """The coordinator's receipts (FED/receipts.jsonl)."""
    return _read(path, RECEIPT_FIELDS, "the coordinator's receipts are FED/receipts.jsonl")


def _read(path: str | Path, fields: Sequence[str], where: str) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise MedfoundError("no such audit log", path=path, hint=where)
    records = []
    for n, entry, _ in read_lines(path):
        if entry is None:
            raise MedfoundError(f"line {n} is not JSON", path=path,
                                hint="an audit log has one JSON object per line")
        missing = [k for k in fields if k not in entry]
        if missing:
            raise MedfoundError(f"line {n} is not an audit record (missing {', '.join(missing)})",
                                path=path)
        records.append({**entry, "line": n})
    return records


def audit_totals(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the center sent: {"messages", "bytes", "by_kind": {kind: {"messages", "bytes"}},
    "rounds"}, and "received": {"messages", "bytes"}."""
    sent = [r for r in records if r.get("direction", "sent") == "sent"]
    got = [r for r in records if r.get("direction", "sent") == "received"]
    by_kind: dict[str, dict[str, int]] = {}
    for r in sent:
        k = by_kind.setdefault(r["kind"], {"messages": 0, "bytes": 0})
        k["messages"] += 1
        k["bytes"] += int(r["bytes"])
    return {"messages": len(sent), "bytes": sum(int(r["bytes"]) for r in sent),
            "by_kind": by_kind, "rounds": len({r["round"] for r in sent}),
            "received": {"messages": len(got), "bytes": sum(int(r["bytes"]) for r in got)}}


def format_audit(records: Sequence[dict[str, Any]]) -> str:
    """A table of the records (one row per message) followed by the totals."""
    header = f"{'time (UTC)':<19}  {'center':<12} {'round':>5}  {'dir':<4} {'kind':<10} " \
             f"{'bytes':>12}  {'sha256':<12}  metrics"
    rows = [header, "-" * len(header)]
    for r in records:
        way = "in" if r.get("direction", "sent") == "received" else "out"
        rows.append(f"{str(r['time'])[:19]:<19}  {str(r['center'])[:12]:<12} {r['round']:>5}  "
                    f"{way:<4} {r['kind']:<10} {int(r['bytes']):>12,}  {r['sha256'][:12]:<12}  "
                    f"{', '.join(r['metrics'])}")
    t = audit_totals(records)
    kinds = "; ".join(f"{k} {v['messages']} ({v['bytes']:,} bytes)"
                      for k, v in sorted(t["by_kind"].items()))
    rows.append("-" * len(header))
    rows.append(f"total: {t['messages']} messages, {t['bytes']:,} bytes over {t['rounds']} "
                f"rounds" + (f" — {kinds}" if kinds else ""))
    got = t["received"]
    if got["messages"]:
        rows.append(f"received: {got['messages']} messages, {got['bytes']:,} bytes")
    return "\n".join(rows)


# --- checking a log, and a center's log against the coordinator's receipts ----------------------


def verify_log(path: str | Path, public_key: str | Path | None = None) -> Verification:
    """`medfound.fed.chain.verify_chain` of a log, against the public key file `public_key`
    (OpenSSH .pub or PEM) when given."""
    from medfound.fed.chain import load_public_key

    key = load_public_key(public_key) if public_key is not None else None
    return verify_chain(path, key, key_source=str(public_key) if public_key else None)


def format_verification(v: Verification) -> str:
    """What `medfound center audit --verify` prints: the chain, the signatures, the tail,
    and OK or the first break."""
    lines = [f"{v.path}: {v.records} records"]
    if v.signed:
        lines.append(f"signatures: checked against {v.fingerprint} from {v.key_source}"
                     + ("" if v.key_source and "claim" not in v.key_source else
                        " — pass --public-key CENTER.pub (the key the coordinator registered) "
                        "for a check that does not trust the log"))
    else:
        lines.append("signatures: none — the records are chained but not signed (no node key: "
                     "a simulation run, or a center that joined without --auth-key). A chain "
                     "without signatures shows accidental edits and naive tampering only: "
                     "whoever can write the file can write a new chain; reconcile it with the "
                     "coordinator's receipts (`medfound fed reconcile`)")
    if v.tail:
        lines.append(f"tail: {v.tail}")
    lines.extend(f"note: {n}" for n in v.notes)
    lines.append("OK: every record chains to the one before" + (" and its signature verifies"
                                                                  if v.signed else "")
                 if v.ok else f"FAILED: {v.problem}")
    return "\n".join(lines)


def reconcile(center_log: str | Path, receipts: str | Path) -> dict[str, Any]:
    """Every message of one center as its log and the coordinator's receipts record it.

    A message is the same on both sides when the direction pairs (what the center sent, the
    coordinator received, and back) and the sha256 of its content agree; each side's count of
    a hash is matched one for one. Returns {"center", "nodes", "matched", "only_center",
    "only_coordinator", "center_chain", "receipts_chain"} (the two chains' problems, None when
    whole)."""
    ours = read_audit(center_log, direction=None)
    theirs_all = read_receipts(receipts)
    names = Counter(r["center"] for r in ours)
    if not names:
        raise MedfoundError("the center's log is empty", path=center_log)
    center = names.most_common(1)[0][0]
    nodes = sorted({r["node"] for r in theirs_all if r["center"] == center})
    theirs = [r for r in theirs_all if r["center"] == center or r["node"] in nodes]
    flip = {"sent": "received", "received": "sent"}
    pool: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in theirs:
        pool.setdefault((flip.get(r["direction"], "?"), r["sha256"]), []).append(r)
    only_center, matched = [], 0
    for r in ours:
        bucket = pool.get((r.get("direction", "sent"), r["sha256"]))
        if bucket:
            bucket.pop(0)
            matched += 1
        else:
            only_center.append(r)
    only_coordinator = sorted((r for bucket in pool.values() for r in bucket),
                              key=lambda r: r["line"])
    return {"center": center, "nodes": nodes, "matched": matched, "only_center": only_center,
            "only_coordinator": only_coordinator,
            "center_chain": verify_chain(center_log).problem,
            "receipts_chain": verify_chain(receipts).problem}


def format_reconcile(result: dict[str, Any]) -> str:
    """What `medfound fed reconcile` prints."""
    c = result["center"]
    lines = [f"{c} (node {', '.join(map(str, result['nodes'])) or 'none in the receipts'}): "
             f"{result['matched']} messages on both sides"]
    for side, problem in (("center's log", result["center_chain"]),
                          ("coordinator's receipts", result["receipts_chain"])):
        lines.append(f"{side}: " + ("chain whole" if problem is None else f"chain broken: {problem}"))

    def row(r: dict[str, Any], way: str) -> str:
        extra = " (the SuperLink answered for the node)" if r.get("origin") == "superlink" else ""
        return (f"  line {r['line']:>4}  round {r['round']:>3}  {way:<26} {r['kind']:<12} "
                f"{int(r['bytes']):>12,} bytes  sha256 {str(r['sha256'])[:16]}{extra}")

    if result["only_center"]:
        lines.append(f"only in {c}'s log (the coordinator has no receipt):")
        lines.extend(row(r, f"{c} {'sent' if r['direction'] == 'sent' else 'received'}")
                     for r in result["only_center"])
    if result["only_coordinator"]:
        lines.append(f"only in the coordinator's receipts ({c}'s log does not have it):")
        lines.extend(row(r, "coordinator " + ("sent" if r["direction"] == "sent" else "received"))
                     for r in result["only_coordinator"])
    if not result["only_center"] and not result["only_coordinator"]:
        lines.append("every message is on both sides")
    return "\n".join(lines)
