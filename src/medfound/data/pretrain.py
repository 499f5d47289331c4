"""Unlabeled multi-modal volumes for self-supervised pretraining of the foundation encoder.

Items. `load_volume_list(root, centers, split, modalities)` lists one item per (case, modality)
from each center's datalist.json: ``{"image": path, "modality": "ct"|"mr"|"pet"|"us",
"center": name, "case": name}``. A phantom datalist entry names every modality's folder under
its modality key (``"ct": "case_000/ct"``); an entry without those keys is read as CT from
``"image"``. Labels are not used: pretraining needs none.

Per-modality intensity and geometry (``data.modalities.<m>`` in configs/task/pretrain.yaml):

- ct: HU clipped to ``window`` and scaled to [0, 1] (the detector's window, so a fine-tuned
  detector sees the intensities its encoder was pretrained on);
- mr and pet (arbitrary units, scanner- and patient-dependent): each volume scaled by its own
  ``percentiles`` (e.g. 0.5th → 0, 99.5th → 1) and clipped to [0, 1];
- us: stored 8-bit grey levels scaled by ``window`` [0, 255] to [0, 1].

Each modality is resampled to its own ``spacing_mm`` (null: kept as stored). Ultrasound is
2D: a cine loop is a (columns, rows, frames) volume whose third axis is time (frames keep their
order; ``spacing_mm`` null leaves them unresampled), so the 3D encoder sees a frame stack
like a thin slab; a single 2D frame is a one-frame stack. Volumes smaller than the patch are
padded (edge values), so every modality yields patches of one shape and can share a batch.

Training pairs. Each volume gives two random crops of ``patch_size`` (two "views" of the same
volume: the positive pair of the contrastive loss), each flipped and intensity-jittered on its
own. `pretrain_collate` stacks a batch into ``{"view1": (B, 1, i, j, k), "view2": ...,
"modality": [B names], "center": [...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    MapTransform,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    Spacingd,
    SpatialPadd,
)

from medfound.data.detection import DATALIST, CanonicalAxesd, LoadVolumed, _Pipeline
from medfound.errors import MedfoundError

__all__ = [
    "MODALITIES",
    "NormalizeModalityd",
    "ResampleModalityd",
    "load_volume_list",
    "modality_counts",
    "pretrain_collate",
    "pretrain_eval_transforms",
    "pretrain_train_transforms",
]

MODALITIES = ("ct", "mr", "pet", "us")
_SPLITS = ("training", "validation", "all")


def load_volume_list(root: str | Path, centers: Sequence[str], split: str = "training",
                     modalities: Sequence[str] = MODALITIES) -> list[dict[str, Any]]:
    """One item per (case, modality) of `centers` under `root`; only `modalities` are listed.

    A center holding none of `modalities` contributes nothing; it is not an error (a
    pretraining center needs only some modality). A missing datalist or an unknown split is.
    """
    if split not in _SPLITS:
        raise MedfoundError(f"unknown split {split!r}", hint=f"use one of {', '.join(_SPLITS)}")
    if isinstance(centers, str):
        centers = [centers]
    items: list[dict[str, Any]] = []
    for center in centers:
        path = Path(root) / center / DATALIST
        if not path.is_file():
            raise MedfoundError("no datalist.json in this center folder", path=path.parent,
                                hint="check data.root and the center names (medfound center check)")
        try:
            datalist = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise MedfoundError(f"not valid JSON ({err.msg}, line {err.lineno})", path=path) from None
        splits = ("training", "validation") if split == "all" else (split,)
        for name in splits:
            for n, entry in enumerate(datalist.get(name, [])):
                if not isinstance(entry, Mapping):
                    raise MedfoundError(f"{name}[{n}] is not an object", path=path)
                named = {m: entry[m] for m in MODALITIES if m in entry}
                if not named and "image" in entry:
                    named = {"ct": entry["image"]}
                for m, rel in named.items():
                    if m in modalities:
                        items.append({"image": str(path.parent / rel), "modality": m,
                                      "center": center, "case": str(entry.get("case", n))})
    return items


def modality_counts(items: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Volumes per modality in `items` (every modality of MODALITIES, zeros included)."""
    counts = dict.fromkeys(MODALITIES, 0)
    for item in items:
        counts[item["modality"]] += 1
    return counts


# --- transforms ----------------------------------------------------------------------------


def _modality_params(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    mods = cfg.get("modalities") or {}
    out = {}
    for m in MODALITIES:
        p = dict(mods.get(m) or {})
        spacing = p.get("spacing_mm")
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise MedfoundError(f"config key 'data.modalities.{m}.spacing_mm' = {list(spacing)}: "
                                "must be 3 positive numbers (i, j, k) or null")
        if "window" in p and float(p["window"][0]) >= float(p["window"][1]):
            raise MedfoundError(f"config key 'data.modalities.{m}.window' needs low < high")
        if "percentiles" in p and not 0 <= p["percentiles"][0] < p["percentiles"][1] <= 100:
            raise MedfoundError(f"config key 'data.modalities.{m}.percentiles' needs "
                                "0 <= low < high <= 100")
        if "window" not in p and "percentiles" not in p:
            raise MedfoundError(f"config key 'data.modalities.{m}' needs 'window' [lo, hi] or "
                                "'percentiles' [lo, hi]")
        out[m] = p
    return out


class ResampleModalityd(MapTransform):
    """Resample each item's image to its modality's ``spacing_mm`` (MONAI Spacingd; none: as is)."""

    def __init__(self, params: Mapping[str, Mapping[str, Any]], keys: str = "image"):
        super().__init__(keys)
        self.spacing = {m: (Spacingd(keys, pixdim=[float(s) for s in p["spacing_mm"]],
                                     mode="bilinear", padding_mode="border", dtype=torch.float32)
                            if p.get("spacing_mm") is not None else None)
                        for m, p in params.items()}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        resample = self.spacing[d["modality"]]
        return resample(d) if resample is not None else d


class NormalizeModalityd(MapTransform):
    """Scale intensities to [0, 1] the modality's way: a fixed ``window`` or per-volume
    ``percentiles`` (see the module docstring)."""

    def __init__(self, params: Mapping[str, Mapping[str, Any]], keys: str = "image"):
        super().__init__(keys)
        self.params = params

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        p = self.params[d["modality"]]
        for key in self.key_iterator(d):
            img = d[key]
            x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            if "window" in p:
                lo, hi = (float(v) for v in p["window"])
            else:
                q = torch.quantile(x.flatten()[:: max(1, x.numel() // 1_000_000)].float(),
                                   torch.tensor([p["percentiles"][0] / 100, p["percentiles"][1] / 100]))
                lo, hi = float(q[0]), float(q[1])
                hi = hi if hi > lo else lo + 1.0
            y = ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)
            d[key] = MetaTensor(y, meta=dict(img.meta)) if isinstance(img, MetaTensor) else y
        return d


class _Plaind(MapTransform):
    """Plain tensor images (no MetaTensor metadata): the views are pure pixels, and the MONAI
    transforms after this record no inverse information."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key] = d[key].as_tensor()
        return d


def _head(cfg: Mapping[str, Any]) -> list:
    params = _modality_params(cfg)
    patch = [int(s) for s in cfg["patch_size"]]
    return [
        LoadVolumed("image"),
        CanonicalAxesd("image"),
        ResampleModalityd(params),
        NormalizeModalityd(params),
        SpatialPadd("image", spatial_size=patch, mode="edge"),
        _Plaind("image"),
    ]


def pretrain_train_transforms(cfg: Mapping[str, Any]) -> _Pipeline:
    """Read → canonical axes → resample → normalise → pad (cacheable), then two random crops
    of ``patch_size`` with flips and intensity jitter; returns a list of two dicts (the views)."""
    patch = [int(s) for s in cfg["patch_size"]]
    flip, jitter = float(cfg.get("flip_prob", 0.5)), float(cfg.get("intensity_prob", 0.5))
    return _Pipeline([
        *_head(cfg),
        RandSpatialCropSamplesd("image", roi_size=patch, num_samples=2, random_size=False),
        *[RandFlipd("image", prob=flip, spatial_axis=a) for a in (0, 1, 2)],
        RandScaleIntensityd("image", factors=0.1, prob=jitter),
        RandShiftIntensityd("image", offsets=0.1, prob=jitter),
    ])


def pretrain_eval_transforms(cfg: Mapping[str, Any]) -> _Pipeline:
    """Deterministic: the centre crop of ``patch_size`` of each volume (validation losses)."""
    patch = [int(s) for s in cfg["patch_size"]]
    return _Pipeline([*_head(cfg), CenterSpatialCropd("image", roi_size=patch)])


def pretrain_collate(batch: Sequence[Any]) -> dict[str, Any]:
    """Batch of volumes → {"view1", "view2": (B, 1, i, j, k), "modality", "center": [B]}.

    Training items arrive as [view_a, view_b] pairs; evaluation items as single dicts (then
    view2 is view1).
    """
    pairs = [b if isinstance(b, (list, tuple)) else [b, b] for b in batch]
    view1 = torch.stack([torch.as_tensor(p[0]["image"], dtype=torch.float32) for p in pairs])
    view2 = torch.stack([torch.as_tensor(p[1]["image"], dtype=torch.float32) for p in pairs])
    return {"view1": view1, "view2": view2, "modality": [p[0]["modality"] for p in pairs],
            "center": [p[0]["center"] for p in pairs]}

