"""Synthetic multi-center studies: what the later stages rely on.

Phantoms are generated once per session into a temporary folder and checked through the real
reader (`read_volume`), pydicom and MONAI's datalist loader — the same tools a center uses.
World coordinates are LPS mm; `Volume.world_to_voxel` turns them into (i, j, k) indices.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from monai.data import load_decathlon_datalist

from medfound.data.phantoms import (
    ANNOTATION_COLUMNS,
    LUNA16_COLUMNS,
    center_sizes,
    make_phantoms,
)
from medfound.errors import MedfoundError
from medfound.io.reader import read_volume

SEED = 5
CT_MR = "1.2.840.10008.5.1.4.1.1.4"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


@pytest.fixture(scope="session")
def ct_set(tmp_path_factory) -> Path:
    """Three CT-only centers of up to three cases (the third center has one)."""
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "ct", centers=3, cases=3,
                         seed=SEED, size="small", progress=False)


@pytest.fixture(scope="session")
def all_set(tmp_path_factory) -> Path:
    """Three centers, one case each, with CT, MR, PET and ultrasound."""
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "all", centers=3, cases=1,
                         seed=SEED, modalities=("ct", "mr", "pet", "us"), size="small",
                         progress=False)


def entries(center: Path) -> list[dict]:
    datalist = json.loads((center / "datalist.json").read_text())
    return datalist["training"] + datalist["validation"]


def first_file(folder: Path) -> pydicom.Dataset:
    return pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])


# --- layout -------------------------------------------------------------------------------


def test_layout_one_folder_per_center_and_case(ct_set: Path) -> None:
    sizes = center_sizes(3, 3)
    assert sizes == [3, 3, 1]
    manifest = json.loads((ct_set / "phantoms.json").read_text())
    assert manifest["complete"] and manifest["center_cases"] == sizes
    for c, n in enumerate(sizes):
        center = ct_set / f"center_{c}"
        cases = sorted(p.name for p in center.iterdir() if p.is_dir())
        assert cases == [f"case_{i:03d}" for i in range(n)]
        for case in cases:
            assert len(list((center / case / "ct").glob("*.dcm"))) >= 60
        assert {p.name for p in center.iterdir() if p.is_file()} == {
            "annotations.csv", "datalist.json", "center.json"}


# --- nodules ------------------------------------------------------------------------------


def test_annotated_nodules_are_at_their_world_coordinates(ct_set: Path) -> None:
    checked = 0
    for center in sorted(ct_set.glob("center_*")):
        for e in entries(center):
            vol = read_volume(center / e["image"])
            assert vol.modality == "CT" and vol.units == "HU"
            assert vol.series_uid == e["seriesuid"]
            for box, kind in zip(e["box"], e["nodule_type"], strict=True):
                ijk = vol.world_to_voxel([box[:3]])[0]
                assert np.all(ijk >= 0) and np.all(ijk <= np.array(vol.shape) - 1)
                # Nodules a voxel or two across are blurred into the lung: check the rest.
                if box[3] < 2.5 * max(vol.spacing):
                    continue
                i, j, k = np.round(ijk).astype(int)
                centre = float(vol.array[i, j, k])
                # The lung around it: an in-plane ring 4–10 mm outside the nodule.
                ii, jj = np.meshgrid(np.arange(vol.shape[0]), np.arange(vol.shape[1]), indexing="ij")
                r = np.hypot((ii - ijk[0]) * vol.spacing[0], (jj - ijk[1]) * vol.spacing[1])
                ring = vol.array[:, :, k][(r > box[3] / 2 + 4) & (r < box[3] / 2 + 10)]
                lung = float(np.median(ring))
                assert lung < -700, (center.name, e["case"], box)
                assert centre - lung > 150, (center.name, e["case"], kind, box, centre, lung)
                if kind == "solid":
                    assert -250 < centre < 250
                elif kind == "ground-glass":
                    assert -750 < centre < -300
                checked += 1
    assert checked >= 3, "the seed should give some nodules big enough to check"


def test_annotations_csv_has_luna16_columns_and_the_ct_series_uids(ct_set: Path) -> None:
    for center in sorted(ct_set.glob("center_*")):
        with (center / "annotations.csv").open(newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == ANNOTATION_COLUMNS
            assert reader.fieldnames[:5] == LUNA16_COLUMNS  # LUNA16's, then type and location
            rows = list(reader)
        series = {e["seriesuid"]: e for e in entries(center)}
        for e in series.values():
            assert first_file(center / e["image"]).SeriesInstanceUID == e["seriesuid"]
        assert {r["seriesuid"] for r in rows} <= set(series)
        assert len(rows) == sum(len(e["box"]) for e in series.values())
        for r in rows:
            entry = series[r["seriesuid"]]
            n = next(n for n, b in enumerate(entry["box"])
                     if np.allclose(b[:3], [float(r[c]) for c in ("coordX", "coordY", "coordZ")]))
            assert entry["box"][n][3:] == [float(r["diameter_mm"])] * 3
            assert r["nodule_type"] == entry["nodule_type"][n]
            assert r["location"] == entry["nodule_location"][n] == "isolated"
            assert 3.0 <= float(r["diameter_mm"]) <= 30.0


def test_datalist_is_monai_style_with_a_deterministic_validation_split(ct_set: Path) -> None:
    center = ct_set / "center_0"
    raw = json.loads((center / "datalist.json").read_text())
    assert [e["case"] for e in raw["training"]] == ["case_000", "case_001"]
    assert [e["case"] for e in raw["validation"]] == ["case_002"]
    for key in ("training", "validation"):
        loaded = load_decathlon_datalist(center / "datalist.json", is_segmentation=False,
                                         data_list_key=key, base_dir=center)
        for item, e in zip(loaded, raw[key], strict=True):
            assert Path(item["image"]).is_dir() and any(Path(item["image"]).glob("*.dcm"))
            assert len(item["box"]) == len(item["label"]) == len(e["nodule_type"])
            assert all(len(b) == 6 and b[3] == b[4] == b[5] for b in item["box"])
            assert set(item["label"]) <= {0}


# --- centers ------------------------------------------------------------------------------


def test_centers_differ_like_real_ones_and_headers_say_so(ct_set: Path) -> None:
    profiles = [json.loads((ct_set / f"center_{c}" / "center.json").read_text()) for c in range(3)]
    assert len({p["manufacturer"] for p in profiles}) == 3
    assert len({p["slice_thickness_mm"] for p in profiles}) == 3
    assert len({p["pixel_spacing_mm"] for p in profiles}) == 3
    assert len({p["kernel"] for p in profiles}) == 3
    assert len({p["hu_offset"] for p in profiles}) == 3
    assert profiles[2]["cases"] < profiles[0]["cases"] == profiles[1]["cases"]
    for c, prof in enumerate(profiles):
        folder = ct_set / f"center_{c}" / "case_000" / "ct"
        ds = first_file(folder)
        assert ds.Manufacturer == prof["manufacturer"]
        assert ds.ManufacturerModelName == prof["model"]
        assert ds.ConvolutionKernel == prof["kernel"]
        assert float(ds.SliceThickness) == prof["slice_thickness_mm"]
        vol = read_volume(folder)
        assert vol.spacing == pytest.approx((prof["pixel_spacing_mm"], prof["pixel_spacing_mm"],
                                             prof["spacing_between_slices_mm"]))
        assert vol.shape[:2] == (128, 128) and 60 <= vol.shape[2] <= 140
        assert not vol.warnings


def test_raw_files_carry_fake_phi_for_deidentification_to_remove(all_set: Path) -> None:
    ids = set()
    for center in sorted(all_set.glob("center_*")):
        case = center / "case_000"
        headers = [first_file(case / m) for m in ("ct", "mr", "pet", "us")]
        ct = headers[0]
        assert "^" in str(ct.PatientName) and ct.PatientID.startswith("P")
        for kw in ("PatientBirthDate", "PatientSex", "InstitutionName", "ReferringPhysicianName",
                   "AccessionNumber", "StudyDate", "StudyTime", "OperatorsName",
                   "OtherPatientIDs", "PatientAddress"):
            assert str(ct.get(kw, "")).strip(), kw
        assert ct[0x00110010].value == "MEDFOUND PHANTOM PHI"
        # A private name: readable in explicit VR files, opaque bytes in implicit VR ones.
        name = ct[0x00111002].value
        name = name.decode().strip() if isinstance(name, bytes) else str(name)
        assert name == str(ct.PatientName)
        # One patient, four studies.
        assert {h.PatientID for h in headers} == {ct.PatientID}
        assert len({h.StudyInstanceUID for h in headers}) == 4
        ids.add(ct.PatientID)
    assert len(ids) == 3


# --- other modalities ---------------------------------------------------------------------


def test_pet_carries_what_body_weight_suv_needs(all_set: Path) -> None:
    folder = all_set / "center_0" / "case_000" / "pet"
    ds = first_file(folder)
    assert ds.Modality == "PT" and ds.Units == "BQML" and ds.DecayCorrection == "START"
    assert "ATTN" in ds.CorrectedImage and "DECY" in ds.CorrectedImage
    rp = ds.RadiopharmaceuticalInformationSequence[0]
    assert rp.Radiopharmaceutical == "Fluorodeoxyglucose"
    assert 3.0e8 < float(rp.RadionuclideTotalDose) < 4.4e8
    assert float(rp.RadionuclideHalfLife) == pytest.approx(6586.2)
    injected = datetime.strptime(rp.RadiopharmaceuticalStartDateTime[:14], "%Y%m%d%H%M%S")
    start = datetime.strptime(ds.SeriesDate + ds.SeriesTime[:6], "%Y%m%d%H%M%S")
    minutes = (start - injected).total_seconds() / 60
    assert 50 < minutes < 80
    weight = float(ds.PatientWeight)
    assert 35 < weight < 150
    # SUV by hand from the raw files, and the reader's SUV, agree; the heart is hot.
    decayed = float(rp.RadionuclideTotalDose) * 2 ** (-minutes * 60 / 6586.2)
    peak = max(float(f.pixel_array.max()) * float(f.RescaleSlope)
               for f in map(pydicom.dcmread, folder.glob("*.dcm")))
    suv_max = peak * weight * 1000 / decayed
    vol = read_volume(folder)
    assert vol.units == "SUV"
    assert float(vol.array.max()) == pytest.approx(suv_max, rel=1e-3)
    assert 2.0 < suv_max < 15.0
    assert float(np.median(vol.array)) < 0.2  # mostly air around the body


def test_ultrasound_is_a_multiframe_cine_with_burned_in_text(all_set: Path) -> None:
    files = list((all_set / "center_1" / "case_000" / "us").glob("*.dcm"))
    assert len(files) == 1
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == US_MULTIFRAME and ds.Modality == "US"
    assert int(ds.NumberOfFrames) >= 10 and ds.BurnedInAnnotation == "YES"
    frames = ds.pixel_array
    assert frames.dtype == np.uint8 and frames.shape == (ds.NumberOfFrames, ds.Rows, ds.Columns)
    assert not np.array_equal(frames[0], frames[-1])  # the liver moves with breathing
    assert frames[:, -1, 0].max() == 0  # outside the sector
    vol = read_volume(files[0])
    assert vol.shape == (ds.Columns, ds.Rows, ds.NumberOfFrames)
    region = ds.SequenceOfUltrasoundRegions[0]
    assert vol.spacing[0] == pytest.approx(float(region.PhysicalDeltaX) * 10)


def test_mr_is_t1_weighted_and_one_center_scans_coronal(all_set: Path) -> None:
    for c, plane in ((0, "axial"), (2, "coronal")):
        folder = all_set / f"center_{c}" / "case_000" / "mr"
        ds = first_file(folder)
        assert ds.SOPClassUID == CT_MR
        assert float(ds.MagneticFieldStrength) in (1.5, 3.0)
        assert float(ds.RepetitionTime) < 1000 and float(ds.EchoTime) < 20  # T1 weighting
        assert float(ds.SpacingBetweenSlices) > float(ds.SliceThickness)  # a gap
        vol = read_volume(folder)
        normal = vol.direction[:, 2]
        assert abs(normal[2 if plane == "axial" else 1]) == pytest.approx(1.0)
        assert vol.array.min() >= 0  # magnitude images
        # Fat is the brightest tissue on T1, well above the body's median signal.
        assert np.percentile(vol.array, 99) > 2.5 * np.median(vol.array[vol.array > 50])


# --- determinism and errors ---------------------------------------------------------------


def test_same_seed_gives_identical_files_and_another_seed_differs(ct_set: Path, tmp_path: Path) -> None:
    again = make_phantoms(tmp_path / "again", centers=1, cases=2, seed=SEED, progress=False)
    for case in ("case_000", "case_001"):
        a = sorted((ct_set / "center_0" / case / "ct").glob("*.dcm"))
        b = sorted((again / "center_0" / case / "ct").glob("*.dcm"))
        assert [p.name for p in a] == [p.name for p in b]
        assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b, strict=True))
    rows_a = (ct_set / "center_0" / "annotations.csv").read_text().splitlines()
    rows_b = (again / "center_0" / "annotations.csv").read_text().splitlines()
    assert rows_b == rows_a[:len(rows_b)] and len(rows_b) > 1

    # A phantom folder is replaced by the next run into it.
    other = make_phantoms(again, centers=1, cases=1, seed=SEED + 1, progress=False)
    assert sorted(p.name for p in (other / "center_0").iterdir() if p.is_dir()) == ["case_000"]
    va = read_volume(ct_set / "center_0" / "case_000" / "ct")
    vb = read_volume(other / "center_0" / "case_000" / "ct")
    assert va.series_uid != vb.series_uid
    assert va.shape != vb.shape or not np.array_equal(va.array, vb.array)


@pytest.mark.parametrize("kwargs, message", [
    (dict(centers=0), "centers"),
    (dict(cases=0), "cases"),
    (dict(modalities=("ct", "xray")), "xray"),
    (dict(size="huge"), "size"),
])
def test_bad_arguments_are_one_line_errors(tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(MedfoundError, match=message) as err:
        make_phantoms(tmp_path / "out", progress=False, **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_other_files_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    res = subprocess.run([sys.executable, "-m", "medfound", "phantoms", "--out", str(tmp_path),
                          "--quiet"], capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and str(tmp_path) in res.stderr
    assert "Traceback" not in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
