"""The decode pool: frames decoded by a thread pool straight into one preallocated float32
array, the modality LUT applied in place. Uncompressed grayscale is read with numpy, anything
else through pydicom's decoders, after a check that a decoder is installed and that each
JPEG / JPEG 2000 frame declares the image size the DICOM header does."""

from __future__ import annotations

import struct
import sys
import threading
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
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
from medfound.io.dicom.attributes import _WARNINGS_LOCK, _one_line
from medfound.io.dicom.header import _TRUNCATED_HINT, _UNDEFINED, _native_bytes
from medfound.io.dicom.records import DicomReadError, _Frame, _Source

# Luminance of an RGB pixel (ITU-R BT.601, the Y of DICOM's YBR_FULL).
LUMA = np.array([0.299, 0.587, 0.114])
_NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}


def _progress(iterable: Iterable, total: int, desc: str, show: bool | None) -> Iterable:
    """A tqdm bar on stderr only when asked, or by default when a human watches a long job."""
    if show is None:
        show = total >= 200 and sys.stderr.isatty()
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False)


def _is_fast(src: _Source) -> bool:
    """Uncompressed grayscale integers we can read straight from the file with numpy."""
    return (src.offset is not None and src.transfer_syntax in _NATIVE
            and src.keyword == "PixelData" and src.samples == 1
            and src.photometric in ("MONOCHROME1", "MONOCHROME2")
            and src.bits_allocated in ((8, 16) if src.transfer_syntax == ExplicitVRBigEndian
                                       else (8, 16, 32)))


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


def _decode_frames(order: list[_Frame], factor: float, buf: np.ndarray, header: Dataset | None,
                   modality_lut: bool, workers: int, progress: bool | None
                   ) -> list[tuple[str, str]]:
    """Decode every frame of `order` into buf[k] (k, rows, columns), values × `factor`, with
    `workers` threads; returns pydicom's warnings as notes ("decoder_warning", text)."""
    jobs = _plan(order, factor, workers)
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if workers == 1 or len(jobs) < 2:
            for src, items in _progress(jobs, len(jobs), "decoding", progress):
                _decode_job(src, items, buf, header, modality_lut)
        else:
            _run_pool(jobs, buf, header, modality_lut, workers, progress)
    notes: list[tuple[str, str]] = []
    for message in dict.fromkeys(_one_line(w.message) for w in caught):
        notes.append(("decoder_warning", f"pydicom: {message}"))
    return notes


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
