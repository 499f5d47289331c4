"""Write small, real DICOM series for the reader tests, with a known geometry.

The stored values are given as an (i, j, k) = (column, row, slice) array, as `Volume` holds
them; each slice k is written as one file whose PixelData is that slice in DICOM's row-major
(row j, column i) order. Geometry is given the way a scanner sets it: ImageOrientationPatient,
PixelSpacing (row spacing, column spacing) and one ImagePositionPatient per slice, all LPS mm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "OT": "1.2.840.10008.5.1.4.1.1.7",
}
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
NM_IMAGE = "1.2.840.10008.5.1.4.1.1.20"


def normal_of(iop: Sequence[float]) -> np.ndarray:
    """Slice normal: row cosine × column cosine."""
    return np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))


def ramp(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Stored int16 values (i, j, k) that differ per voxel, so any transposition shows."""
    i, j, k = np.indices(shape)
    rng = np.random.default_rng(seed)
    return (i + 7 * j + 61 * k + rng.integers(0, 5, shape)).astype(np.int16)


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax=ExplicitVRLittleEndian):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def image_dataset(
    slice_ji: np.ndarray,
    *,
    position: Sequence[float] | None,
    iop: Sequence[float] | None = AXIAL,
    pixel_spacing: Sequence[float] | None = (0.8, 0.7),
    modality: str = "CT",
    series_uid: str,
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    instance: int = 1,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    description: str = "",
) -> Dataset:
    """One single-frame image (rows, columns) = slice_ji.shape, int16/uint16 stored values."""
    sop_uid = generate_uid()
    sop_class = SOP_CLASS.get(modality, SOP_CLASS["OT"])
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "TEST001"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.FrameOfReferenceUID = study_uid + ".9"
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    if iop is not None:
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.SliceThickness = "9.99"  # deliberately wrong: spacing must come from positions
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = slice_ji.shape
    signed = slice_ji.dtype.kind == "i"
    ds.BitsAllocated = 8 * slice_ji.dtype.itemsize
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if slope is not None:
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "HU" if modality == "CT" else "US"
    ds.PixelData = np.ascontiguousarray(slice_ji, dtype=slice_ji.dtype.newbyteorder("<")).tobytes()
    return ds


def write_series(
    folder: Path,
    stored: np.ndarray,
    *,
    origin: Sequence[float] = (-40.0, -60.0, 100.0),
    iop: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (0.8, 0.7),
    step: Sequence[float] | None = None,
    positions: Sequence[Sequence[float]] | None = None,
    modality: str = "CT",
    series_uid: str | None = None,
    description: str = "",
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    skip: Sequence[int] = (),
    seed: int = 0,
    edit: Callable[[int, Dataset], None] | None = None,
) -> list[Path]:
    """Write `stored` (i, j, k) as one file per slice into `folder`; return the paths by k.

    Slice k sits at `positions[k]` if given, else at origin + k · step (step defaults to 2.5 mm
    along the normal). File names and InstanceNumber are deliberately NOT in slice order, so a
    reader that sorts by either gets it wrong. `skip` leaves slices out (missing slices);
    `edit(k, ds)` changes a dataset before it is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    nk = stored.shape[2]
    series_uid = series_uid or generate_uid()
    if positions is None:
        step_v = normal_of(iop) * 2.5 if step is None else np.asarray(step, float)
        positions = [np.asarray(origin, float) + k * step_v for k in range(nk)]
    order = np.random.default_rng(seed).permutation(nk)
    paths = []
    for k in range(nk):
        if k in skip:
            continue
        ds = image_dataset(
            stored[:, :, k].T, position=positions[k], iop=iop, pixel_spacing=pixel_spacing,
            modality=modality, series_uid=series_uid, instance=int(nk - k),
            slope=slope, intercept=intercept, description=description)
        if edit is not None:
            edit(k, ds)
        path = folder / f"IM{order[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def expected_affine(origin, iop, pixel_spacing, step) -> np.ndarray:
    """The affine the reader must produce, straight from the DICOM definitions (LPS mm)."""
    a = np.eye(4)
    a[:3, 0] = np.asarray(iop[:3], float) * pixel_spacing[1]
    a[:3, 1] = np.asarray(iop[3:], float) * pixel_spacing[0]
    a[:3, 2] = step
    a[:3, 3] = origin
    return a


def write_enhanced_ct(
    path: Path,
    stored: np.ndarray,
    *,
    positions: Sequence[Sequence[float]],
    iop: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (0.6, 0.5),
    slope: float = 1.0,
    intercept: float = -1024.0,
    frame_order: Sequence[int] | None = None,
) -> Path:
    """An Enhanced CT object: all slices as frames of ONE file, geometry in functional groups.

    Frame f holds slice `frame_order[f]` (default: reversed), with its position in the
    PerFrameFunctionalGroupsSequence; orientation, spacing and rescale are shared.
    """
    nk = stored.shape[2]
    frame_order = list(range(nk))[::-1] if frame_order is None else list(frame_order)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(ENHANCED_CT, sop_uid)
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.PatientName = "Phantom^Enhanced"
    ds.PatientID = "TEST002"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "enhanced"
    ds.InstanceNumber = 1
    ds.NumberOfFrames = nk
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    measures = Dataset()
    measures.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    measures.SliceThickness = "9.99"
    transform = Dataset()
    transform.RescaleSlope = f"{slope:g}"
    transform.RescaleIntercept = f"{intercept:g}"
    transform.RescaleType = "HU"
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    for k in frame_order:
        item = Dataset()
        plane = Dataset()
        plane.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        item.PlanePositionSequence = DicomSequence([plane])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    frames = np.stack([stored[:, :, k].T for k in frame_order])  # (frame, row, column)
    ds.PixelData = frames.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_pet(
    folder: Path,
    stored: np.ndarray,
    *,
    slope: float,
    weight_kg: float,
    dose_bq: float,
    half_life_s: float,
    injection_time: str,
    series_time: str,
    units: str = "BQML",
    decay_correction: str = "START",
    slope_step: float = 0.0,
) -> list[Path]:
    """A PET series in Bq/ml (stored × slope) with the radiopharmaceutical facts SUV needs.

    Slice k has RescaleSlope slope · (1 + k · slope_step): PET scanners scale each slice.
    """
    info = Dataset()
    info.RadiopharmaceuticalStartTime = injection_time
    info.RadionuclideTotalDose = f"{dose_bq:g}"
    info.RadionuclideHalfLife = f"{half_life_s:g}"
    info.Radiopharmaceutical = "Fluorodeoxyglucose"

    def edit(k: int, ds: Dataset) -> None:
        ds.Units = units
        ds.DecayCorrection = decay_correction
        ds.PatientWeight = f"{weight_kg:g}"
        ds.SeriesDate = ds.AcquisitionDate = "20240102"
        ds.SeriesTime = series_time
        ds.AcquisitionTime = series_time
        ds.RadiopharmaceuticalInformationSequence = DicomSequence([info])
        ds.RescaleSlope = f"{slope * (1 + k * slope_step):g}"

    return write_series(folder, stored, modality="PT", slope=slope, intercept=0.0,
                        pixel_spacing=(4.0, 4.0), step=(0, 0, 3.0), edit=edit)


def write_nm_tomo(
    path: Path,
    stored: np.ndarray,
    *,
    position: Sequence[float],
    iop: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (4.0, 4.0),
    slice_spacing: float = 4.0,
) -> Path:
    """A reconstructed NM (SPECT) multi-frame: frame f at position + f · slice_spacing · normal,
    geometry given once in the DetectorInformationSequence, as NM objects do."""
    nk = stored.shape[2]
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(NM_IMAGE, sop_uid)
    ds.SOPClassUID = NM_IMAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "NM"
    ds.PatientName = "Phantom^NM"
    ds.PatientID = "TEST003"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.NumberOfFrames = nk
    ds.FrameIncrementPointer = 0x00540080  # SliceVector
    ds.SliceVector = list(range(1, nk + 1))
    ds.NumberOfSlices = nk
    ds.SpacingBetweenSlices = f"{slice_spacing:g}"
    ds.SliceThickness = "9.99"
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    detector = Dataset()
    detector.ImagePositionPatient = [f"{v:.6f}" for v in position]
    detector.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    ds.DetectorInformationSequence = DicomSequence([detector])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.stack([stored[:, :, k].T for k in range(nk)]).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def read_back(path: Path) -> Dataset:
    return pydicom.dcmread(path)
