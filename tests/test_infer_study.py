"""`medfound infer`: DICOM studies in, findings.json + DICOM SR + overview out; bad studies skipped.

The model is an exported tiny detector with random weights and a zero prior bias, so it gives
many detections with scores near 0.5: enough findings to check every output against the torch
detector and the source series.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from conftest import BLOCK_TORCH, export_tiny_detector
from medfound.data.detection import eval_transforms, load_datalist, predictions_to_rows
from medfound.data.phantoms import make_phantoms
from medfound.infer.study import FINDINGS_FORMAT, run_studies
from medfound.io.reader import read_volume
from medfound.models.detection import DetectorConfig, build_detector

torch.set_num_threads(1)

CFG = DetectorConfig.preset("tiny", spacing_mm=[2.8125, 2.8125, 3.0], patch_size=[32, 32, 16],
                            sw_roi_size=[64, 64, 32], score_thresh=0.02)
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("infer_study")
    phantoms = make_phantoms(root / "phantoms", centers=1, cases=2, seed=5, size="small",
                             progress=False)
    network, exp = export_tiny_detector(root, CFG)
    items = load_datalist(phantoms, None, "all")
    return {"root": root, "exp": exp, "network": network.eval(), "items": items}


def _corrupt_copy(study: Path, dst: Path) -> Path:
    """A copy of `study` with one slice file cut short (its pixel data is incomplete)."""
    shutil.copytree(study, dst)
    victim = sorted(dst.iterdir())[len(list(dst.iterdir())) // 2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return dst


@pytest.fixture(scope="module")
def run(setup) -> dict:
    root, items = setup["root"], setup["items"]
    good = Path(items[0]["image"])
    bad = _corrupt_copy(good, root / "corrupt_study")
    studies = [good, bad, Path(items[1]["image"])]
    out = root / "out"
    cmd = [sys.executable, "-m", "medfound", "infer", "--model", str(setup["exp"]),
           *map(str, studies), "--out", str(out), "--threshold", str(THRESHOLD),
           "--max-findings", "5", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return {"proc": proc, "out": out, "studies": studies}


def test_a_corrupt_study_is_reported_and_the_others_finish(run):
    proc, out, studies = run["proc"], run["out"], run["studies"]
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one study failed
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["studies"]] == ["ok", "failed", "ok"]
    assert summary["n_ok"] == 2 and summary["n_failed"] == 1
    failed = summary["studies"][1]
    assert str(studies[1]) in failed["error"]
    # Each failure is printed once, on stderr; the tally on stdout.
    assert proc.stderr.count(str(studies[1])) == 1 and "failed:" in proc.stderr
    assert "2 ok, 1 failed" in proc.stdout and "failed:" not in proc.stdout
    for rec in (summary["studies"][0], summary["studies"][2]):
        assert set(rec["timings_s"]) == {"read", "preprocess", "network", "postprocess", "write"}
        assert all(v >= 0 for v in rec["timings_s"].values())
        assert rec["timings_s"]["network"] > 0
    # Only the good studies have folders; nothing half-written is left.
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted(rec["series_uid"] for rec in summary["studies"] if rec["status"] == "ok")


def test_findings_json_has_world_and_voxel_centres_and_the_model_hash(run, setup):
    summary = json.loads((run["out"] / "summary.json").read_text())
    card = json.loads((setup["exp"] / "model_card.json").read_text())
    rec = summary["studies"][0]
    findings = json.loads((Path(rec["out"]) / "findings.json").read_text())
    assert findings["format"] == FINDINGS_FORMAT
    assert findings["model"]["sha256"] == card["onnx"]["sha256"]
    assert findings["model"]["version"] == card["versions"]["medfound"]
    assert 1 <= len(findings["findings"]) <= 5
    volume = read_volume(run["studies"][0])
    assert findings["series_uid"] == volume.series_uid
    probs = [f["probability"] for f in findings["findings"]]
    assert probs == sorted(probs, reverse=True) and min(probs) >= THRESHOLD
    for f in findings["findings"]:
        # the voxel centre is the LPS centre seen through the study's own affine
        world = volume.voxel_to_world(np.asarray(f["center_voxel"]))[0]
        np.testing.assert_allclose(world, f["center_lps_mm"], atol=0.02)
        assert f["diameter_mm"] > 0 and len(f["size_mm"]) == 3
    png = (Path(rec["out"]) / "overview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_sr_is_a_tid1500_report_referencing_the_source_series(run):
    summary = json.loads((run["out"] / "summary.json").read_text())
    rec = summary["studies"][0]
    findings = json.loads((Path(rec["out"]) / "findings.json").read_text())["findings"]
    sr = pydicom.dcmread(Path(rec["out"]) / "findings_sr.dcm")
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(run["studies"][0].iterdir())]
    uids = {ds.SOPInstanceUID for ds in sources}
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.PatientID == sources[0].PatientID
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID  # its own series in the study
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSOPSequence} == uids

    import highdicom as hd

    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()
    assert len(groups) == len(findings)
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    for group, finding in zip(groups, findings, strict=True):
        measured = {m.name.meaning: m.value for m in group.get_measurements()}
        assert measured["Diameter"] == pytest.approx(finding["diameter_mm"], abs=0.01)
        assert measured["Certainty of Finding"] == pytest.approx(100 * finding["probability"], abs=0.01)
        roi = group.roi
        assert roi.GraphicType == "CIRCLE"
        ref = roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        src = by_uid[ref]
        # the referenced slice is the one whose plane is nearest the finding's centre
        normal = np.cross(np.asarray(src.ImageOrientationPatient[:3], float),
                          np.asarray(src.ImageOrientationPatient[3:], float))
        dist = abs(float(np.dot(np.asarray(finding["center_lps_mm"]) - np.asarray(src.ImagePositionPatient, float), normal)))
        assert dist <= float(src.SliceThickness) / 2 + 1e-3


def test_an_unvalidated_model_says_so_on_the_run_in_findings_and_in_the_sr(run, setup, tmp_path):
    from pydicom.sr.codedict import codes

    from medfound.io.sr import read_source_headers, write_nodule_sr

    assert "NOT VALIDATED" in run["proc"].stderr  # the export was allowed unvalidated
    summary = json.loads((run["out"] / "summary.json").read_text())
    rec = summary["studies"][0]
    findings = json.loads((Path(rec["out"]) / "findings.json").read_text())
    assert findings["model"]["validation"]["status"] == "not validated"
    assert "NOT VALIDATED" in findings["model"]["validation"]["use"]
    sr = pydicom.dcmread(Path(rec["out"]) / "findings_sr.dcm")
    assert "NOT VALIDATED" in sr.SeriesDescription
    # With nothing found, only a validated model's SR says "Absent".
    headers = read_source_headers(sorted(run["studies"][0].iterdir()))
    values = {}
    for validated in (False, True):
        path = write_nodule_sr([], headers, tmp_path / f"{validated}.dcm", algorithm_name="m",
                               algorithm_version="1", validated=validated)
        text = str(pydicom.dcmread(path))
        values[validated] = [c for c in (codes.SCT.Absent, codes.SCT.Indeterminate) if c.value in text]
    assert values == {False: [codes.SCT.Indeterminate], True: [codes.SCT.Absent]}


def test_findings_equal_the_torch_detector_on_the_same_study(run, setup):
    """ORT + numpy preprocessing vs MONAI transforms + MONAI's RetinaNetDetector, same weights."""
    item = setup["items"][0]
    detector = build_detector(CFG, setup["network"]).eval()
    detector.set_sliding_window_inferer(roi_size=CFG.sw_roi_size, overlap=CFG.sw_overlap,
                                        sw_batch_size=CFG.sw_batch_size, mode=CFG.sw_mode)
    detector.set_box_selector_parameters(score_thresh=CFG.score_thresh,
                                         topk_candidates_per_level=CFG.topk_candidates_per_level,
                                         nms_thresh=CFG.nms_thresh,
                                         detections_per_img=CFG.detections_per_img)
    data = eval_transforms(CFG.to_dict())(dict(item))
    with torch.no_grad():
        out = detector([data["image"]], use_inferer=True)[0]
    rows = predictions_to_rows(item["seriesuid"], out["box"], out["label_scores"],
                               np.asarray(data["image"].affine))
    torch_top = [r for r in rows if r["probability"] >= THRESHOLD][:5]
    summary = json.loads((run["out"] / "summary.json").read_text())
    findings = json.loads((Path(summary["studies"][0]["out"]) / "findings.json").read_text())["findings"]
    assert len(findings) == len(torch_top) > 0
    for f, r in zip(findings, torch_top, strict=True):
        np.testing.assert_allclose(f["center_lps_mm"], [r["coordX"], r["coordY"], r["coordZ"]], atol=0.05)
        assert f["probability"] == pytest.approx(r["probability"], abs=1e-3)
        assert f["diameter_mm"] == pytest.approx(r["diameter_mm"], abs=0.05)


def test_nifti_study_gets_findings_without_sr_and_no_torch_is_needed(setup, tmp_path):
    """The whole study pipeline in a process where torch and MONAI cannot be imported."""
    volume = read_volume(setup["items"][1]["image"])
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine  # LPS → RAS for NIfTI
    nifti = tmp_path / "study.nii.gz"
    nib.save(nib.Nifti1Image(volume.array, ras), nifti)
    dicom = Path(setup["items"][1]["image"])
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import sys
        from medfound.infer.study import run_studies
        s = run_studies({str(setup["exp"])!r}, [{str(nifti)!r}, {str(dicom)!r}], {str(tmp_path / "out")!r},
                        threshold={THRESHOLD}, max_findings=5, threads=1, progress=False)
        assert not any(m.split(".")[0] in ("torch", "monai") for m in sys.modules)
        assert s["n_ok"] == 2, s
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    nii, dcm = summary["studies"]
    assert "sr" not in nii["outputs"] and dcm["outputs"]["sr"] == "findings_sr.dcm"
    a = json.loads((Path(nii["out"]) / "findings.json").read_text())["findings"]
    b = json.loads((Path(dcm["out"]) / "findings.json").read_text())["findings"]
    # the same image through NIfTI and DICOM gives the same findings in LPS mm
    assert len(a) == len(b) > 0
    for fa, fb in zip(a, b, strict=True):
        np.testing.assert_allclose(fa["center_lps_mm"], fb["center_lps_mm"], atol=0.05)
        assert fa["probability"] == pytest.approx(fb["probability"], abs=1e-3)


def test_bad_arguments_are_one_line_errors(setup, tmp_path):
    with pytest.raises(Exception, match="threshold"):
        run_studies(setup["exp"], [tmp_path], tmp_path / "o", threshold=1.5, progress=False)
    proc = subprocess.run([sys.executable, "-m", "medfound", "infer", "--model", str(tmp_path),
                           str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "model_card.json" in proc.stderr and "Traceback" not in proc.stderr
