"""INT8: static QDQ quantization with per-channel weights, calibrated on a center's own studies.

    calibration_patches(DATALIST, card)   windows of the network's fixed input shape cut from the
                                          center's training studies, preprocessed exactly as
                                          inference does (half of them centred on nodules)
    quantize_int8(fp32.onnx, int8.onnx, patches)
                                          onnxruntime's quantize_static: QDQ format, int8
                                          weights per output channel in 7 bits, uint8
                                          activations, MinMax ranges from the patches

Weights use 7 of their 8 bits (`reduce_range`): on x86 CPUs without VNNI (AVX2 only, as many
virtual machines report) onnxruntime's u8×s8 kernel adds pairs of products in int16 and
saturates with full-range weights; the same package is then as accurate on every CPU it is
deployed to, at a cost of one bit of weight resolution.

Whether the INT8 model is used is decided on CPM (export.quality.int8_decision), not here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfound.errors import MedfoundError

__all__ = ["calibration_items", "calibration_patches", "quantize_int8"]


def calibration_items(datalist: str | Path) -> list[dict[str, Any]]:
    """Training items of one center, from its folder or its datalist.json."""
    from medfound.data.detection import DATALIST, load_datalist

    path = Path(datalist)
    center = path if path.is_dir() else path.parent
    if not (center / DATALIST).is_file():
        raise MedfoundError(f"no {DATALIST} here", path=path,
                            hint="pass a center folder or its datalist.json (--calibration)")
    try:
        return load_datalist(center.parent, [center.name], "training")
    except MedfoundError:
        return load_datalist(center.parent, [center.name], "all")


def calibration_patches(items: Sequence[dict[str, Any]], card: dict[str, Any], n: int = 16,
                        seed: int = 0) -> list[np.ndarray]:
    """`n` windows (1, C, *sw_roi_size) of preprocessed studies: every other one centred on a
    nodule when the study has one, the rest anywhere. Studies are used round-robin."""
    from medfound.infer.preprocess import preprocess
    from medfound.io.reader import read_volume

    if not items:
        raise MedfoundError("no calibration studies", hint="the calibration datalist is empty")
    roi = [int(s) for s in card["detector"]["sw_roi_size"]]
    rng = np.random.default_rng(seed)
    volumes = []
    for item in items[: max(1, min(len(items), n))]:
        volume = read_volume(item["image"], progress=False)
        image, affine = preprocess(volume.array, volume.affine, card)
        boxes = np.asarray(item.get("box", []), dtype=np.float64).reshape(-1, 6)
        centres = (boxes[:, :3] - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
        pad = [(0, max(r - s, 0)) for r, s in zip(roi, image.shape, strict=True)]
        volumes.append((np.pad(image, pad), centres))
    patches = []
    for k in range(n):
        image, centres = volumes[k % len(volumes)]
        if k % 2 == 0 and len(centres):
            c = centres[rng.integers(len(centres))]
            start = [int(round(ci)) - r // 2 for ci, r in zip(c, roi, strict=True)]
        else:
            start = [int(rng.integers(0, s - r + 1)) for s, r in zip(image.shape, roi, strict=True)]
        start = [min(max(st, 0), s - r) for st, s, r in zip(start, image.shape, roi, strict=True)]
        window = image[tuple(slice(st, st + r) for st, r in zip(start, roi, strict=True))]
        patches.append(np.ascontiguousarray(window[None, None], dtype=np.float32))
    return patches


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, patches: Sequence[np.ndarray],
                  input_name: str = "image") -> Path:
    """Static QDQ INT8 quantization of a fixed-shape fp32 graph, calibrated on `patches`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(patches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {input_name: x}

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    prepared = int8_path.with_name(int8_path.stem + ".prepared.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a warning per 1-D weight it keeps per-tensor
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=True)
    except Exception as err:  # onnxruntime's quantizer raises assorted types for graphs it can't handle
        raise MedfoundError(f"INT8 quantization failed ({type(err).__name__}: {err})"[:400],
                            path=fp32_path, hint="export without --int8") from err
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)
    return int8_path
