"""`medfound serve`: the inference node between a PACS and an exported model, and its status."""

from __future__ import annotations

from pathlib import Path

from medfound.cli.common import (
    add_detection_options,
    add_engine_options,
    add_max_voxels,
    print_json,
)
from medfound.errors import MedfoundError


def cmd_serve(args) -> int:
    from medfound.pacs.queue import read_status

    if args.action == "status":
        if args.work is None:
            raise MedfoundError("`medfound serve status` needs --work DIR",
                                hint="the work folder of the node")
        status = read_status(args.work)
        if args.json:
            print_json(status)
            return 0
        counts = ", ".join(f"{n} {k}" for k, n in status["counts"].items())
        print(f"{status['work']}: node {'running' if status['node_running'] else 'not running'};"
              f" {counts}")
        for st in status["studies"]:
            extra = (f"; result waiting, {st['store_attempts']} store attempt(s), last: "
                     f"{st['last_store_error']}" if st["waiting_results"] else "")
            if st["error"]:
                extra += f"; {st['error']}"
            print(f"{st['study'][:16]}  {st['status']:<9} round {st['round']}  "
                  f"{st['instances']} instance(s)  last received {st['last_received']}  "
                  f"stored {st['stored'] or '-'}  findings {st['findings']}{extra}")
        return 0
    from medfound.pacs.connection import parse_address
    from medfound.pacs.serve import serve

    missing = [f"--{k.replace('_', '-')}" for k in ("model", "port", "send_to", "work")
               if getattr(args, k) is None]
    if missing:
        raise MedfoundError(f"medfound serve needs {', '.join(missing)}",
                            hint="see `medfound serve --help`")
    if args.idle_s <= 0 or args.max_study_s <= args.idle_s:
        raise MedfoundError("--idle-s must be > 0 and below --max-study-s",
                            hint="e.g. --idle-s 30 --max-study-s 3600")
    return serve(args.model, args.work, parse_address(args.send_to, "--send-to"), port=args.port,
                 bind=args.bind, stow_port=args.stow_port, ae_title=args.ae_title,
                 idle_s=args.idle_s, max_study_s=args.max_study_s, threshold=args.threshold,
                 max_findings=args.max_findings, engine=args.engine, precision=args.precision,
                 threads=args.threads, retry_s=args.retry_s, retry_max_s=args.retry_max_s,
                 accept_from=args.accept_from)


def add_serve(sub) -> None:
    s = sub.add_parser(
        "serve", help="the inference node: receive studies from a PACS, send the SR back",
        description="Run a center's inference node: a DICOM C-STORE SCP (and C-ECHO) on --port "
        "and, with --stow-port, a STOW-RS endpoint (POST /studies; GET /status). Every received "
        "instance is written to WORK and fsync'd before it is acknowledged. A study is complete "
        "after --idle-s seconds without a new instance; the node then picks the series the "
        "model card accepts (modality, orientation, slice thickness; the others are logged "
        "with their reason), runs the exported model with onnxruntime or OpenVINO (no torch), "
        "and stores the DICOM SR (TID 1500; a DICOM SEG for a segmenter) in the same study as a "
        "new series, by C-STORE or STOW-RS to --send-to. A PACS that is down or refuses is "
        "retried with backoff; the result waits in WORK until stored. Stopped (even with kill "
        "-9) and started again on the same WORK, it resumes every unfinished study. "
        "WORK/decisions.jsonl logs every decision (duplicates, non-image objects, truncated "
        "instances, skipped series, retries); WORK/usage.jsonl has one line per study (its "
        "keyed hash, times received / started / stored, model sha256, engine, status). "
        "`medfound serve status --work WORK` says what is queued, running, done and failed.")
    s.add_argument("action", nargs="?", choices=("run", "status"), default="run",
                   help="run (default) the node, or print the status of --work")
    s.add_argument("--model", type=Path, metavar="EXP", help="the export folder (`medfound export`)")
    s.add_argument("--work", type=Path, metavar="DIR",
                   help="the node's work folder: received instances, queue, results, logs")
    s.add_argument("--ae-title", default="MEDFOUND", metavar="AET",
                   help="this node's AE title (default MEDFOUND); register it, with --port, as a "
                        "modality in the PACS")
    s.add_argument("--port", type=int, metavar="N", help="DICOM port to listen on (e.g. 11112)")
    s.add_argument("--bind", default="0.0.0.0", metavar="ADDRESS",
                   help="address to listen on (default 0.0.0.0: every interface)")
    s.add_argument("--accept-from", action="append", metavar="AET",
                   help="accept DICOM associations only from this calling AE title (repeatable; "
                        "default: any)")
    s.add_argument("--stow-port", type=int, metavar="N",
                   help="also receive by STOW-RS on this HTTP port (POST /studies) and answer "
                        "GET /status")
    s.add_argument("--send-to", metavar="URL",
                   help="where results go: dimse:AET@HOST:PORT (C-STORE) or "
                        "dicomweb:http://HOST:PORT/PATH (STOW-RS)")
    s.add_argument("--idle-s", type=float, default=30.0, metavar="S",
                   help="a study is complete after S seconds without a new instance (default 30)")
    s.add_argument("--max-study-s", type=float, default=3600.0, metavar="S",
                   help="a study still receiving S seconds after its first instance is read with "
                        "what it has (default 3600)")
    add_detection_options(s)
    add_engine_options(s)
    s.add_argument("--retry-s", type=float, default=2.0, metavar="S",
                   help="first wait before storing a result again in a PACS that failed "
                        "(doubled each attempt; default 2)")
    s.add_argument("--retry-max-s", type=float, default=300.0, metavar="S",
                   help="longest wait between store attempts (default 300)")
    s.add_argument("--json", action="store_true", help="status: print JSON")
    add_max_voxels(s)
    s.set_defaults(func=cmd_serve)
