"""Preprocessing for the inference core: resample to the model's spacing, window HU.

The model card says what the network was trained on (`input.spacing_mm`, `input.hu_window`);
these helpers bring a volume there without torch: canonical axes (the card's `orientation`,
"LPS": i → +x, j → +y, k → +z, a lossless permutation/flip as in training), then resampling
that keeps the first voxel centre and the axis directions and changes only the step, with
linear interpolation and edge values beyond the border (MONAI Spacingd with bilinear /
"border" in training), then the HU window.

Resampling runs in SimpleITK (multithreaded C++, `backend="simpleitk"`, the default); the
numpy implementation (`backend="numpy"`, three 1-D linear passes) computes the same grid and
is the reference the tests hold SimpleITK to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medfound.errors import MedfoundError
from medfound.io.volume import CANONICAL, canonical_axes, over_budget, voxel_budget

__all__ = ["MIN_SLICES", "RESAMPLE_BACKENDS", "normalize_hu", "preprocess", "resample_to_spacing"]

# The fewest voxels a study may have along any axis, as read and on the model's grid: fewer is
# a single image or a slab too thin for a 3D model to see anything in.
MIN_SLICES = 3
RESAMPLE_BACKENDS = ("simpleitk", "numpy")


def normalize_hu(volume: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """Clip HU to [lo, hi] and scale to [0, 1], float32."""
    lo, hi = (float(v) for v in hu_window)
    out = (np.clip(np.asarray(volume, dtype=np.float32), lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    return out.astype(np.float32, copy=False)


def _linear_along(volume: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Sample `volume` at fractional `positions` along `axis` (clamped to the edge voxels)."""
    n = volume.shape[axis]
    pos = np.clip(positions, 0, n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo).astype(np.float32)
    shape = [1] * volume.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    # In place: the peak is two output-sized arrays beside the input, not four.
    out = np.take(volume, lo, axis=axis)
    out *= 1 - frac
    upper = np.take(volume, hi, axis=axis)
    upper *= frac
    out += upper
    return out


def _resample_sitk(volume: np.ndarray, old: np.ndarray, new: np.ndarray,
                   target: Sequence[int]) -> np.ndarray:
    """`volume` (i, j, k) float32 at voxel sizes `old` → the `target` grid at `new`, by
    SimpleITK's linear interpolator.

    The volume goes to SimpleITK in its memory order (a reader's array is often i-fastest), so
    its copies are straight ones, never a transposing one: its axes, slowest first, are
    SimpleITK's z, y, x, with the spacing and size given in that order, origin 0 and identity
    directions (only the voxel steps matter on the grid itself). One edge voxel is appended
    along each axis, so samples past the last voxel centre take the edge value as the numpy
    passes do (SimpleITK's linear interpolator differs between the last centre and the border);
    beyond it, nearest-neighbour extrapolation does the same. Peak memory: the input, the
    padded copy and SimpleITK's image of it, then the output twice (image and array).
    """
    import SimpleITK as sitk

    order = [int(a) for a in np.argsort([-abs(st) for st in volume.strides], kind="stable")]
    ordered = volume.transpose(order)
    n0, n1, n2 = ordered.shape
    padded = np.empty((n0 + 1, n1 + 1, n2 + 1), dtype=np.float32)  # np.pad is several times slower
    padded[:n0, :n1, :n2] = ordered
    padded[n0, :n1, :n2] = ordered[n0 - 1]
    padded[:, n1, :n2] = padded[:, n1 - 1, :n2]
    padded[:, :, n2] = padded[:, :, n2 - 1]
    image = sitk.GetImageFromArray(padded)
    del padded
    xyz = order[::-1]  # SimpleITK's x, y, z: the volume's fastest axis first
    image.SetSpacing([float(old[a]) for a in xyz])
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputSpacing([float(new[a]) for a in xyz])
    resampler.SetSize([int(target[a]) for a in xyz])
    resampler.SetOutputOrigin(image.GetOrigin())
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetUseNearestNeighborExtrapolator(True)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampled = resampler.Execute(image)
    del image
    return sitk.GetArrayFromImage(resampled).transpose(np.argsort(order))


def _check_geometry(affine: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The voxel sizes of `affine`; a MedfoundError if it or the target spacing cannot be
    resampled (non-finite, zero-sized or degenerate axes)."""
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise MedfoundError("the study's affine is not a finite 4×4 matrix",
                            hint="the study's geometry header is corrupt; export it again")
    old = np.linalg.norm(affine[:3, :3], axis=0)
    if not (old > 0).all() or abs(np.linalg.det(affine[:3, :3])) <= 1e-12 * float(
            np.prod(old)):
        raise MedfoundError(f"the study's voxel axes are degenerate (voxel size "
                            f"{np.round(old, 4).tolist()} mm: zero-sized or parallel axes)",
                            hint="the study's orientation or spacing header is corrupt")
    if spacing.shape != (3,) or not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise MedfoundError(f"target spacing {spacing.tolist()} mm is not three positive "
                            "numbers", hint="check the model card's input.spacing_mm")
    return old


def resampled_shape(shape: Sequence[int], affine: np.ndarray,
                    spacing_mm: Sequence[float]) -> tuple[int, int, int]:
    """The (i, j, k) size `resample_to_spacing` gives a volume of `shape` (no allocation)."""
    affine = np.asarray(affine, dtype=np.float64)
    new = np.asarray(spacing_mm, dtype=np.float64)
    old = _check_geometry(affine, new)
    sizes = np.minimum(np.round(np.asarray(shape[-3:], dtype=np.float64) * old / new), 2.0**62)
    return tuple(max(int(n), 1) for n in sizes)  # type: ignore[return-value]


def resample_to_spacing(volume: np.ndarray, affine: np.ndarray, spacing_mm: Sequence[float],
                        *, max_voxels: int | None = None, backend: str = "simpleitk"
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Resample an (i, j, k) volume with 4×4 `affine` (voxel → mm) to `spacing_mm` per axis.

    Returns (float32 volume, its affine). Output voxel m along an axis samples the input at
    m × new / old voxels (the first voxel centre stays), trilinear, edge values beyond the
    border. `backend`: "simpleitk" (default, multithreaded) or "numpy" (three 1-D passes, the
    same result with a fraction of the memory of a 3-D gather). Every grid the numpy passes
    would make is checked against `max_voxels` (see `medfound.io.volume.voxel_budget`) before
    anything is allocated, whichever backend runs: a MedfoundError names the limit.
    """
    if backend not in RESAMPLE_BACKENDS:
        raise MedfoundError(f"unknown resampling backend {backend!r}",
                            hint=f"use one of {', '.join(RESAMPLE_BACKENDS)}")
    affine = np.asarray(affine, dtype=np.float64)
    new = np.asarray(spacing_mm, dtype=np.float64)
    old = _check_geometry(affine, new)
    budget = voxel_budget(max_voxels)
    out = np.asarray(volume, dtype=np.float32)
    target = resampled_shape(out.shape, affine, new)
    grid = list(out.shape)
    for axis in range(3):  # the passes' intermediate grids, largest first to fail fast
        grid[axis] = target[axis]
        voxels = int(np.prod(grid, dtype=np.float64))
        if voxels > budget:
            raise over_budget(voxels, budget, f"resampling the {tuple(out.shape)} study at "
                              f"{np.round(old, 4).tolist()} mm to {new.tolist()} mm: the grid "
                              f"{tuple(grid)}")
    if backend == "simpleitk":
        out = _resample_sitk(out, old, new, target)
    else:
        for axis in range(3):
            positions = np.arange(target[axis], dtype=np.float64) * (new[axis] / old[axis])
            out = _linear_along(out, axis, positions)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * (new / old)
    return out.astype(np.float32, copy=False), new_affine


def preprocess(volume: np.ndarray, affine: np.ndarray, card: dict[str, Any], *,
               max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (i, j, k) + affine → the network's input space per the model card's `input`:
    (canonical volume resampled and windowed, float32; its (i, j, k) → LPS affine).

    A MedfoundError (one line) for a study a 3D model cannot read: fewer than MIN_SLICES
    voxels along an axis (a single image), as read or on the model's grid (a slab thinner
    than MIN_SLICES of its voxels); degenerate geometry; a resampled grid over `max_voxels`.
    """
    orientation = card["input"].get("orientation", CANONICAL)
    if orientation != CANONICAL:
        raise MedfoundError(f"model card asks for orientation {orientation!r}; this medfound "
                            f"brings studies to {CANONICAL} only", hint="re-export the model")
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.asarray(card["input"]["spacing_mm"], dtype=np.float64)
    _check_geometry(affine, spacing)
    if volume.ndim != 3:
        raise MedfoundError(f"the study is not a 3D volume (shape {volume.shape})",
                            hint="pass one 3D image series")
    volume, affine = canonical_axes(volume, affine)
    old = np.linalg.norm(affine[:3, :3], axis=0)
    if min(volume.shape) < MIN_SLICES:
        what = "a single-slice series" if min(volume.shape) == 1 else "a study this thin"
        raise MedfoundError(f"{what} (shape {tuple(volume.shape)}) cannot be read as a volume; "
                            f"the model needs at least {MIN_SLICES} voxels along each axis",
                            hint="pass a 3D series (a CT stack, not a single image)")
    extent = np.asarray(volume.shape) * old
    thin = [a for a in range(3) if extent[a] < MIN_SLICES * spacing[a]]
    if thin:
        a = thin[0]
        raise MedfoundError(f"the study spans {extent[a]:.3g} mm along {'ijk'[a]}, less than "
                            f"the {MIN_SLICES} voxels of {spacing[a]:g} mm the model needs",
                            hint="pass a study that covers the anatomy in 3D")
    resampled, new_affine = resample_to_spacing(volume, affine, spacing, max_voxels=max_voxels)
    return normalize_hu(resampled, card["input"]["hu_window"]), new_affine
