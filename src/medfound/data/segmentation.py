"""Nodule-segmentation data: datalist items with a "mask" → MONAI transforms → patches.

Items are the detection datalists' (`medfound.data.detection.load_datalist`) plus "mask": a
label volume on the CT's grid (phantoms write one with ``--masks``: case_NNN/nodules.nii.gz,
1 inside a nodule). Image and mask are read with medfound's reader, turned to canonical axes and
resampled together (bilinear image, nearest mask) to `spacing_mm`, so the mask stays aligned
voxel for voxel; the image is clipped to `hu_window` and scaled to [0, 1] as for detection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import (
    AsDiscreted,
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medfound.data.detection import CanonicalAxesd, LoadVolumed, _ForgetUndod, _Pipeline
from medfound.errors import MedfoundError

__all__ = ["SEG_DEFAULTS", "check_masks", "seg_collate", "seg_eval_transforms", "seg_train_transforms"]

SEG_DEFAULTS: dict[str, Any] = {
    "spacing_mm": [1.40625, 1.40625, 2.5],
    "hu_window": [-1024.0, 300.0],
    "patch_size": [64, 64, 32],
    "num_patches_per_image": 4,
    "pos_fraction": 0.5,  # share of crops centred on a nodule voxel
    "flip_prob": 0.5,
    "flip_axes": [0, 1, 2],
    "rot90_prob": 0.5,  # in-plane quarter turns; needs patch_size i == j
    "intensity_prob": 0.15,
    "intensity_scale": 0.1,
    "intensity_shift": 0.1,
}
KEYS = ("image", "mask")


def check_masks(items: Sequence[Mapping[str, Any]], datalist_root: str | Path) -> list[dict[str, Any]]:
    """Items with their "mask" made absolute; a clear error for an item without one."""
    out = []
    for item in items:
        mask = item.get("mask")
        where = f"{item.get('center')}/{item.get('case', item.get('seriesuid'))}"
        if not mask:
            raise MedfoundError(f"datalist entry {where} has no 'mask'", path=datalist_root,
                                hint="segmentation needs label masks: regenerate phantoms with "
                                     "`medfound phantoms --masks`, or add 'mask' paths")
        path = Path(mask)
        if not path.is_absolute():
            path = Path(datalist_root) / str(item.get("center", "")) / path
        if not path.exists():
            raise MedfoundError(f"datalist entry {where}: mask {path} does not exist", path=datalist_root,
                                hint="fix the path (relative paths are to the datalist's folder)")
        out.append({**item, "mask": str(path)})
    return out


def _params(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    p = {**SEG_DEFAULTS, **{k: v for k, v in dict(cfg or {}).items() if k in SEG_DEFAULTS}}
    if p["rot90_prob"] > 0 and p["patch_size"][0] != p["patch_size"][1]:
        raise MedfoundError(f"in-plane rot90 needs patch_size i == j, got {p['patch_size']}",
                            hint="set rot90_prob=0 or a square in-plane patch")
    if not 0.0 <= float(p["pos_fraction"]) <= 1.0:
        raise MedfoundError(f"data config key 'pos_fraction' must be in [0, 1], got {p['pos_fraction']}")
    return p


def _deterministic(p: Mapping[str, Any], pad_to: Sequence[int] | None = None) -> list:
    lo, hi = (float(v) for v in p["hu_window"])
    keys = list(KEYS)
    return [
        LoadVolumed(keys),
        CanonicalAxesd(keys),
        Spacingd(keys, pixdim=[float(s) for s in p["spacing_mm"]], mode=("bilinear", "nearest"),
                 padding_mode="border", dtype=torch.float32),
        ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        AsDiscreted("mask", threshold=0.5),  # any label > 0 is nodule
        *([SpatialPadd(keys, spatial_size=list(pad_to), method="end", value=0.0)]
          if pad_to is not None else []),
        _ForgetUndod(keys),
    ]


def seg_eval_transforms(cfg: Mapping[str, Any] | None = None) -> Compose:
    """Whole studies: image (1, i, j, k) in [0, 1] with its LPS affine, mask (1, i, j, k) 0/1."""
    return _Pipeline(_deterministic(_params(cfg)))


def seg_train_transforms(cfg: Mapping[str, Any] | None = None) -> Compose:
    """Training patches: the eval pipeline (cacheable), `num_patches_per_image` crops of
    `patch_size` (a `pos_fraction` share centred on nodule voxels), flips, in-plane quarter
    turns and intensity jitter. Returns a list of dicts per study."""
    p = _params(cfg)
    patch = [int(s) for s in p["patch_size"]]
    pos = float(p["pos_fraction"])
    keys = list(KEYS)
    return _Pipeline([
        *_deterministic(p, pad_to=patch),
        RandCropByPosNegLabeld(keys, label_key="mask", spatial_size=patch, pos=pos, neg=1.0 - pos,
                               num_samples=int(p["num_patches_per_image"]), allow_smaller=False),
        *[RandFlipd(keys, prob=float(p["flip_prob"]), spatial_axis=int(a)) for a in p["flip_axes"]],
        RandRotate90d(keys, prob=float(p["rot90_prob"]), max_k=3, spatial_axes=(0, 1)),
        RandScaleIntensityd("image", factors=float(p["intensity_scale"]), prob=float(p["intensity_prob"])),
        RandShiftIntensityd("image", offsets=float(p["intensity_shift"]), prob=float(p["intensity_prob"])),
    ])


def seg_collate(batch: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Per-study patch lists → {"image": (N, 1, i, j, k), "mask": (N, 1, i, j, k)} tensors."""
    flat = [d for item in batch for d in (item if isinstance(item, list) else [item])]
    def plain(x: Any) -> torch.Tensor:  # a MetaTensor's data without its metadata
        return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)

    return {k: torch.stack([plain(d[k]) for d in flat]) for k in KEYS}
