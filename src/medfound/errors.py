"""The one exception type a user can cause.

Every error that bad input, a bad config or an unreachable server can cause is raised as a
`MedfoundError` whose message names the file or key and says what to do. The CLI prints that
message as a single line on stderr and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from pathlib import Path


class MedfoundError(Exception):
    """A user-facing error: `str(err)` is one line naming the culprit and the fix."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.path = None if path is None else str(path)
        self.hint = hint
        parts = [f"{self.path}: {message}" if self.path else message]
        if hint:
            parts.append(hint)
        super().__init__(" — ".join(parts))


def exit_on_user_error(fn):
    """Decorate an entry point (a CLI command, a Hydra recipe's main) so that a MedfoundError
    — or an OSError of a full, read-only or unwritable disk — ends the process with its
    one-line message on stderr, not a traceback."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedfoundError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        except OSError as err:
            line = as_disk_error(err)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            sys.exit(line.exit_code)

    return wrapper


def as_disk_error(err: BaseException) -> MedfoundError | None:
    """`err` as the one-line error of a full, read-only or unwritable disk, or None when it is
    something else (a bug, which keeps its traceback)."""
    from medfound.outputs import disk_error, is_disk_error

    if not is_disk_error(err):
        return None
    return disk_error(err, getattr(err, "filename", None) or ".")


def read_json(path, what: str | None = None):
    """The JSON document in `path`; an unreadable or invalid file is a one-line MedfoundError.

    Used for the small metadata files medfound writes and reads back (model.json,
    model_card.json): the message names the file, and `what` says what it should have been.
    """
    import json
    from pathlib import Path

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MedfoundError(f"{path.name} is not valid JSON ({err.msg})", path=path,
                            hint=what) from None
    except OSError as err:
        raise MedfoundError(f"cannot read {path.name} ({err.strerror})", path=path, hint=what) from None
