"""Model package → ONNX network + model card, behind the export gates: the entry point.

`export_model_package` checks the package and the export folder, picks the exporter for the
package's task (export.detection, export.segmentation; both run the shared gate of export.gate
and write the card of export.card) and removes what a failed export wrote.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from medfound.errors import MedfoundError

# INT8_FILE, MIN_CPM, output_names, FP32_RTOL, ListOutputNetwork and check_parity are imported
# from here by callers (__all__); they live beside the exporter or gate they belong to.
from medfound.export.detection import (
    INT8_FILE,
    MIN_CPM,
    export_detector_package,
    output_names,
)
from medfound.export.gate import FP32_RTOL, ListOutputNetwork, check_parity
from medfound.export.segmentation import export_segmenter_package
from medfound.outputs import (
    DiskError,
    check_output_folder,
    disk_error,
    is_disk_error,
    writable_folder,
)
from medfound.train.package import read_model_json

__all__ = [
    "FP32_RTOL",
    "MIN_CPM",
    "INT8_FILE",
    "ListOutputNetwork",
    "check_parity",
    "export_model_package",
    "output_names",
]


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
    """The body of `export_model_package` (arguments as there), into the folder it prepared:
    the one place that picks the exporter for the package's task (a segmenter package, else a
    detector's)."""
    if meta.get("task") == "nodule_segmentation":
        if int8:
            raise MedfoundError("INT8 export is implemented for the detector only",
                                hint="export the segmenter without --int8")
        return export_segmenter_package(meta, model_dir, out_dir, opset=opset, dynamic=dynamic,
                                        parity_patches=parity_patches, seed=seed, rtol=rtol,
                                        data_root=data_root)
    return export_detector_package(meta, model_dir, out_dir, opset=opset, dynamic=dynamic,
                                   parity_patches=parity_patches, seed=seed, rtol=rtol,
                                   data_root=data_root, int8=int8, calibration=calibration,
                                   calibration_patches=calibration_patches,
                                   max_cpm_drop=max_cpm_drop, min_cpm=min_cpm,
                                   allow_unvalidated=allow_unvalidated)
