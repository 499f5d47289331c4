"""`medfound center COMMAND`: what a center node runs on its own data (card, prepare, audit,
join, keys, pull)."""

from __future__ import annotations

import sys
from pathlib import Path

from medfound.cli.common import add_max_voxels, command_group, print_json, warn
from medfound.errors import MedfoundError


def add_center(sub) -> None:
    """`medfound center COMMAND ...`."""
    csub = command_group(sub, "center", "what a center node does: check its data, join a federation",
                         "Commands a center node runs on its own data.")
    add_center_card(csub)
    add_center_prepare(csub)
    add_center_audit(csub)
    add_center_join(csub)
    add_center_keys(csub)
    add_center_pull(csub)


def cmd_center_card(args) -> int:
    from medfound.data.card import data_card, format_card

    card = data_card(args.dir, progress=not args.quiet and not args.json)
    if args.json:
        print_json(card)
    else:
        print(format_card(card))
    return 0


def add_center_card(csub) -> None:
    """`medfound center card DIR`."""
    s = csub.add_parser(
        "card", help="summarise a center's data without PHI",
        description="Build the data card a center may share before training: modalities, "
        "series and case counts, vendors, spacing and thickness ranges, intensity statistics, "
        "annotation counts, nodule size histogram and QC warnings. Contains no PHI.")
    s.add_argument("dir", type=Path, help="center folder (one subfolder per case)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_max_voxels(s)
    s.set_defaults(func=cmd_center_card)


def cmd_center_prepare(args) -> int:
    from medfound.data.prepare import parse_split, prepare_center

    r = prepare_center(args.raw, args.out, key_file=args.key_file, annotations=args.annotations,
                       center=args.center, split=parse_split(args.split), seed=args.seed,
                       progress=not args.quiet)
    warn(r["warnings"])
    for ex in r["excluded"]:
        print(f"left out: {ex['modality']} series {ex['series']} ({ex['files']} files): "
              f"{ex['reason']}", file=sys.stderr)
    split = ", ".join(f"{k} {n} series of {r['datalist_patients'][k]} patient(s)"
                      for k, n in r["datalist"].items())
    print(f"{r['center']}: {r['patients']} patients, {r['series']} series ({r['series_new']} "
          f"de-identified now, {r['series_skipped']} already done or left out), "
          f"{r['annotations']} annotations; datalist: {split}"
          + ("" if r["changed"] else "; nothing new, no file changed"))
    return 0


def add_center_prepare(csub) -> None:
    """`medfound center prepare RAW OUT`."""
    s = csub.add_parser(
        "prepare", help="turn a folder of DICOM studies into a center folder that trains",
        description="Find every image series under RAW (any nesting; several series per "
        "study, several studies per patient), check each as training will read it, "
        "de-identify it as `medfound deid` does (same profile, keyed UIDs and pseudonyms under "
        "--key-file) into OUT/NAME/<patient>/<series>/, move --annotations to the new UIDs, and "
        "write annotations.csv, center.json, card.json (the data card) and datalist.json (split "
        "by patient; written last). A rerun skips the series already done; RAW is only read.")
    s.add_argument("raw", type=Path, metavar="RAW", help="folder holding the DICOM files")
    s.add_argument("out", type=Path, metavar="OUT",
                   help="data root to write OUT/NAME into (apart from RAW; other centers in it "
                        "are left alone)")
    s.add_argument("--key-file", type=Path, required=True, metavar="K",
                   help="the center's secret key (as for `medfound deid`; created if missing, "
                        "kept outside OUT): the same key gives the same UIDs on every run")
    s.add_argument("--annotations", type=Path, metavar="CSV",
                   help="nodules on RAW's SeriesInstanceUIDs, LUNA16 columns seriesuid,coordX,"
                        "coordY,coordZ,diameter_mm (LPS mm); a row matching no series is refused")
    s.add_argument("--center", metavar="NAME", help="the center folder's name (default: RAW's)")
    s.add_argument("--split", action="append", metavar="SPLIT=F",
                   help="share of patients per split, e.g. validation=0.2 (default) or "
                        "validation=0.2,test=0.1; the rest trains")
    s.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_center_prepare)


def cmd_center_audit(args) -> int:
    from medfound.fed.audit import (
        audit_totals,
        format_audit,
        format_verification,
        read_audit,
        verify_log,
    )

    if args.public_key and not args.verify:
        raise MedfoundError("--public-key checks signatures: it needs --verify",
                            hint=f"medfound center audit --verify {args.file} --public-key "
                                 f"{args.public_key}")
    if args.verify:
        v = verify_log(args.file, args.public_key)
        if args.json:
            print_json({"ok": v.ok, "records": v.records, "signed": v.signed,
                        "key": v.fingerprint, "key_source": v.key_source,
                        "problem": v.problem, "line": v.line, "tail": v.tail, "notes": v.notes})
        else:
            print(format_verification(v))
        return 0 if v.ok else 1
    records = read_audit(args.file, direction=None)
    if args.json:
        print_json({"records": records, "totals": audit_totals(records)})
    else:
        print(format_audit(records))
    return 0


def add_center_audit(csub) -> None:
    """`medfound center audit FILE`."""
    s = csub.add_parser(
        "audit", help="show, or check, what a center sent to and received from the federation",
        description="Print a center's audit log (FED/audit/<center>.jsonl: one line per "
        "message that left the center or arrived at it, with its round, direction, kind, size, "
        "sha256 and the names of the metrics it carried) as a table, with totals. --verify "
        "checks the log's hash chain and its signatures (the center's node key) and names the "
        "first record edited, removed, inserted or reordered; exit 1 when it finds one.")
    s.add_argument("file", type=Path, metavar="FILE", help="the center's audit log (.jsonl)")
    s.add_argument("--json", action="store_true", help="print the records and totals as JSON")
    s.add_argument("--verify", action="store_true",
                   help="check the chain, the signatures and the tail (against LOG's head file)")
    s.add_argument("--public-key", type=Path, metavar="PUB",
                   help="the center's public key (CENTER.pub, OpenSSH, or PEM): check the "
                        "signatures against it rather than the key the log names")
    s.set_defaults(func=cmd_center_audit)


def cmd_center_join(args) -> int:
    import shutil
    import tempfile

    from medfound.fed.deployment import join_command, run_center

    data = Path(args.data).resolve()
    center = args.center or data.name
    work = args.work or data.parent / f"{data.name}_work"
    # A private folder for the worker's socket (a Unix socket path must be short).
    sockets = None if args.no_worker else Path(tempfile.mkdtemp(prefix="medfound-center-"))
    socket_path = None if sockets is None else sockets / "worker.sock"
    try:
        cmd = join_command(superlink=args.superlink, center=center, data=str(data),
                           work=str(work), root_certificates=args.root_certificates,
                           insecure=args.insecure, runtime_port=args.port,
                           keep_payloads=args.keep_payloads, auth_key=args.auth_key,
                           worker_socket=None if socket_path is None else str(socket_path))
        print(f"joining the federation at {args.superlink} as {center}; "
              f"audit log in {Path(work) / 'audit'}; Ctrl-C leaves", flush=True)
        return run_center(cmd, socket_path)  # supervised with or without a worker
    finally:
        if sockets is not None:
            shutil.rmtree(sockets, ignore_errors=True)


def add_center_join(csub) -> None:
    """`medfound center join --superlink HOST:PORT --data DIR`."""
    s = csub.add_parser(
        "join", help="join a federation: run this center's Flower SuperNode",
        description="Start a Flower SuperNode for this center and keep it running: it connects "
        "to the coordinator's SuperLink and runs medfound's ClientApp on the rounds it is sent, "
        "reading only --data. Only weights and the metrics named in the audit log leave; the "
        "log is WORK/audit/CENTER.jsonl (see `medfound center audit`). TLS is on by default. "
        "A worker process beside the SuperNode runs every message, so torch, MONAI and the "
        "center's prepared studies stay loaded between rounds (--no-worker: a fresh process "
        "per message, as plain Flower).")
    s.add_argument("--superlink", required=True, metavar="HOST:PORT",
                   help="the coordinator's SuperLink (`medfound fed superlink`)")
    s.add_argument("--data", required=True, metavar="DIR",
                   help="this center's folder (holding datalist.json)")
    s.add_argument("--center", help="this center's name in the federation (default: the folder name)")
    s.add_argument("--work", type=Path, metavar="DIR",
                   help="local training state, cache and audit log (default: DATA_work beside DATA)")
    s.add_argument("--root-certificates", metavar="CA.crt",
                   help="CA certificate the SuperLink's certificate is signed with")
    s.add_argument("--insecure", action="store_true", help="no TLS (a trial on one machine only)")
    s.add_argument("--port", type=int,
                   help="local port of the SuperNode's API for its ClientApp processes "
                        "(default 9094; give each SuperNode on one machine its own)")
    s.add_argument("--keep-payloads", action="store_true",
                   help="also keep every outbound payload beside the audit log")
    s.add_argument("--auth-key", metavar="CENTER.key",
                   help="this center's private key (`medfound center keys`), for a SuperLink "
                        "that admits registered centers only")
    s.add_argument("--no-worker", action="store_true",
                   help="no long-lived worker: Flower runs each message in a fresh process "
                        "(re-importing torch and re-reading the studies every round)")
    s.set_defaults(func=cmd_center_join)


def cmd_center_keys(args) -> int:
    from medfound.fed.deployment import make_center_keys

    private, public = make_center_keys(args.out, args.center, overwrite=args.overwrite)
    print(f"private key (stays here; `medfound center join --auth-key {private}`): {private}\n"
          f"public key (send to the coordinator for `medfound fed register`): {public}")
    return 0


def add_center_keys(csub) -> None:
    """`medfound center keys --out DIR --center NAME`."""
    s = csub.add_parser(
        "keys", help="make this center's node-authentication key pair",
        description="Write OUT/CENTER.key (private, stays at the center; `medfound center join "
        "--auth-key`) and OUT/CENTER.pub (public; the coordinator registers it with `medfound "
        "fed register`, after which only this center can join as itself).")
    s.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the keys")
    s.add_argument("--center", required=True, help="this center's name (names the files)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing key pair")
    s.set_defaults(func=cmd_center_keys)


def cmd_center_pull(args) -> int:
    from medfound.pacs.connection import parse_address, parse_query
    from medfound.pacs.pull import pull_studies

    address = parse_address(args.source, "--from")
    query = parse_query(args.query)

    def report(rec: dict) -> None:
        line = (f"{rec['study_uid']}: {rec['instances']} instance(s): {rec['written']} written, "
                f"{rec['unchanged']} already there, {rec['conflicts']} conflict(s), "
                f"{rec['failed']} not kept")
        print(line if "error" not in rec else f"{line}; failed: {rec['error']}",
              file=sys.stderr if "error" in rec else sys.stdout)
        for path in rec["conflict_files"]:
            print(f"warning: {path} holds a different file; left as it is", file=sys.stderr)

    r = pull_studies(address, args.out, studies=args.study or (), query=query,
                     ae_title=args.ae_title, report=report)
    print(f"pulled {r['n_studies']} study(ies) from {r['from']} into {r['out']}: {r['written']} "
          f"file(s) written, {r['unchanged']} already there, {r['conflicts']} conflict(s) left "
          f"alone, {r['failed']} not kept; {r['n_failed_studies']} study(ies) failed")
    if r["n_studies"] == 0:
        print("warning: no study matched", file=sys.stderr)
    return 1 if r["n_failed_studies"] or r["conflicts"] or r["failed"] else 0


def add_center_pull(csub) -> None:
    s = csub.add_parser(
        "pull", help="copy studies from a PACS into a folder (for `center prepare`)",
        description="Find studies in a PACS by StudyInstanceUID (--study) or by a study-level "
        "query (--query KEY=VALUE: QIDO-RS or C-FIND) and fetch every instance (WADO-RS, or "
        "C-GET over the same association) into OUT/<StudyInstanceUID>/<SeriesInstanceUID>/"
        "<SOPInstanceUID>.dcm. Each file is written through a temporary file and linked into "
        "place, so a rerun after an interruption fetches again but writes only what is missing; "
        "an existing file is never replaced (a different one is reported as a conflict). Exit "
        "status 1 if a study failed or a file conflicted.")
    s.add_argument("--from", dest="source", required=True, metavar="URL",
                   help="the PACS: dicomweb:http://HOST:PORT/PATH (e.g. Orthanc's "
                        "http://pacs:8042/dicom-web) or dimse:AET@HOST:PORT")
    s.add_argument("--out", required=True, type=Path, metavar="RAW",
                   help="folder to write into (created if missing)")
    s.add_argument("--study", action="append", metavar="UID",
                   help="a StudyInstanceUID to fetch (repeatable)")
    s.add_argument("--query", action="append", metavar="KEY=VALUE",
                   help="a study-level matching key, DICOM keyword and value (repeatable, all "
                        "must match): PatientID=P001, StudyDate=20240101-20240131, "
                        "ModalitiesInStudy=CT, AccessionNumber=…")
    s.add_argument("--ae-title", default="MEDFOUND", metavar="AET",
                   help="this node's AE title for DIMSE (default MEDFOUND; the PACS must allow "
                        "it C-FIND and C-GET)")
    s.set_defaults(func=cmd_center_pull)
