"""Hostile and damaged files: nothing read silently wrong, nothing allocated past a budget.

Every refusal is one MedfoundError line naming the file and the problem. Series are written
by tests/dicom_factory.py; the other files are pydicom's shipped test files, edited here.
"""

from __future__ import annotations

import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_factory import ramp, write_series
from medfound.errors import MedfoundError
from medfound.infer.preprocess import preprocess, resample_to_spacing
from medfound.io.reader import read_volume

MAX_VOXELS_ENV = "MEDFOUND_MAX_VOXELS"

CARD = {"input": {"spacing_mm": [1.40625, 1.40625, 2.5], "hu_window": [-1024.0, 300.0],
                  "orientation": "LPS"}}


def _by_position(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                             .ImagePositionPatient[2]))


def _cut_before_pixels(path: Path) -> None:
    data = path.read_bytes()
    ds = pydicom.dcmread(path)
    path.write_bytes(data[: len(data) - len(ds.PixelData) - 12])


# --- 1. every unreadable file of a series is reported ---------------------------------------


@pytest.mark.parametrize("where", ["first", "last", "middle"])
def test_a_slice_cut_before_its_pixels_is_reported_wherever_it_sits(tmp_path, where):
    paths = _by_position(write_series(tmp_path / "s", ramp((8, 8, 6))))
    cut = {"first": paths[0], "last": paths[-1], "middle": paths[3]}[where]
    _cut_before_pixels(cut)
    with pytest.raises(MedfoundError, match="cannot be read") as err:
        read_volume(tmp_path / "s")
    assert cut.name in str(err.value) and "\n" not in str(err.value)
    if where != "middle":  # allow_gaps reads the rest and names the file it left out
        vol = read_volume(tmp_path / "s", allow_gaps=True)
        assert vol.shape == (8, 8, 5)
        assert any(cut.name in w for w in vol.warnings)


def test_a_damaged_or_empty_dicom_file_in_the_series_folder_is_reported(tmp_path):
    paths = write_series(tmp_path / "s", ramp((8, 8, 4)))
    data = paths[0].read_bytes()
    (tmp_path / "s" / "IM9999.dcm").write_bytes(data[:200])  # cut inside the file meta
    with pytest.raises(MedfoundError, match="IM9999.dcm"):
        read_volume(tmp_path / "s")
    (tmp_path / "s" / "IM9999.dcm").write_bytes(b"")  # a copy that never happened
    with pytest.raises(MedfoundError, match="IM9999.dcm"):
        read_volume(tmp_path / "s")


# --- 2. invalid modality LUT values ---------------------------------------------------------


def _patch_intercept(path: Path, text: bytes) -> None:
    data = path.read_bytes()
    assert data.count(b"-1024 ") == 1
    path.write_bytes(data.replace(b"-1024 ", text.ljust(6)))


@pytest.mark.parametrize("value", [b"nan", b"abc", b"1e309", b"inf"])
def test_an_invalid_rescale_intercept_names_the_file_and_the_attribute(tmp_path, value):
    paths = write_series(tmp_path / "s", ramp((8, 8, 5)))
    _patch_intercept(paths[2], value)
    with pytest.raises(MedfoundError, match="RescaleIntercept") as err:
        read_volume(tmp_path / "s")
    assert str(err.value).startswith(str(paths[2]))


def test_a_rescale_slope_of_zero_is_refused(tmp_path):
    def edit(k, ds):
        if k == 1:
            ds.RescaleSlope = "0"
    write_series(tmp_path / "s", ramp((8, 8, 4)), edit=edit)
    with pytest.raises(MedfoundError, match="RescaleSlope 0"):
        read_volume(tmp_path / "s")


def test_a_ct_slice_without_the_intercept_the_others_have_is_refused(tmp_path):
    def edit(k, ds):
        if k == 2:
            del ds.RescaleIntercept, ds.RescaleSlope
    paths = write_series(tmp_path / "s", ramp((8, 8, 5)), edit=edit)
    with pytest.raises(MedfoundError, match="no RescaleIntercept") as err:
        read_volume(tmp_path / "s")
    assert str(err.value).startswith(str(paths[2]))


def test_an_enhanced_ct_intercept_in_a_functional_group_is_checked(tmp_path):
    from dicom_factory import write_enhanced_ct

    stored = ramp((6, 6, 4))
    path = write_enhanced_ct(tmp_path / "e.dcm", stored,
                             positions=[(0, 0, 2.0 * k) for k in range(4)])
    ds = pydicom.dcmread(path)
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0] \
        .RescaleIntercept = "nan"
    ds.save_as(path)
    with pytest.raises(MedfoundError, match="RescaleIntercept 'nan'"):
        read_volume(path)


# --- 3. declared sizes against the bytes and a budget, before decoding ---------------------


def test_a_huge_number_of_frames_is_refused_at_once(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.NumberOfFrames = 2147483647
    ds.save_as(tmp_path / "f.dcm")
    t0 = time.perf_counter()
    with pytest.raises(MedfoundError, match="over the limit|pixel data has"):
        read_volume(tmp_path / "f.dcm")
    assert time.perf_counter() - t0 < 5


def test_encapsulated_frames_beyond_the_fragments_are_refused(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.NumberOfFrames = 100000
    ds.save_as(tmp_path / "f.dcm")
    t0 = time.perf_counter()
    with pytest.raises(MedfoundError, match="fragment"):
        read_volume(tmp_path / "f.dcm")
    assert time.perf_counter() - t0 < 5


def test_the_voxel_budget_is_a_keyword_and_an_environment_variable(tmp_path, monkeypatch):
    write_series(tmp_path / "s", ramp((16, 16, 8)))
    with pytest.raises(MedfoundError, match="over the limit of 1,000"):
        read_volume(tmp_path / "s", max_voxels=1000)
    monkeypatch.setenv(MAX_VOXELS_ENV, "1000")
    with pytest.raises(MedfoundError, match="over the limit of 1,000"):
        read_volume(tmp_path / "s")
    assert read_volume(tmp_path / "s", max_voxels=16 * 16 * 8).shape == (16, 16, 8)
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(MedfoundError, match=MAX_VOXELS_ENV):
        read_volume(tmp_path / "s")


def _patch_jpeg_sof(data: bytes, width: int, height: int) -> bytes:
    at = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1))
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def test_a_jpeg_frame_header_larger_than_rows_and_columns_is_refused_before_decoding(tmp_path):
    src = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    (tmp_path / "j.dcm").write_bytes(_patch_jpeg_sof(src.read_bytes(), 65500, 65500))
    with pytest.raises(MedfoundError, match="JPEG frame header says 65500×65500"):
        read_volume(tmp_path / "j.dcm")


def test_a_jpeg2000_size_header_that_disagrees_with_the_dicom_header_is_refused(tmp_path):
    data = Path(get_testdata_file("MR_small_jp2klossless.dcm")).read_bytes()
    at = data.find(b"\xff\x4f\xff\x51")
    data = data[:at + 8] + struct.pack(">LL", 60000, 60000) + data[at + 16:]
    (tmp_path / "j.dcm").write_bytes(data)
    with pytest.raises(MedfoundError, match=r"JPEG 2000 image header \(SIZ\) says 60000×60000"):
        read_volume(tmp_path / "j.dcm")


def _deflated(tmp_path: Path, pixel_bytes: int) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = bytes(pixel_bytes)  # zeros: deflate to almost nothing
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "d.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_deflated_file_that_inflates_past_its_header_is_refused_early(tmp_path):
    path = _deflated(tmp_path, 400 * 2**20)
    assert path.stat().st_size < 1 * 2**20
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(MedfoundError, match="inflates past"):
            read_volume(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_a_sound_deflated_file_still_reads(tmp_path):
    reference = read_volume(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "d.dcm", enforce_file_format=True)
    assert zlib  # the deflate stream is written by pydicom
    np.testing.assert_array_equal(read_volume(tmp_path / "d.dcm").array, reference.array)


def test_resampling_to_a_grid_over_the_budget_is_refused_before_allocating():
    volume = np.zeros((64, 64, 40), np.float32)
    affine = np.diag([100.0, 100.0, 100.0, 1.0])  # PixelSpacing 100 mm
    with pytest.raises(MedfoundError, match="over the limit"):
        resample_to_spacing(volume, affine, [0.7, 0.7, 1.25])
    with pytest.raises(MedfoundError, match="over the limit of 100,000"):
        preprocess(np.zeros((32, 32, 32), np.float32), np.diag([2.0, 2.0, 5.0, 1.0]), CARD,
                   max_voxels=100_000)


# --- 4. internal errors become clear messages -----------------------------------------------


def test_a_single_slice_study_is_refused_by_preprocess_with_a_clear_message():
    vol = read_volume(get_testdata_file("CT_small.dcm"))
    with pytest.raises(MedfoundError, match="single-slice series .* at least 3"):
        preprocess(vol.array, vol.affine, CARD)


def test_a_thin_slab_is_refused_by_preprocess():
    with pytest.raises(MedfoundError, match="spans 0.6 mm along k"):
        preprocess(np.zeros((40, 40, 3), np.float32), np.diag([0.7, 0.7, 0.2, 1.0]), CARD)


@pytest.mark.parametrize("iop", [[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
def test_a_zero_or_parallel_orientation_is_refused_by_the_reader(tmp_path, iop):
    write_series(tmp_path / "s", ramp((8, 8, 4)), edit=lambda k, ds: setattr(
        ds, "ImageOrientationPatient", [f"{v:g}" for v in iop]))
    with pytest.raises(MedfoundError, match="ImageOrientationPatient"):
        read_volume(tmp_path / "s")
    shutil.rmtree(tmp_path / "s")


def test_a_degenerate_affine_is_refused_by_preprocess():
    affine = np.eye(4)
    affine[:3, 1] = affine[:3, 0]  # i and j parallel: nibabel's OrientationError otherwise
    with pytest.raises(MedfoundError, match="degenerate"):
        preprocess(np.zeros((8, 8, 8), np.float32), affine, CARD)


def test_a_pet_half_life_that_decays_the_dose_to_nothing_stays_in_bq_per_ml(tmp_path):
    from dicom_factory import write_pet

    write_pet(tmp_path, ramp((4, 4, 3)) + 100, slope=0.5, weight_kg=70, dose_bq=370e6,
              half_life_s=1e-300, injection_time="100000", series_time="110000")
    vol = read_volume(tmp_path)  # not a ZeroDivisionError
    assert vol.units == "Bq/ml"
    assert any("SUV not computed" in w for w in vol.warnings)
