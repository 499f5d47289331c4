"""Writing results safely: never over what this run did not write, nothing half-written that
looks complete, and a full or read-only disk as one line.

Every command that writes a folder of results (`infer`, `export`, the recipes' checkpoints)
goes through these functions:

- `check_output_folder` refuses an output folder that overlaps an input (the study, the
  model), so a run can never write into, or over, what it reads;
- `staged_dir` makes a fresh hidden folder for one result; `publish_dir` renames it into place
  under a name nothing else holds; an existing file or folder is never removed or replaced;
- `atomic_write` writes a file through a temporary sibling renamed over the target, and removes
  the temporary on failure;
- `write_once` writes a file that must not replace anything: through a temporary sibling
  hard-linked to the target (which fails if the target exists), optionally fsync'd with its
  folder, so a file that is there is whole;
- `disk_error` turns the OSError of a full, read-only or unwritable disk into a `MedfoundError`
  naming the path, the reason and, where known, how much space was needed and how much is free.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from medfound.errors import MedfoundError

__all__ = ["DiskError", "atomic_write", "check_output_folder", "disk_error", "free_bytes", "publish_dir",
           "staged_dir", "unique_name", "write_json", "write_once", "writable_folder"]

# Errors of the disk itself (as opposed to a bug): reported as one line, never a traceback.
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device",
                errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted",
                errno.ENAMETOOLONG: "file name too long",
                errno.EFBIG: "file too large for this file system"}
# Longest name this writes itself (study folders, temporaries); NAME_MAX is 255 on Linux.
MAX_NAME = 120


class DiskError(MedfoundError):
    """The output disk is full, read-only or not writable: every later write would fail too."""


def free_bytes(path: str | Path) -> int | None:
    """Bytes free on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def is_disk_error(err: BaseException) -> bool:
    """Whether `err` is (or was caused by) an OSError of the disk: full, read-only, no access."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
            return True
        if "No space left on device" in str(err) or "Read-only file system" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_error(err: BaseException, path: str | Path, needed: int | None = None) -> DiskError:
    """`err` (a disk OSError, possibly wrapped) as a one-line MedfoundError about `path`."""
    reason = None
    e: BaseException | None = err
    while e is not None and reason is None:
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            reason = _DISK_ERRNOS[e.errno]
        elif "No space left on device" in str(e):
            reason = _DISK_ERRNOS[errno.ENOSPC]
        elif "Read-only file system" in str(e):
            reason = _DISK_ERRNOS[errno.EROFS]
        e = e.__cause__ or e.__context__
    reason = reason or f"{type(err).__name__}: {err}"
    free = free_bytes(path)
    space = ""
    if needed is not None:
        space = f" (needs about {_mb(needed)}" + (f", {_mb(free)} free)" if free is not None else ")")
    elif free is not None and "space" in reason:
        space = f" ({_mb(free)} free)"
    hint = {"no space left on the device": "free some space or choose another output folder",
            "disk quota exceeded": "free some space or choose another output folder",
            "the file system is read-only": "choose an output folder on a writable disk",
            "file name too long": "use a shorter output path"}.get(reason, "check the output folder's permissions")
    return DiskError(f"cannot write: {reason}{space}", path=path, hint=hint)


def writable_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Create `folder` (and parents) if needed and check a file can be made in it; one-line
    MedfoundError if it cannot (read-only, no space for a directory entry, not a folder)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MedfoundError(f"the {what} is a file, not a folder", path=folder,
                            hint="choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medfound-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise disk_error(err, folder) from err
    return folder


def check_output_folder(out: str | Path, inputs: Iterable[str | Path], *, what: str = "--out") -> Path:
    """`out`, resolved, after refusing any overlap with an input: `out` equal to an input, inside
    one (results would land among the input's files), or holding one (results could take an
    input's name)."""
    out_r = Path(out).resolve()
    for item in inputs:
        in_r = Path(item).resolve()
        if out_r == in_r or in_r in out_r.parents or out_r in in_r.parents:
            relation = ("is" if out_r == in_r else "is inside" if in_r in out_r.parents
                        else "contains")
            raise MedfoundError(f"the output folder {relation} the input {item}", path=out,
                                hint=f"choose a {what} folder apart from every input")
    return out_r


def unique_name(parent: Path, name: str, taken: set[str] | None = None,
                reserved: Iterable[str] = ()) -> str:
    """`name` (made safe for a file system, at most MAX_NAME characters), or `name_2`,
    `name_3`, … : the first that no entry of `parent`, `taken` or `reserved` holds."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._")[:MAX_NAME]
    safe = safe or "study"
    blocked = set(taken or ()) | set(reserved)
    candidate, n = safe, 1
    while candidate in blocked or os.path.lexists(parent / candidate):
        n += 1
        candidate = f"{safe}_{n}"
    return candidate


@contextlib.contextmanager
def staged_dir(parent: Path) -> Iterator[Path]:
    """A fresh hidden folder in `parent` (made by this call, so this run owns it). On an
    exception it is removed with everything in it; on success the caller publishes it."""
    try:
        work = Path(tempfile.mkdtemp(prefix=".medfound-", suffix=".partial", dir=parent))
    except OSError as err:
        raise disk_error(err, parent) from err
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def publish_dir(work: Path, final: Path) -> Path:
    """Rename the staged folder `work` to `final`, which must not exist: an existing entry is
    never replaced (os.rename would replace an empty folder, so that is refused too)."""
    if os.path.lexists(final):
        shutil.rmtree(work, ignore_errors=True)
        raise MedfoundError("exists already; not replaced", path=final,
                            hint="choose a new output folder")
    try:
        os.rename(work, final)
    except OSError as err:
        shutil.rmtree(work, ignore_errors=True)
        raise disk_error(err, final) from err
    return final


def atomic_write(path: str | Path, data: bytes | str, *, fsync: bool = False) -> Path:
    """Write `data` to `path` through a temporary file in the same folder renamed over it; on
    any failure the temporary is removed and `path` is as it was. With `fsync` the file and
    its folder are flushed to the disk before this returns (the new content survives a crash)."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        with _temporary(path, raw, fsync) as tmp:
            os.replace(tmp, path)
        if fsync:
            _fsync_folder(path.parent)
    except OSError as err:
        raise disk_error(err, path, needed=len(raw)) from err
    return path


@contextlib.contextmanager
def _temporary(path: Path, data: bytes, fsync: bool) -> Iterator[str]:
    """A hidden temporary sibling of `path` holding `data` (flushed to the disk with `fsync`);
    removed on the way out unless the caller renamed it into place."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".medfound-", suffix=".partial", dir=path.parent)
    except OSError as err:
        raise disk_error(err, path, needed=len(data)) from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_json(path: str | Path, data: Any, *, fsync: bool = False, **dumps: Any) -> Path:
    """`data` as indented JSON at `path`, atomically (`atomic_write`; `fsync` as there)."""
    return atomic_write(path, json.dumps(data, indent=2, **dumps) + "\n", fsync=fsync)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_once(path: str | Path, data: bytes, *, fsync: bool = False) -> str:
    """Write `data` to `path` unless something is there: "written", or "same" when `path`
    already holds exactly `data`, or "different" when it holds something else (left as it is).

    The bytes go to a temporary sibling first, which is hard-linked to `path` (atomic, and
    refused by the file system if `path` exists, so two writers cannot both win); with `fsync`
    the file and its folder are flushed to the disk before this returns, so a caller may then
    acknowledge the data as kept."""
    path = Path(path)
    if os.path.lexists(path):
        return _same_bytes(path, data)
    try:
        with _temporary(path, data, fsync) as tmp:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return _same_bytes(path, data)
        if fsync:
            _fsync_folder(path.parent)
        return "written"
    except OSError as err:
        raise disk_error(err, path, needed=len(data)) from err


def _same_bytes(path: Path, data: bytes) -> str:
    try:
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return "same"
    except OSError:
        pass
    return "different"
