"""Which series of a received study the model reads, and why each other one is skipped.

A study from a PACS holds more than the model was made for: localizers, reformats, thick
recons, other modalities, dose reports. The rules come from the model card's
``input.accepts`` (each key optional), else from the defaults below:

- ``modality``: the card's ``input.modality`` (CT for the nodule detector; a card naming none
  of CT, MR, PT, US constrains none);
- ``orientation``: slice planes accepted, from ImageOrientationPatient (``axial``: the slice
  normal within 30° of the patient's S axis; also ``coronal``, ``sagittal``, ``oblique``);
- ``max_slice_thickness_mm``: SliceThickness at most this (5 mm; thicker recons hide nodules);
- ``min_slices``: at least this many slices (16; fewer is a localizer or a partial series);
- a series whose ImageType says LOCALIZER, or that holds files that cannot be read, is skipped.

Of the series left, the thinnest slices win (then the most slices, then the lowest series
number): one result per study, from the series a radiologist would read it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfound.io.dicom import SeriesInfo

__all__ = ["DEFAULT_ACCEPTS", "SeriesChoice", "accepted_series", "choose_series"]

DEFAULT_ACCEPTS: dict[str, Any] = {"orientation": ["axial"], "max_slice_thickness_mm": 5.0,
                                   "min_slices": 16}
_AXIAL_COS = float(np.cos(np.radians(30.0)))


@dataclass
class SeriesChoice:
    """The series to read (None if no series fits) and, per other series, why not."""

    series: SeriesInfo | None
    skipped: list[dict[str, Any]]
    rules: dict[str, Any]


def accepted_series(card: dict[str, Any]) -> dict[str, Any]:
    """The acceptance rules for `card`: its ``input.accepts`` over the defaults."""
    rules = dict(DEFAULT_ACCEPTS)
    modality = str(card.get("input", {}).get("modality", "")).upper()
    # as medfound.infer reads it: a card that names no known modality constrains none
    rules["modality"] = modality if modality in ("CT", "MR", "PT", "US") else None
    rules.update(card.get("input", {}).get("accepts") or {})
    return rules


def _plane(header: Any) -> str | None:
    try:
        iop = np.asarray([float(v) for v in header.ImageOrientationPatient], dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        normal /= np.linalg.norm(normal)
    except Exception:  # missing or garbled orientation
        return None
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < _AXIAL_COS:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _thickness(header: Any) -> float | None:
    try:
        value = float(header.SliceThickness)
    except Exception:
        return None
    return value if np.isfinite(value) and value > 0 else None


def why_not(series: SeriesInfo, rules: dict[str, Any]) -> str | None:
    """Why `series` is not read under `rules`, or None when it is acceptable."""
    header = series.header
    modality = rules.get("modality")
    if modality and series.modality != modality:
        return f"modality {series.modality}; the model reads {modality}"
    image_type = [str(v).upper() for v in (header.get("ImageType", []) if header else [])]
    if "LOCALIZER" in image_type:
        return "a localizer (ImageType LOCALIZER)"
    if series.unreadable:
        path, why = series.unreadable[0]
        return f"{len(series.unreadable)} file(s) cannot be read ({Path(path).name}: {why})"
    if series.frames < int(rules.get("min_slices", 0)):
        return f"{series.frames} slice(s); the model needs at least {rules['min_slices']}"
    plane = _plane(header) if header is not None else None
    planes = rules.get("orientation")
    if planes and plane not in planes:
        return (f"{plane or 'unknown'} slices (ImageOrientationPatient); the model reads "
                f"{', '.join(planes)}")
    thickness = _thickness(header) if header is not None else None
    limit = rules.get("max_slice_thickness_mm")
    if limit is not None and thickness is not None and thickness > float(limit):
        return f"slice thickness {thickness:g} mm > {float(limit):g} mm"
    return None


def choose_series(series: list[SeriesInfo], card: dict[str, Any]) -> SeriesChoice:
    """The series of a study the model reads (see the module docstring) and the others'
    reasons: each skipped entry has ``series_uid``, ``modality``, ``description``, ``count``
    and ``reason``."""
    rules = accepted_series(card)
    fits, skipped = [], []
    for s in series:
        reason = why_not(s, rules)
        if reason is None:
            fits.append(s)
        else:
            skipped.append({**s.as_dict(), "reason": reason})

    def rank(s: SeriesInfo) -> tuple[float, int, int]:
        thickness = _thickness(s.header) if s.header is not None else None
        return (thickness if thickness is not None else float("inf"), -s.frames,
                s.number if s.number is not None else 1 << 30)

    fits.sort(key=rank)
    for s in fits[1:]:
        skipped.append({**s.as_dict(), "reason": f"another series was chosen ({fits[0].series_uid}: "
                                                 "thinner slices or more of them)"})
    return SeriesChoice(fits[0] if fits else None, skipped, rules)
