"""`medfound export MODEL_DIR --out EXP`: a model package to ONNX behind the export gates."""

from __future__ import annotations

from pathlib import Path


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


def add_export(sub) -> None:
    """`medfound export MODEL_DIR --out EXP`."""
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
