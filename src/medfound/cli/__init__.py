"""`medfound` command line: thin; parses arguments and calls the library.

Every user-caused failure is a `MedfoundError`, printed as one line on stderr with exit code 2.
Each command's parser sits beside its handler (`add_X` next to `cmd_X`), one module per
command or command group:

    studies.py  inspect, deid, phantoms       export.py  export      serve.py  serve
    run.py      run (Hydra recipes)           infer.py   infer       center.py center COMMAND
    common.py   options and output several commands share           fed.py    fed COMMAND
"""

from __future__ import annotations

import argparse
import sys

from medfound import __version__
from medfound.cli import center, export, fed, infer, run, serve, studies
from medfound.cli.run import recipes_dir
from medfound.errors import MedfoundError, as_disk_error

__all__ = ["build_parser", "main", "recipes_dir"]

# `medfound COMMAND`, in the order --help lists them.
COMMANDS = (studies.add_inspect, studies.add_deid, studies.add_phantoms, run.add_run,
            export.add_export, infer.add_infer, serve.add_serve, center.add_center, fed.add_fed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medfound",
        description="Train medical-imaging AI across imaging centers without moving their images.",
        epilog="Run `medfound COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"medfound {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "max_voxels", None) is not None:  # read by every reader (io.volume)
        import os

        from medfound.io.volume import MAX_VOXELS_ENV

        os.environ[MAX_VOXELS_ENV] = str(args.max_voxels)
    try:
        return int(args.func(args) or 0)
    except MedfoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as err:
        line = as_disk_error(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return line.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
