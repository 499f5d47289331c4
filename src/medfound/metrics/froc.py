"""LUNA16 evaluation of lung-nodule detection: FROC curve, CPM and its bootstrap CI.

Follows the official LUNA16 `noduleCADEvaluation` script, vectorised:

- World coordinates are LPS millimetres. Annotations are LUNA16 rows
  `seriesuid,coordX,coordY,coordZ,diameter_mm`; predictions the same key columns plus
  `probability`, one row per candidate.
- A candidate hits a nodule when its centre lies strictly closer than the nodule's radius
  (diameter_mm / 2) to the annotated centre (Euclidean, mm).
- Each nodule counts once, at the highest probability among the candidates hitting it; the
  other candidates on it are neither TP nor FP. A candidate that hits nothing is an FP.
- Candidates hitting an *excluded* finding (LUNA16 `annotations_excluded.csv`: nodules < 3 mm,
  non-nodules) are ignored; an excluded finding without a diameter (-1) counts as 10 mm.
- Only the scans in `seriesuids` are evaluated: rows of other scans are dropped, and a scan
  without nodules still counts in the FPs-per-scan denominator.
- The FROC curve is (FPs per scan, sensitivity) over descending probability thresholds, and the
  sensitivity at an FP rate is `np.interp` on it; the CPM is the mean over the seven rates.
  FPs per scan are exact (FP count / n_scans; the script's fpr * n_fp / n_scans can land an ulp
  off a curve point that a rate falls on), and where the script gets NaN (no nodule hit at
  all) this gives sensitivity 0.

The LUNA16 script's bootstrap resamples scans with replacement; here each bootstrap sample is a
vector of per-scan counts, so all samples are evaluated together without copying candidates.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfound.errors import MedfoundError

LUNA16_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
_XYZ = ("coordX", "coordY", "coordZ")
_LUNA16_COLUMNS = "seriesuid,coordX,coordY,coordZ,diameter_mm"
# The LUNA16 script gives excluded findings without a measured diameter (-1) this diameter.
_EXCLUDED_DEFAULT_DIAMETER_MM = 10.0
# Bootstrap work is done in blocks of about this many (sample, candidate) cells to bound memory.
_BLOCK_CELLS = 4_000_000


@dataclass(frozen=True)
class FrocResult:
    """A FROC evaluation over `n_scans` scans.

    `sensitivities[i]` is the sensitivity at `fps_per_scan[i]` false positives per scan and
    `cpm` their mean. The curve runs over descending probability thresholds, starting at the
    origin (threshold +inf); `curve_fps` is in false positives per scan.
    """

    fps_per_scan: tuple[float, ...]
    sensitivities: tuple[float, ...]
    cpm: float
    curve_fps: np.ndarray
    curve_sensitivity: np.ndarray
    curve_thresholds: np.ndarray
    n_scans: int
    n_nodules: int
    n_candidates: int
    n_detected: int  # nodules hit by at least one candidate (at the lowest threshold)
    n_false_positives: int  # candidates that hit no nodule and no excluded finding


@dataclass(frozen=True)
class _Matched:
    """The LUNA16 script's FROC vectors, after matching candidates to nodules."""

    n_scans: int
    nodule_scan: np.ndarray  # (N,) scan index of each included nodule
    nodule_score: np.ndarray  # (N,) highest probability among its hits; -inf when missed
    fp_scan: np.ndarray  # (F,) scan index of each false-positive candidate
    fp_score: np.ndarray  # (F,) its probability
    n_candidates: int
    nodule_diameter: np.ndarray  # (N,) its annotated diameter, mm
    nodule_best: np.ndarray  # (N,) row of its highest-probability hit in the predictions; -1 when missed
    nodule_row: np.ndarray  # (N,) its row in the annotations table


# ---------------------------------------------------------------------------------------------
# Public API


def froc(
    predictions: Any,
    annotations: Any,
    seriesuids: Any,
    fps_per_scan: Sequence[float] = LUNA16_FP_RATES,
    *,
    excluded: Any = None,
) -> FrocResult:
    """FROC curve and CPM of candidate `predictions` against nodule `annotations`.

    Tables may be a CSV path, a pandas DataFrame, a dict of column arrays or a list of row
    dicts, with LUNA16 columns (see the module docstring); `excluded` is an optional table of
    irrelevant findings in the annotations' columns. `seriesuids` lists the evaluated scans
    (an iterable of uids, or a text/CSV file with one uid per line).
    """
    rates = _fp_rates(fps_per_scan)
    matched = _match(predictions, annotations, seriesuids, excluded)
    return _froc_result(matched, rates)


def froc_cpm_bootstrap(
    predictions: Any,
    annotations: Any,
    seriesuids: Any,
    fps_per_scan: Sequence[float] = LUNA16_FP_RATES,
    *,
    excluded: Any = None,
    n_bootstraps: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval `(lo, hi)` of the CPM, resampling scans.

    Each sample draws `n_scans` scans with replacement (as the LUNA16 script does), keeping the
    FPs-per-scan denominator at `n_scans`; samples without any nodule are skipped. The bounds
    are the sorted CPMs at indices floor((1-ci)/2 * n) and floor((1+ci)/2 * n), the LUNA16
    script's rule. Deterministic for a `seed`.
    """
    rates = _fp_rates(fps_per_scan)
    matched = _match(predictions, annotations, seriesuids, excluded)
    return _bootstrap_ci(matched, rates, n_bootstraps, seed, ci)


def evaluate_luna16(
    predictions: Any,
    annotations: Any,
    seriesuids: Any,
    *,
    excluded: Any = None,
    n_bootstraps: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The LUNA16 summary that recipes write as JSON.

    Returns `{"cpm": x, "froc": {"0.125": s, "0.25": s, "0.5": s, "1": s, "2": s, "4": s,
    "8": s}, "cpm_ci95": [lo, hi], "n_scans": n, "n_nodules": n}` with plain Python numbers.
    Inputs as for `froc`.
    """
    matched = _match(predictions, annotations, seriesuids, excluded)
    result = _froc_result(matched, LUNA16_FP_RATES)
    lo, hi = _bootstrap_ci(matched, LUNA16_FP_RATES, n_bootstraps, seed, 0.95)
    return {
        "cpm": result.cpm,
        "froc": {f"{r:g}": s for r, s in zip(result.fps_per_scan, result.sensitivities, strict=True)},
        "cpm_ci95": [lo, hi],
        "n_scans": result.n_scans,
        "n_nodules": result.n_nodules,
    }


def diameter_agreement(predictions: Any, annotations: Any, seriesuids: Any) -> dict[str, Any]:
    """How well the detections' sizes match the nodules they find (LUNA16 scores centres only).

    For each annotated nodule, the highest-probability prediction that hits it (LUNA16's
    matching, as for the FROC) is its detection; `predictions` need a ``diameter_mm`` column.
    Returns ``{"n_matched", "median_relative_error", "median_abs_relative_error",
    "mean_abs_error_mm"}`` over the matched nodules (relative error: (detected − annotated) /
    annotated diameter; None when nothing was matched)."""
    matched = _match(predictions, annotations, seriesuids, None)
    found = matched.nodule_best >= 0
    if not found.any():
        return {"n_matched": 0, "median_relative_error": None,
                "median_abs_relative_error": None, "mean_abs_error_mm": None}
    d = _table(predictions, ("diameter_mm",), "predictions")["diameter_mm"][matched.nodule_best[found]]
    a = matched.nodule_diameter[found]
    rel = (d - a) / a
    return {"n_matched": int(found.sum()), "median_relative_error": float(np.median(rel)),
            "median_abs_relative_error": float(np.median(np.abs(rel))),
            "mean_abs_error_mm": float(np.mean(np.abs(d - a)))}


SIZE_BINS_MM = ((0.0, 6.0, "<6 mm"), (6.0, 10.0, "6-10 mm"), (10.0, math.inf, ">10 mm"))


def size_bin(diameter_mm: float) -> str:
    """The nodule size bin of a diameter: "<6 mm", "6-10 mm" (10 included) or ">10 mm"."""
    for lo, hi, name in SIZE_BINS_MM:
        if lo <= diameter_mm < hi or (hi == 10.0 and diameter_mm == 10.0):
            return name
    raise MedfoundError(f"diameter {diameter_mm!r} mm is not a positive number")


def froc_by_group(predictions: Any, annotations: Any, seriesuids: Any, labels: Sequence[str], *,
                  n_bootstraps: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """CPM and sensitivities of each nodule subgroup (size bin, nodule type, …).

    `labels` gives each row of `annotations` its group. A group's sensitivity counts its own
    nodules only; false positives are every candidate that hits no nodule, so the FP-per-scan
    axis is the same for every group (a subgroup does not get a smaller FP budget). Per group:
    ``{"n_nodules", "cpm", "cpm_ci95", "froc"}`` (the CI by the same scan bootstrap as the
    whole)."""
    matched = _match(predictions, annotations, seriesuids, None)
    labels = np.asarray([str(v) for v in labels])
    if len(labels) != len(_table(annotations, ("diameter_mm",), "annotations")["seriesuid"]):
        raise MedfoundError("froc_by_group: one label per annotation row is needed")
    of_nodule = labels[matched.nodule_row]
    out = {}
    for group in sorted(set(of_nodule.tolist())):
        sel = of_nodule == group
        sub = dataclasses.replace(matched, nodule_scan=matched.nodule_scan[sel],
                                  nodule_score=matched.nodule_score[sel],
                                  nodule_diameter=matched.nodule_diameter[sel],
                                  nodule_best=matched.nodule_best[sel],
                                  nodule_row=matched.nodule_row[sel])
        result = _froc_result(sub, LUNA16_FP_RATES)
        lo, hi = _bootstrap_ci(sub, LUNA16_FP_RATES, n_bootstraps, seed, 0.95)
        out[group] = {"n_nodules": result.n_nodules, "cpm": result.cpm, "cpm_ci95": [lo, hi],
                      "froc": {f"{r:g}": v for r, v in zip(result.fps_per_scan,
                                                           result.sensitivities, strict=True)}}
    return out


def diameter_by_size(predictions: Any, annotations: Any, seriesuids: Any) -> dict[str, Any]:
    """`diameter_agreement` of the detected nodules in each size bin (`SIZE_BINS_MM`)."""
    matched = _match(predictions, annotations, seriesuids, None)
    found = matched.nodule_best >= 0
    sizes = _table(predictions, ("diameter_mm",), "predictions")["diameter_mm"]
    a = matched.nodule_diameter
    bins = np.asarray([size_bin(float(d)) for d in a], dtype=object)  # the bins froc_by_group uses
    out = {}
    for _, _, name in SIZE_BINS_MM:
        in_bin = bins == name
        sel = found & in_bin
        entry: dict[str, Any] = {"n_nodules": int(in_bin.sum()), "n_matched": int(sel.sum())}
        if sel.any():
            d, t = sizes[matched.nodule_best[sel]], a[sel]
            entry.update(median_relative_error=float(np.median((d - t) / t)),
                         median_abs_error_mm=float(np.median(np.abs(d - t))),
                         mean_abs_error_mm=float(np.mean(np.abs(d - t))))
        out[name] = entry
    return out


def duplicate_findings(predictions: Any, annotations: Any, seriesuids: Any,
                       threshold: float) -> dict[str, int]:
    """How many nodules carry more than one finding of probability ≥ `threshold` within their
    radius (LUNA16's hit rule): ``{"threshold", "n_nodules", "n_with_duplicates",
    "n_duplicate_findings"}`` (the findings beyond the first on each nodule)."""
    uids = _seriesuids(seriesuids)
    index = {u: i for i, u in enumerate(uids)}
    pred = _table(predictions, ("probability",), "predictions")
    ann = _table(annotations, ("diameter_mm",), "annotations")
    p_scan, p_keep = _scan_index(pred["seriesuid"], index)
    a_scan, a_keep = _scan_index(ann["seriesuid"], index)
    strong = p_keep & (pred["probability"] >= threshold)
    with_dups = extra = 0
    for s in np.unique(a_scan[a_keep]):
        cands = pred["xyz"][strong & (p_scan == s)]
        nods = a_keep & (a_scan == s)
        if not len(cands):
            continue
        per_nodule = _hits(cands, ann["xyz"][nods], ann["diameter_mm"][nods]).sum(axis=0)
        with_dups += int((per_nodule > 1).sum())
        extra += int(np.clip(per_nodule - 1, 0, None).sum())
    return {"threshold": float(threshold), "n_nodules": int(a_keep.sum()),
            "n_with_duplicates": with_dups, "n_duplicate_findings": extra}


def plot_froc(result: FrocResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write the FROC curve of `result` as a PNG (log FPs-per-scan axis) and return its path."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rates = np.asarray(result.fps_per_scan)
    lo, hi = min(rates.min(), 0.125) / 2, max(rates.max(), 8.0) * 2
    grid = np.geomspace(lo, hi, 1000)

    fig = Figure(figsize=(6, 4.5), dpi=120)
    ax = fig.add_subplot()
    # The curve as the sensitivities are read from it: linear interpolation in FPs per scan.
    ax.plot(grid, np.interp(grid, result.curve_fps, result.curve_sensitivity), lw=1.8)
    ax.plot(rates, result.sensitivities, "o", ms=6, label="operating points")
    for r, s in zip(rates, result.sensitivities, strict=True):
        ax.annotate(f"{s:.3f}", (r, s), textcoords="offset points",
                    xytext=(0, -13 if s > 0.9 else 7), ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(rates, labels=[f"{r:g}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(loc="lower right", fontsize=8)
    head = title or "FROC"
    ax.set_title(f"{head} — CPM {result.cpm:.3f} ({result.n_nodules} nodules, "
                 f"{result.n_scans} scans)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def coco_map(
    pred_boxes: Sequence[Any],
    pred_scores: Sequence[Any],
    gt_boxes: Sequence[Any],
    iou: float = 0.1,
    *,
    max_detections: int = 100,
) -> dict[str, float]:
    """COCO-style detection metrics with MONAI's `COCOMetric`, one class ("nodule").

    `pred_boxes[i]` (D_i, 6), `pred_scores[i]` (D_i,) and `gt_boxes[i]` (G_i, 6) belong to scan
    i. Boxes are "cccwhd": centre (x, y, z) and size (w, h, d) along x, y, z, in LPS mm (world),
    the same frame for predictions and ground truth. IoU does not change under per-axis scaling
    and translation, so voxel boxes of an axis-aligned volume give the same numbers.

    Returns `{"ap", "ar"}` at IoU `iou` and `{"map", "mar"}` averaged over IoU 0.10:0.50:0.05,
    all at `max_detections` per scan: MONAI's `AP_IoU_0.10_MaxDet_100`, `AR_IoU_0.10_...`,
    `mAP_IoU_0.10_0.50_0.05_...` and `mAR_...`, as its LUNA16 results are reported.
    """
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou, convert_box_mode

    if not len(pred_boxes) == len(pred_scores) == len(gt_boxes):
        raise MedfoundError(
            f"coco_map needs one entry per scan in pred_boxes, pred_scores and gt_boxes; got "
            f"{len(pred_boxes)}, {len(pred_scores)} and {len(gt_boxes)}")
    preds = [_boxes(b, f"pred_boxes[{i}]") for i, b in enumerate(pred_boxes)]
    gts = [_boxes(b, f"gt_boxes[{i}]") for i, b in enumerate(gt_boxes)]
    scores = [np.asarray(s, dtype=np.float64).reshape(-1) for s in pred_scores]
    for i, (b, s) in enumerate(zip(preds, scores, strict=True)):
        if len(b) != len(s):
            raise MedfoundError(f"pred_boxes[{i}] has {len(b)} boxes but pred_scores[{i}] "
                                f"has {len(s)} scores")
    if sum(len(g) for g in gts) == 0:
        raise MedfoundError("coco_map: no ground-truth box in any scan; AP is undefined")

    def corners(b: np.ndarray) -> np.ndarray:  # MONAI's IoU takes StandardMode (xyzxyz) boxes
        return convert_box_mode(b, src_mode="cccwhd", dst_mode="xyzxyz") if len(b) else b

    metric = COCOMetric(classes=["nodule"], iou_list=[iou], max_detection=[max_detections],
                        verbose=False)
    matches = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=metric.iou_thresholds,
        pred_boxes=[corners(b) for b in preds],
        pred_classes=[np.zeros(len(b), dtype=np.int64) for b in preds],
        pred_scores=scores,
        gt_boxes=[corners(b) for b in gts],
        gt_classes=[np.zeros(len(b), dtype=np.int64) for b in gts],
        max_detections=max_detections,
    )
    values = metric(matches)[0]
    lo, hi, step = metric.iou_range
    at = f"IoU_{iou:.2f}_MaxDet_{max_detections}"
    over = f"IoU_{lo:.2f}_{hi:.2f}_{step:.2f}_MaxDet_{max_detections}"
    return {"ap": float(values[f"AP_{at}"]), "ar": float(values[f"AR_{at}"]),
            "map": float(values[f"mAP_{over}"]), "mar": float(values[f"mAR_{over}"])}


# ---------------------------------------------------------------------------------------------
# FROC curve and bootstrap


def _require_nodules(m: _Matched) -> None:
    if len(m.nodule_scan) == 0:
        raise MedfoundError(
            f"no annotated nodule in the {m.n_scans} evaluated scans: sensitivity is undefined",
            hint="check that the annotations' seriesuids match the evaluated scans")


def _froc_result(m: _Matched, rates: tuple[float, ...]) -> FrocResult:
    _require_nodules(m)
    n_nodules = len(m.nodule_scan)
    found = np.isfinite(m.nodule_score)
    scores = np.concatenate([m.nodule_score[found], m.fp_score])
    is_tp = np.concatenate([np.ones(found.sum(), bool), np.zeros(len(m.fp_score), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_tp = scores[order], is_tp[order]
    # One curve point per distinct threshold: tied candidates enter together.
    last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    tp, fp = np.cumsum(is_tp)[last], np.cumsum(~is_tp)[last]
    curve_fps = np.r_[0.0, fp / m.n_scans]
    curve_sens = np.r_[0.0, tp / n_nodules]
    sens = np.interp(rates, curve_fps, curve_sens)
    return FrocResult(
        fps_per_scan=rates,
        sensitivities=tuple(float(s) for s in sens),
        cpm=float(np.mean(sens)),
        curve_fps=curve_fps,
        curve_sensitivity=curve_sens,
        curve_thresholds=np.r_[np.inf, scores[last]],
        n_scans=m.n_scans,
        n_nodules=n_nodules,
        n_candidates=m.n_candidates,
        n_detected=int(found.sum()),
        n_false_positives=len(m.fp_score),
    )


def _bootstrap_ci(m: _Matched, rates: tuple[float, ...], n_bootstraps: int, seed: int,
                  ci: float) -> tuple[float, float]:
    if not 0.0 < ci < 1.0:
        raise MedfoundError(f"ci must lie in (0, 1); got {ci}")
    if n_bootstraps < 1:
        raise MedfoundError(f"n_bootstraps must be at least 1; got {n_bootstraps}")
    _require_nodules(m)
    rng = np.random.default_rng(seed)
    cpms = np.empty(n_bootstraps)
    # Chunks of samples keep the (samples x scans) count matrix small for large evaluations.
    chunk = max(1, _BLOCK_CELLS // max(m.n_scans, 1) // 4)
    for start in range(0, n_bootstraps, chunk):
        b = min(chunk, n_bootstraps - start)
        picks = rng.integers(0, m.n_scans, size=(b, m.n_scans))
        cpms[start:start + b] = _bootstrap_cpms(m, _scan_counts(picks, m.n_scans), rates)
    cpms = np.sort(cpms[np.isfinite(cpms)])
    if len(cpms) == 0:
        raise MedfoundError("no bootstrap sample contains a nodule; CPM CI is undefined")
    tail = (1.0 - ci) / 2.0
    n = len(cpms)
    return (float(cpms[int(math.floor(tail * n))]),
            float(cpms[min(int(math.floor((1.0 - tail) * n)), n - 1)]))


def _scan_counts(picks: np.ndarray, n_scans: int) -> np.ndarray:
    """(B, n_scans) how often each scan was drawn, from (B, k) drawn scan indices."""
    b = picks.shape[0]
    flat = (picks + np.arange(b)[:, None] * n_scans).ravel()
    return np.bincount(flat, minlength=b * n_scans).reshape(b, n_scans)


def _bootstrap_cpms(m: _Matched, weights: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    """CPM of each resampled evaluation; `weights[b, s]` is how often scan s is in sample b.

    Equal to `_froc_result` on the concatenated copies of the drawn scans (NaN for a sample
    without nodules), but computed from cumulative weighted counts: for each FP rate r, find the
    first FP threshold level whose weighted FP count exceeds r * n_scans; the curve points on
    either side of that crossing give np.interp's answer.
    """
    weights = np.asarray(weights, dtype=np.int64)
    n_boot = weights.shape[0]
    targets = np.asarray(rates, dtype=np.float64) * m.n_scans  # FP counts at each rate
    n_rates = len(targets)

    nodules_per_scan = np.bincount(m.nodule_scan, minlength=m.n_scans)
    n_nodules = weights @ nodules_per_scan  # (B,)

    # Weighted cumulative TPs over the detected nodules by descending score (column 0: none).
    found = np.isfinite(m.nodule_score)
    t_order = np.argsort(-m.nodule_score[found], kind="stable")
    t_neg_score = -m.nodule_score[found][t_order]  # ascending
    cum_tp = np.zeros((n_boot, len(t_neg_score) + 1), dtype=np.int64)
    np.cumsum(weights[:, m.nodule_scan[found][t_order]], axis=1, out=cum_tp[:, 1:])

    # FPs by descending score, cut into levels of tied scores (one curve point per level).
    f_order = np.argsort(-m.fp_score, kind="stable")
    f_score, f_scan = m.fp_score[f_order], m.fp_scan[f_order]
    level_end = np.flatnonzero(np.r_[f_score[1:] != f_score[:-1], True]) if len(f_score) \
        else np.zeros(0, np.int64)

    fp_before = np.zeros((n_boot, n_rates))  # FP count of the last point at or below target
    fp_after = np.ones((n_boot, n_rates))  # FP count of the next point (past target)
    next_score = np.full((n_boot, n_rates), -np.inf)  # threshold of the next point
    crossed = np.zeros((n_boot, n_rates), dtype=bool)
    running = np.zeros(n_boot, dtype=np.int64)  # weighted FPs before the block
    at_level = np.zeros(n_boot, dtype=np.int64)  # weighted FPs at the last level end passed
    by_scan = np.ascontiguousarray(weights.T)  # (S, B): a candidate's row is its scan's counts
    # Samples cross the highest rate near candidate max(targets) (counts average 1), so start
    # with a block a little past it and grow; most evaluations stop after the first block.
    block, cap = int(1.25 * targets.max()) + 256, max(1, _BLOCK_CELLS // n_boot)
    start = 0
    while start < len(f_score) and not crossed.all():
        stop = min(start + min(block, cap), len(f_score))
        cum = by_scan[f_scan[start:stop]]  # (candidates, B)
        np.cumsum(cum, axis=0, out=cum)
        cum += running
        running = cum[-1].copy()
        ends = level_end[np.searchsorted(level_end, start):np.searchsorted(level_end, stop)]
        ends = ends - start
        if len(ends):  # a block may cut a long run of tied scores; points are at level ends
            cum = cum[ends]  # (levels, B) weighted FP count at each level's threshold
            for r, target in enumerate(targets):
                cols = np.flatnonzero(~crossed[:, r] & (cum[-1] > target))
                if len(cols) == 0:
                    continue
                k = (cum[:, cols] <= target).sum(axis=0)  # levels still at or below target
                fp_before[cols, r] = np.where(k > 0, cum[np.maximum(k - 1, 0), cols],
                                              at_level[cols])
                fp_after[cols, r] = cum[k, cols]
                next_score[cols, r] = f_score[start + ends[k]]
                crossed[cols, r] = True
            at_level = cum[-1]
        start, block = stop, 2 * block

    # TPs above the next threshold belong to the point before the crossing; TPs tied with it
    # enter together with the crossing FPs.
    rows = np.arange(n_boot)[:, None]
    tp_before = cum_tp[rows, np.searchsorted(t_neg_score, -next_score, side="left")]
    tp_after = cum_tp[rows, np.searchsorted(t_neg_score, -next_score, side="right")]
    frac = np.where(crossed, (targets - fp_before) / (fp_after - fp_before), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (tp_before + frac * (tp_after - tp_before)) / n_nodules[:, None]
    return sens.mean(axis=1)


# ---------------------------------------------------------------------------------------------
# Matching candidates to nodules


def _match(predictions: Any, annotations: Any, seriesuids: Any, excluded: Any) -> _Matched:
    uids = _seriesuids(seriesuids)
    index = {u: i for i, u in enumerate(uids)}
    pred = _table(predictions, ("probability",), "predictions")
    ann = _table(annotations, ("diameter_mm",), "annotations")
    exc = _table(excluded, ("diameter_mm",), "excluded findings")

    p_scan, p_keep = _scan_index(pred["seriesuid"], index)
    if len(p_keep) and not p_keep.any():
        raise MedfoundError(
            "no prediction row belongs to the evaluated scans",
            hint="check that the predictions' seriesuid values are those listed in seriesuids")
    p_xyz, p_prob, p_scan = pred["xyz"][p_keep], pred["probability"][p_keep], p_scan[p_keep]
    a_scan, a_keep = _scan_index(ann["seriesuid"], index)
    a_xyz, a_diam, a_scan = ann["xyz"][a_keep], ann["diameter_mm"][a_keep], a_scan[a_keep]
    if (a_diam <= 0).any():
        raise MedfoundError("annotations: diameter_mm must be positive for every nodule",
                            hint="irrelevant findings without a size belong in `excluded`")
    e_scan, e_keep = _scan_index(exc["seriesuid"], index)
    e_xyz, e_diam, e_scan = exc["xyz"][e_keep], exc["diameter_mm"][e_keep], e_scan[e_keep]
    e_diam = np.where(e_diam < 0, _EXCLUDED_DEFAULT_DIAMETER_MM, e_diam)

    nodule_score = np.full(len(a_scan), -np.inf)
    nodule_best = np.full(len(a_scan), -1)
    p_rows = np.flatnonzero(p_keep)  # kept candidates → rows of the predictions table
    is_fp = np.ones(len(p_scan), dtype=bool)
    p_order, p_bounds = _groups(p_scan, len(uids))
    a_order, a_bounds = _groups(a_scan, len(uids))
    e_order, e_bounds = _groups(e_scan, len(uids))
    for s in np.unique(np.r_[a_scan, e_scan]):
        cands = p_order[p_bounds[s]:p_bounds[s + 1]]
        if len(cands) == 0:
            continue
        nods = a_order[a_bounds[s]:a_bounds[s + 1]]
        hits = _hits(p_xyz[cands], a_xyz[nods], a_diam[nods])  # (C, N)
        if len(nods):
            probs = np.where(hits, p_prob[cands][:, None], -np.inf)
            nodule_score[nods] = probs.max(axis=0)
            found = hits.any(axis=0)
            nodule_best[nods[found]] = p_rows[cands[probs.argmax(axis=0)[found]]]
        irrelevant = e_order[e_bounds[s]:e_bounds[s + 1]]
        ignored = hits.any(axis=1) | _hits(p_xyz[cands], e_xyz[irrelevant],
                                           e_diam[irrelevant]).any(axis=1)
        is_fp[cands[ignored]] = False
    return _Matched(n_scans=len(uids), nodule_scan=a_scan, nodule_score=nodule_score,
                    fp_scan=p_scan[is_fp], fp_score=p_prob[is_fp], n_candidates=len(p_scan),
                    nodule_diameter=a_diam, nodule_best=nodule_best,
                    nodule_row=np.flatnonzero(a_keep))


def _hits(cand_xyz: np.ndarray, nod_xyz: np.ndarray, diameter: np.ndarray) -> np.ndarray:
    """(C, N) whether candidate c lies strictly within nodule n's radius (LUNA16's rule)."""
    d = cand_xyz[:, None, :] - nod_xyz[None, :, :]
    dist2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]
    return dist2 < (diameter / 2.0) ** 2


def _groups(scan: np.ndarray, n_scans: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order grouped by scan, and where each scan's rows start in it."""
    order = np.argsort(scan, kind="stable")
    return order, np.searchsorted(scan[order], np.arange(n_scans + 1))


def _scan_index(uids: np.ndarray, index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    scan = np.fromiter((index.get(u, -1) for u in uids), dtype=np.int64, count=len(uids))
    return scan, scan >= 0


# ---------------------------------------------------------------------------------------------
# Input tables


def _fp_rates(fps_per_scan: Sequence[float]) -> tuple[float, ...]:
    rates = tuple(float(r) for r in fps_per_scan)
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise MedfoundError(f"fps_per_scan must be positive numbers; got {list(fps_per_scan)}")
    return rates


def _seriesuids(seriesuids: Any) -> list[str]:
    if isinstance(seriesuids, (str, os.PathLike)):
        path = Path(seriesuids)
        if not path.is_file():
            raise MedfoundError("seriesuids file not found", path,
                                hint="pass a list of seriesuids or a file with one per line")
        with open(path, newline="") as f:
            uids = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
        if uids and uids[0] == "seriesuid":
            uids = uids[1:]
    elif hasattr(seriesuids, "columns") and "seriesuid" in seriesuids.columns:  # DataFrame
        uids = [str(u).strip() for u in seriesuids["seriesuid"]]
    elif isinstance(seriesuids, Iterable):
        uids = [str(u).strip() for u in seriesuids]
    else:
        raise MedfoundError(f"seriesuids must be a list of uids or a file; got "
                            f"{type(seriesuids).__name__}")
    if not uids:
        raise MedfoundError("seriesuids is empty: there is no scan to evaluate")
    if len(set(uids)) != len(uids):
        dup = next(u for u in uids if uids.count(u) > 1)
        raise MedfoundError(f"seriesuid {dup} is listed more than once in seriesuids")
    return uids


def _table(table: Any, extra: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """`seriesuid` (str), `xyz` (n, 3) mm and the `extra` float columns of a LUNA16 table."""
    path = None
    if table is None:
        table = []
    if isinstance(table, (str, os.PathLike)):
        path = Path(table)
        if not path.is_file():
            raise MedfoundError(f"{what} file not found", path)
        with open(path, newline="") as f:
            table = list(csv.DictReader(f))
    wanted = ("seriesuid", *_XYZ, *extra)
    if hasattr(table, "columns") and hasattr(table, "to_numpy"):  # pandas DataFrame
        cols = {c: table[c].to_numpy() for c in wanted if c in table.columns}
        n_rows = len(table)
    elif isinstance(table, Mapping):
        cols = {c: np.asarray(table[c]) for c in wanted if c in table}
        n_rows = len(next(iter(cols.values()))) if cols else 0
    elif isinstance(table, Sequence) and all(isinstance(r, Mapping) for r in table):
        n_rows = len(table)
        cols = {c: np.asarray([r[c] for r in table]) for c in wanted
                if n_rows and all(c in r for r in table)}
    else:
        raise MedfoundError(f"{what} must be a CSV path, a DataFrame, a dict of columns or a "
                            f"list of row dicts; got {type(table).__name__}", path)
    if n_rows == 0:
        return {"seriesuid": np.zeros(0, dtype=str), "xyz": np.zeros((0, 3)),
                **{c: np.zeros(0) for c in extra}}
    missing = [c for c in wanted if c not in cols]
    if missing:
        raise MedfoundError(f"{what} lack column(s) {', '.join(missing)}", path,
                            hint=f"LUNA16 columns are {_LUNA16_COLUMNS}"
                            + (",probability" if "probability" in extra else ""))
    if any(len(v) != n_rows for v in cols.values()):
        raise MedfoundError(f"{what}: columns have different lengths", path)
    out: dict[str, np.ndarray] = {"seriesuid": np.char.strip(cols["seriesuid"].astype(str))}
    for c in (*_XYZ, *extra):
        try:
            values = np.asarray(cols[c], dtype=np.float64)
        except (TypeError, ValueError):
            raise MedfoundError(f"{what}: column {c} must be numeric", path) from None
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise MedfoundError(f"{what}: column {c} is not a finite number in row {bad[0]}",
                                path)
        out[c] = values
    out["xyz"] = np.stack([out.pop(c) for c in _XYZ], axis=1)
    return out


def _boxes(boxes: Any, what: str) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 6))
    if b.ndim != 2 or b.shape[1] != 6:
        raise MedfoundError(f"{what} must be (n, 6) cccwhd boxes; got shape {b.shape}")
    if not np.isfinite(b).all() or (b[:, 3:] <= 0).any():
        raise MedfoundError(f"{what}: boxes need finite centres and positive sizes")
    return b
