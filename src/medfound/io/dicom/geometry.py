"""Geometry of the image planes (PS3.3 C.7.6.2): check that a series' frames share size,
spacing and orientation, order them along the slice normal, find duplicates, gaps and gantry
tilt, and build the (i, j, k) → LPS affine; a nominal grid for images without patient
geometry (ultrasound, secondary capture, radiographs)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from medfound.errors import MedfoundError
from medfound.io.dicom.attributes import _float, _item
from medfound.io.dicom.records import DicomReadError, SeriesInfo, _Frame

# Tolerances. Positions and cosines are decimal strings in the header (DS, ≤ 16 characters),
# so equality has to allow for their rounding.
COSINE_TOL = 1e-4  # two orientations are the same if every cosine differs by less
SPACING_REL_TOL = 1e-4  # two PixelSpacings are the same within this fraction
DUPLICATE_MM = 1e-3  # two slices closer than this (3D distance) are the same position
GAP_REL_TOL = 0.01  # a slice gap may differ from the median gap by this fraction + GAP_ABS_MM
GAP_ABS_MM = 1e-3
TILT_REL_TOL = 1e-3  # sideways part of the slice step, as a fraction of the step: gantry tilt


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
