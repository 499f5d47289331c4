"""Nodule-detection data: datalists → MONAI transforms → cached datasets → detector batches.

Frames and units the caller must know:

- Datalists (phantoms, `prepare_luna16`) give boxes as world LPS mm "cccwhd" rows
  ``[x, y, z, d, d, d]`` (centre and size, mm), one label per box.
- Transforms read a study with `medfound.io.reader.read_volume` (the one way to read a study),
  turn it to canonical axes (i → +x Left, j → +y Posterior, k → +z Superior: a lossless
  permutation/flip), resample to `spacing_mm` (MONAI Spacingd; the MetaTensor's affine stays the
  exact (i, j, k) → LPS mm map of the resampled grid), clip HU to `hu_window` and scale to [0, 1].
- Boxes reaching the detector are MONAI StandardMode "xyzxyz" = (i0, j0, k0, i1, j1, k1) in
  voxels of the resampled array, in MONAI's box convention: voxel n covers [n, n + 1), so a
  voxel centre sits at n + 0.5 (that is what MONAI's box flips, rotations, crops and clipping
  assume: a flip maps x → size − x). `boxes_to_world` undoes exactly this.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.apps.detection.transforms.dictionary import (
    ClipBoxToImaged,
    RandCropBoxByPosNegLabeld,
    RandFlipBoxd,
    RandRotateBox90d,
)
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.transforms import (
    Compose,
    MapTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medfound.errors import MedfoundError
from medfound.infer.boxes import prediction_rows
from medfound.io.reader import read_volume
from medfound.io.volume import canonical_axes, voxel_boxes_to_world

__all__ = [
    "DEFAULTS",
    "SPLITS",
    "CanonicalAxesd",
    "LoadVolumed",
    "WorldBoxToVoxeld",
    "boxes_to_world",
    "detection_collate",
    "eval_transforms",
    "label_subset",
    "load_datalist",
    "make_dataset",
    "predictions_to_rows",
    "train_transforms",
    "world_boxes_to_voxel",
]

SPLITS = ("training", "validation", "test", "all")
DATALIST = "datalist.json"

# Every knob of the data stage; configs/data/*.yaml override them. Geometry defaults are the
# "tiny" detector preset (the detector's `spacing_mm`, `hu_window`, `patch_size` must match).
DEFAULTS: dict[str, Any] = {
    "spacing_mm": [1.40625, 1.40625, 2.5],  # (i, j, k) after resampling
    "hu_window": [-1024.0, 300.0],  # HU clipped to [lo, hi], then scaled to [0, 1]
    "patch_size": [64, 64, 32],  # training patch, voxels (i, j, k)
    "num_patches_per_image": 4,  # crops per study per pass
    "pos_fraction": 0.5,  # share of crops centred to hold a whole nodule (rest: background)
    "whole_box": True,  # positive crops try to hold a whole box
    "interp_mode": "bilinear",  # Spacingd interpolation of the image
    "flip_prob": 0.5,  # per axis in `flip_axes`
    "flip_axes": [0, 1, 2],
    "rot90_prob": 0.5,  # in-plane (i, j) quarter turns; needs patch_size i == j
    "intensity_prob": 0.15,
    "intensity_scale": 0.1,  # image *= 1 + U(-s, s)
    "intensity_shift": 0.1,  # image += U(-s, s)
}


# --- datalists --------------------------------------------------------------------------------


def load_datalist(root: str | Path, centers: str | Sequence[str] | None = None,
                  split: str = "training") -> list[dict[str, Any]]:
    """Detection items of `split` from ROOT/<center>/datalist.json for each of `centers`.

    centers: names of center folders (None: every folder of ROOT holding a datalist.json).
    split: "training", "validation", "test" or "all" (every split of the file).
    Each item: `image` (absolute path), `box` (N×6 float, world LPS mm cccwhd),
    `label` (N ints), `seriesuid`, `center`, plus the entry's other keys.
    Raises `MedfoundError` naming the file or key for anything a user can get wrong.
    """
    root = Path(root)
    if split not in SPLITS:
        raise MedfoundError(f"unknown split {split!r}", hint=f"use one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise MedfoundError("no such data folder", path=root,
                            hint="point data.root at the folder holding the center folders")
    present = sorted(p.name for p in root.iterdir() if (p / DATALIST).is_file())
    if centers is None:
        centers = present
        if not centers:
            raise MedfoundError(f"no center folder with a {DATALIST}", path=root,
                                hint="make phantoms (medfound phantoms) or run prepare_luna16")
    elif isinstance(centers, str):
        centers = [centers]
    items: list[dict[str, Any]] = []
    for center in centers:
        cdir = root / str(center)
        if not cdir.is_dir():
            raise MedfoundError(f"unknown center {center!r}", path=root,
                                hint=f"centers present: {', '.join(present) or 'none'}")
        path = cdir / DATALIST
        if not path.is_file():
            raise MedfoundError(f"no {DATALIST} in center {center!r}", path=cdir,
                                hint="write one (phantoms and prepare_luna16 do) or drop the center")
        items += _center_items(path, str(center), split)
    if not items:
        raise MedfoundError(f"no {split!r} items in the datalists of {', '.join(map(str, centers))}",
                            path=root, hint="choose another split or add cases to the datalists")
    return items


def label_subset(items: Sequence[Mapping[str, Any]], fraction: float, seed: int = 0
                 ) -> list[dict[str, Any]]:
    """A `fraction` of each center's items (at least one per center), drawn with `seed`, in
    their original order: label-efficiency experiments train on a share of the labeled cases."""
    if not 0.0 < float(fraction) <= 1.0:
        raise MedfoundError(f"config key 'data.label_fraction' = {fraction!r}: must be in (0, 1]")
    if float(fraction) == 1.0:
        return [dict(it) for it in items]
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    for center in dict.fromkeys(it.get("center") for it in items):
        idx = [n for n, it in enumerate(items) if it.get("center") == center]
        n_keep = max(1, int(round(fraction * len(idx))))
        keep.update(int(i) for i in rng.choice(idx, size=n_keep, replace=False))
    return [dict(it) for n, it in enumerate(items) if n in keep]


def _center_items(path: Path, center: str, split: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MedfoundError(f"not a readable JSON datalist ({err})", path=path,
                            hint="regenerate the datalist") from err
    if not isinstance(data, dict):
        raise MedfoundError("datalist must be a JSON object of splits", path=path,
                            hint='expected {"training": [...], "validation": [...]}')
    keys = [k for k in SPLITS[:-1] if k in data] if split == "all" else [split]
    items = []
    for key in keys:
        entries = data.get(key, [])
        if not isinstance(entries, list):
            raise MedfoundError(f"key {key!r} must be a list of entries", path=path,
                                hint="regenerate the datalist")
        for n, entry in enumerate(entries):
            items.append(_item(entry, f"{key}[{n}]", path, center))
    return items


def _item(entry: Any, where: str, path: Path, center: str) -> dict[str, Any]:
    if not isinstance(entry, dict) or "image" not in entry:
        raise MedfoundError(f"entry {where} has no 'image'", path=path,
                            hint="every entry needs an image path and its boxes")
    image = Path(entry["image"])
    if not image.is_absolute():
        image = path.parent / image
    if not image.exists():
        raise MedfoundError(f"entry {where}: image {image} does not exist", path=path,
                            hint="fix the path (relative paths are to the datalist's folder)")
    if "box" not in entry:
        raise MedfoundError(f"entry {where} has no 'box'", path=path,
                            hint="give 'box': [] for a study without nodules")
    try:
        box = np.asarray(entry["box"], dtype=np.float64).reshape(-1, 6)
        ok = bool(np.isfinite(box).all() and (box[:, 3:] > 0).all())
    except (TypeError, ValueError):
        ok = False
    if not ok or (len(box) == 0 and len(entry["box"]) > 0):
        raise MedfoundError(f"entry {where}: 'box' must be rows [x, y, z, w, h, d] "
                            f"(LPS mm, sizes > 0), got {entry['box']!r}"[:300], path=path,
                            hint="fix the box rows")
    label = entry.get("label", [0] * len(box))
    if (not isinstance(label, list) or len(label) != len(box)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in label)):
        raise MedfoundError(f"entry {where}: 'label' must be {len(box)} non-negative ints "
                            f"(one per box), got {label!r}"[:300], path=path,
                            hint="fix the labels")
    seriesuid = str(entry.get("seriesuid") or image.name)
    return {**entry, "image": str(image), "box": box.tolist(), "label": list(label),
            "seriesuid": seriesuid, "center": center}


# --- transforms -------------------------------------------------------------------------------


class LoadVolumed(MapTransform):
    """Read `keys` with medfound's reader into MetaTensors (1, i, j, k), float32, HU for CT.

    The MetaTensor's `affine` is the reader's (i, j, k) → LPS mm affine (float64) and its
    `space` is "LPS". `reader` is the function called on each path (default `read_volume`).
    """

    def __init__(self, keys: Sequence[str] | str = "image",
                 reader: Callable[[str], Any] = read_volume, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.reader = reader

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            vol = self.reader(d[key])
            array = np.ascontiguousarray(vol.array, dtype=np.float32)[None]
            # Tensors and plain values only: the disk cache loads with torch weights_only.
            affine = torch.as_tensor(vol.affine, dtype=torch.float64)
            meta = {"affine": affine, "original_affine": affine.clone(), "space": "LPS",
                    "spatial_shape": torch.as_tensor(vol.shape), "filename_or_obj": str(d[key]),
                    "modality": vol.modality, "series_uid": vol.series_uid}
            d[key] = MetaTensor(torch.from_numpy(array), meta=meta)
        return d


class CanonicalAxesd(MapTransform):
    """Permute and flip axes so that i → +x (L), j → +y (P), k → +z (S) in LPS.

    Lossless (no interpolation); the affine is updated so every voxel keeps its world position.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            affine = np.asarray(img.affine, dtype=np.float64)
            array, new = canonical_axes(img.numpy(), affine)
            if new is affine:
                continue
            meta = dict(img.meta)
            meta["affine"] = torch.as_tensor(new, dtype=torch.float64)
            d[key] = MetaTensor(torch.from_numpy(array), meta=meta)
        return d


class WorldBoxToVoxeld(MapTransform):
    """World LPS mm cccwhd boxes (N×6) → voxel "xyzxyz" boxes of the image in `image_key`.

    Also makes `label_key` an int64 tensor. A box whose centre lies outside the image raises a
    `MedfoundError` naming the series: its annotation belongs to another study or frame.
    """

    def __init__(self, box_key: str = "box", label_key: str = "label", image_key: str = "image",
                 seriesuid_key: str = "seriesuid"):
        super().__init__([box_key])
        self.box_key, self.label_key = box_key, label_key
        self.image_key, self.seriesuid_key = image_key, seriesuid_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.image_key]
        shape = np.asarray(img.shape[1:])
        boxes = np.asarray(d[self.box_key], dtype=np.float64).reshape(-1, 6)
        vox = world_boxes_to_voxel(boxes, np.asarray(img.affine, dtype=np.float64))
        centre = 0.5 * (vox[:, :3] + vox[:, 3:])
        outside = ~((centre >= 0) & (centre <= shape)).all(axis=1)
        if outside.any():
            uid = d.get(self.seriesuid_key, "?")
            raise MedfoundError(
                f"series {uid}: {int(outside.sum())} box(es) centred outside the image, e.g. "
                f"world {boxes[outside][0, :3].round(2).tolist()} mm", path=img.meta.get("filename_or_obj"),
                hint="check that the annotations belong to this series and are LPS mm")
        d[self.box_key] = torch.as_tensor(vox, dtype=torch.float32)
        d[self.label_key] = torch.as_tensor(np.asarray(d[self.label_key], dtype=np.int64)
                                            .reshape(-1))
        return d


class _ForgetUndod(MapTransform):
    """Drop MONAI's undo records: boxes map back through the affine, never by inverting the
    transforms, and the records hold MONAI enums the disk cache's weights_only load refuses."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].applied_operations = []
        return d


class _PosNegBoxCropd(RandCropBoxByPosNegLabeld):
    """MONAI's box-balanced crop, plus studies without boxes (background crops only)."""

    def randomize(self, boxes, image_size, fg_indices=None, bg_indices=None, thresh_image=None):
        if len(boxes) > 0:
            return super().randomize(boxes, image_size, fg_indices, bg_indices, thresh_image)
        # Uniform centres among those whose patch fits inside the image.
        lo = [s // 2 for s in self.spatial_size]
        hi = [max(n - (s - s // 2), s // 2) for n, s in zip(image_size, self.spatial_size,
                                                             strict=True)]
        self.centers = tuple(tuple(int(self.R.randint(a, b + 1)) for a, b in zip(lo, hi,
                                                                                    strict=True))
                             for _ in range(self.num_samples))


def _params(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    p = {**DEFAULTS, **dict(cfg or {})}
    for key, n in (("spacing_mm", 3), ("hu_window", 2), ("patch_size", 3)):
        v = p[key]
        if not isinstance(v, Sequence) or len(v) != n:
            raise MedfoundError(f"data config key {key!r} must be a list of {n} numbers, got {v!r}",
                                hint=f"e.g. {key}={DEFAULTS[key]}")
    if min(p["spacing_mm"]) <= 0:
        raise MedfoundError(f"data config key 'spacing_mm' must be positive, got {p['spacing_mm']}")
    if p["hu_window"][0] >= p["hu_window"][1]:
        raise MedfoundError(f"data config key 'hu_window' needs low < high, got {p['hu_window']}")
    if not 0.0 <= float(p["pos_fraction"]) <= 1.0:
        raise MedfoundError(f"data config key 'pos_fraction' must be in [0, 1], "
                            f"got {p['pos_fraction']}")
    if p["rot90_prob"] > 0 and p["patch_size"][0] != p["patch_size"][1]:
        raise MedfoundError(f"in-plane rot90 needs patch_size i == j, got {p['patch_size']}",
                            hint="set rot90_prob=0 or a square in-plane patch")
    return p


def _deterministic(p: Mapping[str, Any], pad_to: Sequence[int] | None = None) -> list:
    lo, hi = (float(v) for v in p["hu_window"])
    resample = Spacingd("image", pixdim=[float(s) for s in p["spacing_mm"]],
                        mode=p["interp_mode"], padding_mode="border", dtype=torch.float32)
    return [
        LoadVolumed("image"),
        CanonicalAxesd("image"),
        resample,
        ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        WorldBoxToVoxeld(),
        # Pad at the end only, so box voxel coordinates are unchanged; 0 is air after scaling.
        *([SpatialPadd("image", spatial_size=list(pad_to), method="end", value=0.0)]
          if pad_to is not None else []),
        _ForgetUndod("image"),
    ]


def _user_error(err: BaseException) -> MedfoundError | None:
    """The MedfoundError that MONAI wrapped (it re-raises every transform error as RuntimeError)."""
    while err is not None and not isinstance(err, MedfoundError):
        err = err.__cause__
    return err


class _Pipeline(Compose):
    """A Compose whose user-caused errors come out as the MedfoundError, not MONAI's wrapper."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as err:
            if (user := _user_error(err)) is not None:
                raise user from None
            raise


def eval_transforms(cfg: Mapping[str, Any] | None = None) -> Compose:
    """Whole studies for validation / inference: load, canonical axes, resample, HU window,
    boxes to voxels. Output dict: image MetaTensor (1, i, j, k) in [0, 1] with its LPS affine,
    box (N, 6) float32 xyzxyz voxels, label (N,) int64, and the item's other keys."""
    return _Pipeline(_deterministic(_params(cfg)))


def train_transforms(cfg: Mapping[str, Any] | None = None) -> Compose:
    """Training patches: the eval pipeline (cacheable), then `num_patches_per_image` crops of
    `patch_size` (a `pos_fraction` share centred to hold a nodule, the rest anywhere; studies
    without nodules give background crops), box-aware flips and in-plane quarter turns, and
    intensity jitter. Returns a list of dicts per study (flatten with `detection_collate`)."""
    p = _params(cfg)
    patch = [int(s) for s in p["patch_size"]]
    pos = float(p["pos_fraction"])
    box, label, image = "box", "label", "image"
    return _Pipeline([
        *_deterministic(p, pad_to=patch),
        _PosNegBoxCropd(image_keys=image, box_keys=box, label_keys=label, spatial_size=patch,
                        pos=pos, neg=1.0 - pos, num_samples=int(p["num_patches_per_image"]),
                        whole_box=bool(p["whole_box"])),
        ClipBoxToImaged(box_keys=box, label_keys=label, box_ref_image_keys=image,
                        remove_empty=True),
        *[RandFlipBoxd(image_keys=image, box_keys=box, box_ref_image_keys=image,
                       prob=float(p["flip_prob"]), spatial_axis=int(a)) for a in p["flip_axes"]],
        RandRotateBox90d(image_keys=image, box_keys=box, box_ref_image_keys=image,
                         prob=float(p["rot90_prob"]), max_k=3, spatial_axes=(0, 1)),
        RandScaleIntensityd(image, factors=float(p["intensity_scale"]),
                            prob=float(p["intensity_prob"])),
        RandShiftIntensityd(image, offsets=float(p["intensity_shift"]),
                            prob=float(p["intensity_prob"])),
    ])


# --- datasets and batches ---------------------------------------------------------------------


def make_dataset(items: Sequence[Mapping[str, Any]], transform: Compose, cache: str = "memory",
                 cache_dir: str | Path | None = None, cache_workers: int = 1) -> Dataset:
    """A MONAI dataset over `items` that caches the deterministic head of `transform`.

    cache: "memory" (CacheDataset: read once, kept in RAM), "disk" (PersistentDataset under
    `cache_dir`, survives restarts; a changed item or transform gets a new entry) or "none".
    Random transforms run afresh on every access.
    """
    data = [dict(it) for it in items]
    if cache not in ("memory", "disk", "none"):
        raise MedfoundError(f"unknown data cache {cache!r}", hint="use 'memory', 'disk' or 'none'")
    if cache == "disk" and cache_dir is None:
        raise MedfoundError("cache='disk' needs a cache_dir",
                            hint="set data.cache_dir to a writable folder")
    try:
        if cache == "memory":
            return _CacheDataset(data, transform, cache_rate=1.0, num_workers=cache_workers,
                                 progress=False)
        if cache == "disk":
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            # track_meta keeps each image's affine (needed to map boxes back to LPS mm).
            return _PersistentDataset(data, transform, cache_dir=cache_dir, track_meta=True)
        return _Dataset(data, transform)
    except RuntimeError as err:
        if (user := _user_error(err)) is not None:
            raise user from None
        raise


class _UserErrors:
    """Dataset mix-in: an item's user-caused error surfaces as its MedfoundError."""

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except RuntimeError as err:
            if (user := _user_error(err)) is not None:
                raise user from None
            raise


class _Dataset(_UserErrors, Dataset):
    pass


class _CacheDataset(_UserErrors, CacheDataset):
    pass


class _PersistentDataset(_UserErrors, PersistentDataset):
    pass


def detection_collate(batch: Sequence[Any]) -> list[dict[str, Any]]:
    """DataLoader collate: flattens the per-study patch lists into one list of dicts, each with
    "image" (1, i, j, k) float tensor, "box" (N, 6) float32 xyzxyz voxels, "label" (N,) int64
    — the detector's inputs are ``[d["image"] for d in batch]`` and the dicts as targets."""
    out: list[dict[str, Any]] = []
    for item in batch:
        for d in item if isinstance(item, list) else [item]:
            d = dict(d)
            d["box"] = torch.as_tensor(d["box"], dtype=torch.float32).reshape(-1, 6)
            d["label"] = torch.as_tensor(d["label"], dtype=torch.int64).reshape(-1)
            out.append(d)
    return out


# --- geometry ---------------------------------------------------------------------------------


def world_boxes_to_voxel(boxes_cccwhd_mm: Any, affine: Any) -> np.ndarray:
    """(N, 6) world LPS mm cccwhd boxes → (N, 6) voxel xyzxyz (MONAI convention: voxel n
    covers [n, n + 1)) of the image whose (i, j, k) → LPS affine is `affine`. The voxel box is
    the bounding box of the world box's 8 corners (exact for axis-aligned scans)."""
    b = np.asarray(boxes_cccwhd_mm, dtype=np.float64).reshape(-1, 6)
    a = np.asarray(affine, dtype=np.float64)
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    corners = b[:, None, :3] + 0.5 * signs[None] * b[:, None, 3:]  # (N, 8, 3)
    ijk = (corners - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T + 0.5
    return np.concatenate([ijk.min(axis=1), ijk.max(axis=1)], axis=1).reshape(-1, 6)


def boxes_to_world(boxes_xyzxyz_voxel: Any, affine: Any) -> tuple[np.ndarray, np.ndarray]:
    """Voxel xyzxyz boxes (MONAI convention, as the detector outputs) of an image with
    (i, j, k) → LPS `affine` → (N, 3) box centres in LPS mm and (N,) diameters in mm (the mean
    of the box's three sizes in mm)."""
    if isinstance(boxes_xyzxyz_voxel, torch.Tensor):
        boxes_xyzxyz_voxel = boxes_xyzxyz_voxel.detach().cpu().numpy()
    centres, sizes_mm = voxel_boxes_to_world(boxes_xyzxyz_voxel, affine)
    return centres, sizes_mm.mean(axis=1)


def predictions_to_rows(seriesuid: str, boxes: Any, scores: Any, affine: Any) -> list[dict]:
    """Detector output for one study → LUNA16 prediction rows
    ``{"seriesuid", "coordX", "coordY", "coordZ", "probability"}`` (box centres, LPS mm), plus
    ``diameter_mm`` (the box's mean size), which the LUNA16 CSV leaves out and mAP needs.
    Findings on one object are merged first (`medfound.infer.boxes.merge_by_centre`), highest
    probability first."""
    centres, diameters = boxes_to_world(boxes, affine)
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else scores
    return prediction_rows(seriesuid, centres, diameters, s)  # merged, as infer reports
