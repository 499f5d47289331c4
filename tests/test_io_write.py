"""Writing arrays as DICOM: what goes in comes back out through the reader and SimpleITK.

Arrays are (i, j, k) = (column, row, slice) with a 4×4 affine to LPS mm, as `Volume` holds
them. Values are quantized to the stored integer type, so round trips compare after rounding.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from medfound.io.reader import read_volume
from medfound.io.write import SOP_CLASS, US_MULTIFRAME, write_multiframe, write_series


def oblique_affine() -> np.ndarray:
    """Spacing (0.7, 0.8, 1.5) mm along i, j, k, turned 20° about x then 10° about z."""
    a, b = np.radians(20), np.radians(10)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.7, 0.8, 1.5])
    affine[:3, 3] = [-120.25, 33.5, -410.0]
    return affine


def values(shape=(40, 36, 5), seed=0) -> np.ndarray:
    """HU-like values that differ per voxel, so any transposition or reordering shows."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 2000, size=shape).astype(np.float32)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless,
                                JPEG2000Lossless])
def test_series_round_trips_values_and_geometry(tmp_path, ts) -> None:
    arr, affine = values(), oblique_affine()
    paths = write_series(arr, affine, tmp_path, "CT", {"PatientName": "DOE^JANE"},
                         rescale=(1.0, -1024.0), dtype=np.uint16, transfer_syntax=ts,
                         file_names="random")
    assert len(paths) == arr.shape[2]
    vol = read_volume(tmp_path)
    assert vol.units == "HU"
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    # SimpleITK agrees: its array is (k, j, i) and its geometry the same LPS frame.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    img = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), arr)
    np.testing.assert_allclose(img.GetOrigin(), affine[:3, 3], atol=1e-6)
    np.testing.assert_allclose(img.GetSpacing(), [0.7, 0.8, 1.5], atol=1e-6)


def test_headers_follow_the_dicom_geometry_definitions(tmp_path) -> None:
    affine = np.diag([0.7, 0.8, -2.0, 1.0])
    affine[:3, 3] = [-100, -90, 50]
    paths = write_series(values(), affine, tmp_path, "CT", {"SliceThickness": 2.5})
    ds = pydicom.dcmread(paths[1])
    assert ds.SOPClassUID == SOP_CLASS["CT"] and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.7]  # (row spacing j, column spacing i)
    assert [float(v) for v in ds.ImagePositionPatient] == [-100, -90, 48]
    assert float(ds.SpacingBetweenSlices) == 2.0 and float(ds.SliceThickness) == 2.5
    assert (ds.Rows, ds.Columns) == (36, 40) and ds.InstanceNumber == 2
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.PixelRepresentation == 1


def test_files_are_what_pydicom_itself_would_write(tmp_path) -> None:
    attrs = {"PatientName": "DOE^JANE", 0x00110010: ("LO", "ACME"), 0x00111001: ("LO", "X1"),
             "RadiopharmaceuticalInformationSequence": [{"Radiopharmaceutical": "FDG"}]}
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        out = tmp_path / ts.name.replace(" ", "_")
        for path in write_series(values(), oblique_affine(), out, "PT", attrs, transfer_syntax=ts):
            buf = io.BytesIO()
            pydicom.dcmread(path).save_as(buf, enforce_file_format=True)
            assert buf.getvalue() == path.read_bytes()


def test_fixed_uids_give_identical_files(tmp_path) -> None:
    kw = dict(study_uid="1.2.3", series_uid="1.2.3.4", frame_of_reference_uid="1.2.3.5")
    a = write_series(values(), oblique_affine(), tmp_path / "a", "MR", **kw)
    b = write_series(values(), oblique_affine(), tmp_path / "b", "MR", **kw)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in a}) == len(a)


def test_per_slice_rescale_keeps_each_pet_slice_to_its_own_range(tmp_path) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.random((6, 5, 4)) * np.array([10.0, 1e3, 1e5, 5e5])).astype(np.float32)
    write_series(arr, np.eye(4), tmp_path, "PT", rescale="per_slice")
    vol = read_volume(tmp_path)
    slopes = [float(pydicom.dcmread(p).RescaleSlope) for p in sorted(tmp_path.glob("*.dcm"))]
    assert len(set(slopes)) == 4
    for k, slope in enumerate(slopes):  # files IM00001… are slices k = 0, 1, …
        np.testing.assert_allclose(vol.array[:, :, k], arr[:, :, k], rtol=0, atol=0.51 * slope)


def test_ultrasound_cine_is_one_multiframe_file(tmp_path) -> None:
    rng = np.random.default_rng(2)
    cine = rng.integers(0, 256, size=(32, 24, 5)).astype(np.float32)
    path = write_multiframe(cine, tmp_path / "cine.dcm", {"BurnedInAnnotation": "YES"},
                            spacing_mm=(0.3, 0.3), frame_time_ms=33.0)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == US_MULTIFRAME and int(ds.NumberOfFrames) == 5
    assert float(ds.FrameTime) == 33.0 and ds.FrameIncrementPointer == 0x00181063
    np.testing.assert_array_equal(ds.pixel_array, cine.transpose(2, 1, 0))
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, cine)
    assert vol.spacing[:2] == pytest.approx((0.3, 0.3))


def test_bad_geometry_and_names_are_refused(tmp_path) -> None:
    skew = np.eye(4)
    skew[0, 1] = 0.5
    with pytest.raises(ValueError, match="orthogonal"):
        write_series(values(), skew, tmp_path, "CT")
    with pytest.raises(ValueError, match="modality"):
        write_series(values(), np.eye(4), tmp_path, "XA")
    with pytest.raises(ValueError, match="file_names"):
        write_series(values(), np.eye(4), tmp_path, "CT", file_names="sorted")


def test_type2_attributes_of_each_modality_are_present_unless_given(tmp_path) -> None:
    """PS3.3 type 2 attributes must be present (maybe empty): a PET series needs CollimatorType
    and the NM/PET Patient Orientation sequences, an MR one its sequence parameters; an
    ultrasound cine, which has no ImageOrientationPatient, needs PatientOrientation (2C)."""
    pet = pydicom.dcmread(write_series(values(), np.eye(4), tmp_path / "pt", "PT",
                                       {"CollimatorType": "NONE"})[0])
    assert pet.CollimatorType == "NONE"
    for kw in ("PatientOrientationCodeSequence", "PatientGantryRelationshipCodeSequence",
               "RadiopharmaceuticalInformationSequence"):
        assert kw in pet and len(pet[kw].value) == 0, kw
    assert "CorrectedImage" in pet and "ActualFrameDuration" in pet
    mr = pydicom.dcmread(write_series(values(), np.eye(4), tmp_path / "mr", "MR")[0])
    assert all(kw in mr for kw in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"))
    assert "CollimatorType" not in mr
    cine = pydicom.dcmread(write_multiframe(np.zeros((8, 6, 3)), tmp_path / "us.dcm"))
    assert "PatientOrientation" in cine and cine.PatientOrientation == ""
    assert "ImageOrientationPatient" not in cine
