"""Detection quality through the deployed path: CPM of an exported model vs the torch model.

The export's second parity gate. Random patches (export.onnx.check_parity) show the graph
computes what torch computes; CPM on the model's validation studies shows that the whole
deployed path — numpy preprocessing, onnxruntime, numpy box logic — detects what the torch
detector detects, within `CPM_TOL` (fp32) or `INT8_MAX_CPM_DROP` (INT8).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfound.errors import MedfoundError

__all__ = ["CPM_TOL", "INT8_MAX_CPM_DROP", "int8_decision", "onnx_predictions",
           "validation_items"]

CPM_TOL = 0.005  # |CPM(onnx fp32) - CPM(torch)| allowed
INT8_MAX_CPM_DROP = 0.01  # CPM(fp32) - CPM(int8) allowed


def validation_items(meta: dict[str, Any], data_root: str | Path) -> list[dict[str, Any]]:
    """The package's validation studies under `data_root` (centers and split from its
    provenance). A center with no study in that split (a small center whose few cases all
    train) is left out; none at all is an error."""
    from medfound.train.detection import evaluation_items

    prov = meta.get("provenance", {})
    centers = prov.get("val_centers")
    if not centers:
        raise MedfoundError("the model package records no validation centers", hint=
                            "CPM parity needs them: export a package written by train_detector or federate")
    items: list[dict[str, Any]] = []
    for center in centers:
        try:
            items += evaluation_items(str(data_root), [center], list(prov.get("train_centers", [])),
                                      prov.get("val_split", "auto"))
        except MedfoundError as err:
            if "no '" not in str(err):  # only "no <split> items" is skippable
                raise
    if not items:
        raise MedfoundError(f"no validation studies of {', '.join(centers)}", path=data_root,
                            hint="point --data at the folder the model was trained from")
    return items


def onnx_predictions(detector: Any, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """LUNA16 prediction rows of an `OnnxDetector` on datalist items, through the deployed path
    (medfound.io reader, numpy preprocessing, onnxruntime, numpy box logic)."""
    from medfound.infer.preprocess import preprocess
    from medfound.io.reader import read_volume
    from medfound.io.volume import voxel_boxes_to_world

    rows: list[dict[str, Any]] = []
    for item in items:
        volume = read_volume(item["image"], progress=False)
        image, affine = preprocess(volume.array, volume.affine, detector.card)
        boxes, scores, _ = detector.predict(image)
        centres, sizes = voxel_boxes_to_world(boxes, affine)
        rows += [{"seriesuid": item["seriesuid"], "coordX": float(c[0]), "coordY": float(c[1]),
                  "coordZ": float(c[2]), "probability": float(p), "diameter_mm": float(s.mean())}
                 for c, p, s in zip(centres, scores, sizes, strict=True)]
    return rows


def int8_decision(cpm_fp32: float, cpm_int8: float, max_drop: float = INT8_MAX_CPM_DROP
                  ) -> dict[str, Any]:
    """Accept the INT8 model only when its CPM is at most `max_drop` below fp32's."""
    drop = float(cpm_fp32) - float(cpm_int8)
    return {"cpm_fp32": float(cpm_fp32), "cpm_int8": float(cpm_int8),
            "cpm_drop": round(drop, 6), "max_cpm_drop": float(max_drop),
            "accepted": bool(np.isfinite(drop) and drop <= max_drop + 1e-12)}
