"""Write arrays as DICOM: one single-frame image per slice, or one multi-frame ultrasound cine.

The writer is the inverse of the series reader: an array indexed (i, j, k) = (column, row,
slice) with a 4×4 affine from (i, j, k, 1) to patient coordinates (LPS, mm) becomes files whose
ImagePositionPatient / ImageOrientationPatient / PixelSpacing reproduce that affine:

- ImageOrientationPatient = [direction of i (row cosine), direction of j (column cosine)],
- PixelSpacing = [spacing along j (between rows), spacing along i (between columns)],
- ImagePositionPatient of slice k = affine @ (0, 0, k, 1),
- each slice's pixels are stored rows × columns, i.e. the transpose of array[:, :, k].

Values are in output units (HU for CT, Bq/ml for PET, ...); they are stored as
round((value - intercept) / slope) in the requested integer type, clipped to its range.

UIDs: every SOPInstanceUID is derived from the SeriesInstanceUID and the slice index, so a
caller that passes fixed study/series UIDs gets byte-identical files on every run.

Speed: the attributes a series shares are encoded once (by pydicom's own element writer) and
only the per-slice ones (UIDs, position, rescale) are encoded per file; the pixel bytes are
written straight from the array. Pass an array whose memory is (k, j, i) — e.g. `vol.T` of a
C-ordered (k, j, i) array — and no transpose copy is made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from medfound import __version__

# Storage SOP classes (PS3.4 B.5) for the modalities we write as one image per slice.
SOP_CLASS = {
    "CT": UID("1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
    "MR": UID("1.2.840.10008.5.1.4.1.1.4"),  # MR Image Storage
    "PT": UID("1.2.840.10008.5.1.4.1.1.128"),  # Positron Emission Tomography Image Storage
    "US": UID("1.2.840.10008.5.1.4.1.1.6.1"),  # Ultrasound Image Storage
    "OT": UID("1.2.840.10008.5.1.4.1.1.7"),  # Secondary Capture Image Storage
}
US_MULTIFRAME = UID("1.2.840.10008.5.1.4.1.1.3.1")  # Ultrasound Multi-frame Image Storage

_UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
# Type 2 attributes of each modality's image and series modules (PS3.3 C.8.2.1 CT Image, C.8.3.1
# MR Image, C.8.9.1 PET Series, C.8.9.4 PET Image, C.8.4.6 NM/PET Patient Orientation): written
# empty unless `attrs` gives them a value, so a series is valid without knowing the scanner.
_TYPE2 = {
    "CT": ("KVP",),
    "MR": ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"),
    "PT": ("CorrectedImage", "CollimatorType", "RadiopharmaceuticalInformationSequence",
           "PatientOrientationCodeSequence", "PatientGantryRelationshipCodeSequence",
           "AcquisitionDate", "AcquisitionTime", "ActualFrameDuration"),
}
_IMPLEMENTATION_VERSION = f"MEDFOUND_{__version__}"[:16]


def write_series(
    array: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    modality: str,
    attrs: Mapping[Any, Any] | None = None,
    *,
    rescale: tuple[float, float] | str | None = None,
    dtype: Any = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    file_names: str = "ordered",
    slice_attrs: Sequence[Mapping[Any, Any]] | None = None,
) -> list[Path]:
    """Write a 3D array as a DICOM series, one single-frame file per slice k.

    array:     (i, j, k) = (column, row, slice), values in output units (HU, Bq/ml, ...).
    affine:    4×4, (i, j, k, 1) → LPS mm; its i and j columns must be orthogonal.
    modality:  "CT", "MR", "PT", "US" or "OT"; picks the SOP class.
    attrs:     extra attributes for every file: DICOM keyword → value (a list of dicts makes a
               sequence), or an int tag → (VR, value) for private elements (include the private
               creator element). They override the writer's defaults, never the geometry.
    rescale:   (slope, intercept) applied as value = stored * slope + intercept; "per_slice"
               gives each slice its own slope (intercept 0) that uses the full integer range,
               as PET scanners do; None means (1, 0). Rescale tags are written for CT and PT
               always, for other modalities only when `rescale` is given.
    dtype:     stored integer type: np.int16 (default for CT/PT), np.uint16 (default for
               MR/US/OT) or np.uint8.
    study_uid, series_uid, frame_of_reference_uid: fixed UIDs (random when None; SOP instance
               UIDs are derived from the series UID, so fixed UIDs make the output reproducible).
    transfer_syntax: ExplicitVRLittleEndian (default), ImplicitVRLittleEndian, or a lossless
               compressed syntax pydicom can encode here (RLELossless, JPEG2000Lossless).
    file_names: "ordered" (IM00001.dcm … by slice) or "random" (hash-derived names that say
               nothing about slice order, as many PACS exports do).
    slice_attrs: optional per-slice attributes (same form as attrs), one mapping per k.

    Returns the written paths in slice order (k = 0, 1, ...).
    """
    modality = modality.upper()
    if modality not in SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS)}, got {modality!r}")
    if array.ndim != 3:
        raise ValueError(f"array must be 3D (i, j, k), got shape {array.shape}")
    if file_names not in ("ordered", "random"):
        raise ValueError(f"file_names must be 'ordered' or 'random', got {file_names!r}")
    affine = np.asarray(affine, dtype=np.float64)
    nk = array.shape[2]
    if slice_attrs is not None and len(slice_attrs) != nk:
        raise ValueError(f"slice_attrs has {len(slice_attrs)} entries for {nk} slices")
    dtype = np.dtype(dtype or (np.int16 if modality in ("CT", "PT") else np.uint16))

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_cos, col_cos = affine[:3, 0] / spacing[0], affine[:3, 1] / spacing[1]
    if abs(float(row_cos @ col_cos)) > 1e-4:
        raise ValueError("affine columns i and j are not orthogonal; DICOM pixels are square-gridded")
    normal = np.cross(row_cos, col_cos)
    positions = affine[:3, 3][None, :] + np.arange(nk)[:, None] * affine[:3, 2][None, :]

    stored, slopes, intercepts = _quantize(array, rescale, dtype)
    write_rescale = modality in ("CT", "PT") or rescale is not None

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid(
        entropy_srcs=[series_uid, "frame_of_reference"])

    ds = _base_dataset(modality, SOP_CLASS[modality], dtype, stored.shape[1], stored.shape[2])
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    ds.SliceThickness = _ds(spacing[2])
    if nk > 1:
        ds.SpacingBetweenSlices = _ds(spacing[2])
    if modality == "CT":
        ds.RescaleType = "HU"
    _apply_attrs(ds, attrs or {})
    # Attributes may not move the geometry away from the array's affine.
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ts = UID(transfer_syntax)
    ds.file_meta.TransferSyntaxUID = ts
    implicit = ts == ImplicitVRLittleEndian
    encodings = convert_encodings(ds.SpecificCharacterSet)
    shared = {tag: _encode(ds[tag], implicit, encodings) for tag in ds.keys()}
    paths = []
    for k in range(nk):
        sop_uid = generate_uid(entropy_srcs=[series_uid, "instance", str(k)])
        per = Dataset()
        per.SOPInstanceUID = sop_uid
        per.InstanceNumber = k + 1
        per.ImagePositionPatient = [_ds(v) for v in positions[k]]
        per.SliceLocation = _ds(float(positions[k] @ normal))
        if write_rescale:
            per.RescaleIntercept = _ds(intercepts[k])
            per.RescaleSlope = _ds(slopes[k])
        if modality == "PT":
            per.ImageIndex = k + 1
        if slice_attrs is not None:
            _apply_attrs(per, slice_attrs[k])
        elements = dict(shared)
        elements.update((tag, _encode(per[tag], implicit, encodings)) for tag in per.keys())
        header = b"".join(elements[tag] for tag in sorted(elements))
        name = f"IM{k + 1:05d}.dcm" if file_names == "ordered" else _random_name(sop_uid)
        path = out_dir / name
        with open(path, "wb") as fp:
            fp.write(b"\0" * 128 + b"DICM")
            fp.write(_file_meta(ds.file_meta.MediaStorageSOPClassUID, sop_uid, ts))
            fp.write(header)
            _write_pixels(fp, stored[k], ts, implicit, ds)
        paths.append(path)
    return paths


def write_multiframe(
    array: np.ndarray,
    out_path: str | Path,
    attrs: Mapping[Any, Any] | None = None,
    *,
    spacing_mm: tuple[float, float] = (1.0, 1.0),
    frame_time_ms: float = 40.0,
    dtype: Any = np.uint8,
    study_uid: str | None = None,
    series_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """Write an ultrasound cine as one Ultrasound Multi-frame Image (frames along k).

    array:      (i, j, k) = (column, row, frame), values already in display units (0–255 for
                uint8); stored frame by frame as rows × columns.
    spacing_mm: physical size of a pixel along i and j; written as the calibrated region of
                SequenceOfUltrasoundRegions (PhysicalDeltaX/Y in cm), as scanners do — an
                ultrasound image has no ImagePositionPatient/ImageOrientationPatient.
    frame_time_ms: time between frames (FrameTime, FrameIncrementPointer → FrameTime).
    attrs, study_uid, series_uid, transfer_syntax: as in `write_series`.
    """
    if array.ndim != 3:
        raise ValueError(f"array must be 3D (i, j, frame), got shape {array.shape}")
    dtype = np.dtype(dtype)
    ni, nj, nk = array.shape
    info = np.iinfo(dtype)
    frames = np.ascontiguousarray(
        np.clip(np.rint(array), info.min, info.max).astype(dtype).transpose(2, 1, 0))

    series_uid = series_uid or generate_uid()
    ds = _base_dataset("US", US_MULTIFRAME, dtype, nj, ni)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, "instance", "0"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 1
    ds.NumberOfFrames = nk
    ds.FrameTime = _ds(frame_time_ms)
    ds.CineRate = int(round(1000.0 / frame_time_ms))
    ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    # Type 2C in the General Image module for images without ImageOrientationPatient: an
    # ultrasound probe's direction relative to the patient is not known, so it stays empty.
    ds.PatientOrientation = ""
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = ni - 1, nj - 1
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = float(spacing_mm[0]) / 10.0
    region.PhysicalDeltaY = float(spacing_mm[1]) / 10.0
    ds.SequenceOfUltrasoundRegions = DicomSequence([region])
    _apply_attrs(ds, attrs or {})

    ts = UID(transfer_syntax)
    if ts in _UNCOMPRESSED:
        ds.PixelData = frames.tobytes()
    else:
        enc = pydicom.pixels.get_encoder(ts)
        ds.PixelData = encapsulate([enc.encode(f, **_pixel_kwargs(ds)) for f in frames])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.TransferSyntaxUID = ts
    pydicom.dcmwrite(out_path, ds, enforce_file_format=True)
    return out_path


# --- helpers -----------------------------------------------------------------------------


def _quantize(array: np.ndarray, rescale, dtype: np.dtype):
    """(i, j, k) values → (k, j, i) stored integers, per-slice slopes and intercepts."""
    nk = array.shape[2]
    info = np.iinfo(dtype)
    values = np.transpose(array, (2, 1, 0))  # a view; contiguous when array is (k, j, i) in memory
    if isinstance(rescale, str):
        if rescale != "per_slice":
            raise ValueError(f"rescale must be (slope, intercept), 'per_slice' or None, got {rescale!r}")
        peak = np.array([float(np.abs(values[k]).max()) for k in range(nk)])
        # Round the slope to what its DS string says, so stored * slope is exactly the decode.
        slopes = np.array([float(_ds(p * (1 + 1e-6) / info.max)) if p > 0 else 1.0 for p in peak])
        intercepts = np.zeros(nk)
    else:
        slope, intercept = rescale if rescale is not None else (1.0, 0.0)
        slopes, intercepts = np.full(nk, float(slope)), np.full(nk, float(intercept))
    stored = np.empty(values.shape, dtype=dtype)
    buf = np.empty(values.shape[1:], dtype=np.float64)
    for k in range(nk):  # slice by slice: stays in cache, no volume-sized temporaries
        np.subtract(values[k], intercepts[k], out=buf)
        if slopes[k] != 1.0:
            buf /= slopes[k]
        np.rint(buf, out=buf)
        np.clip(buf, info.min, info.max, out=buf)
        stored[k] = buf
    return stored, slopes, intercepts


def _base_dataset(modality: str, sop_class: UID, dtype: np.dtype, rows: int, cols: int) -> Dataset:
    """The attributes every image of one series shares; type-2 attributes present, empty."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    for kw in ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
               "Manufacturer", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
               "StudyID"):
        setattr(ds, kw, "")
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.BitsAllocated = ds.BitsStored = dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if dtype.kind == "i" else 0
    for kw in _TYPE2.get(modality, ()):
        setattr(ds, kw, DicomSequence() if dictionary_VR(kw) == "SQ" else "")
    return ds


def _apply_attrs(ds: Dataset, attrs: Mapping[Any, Any]) -> None:
    for key, value in attrs.items():
        if isinstance(key, str):
            if isinstance(value, list) and value and isinstance(value[0], Mapping):
                value = DicomSequence([_item(v) for v in value])
            setattr(ds, key, value)
        else:
            vr, val = value
            ds.add_new(pydicom.tag.Tag(key), vr, val)


def _item(attrs: Mapping[Any, Any]) -> Dataset:
    item = Dataset()
    _apply_attrs(item, attrs)
    return item


def _pixel_kwargs(ds: Dataset) -> dict:
    return dict(rows=ds.Rows, columns=ds.Columns, samples_per_pixel=1, number_of_frames=1,
                bits_allocated=ds.BitsAllocated, bits_stored=ds.BitsStored,
                pixel_representation=ds.PixelRepresentation,
                photometric_interpretation="MONOCHROME2")


def _encode(elem, implicit: bool, encodings) -> bytes:
    """One data element as it appears in the file (tag, VR, length, value)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _file_meta(sop_class: str, sop_uid: str, ts: UID) -> bytes:
    """File meta information group (always explicit VR little endian, PS3.10 7.1)."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    body = b"".join(_encode(meta[tag], False, None) for tag in meta.keys())
    return b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little") + body


def _write_pixels(fp, frame: np.ndarray, ts: UID, implicit: bool, ds: Dataset) -> None:
    """(7FE0,0010) Pixel Data for one frame; uncompressed bytes go straight from the array."""
    if ts in _UNCOMPRESSED:
        data = np.ascontiguousarray(frame).astype(frame.dtype.newbyteorder("<"), copy=False)
        n = data.nbytes
        pad = n % 2  # DICOM values have even length
        vr = b"OW" if data.dtype.itemsize == 2 else b"OB"
        tag = b"\xe0\x7f\x10\x00"
        length = (n + pad).to_bytes(4, "little")
        fp.write(tag + length if implicit else tag + vr + b"\0\0" + length)
        fp.write(memoryview(data).cast("B"))
        if pad:
            fp.write(b"\0")
    else:
        enc = pydicom.pixels.get_encoder(ts)
        elem = DataElement(0x7FE00010, "OB", encapsulate([enc.encode(frame, **_pixel_kwargs(ds))]),
                           is_undefined_length=True)
        fp.write(_encode(elem, False, None))


def _random_name(sop_uid: str) -> str:
    return hashlib.sha1(sop_uid.encode()).hexdigest()[:16].upper() + ".dcm"


def _ds(value: float) -> str:
    """A decimal string (DS) of at most 16 characters that keeps 10 significant digits."""
    s = f"{float(value):.10g}"
    return "0" if s == "-0" else s
