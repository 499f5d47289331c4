"""The header pass over one file: parse it up to its pixel data (no pixel bytes are read) and
note where that data starts, checking the sizes the header declares against the bytes the
file holds (uncompressed length, encapsulated fragments, a deflated data set inflated piece
by piece) and against the voxel budget, before any frame is listed or decoded."""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medfound.io.dicom.attributes import (
    _BITS_ALLOCATED,
    _BITS_STORED,
    _COLUMNS,
    _FRAMES,
    _INSTANCE,
    _PHOTOMETRIC,
    _PIXEL_REPRESENTATION,
    _PLANAR,
    _ROWS,
    _SAMPLES,
    _int,
    _one_line,
    _raw,
)
from medfound.io.dicom.records import _Source
from medfound.io.volume import voxel_budget

_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData",
               0x7FE00009: "DoubleFloatPixelData"}
_PIXEL_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"}
_UNDEFINED = 0xFFFFFFFF

_DICOM_NAMES = (".dcm", ".dicom", ".dic", ".ima")
_HEAD_BYTES = 4096  # read first: the preamble, and the file meta of any ordinary file
_DEFLATED_UID = str(DeflatedExplicitVRLittleEndian).encode("ascii")
_DEFLATE_HEAD = 8 * 2**20  # inflated bytes kept to parse a deflated data set's header
_BITS = (1, 8, 16, 32, 64)


class _NotDicom(Exception):
    """Not an image file. `damaged`: it looks like DICOM (magic, DICOM tags or a DICOM file
    name) but cannot be parsed, so it may be a slice of a series that was cut or corrupted."""

    def __init__(self, message: str, damaged: bool = False):
        super().__init__(message)
        self.damaged = damaged


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


def _native_bytes(src: _Source) -> int:
    bits = src.rows * src.cols * src.samples * src.frames * src.bits_allocated
    if src.photometric == "YBR_FULL_422":  # chroma subsampled 2:1 horizontally
        bits = bits * 2 // 3
    return (bits + 7) // 8


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
