"""DICOM → `Volume`: find the series in a file or folder, sort their slices in space, decode.

Reading happens in two passes. The header pass parses every file up to its pixel data (no pixel
bytes are read), groups images by SeriesInstanceUID and notes where each file's pixel data
starts. The pixel pass decodes the chosen series with a thread pool, each frame written
straight into one preallocated float32 array with the modality LUT applied in place, so the
peak memory stays close to the size of the volume itself.

Geometry follows the DICOM definitions (PS3.3 C.7.6.2): ImageOrientationPatient holds the
direction of increasing column index i and of increasing row index j; PixelSpacing is
(row spacing = step along j, column spacing = step along i). Slices are ordered by their
ImagePositionPatient projected on the slice normal (row cosine × column cosine), never by file
name or InstanceNumber, and the slice step k comes from those positions, never from
SliceThickness.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medfound.errors import MedfoundError
from medfound.io.volume import Volume

# Tolerances. Positions and cosines are decimal strings in the header (DS, ≤ 16 characters),
# so equality has to allow for their rounding.
COSINE_TOL = 1e-4  # two orientations are the same if every cosine differs by less
SPACING_REL_TOL = 1e-4  # two PixelSpacings are the same within this fraction
DUPLICATE_MM = 1e-3  # two slices closer than this (3D distance) are the same position
GAP_REL_TOL = 0.01  # a slice gap may differ from the median gap by this fraction + GAP_ABS_MM
GAP_ABS_MM = 1e-3
TILT_REL_TOL = 1e-3  # sideways part of the slice step, as a fraction of the step: gantry tilt

# Luminance of an RGB pixel (ITU-R BT.601, the Y of DICOM's YBR_FULL).
LUMA = np.array([0.299, 0.587, 0.114])

_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData",
               0x7FE00009: "DoubleFloatPixelData"}
_PIXEL_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"}
_NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
_UNDEFINED = 0xFFFFFFFF
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

# Series-level header facts that later stages use (data card, QC); none of them identifies
# the patient.
_META_KEYWORDS = (
    "Manufacturer", "ManufacturerModelName", "SeriesDescription", "SeriesNumber",
    "StudyInstanceUID", "FrameOfReferenceUID", "BodyPartExamined", "SliceThickness",
    "SpacingBetweenSlices", "KVP", "ConvolutionKernel", "MagneticFieldStrength",
    "RepetitionTime", "EchoTime", "FrameTime", "PatientPosition", "ImageType",
)


# --- records ----------------------------------------------------------------------------


@dataclass
class _Source:
    """One DICOM file that holds pixel data, and where that data starts."""

    path: str
    transfer_syntax: UID
    rows: int
    cols: int
    frames: int
    samples: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    signed: bool
    keyword: str  # PixelData, FloatPixelData or DoubleFloatPixelData
    offset: int | None  # byte offset of the pixel data value; None: only pydicom can find it
    length: int  # value length from the element header (_UNDEFINED if encapsulated)
    file_size: int
    options: dict[str, Any]  # pydicom decoding options (rows, columns, bits, ...)
    instance: int  # InstanceNumber, only to order images that have no position
    problem: str | None = None  # why the header cannot describe its pixels, if it cannot


@dataclass
class _Frame:
    """One 2D image to place in the volume, with its geometry in LPS mm."""

    source: _Source
    index: int  # frame number inside the file
    position: np.ndarray | None  # ImagePositionPatient of its first pixel
    orientation: np.ndarray | None  # ImageOrientationPatient (6 cosines)
    spacing: tuple[float, float] | None  # PixelSpacing (row spacing, column spacing)
    slope: float
    intercept: float


@dataclass
class SeriesInfo:
    """One image series found by `find_series`: what a user needs to choose it.

    count is the number of image files (instances); frames the number of 2D images in them
    (larger for multi-frame objects). `header` is the first file's header, without pixels.
    """

    series_uid: str
    modality: str
    description: str
    count: int
    frames: int
    files: list[str]
    number: int | None = None
    header: Dataset | None = field(default=None, repr=False)
    root: str = ""
    _frames: list[_Frame] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"series_uid": self.series_uid, "modality": self.modality,
                "description": self.description, "count": self.count, "frames": self.frames}


class MultipleSeriesError(MedfoundError):
    """A folder holds several image series and none was chosen; `.series` lists them."""

    exit_code = 3

    def __init__(self, path: str | Path, series: list[SeriesInfo]):
        self.series = series
        super().__init__(
            f"{len(series)} image series here ("
            + ", ".join(f"{s.modality} '{s.description}' ×{s.count}" for s in series[:4])
            + (", ..." if len(series) > 4 else "") + ")",
            path=path, hint="choose one with series_uid= (CLI: --series UID)")


# --- header pass ------------------------------------------------------------------------


class _NotDicom(Exception):
    pass


# warnings.catch_warnings swaps process-wide state: reads from several threads take turns.
_WARNINGS_LOCK = threading.RLock()


@contextmanager
def _quiet():
    """pydicom warns about every odd value it meets; the reader reports what matters."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# Tags read from every file in the header pass.
_ROWS, _COLUMNS, _SAMPLES, _PHOTOMETRIC = 0x00280010, 0x00280011, 0x00280002, 0x00280004
_FRAMES, _PLANAR, _BITS_ALLOCATED, _BITS_STORED = 0x00280008, 0x00280006, 0x00280100, 0x00280101
_PIXEL_REPRESENTATION, _INSTANCE, _SERIES_UID = 0x00280103, 0x00200013, 0x0020000E
_SLOPE, _INTERCEPT, _MODALITY = 0x00281053, 0x00281052, 0x00080060
_POSITION, _ORIENTATION, _PIXEL_SPACING = 0x00200032, 0x00200037, 0x00280030


def _raw(ds: Dataset, tag: int, kind: str) -> Any:
    """One header value, decoded here rather than by pydicom: its per-element conversion
    (with validation) is most of the header pass's time on a long series.

    kind "us": an unsigned short; "text": a stripped string (ASCII VRs: CS, UI, IS, DS);
    "numbers": the backslash-separated numbers of a DS/IS value. None if absent or empty.
    """
    elem = ds.get_item(tag)
    value = None if elem is None else elem.value
    if value is None or value == "" or value == b"":
        return None
    try:
        if not isinstance(value, bytes):  # pydicom converted it already
            if kind == "text":
                return str(value)
            if kind == "us":
                return int(value)
            return [float(v) for v in value] if isinstance(value, MultiValue | list) else [
                float(value)]
        if kind == "us":
            return struct.unpack("<H" if elem.is_little_endian else ">H", value[:2])[0]
        text = value.decode("latin-1").strip(" \x00")
        if kind == "text":
            return text or None
        return [float(v) for v in text.split("\\")] if text else None
    except (ValueError, TypeError, struct.error):
        return None  # a garbled value counts as absent; callers then fall back


def _looks_like_dicom(head: bytes) -> bool:
    """DICM magic at 128, or (files without preamble) a first tag in group 0002 or 0008."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group_le, elem_le = struct.unpack("<HH", head[:4])
    group_be = struct.unpack(">H", head[:2])[0]
    return (group_le in (0x0002, 0x0008) and elem_le < 0x0100) or group_be == 0x0008


def _read_header(path: str) -> tuple[Dataset, _Source | None]:
    """Parse one file up to its pixel data. Returns the header and, for an image, a _Source.

    Raises _NotDicom for files that are not DICOM at all; OSError passes through.
    """
    with open(path, "rb") as f:
        head = f.read(132)
        if not _looks_like_dicom(head):
            raise _NotDicom("not a DICOM file (no DICM marker and no DICOM tags at the start)")
        f.seek(0)
        has_magic = head[128:132] == b"DICM"
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=not has_magic)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever pydicom trips on, it is not readable
            raise _NotDicom(f"damaged DICOM header ({_one_line(err)})" if has_magic
                            else f"not a DICOM file ({_one_line(err)})") from err
        if not isinstance(ds, Dataset) or len(ds) == 0:
            raise _NotDicom("not a DICOM file (no data elements)")
        file_size = os.fstat(f.fileno()).st_size
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        implicit, little = ds.original_encoding[:2]
        if ts is None:  # no file meta: the encoding pydicom found decides
            ts = ImplicitVRLittleEndian if implicit else (
                ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ts = UID(ts)
        # pydicom leaves the file at the pixel data element's tag (or at its end).
        keyword, vr, offset, length = None, None, None, 0
        if ts != DeflatedExplicitVRLittleEndian:
            start = f.tell()
            raw = f.read(12)
            if len(raw) >= 8:
                e = "<" if little else ">"
                group, elem = struct.unpack(e + "HH", raw[:4])
                keyword = _PIXEL_TAGS.get(group << 16 | elem)
                # Some writers use implicit VR despite an explicit transfer syntax (pydicom
                # copes); the bytes after the tag tell which it is.
                if not implicit and raw[4:6] in _PIXEL_VRS and len(raw) == 12:
                    vr = raw[4:6].decode("ascii")
                    length = struct.unpack(e + "L", raw[8:12])[0]
                    offset = start + 12
                else:
                    length = struct.unpack(e + "L", raw[4:8])[0]
                    offset = start + 8
        elif "Rows" in ds:  # deflated: only pydicom can inflate it, so decode via pydicom
            keyword, offset, length = "PixelData", None, _UNDEFINED
    if keyword is None or _ROWS not in ds or _COLUMNS not in ds:
        return ds, None
    problem = None
    try:
        rows, cols = _raw(ds, _ROWS, "us") or 0, _raw(ds, _COLUMNS, "us") or 0
        frames_text = _raw(ds, _FRAMES, "text")
        frames = int(frames_text) if frames_text else 1
        samples = _raw(ds, _SAMPLES, "us") or 1
        bits_allocated = _raw(ds, _BITS_ALLOCATED, "us") or 16
        bits_stored = _raw(ds, _BITS_STORED, "us") or bits_allocated
        if min(rows, cols, frames, samples) < 1 or not 1 <= bits_stored <= bits_allocated:
            raise ValueError(f"Rows {rows}, Columns {cols}, NumberOfFrames {frames}, "
                             f"BitsAllocated {bits_allocated}, BitsStored {bits_stored}")
    except (TypeError, ValueError, AttributeError, struct.error) as err:
        # Kept as an image so that reading its series names this file and what is wrong.
        problem = f"bad image header: {_one_line(err)}"
        rows, cols, frames, samples, bits_allocated, bits_stored = 0, 0, 1, 1, 16, 16
    photometric = _raw(ds, _PHOTOMETRIC, "text") or "MONOCHROME2"
    signed = bool(_raw(ds, _PIXEL_REPRESENTATION, "us"))
    # What pydicom's decoders need to find and shape the pixels (as_pixel_options gives).
    options: dict[str, Any] = dict(
        rows=rows, columns=cols, number_of_frames=frames, samples_per_pixel=samples,
        photometric_interpretation=photometric, bits_allocated=bits_allocated,
        bits_stored=bits_stored, pixel_representation=int(signed),
        transfer_syntax_uid=ts, pixel_keyword=keyword)
    if samples > 1:
        options["planar_configuration"] = _raw(ds, _PLANAR, "us") or 0
    if 0x7FE00001 in ds and 0x7FE00002 in ds:
        options["extended_offsets"] = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    if vr:
        options["pixel_vr"] = vr
    instance = _raw(ds, _INSTANCE, "numbers")
    source = _Source(
        path=path, transfer_syntax=ts, rows=rows, cols=cols, frames=frames, samples=samples,
        photometric=photometric, bits_allocated=bits_allocated, bits_stored=bits_stored,
        signed=signed, keyword=keyword, offset=offset, length=length, file_size=file_size,
        options=options, instance=int(instance[0]) if instance else 0, problem=problem)
    return ds, source


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: Any, default: float | None = None) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if np.isfinite(v) else default


def _first(values: list[float] | None, default: float) -> float:
    return values[0] if values and np.isfinite(values[0]) else default


def _floats(value: Any, n: int) -> np.ndarray | None:
    """A multi-valued DS as floats, or None if absent or not n finite numbers."""
    if value is None:
        return None
    try:
        a = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a if a.shape == (n,) and np.all(np.isfinite(a)) else None


def _item(ds: Dataset | None, keyword: str) -> Dataset | None:
    """First item of a sequence attribute, or None."""
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _frames_of(ds: Dataset, src: _Source) -> list[_Frame]:
    """Every 2D image in one file, with its geometry and rescale (PS3.3 C.7.6.2, C.7.6.16)."""
    slope = _first(_raw(ds, _SLOPE, "numbers"), 1.0) or 1.0
    intercept = _first(_raw(ds, _INTERCEPT, "numbers"), 0.0)
    if "DoseGridScaling" in ds and _raw(ds, _MODALITY, "text") == "RTDOSE":
        slope, intercept = _float(ds.DoseGridScaling, 1.0), 0.0
    position = _floats(_raw(ds, _POSITION, "numbers"), 3)
    orientation = _floats(_raw(ds, _ORIENTATION, "numbers"), 6)
    spacing = _floats(_raw(ds, _PIXEL_SPACING, "numbers"), 2)
    if spacing is None and "ImagerPixelSpacing" in ds:  # radiographs: spacing at the detector
        spacing = _floats(ds.get("ImagerPixelSpacing"), 2)
    spacing_t = None if spacing is None else (float(spacing[0]), float(spacing[1]))
    n = src.frames

    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    if per_frame is not None or shared is not None:  # enhanced multi-frame
        frames = []
        for f in range(n):
            own = per_frame[f] if per_frame is not None and f < len(per_frame) else None
            # A functional group sits in the frame's own item or, for all frames, in shared.
            plane = _item(own, "PlanePositionSequence") or _item(shared, "PlanePositionSequence")
            orient = (_item(own, "PlaneOrientationSequence")
                      or _item(shared, "PlaneOrientationSequence"))
            measures = (_item(own, "PixelMeasuresSequence")
                        or _item(shared, "PixelMeasuresSequence"))
            transform = (_item(own, "PixelValueTransformationSequence")
                         or _item(shared, "PixelValueTransformationSequence"))
            sp = _floats(measures.get("PixelSpacing") if measures else None, 2)
            frames.append(_Frame(
                src, f,
                _floats(plane.get("ImagePositionPatient"), 3) if plane else position,
                _floats(orient.get("ImageOrientationPatient"), 6) if orient else orientation,
                (float(sp[0]), float(sp[1])) if sp is not None else spacing_t,
                _float(transform.get("RescaleSlope"), slope) if transform else slope,
                _float(transform.get("RescaleIntercept"), intercept) if transform
                else intercept))
        return frames

    offsets = _floats(ds.get("GridFrameOffsetVector"), n) if n > 1 else None
    detector = _item(ds, "DetectorInformationSequence")
    if detector is not None and position is None:  # NM: geometry sits with the detector
        position = _floats(detector.get("ImagePositionPatient"), 3)
        orientation = _floats(detector.get("ImageOrientationPatient"), 6)
    if n == 1 or position is None or orientation is None:
        positions = [position] * n if n == 1 else [None] * n
    else:
        normal = np.cross(orientation[:3], orientation[3:])
        if offsets is not None:
            if offsets[0] == 0:  # relative to ImagePositionPatient, along the normal
                positions = [position + o * normal for o in offsets]
            else:  # absolute z (PS3.3 C.8.8.3.2), only defined for axial orientation
                positions = [np.array([position[0], position[1], o]) for o in offsets]
        else:
            step = _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness"))
            positions = ([position + f * step * normal for f in range(n)] if step
                         else [None] * n)
    return [_Frame(src, f, positions[f], orientation if positions[f] is not None else None,
                   spacing_t, slope, intercept) for f in range(n)]


def _safe_frames_of(ds: Dataset, src: _Source) -> list[_Frame]:
    try:
        with _quiet():
            return _frames_of(ds, src)
    except Exception as err:  # noqa: BLE001 - a corrupt header value; reported at read time
        src.problem = src.problem or f"bad image header: {_one_line(err)}"
        return [_Frame(src, f, None, None, None, 1.0, 0.0) for f in range(src.frames)]


def _walk(root: Path) -> list[str]:
    if root.is_file():
        return [str(root)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames.sort()
        out.extend(os.path.join(dirpath, n) for n in sorted(filenames))
    return out


def _raise(err: OSError) -> None:
    raise err


def _progress(iterable: Iterable, total: int, desc: str, show: bool | None) -> Iterable:
    """A tqdm bar on stderr only when asked, or by default when a human watches a long job."""
    if show is None:
        show = total >= 200 and sys.stderr.isatty()
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False)


def find_series(path: str | Path, *, progress: bool | None = None) -> list[SeriesInfo]:
    """Find the image series in a DICOM file or a folder (searched recursively).

    Only headers are read. Files that are not DICOM, and DICOM objects without pixel data
    (DICOMDIR, structured reports, RT plans, ...), are skipped in a folder; given on their own
    they are an error. Series are returned ordered by SeriesNumber, then SeriesInstanceUID.
    Raises MedfoundError when the path is missing or unreadable, or holds no image.
    """
    root = Path(path)
    if not root.exists():
        raise MedfoundError("no such file or folder", path=root,
                            hint="check the path (and that the disk is mounted)")
    try:
        files = _walk(root)
    except OSError as err:
        raise MedfoundError(f"cannot list folder: {err.strerror or err}", path=err.filename
                            or root, hint="check the folder exists and you may read it") from err
    if root.is_dir() and not files:
        raise MedfoundError("folder is empty", path=root,
                            hint="point to the folder that holds the DICOM files")

    groups: dict[str, list[tuple[Dataset, _Source]]] = {}
    not_dicom: list[tuple[str, str]] = []
    no_pixels: list[tuple[str, str]] = []
    with _quiet():
        for file in _progress(files, len(files), "reading headers", progress):
            try:
                ds, source = _read_header(file)
            except _NotDicom as err:
                not_dicom.append((file, str(err)))
                continue
            except OSError as err:
                # Even in a folder: skipping it could silently drop a slice of the series.
                raise MedfoundError(f"cannot read file: {err.strerror or err}", path=file,
                                    hint="check the file exists and you may read it") from err
            if source is None:
                no_pixels.append((file, _what_is(ds)))
                continue
            groups.setdefault(_raw(ds, _SERIES_UID, "text") or "", []).append((ds, source))

    if not groups:
        raise _no_image_error(root, files, not_dicom, no_pixels)

    series = []
    for uid, members in groups.items():
        first = members[0][0]
        frames = [fr for ds, src in members for fr in _safe_frames_of(ds, src)]
        series.append(SeriesInfo(
            series_uid=uid, modality=str(first.get("Modality") or "OT"),
            description=str(first.get("SeriesDescription") or ""), count=len(members),
            frames=len(frames), files=[src.path for _, src in members],
            number=_int(first.get("SeriesNumber"), None) if "SeriesNumber" in first else None,
            header=first, root=str(root), _frames=frames))
    series.sort(key=lambda s: (s.number is None, s.number or 0, s.series_uid))
    return series


def _what_is(ds: Dataset) -> str:
    sop = ds.get("SOPClassUID") or (ds.file_meta.get("MediaStorageSOPClassUID")
                                    if hasattr(ds, "file_meta") else None)
    if sop == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (media directory)"
    name = getattr(UID(sop), "name", "") if sop else ""
    if "Rows" in ds:
        return "an image whose file ends before its pixel data (truncated)"
    name = name or "DICOM"
    # "an RT Plan", "an MR image", "a CT image": the article follows the spoken letter.
    article = "an" if name[0] in "AEFHILMNORSX" and (name[:2].isupper() or name[0] in "AEIO") \
        else "a"
    if "Image Storage" in name:  # an image class with no pixels: most likely cut short
        return f"{article} {name} object without pixel data (truncated?)"
    return f"{article} {name} object"


def _no_image_error(root: Path, files: list[str], not_dicom, no_pixels) -> MedfoundError:
    if root.is_file():
        if not_dicom:
            return MedfoundError(not_dicom[0][1], path=root,
                                 hint="give a DICOM file or folder, a .nii/.nii.gz or a .mhd")
        what = no_pixels[0][1]
        if "truncated" in what:
            return MedfoundError("truncated file: it ends before its pixel data", path=root,
                                 hint="copy or export the file again; it was cut short")
        hint = ("pass the folder that holds it" if "DICOMDIR" in what
                else "give an image file or a folder of images")
        return MedfoundError(f"{what}, which has no pixel data", path=root, hint=hint)
    kinds = Counter(w for _, w in no_pixels)
    parts = [f"{len(files)} files, none is a DICOM image"]
    if not_dicom:
        parts.append(f"{len(not_dicom)} not DICOM")
    parts += [f"{n} × {w}" for w, n in kinds.most_common(3)]
    volumes = [f for f, _ in not_dicom if f.lower().endswith((".nii", ".nii.gz", ".mhd", ".mha"))]
    hint = (f"NIfTI and MetaImage files are read one at a time: pass e.g. {volumes[0]}"
            if volumes else "point to the folder that holds the image files")
    return MedfoundError("; ".join(parts), path=root, hint=hint)


def read_dicom(path: str | Path, series_uid: str | None = None, *, allow_gaps: bool = False,
               workers: int | None = None, progress: bool | None = None) -> Volume:
    """Read one image series from a DICOM file or folder; see `read_series` for the result.

    A folder with several series needs `series_uid`, else MultipleSeriesError lists them.
    """
    series = find_series(path, progress=progress)
    if series_uid is not None:
        chosen = [s for s in series if s.series_uid == series_uid]
        if not chosen:
            known = ", ".join(f"{s.series_uid} ({s.modality})" for s in series[:5])
            raise MedfoundError(f"no image series with SeriesInstanceUID {series_uid}; "
                                f"found {known}" + (", ..." if len(series) > 5 else ""),
                                path=path, hint="run `medfound inspect` on the folder to list "
                                "its series")
        series = chosen
    if len(series) > 1:
        raise MultipleSeriesError(path, series)
    return read_series(series[0], allow_gaps=allow_gaps, workers=workers, progress=progress)


# --- geometry ---------------------------------------------------------------------------


@dataclass
class _Geometry:
    order: list[_Frame]  # frames in k order
    affine: np.ndarray
    warnings: list[str]


def _name(frame: _Frame) -> str:
    base = os.path.basename(frame.source.path)
    return f"{base} frame {frame.index + 1}" if frame.source.frames > 1 else base


def _check_same(frames: list[_Frame], key: Callable[[_Frame], Any], same: Callable[[Any, Any],
                bool], what: str, root: str, show: Callable[[Any], str]) -> None:
    """Raise if `key` differs between frames of the series: name one example of each."""
    ref = key(frames[0])
    for fr in frames[1:]:
        v = key(fr)
        if not same(ref, v):
            n_ref = sum(same(ref, key(x)) for x in frames)
            raise MedfoundError(
                f"mixed {what} in one series: {show(ref)} ({n_ref} images, e.g. "
                f"{_name(frames[0])}) and {show(v)} (e.g. {_name(fr)})", path=root,
                hint="the series mixes image stacks (e.g. a localizer); move the odd files "
                "out or read one file directly")


def _same_spacing(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(abs(x - y) <= SPACING_REL_TOL * abs(x) + 1e-6 for x, y in zip(a, b, strict=True))


def _fmt(v: Iterable[float], nd: int = 4) -> str:
    return "(" + ", ".join(f"{x:.{nd}g}" for x in v) + ")"


def _geometry(series: SeriesInfo, allow_gaps: bool) -> _Geometry:
    """Order the frames along the slice normal and build the (i, j, k) → LPS affine."""
    frames, root = series._frames, series.root or (series.files[0] if series.files else "")
    notes: list[str] = []
    _check_same(frames, lambda f: (f.source.rows, f.source.cols), lambda a, b: a == b,
                "image sizes", root, lambda v: f"{v[1]}×{v[0]} (columns×rows)")
    _check_same(frames, lambda f: f.spacing, _same_spacing, "pixel spacings", root,
                lambda v: "none" if v is None else f"{_fmt(v)} mm")

    with_geometry = [f.position is not None and f.orientation is not None for f in frames]
    if all(with_geometry):
        _check_same(frames, lambda f: f.orientation,
                    lambda a, b: bool(np.abs(a - b).max() < COSINE_TOL),
                    "orientations", root, lambda v: f"ImageOrientationPatient {_fmt(v)}")
        return _spatial_geometry(frames, series.header, root, allow_gaps, notes)
    if any(with_geometry):
        missing = next(f for f, g in zip(frames, with_geometry, strict=True) if not g)
        raise MedfoundError(f"some images of the series have no position/orientation (e.g. "
                            f"{_name(missing)})", path=root,
                            hint="move the images without ImagePositionPatient out of the "
                            "folder")
    return _nominal_geometry(series, frames, root, notes)


def _spatial_geometry(frames: list[_Frame], header: Dataset | None, root: str,
                      allow_gaps: bool, notes: list[str]) -> _Geometry:
    header = header if header is not None else Dataset()
    orient = frames[0].orientation
    row, col = orient[:3], orient[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(
            row @ col) > 1e-3:
        notes.append(f"ImageOrientationPatient {_fmt(orient)} is not two orthogonal unit "
                     "vectors; the affine uses it as given")
    else:
        # Cosines are decimal strings: rescale them to unit length so that the spacing is
        # PixelSpacing exactly, not PixelSpacing × (1 ± rounding).
        row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    if not all(np.isclose(np.abs(v), 0, atol=COSINE_TOL).sum() == 2 for v in (row, col)):
        notes.append(f"oblique orientation: ImageOrientationPatient {_fmt(orient)}; the "
                     "affine carries the rotation (axes are not aligned with L, P, S)")
    ps = frames[0].spacing
    if ps is None:
        ps = (1.0, 1.0)
        notes.append("no PixelSpacing: in-plane spacing is nominal (1 mm)")
    positions = np.array([f.position for f in frames])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    frames = [frames[i] for i in order]
    positions, depth = positions[order], depth[order]

    if len(frames) == 1:
        # One slice has no neighbour to measure the step from: the header's thickness is
        # the only hint of how deep it is.
        thickness = (_float(header.get("SpacingBetweenSlices"))
                     or _float(header.get("SliceThickness")) or 1.0)
        return _Geometry(frames, _affine(row, col, ps, normal * abs(thickness), positions[0]),
                         notes)

    steps = np.diff(positions, axis=0)
    dist = np.linalg.norm(steps, axis=1)
    dup = np.flatnonzero(dist < DUPLICATE_MM)
    if dup.size:
        a, b = frames[dup[0]], frames[dup[0] + 1]
        raise MedfoundError(
            f"duplicate slice positions: {dup.size} pair(s) of images share a position, e.g. "
            f"{_name(a)} and {_name(b)} at {_fmt(positions[dup[0]], 6)} mm", path=root,
            hint="the series holds repeated images (several acquisitions, echoes or phases); "
            "keep one image per position")
    gaps = np.diff(depth)
    median = float(np.median(gaps))
    uneven = np.abs(gaps - median) > GAP_REL_TOL * median + GAP_ABS_MM
    if uneven.any():
        message = _gap_message(frames, gaps, median, uneven)
        if not allow_gaps:
            raise MedfoundError(message, path=root,
                                hint="check the series is complete, or pass allow_gaps=True "
                                "(CLI: --allow-gaps) to read it with its median slice step")
        notes.append(message + f"; read anyway with the median step {median:.4g} mm, so "
                     "positions past an odd gap are off")
        step = steps[~uneven].mean(axis=0) if (~uneven).any() else steps.mean(axis=0)
    else:
        # The mean step over the whole stack is as exact as the header's decimals allow.
        step = (positions[-1] - positions[0]) / (len(frames) - 1)

    along = float(step @ normal)
    sideways = float(np.linalg.norm(step - along * normal))
    if sideways > TILT_REL_TOL * np.linalg.norm(step):
        angle = np.degrees(np.arctan2(sideways, along))
        stated = _float(header.get("GantryDetectorTilt"))
        stated_s = f" (GantryDetectorTilt {stated:g}°)" if stated else ""
        notes.append(f"gantry tilt: slices are sheared by {angle:.2f}°{stated_s}; the affine's "
                     "k column follows the slice positions, so world coordinates are right but "
                     "the axes are not orthogonal — resample before models that assume they are")
    return _Geometry(frames, _affine(row, col, ps, step, positions[0]), notes)


def _gap_message(frames: list[_Frame], gaps: np.ndarray, median: float,
                 uneven: np.ndarray) -> str:
    ratio = gaps[uneven] / median
    first = int(np.flatnonzero(uneven)[0])
    where = f"between {_name(frames[first])} and {_name(frames[first + 1])}"
    if np.all(np.abs(ratio - np.round(ratio)) < 0.05) and np.all(np.round(ratio) >= 2):
        missing = int(np.round(ratio).sum() - ratio.size)
        return (f"{missing} slice(s) missing: gap of {gaps[first]:.4g} mm {where} where the "
                f"series steps {median:.4g} mm")
    return (f"uneven slice spacing: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
            f"(median {median:.4g} mm), first odd one {where}")


def _affine(row: np.ndarray, col: np.ndarray, pixel_spacing: tuple[float, float],
            step: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """(i, j, k, 1) → LPS mm: i along the row cosine by the column spacing PixelSpacing[1],
    j along the column cosine by the row spacing PixelSpacing[0], k by the slice step."""
    a = np.eye(4)
    a[:3, 0] = row * pixel_spacing[1]
    a[:3, 1] = col * pixel_spacing[0]
    a[:3, 2] = step
    a[:3, 3] = origin
    return a


def _nominal_geometry(series: SeriesInfo, frames: list[_Frame], root: str,
                      notes: list[str]) -> _Geometry:
    """Images without patient position (ultrasound, secondary capture, radiographs)."""
    ds = series.header
    if len({id(f.source) for f in frames}) > 1 and any(f.source.frames > 1 for f in frames):
        raise MedfoundError(
            f"the series holds {series.count} multi-frame objects without patient geometry, "
            "which cannot be stacked", path=root, hint="read one of its files directly")
    frames = sorted(frames, key=lambda f: (f.source.instance, f.source.path, f.index))
    dx = dy = None
    if frames[0].spacing is not None:
        dy, dx = frames[0].spacing
    region = _item(ds, "SequenceOfUltrasoundRegions")
    if dx is None and region is not None and region.get("PhysicalUnitsXDirection") == 3 \
            and region.get("PhysicalUnitsYDirection") == 3:
        # Region deltas are in cm (unit code 3).
        dx = 10 * abs(_float(region.get("PhysicalDeltaX"), 0.1))
        dy = 10 * abs(_float(region.get("PhysicalDeltaY"), 0.1))
    if dx is None:
        dx = dy = 1.0
        spacing_note = "no pixel spacing (nominal 1 mm)"
    else:
        spacing_note = f"pixel spacing {dx:.4g}×{dy:.4g} mm"
    along = "frames (time)" if frames[0].source.frames > 1 else "images"
    notes.append(f"no patient geometry (ImagePositionPatient/ImageOrientationPatient): the "
                 f"affine is nominal — {spacing_note}, k counts {along}, origin 0")
    return _Geometry(frames, np.diag([dx, dy, 1.0, 1.0]), notes)


# --- values: modality LUT and units -----------------------------------------------------


def _parse_time(tm: Any) -> float | None:
    """DICOM TM ("HHMMSS.FFFFFF", colons tolerated) → seconds since midnight."""
    text = str(tm or "").strip().replace(":", "")
    if len(text) < 2 or not text[:2].isdigit():
        return None
    try:
        return int(text[0:2]) * 3600 + int(text[2:4] or 0) * 60 + float(text[4:] or 0)
    except ValueError:
        return None


def _parse_datetime(date: Any, tm: Any) -> datetime | None:
    """DICOM DA + TM (or one DT in `date`, `tm` None) → naive datetime; None if unparsable."""
    text = str(date or "").strip()
    if tm is None:  # DT: YYYYMMDDHHMMSS.FFFFFF, optionally with a &ZZXX UTC offset
        text, tm = text[:8], text[8:].split("+")[0].split("-")[0]
    if len(text) != 8 or not text.isdigit():
        return None
    seconds = _parse_time(tm)
    if seconds is None:
        return None
    try:
        return datetime.strptime(text, "%Y%m%d") + timedelta(seconds=seconds)
    except ValueError:
        return None


def _suv_factor(ds: Dataset) -> tuple[float | None, str, dict[str, Any]]:
    """Body-weight SUV = Bq/ml × weight (g) / injected dose decayed to the image's time (Bq).

    Assumes 1 g/ml tissue. Returns (factor or None, why not, facts for Volume.meta).
    """
    info = _item(ds, "RadiopharmaceuticalInformationSequence")
    if info is None:
        return None, "no RadiopharmaceuticalInformationSequence", {}
    dose = _float(info.get("RadionuclideTotalDose"))
    half_life = _float(info.get("RadionuclideHalfLife"))
    weight = _float(ds.get("PatientWeight"))
    decay = str(ds.get("DecayCorrection") or "").upper()
    # (The word "missing" is kept out of these notes: QC reads it as missing slices.)
    missing = [name for name, v in (("RadionuclideTotalDose", dose),
                                    ("RadionuclideHalfLife", half_life),
                                    ("PatientWeight", weight)) if not v or v <= 0]
    if missing:
        return None, f"{', '.join(missing)} absent or zero", {}
    facts: dict[str, Any] = {"injected_dose_bq": dose, "half_life_s": half_life,
                             "weight_kg": weight, "decay_correction": decay}
    if decay == "ADMIN":  # already decay-corrected to the injection time
        elapsed = 0.0
    elif decay == "START":
        injected = (_parse_datetime(info.get("RadiopharmaceuticalStartDateTime"), None)
                    or _parse_datetime(ds.get("SeriesDate") or ds.get("AcquisitionDate"),
                                       info.get("RadiopharmaceuticalStartTime")))
        started = (_parse_datetime(ds.get("SeriesDate"), ds.get("SeriesTime"))
                   or _parse_datetime(ds.get("AcquisitionDate"), ds.get("AcquisitionTime")))
        if injected is None or started is None:
            return None, "injection or series start time not given", {}
        elapsed = (started - injected).total_seconds()
        if elapsed < 0 and "RadiopharmaceuticalStartDateTime" not in info:
            elapsed += 86400  # injected before midnight, scanned after it
        if not 0 <= elapsed < 86400:
            return None, f"implausible time from injection to scan ({elapsed:.0f} s)", {}
    else:
        return None, f"DecayCorrection '{decay}' (need START or ADMIN)", {}
    decayed = dose * 2.0 ** (-elapsed / half_life)
    factor = weight * 1000.0 / decayed
    facts.update(decay_time_s=elapsed, suv_factor=factor)
    return factor, "", facts


def _units(series: SeriesInfo) -> tuple[str, float, list[str], dict[str, Any]]:
    """What the values are after the modality LUT, and a factor that turns them into it."""
    ds = series.header if series.header is not None else Dataset()
    modality = series.modality
    if modality == "CT":
        return "HU", 1.0, [], {}
    if modality == "RTDOSE":
        units = str(ds.get("DoseUnits") or "").upper()
        return {"GY": "Gy", "RELATIVE": "relative"}.get(units, units or "raw"), 1.0, [], {}
    if modality == "PT":
        units = str(ds.get("Units") or "").upper()
        if units == "BQML":
            factor, why, facts = _suv_factor(ds)
            if factor is not None:
                return "SUV", factor, [], {"suv": facts}
            return "Bq/ml", 1.0, [f"SUV not computed ({why}); values are Bq/ml"], {}
        known = {"GML": "SUV", "CNTS": "counts", "": "raw"}
        return known.get(units, units), 1.0, [], {}
    if modality == "NM":
        return "counts", 1.0, [], {}
    return "raw", 1.0, [], {}


def _meta(series: SeriesInfo, frames: list[_Frame]) -> dict[str, Any]:
    """JSON-ready series facts for later stages (no patient identifiers)."""
    ds = series.header if series.header is not None else Dataset()
    meta: dict[str, Any] = {}
    with _quiet():
        for keyword in _META_KEYWORDS:
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            if isinstance(value, MultiValue):
                meta[keyword] = [str(v) for v in value]
            elif isinstance(value, int | float):  # IS and DS values are int/float subclasses
                meta[keyword] = int(value) if isinstance(value, int) else float(value)
            else:
                meta[keyword] = str(value)
    src = frames[0].source
    sop = ds.get("SOPClassUID")
    meta.update(sop_class=str(getattr(UID(sop), "name", sop)) if sop else "",
                transfer_syntax=src.transfer_syntax.name, files=series.count,
                frames=len(frames), photometric=src.photometric)
    return meta


# --- pixel pass -------------------------------------------------------------------------


def _is_fast(src: _Source) -> bool:
    """Uncompressed grayscale integers we can read straight from the file with numpy."""
    return (src.offset is not None and src.transfer_syntax in _NATIVE
            and src.keyword == "PixelData" and src.samples == 1
            and src.photometric in ("MONOCHROME1", "MONOCHROME2")
            and src.bits_allocated in ((8, 16) if src.transfer_syntax == ExplicitVRBigEndian
                                       else (8, 16, 32)))


def _native_bytes(src: _Source) -> int:
    bits = src.rows * src.cols * src.samples * src.frames * src.bits_allocated
    if src.photometric == "YBR_FULL_422":  # chroma subsampled 2:1 horizontally
        bits = bits * 2 // 3
    return (bits + 7) // 8


def _check_readable(frames: list[_Frame], root: str) -> None:
    """Fail before decoding anything if a file is cut short or no decoder can read it."""
    from pydicom.pixels import get_decoder

    seen: set[UID] = set()
    for src in {id(f.source): f.source for f in frames}.values():
        if src.problem:
            raise MedfoundError(src.problem, path=src.path,
                                hint="fix or remove this file; its header does not describe "
                                "its pixel data")
        ts = src.transfer_syntax
        if ts not in seen:
            seen.add(ts)
            try:
                decoder = get_decoder(ts)
            except NotImplementedError as err:
                raise MedfoundError(
                    f"pixel data in transfer syntax '{ts.name}' ({ts}) cannot be decoded",
                    path=src.path, hint="convert the files to an uncompressed transfer syntax "
                    "(e.g. `gdcmconv --raw` or `dcmdjpeg`)") from err
            if not decoder.is_available:
                raise MedfoundError(
                    f"no installed decoder for '{ts.name}' pixel data "
                    f"({_one_line('; '.join(decoder.missing_dependencies))})", path=src.path,
                    hint="install the pylibjpeg plugins (pip install 'medfound') or convert "
                    "the files to an uncompressed transfer syntax")
        if src.offset is None:
            continue
        if src.length != _UNDEFINED:
            end = src.offset + src.length
            if end > src.file_size:
                raise MedfoundError(
                    f"truncated file: pixel data should have {src.length} bytes but the file "
                    f"ends after {max(src.file_size - src.offset, 0)}", path=src.path,
                    hint="copy or export the file again; it was cut short")
            if not ts.is_compressed and src.length < _native_bytes(src):
                raise MedfoundError(
                    f"pixel data has {src.length} bytes where {src.rows} rows × {src.cols} "
                    f"columns × {src.frames} frame(s) × {src.bits_allocated} bits need "
                    f"{_native_bytes(src)}", path=src.path,
                    hint="the file is truncated or its header is wrong; export it again")
        elif src.offset >= src.file_size:
            raise MedfoundError("truncated file: it ends at its pixel data", path=src.path,
                                hint="copy or export the file again; it was cut short")


def _read_native(fh, src: _Source, frame: int) -> np.ndarray:
    """One frame of uncompressed pixel data as an integer (rows, columns) array."""
    endian = ">" if src.transfer_syntax == ExplicitVRBigEndian else "<"
    dtype = np.dtype(f"{endian}{'i' if src.signed else 'u'}{src.bits_allocated // 8}")
    raw = np.empty((src.rows, src.cols), dtype=dtype)
    nbytes = raw.nbytes
    fh.seek(src.offset + frame * nbytes)
    if fh.readinto(raw.view(np.uint8).reshape(-1)) != nbytes:
        raise MedfoundError(f"truncated file: frame {frame + 1} of the pixel data is cut short",
                            path=src.path, hint="copy or export the file again")
    if endian == ">" and dtype.itemsize > 1:
        raw = raw.astype(dtype.newbyteorder("="))
    if src.bits_stored < src.bits_allocated:
        # As pydicom does: bits above BitsStored carry nothing (or overlays); shifting up and
        # back down clears them, and sign-extends signed data.
        shift = src.bits_allocated - src.bits_stored
        np.left_shift(raw, shift, out=raw)
        np.right_shift(raw, shift, out=raw)
    return raw


def _to_gray(arr: np.ndarray, src: _Source, header: Dataset | None) -> np.ndarray:
    """Decoded pixels (rows, columns[, samples]) → one grayscale channel."""
    if src.photometric == "PALETTE COLOR" and arr.ndim == 2 and header is not None:
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, header)
    if arr.ndim == 3:  # RGB (pydicom converts YBR to RGB): luminance
        arr = arr[..., :3] @ LUMA
    return arr


def _store(values: np.ndarray, out: np.ndarray, slope: float, intercept: float) -> None:
    """out (float32, rows × columns) = values × slope + intercept, rounded once to float32."""
    if slope == 1.0 and float(intercept).is_integer() and values.dtype.kind in "iu" \
            and values.dtype.itemsize <= 2:
        # Exact in float32 (integers below 2**24), and the fastest path for CT.
        np.add(values, np.float32(intercept), out=out, casting="unsafe")
        return
    tmp = np.multiply(values, slope, dtype=np.float64)
    tmp += intercept
    out[...] = tmp


def _decode_job(src: _Source, items: list[tuple[int, int, float, float]], buf: np.ndarray,
                header: Dataset | None, modality_lut: bool) -> None:
    """Decode the listed frames of one file into buf[k] (k, rows, columns)."""
    try:
        if _is_fast(src) and not modality_lut:
            with open(src.path, "rb", buffering=0) as fh:
                for frame, k, slope, intercept in items:
                    _store(_read_native(fh, src, frame), buf[k], slope, intercept)
            return
        if src.offset is None:  # deflated: let pydicom read the whole file
            ds = pydicom.dcmread(src.path)
            for frame, k, slope, intercept in items:
                arr = ds.pixel_array if src.frames == 1 else ds.pixel_array[frame]
                _store_decoded(arr, src, buf[k], slope, intercept, header, modality_lut)
            return
        from pydicom.pixels import get_decoder

        decoder = get_decoder(src.transfer_syntax)
        with open(src.path, "rb") as fh:
            for frame, k, slope, intercept in items:
                fh.seek(src.offset)
                arr, _ = decoder.as_array(fh, index=frame, **src.options)
                _store_decoded(arr, src, buf[k], slope, intercept, header, modality_lut)
    except MedfoundError:
        raise
    except OSError as err:
        raise MedfoundError(f"cannot read pixel data: {err.strerror or err}", path=src.path,
                            hint="check the file is still there and readable") from err
    except Exception as err:  # noqa: BLE001 - any decoder failure is a property of the file
        raise MedfoundError(
            f"cannot decode pixel data ({src.transfer_syntax.name}): {_one_line(err)}",
            path=src.path, hint="the file may be corrupt or use a codec variant the installed "
            "plugins do not support; convert it (e.g. `gdcmconv --raw`) and retry") from err


def _store_decoded(arr: np.ndarray, src: _Source, out: np.ndarray, slope: float,
                   intercept: float, header: Dataset | None, modality_lut: bool) -> None:
    if modality_lut and header is not None:
        from pydicom.pixels import apply_modality_lut

        arr = apply_modality_lut(arr, header)
    _store(_to_gray(arr, src, header), out, slope, intercept)


def _plan(order: list[_Frame], factor: float, workers: int) -> list[tuple[_Source, list]]:
    """Group frames into jobs: one per file, long multi-frame files split so threads share."""
    by_source: dict[int, tuple[_Source, list]] = {}
    for k, fr in enumerate(order):
        entry = by_source.setdefault(id(fr.source), (fr.source, []))
        entry[1].append((fr.index, k, fr.slope * factor, fr.intercept * factor))
    jobs = []
    for src, items in by_source.values():
        chunk = max(1, -(-len(items) // (4 * workers)))
        jobs.extend((src, items[i:i + chunk]) for i in range(0, len(items), chunk))
    return jobs


def read_series(series: SeriesInfo, *, allow_gaps: bool = False, workers: int | None = None,
                progress: bool | None = None) -> Volume:
    """Decode one series found by `find_series` into a `Volume`.

    The array is float32 (i, j, k) = (column, row, slice), Fortran-ordered (i varies fastest,
    as in the DICOM pixel data and in ITK), values after the modality LUT: HU for CT; for PET
    body-weight SUV when the header allows, else Bq/ml; Gy for RT dose; "raw" otherwise. Color
    images become their luminance (0.299 R + 0.587 G + 0.114 B). The affine maps (i, j, k, 1)
    to LPS mm. Anything a human should know (gantry tilt, oblique, nominal geometry, color,
    gaps read with allow_gaps) is in `Volume.warnings`.

    Raises MedfoundError for missing slices or uneven spacing (unless allow_gaps), duplicate
    positions, mixed sizes/orientations, truncated or undecodable pixel data.
    `workers` threads decode (default: CPU count).
    """
    if workers is not None and workers < 1:
        raise MedfoundError(f"workers must be at least 1, got {workers}",
                            hint="pass workers=N (CLI: --workers N) with N ≥ 1")
    workers = workers or os.cpu_count() or 1
    root = series.root or series.files[0]
    if not series._frames:
        raise MedfoundError("the series has no images", path=root)
    _check_readable(series._frames, root)
    geometry = _geometry(series, allow_gaps)
    order = geometry.order
    units, factor, unit_notes, unit_meta = _units(series)
    notes = geometry.warnings + unit_notes

    header = series.header
    modality_lut = (header is not None and "ModalityLUTSequence" in header
                    and "RescaleSlope" not in header)
    first = order[0].source
    photometrics = {f.source.photometric for f in order}
    if any(f.source.samples > 1 or f.source.photometric == "PALETTE COLOR" for f in order):
        notes.append(f"color image ({', '.join(sorted(photometrics))}) converted to one "
                     "grayscale channel: luminance 0.299 R + 0.587 G + 0.114 B")
    if "MONOCHROME1" in photometrics:
        notes.append("MONOCHROME1: low values display bright; values are kept as stored")

    shape = (len(order), first.rows, first.cols)  # (k, j, i): C order of the (i, j, k) array
    try:
        buf = np.empty(shape, dtype=np.float32)
    except MemoryError as err:
        gib = np.prod(shape) * 4 / 2**30
        raise MedfoundError(f"not enough memory for the {gib:.1f} GiB volume", path=root,
                            hint="free memory or read on a larger machine") from err

    jobs = _plan(order, factor, workers)
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if workers == 1 or len(jobs) < 2:
            for src, items in _progress(jobs, len(jobs), "decoding", progress):
                _decode_job(src, items, buf, header, modality_lut)
        else:
            _run_pool(jobs, buf, header, modality_lut, workers, progress)
    for message in dict.fromkeys(_one_line(w.message) for w in caught):
        notes.append(f"pydicom: {message}")

    return Volume(
        array=buf.transpose(2, 1, 0), affine=geometry.affine, modality=series.modality,
        units=units, series_uid=series.series_uid, path=str(root),
        meta={**_meta(series, order), **unit_meta}, warnings=notes)


def _run_pool(jobs, buf, header, modality_lut, workers, progress) -> None:
    stop = threading.Event()

    def run(job):
        if not stop.is_set():
            _decode_job(job[0], job[1], buf, header, modality_lut)

    pool = ThreadPoolExecutor(max_workers=min(workers, len(jobs)),
                              thread_name_prefix="medfound-decode")
    try:
        futures = [pool.submit(run, job) for job in jobs]
        for fut in _progress(as_completed(futures), len(futures), "decoding", progress):
            fut.result()  # re-raises the first failure here
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
