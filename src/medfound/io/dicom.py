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
import zlib
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
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)
from pydicom.uid import JPEGLossless as JPEGLossless

from medfound.errors import MedfoundError
from medfound.io.volume import Volume, voxel_budget

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
    problem: str | None = None  # why the file cannot be read, if it cannot
    problem_kind: str = "bad_header"  # DicomReadError.kind of that problem
    problem_hint: str = ("fix or remove this file; its header does not describe its pixel "
                         "data")

    def refuse(self, problem: str, kind: str = "bad_header", hint: str | None = None) -> None:
        """Record the first reason this file cannot be read (read_series raises it)."""
        if self.problem is None:
            self.problem, self.problem_kind = problem, kind
            if hint:
                self.problem_hint = hint


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
    rescaled: bool = True  # the header gives a modality LUT (RescaleSlope/Intercept)


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
    # Files that look like part of this series (its SeriesInstanceUID, or a DICOM file in its
    # folder that cannot be parsed) but cannot be read: (path, why).
    unreadable: list[tuple[str, str]] = field(default_factory=list, repr=False)

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


class DicomReadError(MedfoundError):
    """A file or series that cannot be read as an image. `kind` is its category, a fixed
    word that QC can count without the message's free text (file names, header values):
    truncated, too_large, bad_header, invalid_rescale, invalid_geometry, undecodable,
    unsupported_codec, unreadable_files, gaps_or_uneven_spacing, duplicate_positions,
    mixed_geometry."""

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None,
                 kind: str = "bad_header"):
        self.kind = kind
        super().__init__(message, path=path, hint=hint)


# --- header pass ------------------------------------------------------------------------


class _NotDicom(Exception):
    """Not an image file. `damaged`: it looks like DICOM (magic, DICOM tags or a DICOM file
    name) but cannot be parsed, so it may be a slice of a series that was cut or corrupted."""

    def __init__(self, message: str, damaged: bool = False):
        super().__init__(message)
        self.damaged = damaged


_DICOM_NAMES = (".dcm", ".dicom", ".dic", ".ima")
_HEAD_BYTES = 4096  # read first: the preamble, and the file meta of any ordinary file
_DEFLATED_UID = str(DeflatedExplicitVRLittleEndian).encode("ascii")
_DEFLATE_HEAD = 8 * 2**20  # inflated bytes kept to parse a deflated data set's header
_BITS = (1, 8, 16, 32, 64)


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


def _read_header(path: str, budget: int | None = None) -> tuple[Dataset, _Source | None]:
    """Parse one file up to its pixel data. Returns the header and, for an image, a _Source.

    The sizes the header declares are checked here, before any frame is listed or decoded:
    against `budget` voxels and against the bytes the file holds (uncompressed pixel data
    long enough, encapsulated pixel data with a fragment for every frame, a deflated data set
    that inflates to no more than its header declares). A file that fails is kept as an
    image with `problem` set (and one frame), so that reading its series names it.
    Raises _NotDicom for files that are not DICOM; OSError passes through.
    """
    budget = voxel_budget() if budget is None else budget
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
        if not _looks_like_dicom(head):
            named = path.lower().endswith(_DICOM_NAMES)
            raise _NotDicom(
                "not a DICOM file (no DICM marker and no DICOM tags at the start)"
                + (f", though named like one ({len(head)} bytes at the start)" if named else ""),
                damaged=named)
        has_magic = head[128:132] == b"DICM"
        inflated_problem = None
        try:
            ds = None
            if _DEFLATED_UID in head:
                f.seek(0)
                ds, inflated_problem = _read_deflated(f, has_magic, budget)
            if ds is None:
                f.seek(0)
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=not has_magic)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever pydicom trips on, it is not readable
            raise _NotDicom(f"damaged DICOM header ({_one_line(err)})" if has_magic
                            else f"not a DICOM file ({_one_line(err)})",
                            damaged=True) from err
        if not isinstance(ds, Dataset) or len(ds) == 0:
            raise _NotDicom("not a DICOM file (no data elements)", damaged=has_magic)
        file_size = os.fstat(f.fileno()).st_size
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        implicit, little = ds.original_encoding[:2]
        if implicit is None:
            implicit, little = False, True
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
    problem, kind, hint = None, "bad_header", None
    try:
        rows, cols = _raw(ds, _ROWS, "us") or 0, _raw(ds, _COLUMNS, "us") or 0
        frames_text = _raw(ds, _FRAMES, "text")
        frames = int(frames_text) if frames_text else 1
        samples = _raw(ds, _SAMPLES, "us") or 1
        bits_allocated = _raw(ds, _BITS_ALLOCATED, "us") or 16
        bits_stored = _raw(ds, _BITS_STORED, "us") or bits_allocated
        if min(rows, cols, frames, samples) < 1 or not 1 <= bits_stored <= bits_allocated \
                or bits_allocated not in _BITS or samples > 4:
            raise ValueError(f"Rows {rows}, Columns {cols}, NumberOfFrames {frames}, "
                             f"SamplesPerPixel {samples}, BitsAllocated {bits_allocated}, "
                             f"BitsStored {bits_stored}")
    except (TypeError, ValueError, AttributeError, struct.error) as err:
        # Kept as an image so that reading its series names this file and what is wrong.
        problem = f"bad image header: {_one_line(err)}"
        rows, cols, frames, samples, bits_allocated, bits_stored = 0, 0, 1, 1, 16, 16
    photometric = _raw(ds, _PHOTOMETRIC, "text") or "MONOCHROME2"
    signed = bool(_raw(ds, _PIXEL_REPRESENTATION, "us"))
    src = _Source(
        path=path, transfer_syntax=ts, rows=rows, cols=cols, frames=frames, samples=samples,
        photometric=photometric, bits_allocated=bits_allocated, bits_stored=bits_stored,
        signed=signed, keyword=keyword, offset=offset, length=length, file_size=file_size,
        options={}, instance=0)
    if problem is None and not ts.is_transfer_syntax:
        problem, kind, hint = (f"TransferSyntaxUID {str(ts)[:64]!r} is not a transfer syntax",
                               "unsupported_codec", "the file meta is corrupt; export the "
                               "file again")
    if problem is None:
        problem, kind, hint = inflated_problem or _size_problem(src, budget)
    if problem is not None:
        src.refuse(problem, kind, hint)
        src.frames = frames = 1  # never list (or build) the frames of a header that lies
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
    src.options = options
    instance = _raw(ds, _INSTANCE, "numbers")
    src.instance = int(instance[0]) if instance and abs(instance[0]) < 2**62 else 0
    return ds, src


_TOO_LARGE_HINT = ("if the header is right and the machine has the memory, raise the limit "
                   "(max_voxels=, or MEDFOUND_MAX_VOXELS); else the file is corrupt")
_TRUNCATED_HINT = "copy or export the file again; it was cut short"


def _size_problem(src: _Source, budget: int) -> tuple[str | None, str, str | None]:
    """Why the pixel data the header declares cannot be read, checked before decoding:
    (problem or None, DicomReadError kind, hint)."""
    voxels = src.rows * src.cols * src.frames * src.samples
    if voxels > budget:
        samples = f" × {src.samples} samples" if src.samples > 1 else ""
        return (f"the header declares {src.rows} rows × {src.cols} columns × {src.frames} "
                f"frame(s){samples} = {voxels:,} voxels, over the limit of {budget:,}",
                "too_large", _TOO_LARGE_HINT)
    if src.offset is None:
        return None, "", None
    if src.length != _UNDEFINED:
        if src.offset + src.length > src.file_size:
            return (f"truncated file: pixel data should have {src.length} bytes but the file "
                    f"ends after {max(src.file_size - src.offset, 0)}", "truncated",
                    _TRUNCATED_HINT)
        if not src.transfer_syntax.is_compressed and src.length < _native_bytes(src):
            return (f"pixel data has {src.length} bytes where {src.rows} rows × {src.cols} "
                    f"columns × {src.frames} frame(s) × {src.bits_allocated} bits need "
                    f"{_native_bytes(src)}", "truncated",
                    "the file is truncated or its header is wrong; export it again")
        return None, "", None
    if src.offset >= src.file_size:
        return "truncated file: it ends at its pixel data", "truncated", _TRUNCATED_HINT
    try:
        with open(src.path, "rb") as fh:
            offsets, fragments = _fragments(fh, src.offset, src.file_size)
    except _Cut as err:
        return f"truncated file: {err}", "truncated", _TRUNCATED_HINT
    except ValueError as err:
        return f"bad encapsulated pixel data: {err}", "bad_header", None
    if fragments < src.frames:
        return (f"NumberOfFrames is {src.frames} but the encapsulated pixel data holds "
                f"{fragments} fragment(s); every frame needs at least one", "bad_header", None)
    if offsets and offsets != src.frames:
        return (f"the basic offset table lists {offsets} frame(s) but NumberOfFrames is "
                f"{src.frames}", "bad_header", None)
    return None, "", None


class _Cut(ValueError):
    """Encapsulated pixel data that runs past the end of the file."""


def _fragments(fh, offset: int, file_size: int) -> tuple[int, int]:
    """(entries in the basic offset table, fragments) of the encapsulated pixel data whose
    value starts at `offset`: item headers only, each fragment skipped by its length."""
    fh.seek(offset)
    raw = fh.read(8)
    if len(raw) < 8:
        raise _Cut("it ends inside the pixel data's offset table")
    group, elem, length = struct.unpack("<HHL", raw)
    if (group, elem) != (0xFFFE, 0xE000) or length % 4:
        raise ValueError(f"no basic offset table item at its start (tag ({group:04X},"
                         f"{elem:04X}), length {length})")
    pos = offset + 8 + length
    if pos > file_size:
        raise _Cut("the basic offset table runs past the end of the file")
    table = length // 4
    fragments = 0
    while True:
        fh.seek(pos)
        raw = fh.read(8)
        if len(raw) < 8:
            break  # no sequence delimiter: tolerated, as pydicom does
        group, elem, length = struct.unpack("<HHL", raw)
        if (group, elem) == (0xFFFE, 0xE0DD):
            break
        if (group, elem) != (0xFFFE, 0xE000) or length == _UNDEFINED:
            raise ValueError(f"unexpected tag ({group:04X},{elem:04X}) after {fragments} "
                             "fragment(s)")
        pos += 8 + length
        if pos > file_size:
            raise _Cut(f"fragment {fragments + 1} of the pixel data runs past the end of the "
                       "file")
        fragments += 1
    return table, fragments


def _inflate(f, chunk: int = 1 << 16):
    """The raw-deflate stream from the file's position on, inflated piece by piece."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    while not d.eof:
        data = d.unconsumed_tail or f.read(chunk)
        if not data:
            return
        out = d.decompress(data, 1 << 20)
        if out:
            yield out


def _read_deflated(f, has_magic: bool, budget: int) -> tuple[Dataset | None, tuple | None]:
    """The header of a Deflated Explicit VR Little Endian file, inflated piece by piece
    (pydicom inflates the whole file at once: a small file can hold gigabytes).

    Returns (header or None if the file meta names another transfer syntax, the size problem
    tuple if the data set inflates past what its header declares, else None)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble

    read_preamble(f, not has_magic)
    meta = _read_file_meta_info(f)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None, None
    pieces = _inflate(f)
    head = bytearray()
    for piece in pieces:
        head += piece
        if len(head) >= _DEFLATE_HEAD:
            break
    buf = DicomBytesIO(bytes(head))
    buf.is_little_endian, buf.is_implicit_VR = True, False
    ds = read_dataset(buf, False, True, stop_when=_at_pixel_data)
    ds.file_meta = meta
    ds.preamble = None
    if _ROWS not in ds:
        return ds, None  # not an image: the rest need not be inflated
    start = buf.tell()
    rows, cols = _raw(ds, _ROWS, "us") or 0, _raw(ds, _COLUMNS, "us") or 0
    frames = _int(_raw(ds, _FRAMES, "text"), 1)
    samples = _raw(ds, _SAMPLES, "us") or 1
    bits = _raw(ds, _BITS_ALLOCATED, "us") or 16
    voxels = rows * cols * max(frames, 1) * samples
    if voxels > budget:
        return ds, (f"the header declares {rows} rows × {cols} columns × {frames} frame(s) = "
                    f"{voxels:,} voxels, over the limit of {budget:,}", "too_large",
                    _TOO_LARGE_HINT)
    declared = start + 12 + (voxels * bits + 7) // 8
    limit = declared + max(2**20, declared // 100)  # room for trailing elements
    total = len(head)
    for piece in pieces:
        total += len(piece)
        if total > limit:
            return ds, (f"the deflated data set inflates past {limit:,} bytes, more than its "
                        f"header declares ({rows}×{cols}×{frames} pixels of {bits} bits)",
                        "bad_header", None)
    return ds, None


def _get(ds: Dataset | None, keyword: str) -> Any:
    """ds.get(keyword), None where pydicom cannot convert the stored value (a bad VR or a
    garbled value read lazily)."""
    if ds is None:
        return None
    try:
        with _quiet():
            return ds.get(keyword)
    except Exception:  # noqa: BLE001 - a corrupt header value counts as absent
        return None


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


class _BadValue(ValueError):
    """A modality LUT value that cannot be used: its message names the attribute."""


_LUT_HINT = ("fix or remove this file: its values cannot be turned into the modality's units "
             "(HU for CT) without a valid RescaleSlope and RescaleIntercept")


def _lut_value(ds: Dataset | None, key: int | str, name: str) -> float | None:
    """One modality LUT number (RescaleSlope, RescaleIntercept, DoseGridScaling): None when
    absent or empty; _BadValue when it is not one finite number."""
    elem = None if ds is None else ds.get_item(key)
    value = None if elem is None else elem.value
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, bytes):
        text = value.decode("latin-1")
    elif isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip(" \x00")
    if not text:
        return None
    shown = repr(text[:24] + ("..." if len(text) > 24 else ""))
    try:
        number = float(text)
    except ValueError:
        raise _BadValue(f"{name} {shown} is not a number") from None
    if not np.isfinite(number):
        raise _BadValue(f"{name} {shown} is not a finite number")
    return number


def _rescale(ds: Dataset | None, src: _Source, slope: float | None = None,
             intercept: float | None = None) -> tuple[float, float, bool]:
    """(slope, intercept, given) of a header or functional group item, `slope`/`intercept`
    where it gives none; _BadValue for a slope of 0 or values past float32's range."""
    s = _lut_value(ds, _SLOPE, "RescaleSlope")
    i = _lut_value(ds, _INTERCEPT, "RescaleIntercept")
    given = s is not None or i is not None
    s = s if s is not None else (slope if slope is not None else 1.0)
    i = i if i is not None else (intercept if intercept is not None else 0.0)
    if s == 0:
        raise _BadValue("RescaleSlope 0 makes every pixel the same value")
    if abs(s) * 2.0 ** min(src.bits_stored, 64) + abs(i) > 1e38:
        raise _BadValue(f"RescaleSlope {s:g} and RescaleIntercept {i:g} take the values "
                        "past the range of float32")
    return s, i, given


def _frames_of(ds: Dataset, src: _Source) -> list[_Frame]:
    """Every 2D image in one file, with its geometry and rescale (PS3.3 C.7.6.2, C.7.6.16)."""
    slope, intercept, rescaled = _rescale(ds, src)
    if "DoseGridScaling" in ds and _raw(ds, _MODALITY, "text") == "RTDOSE":
        scaling = _lut_value(ds, "DoseGridScaling", "DoseGridScaling")
        if scaling == 0:
            raise _BadValue("DoseGridScaling 0 makes every dose the same value")
        slope, intercept, rescaled = scaling or 1.0, 0.0, True
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
            f_slope, f_intercept, f_given = (_rescale(transform, src, slope, intercept)
                                             if transform else (slope, intercept, rescaled))
            frames.append(_Frame(
                src, f,
                _floats(plane.get("ImagePositionPatient"), 3) if plane else position,
                _floats(orient.get("ImageOrientationPatient"), 6) if orient else orientation,
                (float(sp[0]), float(sp[1])) if sp is not None else spacing_t,
                f_slope, f_intercept, f_given or rescaled))
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
                   spacing_t, slope, intercept, rescaled) for f in range(n)]


def _safe_frames_of(ds: Dataset, src: _Source) -> list[_Frame]:
    try:
        with _quiet():
            return _frames_of(ds, src)
    except _BadValue as err:
        src.refuse(f"invalid modality LUT: {err}", "invalid_rescale", _LUT_HINT)
    except Exception as err:  # noqa: BLE001 - a corrupt header value; reported at read time
        src.refuse(f"bad image header: {_one_line(err)}")
    src.frames = 1
    return [_Frame(src, 0, None, None, None, 1.0, 0.0)]


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


def find_series(path: str | Path, *, progress: bool | None = None,
                max_voxels: int | None = None) -> list[SeriesInfo]:
    """Find the image series in a DICOM file or a folder (searched recursively).

    Only headers are read. Files that are not DICOM, and DICOM objects without pixel data
    (DICOMDIR, structured reports, RT plans, ...), are skipped in a folder; given on their own
    they are an error. A file that looks like part of a series but cannot be read (an image
    header cut before its pixel data, a damaged DICOM header, a file named .dcm that is not
    DICOM) is listed in the `unreadable` of its series (by SeriesInstanceUID, else every
    series in its folder), so that reading the series reports it. Declared image sizes are
    checked against `max_voxels` (see `medfound.io.volume.voxel_budget`) before any frame is
    listed. Series are returned ordered by SeriesNumber, then SeriesInstanceUID.
    Raises MedfoundError when the path is missing or unreadable, or holds no image.
    """
    budget = voxel_budget(max_voxels)
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
    # (path, why, SeriesInstanceUID or None, sure): `sure` for a damaged file or an image
    # header cut before its pixels; not for an image-class object with no image attributes
    # at all (a header-only stub, as DICOMDIR test sets hold), counted only in its series.
    broken: list[tuple[str, str, str | None, bool]] = []
    with _quiet():
        for file in _progress(files, len(files), "reading headers", progress):
            try:
                ds, source = _read_header(file, budget)
            except _NotDicom as err:
                not_dicom.append((file, str(err)))
                if err.damaged:
                    broken.append((file, str(err), None, True))
                continue
            except OSError as err:
                # Even in a folder: skipping it could silently drop a slice of the series.
                raise MedfoundError(f"cannot read file: {err.strerror or err}", path=file,
                                    hint="check the file exists and you may read it") from err
            if source is None:
                what = _what_is(ds)
                no_pixels.append((file, what))
                if "truncated" in what:  # an image header without its pixels
                    broken.append((file, what, _raw(ds, _SERIES_UID, "text"), _ROWS in ds))
                continue
            groups.setdefault(_raw(ds, _SERIES_UID, "text") or "", []).append((ds, source))

    if not groups:
        raise _no_image_error(root, files, not_dicom, no_pixels)

    series = []
    for uid, members in groups.items():
        first = members[0][0]
        frames = [fr for ds, src in members for fr in _safe_frames_of(ds, src)]
        series.append(SeriesInfo(
            series_uid=uid, modality=str(_get(first, "Modality") or "OT"),
            description=str(_get(first, "SeriesDescription") or ""), count=len(members),
            frames=len(frames), files=[src.path for _, src in members],
            number=_int(_get(first, "SeriesNumber"), None) if "SeriesNumber" in first else None,
            header=first, root=str(root), _frames=frames))
    series.sort(key=lambda s: (s.number is None, s.number or 0, s.series_uid))
    _assign_unreadable(series, broken)
    return series


def _assign_unreadable(series: list[SeriesInfo],
                       broken: list[tuple[str, str, str | None, bool]]) -> None:
    """Give each unreadable file to the series it belongs to: the one with its
    SeriesInstanceUID, else every series with a file in its folder, else every series."""
    by_uid = {s.series_uid: s for s in series}
    folders = [{os.path.dirname(f) for f in s.files} for s in series]
    for path, why, uid, sure in broken:
        if uid in by_uid:
            owners = [by_uid[uid]]
        elif not sure:
            continue
        else:
            owners = [s for s, dirs in zip(series, folders, strict=True)
                      if os.path.dirname(path) in dirs] or series
        for s in owners:
            s.unreadable.append((path, why))


def _what_is(ds: Dataset) -> str:
    sop = ds.get("SOPClassUID") or (ds.file_meta.get("MediaStorageSOPClassUID")
                                    if hasattr(ds, "file_meta") else None)
    if sop == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (media directory)"
    name = getattr(UID(str(sop)), "name", "") if sop else ""
    name = "".join(c for c in str(name) if c.isprintable()).strip()[:64]  # a garbled UID
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
               workers: int | None = None, progress: bool | None = None,
               max_voxels: int | None = None) -> Volume:
    """Read one image series from a DICOM file or folder; see `read_series` for the result.

    A folder with several series needs `series_uid`, else MultipleSeriesError lists them.
    """
    series = find_series(path, progress=progress, max_voxels=max_voxels)
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
    return read_series(series[0], allow_gaps=allow_gaps, workers=workers, progress=progress,
                       max_voxels=max_voxels)


# --- geometry ---------------------------------------------------------------------------


@dataclass
class _Geometry:
    order: list[_Frame]  # frames in k order
    affine: np.ndarray
    warnings: list[tuple[str, str]]  # (kind, text)


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
            raise DicomReadError(
                f"mixed {what} in one series: {show(ref)} ({n_ref} images, e.g. "
                f"{_name(frames[0])}) and {show(v)} (e.g. {_name(fr)})", path=root,
                hint="the series mixes image stacks (e.g. a localizer); move the odd files "
                "out or read one file directly", kind="mixed_geometry")


def _same_spacing(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(abs(x - y) <= SPACING_REL_TOL * abs(x) + 1e-6 for x, y in zip(a, b, strict=True))


def _fmt(v: Iterable[float], nd: int = 4) -> str:
    return "(" + ", ".join(f"{x:.{nd}g}" for x in v) + ")"


def _geometry(series: SeriesInfo, allow_gaps: bool) -> _Geometry:
    """Order the frames along the slice normal and build the (i, j, k) → LPS affine."""
    frames, root = series._frames, series.root or (series.files[0] if series.files else "")
    notes: list[tuple[str, str]] = []
    _check_same(frames, lambda f: (f.source.rows, f.source.cols), lambda a, b: a == b,
                "image sizes", root, lambda v: f"{v[1]}×{v[0]} (columns×rows)")
    _check_same(frames, lambda f: f.spacing, _same_spacing, "pixel spacings", root,
                lambda v: "none" if v is None else f"{_fmt(v)} mm")

    with_geometry = [f.position is not None and f.orientation is not None for f in frames]
    if all(with_geometry):
        _check_same(frames, lambda f: f.orientation,
                    lambda a, b: bool(np.abs(a - b).max() < COSINE_TOL),
                    "orientations", root, lambda v: f"ImageOrientationPatient {_fmt(v)}")
        geometry = _spatial_geometry(frames, series.header, root, allow_gaps, notes)
    elif any(with_geometry):
        missing = next(f for f, g in zip(frames, with_geometry, strict=True) if not g)
        raise DicomReadError(f"some images of the series have no position/orientation (e.g. "
                             f"{_name(missing)})", path=root, kind="invalid_geometry",
                             hint="move the images without ImagePositionPatient out of the "
                             "folder")
    else:
        geometry = _nominal_geometry(series, frames, root, notes)
    a = geometry.affine[:3, :3]
    if not (np.isfinite(geometry.affine).all() and abs(np.linalg.det(a)) > 1e-12
            and np.linalg.norm(a, axis=0).max() < 1e6):
        raise DicomReadError(
            f"the header's geometry gives no usable voxel grid (voxel size "
            f"{_fmt(np.linalg.norm(a, axis=0))} mm)", path=root, kind="invalid_geometry",
            hint="the series' positions, orientation or spacing are corrupt; export it again")
    return geometry


def _check_orientation(frames: list[_Frame], root: str) -> None:
    """ImageOrientationPatient must give two independent directions, PixelSpacing two
    positive steps: else there is no image plane to place the pixels in."""
    orient, ps = frames[0].orientation, frames[0].spacing
    row, col = orient[:3], orient[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr < 0.5 or nc < 0.5 or nr > 2 or nc > 2 or \
            float(np.linalg.norm(np.cross(row / nr, col / nc))) < 0.5:
        raise DicomReadError(
            f"ImageOrientationPatient {_fmt(orient)} does not give two directions at right "
            "angles (a zero, parallel or not unit vector)", path=frames[0].source.path,
            kind="invalid_geometry", hint="the header's geometry is corrupt; fix or export "
            "the series again")
    if ps is not None and not (ps[0] > 0 and ps[1] > 0):
        raise DicomReadError(f"PixelSpacing {_fmt(ps)} mm is not two positive numbers",
                             path=frames[0].source.path, kind="invalid_geometry",
                             hint="the header's geometry is corrupt; fix or export the series "
                             "again")


def _spatial_geometry(frames: list[_Frame], header: Dataset | None, root: str,
                      allow_gaps: bool, notes: list[tuple[str, str]]) -> _Geometry:
    header = header if header is not None else Dataset()
    _check_orientation(frames, root)
    orient = frames[0].orientation
    row, col = orient[:3], orient[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(
            row @ col) > 1e-3:
        notes.append(("orientation_not_orthonormal",
                      f"ImageOrientationPatient {_fmt(orient)} is not two orthogonal unit "
                      "vectors; the affine uses it as given"))
    else:
        # Cosines are decimal strings: rescale them to unit length so that the spacing is
        # PixelSpacing exactly, not PixelSpacing × (1 ± rounding).
        row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    if not all(np.isclose(np.abs(v), 0, atol=COSINE_TOL).sum() == 2 for v in (row, col)):
        notes.append(("oblique", f"oblique orientation: ImageOrientationPatient "
                      f"{_fmt(orient)}; the affine carries the rotation (axes are not aligned "
                      "with L, P, S)"))
    ps = frames[0].spacing
    if ps is None:
        ps = (1.0, 1.0)
        notes.append(("nominal_geometry", "no PixelSpacing: in-plane spacing is nominal (1 mm)"))
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
        raise DicomReadError(
            f"duplicate slice positions: {dup.size} pair(s) of images share a position, e.g. "
            f"{_name(a)} and {_name(b)} at {_fmt(positions[dup[0]], 6)} mm", path=root,
            hint="the series holds repeated images (several acquisitions, echoes or phases); "
            "keep one image per position", kind="duplicate_positions")
    gaps = np.diff(depth)
    median = float(np.median(gaps))
    uneven = np.abs(gaps - median) > GAP_REL_TOL * median + GAP_ABS_MM
    if uneven.any():
        message = _gap_message(frames, gaps, median, uneven)
        if not allow_gaps:
            raise DicomReadError(message, path=root, kind="gaps_or_uneven_spacing",
                                 hint="check the series is complete, or pass allow_gaps=True "
                                 "(CLI: --allow-gaps) to read it with its median slice step")
        notes.append(("gaps_or_uneven_spacing", message + f"; read anyway with the median step "
                      f"{median:.4g} mm, so positions past an odd gap are off"))
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
        notes.append(("gantry_tilt", f"gantry tilt: slices are sheared by {angle:.2f}°{stated_s}; "
                      "the affine's k column follows the slice positions, so world coordinates "
                      "are right but the axes are not orthogonal — resample before models that "
                      "assume they are"))
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
                      notes: list[tuple[str, str]]) -> _Geometry:
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
    if not (dx > 0 and dy > 0):
        raise DicomReadError(f"pixel spacing {dx:g}×{dy:g} mm is not two positive numbers",
                             path=frames[0].source.path, kind="invalid_geometry",
                             hint="the header's geometry is corrupt; fix or export it again")
    notes.append(("nominal_geometry",
                  f"no patient geometry (ImagePositionPatient/ImageOrientationPatient): the "
                  f"affine is nominal — {spacing_note}, k counts {along}, origin 0"))
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
    factor = weight * 1000.0 / decayed if decayed > 0 else float("inf")
    if not np.isfinite(factor):
        return None, (f"the dose decays to nothing in {elapsed:.0f} s with a half-life of "
                      f"{half_life:g} s"), {}
    facts.update(decay_time_s=elapsed, suv_factor=factor)
    return factor, "", facts


def _units(series: SeriesInfo) -> tuple[str, float, list[tuple[str, str]], dict[str, Any]]:
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
            return "Bq/ml", 1.0, [("suv_not_computed",
                                   f"SUV not computed ({why}); values are Bq/ml")], {}
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
            value = _get(ds, keyword)
            if value is None or value == "":
                continue
            if isinstance(value, MultiValue):
                meta[keyword] = [str(v) for v in value]
            elif isinstance(value, int | float):  # IS and DS values are int/float subclasses
                meta[keyword] = int(value) if isinstance(value, int) else float(value)
            else:
                meta[keyword] = str(value)
    src = frames[0].source
    sop = _get(ds, "SOPClassUID")
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
            raise DicomReadError(src.problem, path=src.path, hint=src.problem_hint,
                                 kind=src.problem_kind)
        ts = src.transfer_syntax
        if ts not in seen:
            seen.add(ts)
            try:
                decoder = get_decoder(ts)
            except NotImplementedError as err:
                raise DicomReadError(
                    f"pixel data in transfer syntax '{ts.name}' ({ts}) cannot be decoded",
                    path=src.path, hint="convert the files to an uncompressed transfer syntax "
                    "(e.g. `gdcmconv --raw` or `dcmdjpeg`)", kind="unsupported_codec") from err
            if not decoder.is_available:
                raise DicomReadError(
                    f"no installed decoder for '{ts.name}' pixel data "
                    f"({_one_line('; '.join(decoder.missing_dependencies))})", path=src.path,
                    hint="install the pylibjpeg plugins (pip install 'medfound') or convert "
                    "the files to an uncompressed transfer syntax", kind="unsupported_codec")
        if src.offset is None:
            continue
        if src.length != _UNDEFINED:
            end = src.offset + src.length
            if end > src.file_size:
                raise DicomReadError(
                    f"truncated file: pixel data should have {src.length} bytes but the file "
                    f"ends after {max(src.file_size - src.offset, 0)}", path=src.path,
                    hint=_TRUNCATED_HINT, kind="truncated")
            if not ts.is_compressed and src.length < _native_bytes(src):
                raise DicomReadError(
                    f"pixel data has {src.length} bytes where {src.rows} rows × {src.cols} "
                    f"columns × {src.frames} frame(s) × {src.bits_allocated} bits need "
                    f"{_native_bytes(src)}", path=src.path, kind="truncated",
                    hint="the file is truncated or its header is wrong; export it again")
        elif src.offset >= src.file_size:
            raise DicomReadError("truncated file: it ends at its pixel data", path=src.path,
                                 hint=_TRUNCATED_HINT, kind="truncated")


def _check_unreadable(series: SeriesInfo, allow_gaps: bool, notes: list[tuple[str, str]]
                      ) -> None:
    """Refuse a series some of whose files cannot be read (wherever they sit in it: an edge
    slice left out shows as no gap), or with allow_gaps note each one."""
    if not series.unreadable:
        return
    n = len(series.unreadable)
    shown = "; ".join(f"{os.path.basename(p)} ({why})" for p, why in series.unreadable[:3])
    message = f"{n} file(s) of the series cannot be read: {shown}" + (", ..." if n > 3 else "")
    if not allow_gaps:
        raise DicomReadError(
            message, path=series.unreadable[0][0], kind="unreadable_files",
            hint="copy or export them again, move them out if they are not part of the "
            "series, or pass allow_gaps=True (CLI: --allow-gaps) to read the series without "
            "them")
    notes.append(("unreadable_files", message + "; read without them (allow_gaps), so the "
                  "volume may lack slices at its ends"))


def _check_rescale(series: SeriesInfo, frames: list[_Frame]) -> None:
    """A CT series whose images do not all carry a modality LUT would mix HU with stored
    values (off by the intercept, often 1024): refuse it, naming a file without one."""
    if series.modality != "CT":
        return
    given = [f.rescaled for f in frames]
    if any(given) and not all(given):
        odd = next(f for f in frames if not f.rescaled)
        raise DicomReadError(
            f"no RescaleIntercept/RescaleSlope in this image while {sum(given)} other "
            "image(s) of the CT series have them: its values would be stored values, not HU",
            path=odd.source.path, kind="invalid_rescale",
            hint="fix or remove this file (or export the series again)")


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
                if src.length == _UNDEFINED:
                    _check_codestream(fh, src, frame)
                fh.seek(src.offset)
                arr, _ = decoder.as_array(fh, index=frame, **src.options)
                _store_decoded(arr, src, buf[k], slope, intercept, header, modality_lut)
    except MedfoundError:
        raise
    except OSError as err:
        raise DicomReadError(f"cannot read pixel data: {err.strerror or err}", path=src.path,
                             hint="check the file is still there and readable",
                             kind="unreadable_files") from err
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # noqa: BLE001 - any decoder failure is a property of the
        # file; Rust plugins (pylibjpeg-rle) panic with a BaseException
        raise DicomReadError(
            f"cannot decode pixel data ({src.transfer_syntax.name}): {_one_line(err)}",
            path=src.path, hint="the file may be corrupt or use a codec variant the installed "
            "plugins do not support; convert it (e.g. `gdcmconv --raw`) and retry",
            kind="undecodable") from err


_JPEG = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
         JPEGLSNearLossless}
_J2K = {JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K}
# JPEG frame headers: SOF0-SOF15 but DHT (C4), JPG (C8), DAC (CC); SOF55 for JPEG-LS.
_SOF = {m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)} | {0xF7}
MAX_TILES = 4096  # JPEG 2000 tiles a frame may have (decoding cost grows with them)


def _check_codestream(fh, src: _Source, frame: int) -> None:
    """Compare the image size a JPEG / JPEG 2000 frame declares in its own header with
    Rows × Columns before it is decoded: the codec allocates what its header says."""
    if src.transfer_syntax not in _JPEG and src.transfer_syntax not in _J2K:
        return
    from pydicom.encaps import get_frame

    fh.seek(src.offset)
    data = get_frame(fh, frame, number_of_frames=src.frames,
                     extended_offsets=src.options.get("extended_offsets"))
    tiles = 1
    if src.transfer_syntax in _JPEG:
        rows, cols, what = *_jpeg_size(data), "JPEG frame header"
    else:
        rows, cols, tiles = _j2k_size(data)
        what = "JPEG 2000 image header (SIZ)"
    if (rows not in (0, src.rows) and rows is not None) or cols != src.cols:
        raise DicomReadError(
            f"frame {frame + 1}: the {what} says {cols}×{rows} pixels, the DICOM header "
            f"{src.cols}×{src.rows} (Columns×Rows)", path=src.path, kind="bad_header",
            hint="the file is corrupt or its header is wrong; export it again")
    if tiles > MAX_TILES:
        raise DicomReadError(
            f"frame {frame + 1}: the {what} splits {cols}×{rows} pixels into {tiles:,} "
            f"tiles (at most {MAX_TILES} are decoded)", path=src.path, kind="undecodable",
            hint="the file is corrupt or unusually encoded; convert it (e.g. `gdcmconv "
            "--raw`) and retry")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(lines, samples per line) of a JPEG / JPEG-LS frame header (ITU T.81 B.2.2)."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("the frame does not start with a JPEG start-of-image marker")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i} of the frame")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            if i + 9 > n:
                break
            return (int.from_bytes(data[i + 5:i + 7], "big"),
                    int.from_bytes(data[i + 7:i + 9], "big"))
        if marker in (0xDA, 0xD9):  # start of scan / end of image before a frame header
            break
        i += 2 + length
    raise ValueError("no JPEG frame header (SOF) in the frame")


def _j2k_size(data: bytes) -> tuple[int, int, int]:
    """(height, width, tiles) from a JPEG 2000 codestream's SIZ marker (ITU T.800 A.5.1);
    the codestream may sit inside a JP2 file."""
    at = data.find(b"\xff\x4f\xff\x51", 0, 1 << 16)
    if at < 0 or at + 40 > len(data):
        raise ValueError("no JPEG 2000 image header (SOC, SIZ) in the frame")
    (xsiz, ysiz, xo, yo, xt, yt, xto, yto) = struct.unpack(">8L", data[at + 8:at + 40])
    if xt == 0 or yt == 0 or xo >= xsiz or yo >= ysiz or xto > xo or yto > yo:
        raise ValueError(f"invalid JPEG 2000 image header (size {xsiz}×{ysiz}, offset "
                         f"{xo}×{yo}, tile {xt}×{yt})")
    tiles = -(-(xsiz - xto) // xt) * -(-(ysiz - yto) // yt)
    return ysiz - yo, xsiz - xo, tiles


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
                progress: bool | None = None, max_voxels: int | None = None) -> Volume:
    """Decode one series found by `find_series` into a `Volume`.

    The array is float32 (i, j, k) = (column, row, slice), Fortran-ordered (i varies fastest,
    as in the DICOM pixel data and in ITK), values after the modality LUT: HU for CT; for PET
    body-weight SUV when the header allows, else Bq/ml; Gy for RT dose; "raw" otherwise. Color
    images become their luminance (0.299 R + 0.587 G + 0.114 B). The affine maps (i, j, k, 1)
    to LPS mm. Anything a human should know (gantry tilt, oblique, nominal geometry, color,
    gaps read with allow_gaps) is in `Volume.warnings`, and its category (a fixed word, see
    DicomReadError.kind) at the same place in `Volume.meta["warning_kinds"]`.

    Raises DicomReadError (a MedfoundError) for missing slices or uneven spacing and for files
    of the series that cannot be read (unless allow_gaps: then a warning names them),
    duplicate positions, mixed sizes/orientations, degenerate geometry, invalid modality LUT
    values, a CT series only partly carrying them, truncated or undecodable pixel data, and a
    volume over `max_voxels` (see `medfound.io.volume.voxel_budget`), checked before
    anything is decoded. `workers` threads decode (default: CPU count).
    """
    if workers is not None and workers < 1:
        raise MedfoundError(f"workers must be at least 1, got {workers}",
                            hint="pass workers=N (CLI: --workers N) with N ≥ 1")
    workers = workers or os.cpu_count() or 1
    root = series.root or series.files[0]
    if not series._frames:
        raise MedfoundError("the series has no images", path=root)
    budget = voxel_budget(max_voxels)
    notes: list[tuple[str, str]] = []
    _check_unreadable(series, allow_gaps, notes)
    _check_readable(series._frames, root)
    _check_rescale(series, series._frames)
    first = series._frames[0].source
    voxels = len(series._frames) * first.rows * first.cols
    if voxels > budget:
        raise DicomReadError(
            f"{len(series._frames)} images of {first.cols}×{first.rows} pixels make "
            f"{voxels:,} voxels, over the limit of {budget:,}", path=root, kind="too_large",
            hint=_TOO_LARGE_HINT)
    try:
        with _quiet():
            geometry = _geometry(series, allow_gaps)
            units, factor, unit_notes, unit_meta = _units(series)
            meta = _meta(series, geometry.order)
    except MedfoundError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom converting a corrupt header value
        raise DicomReadError(f"bad header value: {_one_line(err)}", path=root,
                             hint="a header of the series is corrupt; fix or export it "
                             "again") from err
    order = geometry.order
    notes += geometry.warnings + unit_notes

    header = series.header
    modality_lut = (header is not None and "ModalityLUTSequence" in header
                    and "RescaleSlope" not in header)
    first = order[0].source
    photometrics = {f.source.photometric for f in order}
    if any(f.source.samples > 1 or f.source.photometric == "PALETTE COLOR" for f in order):
        notes.append(("color_converted", f"color image ({', '.join(sorted(photometrics))}) "
                      "converted to one grayscale channel: luminance 0.299 R + 0.587 G + "
                      "0.114 B"))
    if "MONOCHROME1" in photometrics:
        notes.append(("monochrome1",
                      "MONOCHROME1: low values display bright; values are kept as stored"))

    shape = (len(order), first.rows, first.cols)  # (k, j, i): C order of the (i, j, k) array
    try:
        buf = np.empty(shape, dtype=np.float32)
    except (MemoryError, ValueError) as err:
        gib = float(np.prod(shape, dtype=np.float64)) * 4 / 2**30
        raise DicomReadError(f"not enough memory for the {gib:.1f} GiB volume", path=root,
                             hint="free memory, read on a larger machine or lower "
                             "max_voxels", kind="too_large") from err

    jobs = _plan(order, factor, workers)
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if workers == 1 or len(jobs) < 2:
            for src, items in _progress(jobs, len(jobs), "decoding", progress):
                _decode_job(src, items, buf, header, modality_lut)
        else:
            _run_pool(jobs, buf, header, modality_lut, workers, progress)
    for message in dict.fromkeys(_one_line(w.message) for w in caught):
        notes.append(("decoder_warning", f"pydicom: {message}"))

    return Volume(
        array=buf.transpose(2, 1, 0), affine=geometry.affine, modality=series.modality,
        units=units, series_uid=series.series_uid, path=str(root),
        meta={**meta, **unit_meta,
              "warning_kinds": [kind for kind, _ in notes]},
        warnings=[text for _, text in notes])


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
