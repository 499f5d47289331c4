"""Sliding-window inference over a multi-output, multi-resolution network, in numpy.

Mirrors `monai.inferers.sliding_window_inference` as MONAI's RetinaNetDetector uses it on the
head outputs (non-buffered path): the same window positions, the same importance map (constant,
or Gaussian with sigma = sigma_scale * roi, floored at max(min, 1e-3)), and the same handling
of outputs smaller than the window — each output level is stitched on its own grid, with window
corners scaled by ``out_size / roi_size`` and truncated, and the weight map resized by
nearest-exact interpolation *chained* from the previous output's weights (MONAI reassigns one
variable per output in turn; with constant blending this makes no difference).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["importance_map", "sliding_window", "window_starts"]

_F32 = np.float32


def window_starts(image_size: Sequence[int], roi_size: Sequence[int],
                  overlap: float) -> list[list[int]]:
    """Start index of every window along each axis (MONAI's `_get_scan_interval` +
    `dense_patch_slices`): step ``int(roi * (1 - overlap))`` (at least 1), the last window
    shifted back to end at the image border. Assumes image_size >= roi_size per axis."""
    starts = []
    for size, roi in zip(image_size, roi_size, strict=True):
        step = roi if roi == size else max(int(roi * (1 - overlap)), 1)
        count = next(d for d in range(math.ceil(size / step)) if d * step + roi >= size) + 1
        starts.append([d * step - max(d * step + roi - size, 0) for d in range(count)])
    return starts


def importance_map(roi_size: Sequence[int], mode: str, sigma_scale: float = 0.125) -> np.ndarray:
    """Per-voxel blending weight of one window (float32), as MONAI's `compute_importance_map`."""
    if mode == "constant":
        return np.ones(tuple(roi_size), dtype=_F32)
    if mode != "gaussian":
        raise ValueError(f"sliding-window mode must be 'constant' or 'gaussian', got {mode!r}")
    weights = None
    for n in roi_size:
        sigma = n * sigma_scale
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=_F32)
        g = np.exp(x**2 / _F32(-2 * sigma**2)).astype(_F32)
        weights = g if weights is None else weights[..., None] * g
    floor = max(float(weights.min()), 1e-3)
    return np.maximum(weights, _F32(floor)).astype(_F32)


def _resize_nearest_exact(w: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """torch `F.interpolate(mode="nearest-exact")`: source = min(floor((o + .5) * in/out), in-1)."""
    for axis, out in enumerate(shape):
        n = w.shape[axis]
        if n == out:
            continue
        scale = _F32(n / out)
        src = np.minimum(np.floor((np.arange(out, dtype=_F32) + _F32(0.5)) * scale).astype(np.int64), n - 1)
        w = np.take(w, src, axis=axis)
    return w


def sliding_window(image: np.ndarray, run: Callable[[np.ndarray], Sequence[np.ndarray]],
                   roi_size: Sequence[int], overlap: float, mode: str = "constant",
                   sigma_scale: float = 0.125, batch_size: int = 1,
                   pad_value: float = 0.0) -> list[np.ndarray]:
    """Run `run` on every window of `image` (B, C, i, j, k) and blend its outputs.

    `run` takes a (n, C, *roi_size) float32 batch and returns a list of (n, C_o, *out_o) arrays,
    where each out_o is roi_size scaled by a factor (a pyramid level). Returns one array per
    output, (B, C_o, *image_size scaled by that factor). An image smaller than the window is
    padded symmetrically with `pad_value` first and the padding cropped from the outputs.
    """
    image = np.asarray(image, dtype=_F32)
    batch, _, *size_in = image.shape
    roi = [int(r) for r in roi_size]
    pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, size_in, strict=True)]
    if any(p for pair in pad for p in pair):
        image = np.pad(image, [(0, 0), (0, 0), *pad], mode="constant", constant_values=pad_value)
    size = [max(s, r) for s, r in zip(size_in, roi, strict=True)]
    corners = list(itertools.product(*window_starts(size, roi, overlap)))
    base_weight = importance_map(roi, mode, sigma_scale)

    jobs = [(b, c) for b in range(batch) for c in corners]
    outputs: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    scales: list[list[float] | None] = []
    for first in range(0, len(jobs), max(int(batch_size), 1)):
        chunk = jobs[first:first + max(int(batch_size), 1)]
        windows = np.stack([image[b, :, c[0]:c[0] + roi[0], c[1]:c[1] + roi[1], c[2]:c[2] + roi[2]]
                            for b, c in chunk])
        results = run(windows)
        weight = base_weight
        for n, result in enumerate(results):
            result = np.asarray(result, dtype=_F32)
            out_shape = list(result.shape[2:])
            zoom = None
            if out_shape != roi:
                zoom = [o / float(r) for o, r in zip(out_shape, roi, strict=True)]
                weight = _resize_nearest_exact(weight, out_shape)
            if len(outputs) <= n:  # first window: allocate the level's canvas and weight sum
                grid = [int(s * z) for s, z in zip(size, zoom, strict=True)] if zoom else list(size)
                outputs.append(np.zeros([batch, result.shape[1], *grid], dtype=_F32))
                counts.append(np.zeros(grid, dtype=_F32))
                scales.append(zoom)
                for c in corners:
                    counts[n][_region(c, roi, zoom)] += weight
            for (b, c), patch in zip(chunk, result, strict=True):
                outputs[n][(b, slice(None), *_region(c, roi, zoom))] += patch * weight
    for n, out in enumerate(outputs):
        out /= counts[n]
        if any(p for pair in pad for p in pair):
            # MONAI scales the crop by out_size / roi_size (rounded half to even, as here).
            crop = []
            for axis, (before, _) in enumerate(pad):
                z = out.shape[2 + axis] / roi[axis]
                crop.append(slice(int(round(before * z)), int(round((before + size_in[axis]) * z))))
            outputs[n] = out[(slice(None), slice(None), *crop)]
    return outputs


def _region(corner: Sequence[int], roi: Sequence[int], zoom: Sequence[float] | None) -> tuple[slice, ...]:
    if zoom is None:
        return tuple(slice(c, c + r) for c, r in zip(corner, roi, strict=True))
    return tuple(slice(int(c * z), int((c + r) * z)) for c, r, z in zip(corner, roi, zoom, strict=True))
