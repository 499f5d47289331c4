"""`medfound infer --annotations`: each study's findings scored against its annotated nodules.

The scoring is checked on findings built by hand (distances worked out below), the LUNA16 hit
rule against a brute-force reading of it, bad CSVs as one-line errors, and one CLI run of an
exported tiny detector (random weights) on a phantom study whose annotations hold its own
nodule, nodules placed near and far from the model's findings, and a row of a series not given.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BLOCK_TORCH
from medfound.data.phantoms import make_phantoms
from medfound.errors import MedfoundError
from medfound.export.onnx import export_model_package
from medfound.infer.reference import format_reference, read_annotations, score_findings
from medfound.infer.study import run_studies
from medfound.models.detection import DetectorConfig, build_network
from medfound.train.package import save_model_package

torch.set_num_threads(1)

CFG = DetectorConfig.preset("tiny", spacing_mm=[2.8125, 2.8125, 3.0], patch_size=[32, 32, 16],
                            sw_roi_size=[64, 64, 32], score_thresh=0.02)
THRESHOLD = 0.3
HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]


def _nodule(xyz, d, row=1, uid="s", **extra):
    return {"row": row, "seriesuid": uid, "center_lps_mm": list(xyz), "diameter_mm": d,
            "extra": extra}


def _finding(i, xyz, p, d=5.0):
    return {"id": i, "center_lps_mm": list(xyz), "probability": p, "diameter_mm": d}


def test_found_and_missed_against_hand_computed_distances():
    nodules = [_nodule((0, 0, 0), 10.0, nodule_type="solid"),   # radius 5
               _nodule((30, 0, 0), 6.0, row=2),                 # radius 3
               _nodule((0, 60, 0), 8.0, row=3)]                 # radius 4, nothing near
    findings = [_finding(1, (3, 4, 0), 0.9),      # 5.0 mm from #1: on the radius, not within
                _finding(2, (1, 2, 2), 0.6),      # 3.0 mm from #1: a hit
                _finding(3, (30, 0, 2.9), 0.4),   # 2.9 mm from #2: a hit
                _finding(4, (100, 0, 0), 0.8),    # far from all
                _finding(5, (0, 2, 1.0), 0.5)]    # √5 ≈ 2.236 mm from #1: a hit
    ref = score_findings(findings, nodules)
    n1, n2, n3 = ref["nodules"]
    assert (n1["found"], n1["probability"], n1["distance_mm"], n1["nearest_finding"]) == \
        (True, 0.6, 2.24, 5)  # best hit p 0.6 (#2), not #1's 0.9: #1 lies on the radius
    assert n1["nodule_type"] == "solid" and n1["row"] == 1 and n1["id"] == 1
    assert (n2["found"], n2["probability"], n2["distance_mm"]) == (True, 0.4, 2.9)
    # #3 is missed; its nearest finding is #1 at (3, 4, 0): √(3² + 56²) ≈ 56.08 mm
    assert (n3["found"], n3["probability"], n3["nearest_finding"]) == (False, None, 1)
    assert n3["distance_mm"] == round(math.sqrt(3 ** 2 + 56 ** 2), 2) == 56.08
    assert ref["matches"] == [None, 1, 2, None, 1]
    assert [f["id"] for f in ref["false_positives"]] == [1, 4]
    assert (ref["n_nodules"], ref["n_found"], ref["n_false_positives"]) == (3, 2, 2)

    table = format_reference(ref, 0.3)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["nodule", "centre", "LPS", "mm"] and "type" in lines[0]
    assert lines[1].split()[0] == "#1" and "solid" in lines[1] and "yes" in lines[1]
    assert "0.600" in lines[1] and "2.2 mm" in lines[1]
    assert lines[3].split()[0] == "#3" and " no " in lines[3] and "56.1 mm" in lines[3]
    assert lines[-1] == "  2 of 3 nodules found, 2 false positives at p ≥ 0.3"
    assert "#4" in table and "(100.0, 0.0, 0.0)" in table


def test_a_finding_within_two_nodules_matches_the_nearer_and_no_findings_means_no_distance():
    nodules = [_nodule((0, 0, 0), 20.0), _nodule((6, 0, 0), 10.0, row=2)]
    ref = score_findings([_finding(1, (4, 0, 0), 0.7)], nodules)
    assert ref["matches"] == [2] and ref["n_found"] == 2 and ref["false_positives"] == []
    empty = score_findings([], nodules)
    assert [n["distance_mm"] for n in empty["nodules"]] == [None, None]
    assert empty["n_found"] == 0 and "0 of 2 nodules found, 0 false positives" in \
        format_reference(empty)
    none = score_findings([_finding(1, (4, 0, 0), 0.7)], [])
    assert none["matches"] == [None] and none["n_false_positives"] == 1
    assert "no annotated nodule" in format_reference(none)


def test_false_positives_are_exactly_the_findings_within_no_nodules_radius():
    rng = np.random.default_rng(3)
    nodules = [_nodule(rng.uniform(-40, 40, 3), float(rng.uniform(4, 25)), row=i + 1)
               for i in range(12)]
    findings = [_finding(i + 1, rng.uniform(-50, 50, 3), float(rng.uniform(0.3, 1)))
                for i in range(300)]
    ref = score_findings(findings, nodules)

    def inside(f, n):
        return math.dist(f["center_lps_mm"], n["center_lps_mm"]) < n["diameter_mm"] / 2

    expected_fp = [f["id"] for f in findings if not any(inside(f, n) for n in nodules)]
    assert 0 < len(expected_fp) < len(findings)
    assert [f["id"] for f in ref["false_positives"]] == expected_fp
    for f, m in zip(findings, ref["matches"], strict=True):
        assert (m is None) == (f["id"] in expected_fp)
        if m is not None:
            assert inside(f, nodules[m - 1])
    for n, got in zip(nodules, ref["nodules"], strict=True):
        hit = [f["probability"] for f in findings if inside(f, n)]
        assert got["found"] == bool(hit)
        assert got["probability"] == (round(max(hit), 4) if hit else None)
        assert got["distance_mm"] == round(min(math.dist(f["center_lps_mm"], n["center_lps_mm"])
                                               for f in findings), 2)


def test_scoring_runs_without_torch_or_monai():
    script = BLOCK_TORCH + (
        "import sys\n"
        "from medfound.infer.reference import score_findings\n"
        "import medfound.infer.study\n"
        "ref = score_findings([{'id': 1, 'center_lps_mm': [1, 0, 0], 'probability': 0.5}],\n"
        "    [{'row': 1, 'center_lps_mm': [0, 0, 0], 'diameter_mm': 4.0}])\n"
        "assert ref['n_found'] == 1, ref\n"
        "assert not any(m.split('.')[0] in ('torch', 'monai') for m in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def _write(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


GOOD = ["1.2.3", "10.0", "-20.5", "-150", "8.2"]


@pytest.mark.parametrize("header,bad_row,expect", [
    (["seriesuid", "coordX", "coordY", "diameter_mm"], None, "lack column(s) coordZ"),
    (HEADER, ["1.2.3", "10.0", "abc", "-150", "8.2"], "row 2 (line 3), column coordY: 'abc' is not"),
    (HEADER, ["1.2.3", "10.0", "-20", "-150", "-4"], "row 2 (line 3), column diameter_mm: -4 "),
    (HEADER, ["1.2.3", "10.0", "-20", "-150", "0"], "row 2 (line 3), column diameter_mm: 0 "),
    (HEADER, ["1.2.3", "nan", "-20", "-150", "5"], "row 2 (line 3), column coordX: 'nan'"),
    (HEADER, ["1.2.3", "10.0", "-20", "", "5"], "row 2 (line 3), column coordZ: '' is not"),
    (HEADER, ["1.2.3", "10.0", "-20"], "row 2 (line 3), column coordZ: '' is not"),
    (HEADER, ["", "10.0", "-20", "-150", "5"], "row 2 (line 3), column seriesuid: empty"),
    (HEADER, [*GOOD, "x"], "row 2 (line 3) has 6 fields"),
])
def test_a_bad_csv_is_one_line_naming_file_row_and_column(tmp_path, header, bad_row, expect):
    path = _write(tmp_path / "ann.csv", header, [GOOD[:len(header)]] + ([bad_row] if bad_row else []))
    with pytest.raises(MedfoundError) as err:
        read_annotations(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and expect in msg and "\n" not in msg


def test_extra_columns_and_blank_lines_are_tolerated(tmp_path):
    path = _write(tmp_path / "ann.csv", [*HEADER, "nodule_type", "location"],
                  [[*GOOD, "ground-glass", "juxtapleural"], [], [" 4.5.6 ", "1", "2", "3", "4"]])
    nodules = read_annotations(path)
    assert [n["row"] for n in nodules] == [1, 3] and nodules[1]["seriesuid"] == "4.5.6"
    assert nodules[0]["extra"] == {"nodule_type": "ground-glass", "location": "juxtapleural"}
    assert nodules[0]["center_lps_mm"] == [10.0, -20.5, -150.0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("infer_reference")
    phantoms = make_phantoms(root / "phantoms", centers=1, cases=1, seed=5, size="small",
                             progress=False)
    network = build_network(CFG, seed=0)
    with torch.no_grad():  # scores near 0.5: findings all over the volume
        network.classification_head.cls_logits.bias.zero_()
    package = save_model_package(root / "model", network, task="lung_nodule_detection",
                                 model_config=CFG.to_dict(),
                                 preprocessing={"spacing_mm": CFG.spacing_mm, "hu_window": CFG.hu_window})
    export_model_package(package, root / "exp", parity_patches=1, allow_unvalidated=True)
    return {"root": root, "exp": root / "exp", "center": Path(phantoms) / "center_0",
            "study": Path(phantoms) / "center_0" / "case_000" / "ct"}


def test_cli_prints_the_found_missed_table_and_records_it(setup):
    root, study = setup["root"], setup["study"]
    # The model's findings on this study, to place annotated nodules near and far from them.
    plain = run_studies(setup["exp"], [study], root / "plain", threshold=THRESHOLD,
                        max_findings=5, sr=False, progress=False, threads=1)
    rec = plain["studies"][0]
    findings = json.loads((Path(rec["out"]) / "findings.json").read_text())["findings"]
    uid = rec["series_uid"]
    assert len(findings) >= 2
    with open(setup["center"] / "annotations.csv", newline="") as f:
        own = [r for r in csv.DictReader(f)]
    assert own and all(r["seriesuid"] == uid for r in own)
    near = np.asarray(findings[0]["center_lps_mm"]) + [2.0, 0.0, 0.0]
    far = np.asarray(findings[0]["center_lps_mm"]) + [0.0, 0.0, 400.0]
    header = list(own[0])
    rows = [[r[c] for c in header] for r in own]
    rows.append([uid, *map(str, near), "10.0", "solid", "isolated"])
    rows.append([uid, *map(str, far), "6.0", "ground-glass", "isolated"])
    rows.append(["9.9.9", "0", "0", "0", "5.0", "solid", "isolated"])  # a series not given
    ann = _write(root / "annotations.csv", header, rows)

    out = root / "scored"
    proc = subprocess.run([sys.executable, "-m", "medfound", "infer", "--model", str(setup["exp"]),
                           str(study), "--out", str(out), "--threshold", str(THRESHOLD),
                           "--max-findings", "5", "--threads", "1", "--no-sr", "--quiet",
                           "--annotations", str(ann)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((out / uid / "findings.json").read_text())
    assert [f["center_lps_mm"] for f in record["findings"]] == \
        [f["center_lps_mm"] for f in findings]  # the same findings as the plain run
    ref = record["reference"]
    nodules = read_annotations(ann)[:-1]
    assert len(ref["nodules"]) == len(nodules) == len(own) + 2
    for n, got in zip(nodules, ref["nodules"], strict=True):
        dists = [math.dist(f["center_lps_mm"], n["center_lps_mm"]) for f in findings]
        hit = [f["probability"] for f, d in zip(findings, dists, strict=True)
               if d < n["diameter_mm"] / 2]
        assert got["found"] == bool(hit) and got["distance_mm"] == round(min(dists), 2)
        assert got["probability"] == (max(hit) if hit else None)
    assert ref["nodules"][-2]["found"] and ref["nodules"][-2]["distance_mm"] <= 2.0
    assert not ref["nodules"][-1]["found"] and ref["nodules"][-1]["distance_mm"] > 3.0
    for f in record["findings"]:
        m = f["matches_nodule"]
        assert m is None or math.dist(f["center_lps_mm"], nodules[m - 1]["center_lps_mm"]) < \
            nodules[m - 1]["diameter_mm"] / 2
    assert [f["id"] for f in ref["false_positives"]] == \
        [f["id"] for f in record["findings"] if f["matches_nodule"] is None]

    # The table on stdout is the one of findings.json; the unmatched row is one warning.
    assert format_reference(ref, THRESHOLD) in proc.stdout
    k, n, m = ref["n_found"], ref["n_nodules"], ref["n_false_positives"]
    assert f"{k} of {n} nodules found, {m} false positive" in proc.stdout
    assert "ground-glass" in proc.stdout and " no " in proc.stdout and " yes " in proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if "match no study" in ln]
    assert len(warnings) == 1 and "9.9.9 (row " in warnings[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"]["unmatched"] == {"9.9.9": [len(rows)]}
    assert (summary["reference"]["n_nodules"], summary["reference"]["n_found"],
            summary["reference"]["n_false_positives"]) == (n, k, m)
    assert summary["studies"][0]["reference"] == {"n_nodules": n, "n_found": k,
                                                  "n_false_positives": m}


def test_cli_refuses_a_bad_csv_in_one_line_before_reading_studies(setup, tmp_path):
    ann = _write(tmp_path / "bad.csv", HEADER, [GOOD, ["1.2.3", "1", "2", "3", "-5"]])
    proc = subprocess.run([sys.executable, "-m", "medfound", "infer", "--model", str(setup["exp"]),
                           str(setup["study"]), "--out", str(tmp_path / "out"), "--quiet",
                           "--annotations", str(ann)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(ann) in errors[0] and "row 2" in errors[0] \
        and "diameter_mm" in errors[0]
    assert not (tmp_path / "out" / "summary.json").exists()
