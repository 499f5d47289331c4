"""The inference node's work folder: what was received, what each study is doing, what waits.

Everything `medfound serve` knows lives in its work folder DIR, so a node killed at any point
(``kill -9``, power) resumes where it was:

    DIR/serve.lock                  held (flock) by the running node: one node per folder
    DIR/usage.key                   the key of the usage records' study hashes (stays here)
    DIR/usage.jsonl                 one line per study round that ended (stored or failed)
    DIR/decisions.jsonl             every decision about an input: duplicate, non-image,
                                    truncated, skipped series, retries, restarts
    DIR/rejected/                   instances refused (undecodable), kept for inspection
    DIR/studies/<key>/state.json    the study's state (written atomically and fsync'd)
    DIR/studies/<key>/instances/    its image instances, <SOPInstanceUID>.dcm
    DIR/studies/<key>/other/        its non-image objects (SR, presentation states, …)
    DIR/studies/<key>/rejected/     its truncated instances and conflicting duplicates
    DIR/studies/<key>/results/<n>/  round n's results (findings.json, the SR or SEG, overview)

A study's ``status``: ``receiving`` (instances arriving; complete after ``idle_s`` without a
new one), ``queued``, ``running`` (inference), ``storing`` (its result waits to be stored in the
PACS, retried with backoff), ``done`` or ``failed``. An image instance that arrives for a study
past ``receiving`` opens a new round: the study is read again once complete, and its earlier
result is still stored. Each instance file is written through a temporary file, fsync'd and
linked into place before the sender is told it was stored.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom

from medfound.errors import MedfoundError
from medfound.outputs import write_json, write_once
from medfound.pacs.pull import safe_uid

__all__ = ["STATUSES", "USAGE_FORMAT", "Received", "WorkQueue", "read_status"]

USAGE_FORMAT = "medfound-usage/1"
STATE_FORMAT = "medfound-serve-study/1"
STATUSES = ("receiving", "queued", "running", "storing", "done", "failed")
# C-STORE status codes (PS3.4 Annex B.2.3).
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC210
DOES_NOT_MATCH = 0xA900
OUT_OF_RESOURCES = 0xA700


def now_iso(t: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if t is None else t, dt.timezone.utc).isoformat(
        timespec="milliseconds")


class Received:
    """What `WorkQueue.receive` decided about one instance: DIMSE ``status`` and ``decision``
    (and the instance's SOP class and instance UIDs when it could be decoded)."""

    def __init__(self, status: int, decision: str, study_key: str | None = None,
                 sop: tuple[str, str] | None = None):
        self.status, self.decision, self.study_key, self.sop = status, decision, study_key, sop

    def __repr__(self) -> str:
        return f"Received(0x{self.status:04X}, {self.decision!r})"


def _is_image(ds: pydicom.Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")) \
        and "Rows" in ds


def _truncated(ds: pydicom.Dataset) -> str | None:
    """Why an uncompressed image's pixel data is shorter than its header says, or None."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or ts.is_compressed or "PixelData" not in ds:
        return None
    try:
        bits = int(ds.BitsAllocated)
        n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) \
            * int(ds.get("NumberOfFrames", 1) or 1)
        expected = (n + 7) // 8 if bits == 1 else n * ((bits + 7) // 8)
        got = len(ds.PixelData)
    except Exception as err:  # a header value that is not a number
        return f"its image header cannot be read ({type(err).__name__})"
    return f"pixel data holds {got} bytes, the header needs {expected}" if got < expected else None


class WorkQueue:
    """The work folder of one node (see the module docstring). Thread-safe: instances arrive
    on association threads while the node's loop moves studies along."""

    def __init__(self, work: str | Path, *, idle_s: float = 30.0, max_study_s: float = 3600.0,
                 lock: bool = True, log=print):
        self.work = Path(work)
        self.idle_s, self.max_study_s = float(idle_s), float(max_study_s)
        self._log_line = log
        self._mutex = threading.RLock()
        self.studies: dict[str, dict[str, Any]] = {}
        self._activity: dict[str, float] = {}  # last instance (or restart), monotonic clock
        self._saved: dict[str, float] = {}  # when each study's state was last written
        # Restarts delete this node's own leftovers (partial instances, a stopped round's
        # results) under studies/: only in a folder that is new or already a node's.
        if (self.work.is_dir() and any(self.work.iterdir())
                and not any((self.work / n).is_file() for n in ("usage.key", "serve.lock"))):
            raise MedfoundError("--work holds files but is not a medfound serve work folder",
                                path=self.work, hint="give serve a new or empty folder, or the "
                                "--work folder of an earlier medfound serve")
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "studies").mkdir(exist_ok=True)
        (self.work / "rejected").mkdir(exist_ok=True)
        self._lock_fd = self._take_lock() if lock else None
        self._key = self._usage_key()
        self._usage_ids = self._read_usage_ids()
        self._own_series: set[str] = set()

    # --- start-up ---------------------------------------------------------------------------

    def _take_lock(self) -> int:
        import fcntl

        fd = os.open(self.work / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise MedfoundError("another medfound serve is running on this work folder",
                                path=self.work, hint="stop it, or give this one its own --work") from None
        return fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _usage_key(self) -> bytes:
        path = self.work / "usage.key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
        text = path.read_text().strip()
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise MedfoundError("usage.key is not a hex key", path=path,
                                hint="restore it from a backup (usage hashes depend on it)") from None

    def _read_usage_ids(self) -> set[str]:
        ids: set[str] = set()
        path = self.work / "usage.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    ids.add(json.loads(line)["id"])
        return ids

    def study_hash(self, study_uid: str) -> str:
        """The study's name in usage records: HMAC-SHA256 of its UID under usage.key, so the
        same study always has the same hash here and nobody without the key can test a UID."""
        return hmac.new(self._key, study_uid.encode(), hashlib.sha256).hexdigest()[:32]

    def resume(self) -> None:
        """Load every study's state after a start: a study that was running is queued again, one
        that was receiving waits `idle_s` from now (its sender may still be resending), unfinished
        temporaries (never acknowledged) are removed, usage records lost in a crash are written."""
        with self._mutex:
            for folder in sorted((self.work / "studies").iterdir()):
                if not folder.is_dir():
                    continue
                for tmp in folder.glob("*/.medfound-*.partial"):
                    tmp.unlink(missing_ok=True)
                state = self._load_state(folder)
                if state is None:
                    continue
                key = folder.name
                state["n_instances"] = len(list((folder / "instances").glob("*.dcm")))
                self.studies[key] = state
                for r in state.get("rounds", []):
                    self._own_series.update(r.get("result_series", []))
                if state["status"] == "running":
                    state["status"] = "queued"
                    self.decide(key, "resumed", "inference was interrupted by a stop; it runs again")
                elif state["status"] == "receiving":
                    self._activity[key] = time.monotonic()
                    self.decide(key, "resumed", f"still receiving: complete {self.idle_s:g} s "
                                "after its last instance, counted from this start")
                elif state["status"] == "storing":
                    for p in state.get("pending", []):
                        p["next_try"] = 0.0
                    self.decide(key, "resumed", "its result waits to be stored; retried now")
                self._save(key)
                self._write_usage(key)

    def _load_state(self, folder: Path) -> dict[str, Any] | None:
        path = folder / "state.json"
        try:
            state = json.loads(path.read_text())
            if state.get("format") == STATE_FORMAT and state.get("status") in STATUSES:
                return state
            why = "has an unknown format"
        except FileNotFoundError:
            why = "has no state.json"
        except (OSError, ValueError) as err:
            why = f"has an unreadable state.json ({type(err).__name__})"
        # Instances whose study state was never written (a stop between the two writes).
        instances = sorted((folder / "instances").glob("*.dcm")) if (folder / "instances").is_dir() else []
        if not instances:
            self.decide(folder.name, "ignored", f"study folder {why} and no instances")
            return None
        try:
            uid = str(pydicom.dcmread(str(instances[0]), stop_before_pixels=True).StudyInstanceUID)
        except Exception:
            self.decide(folder.name, "ignored", f"study folder {why}; its instances cannot be read")
            return None
        self.decide(folder.name, "rebuilt", f"study folder {why}; state rebuilt from its instances")
        return self._new_state(uid, time.time())

    # --- records ----------------------------------------------------------------------------

    def decide(self, key: str | None, decision: str, detail: str) -> None:
        """Log a decision about an input or a study: one line in decisions.jsonl (time, study
        key, decision, detail) and on the node's log."""
        record = {"time": now_iso(), "study": key, "decision": decision, "detail": detail}
        line = json.dumps(record) + "\n"
        with self._mutex, open(self.work / "decisions.jsonl", "a") as f:
            f.write(line)
        self._log_line(f"[{record['time']}] {key[:12] if key else '-':<12} {decision}: {detail}")

    def _save(self, key: str) -> None:
        write_json(self.work / "studies" / key / "state.json", self.studies[key], fsync=True)
        self._saved[key] = time.monotonic()

    def _new_state(self, study_uid: str, t: float) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "study_uid": study_uid, "status": "receiving",
                "round": 1, "first_received": now_iso(t), "first_received_t": t,
                "last_received": now_iso(t), "last_received_t": t, "round_opened_t": t,
                "n_instances": 0, "rounds": [], "pending": []}

    def _write_usage(self, key: str) -> None:
        """Append the usage record of every ended round of `key` not yet written (once each)."""
        state = self.studies[key]
        for r in state.get("rounds", []):
            rid = f"{key}-{r['round']}"
            if r.get("status") not in ("stored", "failed", "no_series") or rid in self._usage_ids:
                continue
            record = {"format": USAGE_FORMAT, "id": rid, "study": self.study_hash(state["study_uid"]),
                      "round": r["round"], "received_first": r.get("received_first"),
                      "received_last": r.get("received_last"), "started": r.get("started"),
                      "finished": r.get("finished"), "stored": r.get("stored"),
                      "status": r["status"], "instances": r.get("instances"),
                      "findings": r.get("findings"), "model_sha256": r.get("model_sha256"),
                      "engine": r.get("engine"), "precision": r.get("precision"),
                      "store_attempts": r.get("store_attempts", 0)}
            with open(self.work / "usage.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._usage_ids.add(rid)

    # --- receiving --------------------------------------------------------------------------

    def receive(self, data: bytes, source: str = "") -> Received:
        """Keep one received instance (the bytes of a DICOM file) and say what was decided. The
        instance is on the disk, fsync'd, before this returns SUCCESS."""
        try:
            ds = pydicom.dcmread(BytesIO(data))
            study_uid = str(ds.StudyInstanceUID)
            sop_uid = str(ds.SOPInstanceUID)
            series_uid = str(ds.get("SeriesInstanceUID", ""))
        except Exception as err:
            name = hashlib.sha256(data).hexdigest()[:16]
            write_once(self.work / "rejected" / f"{name}.dcm", data, fsync=True)
            self.decide(None, "rejected", f"an instance from {source or 'a sender'} cannot be "
                        f"decoded ({type(err).__name__}); kept as rejected/{name}.dcm")
            return Received(CANNOT_UNDERSTAND, "undecodable")
        sop = (str(ds.get("SOPClassUID", "")), sop_uid)
        key = hashlib.sha256(study_uid.encode()).hexdigest()[:32]  # the study's folder name
        folder = self.work / "studies" / key
        name = f"{safe_uid(sop_uid)}.dcm"
        with self._mutex:
            if key not in self.studies:
                folder.mkdir(parents=True, exist_ok=True)
                self.studies[key] = self._new_state(study_uid, time.time())
                self._activity[key] = time.monotonic()
                self._save(key)
                self.decide(key, "new study", f"first instance from {source or 'a sender'}")
        if series_uid in self._own_series:
            self.decide(key, "ignored", "an instance of this node's own result series came back")
            return Received(SUCCESS, "own result", key, sop)
        if not _is_image(ds):
            (folder / "other").mkdir(exist_ok=True)
            outcome = write_once(folder / "other" / name, data, fsync=True)
            if outcome == "written":
                what = getattr(ds.get("SOPClassUID"), "name", str(ds.get("SOPClassUID", "")))
                self.decide(key, "kept, not read", f"non-image object ({what}) {sop_uid}")
            return Received(SUCCESS, "non-image", key, sop)
        why = _truncated(ds)
        if why is not None:
            (folder / "rejected").mkdir(exist_ok=True)
            write_once(folder / "rejected" / name, data, fsync=True)
            self.decide(key, "rejected", f"truncated instance {sop_uid}: {why}; kept in "
                        "rejected/, the sender is told it failed")
            return Received(DOES_NOT_MATCH, "truncated", key, sop)
        (folder / "instances").mkdir(exist_ok=True)
        outcome = write_once(folder / "instances" / name, data, fsync=True)
        if outcome == "same":
            self.decide(key, "duplicate", f"instance {sop_uid} again, identical: ignored")
            self._touch(key)
            return Received(SUCCESS, "duplicate", key, sop)
        if outcome == "different":
            (folder / "rejected").mkdir(exist_ok=True)
            alt = f"{safe_uid(sop_uid)}.{hashlib.sha256(data).hexdigest()[:8]}.dcm"
            write_once(folder / "rejected" / alt, data, fsync=True)
            self.decide(key, "duplicate", f"instance {sop_uid} again with different content: the "
                        f"first is kept and read, this one kept as rejected/{alt}")
            self._touch(key)
            return Received(SUCCESS, "conflicting duplicate", key, sop)
        with self._mutex:
            state = self.studies[key]
            state["n_instances"] += 1
            before = (state["status"], state["round"])
            if state["status"] not in ("receiving", "queued"):
                state["round"] += 1
                state["round_opened_t"] = time.time()
                self.decide(key, "reopened", f"a new image instance after the study was "
                            f"{state['status']}: round {state['round']} reads it again once "
                             "complete")
                if state["status"] == "running":  # back to receiving when this run ends
                    state["reopen"] = True
                else:
                    state["status"] = "receiving"
            elif state["status"] == "queued":
                state["status"] = "receiving"
                self.decide(key, "waiting again", "a new instance after the study was "
                            "complete; waiting for the rest")
            self._touch(key)
            # The instance itself is what must survive; the state (its count, last time) is
            # saved on every change of status and at most once a second otherwise, and a
            # restart recounts the instances from the folder.
            if (state["status"], state["round"]) != before or \
                    time.monotonic() - self._saved.get(key, 0.0) >= 1.0:
                self._save(key)
        return Received(SUCCESS, "stored", key, sop)

    def _touch(self, key: str) -> None:
        with self._mutex:
            t = time.time()
            state = self.studies[key]
            state["last_received"], state["last_received_t"] = now_iso(t), t
            self._activity[key] = time.monotonic()

    # --- the node's loop --------------------------------------------------------------------

    def promote(self) -> list[str]:
        """Move studies that are complete (idle `idle_s`, or open longer than `max_study_s`) to
        ``queued``; returns their keys."""
        done = []
        with self._mutex:
            for key, state in self.studies.items():
                if state["status"] != "receiving":
                    continue
                idle = time.monotonic() - self._activity.get(key, 0.0)
                open_s = time.time() - state.get("round_opened_t", state["first_received_t"])
                if idle >= self.idle_s:
                    state["status"] = "queued"
                    self.decide(key, "complete", f"{state['n_instances']} instance(s), none "
                                f"for {idle:.1f} s")
                elif open_s >= self.max_study_s:
                    state["status"] = "queued"
                    self.decide(key, "closed", f"still receiving after {open_s:.0f} s "
                                f"(--max-study-s {self.max_study_s:g}): read with the "
                                 f"{state['n_instances']} instance(s) it has")
                else:
                    continue
                state["queued_t"] = time.time()
                self._save(key)
                done.append(key)
        return done

    def next_queued(self) -> str | None:
        with self._mutex:
            queued = [k for k, s in self.studies.items() if s["status"] == "queued"]
            if not queued:
                return None
            key = min(queued, key=lambda k: self.studies[k].get("queued_t", 0.0))
            state = self.studies[key]
            state["status"] = "running"
            state["reopen"] = False
            state["started_t"] = time.time()
            self._save(key)
            return key

    def folder(self, key: str) -> Path:
        return self.work / "studies" / key

    def finish_round(self, key: str, record: dict[str, Any], results: list[str] | None) -> None:
        """Round of `key` ended: `record` (status "inferred", "failed" or "no_series", times,
        counts, model) and the result files to store (None when there is nothing to store)."""
        with self._mutex:
            state = self.studies[key]
            record = {"round": state["round"], "received_first": state["first_received"],
                      "received_last": state["last_received"],
                      "instances": state["n_instances"], **record}
            state["rounds"] = [r for r in state["rounds"] if r["round"] != record["round"]]
            state["rounds"].append(record)
            self._own_series.update(record.get("result_series", []))
            if results:
                state["pending"] = [p for p in state["pending"] if p["round"] != record["round"]]
                state["pending"].append({"round": record["round"], "files": results,
                                         "attempts": 0, "next_try": 0.0, "last_error": None})
            reopened = state.get("reopen")
            if reopened:
                state["status"] = "receiving"
                self._activity[key] = time.monotonic()
            elif state["pending"]:
                state["status"] = "storing"
            else:
                state["status"] = "failed" if record["status"] != "stored" else "done"
            self._save(key)
            self._write_usage(key)

    def due_results(self) -> list[tuple[str, dict[str, Any]]]:
        now = time.time()
        with self._mutex:
            return [(k, p) for k, s in self.studies.items() for p in s.get("pending", [])
                    if p["next_try"] <= now]

    def stored(self, key: str, pending: dict[str, Any], seconds: float) -> None:
        with self._mutex:
            state = self.studies[key]
            state["pending"] = [p for p in state["pending"] if p["round"] != pending["round"]]
            for r in state["rounds"]:
                if r["round"] == pending["round"]:
                    r["status"], r["stored"] = "stored", now_iso()
                    r["stored_t"], r["store_s"] = time.time(), round(seconds, 4)
                    r["store_attempts"] = pending["attempts"] + 1
            if state["status"] == "storing" and not state["pending"]:
                state["status"] = "done"
            self._save(key)
            self.decide(key, "stored", f"round {pending['round']}'s result stored"
                        + (f" after {pending['attempts'] + 1} attempts" if pending["attempts"] else ""))
            self._write_usage(key)

    def store_failed(self, key: str, pending: dict[str, Any], error: str, base_s: float,
                     max_s: float) -> float:
        """Record a failed store and when to try again (exponential backoff, at most `max_s`)."""
        with self._mutex:
            pending["attempts"] += 1
            wait = min(max_s, base_s * 2 ** (pending["attempts"] - 1))
            pending["next_try"] = time.time() + wait
            pending["last_error"] = error
            self._save(key)
        self.decide(key, "store failed", f"attempt {pending['attempts']}: {error}; the result is "
                    f"kept and tried again in {wait:g} s")
        return wait


def read_status(work: str | Path) -> dict[str, Any]:
    """What a node's work folder holds, without touching it (a node may be running): per
    study its status, counts, times and waiting results; totals per status."""
    work = Path(work)
    if not (work / "studies").is_dir():
        raise MedfoundError("not a medfound serve work folder (no studies/)", path=work,
                            hint="pass the --work folder of `medfound serve`")
    studies = []
    for folder in sorted((work / "studies").iterdir()):
        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            continue
        last = (state.get("rounds") or [{}])[-1]
        pending = state.get("pending") or []
        studies.append({"study": folder.name, "status": state.get("status"),
                        "round": state.get("round"), "instances": state.get("n_instances"),
                        "last_received": state.get("last_received"),
                        "started": last.get("started"), "stored": last.get("stored"),
                        "findings": last.get("findings"), "error": last.get("error"),
                        "waiting_results": len(pending),
                        "store_attempts": sum(p.get("attempts", 0) for p in pending),
                        "last_store_error": next((p["last_error"] for p in pending
                                                  if p.get("last_error")), None)})
    counts = {s: sum(1 for x in studies if x["status"] == s) for s in STATUSES}
    running = None
    lock = work / "serve.lock"
    if lock.exists():
        import fcntl

        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            running = False
        except OSError:
            running = True
        finally:
            os.close(fd)
    return {"work": str(work), "node_running": bool(running), "counts": counts,
            "studies": studies}

