"""`medfound infer --model EXP STUDY ... --out OUT`: an exported model on studies, torch-free."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from medfound.cli.common import add_detection_options, add_engine_options, add_max_voxels, warn
from medfound.errors import MedfoundError


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
        warn([f"{args.annotations}: {rows} annotation row(s) match no study read: " + "; ".join(
            f"{uid} (row {', '.join(map(str, r))})" for uid, r in ref["unmatched"].items())])
    print(f"{summary['n_ok']} ok, {summary['n_failed']} failed; summary in "
          f"{Path(args.out) / 'summary.json'} (providers: {', '.join(summary['model']['providers'])})")
    if ref:
        print(f"against {args.annotations}: {ref['n_found']} of {ref['n_nodules']} nodules found, "
              f"{ref['n_false_positives']} false positive(s) at p ≥ {args.threshold:g} in "
              f"{ref['n_studies_scored']} {'study' if ref['n_studies_scored'] == 1 else 'studies'}")
    return 1 if summary["n_failed"] else 0


def add_infer(sub) -> None:
    """`medfound infer --model EXP STUDY ... --out OUT`."""
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
    add_detection_options(s)
    s.add_argument("--provider", action="append", metavar="NAME",
                   help="onnxruntime execution provider (tensorrt, cuda, cpu; repeat for a "
                        "fallback list); default: the best available")
    add_engine_options(s)
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
    add_max_voxels(s)
    s.set_defaults(func=cmd_infer)
