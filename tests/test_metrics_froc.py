"""LUNA16 evaluation: FROC / CPM, its bootstrap CI, the recipe JSON, the plot and COCO mAP.

The hand-made cases below have answers worked out in the comments; the random cases are checked
against `official_froc`, a plain loop-for-loop rendering of the LUNA16 `noduleCADEvaluation`
script (matching, FROC vectors, computeFROC with roc_curve's thresholds, np.interp).
"""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pandas as pd
import pytest

from medfound.errors import MedfoundError
from medfound.metrics import (
    LUNA16_FP_RATES,
    coco_map,
    diameter_agreement,
    evaluate_luna16,
    froc,
    froc_cpm_bootstrap,
    plot_froc,
)
from medfound.metrics.froc import _bootstrap_cpms, _match

ANN_COLS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
PRED_COLS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]


def ann(*rows):
    return [dict(zip(ANN_COLS, r, strict=True)) for r in rows]


def pred(*rows):
    return [dict(zip(PRED_COLS, r, strict=True)) for r in rows]


# ---------------------------------------------------------------------------------------------
# Independent reference: the official script's logic, loop by loop.


def official_entries(preds, annots, excluded, seriesuids):
    """Per scan, the (is_nodule, probability, excluded_from_roc) FROC entries of evaluateCAD."""
    per_scan = {}
    for uid in seriesuids:
        cands = {i: p for i, p in enumerate(preds) if p["seriesuid"] == uid}
        cands2 = dict(cands)
        findings = [(a, "Included") for a in annots if a["seriesuid"] == uid]
        findings += [(e, "Excluded") for e in excluded if e["seriesuid"] == uid]
        entries = []
        for nod, state in findings:
            diameter = nod["diameter_mm"] if nod["diameter_mm"] >= 0 else 10.0
            radius2 = (diameter / 2.0) ** 2
            matches = []
            for key, c in cands.items():
                dist = ((nod["coordX"] - c["coordX"]) ** 2 + (nod["coordY"] - c["coordY"]) ** 2
                        + (nod["coordZ"] - c["coordZ"]) ** 2)
                if dist < radius2:
                    if state == "Included":
                        matches.append(c)
                    cands2.pop(key, None)
            if state == "Included":
                if matches:
                    entries.append((1, max(c["probability"] for c in matches), False))
                else:
                    entries.append((1, -1e9, True))
        entries += [(0, c["probability"], False) for c in cands2.values()]
        per_scan[uid] = entries
    return per_scan


def official_compute_froc(entries, n_images, rates):
    """computeFROC + np.interp: thresholds are the distinct probabilities, high to low."""
    local = [(g, p) for g, p, excl in entries if not excl]
    n_lesions = sum(g for g, _, _ in entries)
    if n_lesions == 0:
        return float("nan")
    fps, sens = [0.0], [0.0]
    for t in sorted({p for _, p in local}, reverse=True):
        fps.append(sum(1 for g, p in local if g == 0 and p >= t) / n_images)
        sens.append(sum(1 for g, p in local if g == 1 and p >= t) / n_lesions)
    return [float(np.interp(r, fps, sens)) for r in rates]


def official_froc(preds, annots, seriesuids, excluded=(), rates=LUNA16_FP_RATES):
    per_scan = official_entries(preds, annots, list(excluded), seriesuids)
    entries = [e for uid in seriesuids for e in per_scan[uid]]
    return official_compute_froc(entries, len(seriesuids), rates)


def random_case(seed, n_scans=12, cands_per_scan=25):
    """Scans with 0-3 nodules, noisy hits (some double), FPs, excluded findings, tied scores."""
    rng = np.random.default_rng(seed)
    uids = [f"1.3.6.1.4.1.{seed}.{i}" for i in range(n_scans)]
    annots, preds, excluded = [], [], []
    for uid in uids:
        for _ in range(rng.integers(0, 4)):
            c, d = rng.uniform(-120, 120, 3), float(rng.uniform(3.5, 25))
            annots.append(dict(zip(ANN_COLS, [uid, *c, d], strict=True)))
            for _ in range(rng.integers(0, 3)):  # 0, 1 or 2 candidates near it, some outside
                x = c + rng.normal(0, d / 3, 3)
                preds.append(dict(zip(PRED_COLS, [uid, *x, round(rng.uniform(0.2, 1), 2)],
                                      strict=True)))
        for _ in range(rng.integers(0, 3)):
            c = rng.uniform(-120, 120, 3)
            excluded.append(dict(zip(ANN_COLS, [uid, *c, rng.choice([-1.0, 4.0])], strict=True)))
            preds.append(dict(zip(PRED_COLS, [uid, *(c + rng.normal(0, 2, 3)),
                                              round(rng.uniform(0, 1), 2)], strict=True)))
        for _ in range(rng.integers(0, cands_per_scan)):
            preds.append(dict(zip(PRED_COLS, [uid, *rng.uniform(-150, 150, 3),
                                              round(rng.uniform(0, 1) ** 2, 2)], strict=True)))
    return preds, annots, excluded, uids


# ---------------------------------------------------------------------------------------------
# FROC and CPM


def test_perfect_detector_scores_cpm_one():
    annots = ann(("a", 10, 20, 30, 8), ("a", -40, 0, 5, 5), ("b", 0, 0, 0, 12))
    # One candidate on each nodule, ranked above the FPs.
    preds = pred(("a", 10, 20, 30, 0.9), ("a", -40, 0, 5, 0.8), ("b", 1, 1, 1, 0.95),
                 ("a", 90, 90, 90, 0.1), ("c", 0, 0, 0, 0.2))
    r = froc(preds, annots, ["a", "b", "c"])
    assert r.cpm == 1.0
    assert r.sensitivities == (1.0,) * 7
    assert (r.n_scans, r.n_nodules, r.n_detected, r.n_false_positives) == (3, 3, 3, 2)


def test_detector_without_candidates_scores_zero():
    annots = ann(("a", 10, 20, 30, 8), ("b", 0, 0, 0, 12))
    for empty in ([], None, pd.DataFrame(columns=PRED_COLS)):
        r = froc(empty, annots, ["a", "b"])
        assert r.cpm == 0.0 and r.sensitivities == (0.0,) * 7
        assert r.n_candidates == 0 and r.n_detected == 0


def test_hand_computed_mixed_case():
    # Four scans, four nodules; D has none. Candidates by descending probability:
    #   0.95 FP (D)                               -> point (FPs/scan 0.25, sens 0)
    #   0.90 hits n1                              -> (0.25, 0.25)
    #   0.70 hits n3, and FPs in A and C (a tie)  -> (0.75, 0.50)  one diagonal segment
    #   0.50 FP (D)                               -> (1.00, 0.50)
    #   0.40 hits n2                              -> (1.00, 0.75)
    #   0.35 second hit on n1: ignored (neither TP nor FP)
    #   0.30 FP (A), 0.20 FP (D)                  -> (1.25, 0.75), (1.50, 0.75)
    # n4 (C) is never hit. np.interp: 1/8 -> 0 (between (0,0) and (0.25,0)); 1/4 -> 0.25 (last
    # point at 0.25); 1/2 -> 0.25 + 0.25 * (0.25 / 0.5) = 0.375 (half way up the diagonal);
    # 1, 2, 4, 8 -> 0.75. CPM = (0 + 0.25 + 0.375 + 4 * 0.75) / 7 = 3.625 / 7.
    annots = ann(("A", 0, 0, 0, 10), ("A", 50, 0, 0, 6), ("B", 0, 0, 0, 8), ("C", 0, 0, 0, 20))
    preds = pred(
        ("D", 0, 0, 0, 0.95),
        ("A", 1, 1, 1, 0.90),
        ("B", 0, 3, 0, 0.70), ("A", -60, 0, 0, 0.70), ("C", 0, 0, 40, 0.70),
        ("D", 10, 10, 10, 0.50),
        ("A", 51, 1, 0, 0.40),
        ("A", -2, 2, 2, 0.35),
        ("A", 0, 80, 0, 0.30), ("D", 5, 5, 5, 0.20),
    )
    r = froc(preds, annots, ["A", "B", "C", "D"])
    assert r.sensitivities == pytest.approx((0.0, 0.25, 0.375, 0.75, 0.75, 0.75, 0.75), abs=1e-15)
    assert r.cpm == pytest.approx(3.625 / 7, abs=1e-15)
    assert (r.n_scans, r.n_nodules, r.n_candidates) == (4, 4, 10)
    assert (r.n_detected, r.n_false_positives) == (3, 6)
    np.testing.assert_allclose(r.curve_fps, [0, 0.25, 0.25, 0.75, 1.0, 1.0, 1.25, 1.5])
    np.testing.assert_allclose(r.curve_sensitivity, [0, 0, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75])
    np.testing.assert_array_equal(r.curve_thresholds,
                                  [np.inf, 0.95, 0.9, 0.7, 0.5, 0.4, 0.3, 0.2])
    assert official_froc(preds, annots, ["A", "B", "C", "D"]) == pytest.approx(r.sensitivities)


@pytest.mark.parametrize(("offset", "hit"), [
    ((4.99, 0, 0), True),  # just inside the 5 mm radius
    ((5.01, 0, 0), False),  # just outside
    ((3.0, 4.0, 0), False),  # exactly on the radius: LUNA16 needs strictly closer
    ((2.9, 0, 3.9), True),  # Euclidean, not per axis: sqrt(2.9^2 + 3.9^2) = 4.86 mm
    ((0, 3.6, 3.6), False),  # 5.09 mm although each axis is within 5 mm
])
def test_hit_needs_the_centre_strictly_within_the_radius(offset, hit):
    annots = ann(("s", 10, -20, 30, 10.0))
    preds = pred(("s", 10 + offset[0], -20 + offset[1], 30 + offset[2], 0.9))
    r = froc(preds, annots, ["s"])
    assert (r.n_detected, r.n_false_positives) == ((1, 0) if hit else (0, 1))
    assert r.cpm == (1.0 if hit else 0.0)


def test_each_nodule_counts_once_at_its_best_candidate():
    # Two candidates on one nodule: one TP at the higher probability, the other ignored.
    annots = ann(("s", 0, 0, 0, 10), ("s", 40, 0, 0, 10))
    preds = pred(("s", 1, 0, 0, 0.6), ("s", -1, 0, 0, 0.8), ("s", 0, 80, 0, 0.7))
    r = froc(preds, annots, ["s"])
    assert (r.n_detected, r.n_false_positives) == (1, 1)
    np.testing.assert_array_equal(r.curve_thresholds, [np.inf, 0.8, 0.7])
    np.testing.assert_array_equal(r.curve_sensitivity, [0, 0.5, 0.5])  # never above 1 of 2


def test_diameter_agreement_uses_each_nodules_best_hit():
    # Nodule A (10 mm): hits at p 0.9 (12 mm, +20%) and p 0.5 (10 mm); the best one counts.
    # Nodule B (20 mm): one hit, 15 mm (-25%). Nodule C (8 mm): missed. A far FP is ignored.
    annots = ann(("s", 0, 0, 0, 10), ("s", 50, 0, 0, 20), ("t", 0, 0, 0, 8))
    rows = [{"seriesuid": u, "coordX": x, "coordY": y, "coordZ": z, "probability": p,
             "diameter_mm": d}
            for u, x, y, z, p, d in (("s", 1, 0, 0, 0.9, 12.0), ("s", -1, 0, 0, 0.5, 10.0),
                                     ("s", 52, 0, 0, 0.7, 15.0), ("s", 0, 90, 0, 0.99, 30.0))]
    got = diameter_agreement(rows, annots, ["s", "t"])
    assert got["n_matched"] == 2
    assert got["median_relative_error"] == pytest.approx((0.2 - 0.25) / 2)
    assert got["median_abs_relative_error"] == pytest.approx((0.2 + 0.25) / 2)
    assert got["mean_abs_error_mm"] == pytest.approx((2 + 5) / 2)
    assert diameter_agreement(rows[3:], annots, ["s", "t"])["n_matched"] == 0


def test_scans_without_nodules_count_in_the_fp_rate():
    # Scan A: two FPs at 0.9 above its one nodule at 0.5. Alone, the nodule is found only at
    # 2 FPs/scan; evaluated with three more scans (no nodules, B with a low FP), at 0.5.
    annots = ann(("A", 0, 0, 0, 10))
    preds = pred(("A", 0, 0, 1, 0.5), ("A", 50, 0, 0, 0.9), ("A", -50, 0, 0, 0.9),
                 ("B", 0, 0, 0, 0.1), ("Z", 0, 0, 0, 0.99))  # Z is not evaluated
    alone = froc(preds, annots, ["A"])
    assert alone.sensitivities == (0, 0, 0, 0, 1, 1, 1)
    four = froc(preds, annots, ["A", "B", "C", "D"])
    assert four.sensitivities == (0, 0, 1, 1, 1, 1, 1)
    assert (four.n_candidates, four.n_false_positives) == (4, 3)
    assert four.curve_fps[-1] == 3 / 4


def test_candidates_on_excluded_findings_are_ignored():
    # The excluded finding has no diameter (-1): LUNA16 gives it 10 mm, so 4.9 mm away is on it
    # and 5.1 mm away is not.
    annots = ann(("s", 0, 0, 0, 10))
    excluded = ann(("s", 100, 0, 0, -1), ("s", 0, 100, 0, 4.0))
    preds = pred(("s", 0, 0, 0, 0.5), ("s", 104.9, 0, 0, 0.9), ("s", 0, 101.9, 0, 0.8),
                 ("s", 105.1, 0, 0, 0.3))
    r = froc(preds, annots, ["s"], excluded=excluded)
    assert (r.n_detected, r.n_false_positives) == (1, 1)
    assert r.cpm == 1.0  # the only FP ranks below the nodule
    assert froc(preds, annots, ["s"]).n_false_positives == 3


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_froc_matches_the_official_logic_on_random_cases(seed):
    preds, annots, excluded, uids = random_case(seed)
    for exc in ((), excluded):
        r = froc(preds, annots, uids, excluded=list(exc))
        expected = official_froc(preds, annots, uids, exc)
        np.testing.assert_allclose(r.sensitivities, expected, rtol=0, atol=1e-12)
    rates = (0.1, 0.3, 1.7, 3.0)  # any positive rates, not only LUNA16's seven
    np.testing.assert_allclose(froc(preds, annots, uids, rates, excluded=excluded).sensitivities,
                               official_froc(preds, annots, uids, excluded, rates), atol=1e-12)


def test_tables_can_be_csv_dataframe_dict_or_rows(tmp_path):
    preds, annots, excluded, uids = random_case(7)
    pd.DataFrame(preds).to_csv(tmp_path / "pred.csv", index=False)
    pd.DataFrame(annots).to_csv(tmp_path / "ann.csv", index=False)
    (tmp_path / "uids.csv").write_text("\n".join(uids) + "\n")
    expected = froc(preds, annots, uids).sensitivities
    as_dict = {k: [p[k] for p in preds] for k in PRED_COLS}
    for p, a, u in [(tmp_path / "pred.csv", tmp_path / "ann.csv", tmp_path / "uids.csv"),
                    (pd.DataFrame(preds), pd.DataFrame(annots), np.array(uids)),
                    (as_dict, str(tmp_path / "ann.csv"), pd.DataFrame({"seriesuid": uids}))]:
        np.testing.assert_allclose(froc(p, a, u).sensitivities, expected, atol=1e-12)


def test_user_errors_name_the_problem(tmp_path):
    annots = ann(("a", 0, 0, 0, 10))
    with pytest.raises(MedfoundError, match="probability"):
        froc([{"seriesuid": "a", "coordX": 0, "coordY": 0, "coordZ": 0}], annots, ["a"])
    with pytest.raises(MedfoundError, match="more than once"):
        froc([], annots, ["a", "a"])
    with pytest.raises(MedfoundError, match="no annotated nodule"):
        froc([], annots, ["b"])
    with pytest.raises(MedfoundError, match="no prediction row belongs"):
        froc(pred(("x", 0, 0, 0, 0.5)), annots, ["a"])
    with pytest.raises(MedfoundError, match="not found"):
        froc(tmp_path / "missing.csv", annots, ["a"])
    with pytest.raises(MedfoundError, match="coordZ is not a finite"):
        froc(pred(("a", 0, 0, float("nan"), 0.5)), annots, ["a"])


# ---------------------------------------------------------------------------------------------
# Bootstrap CI


@pytest.mark.parametrize(("block_cells", "coarse"), [(None, False), (40, True), (200, False)])
def test_bootstrap_samples_equal_the_official_froc_of_resampled_scans(
        monkeypatch, block_cells, coarse):
    # Each sample is a multiset of scans; the vectorised CPMs must equal the official
    # computeFROC on the concatenated entries of the drawn scans (generateBootstrapSet) --
    # also when the work is cut into tiny blocks that split long runs of tied scores.
    if block_cells:
        monkeypatch.setattr(importlib.import_module("medfound.metrics.froc"), "_BLOCK_CELLS",
                            block_cells)
    preds, annots, excluded, uids = random_case(11, n_scans=15)
    if coarse:
        for p in preds:
            p["probability"] = round(p["probability"] * 4) / 4
    per_scan = official_entries(preds, annots, excluded, uids)
    rng = np.random.default_rng(5)
    picks = rng.integers(0, len(uids), size=(40, len(uids)))
    weights = np.stack([np.bincount(p, minlength=len(uids)) for p in picks])
    got = _bootstrap_cpms(_match(preds, annots, uids, excluded), weights, LUNA16_FP_RATES)
    for row, cpm in zip(picks, got, strict=True):
        entries = [e for i in row for e in per_scan[uids[i]]]
        sens = official_compute_froc(entries, len(uids), LUNA16_FP_RATES)
        if isinstance(sens, float):  # no nodule in this sample
            assert math.isnan(cpm)
        else:
            assert cpm == pytest.approx(np.mean(sens), abs=1e-12)
    # All weights one: the sample is the evaluation itself.
    full = _bootstrap_cpms(_match(preds, annots, uids, excluded), np.ones((1, len(uids))),
                           LUNA16_FP_RATES)
    assert full[0] == pytest.approx(froc(preds, annots, uids, excluded=excluded).cpm, abs=1e-12)


def test_bootstrap_ci_contains_cpm_is_seeded_and_narrows_with_more_scans():
    small = random_case(21, n_scans=20)
    large = random_case(21, n_scans=200)
    cpm = froc(*small[:2], small[3]).cpm
    lo, hi = froc_cpm_bootstrap(*small[:2], small[3], n_bootstraps=500, seed=3)
    assert lo <= cpm <= hi and lo < hi
    assert froc_cpm_bootstrap(*small[:2], small[3], n_bootstraps=500, seed=3) == (lo, hi)
    assert froc_cpm_bootstrap(*small[:2], small[3], n_bootstraps=500, seed=4) != (lo, hi)
    lo_l, hi_l = froc_cpm_bootstrap(*large[:2], large[3], n_bootstraps=500, seed=3)
    assert lo_l <= froc(*large[:2], large[3]).cpm <= hi_l
    assert hi_l - lo_l < 0.6 * (hi - lo)  # about 1/sqrt(10) of it


# ---------------------------------------------------------------------------------------------
# Recipe JSON, plot


def test_evaluate_luna16_writes_the_recipe_contract(tmp_path):
    preds, annots, excluded, uids = random_case(5)
    pd.DataFrame(preds).to_csv(tmp_path / "pred.csv", index=False)
    out = evaluate_luna16(tmp_path / "pred.csv", pd.DataFrame(annots), uids,
                          n_bootstraps=200)
    assert list(out) == ["cpm", "froc", "cpm_ci95", "n_scans", "n_nodules"]
    assert list(out["froc"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    r = froc(preds, annots, uids)
    assert out["cpm"] == pytest.approx(r.cpm)
    assert list(out["froc"].values()) == pytest.approx(r.sensitivities)
    assert out["cpm_ci95"] == list(froc_cpm_bootstrap(preds, annots, uids, n_bootstraps=200))
    assert (out["n_scans"], out["n_nodules"]) == (len(uids), len(annots))
    assert json.loads(json.dumps(out)) == out  # plain JSON types


def test_plot_froc_writes_a_png(tmp_path):
    preds, annots, _, uids = random_case(3)
    path = plot_froc(froc(preds, annots, uids), tmp_path / "plots" / "froc.png", title="fold 0")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ---------------------------------------------------------------------------------------------
# COCO metrics (MONAI)


def test_coco_map_with_monai():
    # cccwhd boxes in mm: centre x, y, z and size w, h, d.
    gt = [np.array([[0, 0, 0, 10, 10, 10], [40, 0, 0, 6, 6, 6]]), np.array([[5, 5, 5, 8, 8, 8]]),
          np.zeros((0, 6))]
    scores = [np.array([0.9, 0.8]), np.array([0.7]), np.zeros(0)]
    perfect = coco_map(gt, scores, gt)
    assert perfect == {"ap": 1.0, "ar": 1.0, "map": 1.0, "mar": 1.0}
    # The 10 mm cube shifted 9.5 mm along x overlaps 0.5 mm: IoU = 50 / 1950 < 0.1.
    far = [gt[0] + [[9.5, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], gt[1], gt[2]]
    shifted = coco_map(far, scores, gt)
    assert shifted["ap"] < 1.0 and shifted["ar"] == pytest.approx(2 / 3)
    everything_off = [b + [20, 0, 0, 0, 0, 0] for b in gt]
    assert coco_map(everything_off, scores, gt)["ap"] == 0.0
    # A false positive scored above every true box costs precision.
    with_fp = [gt[0], gt[1], np.array([[0, 0, 0, 5, 5, 5]])]
    assert coco_map(with_fp, [scores[0], scores[1], np.array([0.99])], gt)["ap"] < 1.0
    with pytest.raises(MedfoundError, match="6"):
        coco_map([np.zeros((1, 4))], [np.ones(1)], [np.zeros((1, 6))])


def _subgroup_tables():
    # Two scans; a 4 mm and an 8 mm nodule in s1, a 14 mm nodule in s2.
    ann = [{"seriesuid": "s1", "coordX": 0.0, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 4.0},
           {"seriesuid": "s1", "coordX": 50.0, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 8.0},
           {"seriesuid": "s2", "coordX": 0.0, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 14.0}]
    pred = [  # the 8 mm nodule twice (0.9 and 0.6), the 14 mm one once, the 4 mm one missed
        {"seriesuid": "s1", "coordX": 51.0, "coordY": 0.0, "coordZ": 0.0, "probability": 0.9,
         "diameter_mm": 10.0},
        {"seriesuid": "s1", "coordX": 49.0, "coordY": 1.0, "coordZ": 0.0, "probability": 0.6,
         "diameter_mm": 6.0},
        {"seriesuid": "s2", "coordX": 1.0, "coordY": 0.0, "coordZ": 0.0, "probability": 0.8,
         "diameter_mm": 12.0},
        {"seriesuid": "s2", "coordX": 90.0, "coordY": 0.0, "coordZ": 0.0, "probability": 0.95,
         "diameter_mm": 5.0}]  # a false positive above every hit
    return pred, ann


def test_subgroups_count_their_own_nodules_against_every_false_positive():
    from medfound.metrics.froc import froc_by_group, size_bin

    pred, ann = _subgroup_tables()
    labels = [size_bin(a["diameter_mm"]) for a in ann]
    assert labels == ["<6 mm", "6-10 mm", ">10 mm"] and size_bin(10.0) == "6-10 mm"
    groups = froc_by_group(pred, ann, ["s1", "s2"], labels, n_bootstraps=20)
    assert {g: m["n_nodules"] for g, m in groups.items()} == {"<6 mm": 1, "6-10 mm": 1, ">10 mm": 1}
    assert groups["<6 mm"]["cpm"] == 0.0  # missed
    # One FP in 2 scans scores above both hits: at 1/8 and 1/4 FP/scan neither group is found
    # yet; from 1/2 FP/scan on (the FP's own point) both are.
    for name in ("6-10 mm", ">10 mm"):
        assert groups[name]["froc"]["0.25"] < 1.0 and groups[name]["froc"]["1"] == 1.0
    whole = froc(pred, ann, ["s1", "s2"])
    assert whole.n_nodules == 3 and whole.sensitivities[3] == pytest.approx(2 / 3)
    with pytest.raises(MedfoundError, match="one label per annotation row"):
        froc_by_group(pred, ann, ["s1", "s2"], labels[:2])


def test_diameters_by_size_bin_and_duplicate_findings_are_counted():
    from medfound.metrics.froc import diameter_by_size, duplicate_findings

    pred, ann = _subgroup_tables()
    sizes = diameter_by_size(pred, ann, ["s1", "s2"])
    assert sizes["<6 mm"] == {"n_nodules": 1, "n_matched": 0}
    assert sizes["6-10 mm"]["n_matched"] == 1 and sizes["6-10 mm"]["mean_abs_error_mm"] == 2.0
    assert sizes[">10 mm"]["median_relative_error"] == pytest.approx(-2 / 14)
    assert duplicate_findings(pred, ann, ["s1", "s2"], 0.5) == {
        "threshold": 0.5, "n_nodules": 3, "n_with_duplicates": 1, "n_duplicate_findings": 1}
    assert duplicate_findings(pred, ann, ["s1", "s2"], 0.7)["n_with_duplicates"] == 0
    # A 10 mm nodule is in one bin, "6-10 mm", as in froc_by_group: the bins add up to the whole.
    ten = [*ann, {"seriesuid": "s2", "coordX": 0.0, "coordY": 60.0, "coordZ": 0.0,
                  "diameter_mm": 10.0}]
    sizes = diameter_by_size(pred, ten, ["s1", "s2"])
    assert {k: v["n_nodules"] for k, v in sizes.items()} == {"<6 mm": 1, "6-10 mm": 2, ">10 mm": 1}


def test_findings_on_one_object_merge_to_the_most_probable():
    from medfound.infer.boxes import merge_by_centre

    centres = np.array([[0, 0, 0], [3, 0, 0], [20, 0, 0], [0, 0, 9], [24, 0, 0], [0, 7, 0]],
                       float)
    diameters = np.array([10, 8, 6, 6, 20, 6], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.5, 0.85])
    # [3] first; [0] is 9 mm from it (radii 3 + 5 = 8: apart); [1] lies inside [0]; [2] is kept
    # (20 mm from [0], 21.9 from [3]); [4]'s sphere (radius 10) overlaps [2]'s; [5] is 7 mm from
    # [0], outside both radii, but the two spheres (5 + 3 mm) overlap: one object.
    assert merge_by_centre(centres, diameters, scores).tolist() == [3, 0, 2]
    assert merge_by_centre(np.zeros((0, 3)), np.zeros(0), np.zeros(0)).tolist() == []
