"""Hash-chained, signed JSON-lines logs: a center's audit log and the coordinator's receipts.

Every record carries ``seq`` (0, 1, 2, … in the order written) and ``prev``, the sha256 of the
record before it (64 zeros for the first). A record's hash is the sha256 of its canonical JSON
(`canonical`: keys sorted, no spaces, UTF-8) without its ``sig``. With a signing key (a center's
node key, ECDSA P-384, the one it registers with the SuperLink) each record also carries
``key`` (the key's fingerprint, ``SHA256:…`` as ``ssh-keygen -l`` prints it) and ``sig``
(base64 DER ECDSA-SHA384 over the canonical JSON): the signature covers ``prev``, so it covers
the whole chain up to that record.

Beside the log, ``<stem>.head.json`` holds the chain's head — record count, last hash, the
public key, signed the same way — rewritten atomically after every append. A record removed
at the end of the log leaves a valid shorter chain; the head is what says records are missing.
Whoever holds the key (the center itself) can rewrite log and head together; the
coordinator's receipts (medfound.fed.audit) are the check that does not depend on the center.

`verify_chain` checks a log and names the first record edited, removed, inserted or reordered.
Writing needs only the standard library; signing and checking signatures need `cryptography`
(a Flower dependency).
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medfound.errors import MedfoundError
from medfound.outputs import atomic_write

__all__ = ["GENESIS", "ChainLog", "NodeKey", "Verification", "canonical", "head_path",
           "load_public_key", "public_key_fingerprint", "record_hash", "verify_chain"]

GENESIS = "0" * 64  # the ``prev`` of a chain's first record
HEAD_FORMAT = "medfound-audit-head/1"


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash and signature are over: JSON, keys sorted, no spaces,
    UTF-8, without ``sig``."""
    body = {k: v for k, v in entry.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def head_path(log: str | Path) -> Path:
    """Where a log's head lives: ``audit/center_0.jsonl`` → ``audit/center_0.head.json``."""
    log = Path(log)
    return log.with_name(f"{log.stem}.head.json")


# --- keys -------------------------------------------------------------------------------------


def public_key_fingerprint(public_key: Any) -> str:
    """``SHA256:<base64>`` of the key's OpenSSH blob, as ``ssh-keygen -l`` prints it."""
    from cryptography.hazmat.primitives import serialization

    line = public_key.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _public_openssh(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH).decode()


def load_public_key(path: str | Path) -> Any:
    """An EC public key from an OpenSSH ``.pub`` file (`medfound center keys`) or a PEM file;
    `MedfoundError` naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise MedfoundError(f"cannot read the public key ({err.strerror})", path=path) from None
    key = None
    for load in (serialization.load_ssh_public_key, serialization.load_pem_public_key):
        try:
            key = load(data.strip() if load is serialization.load_ssh_public_key else data)
            break
        except (ValueError, TypeError, IndexError):
            continue
    if key is None:
        try:  # a private key's file holds the public key too
            key = _load_private(data, path).public_key()
        except MedfoundError:
            key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise MedfoundError("not an EC public key (OpenSSH .pub or PEM)", path=path,
                            hint="the CENTER.pub that `medfound center keys` wrote")
    return key


def _load_private(data: bytes, path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    for load in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            return load(data, password=None)
        except (ValueError, TypeError):
            continue
    raise MedfoundError("not an unencrypted private key (OpenSSH or PEM)", path=path,
                        hint="the CENTER.key that `medfound center keys` wrote")


class NodeKey:
    """A center's node key (its SuperNode authentication key), used to sign its audit log."""

    def __init__(self, path: str | Path):
        from cryptography.hazmat.primitives.asymmetric import ec

        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise MedfoundError(f"cannot read the center's node key ({err.strerror})",
                                path=self.path) from None
        self._key = _load_private(data, self.path)
        if not isinstance(self._key, ec.EllipticCurvePrivateKey):
            raise MedfoundError("the node key is not an EC key", path=self.path,
                                hint="make one with `medfound center keys`")
        self.public_key = self._key.public_key()
        self.fingerprint = public_key_fingerprint(self.public_key)
        self.public_openssh = _public_openssh(self.public_key)

    def sign(self, data: bytes) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return base64.b64encode(self._key.sign(data, ec.ECDSA(hashes.SHA384()))).decode()


_KEYS: dict[str, NodeKey] = {}


def node_key(path: str | Path | None) -> NodeKey | None:
    """The node key at `path`, loaded once per process (None for None)."""
    if path is None:
        return None
    key = str(Path(path).resolve())
    if key not in _KEYS:
        _KEYS[key] = NodeKey(key)
    return _KEYS[key]


def _signature_ok(public_key: Any, entry: Mapping[str, Any]) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        sig = base64.b64decode(str(entry["sig"]), validate=True)
        public_key.verify(sig, canonical(entry), ec.ECDSA(hashes.SHA384()))
        return True
    except (InvalidSignature, ValueError, TypeError, KeyError):
        return False


# --- writing ----------------------------------------------------------------------------------


class ChainLog:
    """Appends chained (and, with `key`, signed) records to `path`, and keeps its head."""

    def __init__(self, path: str | Path, key: NodeKey | None = None):
        self.path = Path(path)
        self.key = key

    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Write `entry` with ``seq``, ``prev`` (and ``key``, ``sig``); returns the record."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            # One writer at a time (threads and processes): each record needs the last hash.
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_record(fd, self.path)
            if last is None:
                seq, prev = 0, GENESIS
            else:
                seq = int(last["seq"]) + 1 if isinstance(last.get("seq"), int) else 0
                prev = record_hash(last)
            record = {**entry, "seq": seq, "prev": prev}
            if self.key is not None:
                record["key"] = self.key.fingerprint
                record["sig"] = self.key.sign(canonical(record))
            os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
            os.fsync(fd)
            self._write_head(seq + 1, record_hash(record))
        finally:
            os.close(fd)  # releases the lock
        return record

    def _write_head(self, count: int, last: str) -> None:
        head: dict[str, Any] = {"format": HEAD_FORMAT, "log": self.path.name, "count": count,
                                "last": last}
        if self.key is not None:
            head.update(key=self.key.fingerprint, public_key=self.key.public_openssh)
            head["sig"] = self.key.sign(canonical(head))
        atomic_write(head_path(self.path), json.dumps(head, indent=2) + "\n")


def _last_record(fd: int, path: Path) -> dict[str, Any] | None:
    """The last line of the file open at `fd`, parsed (None for an empty file)."""
    end = os.lseek(fd, 0, os.SEEK_END)
    if end == 0:
        return None
    chunk, pos, tail = 8192, end, b""
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        body = tail.rstrip(b"\n")
        if b"\n" in body or pos == 0:
            line = body.rsplit(b"\n", 1)[-1]
            break
    try:
        last = json.loads(line)
    except ValueError:
        raise MedfoundError("the log's last line is not JSON: cannot chain onto it",
                            path=path, hint="`medfound center audit --verify` names what "
                                            "was edited") from None
    return last if isinstance(last, dict) else None


# --- checking ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Verification:
    """What `verify_chain` found. ``problem`` is the first break (None: the chain is whole);
    ``line`` the 1-based line it names."""

    path: Path
    records: int
    signed: bool
    key_source: str | None  # where the key that checked the signatures came from
    fingerprint: str | None
    problem: str | None = None
    line: int | None = None
    tail: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def read_lines(path: str | Path) -> list[tuple[int, dict[str, Any] | None, str]]:
    """(line number, parsed record or None, raw text) for each non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise MedfoundError("no such log", path=path,
                            hint="a center's log is FED/audit/<center>.jsonl; the coordinator's "
                                 "receipts FED/receipts.jsonl")
    out = []
    for n, text in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        out.append((n, entry if isinstance(entry, dict) else None, text))
    return out


def verify_chain(path: str | Path, public_key: Any = None, key_source: str | None = None,
                 head: Mapping[str, Any] | None | bool = True) -> Verification:
    """Check the chain of the log at `path` and, where it is signed, every signature against
    `public_key` (None: the key its head names, which only shows the log is consistent with
    itself). `head`: True reads ``<stem>.head.json``; a mapping is used as the head; None or
    False: no head. Names the first record edited, removed, inserted or reordered, then
    checks the tail against the head."""
    path = Path(path)
    lines = read_lines(path)
    if head is True:
        head = _read_head(path)
    head = head or None
    signed = any(e is not None and "sig" in e for _, e, _ in lines)
    if signed and public_key is None and head is not None and head.get("public_key"):
        from cryptography.hazmat.primitives import serialization

        try:
            public_key = serialization.load_ssh_public_key(str(head["public_key"]).encode())
            key_source = f"the head file {head_path(path).name} (the log's own claim)"
        except (ValueError, TypeError):
            public_key = None
    fingerprint = public_key_fingerprint(public_key) if public_key is not None else None
    v = Verification(path=path, records=len(lines), signed=signed, key_source=key_source,
                     fingerprint=fingerprint)
    if signed and public_key is None:
        v.problem = ("the records are signed but there is no public key to check them: pass "
                     "--public-key CENTER.pub")
        return v

    def sig_ok(entry: Mapping[str, Any]) -> bool:
        return "sig" in entry and entry.get("key") == fingerprint and _signature_ok(public_key, entry)

    expected, prev = 0, GENESIS
    seen: dict[int, int] = {}  # seq → line
    parsed = [(n, e) for n, e, _ in lines]
    for i, (n, entry) in enumerate(parsed):
        if entry is None:
            v.problem, v.line = f"line {n} is not a JSON record: it was edited", n
            return v
        seq, h = entry.get("seq"), record_hash(entry)
        if not isinstance(seq, int) or "prev" not in entry:
            v.problem, v.line = (f"line {n} has no chain fields (seq, prev): it was inserted, or "
                                 "the log was written before medfound chained its logs"), n
            return v
        nxt = parsed[i + 1][1] if i + 1 < len(parsed) else None
        if signed and not sig_ok(entry):
            if nxt is not None and nxt.get("prev") == prev and nxt.get("seq") == expected:
                v.problem = (f"line {n} was inserted: it is not signed by the center's key and the "
                             f"chain runs around it (line {parsed[i + 1][0]} chains to line "
                             f"{parsed[i - 1][0] if i else 'none'})")
            elif "sig" in entry and entry.get("key") != fingerprint:
                v.problem = (f"line {n} (record {seq}) is signed by another key "
                             f"({entry.get('key')}), not {fingerprint}")
            else:
                v.problem = (f"line {n} (record {seq}) was edited or forged: its signature does "
                             "not verify")
            v.line = n
            return v
        if seq == expected and entry["prev"] == prev:
            seen[seq] = n
            expected, prev = expected + 1, h
            continue
        v.line = n
        if seq == expected:
            before = parsed[i - 1][0] if i else None
            v.problem = (f"line {before} (record {seq - 1}) was edited: its hash is not the one "
                         f"record {seq} (line {n}) chains to" if before is not None else
                         f"line {n} (record 0) was edited: it does not start the chain")
            if before is not None:
                v.line = before
        elif seq > expected:
            later = [m for m, e in parsed[i + 1:] if e is not None and e.get("seq") == expected]
            if later:
                v.problem = (f"records were reordered: record {expected} is at line {later[0]}, "
                             f"after record {seq} at line {n}")
            else:
                gap = f"record {expected}" if seq == expected + 1 else f"records {expected}–{seq - 1}"
                where = (f"between line {parsed[i - 1][0]} and line {n}" if i else
                         f"before line {n}")
                v.problem = f"{gap} {'was' if seq == expected + 1 else 'were'} removed ({where})"
        else:
            first = seen.get(seq)
            v.problem = (f"line {n} claims record {seq}, which line {first} already holds: "
                         "one of the two was inserted (or copied)" if first is not None else
                         f"line {n} holds record {seq} out of order (expected {expected})")
        return v
    v.tail = _check_tail(v, head, expected, prev, public_key, fingerprint, signed)
    return v


def _read_head(path: Path) -> dict[str, Any] | None:
    hp = head_path(path)
    if not hp.is_file():
        return None
    try:
        head = json.loads(hp.read_text())
    except ValueError:
        return {"format": "unreadable"}
    return head if isinstance(head, dict) else {"format": "unreadable"}


def _check_tail(v: Verification, head: Mapping[str, Any] | None, count: int, last: str,
                public_key: Any, fingerprint: str | None, signed: bool) -> str:
    """The tail against the head; sets ``v.problem`` on a break. Returns a sentence."""
    name = head_path(v.path).name
    if head is None:
        v.notes.append("no head file: records removed at the end of the log cannot be seen from "
                       "the log alone; reconcile it with the coordinator's receipts "
                       "(`medfound fed reconcile`)")
        return "not checked (no head)"
    if head.get("format") != HEAD_FORMAT or not isinstance(head.get("count"), int):
        v.problem = f"the head file {name} is not a head (edited?)"
        return "head unreadable"
    if signed and not ("sig" in head and head.get("key") == fingerprint
                       and _signature_ok(public_key, head)):
        v.problem = f"the head file {name} is not signed by the center's key: it was edited"
        return "head edited"
    n = int(head["count"])
    if n > count:
        gap = f"record {count}" if n == count + 1 else f"records {count}–{n - 1}"
        v.problem = (f"the log was truncated: the head names {n} records, the log holds {count}; "
                     f"{gap} {'was' if n == count + 1 else 'were'} removed at the end")
        v.line = None
        return "truncated"
    if n < count:
        v.problem = (f"records {n}–{count - 1} are not covered by the head (which names {n}): "
                     "appended without the center's log writer, or the writer died between "
                     "the record and its head")
        return "beyond the head"
    if head.get("last") != last:
        v.problem = ("the last record is not the one the head names: it was edited or "
                     "replaced")
        return "last record differs"
    return f"the head ({name}) names {n} records ending in {last[:12]}: nothing removed at the end"
