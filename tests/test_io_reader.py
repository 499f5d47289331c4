"""Reading a study into a `Volume`: what a user can rely on.

Series here are written by tests/dicom_factory.py with a known geometry, or are the files
pydicom ships (site-packages/pydicom/data/test_files). The array is (i, j, k) = (column, row,
slice); the affine maps (i, j, k, 1) to LPS mm.
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicom_factory import (
    AXIAL,
    expected_affine,
    normal_of,
    ramp,
    write_enhanced_ct,
    write_nm_tomo,
    write_pet,
    write_series,
)
from medfound.errors import MedfoundError
from medfound.io.reader import MultipleSeriesError, find_series, read_series, read_volume

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def shipped(name: str) -> Path:
    """A file pydicom ships; never downloaded."""
    path = TEST_FILES / name
    if not path.exists():
        pytest.skip(f"{name} is not in this pydicom install")
    return path


def hu(stored: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    return (stored * slope + intercept).astype(np.float32)


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


# --- geometry ---------------------------------------------------------------------------


def test_slices_are_sorted_by_position_and_the_affine_follows_the_dicom_definitions(tmp_path):
    # 5 columns × 4 rows × 6 slices, PixelSpacing (row 0.8, column 0.7): any mix-up shows.
    stored = ramp((5, 4, 6))
    write_series(tmp_path, stored, origin=(-40, -60, 100), pixel_spacing=(0.8, 0.7))
    vol = read_volume(tmp_path)

    assert vol.shape == (5, 4, 6)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, hu(stored))
    np.testing.assert_allclose(
        vol.affine, expected_affine((-40, -60, 100), AXIAL, (0.8, 0.7), (0, 0, 2.5)), atol=1e-6)
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))  # k from positions, not SliceThickness
    assert vol.modality == "CT" and vol.units == "HU" and vol.warnings == []
    assert vol.meta["files"] == 6 and {"PatientName", "PatientID"}.isdisjoint(vol.meta)


def test_k_runs_along_the_slice_normal_whatever_order_the_scanner_wrote(tmp_path):
    # Written head to feet: the first written slice is the last along the normal.
    stored = ramp((4, 4, 5))
    write_series(tmp_path, stored, origin=(0, 0, 50), step=(0, 0, -3.0))
    vol = read_volume(tmp_path)
    np.testing.assert_array_equal(vol.array, hu(stored[:, :, ::-1]))
    np.testing.assert_allclose(vol.affine[:3, 3], (0, 0, 50 - 4 * 3.0))
    np.testing.assert_allclose(vol.affine[:3, 2], (0, 0, 3.0), atol=1e-9)


def test_oblique_series_keeps_its_rotation_and_says_so(tmp_path):
    rot = rotation("z", 30) @ rotation("x", 20)
    iop = tuple(rot[:, 0]) + tuple(rot[:, 1])
    normal = normal_of(iop)
    stored = ramp((6, 5, 4))
    write_series(tmp_path, stored, iop=iop, origin=(10, 20, 30), step=2.0 * normal)
    vol = read_volume(tmp_path)

    np.testing.assert_allclose(
        vol.affine, expected_affine((10, 20, 30), iop, (0.8, 0.7), 2.0 * normal), atol=1e-5)
    np.testing.assert_array_equal(vol.array, hu(stored))
    # Voxel (i, j, k) lies at IPP_k + i · column spacing · row cosine + j · row spacing · col cosine.
    world = vol.voxel_to_world([[3, 2, 1]])[0]
    ipp_1 = np.array([10, 20, 30]) + 2.0 * normal
    np.testing.assert_allclose(world, ipp_1 + 3 * 0.7 * rot[:, 0] + 2 * 0.8 * rot[:, 1], atol=1e-5)
    assert any("oblique" in w for w in vol.warnings)


def test_gantry_tilt_warns_and_the_k_column_follows_the_real_slice_step(tmp_path):
    step = np.array([0.0, 2.5 * np.tan(np.radians(15)), 2.5])  # sheared by 15°
    stored = ramp((4, 4, 5))
    write_series(tmp_path, stored, step=step,
                 edit=lambda k, ds: setattr(ds, "GantryDetectorTilt", "15"))
    vol = read_volume(tmp_path)
    np.testing.assert_allclose(vol.affine[:3, 2], step, atol=1e-5)
    # So the last slice's first voxel is exactly where its header put it.
    np.testing.assert_allclose(vol.voxel_to_world([[0, 0, 4]])[0],
                               np.array([-40, -60, 100]) + 4 * step, atol=1e-4)
    (tilt,) = [w for w in vol.warnings if "gantry tilt" in w]
    assert "15.00°" in tilt


def test_geometry_and_values_match_simpleitk_series_reader(tmp_path):
    rot = rotation("x", 10)
    iop = tuple(rot[:, 0]) + tuple(rot[:, 1])
    stored = ramp((7, 6, 5))
    write_series(tmp_path, stored, iop=iop, step=1.5 * normal_of(iop), intercept=-1000.0)
    vol = read_volume(tmp_path)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    img = reader.Execute()
    np.testing.assert_allclose(vol.affine[:3, 3], img.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(vol.spacing, img.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(vol.direction, np.reshape(img.GetDirection(), (3, 3)), atol=1e-5)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(img).transpose(2, 1, 0))


def test_missing_slice_is_an_error_unless_gaps_are_allowed(tmp_path):
    write_series(tmp_path, ramp((4, 4, 8)), skip=(5,))
    with pytest.raises(MedfoundError, match=r"1 slice\(s\) missing.*allow_gaps"):
        read_volume(tmp_path)
    vol = read_volume(tmp_path, allow_gaps=True)
    assert vol.shape == (4, 4, 7)
    assert vol.spacing[2] == pytest.approx(2.5)  # the true step, not the mean over the gap
    assert any("missing" in w for w in vol.warnings)


def test_uneven_spacing_is_an_error_unless_gaps_are_allowed(tmp_path):
    zs = [0, 2.5, 5, 7.5, 9.0, 11.5]
    write_series(tmp_path, ramp((4, 4, 6)), positions=[(0, 0, z) for z in zs])
    with pytest.raises(MedfoundError, match="uneven slice spacing"):
        read_volume(tmp_path)
    assert any("uneven" in w for w in read_volume(tmp_path, allow_gaps=True).warnings)


def test_duplicate_positions_are_an_error(tmp_path):
    zs = [0, 2.5, 5, 5, 7.5]
    write_series(tmp_path, ramp((4, 4, 5)), positions=[(0, 0, z) for z in zs])
    with pytest.raises(MedfoundError, match="duplicate slice positions") as err:
        read_volume(tmp_path, allow_gaps=True)
    assert ".dcm" in str(err.value)


@pytest.mark.parametrize(
    ("what", "edit"),
    [
        ("image sizes", lambda ds: _resize(ds, 3, 4)),
        ("pixel spacings", lambda ds: setattr(ds, "PixelSpacing", ["0.9", "0.7"])),
        ("orientations", lambda ds: setattr(ds, "ImageOrientationPatient",
                                            ["1", "0", "0", "0", "0", "-1"])),
    ],
)
def test_a_series_mixing_sizes_spacings_or_orientations_is_an_error(tmp_path, what, edit):
    write_series(tmp_path, ramp((4, 4, 5)), edit=lambda k, ds: edit(ds) if k == 2 else None)
    with pytest.raises(MedfoundError, match=f"mixed {what} in one series") as err:
        read_volume(tmp_path)
    assert "\n" not in str(err.value)


def _resize(ds, rows: int, cols: int) -> None:
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = np.zeros((rows, cols), "<i2").tobytes()


# --- series in a folder -----------------------------------------------------------------


def test_a_folder_with_two_series_lists_them_and_series_uid_picks_one(tmp_path):
    write_series(tmp_path / "a", ramp((4, 4, 3)), series_uid="1.2.3.1", description="lung")
    write_series(tmp_path / "b", ramp((6, 6, 2)), series_uid="1.2.3.2", modality="MR",
                 slope=None, description="t1")
    with pytest.raises(MultipleSeriesError) as err:
        read_volume(tmp_path)
    listed = {s.series_uid: s.as_dict() for s in err.value.series}
    assert listed["1.2.3.1"] | {"frames": 3} == {"series_uid": "1.2.3.1", "modality": "CT",
                                                 "description": "lung", "count": 3, "frames": 3}
    assert listed["1.2.3.2"]["modality"] == "MR" and listed["1.2.3.2"]["count"] == 2

    vol = read_volume(tmp_path, series_uid="1.2.3.2")
    assert vol.shape == (6, 6, 2) and vol.modality == "MR" and vol.units == "raw"
    with pytest.raises(MedfoundError, match="no image series with SeriesInstanceUID 9.9"):
        read_volume(tmp_path, series_uid="9.9")


def test_find_series_reads_headers_and_read_series_decodes_one(tmp_path):
    write_series(tmp_path, ramp((4, 4, 3)), description="chest")
    (series,) = find_series(tmp_path)
    assert (series.modality, series.description, series.count) == ("CT", "chest", 3)
    assert sorted(series.files) == sorted(str(p) for p in tmp_path.glob("*.dcm"))
    assert read_series(series).shape == (4, 4, 3)


def test_non_image_objects_and_other_files_in_a_folder_are_skipped(tmp_path):
    write_series(tmp_path / "ct", ramp((4, 4, 3)))
    for name in ("test-SR.dcm", "rtplan.dcm", "README.txt"):
        shutil.copy(shipped(name), tmp_path / name)
    shutil.copy(shipped("dicomdirtests/DICOMDIR"), tmp_path / "DICOMDIR")
    vol = read_volume(tmp_path)
    assert vol.shape == (4, 4, 3)


def test_shipped_dicomdir_folder_lists_its_series_and_reads_the_chosen_one():
    folder = shipped("dicomdirtests")
    with pytest.raises(MultipleSeriesError) as err:
        read_volume(folder)
    series = {s.description: s for s in err.value.series}
    assert series["SmartScore - Gated 0.5 sec"].count == 5
    vol = read_volume(folder, series_uid=series["SmartScore - Gated 0.5 sec"].series_uid)
    assert vol.shape == (16, 16, 5) and vol.spacing[2] == pytest.approx(2.5)


# --- bad input: one clear error ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("test-SR.dcm", "Comprehensive SR Storage object, which has no pixel data"),
        ("rtplan.dcm", "RT Plan Storage object, which has no pixel data"),
        ("dicomdirtests/DICOMDIR", "DICOMDIR"),
        ("README.txt", "not a DICOM file"),
        ("MR_truncated.dcm", "truncated file"),
        ("JPEG-lossy.dcm", r"cannot decode pixel data \(JPEG Extended"),
    ],
)
def test_bad_single_files_raise_one_line_errors_naming_the_file(name, message):
    path = shipped(name)
    with pytest.raises(MedfoundError, match=message) as err:
        read_volume(path)
    assert str(err.value).startswith(str(path))
    assert "\n" not in str(err.value) and " — " in str(err.value)  # message — what to do


def test_a_file_cut_short_inside_or_before_its_pixel_data_is_truncated(tmp_path):
    (path,) = write_series(tmp_path / "s", ramp((16, 16, 1)))
    data = path.read_bytes()
    (tmp_path / "inside.dcm").write_bytes(data[:-100])
    with pytest.raises(MedfoundError, match="truncated file"):
        read_volume(tmp_path / "inside.dcm")
    (tmp_path / "before.dcm").write_bytes(data[: len(data) - 16 * 16 * 2 - 12])
    with pytest.raises(MedfoundError, match="truncated"):
        read_volume(tmp_path / "before.dcm")


def test_empty_folder_missing_path_and_folder_without_images_are_errors(tmp_path):
    with pytest.raises(MedfoundError, match="folder is empty"):
        read_volume(tmp_path)
    with pytest.raises(MedfoundError, match="no such file or folder"):
        read_volume(tmp_path / "nope")
    shutil.copy(shipped("rtplan.dcm"), tmp_path / "plan.dcm")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MedfoundError, match="none is a DICOM image"):
        read_volume(tmp_path)


def test_unreadable_file_is_an_error(tmp_path):
    (path,) = write_series(tmp_path, ramp((4, 4, 1)))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads anything: nothing to test then
            pytest.skip("running as a user who can read any file")
        with pytest.raises(MedfoundError, match="cannot read file"):
            read_volume(path)
        with pytest.raises(MedfoundError, match="cannot read file"):  # not silently skipped
            read_volume(tmp_path)
    finally:
        path.chmod(0o644)


# --- values -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_implicit.dcm", "MR_small_expb.dcm",
                                  "MR_small_padded.dcm"])
def test_lossless_and_other_encodings_give_the_same_array_as_the_plain_file(name):
    reference = read_volume(shipped("MR_small.dcm"))
    vol = read_volume(shipped(name))
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_allclose(vol.affine, reference.affine)


def test_ct_values_are_hounsfield_units_after_rescale():
    path = shipped("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol = read_volume(path)
    assert vol.units == "HU"
    expected = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.array[:, :, 0], expected)


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # SC_rgb_jpeg.dcm, read by pydicom
@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm",
                                  "SC_jpeg_no_color_transform.dcm", "SC_rgb_jpeg.dcm",
                                  "examples_jpeg2k.dcm", "examples_palette.dcm",
                                  "image_dfl.dcm"])
def test_compressed_files_decode_with_the_pylibjpeg_plugins(name):
    path = shipped(name)
    ds = pydicom.dcmread(path)
    vol = read_volume(path)
    pixels = ds.pixel_array.astype(np.float64)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = pydicom.pixels.apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    if pixels.ndim == 3:  # color: one grayscale channel, the luminance
        pixels = pixels @ [0.299, 0.587, 0.114]
        assert any("luminance" in w for w in vol.warnings)
    np.testing.assert_allclose(vol.array[:, :, 0], pixels.T, rtol=1e-6)


def test_ultrasound_cine_keeps_frames_along_k_with_nominal_geometry():
    path = shipped("examples_ybr_color.dcm")  # 30 JPEG YBR frames, no patient geometry
    ds = pydicom.dcmread(path)
    vol = read_volume(path)
    assert vol.shape == (320, 240, 30) and vol.modality == "US"
    frame_7 = ds.pixel_array[7].astype(np.float64) @ [0.299, 0.587, 0.114]
    np.testing.assert_allclose(vol.array[:, :, 7], frame_7.T, rtol=1e-6)
    region = ds.SequenceOfUltrasoundRegions[0]  # deltas in cm
    assert vol.spacing[:2] == pytest.approx((10 * region.PhysicalDeltaX,
                                             10 * region.PhysicalDeltaY))
    assert any("nominal" in w for w in vol.warnings)
    assert any("grayscale" in w for w in vol.warnings)


def test_rt_dose_frames_sit_at_their_grid_frame_offsets_in_gray():
    path = shipped("rtdose.dcm")
    ds = pydicom.dcmread(path)
    vol = read_volume(path)
    assert vol.shape == (10, 10, 15)
    np.testing.assert_allclose(vol.affine[:3, 3], [float(v) for v in ds.ImagePositionPatient])
    assert vol.spacing == pytest.approx((10, 10, 5))
    expected = ds.pixel_array.transpose(2, 1, 0) * float(ds.DoseGridScaling)
    np.testing.assert_allclose(vol.array, expected, rtol=1e-6)


def test_enhanced_ct_frames_are_sorted_by_their_per_frame_positions(tmp_path):
    stored = ramp((6, 5, 4))
    positions = [(-10.0, 5.0, 20.0 + 1.25 * k) for k in range(4)]
    path = write_enhanced_ct(tmp_path / "enh.dcm", stored, positions=positions,
                             frame_order=[2, 0, 3, 1], intercept=-1000.0)
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, hu(stored, intercept=-1000.0))
    np.testing.assert_allclose(
        vol.affine, expected_affine(positions[0], AXIAL, (0.6, 0.5), (0, 0, 1.25)), atol=1e-6)
    assert vol.units == "HU" and vol.meta["frames"] == 4 and vol.meta["files"] == 1


def test_nm_multiframe_stacks_frames_along_the_detector_normal(tmp_path):
    stored = ramp((8, 8, 5)).astype(np.uint16)
    path = write_nm_tomo(tmp_path / "spect.dcm", stored, position=(-16, -16, -10),
                         slice_spacing=4.0)
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32))
    np.testing.assert_allclose(
        vol.affine, expected_affine((-16, -16, -10), AXIAL, (4, 4), (0, 0, 4)), atol=1e-6)
    assert vol.units == "counts"


PET = dict(slope=0.5, weight_kg=70.0, dose_bq=370e6, half_life_s=6586.2,
           injection_time="100000", series_time="110000")


def test_pet_values_are_body_weight_suv_with_the_dose_decayed_to_scan_start(tmp_path):
    stored = ramp((4, 4, 3)) + 100
    write_pet(tmp_path, stored, **PET, slope_step=0.25)  # each slice its own RescaleSlope
    vol = read_volume(tmp_path)
    bq_per_ml = stored * (0.5 * (1 + 0.25 * np.arange(3)))
    decayed_dose = 370e6 * 2 ** (-3600 / 6586.2)  # one hour after injection
    np.testing.assert_allclose(vol.array, bq_per_ml * 70_000 / decayed_dose, rtol=1e-6)
    assert vol.units == "SUV"
    assert vol.meta["suv"]["decay_time_s"] == pytest.approx(3600)


def test_pet_decay_corrected_to_injection_uses_the_full_dose(tmp_path):
    stored = ramp((4, 4, 2)) + 100
    write_pet(tmp_path, stored, **PET, decay_correction="ADMIN")
    vol = read_volume(tmp_path)
    np.testing.assert_allclose(vol.array, stored * 0.5 * 70_000 / 370e6, rtol=1e-6)


def test_pet_without_what_suv_needs_stays_in_bq_per_ml(tmp_path):
    stored = ramp((4, 4, 2)) + 100
    write_pet(tmp_path, stored, **{**PET, "weight_kg": 0.0})
    vol = read_volume(tmp_path)
    assert vol.units == "Bq/ml"
    np.testing.assert_allclose(vol.array, stored * 0.5)
    assert any("SUV not computed" in w and "PatientWeight" in w for w in vol.warnings)


def test_compressed_series_decode_in_parallel_to_the_same_volume(tmp_path):
    stored = ramp((64, 48, 10))  # J2K needs 32+ pixels per side at its default levels
    write_series(tmp_path / "raw", stored, series_uid="1.2.9")
    write_series(tmp_path / "rle", stored, edit=lambda k, ds: ds.compress(RLELossless))
    write_series(tmp_path / "j2k", stored, edit=lambda k, ds: ds.compress(JPEG2000Lossless))
    reference = read_volume(tmp_path / "raw", workers=1)
    for name in ("rle", "j2k"):
        vol = read_volume(tmp_path / name, workers=2)
        np.testing.assert_array_equal(vol.array, reference.array)
        np.testing.assert_allclose(vol.affine, reference.affine)


# --- NIfTI and MetaImage ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
def test_nifti_ras_affine_becomes_lps(tmp_path, name):
    array = ramp((5, 4, 3)).astype(np.float32)
    ras = np.array([[-0.7, 0, 0, 30], [0, 0.8, 0.1, -20], [0, 0, 2.5, 15], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(array, ras), tmp_path / name)
    vol = read_volume(tmp_path / name)
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.affine, np.diag([-1, -1, 1, 1]) @ ras, atol=1e-6)
    # The same voxel, seen in RAS by nibabel, is at (-x, -y, z) in LPS.
    x, y, z = nib.affines.apply_affine(ras, [4, 3, 2])
    np.testing.assert_allclose(vol.voxel_to_world([[4, 3, 2]])[0], [-x, -y, z], atol=1e-5)
    assert vol.series_uid == "ct"


def test_nifti_with_several_volumes_is_refused_not_silently_cut(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)), tmp_path / "t.nii")
    with pytest.raises(MedfoundError, match=r"4D image \(3, 3, 3, 2\)"):
        read_volume(tmp_path / "t.nii")


def test_a_folder_of_nifti_files_points_to_reading_one_file(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    with pytest.raises(MedfoundError, match=r"none is a DICOM image.*pass e\.g\. .*a\.nii\.gz"):
        read_volume(tmp_path)


def test_metaimage_geometry_is_already_lps_and_the_array_is_i_j_k(tmp_path):
    array_ijk = ramp((5, 4, 3))
    img = sitk.GetImageFromArray(array_ijk.transpose(2, 1, 0))  # SimpleITK takes (k, j, i)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-40.0, -60.0, 100.0))
    direction = rotation("z", 30)
    img.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(img, str(tmp_path / "1.2.3.mhd"))
    vol = read_volume(tmp_path / "1.2.3.mhd")
    np.testing.assert_array_equal(vol.array, array_ijk)
    np.testing.assert_allclose(vol.affine[:3, :3], direction * [0.7, 0.8, 2.5], atol=1e-9)
    np.testing.assert_allclose(vol.affine[:3, 3], (-40, -60, 100))
    # A voxel's world point is what SimpleITK says it is.
    np.testing.assert_allclose(vol.voxel_to_world([[4, 3, 2]])[0],
                               img.TransformIndexToPhysicalPoint((4, 3, 2)), atol=1e-9)
    assert vol.series_uid == "1.2.3"


def test_metaimage_without_its_raw_file_is_a_clear_error(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.int16))
    sitk.WriteImage(img, str(tmp_path / "a.mhd"))
    (tmp_path / "a.raw").unlink()
    with pytest.raises(MedfoundError, match="cannot read MetaImage") as err:
        read_volume(tmp_path / "a.mhd")
    assert "\n" not in str(err.value)


# --- speed and memory -------------------------------------------------------------------


def test_reading_peaks_below_one_and_a_half_volumes_of_memory(tmp_path):
    stored = np.random.default_rng(0).integers(-1000, 2000, (256, 256, 120)).astype(np.int16)
    write_series(tmp_path, stored)
    tracemalloc.start()
    try:
        vol = read_volume(tmp_path, workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert vol.array.nbytes == 256 * 256 * 120 * 4
    assert peak <= 1.5 * vol.array.nbytes, f"peak {peak / vol.array.nbytes:.2f}× the volume"
    np.testing.assert_array_equal(vol.array, hu(stored))
    # One array, i fastest: the slices were written in place, not stacked and copied.
    assert vol.array.flags.f_contiguous and vol.array.base is not None
