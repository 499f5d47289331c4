"""Export of a detector package (task ``lung_nodule_detection``): the shared gate
(export.gate), then the detector's own: CPM of the deployed path against torch on the
package's validation studies, the validation bar (`MIN_CPM`), optional INT8 and every engine ×
precision variant this machine runs.

    EXP/model.onnx        the RetinaNet *network* only: image (B, C, i, j, k) float32 in [0, 1] →
                          cls_0..cls_L (B, A*num_classes, ...), box_0..box_L (B, A*6, ...)
    EXP/model_card.json   everything `medfound.infer` needs to rebuild the detector logic in numpy
                          (anchors, box coder, box selection, sliding window, preprocessing), plus
                          metrics, versions and the sha256 of model.onnx
    EXP/MODEL_CARD.md     the same for people
    EXP/parity.json       onnxruntime against torch on random patches (and CPM with a data root)

Only the network is exported because MONAI's detector logic (anchors, top-k, NMS, sliding window)
is data-dependent control flow that ONNX expresses badly and that is cheap in numpy; the split
mirrors MONAI's own network/detector split. The card's detector numbers are read from the live
MONAI `RetinaNetDetector` built for the package, not re-derived from the config, so the numpy
core reproduces what torch actually does.

`medfound.export.onnx.export_model_package` dispatches here on the package's task.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from medfound.errors import MedfoundError
from medfound.export.card import _write_json, card_common, write_card
from medfound.export.gate import (
    INPUT_NAME,
    _export_network,
    export_and_gate,
    network_config,
    record_quality_gate,
    reject,
)
from medfound.infer.engine import sha256_of
from medfound.models.detection import DetectorConfig, build_detector, build_network, size_divisible
from medfound.train.package import load_weights

MIN_CPM = 0.5  # the validation CPM below which a detector is not deployed as validated
INT8_FILE = "model.int8.onnx"  # the INT8 variant, kept only when its CPM gate accepts it

INTENDED_USE = ("Research use: candidate lung nodules on chest CT, for a reader to review. Not a "
                "diagnosis; not cleared as a medical device. A study without findings is not "
                "evidence that it has no nodule.")
LIMITATIONS = [
    "Validated only on the centers, scans and nodules listed under validation; scanners, "
    "protocols and populations unlike them may score lower.",
    "The validation CPM's 95% interval reflects the number of validation nodules; with few "
    "nodules it is wide.",
    "When the validation centers also chose the checkpoint, the figure is optimistic.",
]


def output_names(num_levels: int) -> list[str]:
    """ONNX output names for a network with `num_levels` pyramid levels, in graph order."""
    return [f"cls_{n}" for n in range(num_levels)] + [f"box_{n}" for n in range(num_levels)]


def export_detector_package(meta: dict[str, Any], model_dir: Path, out_dir: Path, *, opset: int | None,
                            dynamic: bool, parity_patches: int, seed: int, rtol: float,
                            data_root: str | Path | None, int8: bool, calibration: str | Path | None,
                            calibration_patches: int, max_cpm_drop: float | None, min_cpm: float,
                            allow_unvalidated: bool) -> dict[str, Any]:
    """Export, gate and card a detector package (arguments as `export_model_package`)."""
    cfg = network_config(meta, model_dir, DetectorConfig)
    network = load_weights(model_dir, build_network(cfg)).eval()
    detector = build_detector(cfg, network).eval()
    num_levels = len(cfg.returned_layers) + 1
    names = output_names(num_levels)

    onnx_path = out_dir / "model.onnx"
    staged, parity = export_and_gate(network, cfg, size_divisible(cfg), out_dir, names, opset=opset,
                                     dynamic=dynamic, parity_patches=parity_patches, seed=seed, rtol=rtol)
    if int8 and data_root is None:
        staged.unlink(missing_ok=True)
        raise MedfoundError("INT8 is accepted only on a measured CPM drop", hint=
                            "pass --data ROOT (the folder holding the model's validation centers)")
    staged.replace(onnx_path)
    for stale in (out_dir / INT8_FILE, out_dir / (INT8_FILE + ".rejected")):
        stale.unlink(missing_ok=True)

    card = _model_card(meta, cfg, detector, onnx_path, names, dynamic, parity)
    if data_root is None:
        _validate(out_dir, parity, card, detection_validation(meta, None, min_cpm), allow_unvalidated)
        return card
    from medfound.export.quality import CPM_TOL, INT8_MAX_CPM_DROP, validation_items

    write_card(out_dir, card)
    items = validation_items(meta, data_root)
    quality, torch_rows, onnx_rows = _cpm_parity(meta, cfg, detector, out_dir, items)
    record_quality_gate(out_dir, parity, card, "cpm", quality,
                        f"CPM parity failed: onnx {quality['cpm_onnx']:.4f} vs torch "
                        f"{quality['cpm_torch']:.4f} (bound {CPM_TOL})",
                        hint="do not deploy; compare preprocessing and the card's detector settings")
    _validate(out_dir, parity, card, detection_validation(meta, quality, min_cpm), allow_unvalidated)
    measured = {("onnxruntime", "fp32"): onnx_rows}
    decision = None
    if int8:
        from medfound.export.quantize import calibration_items

        first_train = (meta.get("provenance", {}).get("train_centers") or [None])[0]
        if calibration is None and first_train is None:
            raise MedfoundError("no calibration data", hint="pass --calibration CENTER_DIR")
        cal = calibration_items(calibration if calibration is not None
                                else Path(data_root) / str(first_train))
        decision, measured["onnxruntime", "int8"] = _int8(
            network, cfg, out_dir, card, items, cal, calibration_patches, opset, seed,
            INT8_MAX_CPM_DROP if max_cpm_drop is None else max_cpm_drop, quality["cpm_onnx"])
        parity["int8"] = decision
        card["int8"] = decision
    card["variants"] = parity["variants"] = _variants(out_dir, card, items, torch_rows,
                                                      quality["cpm_torch"], measured)
    _write_json(out_dir / "parity.json", parity)
    write_card(out_dir, card)
    if decision is not None and not decision["accepted"]:
        raise MedfoundError(
            f"INT8 rejected: CPM {decision['cpm_int8']:.4f} is {decision['cpm_drop']:.4f} below "
            f"fp32's {decision['cpm_fp32']:.4f} (allowed {decision['max_cpm_drop']})",
            path=out_dir / "parity.json", hint="deploy the fp32 model.onnx (it passed parity)")
    return card


def _model_card(meta: dict[str, Any], cfg: DetectorConfig, detector: Any, onnx_path: Path,
                names: list[str], dynamic: bool, parity: dict[str, Any]) -> dict[str, Any]:
    num_levels = len(cfg.returned_layers) + 1
    selector, inferer, anchors = detector.box_selector, detector.inferer, detector.anchor_generator
    card = card_common(meta, cfg, onnx_path, names, dynamic, parity, size_divisible(cfg),
                       "cls_l: (B, A*num_classes, i_l, j_l, k_l) logits, box_l: (B, A*6, i_l, j_l, "
                       "k_l) box offsets; level 0 is the finest, level l is 2**l times coarser")
    card["detector"] = {
        "num_classes": cfg.num_classes,
        "num_levels": num_levels,
        "num_anchors_per_location": len(cfg.base_anchor_shapes),
        "base_anchor_shapes": [list(map(float, s)) for s in cfg.base_anchor_shapes],
        "feature_map_scales": [2**level for level in range(num_levels)],
        "cell_anchors": [c.tolist() for c in anchors.cell_anchors],
        "anchor_indexing": anchors.indexing,
        "box_mode": "xyzxyz (i0, j0, k0, i1, j1, k1), voxels of the network input",
        "box_coder_weights": [float(w) for w in detector.box_coder.weights],
        "box_xform_clip": float(detector.box_coder.boxes_xform_clip),
        "apply_sigmoid": bool(selector.apply_sigmoid),
        "score_thresh": float(selector.score_thresh),
        "topk_candidates_per_level": int(selector.topk_candidates_per_level),
        "nms_thresh": float(selector.nms_thresh),
        "detections_per_img": int(selector.detections_per_img),
        "size_divisible": list(size_divisible(cfg)),
        "sw_roi_size": [int(s) for s in inferer.roi_size],
        "sw_overlap": float(inferer.overlap),
        "sw_mode": str(getattr(inferer.mode, "value", inferer.mode)),
        "sw_sigma_scale": float(inferer.sigma_scale),
        "sw_batch_size": int(inferer.sw_batch_size),
        "sw_padding_value": float(inferer.cval),
    }
    return card


def detection_validation(meta: dict[str, Any], quality: dict[str, Any] | None,
                         min_cpm: float) -> dict[str, Any]:
    """The card's ``validation`` section of a detector: the validation set, CPM with its 95%
    interval and operating points, and whether CPM reaches `min_cpm` ("validated")."""
    prov = meta.get("provenance", {})
    if quality is not None:
        m = quality.get("deployed_metrics") or {}
        source = "measured at export through the deployed path (medfound.infer) on --data"
        cpm = quality.get("cpm_onnx")
    else:
        m = meta.get("metrics") or {}
        source = "the training run's final validation (model package metrics)"
        cpm = m.get("cpm")
    record: dict[str, Any] = {
        "source": source, "min_cpm": float(min_cpm),
        "centers": list(prov.get("val_centers") or []), "split": prov.get("val_split"),
        "n_scans": m.get("n_scans"), "n_nodules": m.get("n_nodules"),
        "cpm": None if cpm is None else float(cpm), "cpm_ci95": m.get("cpm_ci95"),
        "froc": m.get("froc"),
        "checkpoint_selected_on_validation": bool(prov.get("val_centers")),
    }
    if cpm is None or not math.isfinite(float(cpm)):
        record.update(status="not validated", reason="no validation CPM recorded")
    elif float(cpm) < min_cpm:
        record.update(status="not validated",
                      reason=f"validation CPM {float(cpm):.3f} is below min_cpm {min_cpm:g}")
    else:
        record.update(status="validated", reason=f"validation CPM {float(cpm):.3f} ≥ min_cpm {min_cpm:g}")
    return record


def _validate(out_dir: Path, parity: dict[str, Any], card: dict[str, Any],
              validation: dict[str, Any], allow: bool) -> None:
    """Record `validation` in the card; reject an export that is not validated unless `allow`."""
    card["intended_use"] = INTENDED_USE
    card["limitations"] = LIMITATIONS
    card["validation"] = validation
    write_card(out_dir, card)
    if validation["status"] == "validated" or allow:
        return
    parity["validation"] = validation
    _write_json(out_dir / "parity.json", parity)
    reject(out_dir)
    raise MedfoundError(f"not exported as validated: {validation['reason']}", path=out_dir,
                        hint="train a better model, export with --data ROOT to measure it, or pass "
                             "--allow-unvalidated (the card and every finding then say so)")


def _cpm_parity(meta: dict[str, Any], cfg: DetectorConfig, detector: Any, out_dir: Path,
                items: list[dict[str, Any]]
                ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """CPM of the torch detector (MONAI transforms) and of the deployed path (medfound.infer):
    (the gate's record, torch's prediction rows, the deployed path's)."""
    from medfound.data.detection import eval_transforms
    from medfound.export.quality import CPM_TOL, onnx_predictions
    from medfound.infer.engine import OnnxDetector
    from medfound.metrics.froc import evaluate_luna16
    from medfound.train.detection import annotations_of, evaluate

    transform = eval_transforms({**cfg.to_dict(), **meta.get("preprocessing", {})})
    torch_metrics, torch_rows = evaluate(detector, items, transform, n_bootstraps=1)
    rows = onnx_predictions(OnnxDetector(out_dir, providers="cpu"), items)
    onnx_metrics = evaluate_luna16(rows, annotations_of(items), [it["seriesuid"] for it in items],
                                   n_bootstraps=1000)
    diff = abs(float(onnx_metrics["cpm"]) - float(torch_metrics["cpm"]))
    deployed = {k: onnx_metrics[k] for k in ("cpm", "cpm_ci95", "froc", "n_scans", "n_nodules")
                if k in onnx_metrics}
    return ({"passed": bool(diff <= CPM_TOL), "cpm_torch": float(torch_metrics["cpm"]),
             "cpm_onnx": float(onnx_metrics["cpm"]), "cpm_abs_diff": diff, "tolerance": CPM_TOL,
             "n_scans": len(items), "n_nodules": int(onnx_metrics["n_nodules"]),
             "deployed_metrics": deployed, "studies": [it["seriesuid"] for it in items]},
            torch_rows, rows)


def _int8(network: nn.Module, cfg: DetectorConfig, out_dir: Path, card: dict[str, Any],
          items: list[dict[str, Any]], cal_items: list[dict[str, Any]], n_patches: int,
          opset: int | None, seed: int, max_drop: float, cpm_fp32: float
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Quantize a fixed-shape export, measure its CPM through medfound.infer, keep or reject it:
    (the decision, the INT8 model's prediction rows)."""
    from medfound.export.quality import int8_decision, onnx_predictions
    from medfound.export.quantize import calibration_patches, quantize_int8
    from medfound.infer.engine import OnnxDetector
    from medfound.metrics.froc import evaluate_luna16
    from medfound.train.detection import annotations_of

    fixed = out_dir / ".model.fixed.onnx"
    int8_path = out_dir / INT8_FILE
    try:
        _export_network(network, cfg.n_input_channels, cfg.sw_roi_size, size_divisible(cfg), fixed,
                        card["onnx"]["output_names"], opset=opset, dynamic=False)
        patches = calibration_patches(cal_items, card, n=n_patches, seed=seed)
        quantize_int8(fixed, int8_path, patches, input_name=INPUT_NAME)
    finally:
        fixed.unlink(missing_ok=True)
    import onnx

    graph = onnx.load(str(int8_path), load_external_data=False)
    card["int8"] = {"file": INT8_FILE, "sha256": sha256_of(int8_path),
                    "input_shape": [d.dim_param or d.dim_value
                                    for d in graph.graph.input[0].type.tensor_type.shape.dim]}
    write_card(out_dir, card)
    rows = onnx_predictions(OnnxDetector(out_dir, providers="cpu", precision="int8",
                                         check_gate=False), items)
    metrics = evaluate_luna16(rows, annotations_of(items), [it["seriesuid"] for it in items],
                              n_bootstraps=1)
    decision = {**card["int8"], **int8_decision(cpm_fp32, metrics["cpm"], max_drop),
                "calibration": {"studies": len(cal_items), "patches": len(patches),
                                "center": cal_items[0].get("center"), "method": "MinMax",
                                "format": "QDQ, per-channel int8 weights, uint8 activations"}}
    if not decision["accepted"]:
        int8_path.replace(out_dir / (INT8_FILE + ".rejected"))
    return decision, rows


def _variants(out_dir: Path, card: dict[str, Any], items: list[dict[str, Any]],
              torch_rows: list[dict[str, Any]], cpm_torch: float,
              measured: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every engine × precision this machine can run, measured through the deployed path on the
    validation `items` against torch fp32 (`torch_rows`, CPM `cpm_torch`): its CPM and ΔCPM
    (passed: |ΔCPM| ≤ VARIANT_MAX_CPM_DIFF), finding-level agreement, seconds per window on
    this machine and its CPU. `measured`: prediction rows already made (onnxruntime fp32 by the
    CPM gate, INT8 by its gate). bf16 is measured only on a CPU with bf16 arithmetic; INT8
    only when model.int8.onnx passed its own gate (a rejected one is recorded as failed)."""
    import os

    from medfound.export.quality import (
        finding_agreement,
        onnx_predictions,
        seconds_per_window,
        variant_decision,
    )
    from medfound.infer.engine import PRECISIONS, OnnxDetector, available_engines, cpu_capabilities
    from medfound.metrics.froc import evaluate_luna16
    from medfound.train.detection import annotations_of

    caps = cpu_capabilities()
    int8 = card.get("int8") or {}
    records = []
    for engine in available_engines():
        for precision in PRECISIONS:
            if precision == "bf16" and (engine != "openvino" or not caps["bf16"]):
                continue
            if precision == "int8" and not int8:
                continue
            file = int8.get("file") if precision == "int8" else card["onnx"]["file"]
            record: dict[str, Any] = {"engine": engine, "precision": precision, "file": file}
            if precision == "int8" and not int8.get("accepted"):
                records.append({**record, "passed": False, "reason": f"{file} failed the INT8 "
                                f"CPM gate (drop {int8.get('cpm_drop')} > {int8.get('max_cpm_drop')})"})
                continue
            detector = OnnxDetector(out_dir, providers="cpu" if engine == "onnxruntime" else None,
                                    engine=engine, precision=precision, check_gate=False)
            rows = measured.get((engine, precision))
            if rows is None:
                rows = onnx_predictions(detector, items)
            cpm = evaluate_luna16(rows, annotations_of(items), [it["seriesuid"] for it in items],
                                  n_bootstraps=1)["cpm"]
            records.append({**record, **variant_decision(cpm_torch, cpm),
                            "agreement": finding_agreement(torch_rows, rows, items),
                            "seconds_per_window": round(seconds_per_window(detector), 5),
                            "threads": os.cpu_count(), "device": detector.engine.device,
                            "cpu": caps})
    return records
