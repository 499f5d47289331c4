"""`medfound` command line: thin; parses arguments and calls the library.

Every user-caused failure is a `MedfoundError`, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medfound import __version__
from medfound.errors import MedfoundError, as_disk_error


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _warn(lines) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


# --- commands ---------------------------------------------------------------------------


def cmd_inspect(args) -> int:
    from medfound.io.reader import MultipleSeriesError, read_volume

    try:
        vol = read_volume(args.path, series_uid=args.series, allow_gaps=args.allow_gaps,
                          workers=args.workers)
    except MultipleSeriesError as err:
        if args.json:
            _print_json({"path": str(args.path), "series": [s.as_dict() for s in err.series]})
        else:
            print(f"{args.path}: {len(err.series)} series; choose one with --series UID")
            print(f"{'series_uid':<66} {'modality':<8} {'count':>6}  description")
            for s in err.series:
                print(f"{s.series_uid:<66} {s.modality:<8} {s.count:>6}  {s.description}")
        return 3
    _warn(vol.warnings)
    if args.json:
        _print_json(vol.summary())
    else:
        s = vol.summary()
        print(f"path        {s['path']}")
        print(f"modality    {s['modality']}  ({s['units']})")
        print(f"series_uid  {s['series_uid']}")
        print(f"shape       {s['shape']}  (column i, row j, slice k)")
        print(f"spacing_mm  {s['spacing_mm']}")
        print("affine_lps  " + "\n            ".join(str(r) for r in s["affine_lps"]))
        st = s["stats"]
        print(f"values      min {st['min']:.3f}  max {st['max']:.3f}  mean {st['mean']:.3f}")
    return 0


def cmd_deid(args) -> int:
    from medfound.io.deid import deidentify

    report = deidentify(args.input, args.output, key_file=args.key_file,
                        remove_dates=args.remove_dates, pseudonym_map=args.pseudonym_map,
                        progress=not args.quiet, options=args.option)
    _warn(report.get("warnings", []))
    print(f"de-identified {report['files_written']} files into {args.output}"
          f" ({report['files_skipped']} skipped, {report['files_failed']} failed,"
          f" {len(report['burned_in_risk'])} flagged for burned-in text); report:"
          f" {Path(args.output) / 'deid_report.json'}")
    return 1 if report["files_failed"] else 0


def cmd_phantoms(args) -> int:
    from medfound.data.phantoms import make_phantoms, make_world

    if args.preset:
        given = [f"--{k}" for k in ("centers", "cases", "modalities", "size")
                 if getattr(args, k) is not None]
        if given:
            raise MedfoundError(f"--preset {args.preset} sets the centers, cases, modalities and "
                                f"size itself; {', '.join(given)} cannot change them",
                                hint=f"drop {' '.join(given)}")
        out = make_world(args.out, preset=args.preset, seed=args.seed, workers=args.workers,
                         progress=not args.quiet, masks=args.masks)
        world = json.loads((out / "phantoms.json").read_text())
        print(f"wrote the {args.preset} world to {out}: train centers "
              f"{', '.join(world['train_centers'])}; test centers {', '.join(world['test_centers'])}"
              f" (held out; training on them is refused)")
        return 0
    centers = 3 if args.centers is None else args.centers
    out = make_phantoms(args.out, centers=centers, cases=6 if args.cases is None else args.cases,
                        seed=args.seed, modalities=args.modalities or "ct",
                        size=args.size or "small", progress=not args.quiet, masks=args.masks)
    print(f"wrote {centers} phantom centers to {out}")
    return 0


def cmd_center_card(args) -> int:
    from medfound.data.card import data_card, format_card

    card = data_card(args.dir, progress=not args.quiet and not args.json)
    if args.json:
        _print_json(card)
    else:
        print(format_card(card))
    return 0


def cmd_center_prepare(args) -> int:
    from medfound.data.prepare import parse_split, prepare_center

    r = prepare_center(args.raw, args.out, key_file=args.key_file, annotations=args.annotations,
                       center=args.center, split=parse_split(args.split), seed=args.seed,
                       progress=not args.quiet)
    _warn(r["warnings"])
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
            _print_json({"ok": v.ok, "records": v.records, "signed": v.signed,
                         "key": v.fingerprint, "key_source": v.key_source,
                         "problem": v.problem, "line": v.line, "tail": v.tail, "notes": v.notes})
        else:
            print(format_verification(v))
        return 0 if v.ok else 1
    records = read_audit(args.file, direction=None)
    if args.json:
        _print_json({"records": records, "totals": audit_totals(records)})
    else:
        print(format_audit(records))
    return 0


def cmd_fed_reconcile(args) -> int:
    from medfound.fed.audit import format_reconcile, reconcile

    result = reconcile(args.center_log, args.receipts)
    if args.json:
        _print_json(result)
    else:
        print(format_reconcile(result))
    clean = not (result["only_center"] or result["only_coordinator"] or result["center_chain"]
                 or result["receipts_chain"])
    return 0 if clean else 1


def cmd_fed_superlink(args) -> int:
    from medfound.fed.deployment import run_process, superlink_command

    cmd = superlink_command(certs=args.certs, insecure=args.insecure, address=args.address,
                            database=args.database, auth=args.auth)
    print(f"SuperLink on {args.address} ({'insecure' if args.insecure else 'TLS'}"
          f"{', registered centers only' if args.auth else ''}); Ctrl-C stops it", flush=True)
    return run_process(cmd)


def cmd_fed_register(args) -> int:
    import tempfile

    from medfound.fed.deployment import register_centers

    with tempfile.TemporaryDirectory(prefix="medfound-flwr-") as home:
        ids = register_centers(args.public_keys, superlink=args.superlink,
                               root_certificates=args.root_certificates, flwr_home=home)
    for key, node in zip(args.public_keys, ids, strict=True):
        print(f"registered {key} as SuperNode {node}")
    return 0


def cmd_center_keys(args) -> int:
    from medfound.fed.deployment import make_center_keys

    private, public = make_center_keys(args.out, args.center, overwrite=args.overwrite)
    print(f"private key (stays here; `medfound center join --auth-key {private}`): {private}\n"
          f"public key (send to the coordinator for `medfound fed register`): {public}")
    return 0


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


def cmd_export(args) -> int:
    from medfound.export.onnx import export_model_package

    card = export_model_package(args.model_dir, args.out, opset=args.opset,
                                dynamic=not args.fixed_shape, data_root=args.data, int8=args.int8,
                                calibration=args.calibration, calibration_patches=args.calibration_patches,
                                min_cpm=args.min_cpm, allow_unvalidated=args.allow_unvalidated)
    parity = card["parity"]
    print(f"wrote {Path(args.out) / 'model.onnx'} (sha256 {card['onnx']['sha256'][:12]}…), "
          f"model_card.json, MODEL_CARD.md; onnxruntime vs torch: max relative error "
          f"{parity['max_rel']:.1e} (≤ {parity['rtol']:.0e}, passed)")
    if "cpm" in parity:
        q = parity["cpm"]
        print(f"CPM on {q['n_scans']} validation scans: torch {q['cpm_torch']:.4f}, "
              f"onnx {q['cpm_onnx']:.4f} (|diff| ≤ {q['tolerance']}, passed)")
    if "dice" in parity:
        q = parity["dice"]
        print(f"Dice on {q['n_studies']} validation studies: torch {q['dice_torch']:.4f}, "
              f"onnx {q['dice_onnx']:.4f} (|diff| ≤ {q['tolerance']}, passed); labels agree on "
              f"{100 * q['label_agreement']:.3f}% of voxels")
    v = card.get("validation")
    if v:
        print(f"validation: {v['status'].upper()} — {v['reason']}")
    if "int8" in card:
        d = card["int8"]
        print(f"INT8 accepted: {Path(args.out) / d['file']}, CPM {d['cpm_int8']:.4f} "
              f"(drop {d['cpm_drop']:.4f} ≤ {d['max_cpm_drop']})")
    return 0


def cmd_infer(args) -> int:
    from tqdm.auto import tqdm

    from medfound.infer.study import run_studies

    def report(rec: dict) -> None:  # one line per study, above the progress bar
        if rec["status"] == "ok":
            t = rec["timings_s"]
            found = (f"{rec['n_findings']} finding(s)" if "n_findings" in rec
                     else f"{rec['n_regions']} nodule region(s)")
            tqdm.write(f"{rec['study']}: {found} → {rec['out']}/ "
                       f"(read {t['read']:.2f} s, preprocess {t['preprocess']:.2f} s, "
                       f"network {t['network']:.2f} s, postprocess {t['postprocess']:.2f} s)")
            if "reference" in rec:  # found / missed against the annotations
                from medfound.infer.reference import format_reference

                findings = json.loads((Path(rec["out"]) / "findings.json").read_text())
                tqdm.write(f"{rec['series_uid']} against {args.annotations}:\n"
                           + format_reference(findings["reference"], args.threshold))
        else:
            tqdm.write(f"failed: {rec['error']}", file=sys.stderr)

    from medfound.infer.engine import load_model_card
    from medfound.infer.study import model_validation

    validation = model_validation(load_model_card(args.model)[1])
    if validation["status"] != "validated":
        print(f"warning: this model is NOT VALIDATED ({validation['reason']}); its findings are "
              "for research use only and say so", file=sys.stderr)
    if args.int8 and args.precision not in ("auto", "int8"):
        raise MedfoundError(f"--int8 asks for --precision int8, not {args.precision}",
                            hint="pass one of them")

    def announce(model: dict) -> None:  # which engine and precision run, and why
        print(f"engine: {model['engine']} {model['precision']} ({', '.join(model['providers'])}) "
              f"— {model['engine_reason']}", flush=True)

    summary = run_studies(args.model, args.studies, args.out, providers=args.provider,
                          threads=args.threads, precision="int8" if args.int8 else args.precision,
                          engine=args.engine, trt_cache=args.trt_cache, fp16=args.fp16,
                          threshold=args.threshold, series_uid=args.series,
                          max_findings=args.max_findings, sr=not args.no_sr,
                          progress=not args.quiet, report=report, annotations=args.annotations,
                          announce=announce)
    ref = summary.get("reference")
    if ref and ref["unmatched"]:
        rows = sum(len(r) for r in ref["unmatched"].values())
        _warn([f"{args.annotations}: {rows} annotation row(s) match no study read: " + "; ".join(
            f"{uid} (row {', '.join(map(str, r))})" for uid, r in ref["unmatched"].items())])
    print(f"{summary['n_ok']} ok, {summary['n_failed']} failed; summary in "
          f"{Path(args.out) / 'summary.json'} (providers: {', '.join(summary['model']['providers'])})")
    if ref:
        print(f"against {args.annotations}: {ref['n_found']} of {ref['n_nodules']} nodules found, "
              f"{ref['n_false_positives']} false positive(s) at p ≥ {args.threshold:g} in "
              f"{ref['n_studies_scored']} {'study' if ref['n_studies_scored'] == 1 else 'studies'}")
    return 1 if summary["n_failed"] else 0


# --- the PACS side: `medfound center pull` and `medfound serve` (each parser beside its handler)


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


def cmd_serve(args) -> int:
    from medfound.pacs.queue import read_status

    if args.action == "status":
        if args.work is None:
            raise MedfoundError("`medfound serve status` needs --work DIR",
                                hint="the work folder of the node")
        status = read_status(args.work)
        if args.json:
            _print_json(status)
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
    _add_detection_options(s)
    _add_engine_options(s)
    s.add_argument("--retry-s", type=float, default=2.0, metavar="S",
                   help="first wait before storing a result again in a PACS that failed "
                        "(doubled each attempt; default 2)")
    s.add_argument("--retry-max-s", type=float, default=300.0, metavar="S",
                   help="longest wait between store attempts (default 300)")
    s.add_argument("--json", action="store_true", help="status: print JSON")
    _add_max_voxels(s)
    s.set_defaults(func=cmd_serve)


def recipes_dir() -> Path:
    """recipes/ of the checkout medfound runs from (MEDFOUND_RECIPES overrides)."""
    import os

    env = os.environ.get("MEDFOUND_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"


def cmd_run(args) -> int:
    import subprocess

    folder = recipes_dir()
    recipe = folder / f"{args.recipe}.py"
    if not recipe.is_file():
        known = sorted(p.stem for p in folder.glob("*.py")) if folder.is_dir() else []
        raise MedfoundError(
            f"no recipe named '{args.recipe}'", path=folder,
            hint=("recipes here: " + ", ".join(known)) if known else
            "run from a medfound checkout (pip install -e .) or set MEDFOUND_RECIPES")
    from medfound.preflight import check_recipe

    check_recipe(recipe, args.overrides)  # the common mistakes, before torch is imported
    # A recipe is a Hydra app: it parses key=value overrides, -m sweeps and --cfg itself.
    return subprocess.call([sys.executable, str(recipe), *args.overrides])


# --- parser -----------------------------------------------------------------------------


def _add_detection_options(s: argparse.ArgumentParser) -> None:
    """--threshold and --max-findings, as `infer` and `serve` both take them."""
    s.add_argument("--threshold", type=float, default=0.5,
                   help="report findings with probability ≥ this (default 0.5)")
    s.add_argument("--max-findings", type=int, default=20, help="at most this many per study")


def _add_engine_options(s: argparse.ArgumentParser) -> None:
    """--engine, --precision and --threads: what runs the network, for `infer` and `serve`."""
    s.add_argument("--engine", choices=("auto", "onnxruntime", "openvino"), default="auto",
                   help="what runs the network; auto (default): the fastest variant the model "
                        "card's export gate passed that this machine can run (onnxruntime fp32 "
                        "for an export without measured variants, or with a GPU provider)")
    s.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="auto",
                   help="network arithmetic: fp32, bf16 (OpenVINO, on a CPU with bf16), int8 "
                        "(model.int8.onnx); a variant that failed the export gate is refused; "
                        "auto (default) as for --engine")
    s.add_argument("--threads", type=int, help="the engine's intra-op threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medfound",
        description="Train medical-imaging AI across imaging centers without moving their images.",
        epilog="Run `medfound COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"medfound {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser(
        "inspect", help="read a study and print its geometry and values",
        description="Read a DICOM file, a folder of DICOM series, a NIfTI file or a MetaImage "
        "(.mhd) into one volume and print its geometry: shape as (column i, row j, slice k), "
        "spacing, the affine to DICOM patient coordinates (LPS mm), units after the modality "
        "LUT and value statistics. A folder with several series lists them and exits 3 unless "
        "--series picks one.")
    s.add_argument("path", type=Path, help="DICOM file or folder, .nii/.nii.gz, or .mhd")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read from a folder")
    s.add_argument("--allow-gaps", action="store_true",
                   help="read a series with missing slices or uneven spacing (warns instead)")
    s.add_argument("--workers", type=int, default=None,
                   help="decoding threads for long series (default: CPU count)")
    _add_max_voxels(s)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser(
        "deid", help="de-identify DICOM files (PS3.15 Annex E basic profile)",
        description="Copy DICOM files from IN to OUT applying the PS3.15 Annex E Basic "
        "Application Level Confidentiality Profile: identifying attributes removed, emptied or "
        "replaced; private tags removed; UIDs replaced by a keyed hash (same input, same key, "
        "same output); dates shifted by a per-patient offset. Pixel data is untouched; images "
        "that may carry burned-in text are listed in OUT/deid_report.json. IN is never written.")
    s.add_argument("input", type=Path, metavar="IN", help="DICOM file or folder to read")
    s.add_argument("output", type=Path, metavar="OUT", help="folder to write (not inside IN)")
    s.add_argument("--key-file", type=Path,
                   help="secret key for UID hashing and date offsets; created if missing. Keep "
                   "it at the center: the same key gives the same pseudonyms on every run")
    s.add_argument("--remove-dates", action="store_true",
                   help="remove dates instead of shifting them")
    s.add_argument("--pseudonym-map", type=Path, metavar="FILE",
                   help="write the original→pseudonym map (PatientID, UIDs) to FILE, which "
                   "must stay at the center (refused inside OUT)")
    s.add_argument("--option", action="append", metavar="NAME",
                   help="a PS3.15 E.3 option, repeatable: clean-descriptors, clean-graphics, "
                   "clean-structured-content, retain-device-identity, retain-uids, "
                   "retain-patient-characteristics, retain-institution-identity, "
                   "retain-longitudinal-full-dates (default: retain-longitudinal-modified-dates)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_deid)

    s = sub.add_parser(
        "phantoms", help="generate synthetic multi-center DICOM studies",
        description="Write synthetic imaging centers as real DICOM series: chest CT with "
        "nodules (annotations.csv in LUNA16 columns, LPS mm) and optionally MR, PET and "
        "ultrasound. Centers differ in vendor, slice thickness, pixel spacing, noise, sharpness, "
        "HU calibration and size; every case carries fake PHI. Deterministic for a seed.")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--preset", choices=["benchmark"],
                   help="a whole world instead of --centers/--cases: benchmark = 6 CT centers "
                   "(one small), LIDC/LUNA16-like nodules, look-alikes (lookalikes.csv), and a "
                   "train/test split in phantoms.json; training on its test centers is refused")
    s.add_argument("--workers", type=int, metavar="N",
                   help="processes for --preset (default: up to 4, at most the CPUs)")
    s.add_argument("--centers", type=int, help="number of centers (default 3)")
    s.add_argument("--cases", type=int, help="cases in the largest center (default 6)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--modalities", help="comma list of ct,mr,pet,us (default ct) for every "
                   "center, or one list per center separated by ';' (ct,pet;ct,mr;us,ct: "
                   "centers beyond the lists cycle through them)")
    s.add_argument("--size", choices=["small", "full"],
                   help="small ≈128×128×~100 CT for tests; full 512×512×200–400 (default small)")
    s.add_argument("--masks", action="store_true", help="also write each CT's nodule mask "
                   "(case_NNN/nodules.nii.gz, the datalist's 'mask'): ground truth for "
                   "`medfound run train_segmenter`")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_phantoms)

    s = sub.add_parser(
        "run", help="run a Hydra recipe: medfound run RECIPE key=value ...",
        description="Run a recipe from recipes/ (a Hydra app over configs/) with key=value "
        "overrides, e.g. `medfound run train_detector data.root=DIR experiment=phantoms_smoke "
        "out_dir=RUN`. Hydra's own flags work too: -m for sweeps, --cfg job to print the "
        "composed config, --help for the recipe's config groups.")
    s.add_argument("recipe", help="recipe name, e.g. train_detector, evaluate_detector")
    s.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides key=value")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "export", help="export a model package's network to ONNX, with a parity check",
        description="Export the network of a model package (RUN/model/, FED/model/) with "
        "torch.onnx.export(dynamo=True) to OUT/model.onnx, write OUT/model_card.json and "
        "OUT/MODEL_CARD.md, and check onnxruntime against torch on random patches "
        "(OUT/parity.json). Detector (train_detector, federate) and segmenter (train_segmenter) "
        "packages. Exits non-zero, leaving no model.onnx, when parity fails.")
    s.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="the model package folder")
    s.add_argument("--out", type=Path, required=True, metavar="EXP", help="output folder")
    s.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    s.add_argument("--fixed-shape", action="store_true",
                   help="fix the input to one sliding window (1, C, *sw_roi_size) instead of "
                        "dynamic batch and spatial axes")
    s.add_argument("--data", type=Path, metavar="ROOT",
                   help="folder holding the model's validation centers: adds the CPM parity gate "
                        "(deployed ONNX path vs torch, |diff| ≤ 0.005), or for a segmenter the "
                        "Dice parity gate (|diff| ≤ 0.005)")
    s.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx (static QDQ, per-channel), kept only when its "
                        "CPM drop is ≤ 0.01; needs --data")
    s.add_argument("--calibration", type=Path, metavar="DATALIST",
                   help="center folder or datalist.json whose training studies calibrate INT8 "
                        "(default: the model's first training center under --data)")
    s.add_argument("--calibration-patches", type=int, default=16, metavar="N",
                   help="calibration windows (default 16)")
    s.add_argument("--min-cpm", type=float, default=0.5, metavar="CPM",
                   help="a detector whose validation CPM (measured on --data, else the training "
                        "run's) is below this is not exported (default 0.5)")
    s.add_argument("--allow-unvalidated", action="store_true",
                   help="export it anyway, marked 'not validated' in its card; infer then says "
                        "so on every run, in findings.json and in the SR")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "infer", help="find nodules in DICOM/NIfTI/MHD studies with an exported model",
        description="Run an exported model (the folder `medfound export` wrote) on each STUDY "
        "with onnxruntime or OpenVINO (no torch needed), printing which engine and precision run "
        "and why. Writes OUT/<series_uid>/findings.json (LPS mm and "
        "voxel centres, diameter, probability, model sha256), findings_sr.dcm (a DICOM "
        "Comprehensive 3D SR, TID 1500, referencing the source series, for DICOM studies) and "
        "overview.png, and OUT/summary.json with each study's status and timings. With a "
        "segmenter export: segments.json (each nodule region's volume, centre and diameter), "
        "mask.nii.gz (the labels on the study's grid), segmentation.dcm (a DICOM Segmentation "
        "over the source series) and overview.png. A study that "
        "fails is reported and skipped; the exit status is 1 if any failed.")
    s.add_argument("studies", nargs="+", type=Path, metavar="STUDY",
                   help="a DICOM series folder, or a .nii/.nii.gz/.mhd/.mha file")
    s.add_argument("--model", type=Path, required=True, metavar="EXP",
                   help="the export folder (model.onnx + model_card.json)")
    s.add_argument("--out", type=Path, required=True, metavar="OUT",
                   help="output folder, apart from every STUDY and the model; it may exist, but "
                        "nothing in it is replaced (a name it holds gets a _2 suffix)")
    s.add_argument("--series", metavar="UID",
                   help="the SeriesInstanceUID to read in a STUDY folder holding several series")
    _add_detection_options(s)
    s.add_argument("--provider", action="append", metavar="NAME",
                   help="onnxruntime execution provider (tensorrt, cuda, cpu; repeat for a "
                        "fallback list); default: the best available")
    _add_engine_options(s)
    s.add_argument("--trt-cache", type=Path, metavar="DIR",
                   help="TensorRT: keep built engines in DIR and reuse them (skips engine building)")
    s.add_argument("--fp16", action="store_true", help="TensorRT: allow fp16 kernels")
    s.add_argument("--int8", action="store_true",
                   help="the same as --precision int8: run model.int8.onnx (written by "
                        "`medfound export --int8` when accepted)")
    s.add_argument("--no-sr", action="store_true",
                   help="skip the DICOM SR (detector) or DICOM Segmentation (segmenter)")
    s.add_argument("--annotations", type=Path, metavar="CSV",
                   help="score each study against its nodules in this LUNA16 CSV (seriesuid,"
                        "coordX,coordY,coordZ,diameter_mm in LPS mm; more columns, e.g. "
                        "nodule_type, are shown): prints a found / missed table and the false "
                        "positives, and adds them to findings.json and summary.json")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_max_voxels(s)
    s.set_defaults(func=cmd_infer)
    add_serve(sub)

    csub = _command_group(sub, "center", "what a center node does: check its data, join a federation",
                          "Commands a center node runs on its own data.")
    s = csub.add_parser(
        "card", help="summarise a center's data without PHI",
        description="Build the data card a center may share before training: modalities, "
        "series and case counts, vendors, spacing and thickness ranges, intensity statistics, "
        "annotation counts, nodule size histogram and QC warnings. Contains no PHI.")
    s.add_argument("dir", type=Path, help="center folder (one subfolder per case)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_max_voxels(s)
    s.set_defaults(func=cmd_center_card)
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
    s = csub.add_parser(
        "keys", help="make this center's node-authentication key pair",
        description="Write OUT/CENTER.key (private, stays at the center; `medfound center join "
        "--auth-key`) and OUT/CENTER.pub (public; the coordinator registers it with `medfound "
        "fed register`, after which only this center can join as itself).")
    s.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the keys")
    s.add_argument("--center", required=True, help="this center's name (names the files)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing key pair")
    s.set_defaults(func=cmd_center_keys)
    add_center_pull(csub)

    fsub = _command_group(sub, "fed", "the coordinator's side of a federation",
                          "Commands the coordinator (the federation's server) runs.")
    s = fsub.add_parser(
        "superlink", help="run the coordinator's Flower SuperLink",
        description="Start a Flower SuperLink and keep it running: centers join it with "
        "`medfound center join`, and `medfound run federate fed.mode=deployment "
        "fed.deployment.superlink=HOST:PORT ...` submits runs to it (their ServerApp runs "
        "here and writes out_dir on this machine). TLS is on by default.")
    s.add_argument("--address", default="127.0.0.1:9092", metavar="HOST:PORT",
                   help="where to listen (default 127.0.0.1:9092; 0.0.0.0:9092 for other machines)")
    s.add_argument("--certs", metavar="DIR",
                   help="folder with ca.crt, server.pem, server.key (scripts/make_certs.sh DIR)")
    s.add_argument("--insecure", action="store_true", help="no TLS (a trial on one machine only)")
    s.add_argument("--database", metavar="PATH",
                   help="SuperLink state database file: a restarted SuperLink still knows its "
                        "centers and registered keys (default: Flower's in-memory state, lost "
                        "on restart)")
    s.add_argument("--auth", action="store_true",
                   help="node authentication: only centers whose public keys were registered "
                        "(`medfound fed register`) may join; needs TLS")
    s.set_defaults(func=cmd_fed_superlink)
    s = fsub.add_parser(
        "register", help="admit centers to a SuperLink started with --auth",
        description="Register center public keys (CENTER.pub from `medfound center keys`) with "
        "the SuperLink, through Flower's `flwr supernode register`. A SuperNode whose key is "
        "not registered is refused.")
    s.add_argument("public_keys", nargs="+", metavar="CENTER.pub", help="public key file(s)")
    s.add_argument("--superlink", default="127.0.0.1:9092", metavar="HOST:PORT",
                   help="the SuperLink (default 127.0.0.1:9092)")
    s.add_argument("--root-certificates", required=True, metavar="CA.crt",
                   help="CA certificate the SuperLink's certificate is signed with")
    s.set_defaults(func=cmd_fed_register)
    s = fsub.add_parser(
        "reconcile", help="compare a center's audit log with the coordinator's receipts",
        description="List every message one side has and the other has not: what the center's "
        "log says it sent that the coordinator has no receipt of, and the other way round, in "
        "both directions (matched by sha256 of the content). Also says whether each chain is "
        "whole. Exit 0 when both sides agree, 1 otherwise.")
    s.add_argument("--center-log", required=True, type=Path, metavar="LOG",
                   help="the center's audit log (WORK/audit/CENTER.jsonl)")
    s.add_argument("--receipts", required=True, type=Path, metavar="RECEIPTS",
                   help="the coordinator's receipts (FED/receipts.jsonl)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=cmd_fed_reconcile)
    return p


def _add_max_voxels(s) -> None:
    s.add_argument("--max-voxels", type=int, metavar="N",
                   help="refuse a study (or a resampled grid) of more than N voxels before "
                        "decoding it (default 536870912, or $MEDFOUND_MAX_VOXELS)")


def _command_group(sub, name: str, help_: str, description: str):
    """`medfound NAME COMMAND ...`: a parser whose sub-commands are added to the returned
    action; `medfound NAME` alone prints its help and exits with 2."""
    group = sub.add_parser(name, help=help_, description=description)
    commands = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
    group.set_defaults(func=lambda a: (group.print_help(), 2)[1])
    return commands


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
