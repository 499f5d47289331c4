"""Model package → ONNX network + model card, behind a parity gate.

    export_model_package(RUN/model, EXP) writes
    EXP/model.onnx        the RetinaNet *network* only: image (B, C, i, j, k) float32 in [0, 1] →
                          cls_0..cls_L (B, A*num_classes, ...), box_0..box_L (B, A*6, ...)
    EXP/model_card.json   everything `medfound.infer` needs to rebuild the detector logic in numpy
                          (anchors, box coder, box selection, sliding window, preprocessing), plus
                          metrics, versions and the sha256 of model.onnx
    EXP/MODEL_CARD.md     the same for people
    EXP/parity.json       onnxruntime against torch on random patches

Only the network is exported because MONAI's detector logic (anchors, top-k, NMS, sliding window)
is data-dependent control flow that ONNX expresses badly and that is cheap in numpy; the split
mirrors MONAI's own network/detector split. The card's detector numbers are read from the live
MONAI `RetinaNetDetector` built for the package, not re-derived from the config, so the numpy
core reproduces what torch actually does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfound import __version__
from medfound.errors import MedfoundError
from medfound.infer.engine import CARD_FORMAT, sha256_of
from medfound.models.detection import DetectorConfig, build_detector, build_network, size_divisible
from medfound.outputs import (
    DiskError,
    atomic_write,
    check_output_folder,
    disk_error,
    is_disk_error,
    writable_folder,
    write_json,
)
from medfound.train.package import load_weights, read_model_json

__all__ = [
    "FP32_RTOL",
    "MIN_CPM",
    "INT8_FILE",
    "ListOutputNetwork",
    "check_parity",
    "export_model_package",
    "output_names",
]

INPUT_NAME = "image"
FP32_RTOL = 1e-4  # the parity bound for fp32: max |onnx - torch| / max |torch| per output
_TASK_MODALITY = {"lung_nodule_detection": "CT"}
MIN_CPM = 0.5  # the validation CPM below which a detector is not deployed as validated

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


class ListOutputNetwork(nn.Module):
    """RetinaNet with a flat tuple output: (cls_0..cls_L, box_0..box_L).

    MONAI's network returns ``{"classification": [...], "box_regression": [...]}``; ONNX graphs
    have named flat outputs, so the wrapper fixes one order — the order MONAI's
    `predict_with_inferer` stitches them in (all classification levels, then all box levels).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network(image)
        return tuple(out[self.network.cls_key]) + tuple(out[self.network.box_reg_key])


class TupleOutputNetwork(nn.Module):
    """A one-tensor network (the segmenter) with the tuple output the exporter and gate expect."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.network(image),)


def as_tuple_output(network: nn.Module) -> nn.Module:
    """The exportable form of `network`: RetinaNet → ListOutputNetwork, else TupleOutputNetwork."""
    return ListOutputNetwork(network) if hasattr(network, "cls_key") else TupleOutputNetwork(network)


def output_names(num_levels: int) -> list[str]:
    """ONNX output names for a network with `num_levels` pyramid levels, in graph order."""
    return [f"cls_{n}" for n in range(num_levels)] + [f"box_{n}" for n in range(num_levels)]


def export_model_package(model_dir: str | Path, out_dir: str | Path, opset: int | None = None,
                         dynamic: bool = True, parity_patches: int = 3, seed: int = 0,
                         rtol: float = FP32_RTOL, data_root: str | Path | None = None,
                         int8: bool = False, calibration: str | Path | None = None,
                         calibration_patches: int = 16,
                         max_cpm_drop: float | None = None, min_cpm: float = MIN_CPM,
                         allow_unvalidated: bool = False) -> dict[str, Any]:
    """Export a model package's network to `out_dir`; return the model card (parity included).

    `dynamic`: batch and spatial axes of the ONNX input are symbolic (spatial sizes must stay
    multiples of the network's `size_divisible`, recorded in the card); otherwise the input is
    fixed to (1, C, *sw_roi_size), the shape the sliding window feeds.
    `opset`: ONNX opset, or None for the exporter's default.

    Raises `MedfoundError` when the package cannot be read or exported, and when onnxruntime's
    outputs differ from torch's by more than `rtol` (relative to each output's largest
    magnitude); then parity.json records the failure and no model.onnx is left in `out_dir`.

    `data_root`: the folder holding the package's validation centers; then the CPM of the
    deployed path (medfound.infer on model.onnx) must be within CPM_TOL of the torch
    detector's on those studies, else model.onnx is rejected the same way.
    `int8`: also write model.int8.onnx — static QDQ quantization of the fixed-shape network,
    calibrated on `calibration_patches` windows from `calibration` (a center folder or its
    datalist.json; default: the first training center under `data_root`) — kept only when its
    CPM is at most `max_cpm_drop` (default INT8_MAX_CPM_DROP) below fp32's; needs `data_root`.
    A rejected INT8 model is renamed model.int8.onnx.rejected and MedfoundError is raised after
    parity.json and the card are written (the fp32 model stays valid).

    Only a validated detector is deployed as one: its validation CPM — measured through the
    deployed path on `data_root`'s validation studies when given, else the training run's
    figure from the package — must be at least `min_cpm`, or the export is rejected (like a
    failed gate) unless `allow_unvalidated`; then the card's ``validation.status`` is "not
    validated", which `medfound infer` repeats on every run, in findings.json and in the SR.

    `out_dir` must be new or empty (an export never replaces files). Any other failure — a full
    or read-only disk, an exporter error — removes everything the export wrote, so no folder
    with a model.onnx but no card is ever left; a failed gate leaves only its evidence
    (parity.json, model.onnx.rejected), never a model_card.json.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    meta = read_model_json(model_dir)  # before anything is written: a bad package leaves nothing
    check_output_folder(out_dir, [model_dir])
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise MedfoundError("the export folder is not empty", path=out_dir,
                            hint="choose a new --out folder (an export never replaces files)")
    created = not out_dir.exists()
    writable_folder(out_dir, "export folder")
    try:
        return _export(meta, model_dir, out_dir, opset=opset, dynamic=dynamic,
                       parity_patches=parity_patches, seed=seed, rtol=rtol, data_root=data_root,
                       int8=int8, calibration=calibration, calibration_patches=calibration_patches,
                       max_cpm_drop=max_cpm_drop, min_cpm=min_cpm,
                       allow_unvalidated=allow_unvalidated)
    except MedfoundError as err:
        if isinstance(err, DiskError) or not (out_dir / "parity.json").is_file():
            _remove_export(out_dir, created)
        raise
    except BaseException as err:
        _remove_export(out_dir, created)
        if is_disk_error(err):
            raise disk_error(err, out_dir) from err
        raise


def _remove_export(out_dir: Path, created: bool) -> None:
    """Remove what a failed export wrote: `out_dir` was empty or absent when it began."""
    for entry in out_dir.iterdir() if out_dir.is_dir() else ():
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            out_dir.rmdir()


def _export(meta: dict[str, Any], model_dir: Path, out_dir: Path, *, opset: int | None,
            dynamic: bool, parity_patches: int, seed: int, rtol: float,
            data_root: str | Path | None, int8: bool, calibration: str | Path | None,
            calibration_patches: int, max_cpm_drop: float | None, min_cpm: float,
            allow_unvalidated: bool) -> dict[str, Any]:
    """The body of `export_model_package` (arguments as there), into the folder it prepared."""
    if meta.get("task") == "nodule_segmentation":
        from medfound.export.segmentation import export_segmenter_package

        if int8:
            raise MedfoundError("INT8 export is implemented for the detector only",
                                hint="export the segmenter without --int8")
        return export_segmenter_package(meta, model_dir, out_dir, opset=opset, dynamic=dynamic,
                                        parity_patches=parity_patches, seed=seed, rtol=rtol,
                                        data_root=data_root)
    try:
        cfg = DetectorConfig.from_dict(meta["model"])
    except KeyError:
        raise MedfoundError("model.json has no 'model' section", path=model_dir / "model.json",
                            hint="re-train: the package was not written by medfound") from None
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


INT8_FILE = "model.int8.onnx"


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data, allow_nan=True)


def export_and_gate(network: nn.Module, cfg: Any, divisible: Sequence[int], out_dir: Path, names: list[str], *,
                    opset: int | None, dynamic: bool, parity_patches: int, seed: int, rtol: float
                    ) -> tuple[Path, dict[str, Any]]:
    """Export `network` (config `cfg`: n_input_channels, sw_roi_size, patch_size) to a staged
    file in `out_dir` — after removing an older model.onnx, staged or rejected file — and run
    the random-patch parity gate (parity.json). Returns (staged file, parity report); the caller
    renames the staged file to model.onnx. A failed gate leaves it as model.onnx.rejected."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / ".model.onnx.staged"
    for stale in (out_dir / "model.onnx", staged, out_dir / "model.onnx.rejected"):
        stale.unlink(missing_ok=True)
    _export_network(network, cfg.n_input_channels, cfg.sw_roi_size, divisible, staged, names,
                    opset=opset, dynamic=dynamic)
    try:
        parity = check_parity(network, staged, _parity_shapes(cfg, dynamic), out_dir / "parity.json",
                              patches=parity_patches, seed=seed, rtol=rtol)
    except MedfoundError:
        # Keep the rejected file for inspection, under a name nothing will load by mistake.
        staged.replace(out_dir / "model.onnx.rejected")
        raise
    return staged, parity


def record_quality_gate(out_dir: Path, parity: dict[str, Any], card: dict[str, Any], key: str,
                        quality: dict[str, Any], failure: str, hint: str) -> None:
    """Record a quality gate's result (`quality`, with "passed") under `key` in parity.json and
    the model card; on failure reject the export and raise `failure`, else rewrite the card."""
    parity[key] = card["parity"][key] = quality
    _write_json(out_dir / "parity.json", parity)
    if not quality["passed"]:
        reject(out_dir)
        raise MedfoundError(failure, path=out_dir / "parity.json", hint=hint)
    write_card(out_dir, card)


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


def reject(out_dir: Path) -> None:
    """A model.onnx that failed a quality gate becomes model.onnx.rejected, without its card."""
    (out_dir / "model.onnx").replace(out_dir / "model.onnx.rejected")
    (out_dir / "model_card.json").unlink(missing_ok=True)


def write_card(out_dir: Path, card: dict[str, Any]) -> None:
    """model_card.json and MODEL_CARD.md in `out_dir`."""
    atomic_write(out_dir / "MODEL_CARD.md", card_markdown(card))
    _write_json(out_dir / "model_card.json", card)  # last: a card means the export is whole


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


def check_parity(network: nn.Module, onnx_path: str | Path, shapes: Sequence[Sequence[int]],
                 out_json: str | Path | None = None, patches: int = 3, seed: int = 0,
                 rtol: float = FP32_RTOL) -> dict[str, Any]:
    """Run torch and onnxruntime (CPU) on the same random [0, 1] patches and compare outputs.

    For each output: max abs error and relative error = max |onnx - torch| / max |torch| (an
    element-wise ratio would explode on logits near zero; scaling by the output's range is what
    a score or box offset can tolerate). Writes the report to `out_json` when given and raises
    `MedfoundError` when any relative error exceeds `rtol` or an output is not finite.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    wrapper = as_tuple_output(network).eval()
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for a broken graph
        raise MedfoundError(f"onnxruntime cannot load the exported graph ({err})", path=onnx_path,
                            hint="re-export; try another --opset") from None
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    worst: dict[str, dict[str, float]] = {n: {"max_abs": 0.0, "max_rel": 0.0} for n in names}
    runs = []
    for shape in shapes:
        for _ in range(patches):
            x = rng.random(tuple(shape), dtype=np.float32)
            with torch.no_grad():
                ref = [t.numpy() for t in wrapper(torch.from_numpy(x))]
            got = session.run(names, {session.get_inputs()[0].name: x})
            for name, a, b in zip(names, got, ref, strict=True):
                if a.shape != b.shape:
                    raise MedfoundError(f"ONNX output {name} has shape {a.shape}, torch {b.shape}",
                                        path=onnx_path, hint="re-export the package")
                abs_err = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
                scale = float(np.max(np.abs(b))) if b.size else 0.0
                rel_err = abs_err / max(scale, np.finfo(np.float32).tiny)
                if not (np.isfinite(a).all() and np.isfinite(abs_err)):
                    abs_err = rel_err = math.inf
                worst[name]["max_abs"] = max(worst[name]["max_abs"], abs_err)
                worst[name]["max_rel"] = max(worst[name]["max_rel"], rel_err)
        runs.append({"shape": list(shape), "patches": patches})
    max_abs = max(w["max_abs"] for w in worst.values())
    max_rel = max(w["max_rel"] for w in worst.values())
    report = {
        "passed": bool(max_rel <= rtol),
        "precision": "fp32",
        "rtol": rtol,
        "relative_error": "max |onnx - torch| / max |torch|, per output",
        "max_abs": max_abs,
        "max_rel": max_rel,
        "inputs": {"kind": "random uniform [0, 1]", "seed": seed, "runs": runs},
        "outputs": worst,
        "provider": "CPUExecutionProvider",
        "onnx_sha256": sha256_of(onnx_path),
    }
    if out_json is not None:
        _write_json(Path(out_json), report)
    if not report["passed"]:
        bad = max(worst, key=lambda n: worst[n]["max_rel"])
        raise MedfoundError(
            f"ONNX parity failed: output {bad} differs from torch by {worst[bad]['max_rel']:.3g} "
            f"relative (max abs {worst[bad]['max_abs']:.3g}), bound {rtol:g}",
            path=onnx_path.parent / "parity.json" if out_json is not None else onnx_path,
            hint="do not deploy this file; re-export (another --opset) or report the exporter bug")
    return report


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's per-op chatter (e.g. 'torchvision is not installed') for one export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export",
                                               "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_network(network: nn.Module, channels: int, example_size: Sequence[int], div: Sequence[int],
                    path: Path, names: list[str], *, opset: int | None, dynamic: bool) -> None:
    """torch.onnx.export (dynamo) of `network` as a tuple-output graph; the example input is
    (1, channels, *example_size); `dynamic`: batch and spatial axes symbolic, spatial sizes
    multiples of `div`."""
    wrapper = as_tuple_output(network).eval()
    example = torch.rand(1, channels, *example_size, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = None
    if dynamic:
        # Spatial sizes are symbolic multiples of size_divisible, which is what lets the exporter
        # prove the strided convolutions and the upsampling line up for every size.
        axes = {0: torch.export.Dim("batch", min=1, max=1024)}
        for n, (axis, d) in enumerate(zip("ijk", div, strict=True)):
            axes[2 + n] = d * torch.export.Dim(f"blocks_{axis}", min=1, max=max(2, 8192 // d))
        dynamic_shapes = {"image": axes}
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(wrapper, (example,), str(path), dynamo=True, input_names=[INPUT_NAME],
                              output_names=names, opset_version=opset, dynamic_shapes=dynamic_shapes,
                              external_data=False, optimize=True, verbose=False)
    except Exception as err:
        if is_disk_error(err):
            needed = sum(p.numel() * p.element_size() for p in network.parameters())
            raise disk_error(err, path.parent, needed=needed) from err
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MedfoundError(f"torch.onnx.export failed ({type(err).__name__}: {first})", path=path.parent,
                            hint="try dynamic=False (medfound export --fixed-shape) or another --opset") from err
    if not path.is_file():
        raise MedfoundError("torch.onnx.export wrote no file", path=path)


def _parity_shapes(cfg: DetectorConfig, dynamic: bool) -> list[list[int]]:
    """Input shapes the gate checks: the sliding-window roi (what inference feeds) and, for a
    dynamic graph, the training patch and a batch of two as well."""
    c = cfg.n_input_channels
    shapes = [[1, c, *cfg.sw_roi_size]]
    if dynamic:
        shapes += [[1, c, *cfg.patch_size], [2, c, *cfg.sw_roi_size]]
    unique: list[list[int]] = []
    for s in shapes:
        if s not in unique:
            unique.append(s)
    return unique


def _versions(meta: dict[str, Any]) -> dict[str, Any]:
    import monai
    import onnx
    import onnxruntime
    import onnxscript

    return {"medfound": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "trained_with": meta.get("versions", {})}


def card_common(meta: dict[str, Any], cfg: Any, onnx_path: Path, names: list[str], dynamic: bool,
                parity: dict[str, Any], divisible: Sequence[int], outputs: str) -> dict[str, Any]:
    """The model card's sections every task shares: input, onnx, metrics, training, parity,
    versions. `cfg`: the network config (n_input_channels, spacing_mm, hu_window, patch_size)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)

    def dims(value_info: Any) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    preprocessing = dict(meta.get("preprocessing", {}))
    provenance = meta.get("provenance", {})
    return {
        "format": CARD_FORMAT,
        "task": meta.get("task"),
        "input": {
            "modality": preprocessing.get("modality", _TASK_MODALITY.get(meta.get("task"), "unknown")),
            "spacing_mm": list(preprocessing.get("spacing_mm", cfg.spacing_mm)),
            "hu_window": list(preprocessing.get("hu_window", cfg.hu_window)),
            "orientation": preprocessing.get("orientation", "LPS"),
            "intensity": preprocessing.get("intensity", "clip to hu_window, scale to [0, 1]"),
            "axes": "(batch, channel, i, j, k); i, j, k = column, row, slice at spacing_mm",
            "patch_size": list(cfg.patch_size),
            "channels": cfg.n_input_channels,
        },
        "onnx": {
            "file": onnx_path.name,
            "sha256": parity["onnx_sha256"],  # hashed by the gate; the file was only renamed
            "opset": opset,
            "input_name": graph.graph.input[0].name,
            "input_shape": dims(graph.graph.input[0]),
            "dynamic": dynamic,
            "size_divisible": list(divisible),
            "output_names": names,
            "output_shapes": {o.name: dims(o) for o in graph.graph.output},
            "outputs": outputs,
        },
        "metrics": meta.get("metrics", {}),
        "training": {k: provenance[k] for k in ("federated", "strategy", "rounds", "train_centers",
                                               "val_centers", "val_split", "train_cases",
                                               "val_cases", "seed", "init_encoder", "freeze_encoder")
                     if k in provenance},
        "parity": {k: parity[k] for k in ("passed", "precision", "rtol", "max_abs", "max_rel")},
        "versions": _versions(meta),
    }


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


def _quality_lines(card: dict[str, Any]) -> list[str]:
    lines = []
    q = card["parity"].get("cpm")
    if q:
        lines.append(f"- CPM on {q['n_scans']} validation scans: torch {q['cpm_torch']:.4f}, deployed "
                     f"ONNX path {q['cpm_onnx']:.4f} (bound |diff| ≤ {q['tolerance']})")
    q = card["parity"].get("dice")
    if q:
        lines.append(f"- Dice on {q['n_studies']} validation studies: torch {q['dice_torch']:.4f}, deployed "
                     f"path {q['dice_onnx']:.4f} (bound |diff| ≤ {q['tolerance']}); labels agree on "
                     f"{100 * q['label_agreement']:.4f}% of voxels")
    for v in card.get("variants") or []:
        if "cpm" not in v:
            lines.append(f"- variant {v['engine']} {v['precision']}: FAILED — {v['reason']}")
            continue
        a = v["agreement"]
        lines.append(f"- variant {v['engine']} {v['precision']} ({v['file']}): CPM {v['cpm']:.4f}, "
                     f"ΔCPM {v['delta']:+.4f} vs torch fp32 (bound {v['max_cpm_diff']}): "
                     f"{'passed' if v['passed'] else 'FAILED, never used'}; nodules hit "
                     f"{a['n_hit']} vs {a['n_hit_torch']} (same: {a['same_nodules_hit']}), "
                     f"probabilities within {a['max_probability_diff']:.3g}; "
                     f"{v['seconds_per_window']:.3g} s per window on {v['cpu']['cpu']}")
    d = card.get("int8")
    if d and "accepted" in d:
        lines.append(f"- INT8 ({d['file']}): CPM {d['cpm_int8']:.4f}, drop {d['cpm_drop']:.4f} "
                     f"(bound {d['max_cpm_drop']}): {'accepted' if d['accepted'] else 'REJECTED'}")
    return lines


def _task_lines(card: dict[str, Any]) -> list[str]:
    """The card's task-specific part: the detector's numpy logic, or the segmenter's labels."""
    metrics = card.get("metrics") or {}
    if "segmentation" in card:
        seg = card["segmentation"]
        return ["## Segmentation (medfound.infer.segment, numpy)",
                f"- argmax of the logits; labels {seg['labels']}", "",
                "## Evaluation",
                f"- Dice (nodule, mean over validation studies with nodules): {metrics.get('dice', 'not recorded')}"]
    det = card["detector"]
    cpm = metrics.get("cpm")
    return ["## Detector logic (medfound.infer, numpy)",
            f"- anchors: base shapes {det['base_anchor_shapes']} × scales {det['feature_map_scales']}",
            f"- box coder weights {det['box_coder_weights']}, clip {det['box_xform_clip']:.4f}",
            f"- per level: score > {det['score_thresh']}, top {det['topk_candidates_per_level']}; "
            f"NMS IoU {det['nms_thresh']}; at most {det['detections_per_img']} detections", "",
            "## Evaluation",
            f"- CPM: {cpm if cpm is not None else 'not recorded'}",
            *[f"- FROC {k} FP/scan: {v}" for k, v in (metrics.get("froc") or {}).items()]]


def _use_lines(card: dict[str, Any]) -> list[str]:
    """Intended use, limitations and the validation set with its CPM, at the top of the card."""
    v = card.get("validation")
    if not v:
        return []
    ci = v.get("cpm_ci95")
    cpm = "not recorded" if v.get("cpm") is None else (
        f"{v['cpm']:.3f}" + (f" (95% CI {ci[0]:.2f}–{ci[1]:.2f})" if ci else ""))
    points = ", ".join(f"{k} FP/scan: {float(x):.2f}" for k, x in (v.get("froc") or {}).items())
    if "cpm" not in v:  # a task gated by another figure (the segmenter's Dice)
        return ["## Validation", f"- status: **{v['status']}** — {v['reason']}",
                f"- centers {v.get('centers') or 'none'}", ""]
    return ["## Intended use", card.get("intended_use", ""), "",
            "## Limitations", *[f"- {x}" for x in card.get("limitations", [])], "",
            "## Validation", f"- status: **{v['status']}** — {v['reason']}",
            f"- set: centers {v['centers'] or 'none'} ({v.get('split') or 'n/a'} split), "
            f"{v.get('n_scans')} scans, {v.get('n_nodules')} nodules; {v['source']}",
            f"- CPM: {cpm}",
            *([f"- sensitivity at {points}"] if points else []),
            *(["- the checkpoint was chosen on these validation centers: the figure is optimistic"]
              if v.get("checkpoint_selected_on_validation") else []), ""]


def card_markdown(card: dict[str, Any]) -> str:
    """MODEL_CARD.md: the model card for people (any task)."""
    inp, onx = card["input"], card["onnx"]
    sw = card.get("detector") or card["segmentation"]  # both carry the sliding window
    lines = [
        f"# Model card — {card['task']}",
        "",
        *_use_lines(card),
        "## Input",
        f"- modality: {inp['modality']}",
        f"- spacing: {inp['spacing_mm']} mm (i, j, k), orientation {inp['orientation']}",
        f"- intensity: HU window {inp['hu_window']} — {inp['intensity']}",
        f"- training patch: {inp['patch_size']} voxels; sliding window {sw['sw_roi_size']} "
        f"(overlap {sw['sw_overlap']}, {sw['sw_mode']} blending)",
        "",
        "## Network (model.onnx)",
        f"- input `{onx['input_name']}` {onx['input_shape']} float32; spatial sizes multiples of "
        f"{onx['size_divisible']}",
        f"- outputs {', '.join(f'`{n}`' for n in onx['output_names'])}",
        f"- opset {onx['opset']}, sha256 `{onx['sha256']}`",
        "",
        *_task_lines(card),
        "",
        "## Training data",
        *([f"- {k}: {v}" for k, v in card["training"].items()] or ["- not recorded"]),
        "",
        "## Parity (onnxruntime vs torch, fp32)",
        f"- passed: {card['parity']['passed']} — max relative error {card['parity']['max_rel']:.3g} "
        f"(bound {card['parity']['rtol']:g}), max abs {card['parity']['max_abs']:.3g}",
        *_quality_lines(card),
        "",
        "## Versions",
        *[f"- {k}: {v}" for k, v in card["versions"].items() if k != "trained_with"],
        "",
    ]
    return "\n".join(lines)
