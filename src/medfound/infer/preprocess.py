"""Numpy preprocessing for the inference core: resample to the model's spacing, window HU.

The model card says what the network was trained on (`input.spacing_mm`, `input.hu_window`);
these helpers bring a volume there without torch: canonical axes (the card's `orientation`,
"LPS": i → +x, j → +y, k → +z, a lossless permutation/flip as in training), then resampling
that keeps the first voxel centre and the axis directions and changes only the step, with
linear interpolation and edge values beyond the border (MONAI Spacingd with bilinear /
"border" in training), then the HU window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medfound.errors import MedfoundError
from medfound.io.volume import CANONICAL, canonical_axes

__all__ = ["normalize_hu", "preprocess", "resample_to_spacing"]


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
    return np.take(volume, lo, axis=axis) * (1 - frac) + np.take(volume, hi, axis=axis) * frac


def resample_to_spacing(volume: np.ndarray, affine: np.ndarray,
                        spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Resample an (i, j, k) volume with 4×4 `affine` (voxel → mm) to `spacing_mm` per axis.

    Returns (float32 volume, its affine). Trilinear interpolation done as three 1-D passes,
    which is the same result with a fraction of the memory of a 3-D gather.
    """
    affine = np.asarray(affine, dtype=np.float64)
    old = np.linalg.norm(affine[:3, :3], axis=0)
    new = np.asarray(spacing_mm, dtype=np.float64)
    out = np.asarray(volume, dtype=np.float32)
    for axis in range(3):
        size = max(int(round(out.shape[axis] * old[axis] / new[axis])), 1)
        positions = np.arange(size, dtype=np.float64) * (new[axis] / old[axis])
        out = _linear_along(out, axis, positions)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * (new / old)
    return out.astype(np.float32, copy=False), new_affine


def preprocess(volume: np.ndarray, affine: np.ndarray, card: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (i, j, k) + affine → the network's input space per the model card's `input`:
    (canonical volume resampled and windowed, float32; its (i, j, k) → LPS affine)."""
    orientation = card["input"].get("orientation", CANONICAL)
    if orientation != CANONICAL:
        raise MedfoundError(f"model card asks for orientation {orientation!r}; this medfound "
                            f"brings studies to {CANONICAL} only", hint="re-export the model")
    volume, affine = canonical_axes(np.asarray(volume), affine)
    resampled, new_affine = resample_to_spacing(volume, affine, card["input"]["spacing_mm"])
    return normalize_hu(resampled, card["input"]["hu_window"]), new_affine
