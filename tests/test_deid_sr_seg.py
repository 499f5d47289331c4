"""De-identifying medfound's own DICOM SR and SEG keeps every finding and every reference.

A small CT series written by medfound.io.write, an SR of two findings over it
(medfound.io.sr.write_nodule_sr, as `infer` writes it) and a SEG (medfound.io.seg), all in one
study; the whole folder is de-identified under one key. The findings (measurements, image
coordinates, codes) must survive, every UID the SR and the SEG reference must name an instance,
series or study of the de-identified CT, no PHI may remain, and the IOD validator (dciodvfy,
where installed) must find no error the input did not have.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from medfound.io.deid import deidentify
from medfound.io.seg import write_nodule_seg
from medfound.io.sr import read_source_headers, write_nodule_sr
from medfound.io.write import write_series

hd = pytest.importorskip("highdicom")

KEY_HEX = "5e" * 32
PHI = ["DOE^JANE", "MRN-20417-X", "ACC-99123", "St Elsewhere"]
FINDINGS = [{"center_lps_mm": [-10.0, -8.0, -4.0], "diameter_mm": 6.5, "probability": 0.87},
            {"center_lps_mm": [4.0, 2.0, 0.0], "diameter_mm": 9.25, "probability": 0.42}]


def walk(ds):
    """Every data element of `ds`, at every depth."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from walk(item)


def content_items(ds):
    """Every SR content item (a dataset with a ValueType), at every depth."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def findings_of(sr) -> dict:
    """What a reader takes from an SR: numbers with their units and concepts, region
    coordinates, codes, and the number of content items."""
    items = list(content_items(sr))
    nums = sorted((str(i.ConceptNameCodeSequence[0].CodeValue),
                   float(i.MeasuredValueSequence[0].NumericValue),
                   str(i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue))
                  for i in items if i.ValueType == "NUM")
    scoords = sorted((str(i.GraphicType), tuple(round(float(v), 4) for v in i.GraphicData))
                     for i in items if i.ValueType == "SCOORD")
    codes = sorted((str(i.ConceptNameCodeSequence[0].CodeValue),
                    str(i.ConceptCodeSequence[0].CodeValue),
                    str(i.ConceptCodeSequence[0].CodingSchemeDesignator))
                   for i in items if i.ValueType == "CODE")
    return {"n_items": len(items), "nums": nums, "scoords": scoords, "codes": codes}


def validator_errors(path) -> set[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """in/ct (8 slices), in/sr/findings_sr.dcm, in/seg/segmentation.dcm; out/ de-identified."""
    root = tmp_path_factory.mktemp("deid_sr")
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -20.0, -10.0]
    array = np.full((40, 40, 8), -800.0, np.float32)
    paths = write_series(array, affine, root / "in" / "ct", "CT", {
        "PatientName": "DOE^JANE", "PatientID": "MRN-20417-X", "AccessionNumber": "ACC-99123",
        "InstitutionName": "St Elsewhere Hospital", "StudyDate": "20230301",
        "StudyTime": "101500"})
    headers = read_source_headers(paths)
    write_nodule_sr(FINDINGS, headers, root / "in" / "sr" / "findings_sr.dcm",
                    algorithm_name="detector", algorithm_version="1.2",
                    model_sha256="ab" * 32)
    frames = np.zeros((len(headers), 40, 40), np.uint8)
    frames[3, 12:18, 10:15] = 1
    frames[4, 13:17, 11:14] = 1
    (root / "in" / "seg").mkdir()
    write_nodule_seg(frames, headers, root / "in" / "seg" / "segmentation.dcm",
                     algorithm_name="detector", algorithm_version="1.2")
    key = root / "center.key"
    key.write_text(KEY_HEX + "\n")
    report = deidentify(root / "in", root / "out", key_file=key, progress=False)
    return root, report, frames


def _ct(root, side):
    return [pydicom.dcmread(p) for p in sorted((root / side / "ct").glob("*.dcm"))]


def test_sr_findings_survive_de_identification(study):
    root, report, _ = study
    before = pydicom.dcmread(root / "in" / "sr" / "findings_sr.dcm")
    after = pydicom.dcmread(root / "out" / "sr" / "findings_sr.dcm")
    assert report["files_written"] == 10 and report["files_failed"] == 0

    assert len(after.ContentSequence) == len(before.ContentSequence) > 0
    assert findings_of(after) == findings_of(before)
    nums = findings_of(after)["nums"]
    assert [v for _, v, unit in nums if unit == "mm"] == [6.5, 9.25]
    assert [v for _, v, unit in nums if unit == "%"] == [42.0, 87.0]
    assert len(findings_of(after)["scoords"]) == 2
    # highdicom reads the result as the TID 1500 report it is
    report_sr = hd.sr.Comprehensive3DSR.from_dataset(after)
    groups = report_sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    assert sorted(float(m.value) for g in groups for m in g.get_measurements()) == \
        [6.5, 9.25, 42.0, 87.0]

    # free text of TEXT items is replaced; the record says how the tree was cleaned
    texts = [i.TextValue for i in content_items(after) if i.ValueType == "TEXT"]
    assert texts and set(texts) == {"ANONYMIZED"}
    codes = [c.CodeValue for c in after.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113104", "113107"]
    assert after.PatientIdentityRemoved == "YES"
    assert report["structured_content_cleaned"] == 1


def test_every_uid_the_sr_and_seg_reference_resolves_to_the_de_identified_ct(study):
    root, _, _ = study
    ct = _ct(root, "out")
    instances = {ds.SOPInstanceUID for ds in ct}
    (series,) = {ds.SeriesInstanceUID for ds in ct}
    (study_uid,) = {ds.StudyInstanceUID for ds in ct}
    originals = {ds.SOPInstanceUID for ds in _ct(root, "in")}
    assert not instances & originals

    sr = pydicom.dcmread(root / "out" / "sr" / "findings_sr.dcm")
    seg = pydicom.dcmread(root / "out" / "seg" / "segmentation.dcm")
    for obj in (sr, seg):
        assert obj.StudyInstanceUID == study_uid and obj.PatientID == ct[0].PatientID
        refs = {str(e.value) for e in walk(obj) if e.keyword == "ReferencedSOPInstanceUID"}
        assert refs and refs <= instances, refs - instances
        ref_series = {str(e.value) for e in walk(obj) if e.keyword == "SeriesInstanceUID"}
        assert series in ref_series
        frame_refs = {str(e.value) for e in walk(obj) if e.keyword in (
            "FrameOfReferenceUID", "ReferencedFrameOfReferenceUID")}
        assert frame_refs <= {ct[0].FrameOfReferenceUID}
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study_uid
    listed = {i.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence
              for i in s.ReferencedSOPSequence}
    assert listed == instances  # every source image is still listed as evidence


def test_seg_segments_frames_and_references_survive(study):
    root, _, frames = study
    before = pydicom.dcmread(root / "in" / "seg" / "segmentation.dcm")
    after = pydicom.dcmread(root / "out" / "seg" / "segmentation.dcm")
    assert after.PixelData == before.PixelData
    assert len(after.PerFrameFunctionalGroupsSequence) == int(after.NumberOfFrames) == 2
    assert [s.SegmentLabel for s in after.SegmentSequence] == ["Nodule"]
    assert after.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == \
        before.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue
    for b, a in zip(before.PerFrameFunctionalGroupsSequence,
                    after.PerFrameFunctionalGroupsSequence, strict=True):
        assert a.PlanePositionSequence[0].ImagePositionPatient == \
            b.PlanePositionSequence[0].ImagePositionPatient
    (series,) = after.ReferencedSeriesSequence
    assert len(series.ReferencedInstanceSequence) == 8

    seg = hd.seg.Segmentation.from_dataset(after)
    headers = _ct(root, "out")
    read_back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in headers], segment_numbers=[1],
        combine_segments=True, ignore_spatial_locations=True)
    np.testing.assert_array_equal(read_back, frames)


def test_no_phi_and_no_original_uid_left_in_any_output(study):
    root, _, _ = study
    secrets = list(PHI)
    for path in sorted((root / "in").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        secrets += [str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)]
    for path in sorted((root / "out").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            assert not [s for s in secrets if s.encode() in data], path.name


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("rel", ["sr/findings_sr.dcm", "seg/segmentation.dcm", "ct/IM00001.dcm"])
def test_de_identification_adds_no_iod_error(study, rel):
    root, _, _ = study
    assert (root / "in" / rel).is_file()
    new = validator_errors(root / "out" / rel) - validator_errors(root / "in" / rel)
    assert not new, new


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_removing_dates_keeps_the_sr_valid(study, tmp_path):
    """ContentDate and ContentTime are Type 1 in an SR: without dates they get dummies (their
    action is Z/D), never an empty value."""
    root, _, _ = study
    report = deidentify(root / "in" / "sr", tmp_path / "out", key_file=root / "center.key",
                        remove_dates=True, progress=False)
    assert report["files_written"] == 1
    path = tmp_path / "out" / "findings_sr.dcm"
    sr = pydicom.dcmread(path)
    assert (sr.ContentDate, sr.ContentTime, sr.StudyDate) == ("19000101", "000000", "")
    assert findings_of(sr) == findings_of(pydicom.dcmread(root / "in" / "sr" / "findings_sr.dcm"))
    new = validator_errors(path) - validator_errors(root / "in" / "sr" / "findings_sr.dcm")
    assert not new, new
