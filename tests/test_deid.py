"""De-identification (PS3.15 Annex E basic profile): what a center relies on before data leaves it.

The inputs are real DICOM files: a small center written here with realistic fake PHI (names,
IDs, birth date, institution, accession, physicians, other patient IDs, request attributes,
references, private tags with PHI, nested sequences) and the files pydicom ships.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medfound.errors import MedfoundError
from medfound.io.deid import (
    REPORT_NAME,
    date_shift_days,
    deidentify,
    keyed_uid,
    patient_shift,
)
from medfound.io.deid_profile import ACTION_CODES, BASIC_PROFILE, action_for

KEY_HEX = "3f1c9a0b7d2e4f6a8c1b3d5e7f9a0c2e4b6d8f1a3c5e7b9d0f2a4c6e8b1d3f5a"
OTHER_KEY_HEX = "a1" * 32
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.2.840.99999.4242."  # UIDs of the fake center
UID_RE = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")

# Two patients; Jane has two studies ten days apart.
JANE = {"name": "Doe^Jane^Marie", "id": "MRN-20417-X", "birth": "19610413",
        "address": "12 Harbour Road, Springfield", "phone": "555-0199",
        "other_id": "OLDMRN-4471"}
BOB = {"name": "Smith^Robert", "id": "MRN-88812-Q", "birth": "19480102",
       "address": "7 Elm Street, Shelbyville", "phone": "555-0143", "other_id": "OLDMRN-9902"}
STUDIES = [  # (patient, study number, date, series count, slices per series)
    (JANE, 1, "20230301", 2, 3),
    (JANE, 2, "20230311", 1, 2),
    (BOB, 3, "20220715", 1, 4),
]
PHI_TEXT = ["Doe^Jane", "Jane", "MRN-20417-X", "Smith^Robert", "MRN-88812-Q", "19610413",
            "19480102", "OLDMRN-4471", "OLDMRN-9902", "Harbour Road", "Elm Street", "555-0199",
            "St Elsewhere", "House^Gregory", "Quinn^Michaela", "Tech^Tom", "CTSCAN-ROOM7",
            "ACC-55239", "STU-77", "RP-99182", "SPS-4410", "County General", "FOLLOWUP"]


def _uid(*parts: int) -> str:
    return ROOT + ".".join(str(p) for p in parts)


def _private_block(ds: Dataset, text: str) -> None:
    """A private creator with PHI in a string and inside a private sequence."""
    block = ds.private_block(0x0011, "ACME PHI 1.0", create=True)
    block.add_new(0x10, "LO", text)
    inner = Dataset()
    inner.PatientName = text
    block.add_new(0x11, "SQ", Sequence([inner]))


def write_ct_slice(path: Path, patient: dict, study: int, series: int, k: int,
                   study_date: str, burned_in: bool = False) -> Dataset:
    """One 8×8 CT slice full of fake PHI; slice k > 0 references slice 0 of its series."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_CLASS
    ds.SOPInstanceUID = _uid(study, series, k + 1)
    ds.StudyInstanceUID = _uid(study)
    ds.SeriesInstanceUID = _uid(study, series)
    ds.FrameOfReferenceUID = _uid(study, 900)
    ds.Modality = "CT"
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth"]
    ds.PatientSex = "F"
    ds.PatientAddress = patient["address"]
    ds.PatientTelephoneNumbers = patient["phone"]
    other = Dataset()
    other.PatientID = patient["other_id"]
    other.IssuerOfPatientID = "County General"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesTime = "102000.5"
    ds.AcquisitionDateTime = f"{study_date}102233.250000"
    ds.InstanceCreationDate = study_date
    ds.AccessionNumber = f"ACC-55239{study}"
    ds.StudyID = f"STU-77{study}"
    ds.StudyDescription = f"CT CHEST {patient['name'].split('^')[1].upper()} FOLLOWUP"
    ds.SeriesDescription = "AX LUNG 1.25"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.InstitutionAddress = "1 Hospital Way, Springfield"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.PerformingPhysicianName = "Quinn^Michaela"
    ds.OperatorsName = "Tech^Tom"
    ds.StationName = "CTSCAN-ROOM7"
    ds.Manufacturer = "ACME Medical"
    ds.SeriesNumber = series
    ds.InstanceNumber = k + 1
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = _uid(study, 800)
    ds.ReferencedStudySequence = Sequence([ref_study])
    request = Dataset()
    request.RequestedProcedureID = "RP-99182"
    request.ScheduledProcedureStepID = "SPS-4410"
    request.RequestedProcedureDescription = f"CT CHEST {patient['name']}"
    ds.RequestAttributesSequence = Sequence([request])
    if k > 0:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CT_CLASS
        ref.ReferencedSOPInstanceUID = _uid(study, series, 1)
        ref.private_block(0x0029, "ACME REF", create=True).add_new(0x01, "LO", patient["name"])
        ds.ReferencedImageSequence = Sequence([ref])
    if burned_in:
        ds.BurnedInAnnotation = "YES"
    _private_block(ds, patient["name"])
    ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    pixels = (np.arange(64, dtype=np.uint16) * (k + 3) + 7 * series + study).reshape(8, 8)
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "STELSEWHERE_PACS"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture
def center(tmp_path: Path) -> Path:
    """tmp/in/caseNN/studyN/seriesN/sliceK.dcm for the STUDIES above (12 files)."""
    root = tmp_path / "in"
    case = {JANE["id"]: "case01", BOB["id"]: "case02"}
    for patient, study, day, n_series, n_slices in STUDIES:
        for series in range(1, n_series + 1):
            for k in range(n_slices):
                path = root / case[patient["id"]] / f"study{study}" / f"series{series}" / f"s{k}.dcm"
                write_ct_slice(path, patient, study, series, k, day)
    return root


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "center.key"
    path.parent.mkdir()
    path.write_text(KEY_HEX + "\n")
    path.chmod(0o600)
    return path


def run(src: Path, out: Path, key_file: Path | None, **kw) -> dict:
    return deidentify(src, out, key_file=key_file, progress=False, **kw)


def dicom_outputs(out: Path) -> dict[str, Dataset]:
    return {p.relative_to(out).as_posix(): pydicom.dcmread(p)
            for p in sorted(out.rglob("*.dcm"))}


def all_elements(ds: Dataset):
    """Every data element of `ds`, at every depth of its sequences."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from all_elements(item)


def tree_snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def as_date(da: str) -> date:
    return date(int(da[:4]), int(da[4:6]), int(da[6:8]))


# --- the profile --------------------------------------------------------------------------


def test_profile_table_is_table_e1_1():
    assert len(BASIC_PROFILE) >= 300
    assert set(BASIC_PROFILE.values()) <= ACTION_CODES
    for tag in BASIC_PROFILE:
        assert keyword_for_tag(tag), f"{tag:08X} is not a DICOM attribute"
    expected = {
        "PatientName": "Z", "PatientID": "Z/D", "PatientBirthDate": "Z", "AccessionNumber": "Z",
        "ReferringPhysicianName": "Z", "StudyDate": "Z", "PatientAddress": "X",
        "OtherPatientIDsSequence": "X", "RequestAttributesSequence": "X",
        "InstitutionName": "X/Z/D", "ReferencedStudySequence": "X/Z",
        "ReferencedImageSequence": "X/Z/U*", "SourceImageSequence": "X/Z/U*",
        "ContentDate": "Z/D", "SeriesDate": "X/D", "SOPInstanceUID": "U",
        "StudyInstanceUID": "U", "SeriesInstanceUID": "U", "FrameOfReferenceUID": "U",
        "ReferencedSOPInstanceUID": "U", "MediaStorageSOPInstanceUID": "U",
    }
    for keyword, code in expected.items():
        assert action_for(pydicom.datadict.tag_for_keyword(keyword)) == code, keyword
    for kept in ("SOPClassUID", "TransferSyntaxUID", "Modality", "PixelData", "Rows"):
        assert action_for(pydicom.datadict.tag_for_keyword(kept)) is None, kept
    assert action_for(0x60023000) == action_for(0x60004000) == "X"  # overlay data, comments
    assert action_for(0x50000010) == "X"  # curve data
    assert all(dictionary_VR(tag) == "UI" for tag, code in BASIC_PROFILE.items() if code == "U")


# --- what the output holds ----------------------------------------------------------------


def test_basic_profile_applied_at_every_depth(center, tmp_path, key_file):
    before = tree_snapshot(center)
    report = run(center, tmp_path / "out", key_file)
    outputs = dicom_outputs(tmp_path / "out")

    assert tree_snapshot(center) == before  # IN is only read
    assert sorted(outputs) == sorted(p.relative_to(center).as_posix()
                                     for p in center.rglob("*.dcm"))
    assert report["files_seen"] == report["files_written"] == 12
    for rel, ds in outputs.items():
        original = pydicom.dcmread(center / rel)
        assert ds.PatientBirthDate == "" and ds.PatientSex == ""
        assert ds.AccessionNumber == "" and ds.StudyID == "" and ds.ReferringPhysicianName == ""
        for removed in ("PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDsSequence",
                        "RequestAttributesSequence", "StudyDescription", "SeriesDescription",
                        "InstitutionAddress", "PerformingPhysicianName"):
            assert removed not in ds, removed
        assert len(ds.ReferencedStudySequence) == 0  # X/Z: emptied
        assert ds.InstitutionName == ds.StationName == ds.OperatorsName == "ANONYMIZED"
        assert not any(elem.tag.is_private for elem in all_elements(ds))
        assert ds.SOPClassUID == original.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert "SourceApplicationEntityTitle" not in ds.file_meta
        assert ds.Manufacturer == "ACME Medical" and ds.Modality == "CT"
        assert ds.ImagePositionPatient == original.ImagePositionPatient
        # the record of what was done
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethod
        codes = [(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning)
                 for c in ds.DeidentificationMethodCodeSequence]
        assert codes == [
            ("113100", "DCM", "Basic Application Confidentiality Profile"),
            ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option")]
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"

    jane = {ds.PatientID for rel, ds in outputs.items() if rel.startswith("case01")}
    bob = {ds.PatientID for rel, ds in outputs.items() if rel.startswith("case02")}
    assert len(jane) == len(bob) == 1 and jane != bob  # one stable pseudonym per patient
    assert all(ds.PatientName == ds.PatientID for ds in outputs.values())
    assert report["private_tags_removed"] >= 12 * 2
    assert report["attributes_removed"]["OtherPatientIDsSequence"] == 12
    assert report["attributes_emptied"]["PatientBirthDate"] == 12
    assert report["patients"] == 2 and report["studies"] == 3 and report["series"] == 4
    assert report["burned_in_risk"] == [] and report["files_skipped"] == 0


def test_no_phi_in_any_output_byte_or_in_the_report(center, tmp_path, key_file):
    files = {name: get_testdata_file(name) for name in
             ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "examples_ybr_color.dcm")}
    for name, path in files.items():
        (center / "shipped").mkdir(exist_ok=True)
        (center / "shipped" / name).write_bytes(Path(path).read_bytes())
    phi = list(PHI_TEXT) + ["CompressedSamples^CT1", "1CT1", "CompressedSamples^MR1",
                            "JFK IMAGING CENTER", "CT01_OC0", "ABCD1234", "CLUNIE1"]
    for path in sorted(center.rglob("*.dcm")):  # every UID the profile replaces
        ds = pydicom.dcmread(path)
        for elem in list(all_elements(ds)) + list(ds.file_meta):
            if elem.VR == "UI" and action_for(elem.tag) == "U" and elem.value:
                phi.append(str(elem.value))
    assert len(phi) > 60

    run(center, tmp_path / "out", key_file, pseudonym_map=tmp_path / "map.json")
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(written) == 12 + 4 + 1  # the report too
    for path in written:
        data = path.read_bytes()
        leaks = [s for s in phi if s.encode() in data]
        assert not leaks, f"{path.name} still holds {leaks}"
    report_text = (tmp_path / "out" / REPORT_NAME).read_text()
    assert KEY_HEX not in report_text and "map.json" not in report_text


def test_series_and_study_structure_survive(center, tmp_path, key_file):
    run(center, tmp_path / "out", key_file)
    outputs = dicom_outputs(tmp_path / "out")
    study1 = {rel: ds for rel, ds in outputs.items() if "/study1/" in rel}
    assert len(study1) == 6  # two series × three slices
    assert len({ds.StudyInstanceUID for ds in study1.values()}) == 1
    assert len({ds.SeriesInstanceUID for ds in study1.values()}) == 2
    assert len({ds.FrameOfReferenceUID for ds in study1.values()}) == 1
    for series in ("series1", "series2"):
        assert len({ds.SeriesInstanceUID for rel, ds in study1.items() if series in rel}) == 1
    assert len({ds.StudyInstanceUID for ds in outputs.values()}) == 3
    assert len({ds.SeriesInstanceUID for ds in outputs.values()}) == 4
    assert len({ds.SOPInstanceUID for ds in outputs.values()}) == 12

    new_uids = {str(e.value) for ds in outputs.values() for e in all_elements(ds)
                if e.VR == "UI" and action_for(e.tag) == "U"}
    new_uids |= {str(ds.file_meta.MediaStorageSOPInstanceUID) for ds in outputs.values()}
    for uid in new_uids:
        assert UID_RE.match(uid) and len(uid) <= 64, uid
        assert pydicom.uid.UID(uid).is_valid

    # every reference to slice 0 now names slice 0's new SOPInstanceUID
    for rel, ds in outputs.items():
        if rel.endswith("s0.dcm"):
            assert "ReferencedImageSequence" not in ds
            continue
        first = outputs[rel.rsplit("/", 1)[0] + "/s0.dcm"]
        (ref,) = ds.ReferencedImageSequence
        assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == CT_CLASS


def test_same_key_same_bytes_other_key_other_uids(center, tmp_path, key_file):
    run(center, tmp_path / "a", key_file)
    run(center, tmp_path / "b", key_file)
    a, b = tree_snapshot(tmp_path / "a"), tree_snapshot(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for rel in a:
        assert a[rel][0] == b[rel][0], rel  # byte for byte, the report included

    other_key = tmp_path / "other.key"
    other_key.write_text(OTHER_KEY_HEX)
    run(center, tmp_path / "c", other_key)
    one, other = dicom_outputs(tmp_path / "a"), dicom_outputs(tmp_path / "c")
    for field in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "PatientID"):
        assert not {ds[field].value for ds in one.values()} & {
            ds[field].value for ds in other.values()}, field
    rel = next(iter(one))
    assert one[rel].SeriesInstanceUID == keyed_uid(
        pydicom.dcmread(center / rel).SeriesInstanceUID, bytes.fromhex(KEY_HEX))


def as_instant(da: str, tm: str = "000000") -> datetime:
    tm = tm.split(".")[0].ljust(6, "0")
    return datetime(int(da[:4]), int(da[4:6]), int(da[6:8]), int(tm[:2]), int(tm[2:4]),
                    int(tm[4:6]))


def test_dates_and_times_shift_per_patient_keeping_intervals(center, tmp_path, key_file):
    run(center, tmp_path / "out", key_file)
    outputs = dicom_outputs(tmp_path / "out")
    key = bytes.fromhex(KEY_HEX)
    for rel, ds in outputs.items():
        original = pydicom.dcmread(center / rel)
        days = date_shift_days(original.PatientID, key)
        shift = patient_shift(original.PatientID, key)
        assert -365 <= days <= -1 and timedelta(days=-366) < shift <= timedelta(days=-1)
        assert shift.total_seconds() % 86400  # the time of day moves too
        for field in ("AcquisitionDate", "ContentDate", "InstanceCreationDate"):  # no time
            assert (as_date(ds[field].value) - as_date(original[field].value)).days == days
        for prefix in ("Study", "Series"):  # a date and its time move as one instant
            moved = as_instant(ds[prefix + "Date"].value, ds[prefix + "Time"].value)
            assert moved - as_instant(original[prefix + "Date"].value,
                                      original[prefix + "Time"].value) \
                == shift
            assert ds[prefix + "Time"].value != original[prefix + "Time"].value
        assert ds.SeriesTime.endswith(".5")  # the fraction of a second is kept
        dt, dt0 = ds.AcquisitionDateTime, original.AcquisitionDateTime
        assert as_instant(dt[:8], dt[8:]) - as_instant(dt0[:8], dt0[8:]) == shift
        assert dt.endswith(".250000")

    def study_instant(rel: str) -> datetime:
        return as_instant(outputs[rel].StudyDate, outputs[rel].StudyTime)

    jane1 = study_instant("case01/study1/series1/s0.dcm")
    jane2 = study_instant("case01/study2/series1/s0.dcm")
    assert jane2 - jane1 == timedelta(days=10)  # the interval within a patient, to the second
    assert outputs["case01/study1/series1/s0.dcm"].StudyDate != "20230301"


def test_remove_dates_leaves_no_real_date_or_time(center, tmp_path, key_file):
    report = run(center, tmp_path / "out", key_file, remove_dates=True)
    assert report["options"]["remove_dates"] is True
    dummies = {"19000101", "000000", "19000101000000"}  # where the action allows D (Type 1)
    for ds in dicom_outputs(tmp_path / "out").values():
        for field in ("StudyDate", "AcquisitionDate", "StudyTime", "PatientBirthDate"):  # Z, X/Z
            assert ds.get(field, "") in ("", None), field
        for field in ("SeriesDate", "ContentDate", "InstanceCreationDate"):  # X/D, Z/D
            assert ds[field].value == "19000101", field
        assert ds.AcquisitionDateTime == "19000101000000"  # X/Z/D
        assert ds.SeriesTime == "000000"
        assert all(e.value in dummies for e in all_elements(ds)
                   if e.VR in ("DA", "DT", "TM") and e.value)
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
                                  "examples_ybr_color.dcm"])
def test_pixel_data_is_byte_identical(tmp_path, key_file, name):
    src = tmp_path / "in" / name
    src.parent.mkdir()
    src.write_bytes(Path(get_testdata_file(name)).read_bytes())
    run(src, tmp_path / "out", key_file)
    original, written = pydicom.dcmread(src), pydicom.dcmread(tmp_path / "out" / name)
    assert written.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert written.PixelData == original.PixelData
    assert written.PatientName != original.PatientName


def test_pixel_data_of_written_slices_is_byte_identical(center, tmp_path, key_file):
    run(center, tmp_path / "out", key_file)
    for rel, ds in dicom_outputs(tmp_path / "out").items():
        assert ds.PixelData == pydicom.dcmread(center / rel).PixelData
        np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(center / rel).pixel_array)


def test_images_that_may_show_text_are_listed(tmp_path, key_file):
    src = tmp_path / "in"
    for name in ("examples_ybr_color.dcm", "JPEG2000.dcm", "CT_small.dcm"):
        (src / "shipped").mkdir(parents=True, exist_ok=True)
        (src / "shipped" / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    write_ct_slice(src / "annotated" / "s0.dcm", BOB, 9, 1, 0, "20220101", burned_in=True)
    report = run(src, tmp_path / "out", key_file)
    risk = {item["path"]: item["reason"] for item in report["burned_in_risk"]}
    assert set(risk) == {"shipped/examples_ybr_color.dcm", "shipped/JPEG2000.dcm",
                         "annotated/s0.dcm"}
    assert "US" in risk["shipped/examples_ybr_color.dcm"]
    assert "Secondary Capture" in risk["shipped/JPEG2000.dcm"]
    assert "BurnedInAnnotation" in risk["annotated/s0.dcm"]
    assert all((tmp_path / "out" / path).is_file() for path in risk)
    assert any("burned_in_risk" in w for w in report["warnings"])


@pytest.mark.parametrize("name", ["priv_SQ.dcm", "nested_priv_SQ.dcm"])
def test_private_sequences_are_removed(tmp_path, key_file, name):
    src = tmp_path / name
    src.write_bytes(Path(get_testdata_file(name)).read_bytes())
    report = run(src, tmp_path / "out", key_file)
    assert report["files_written"] == 1 and report["private_tags_removed"] >= 1
    ds = pydicom.dcmread(tmp_path / "out" / name)
    assert not any(elem.tag.is_private for elem in all_elements(ds))
    assert ds.PatientIdentityRemoved == "YES"


# --- keys, maps, skipped files ------------------------------------------------------------


def test_missing_key_file_is_created_private_and_reused(center, tmp_path):
    key_path = tmp_path / "keys" / "new.key"
    first = run(center, tmp_path / "a", key_path)
    text = key_path.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", text)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert first["options"]["key_source"] == "new key file"
    assert first["options"]["key_fingerprint"] == hashlib.sha256(
        bytes.fromhex(text)).hexdigest()[:8]
    assert text not in (tmp_path / "a" / REPORT_NAME).read_text()

    second = run(center, tmp_path / "b", key_path)
    assert second["options"]["key_source"] == "key file"
    assert key_path.read_text().strip() == text
    assert tree_snapshot(tmp_path / "a").keys() == tree_snapshot(tmp_path / "b").keys()
    assert all(p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()
               for p in (tmp_path / "a").rglob("*.dcm"))


def test_without_key_file_a_one_off_key_is_used_and_the_report_warns(center, tmp_path):
    first = run(center, tmp_path / "a", None)
    second = run(center, tmp_path / "b", None)
    assert first["options"]["key_source"] == "one-off random key"
    assert any("one-off" in w for w in first["warnings"])
    assert first["options"]["key_fingerprint"] != second["options"]["key_fingerprint"]
    a, b = dicom_outputs(tmp_path / "a"), dicom_outputs(tmp_path / "b")
    assert {ds.SeriesInstanceUID for ds in a.values()}.isdisjoint(
        ds.SeriesInstanceUID for ds in b.values())


def test_bad_key_file_is_refused_in_one_line(center, tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not hex at all")
    with pytest.raises(MedfoundError, match="bad.key") as err:
        run(center, tmp_path / "out", bad)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_pseudonym_map_is_written_outside_out_for_the_center(center, tmp_path, key_file):
    map_path = tmp_path / "center-only" / "pseudonyms.json"
    run(center, tmp_path / "out", key_file, pseudonym_map=map_path)
    mapping = json.loads(map_path.read_text())
    assert stat.S_IMODE(map_path.stat().st_mode) == 0o600
    outputs = dicom_outputs(tmp_path / "out")
    jane_out = outputs["case01/study1/series1/s0.dcm"]
    assert mapping["patients"][JANE["id"]] == jane_out.PatientID
    assert mapping["studies"][_uid(1)] == jane_out.StudyInstanceUID
    assert mapping["series"][_uid(1, 1)] == jane_out.SeriesInstanceUID
    assert len(mapping["patients"]) == 2 and len(mapping["series"]) == 4
    assert [p.name for p in (tmp_path / "out").rglob("*.json")] == [REPORT_NAME]


def test_files_that_are_not_dicom_are_skipped_not_copied(center, tmp_path, key_file):
    (center / "notes.txt").write_text("Jane Doe, MRN-20417-X, called on Monday")
    (center / "case01" / "fake.dcm").write_bytes(b"\0" * 128 + b"NOPE" + b"x" * 64)
    broken = center / "case02" / "broken.dcm"
    broken.write_bytes((center / "case02" / "study3" / "series1" / "s0.dcm").read_bytes()[:400])
    report = run(center, tmp_path / "out", key_file)
    assert report["files_seen"] == 15
    assert report["files_written"] == 12 and report["files_skipped"] == 3
    assert sum(report["skipped_reasons"].values()) == 3
    for rel in ("notes.txt", "case01/fake.dcm", "case02/broken.dcm"):
        assert not (tmp_path / "out" / rel).exists()
    assert not list((tmp_path / "out").rglob("*.partial"))


def test_a_single_file_goes_to_out_under_its_name(tmp_path, key_file):
    src = tmp_path / "one.dcm"
    write_ct_slice(src, JANE, 1, 1, 0, "20230301")
    report = run(src, tmp_path / "out", key_file)
    assert report["files_written"] == 1
    assert pydicom.dcmread(tmp_path / "out" / "one.dcm").PatientID.startswith("ANON")


def test_paths_holding_patient_ids_are_warned_about(tmp_path, key_file):
    write_ct_slice(tmp_path / "in" / JANE["id"] / "s0.dcm", JANE, 1, 1, 0, "20230301")
    report = run(tmp_path / "in", tmp_path / "out", key_file)
    assert any("output paths contain" in w for w in report["warnings"])


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["out_is_in", "out_inside_in", "in_inside_out",
                                  "out_not_empty", "map_inside_out", "key_inside_out",
                                  "map_inside_in", "map_exists"])
def test_unsafe_layouts_are_refused_before_anything_is_written(tmp_path, key_file, case):
    parent = tmp_path / "work"
    src, out, kw = parent / "in", parent / "out", {"key_file": key_file}
    if case == "in_inside_out":
        src = out / "in"
    write_ct_slice(src / "s0.dcm", JANE, 1, 1, 0, "20230301")
    if case == "out_is_in":
        out = src
    elif case == "out_inside_in":
        out = src / "deid"
    elif case == "out_not_empty":
        (out / "old").mkdir(parents=True)
    elif case == "map_inside_out":
        kw["pseudonym_map"] = out / "map.json"
    elif case == "key_inside_out":
        kw["key_file"] = out / "k.key"
    elif case == "map_inside_in":
        kw["pseudonym_map"] = src / "map.json"
    elif case == "map_exists":
        kw["pseudonym_map"] = tmp_path / "map.json"
        kw["pseudonym_map"].write_text("{}")
    before = tree_snapshot(parent)
    with pytest.raises(MedfoundError) as err:
        deidentify(src, out, progress=False, **kw)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message  # one line, naming the path
    assert tree_snapshot(parent) == before
    assert not list(parent.rglob(REPORT_NAME))


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    from medfound.io.deid import _atomic_write

    target = tmp_path / "out" / "x.dcm"
    target.mkdir(parents=True)  # a folder in the way: the rename fails
    with pytest.raises(OSError):
        _atomic_write(target, b"DICM" * 100, 0o644)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.dcm"]


# --- the command line ---------------------------------------------------------------------


def test_cli_deid_writes_out_and_refuses_in_one_line(center, tmp_path, key_file):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "medfound", "deid", str(center), str(tmp_path / "out"),
         "--key-file", str(key_file), "--quiet"],
        capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "de-identified 12 files" in done.stdout
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["files_written"] == 12

    refused = subprocess.run(
        [sys.executable, "-m", "medfound", "deid", str(center), str(center / "out"),
         "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "inside IN" in lines[0]
    assert not (center / "out").exists()
