"""Detection quality through the deployed path: CPM of an exported model vs the torch model.

The export's second parity gate. Random patches (export.onnx.check_parity) show the graph
computes what torch computes; CPM on the model's validation studies shows that the whole
deployed path — numpy preprocessing, onnxruntime, numpy box logic — detects what the torch
detector detects, within `CPM_TOL` (fp32) or `INT8_MAX_CPM_DROP` (INT8). Each engine ×
precision variant (onnxruntime or OpenVINO; fp32, bf16, INT8) is held to
`VARIANT_MAX_CPM_DIFF` against torch fp32 (`variant_decision`), with its finding-level
agreement (`finding_agreement`) and speed (`seconds_per_window`) recorded beside.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfound.errors import MedfoundError

__all__ = ["AGREEMENT_PROB_TOL", "CPM_TOL", "INT8_MAX_CPM_DROP", "VARIANT_MAX_CPM_DIFF",
           "finding_agreement", "int8_decision", "onnx_predictions", "seconds_per_window",
           "validation_items", "variant_decision"]

CPM_TOL = 0.005  # |CPM(onnx fp32) - CPM(torch)| allowed
INT8_MAX_CPM_DROP = 0.01  # CPM(fp32) - CPM(int8) allowed
VARIANT_MAX_CPM_DIFF = 0.01  # |CPM(engine, precision) - CPM(torch fp32)| allowed for a variant
AGREEMENT_PROB_TOL = 0.02  # a nodule's best-hit probability: |variant - torch| within this


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
    (medfound.io reader, numpy preprocessing, onnxruntime, numpy box logic), merged by the rule
    the torch path's rows and `medfound infer`'s findings use (`infer.boxes.prediction_rows`)."""
    from medfound.infer.boxes import prediction_rows
    from medfound.infer.preprocess import preprocess
    from medfound.io.reader import read_volume
    from medfound.io.volume import voxel_boxes_to_world

    rows: list[dict[str, Any]] = []
    for item in items:
        volume = read_volume(item["image"], progress=False)
        image, affine = preprocess(volume.array, volume.affine, detector.card)
        boxes, scores, _ = detector.predict(image)
        centres, sizes = voxel_boxes_to_world(boxes, affine)
        rows += prediction_rows(item["seriesuid"], centres, sizes.mean(axis=1), scores)
    return rows


def int8_decision(cpm_fp32: float, cpm_int8: float, max_drop: float = INT8_MAX_CPM_DROP
                  ) -> dict[str, Any]:
    """Accept the INT8 model only when its CPM is at most `max_drop` below fp32's."""
    drop = float(cpm_fp32) - float(cpm_int8)
    return {"cpm_fp32": float(cpm_fp32), "cpm_int8": float(cpm_int8),
            "cpm_drop": round(drop, 6), "max_cpm_drop": float(max_drop),
            "accepted": bool(np.isfinite(drop) and drop <= max_drop + 1e-12)}


def variant_decision(cpm_torch: float, cpm: float, max_diff: float = VARIANT_MAX_CPM_DIFF
                     ) -> dict[str, Any]:
    """A variant passes when its CPM is within `max_diff` of torch fp32's, either way: a
    variant that finds more than torch also changes the findings."""
    delta = float(cpm) - float(cpm_torch)
    passed = bool(np.isfinite(delta) and abs(delta) <= max_diff + 1e-12)
    return {"cpm": float(cpm), "cpm_torch": float(cpm_torch), "delta": round(delta, 6),
            "max_cpm_diff": float(max_diff), "passed": passed,
            "reason": f"|ΔCPM| {abs(delta):.4f} {'≤' if passed else '>'} {max_diff:g}"}


def finding_agreement(reference: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
                      items: Sequence[dict[str, Any]], tol: float = AGREEMENT_PROB_TOL
                      ) -> dict[str, Any]:
    """Whether prediction `rows` find the nodules `reference` (torch fp32) finds: the set of
    annotated nodules hit by LUNA16's rule (any candidate), and the largest difference of a
    nodule's best-hit probability among those both hit. ``agrees``: the sets are equal and the
    probabilities within `tol`."""
    from medfound.metrics.froc import _match
    from medfound.train.detection import annotations_of

    annotations = annotations_of(items)
    uids = [it["seriesuid"] for it in items]
    a = _match(list(reference), annotations, uids, None).nodule_score
    b = _match(list(rows), annotations, uids, None).nodule_score
    hit_a, hit_b = np.isfinite(a), np.isfinite(b)
    both = hit_a & hit_b
    diff = float(np.max(np.abs(a[both] - b[both]))) if both.any() else 0.0
    same = bool(np.array_equal(hit_a, hit_b))
    return {"n_nodules": int(len(a)), "n_hit_torch": int(hit_a.sum()), "n_hit": int(hit_b.sum()),
            "same_nodules_hit": same, "max_probability_diff": round(diff, 6),
            "probability_tolerance": float(tol), "agrees": bool(same and diff <= tol)}


def seconds_per_window(detector: Any, reps: int = 3, seed: int = 0) -> float:
    """Median seconds of the detector's network on one sliding window (1, C, *sw_roi_size) of
    lung-like intensities, after one warm-up run."""
    import statistics
    import time

    roi = [int(s) for s in detector.detector["sw_roi_size"]]
    channels = int(detector.card["input"].get("channels", 1))
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(0.15, 0.1, (1, channels, *roi)), 0, 1).astype(np.float32)
    detector.network(x)
    times = []
    for _ in range(max(int(reps), 1)):
        t0 = time.perf_counter()
        detector.network(x)
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))
