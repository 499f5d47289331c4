"""Header values of a DICOM data set, read leniently: an absent, empty or garbled value reads
as None (or the caller's default), never as an exception.

`_raw` decodes the few data elements the header pass reads from every file (pydicom's own
per-element conversion, with its validation, is most of that pass's time on a long series);
`_get`, `_int`, `_float`, `_floats` and `_item` read any other attribute. `_quiet` silences
pydicom's warnings about odd values, one thread at a time.
"""

from __future__ import annotations

import struct
import threading
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

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
