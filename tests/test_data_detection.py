"""Nodule-detection data stage: what training and evaluation rely on.

Runs on a small phantom set (real DICOM) and a tiny LUNA16-style MetaImage set written here,
through the real reader and real MONAI transforms. World coordinates are LPS mm; voxel boxes
are MONAI "xyzxyz" (voxel n covers [n, n + 1)).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medfound.data.detection import (
    boxes_to_world,
    detection_collate,
    eval_transforms,
    load_datalist,
    make_dataset,
    predictions_to_rows,
    train_transforms,
    world_boxes_to_voxel,
)
from medfound.data.luna16 import prepare_luna16
from medfound.data.phantoms import make_phantoms
from medfound.errors import MedfoundError
from medfound.metrics.froc import evaluate_luna16

# Coarse grid and small patches keep the file fast; the geometry is the same at any spacing.
CFG = {"spacing_mm": [2.0, 2.0, 3.0], "hu_window": [-1024.0, 300.0], "patch_size": [48, 48, 24],
       "num_patches_per_image": 3}
AIR_TO_LUNG = 0.2  # scaled intensity above lung parenchyma (~ -850 HU → 0.13)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("det") / "phantoms", centers=2, cases=2, seed=3,
                         size="small", progress=False)


@pytest.fixture(scope="module")
def items(root) -> list[dict]:
    return load_datalist(root, None, "all")


@pytest.fixture(scope="module")
def evaluated(items) -> list[dict]:
    t = eval_transforms(CFG)
    return [t(it) for it in items]


def _write_datalist(cdir: Path, data) -> None:
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / "datalist.json").write_text(json.dumps(data))


def _shell_median(img: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Median of the box grown by its own size on each side (mostly the lung around it)."""
    size = hi - lo
    a, b = np.maximum(lo - size, 0), np.minimum(hi + size, img.shape)
    return float(np.median(img[a[0]:b[0], a[1]:b[1], a[2]:b[2]]))


# --- datalists --------------------------------------------------------------------------------


def test_datalist_items_have_absolute_images_world_boxes_and_centers(root, items):
    assert len(items) == 4
    assert {it["center"] for it in items} == {"center_0", "center_1"}
    for it in items:
        assert Path(it["image"]).is_absolute() and Path(it["image"]).is_dir()
        box = np.asarray(it["box"])
        assert box.ndim == 2 and box.shape[1] == 6 and (box[:, 3:] > 0).all()
        assert len(it["label"]) == len(box) and all(isinstance(v, int) for v in it["label"])
        assert it["seriesuid"].startswith("1.2.")
    train = load_datalist(root, ["center_0", "center_1"], "training")
    val = load_datalist(root, "center_1", "validation")
    assert len(train) == 2 and len(val) == 1 and val[0]["center"] == "center_1"


@pytest.mark.parametrize("case, expect", [
    ("missing_root", "no such data folder"),
    ("unknown_center", "centers present: c0"),
    ("no_datalist", "no datalist.json in center 'c1'"),
    ("empty", "no 'validation' items"),
    ("missing_image", "does not exist"),
    ("short_box", "'box' must be rows"),
    ("negative_size", "'box' must be rows"),
    ("labels_mismatch", "'label' must be 1"),
    ("unknown_split", "unknown split"),
])
def test_datalist_errors_name_the_file_and_the_fix(tmp_path, items, case, expect):
    good = {"image": items[0]["image"], "box": [[1.0, 2.0, 3.0, 5.0, 5.0, 5.0]], "label": [0]}
    entry = {
        "missing_image": {**good, "image": "nowhere/ct"},
        "short_box": {**good, "box": [[1.0, 2.0, 3.0]]},
        "negative_size": {**good, "box": [[1.0, 2.0, 3.0, -5.0, 5.0, 5.0]]},
        "labels_mismatch": {**good, "label": [0, 0]},
    }.get(case, good)
    _write_datalist(tmp_path / "c0", {"training": [entry], "validation": []})
    (tmp_path / "c1").mkdir()
    args = {"missing_root": (tmp_path / "nope", None, "training"),
            "unknown_center": (tmp_path, ["c9"], "training"),
            "no_datalist": (tmp_path, ["c0", "c1"], "training"),
            "empty": (tmp_path, ["c0"], "validation"),
            "unknown_split": (tmp_path, ["c0"], "train")}.get(case, (tmp_path, ["c0"], "training"))
    with pytest.raises(MedfoundError, match=expect) as err:
        load_datalist(*args)
    assert "\n" not in str(err.value)


# --- transforms -------------------------------------------------------------------------------


def test_eval_transform_resamples_windows_and_puts_boxes_on_nodules(items, evaluated):
    for it, d in zip(items, evaluated, strict=True):
        img = d["image"]
        assert img.ndim == 4 and img.shape[0] == 1 and img.dtype == torch.float32
        spacing = np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)
        np.testing.assert_allclose(spacing, CFG["spacing_mm"], rtol=1e-6)
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
        box, label = d["box"], d["label"]
        assert box.dtype == torch.float32 and box.shape == (len(it["box"]), 6)
        assert label.dtype == torch.int64 and label.tolist() == it["label"]
        a = img[0].numpy()
        for b in box.numpy():
            lo, hi = np.floor(b[:3]).astype(int), np.ceil(b[3:]).astype(int)
            inside = a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            assert inside.max() > _shell_median(a, lo, hi) + 0.05, (it["seriesuid"], b)


def test_box_outside_the_volume_names_the_series(items):
    bad = {**items[0], "box": [[5000.0, 0.0, 0.0, 8.0, 8.0, 8.0]], "label": [0]}
    message = f"series {bad['seriesuid']}: 1 box"
    with pytest.raises(MedfoundError, match=message):
        eval_transforms(CFG)(bad)
    with pytest.raises(MedfoundError, match=message):  # also through a dataset
        make_dataset([bad], eval_transforms(CFG), cache="none")[0]


def test_train_transform_gives_patches_with_boxes_on_nodules(items):
    t = train_transforms({**CFG, "pos_fraction": 1.0, "intensity_prob": 0.0})
    t.set_random_state(seed=0)
    patches = t(items[0])
    assert len(patches) == CFG["num_patches_per_image"]
    for p in patches:
        assert tuple(p["image"].shape) == (1, *CFG["patch_size"])
        box = p["box"].numpy()
        assert len(box) >= 1 and len(p["label"]) == len(box)  # every crop holds a nodule
        assert (box[:, :3] >= 0).all() and (box[:, 3:] <= np.array(CFG["patch_size"])).all()
        a = p["image"][0].numpy()
        for b in box:
            lo, hi = np.floor(b[:3]).astype(int), np.ceil(b[3:]).astype(int)
            assert a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].max() > AIR_TO_LUNG


def test_study_without_nodules_gives_background_patches(items):
    empty = {**items[0], "box": [], "label": []}
    t = train_transforms(CFG)
    t.set_random_state(seed=1)
    patches = t(empty)
    assert len(patches) == CFG["num_patches_per_image"]
    for p in patches:
        assert tuple(p["image"].shape) == (1, *CFG["patch_size"])
        assert p["box"].shape == (0, 6) and p["label"].shape == (0,)


def test_collated_patches_train_the_detector(items):
    from medfound.models.detection import DetectorConfig, build_detector, build_network

    cfg = {**CFG, "num_patches_per_image": 2}
    t = train_transforms(cfg)
    t.set_random_state(seed=2)
    batch = detection_collate([t(items[0]), t({**items[1], "box": [], "label": []})])
    assert len(batch) == 4 and all(d["box"].dtype == torch.float32 for d in batch)
    dcfg = DetectorConfig.preset("tiny", spacing_mm=CFG["spacing_mm"],
                                 patch_size=CFG["patch_size"], sw_roi_size=CFG["patch_size"])
    detector = build_detector(dcfg, build_network(dcfg, seed=0))
    detector.train()
    images = torch.stack([d["image"].as_tensor() for d in batch])
    losses = detector(images, [{"box": d["box"], "label": d["label"]} for d in batch])
    assert all(torch.isfinite(v) for v in losses.values())


# --- datasets ---------------------------------------------------------------------------------


def _counting(transform):
    """Wrap the transform's reader so the test can count study reads."""
    load = transform.transforms[0]
    inner, calls = load.reader, []

    def reader(path):
        calls.append(path)
        return inner(path)

    load.reader = reader
    return calls


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_dataset_reads_each_study_once(tmp_path, root, cache):
    subset = load_datalist(root, "center_1", "all")
    t = eval_transforms(CFG)
    calls = _counting(t)
    ds = make_dataset(subset, t, cache=cache, cache_dir=tmp_path / "cache")
    first = [ds[n] for n in range(len(ds))]
    second = [ds[n] for n in range(len(ds))]
    assert len(calls) == len(subset)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
        assert torch.equal(a["box"], b["box"]) and a["seriesuid"] == b["seriesuid"]
    if cache == "disk":  # a new run over the same cache reads nothing
        t2 = eval_transforms(CFG)
        calls2 = _counting(t2)
        again = make_dataset(subset, t2, cache="disk", cache_dir=tmp_path / "cache")[0]
        assert calls2 == [] and torch.equal(again["image"].as_tensor(),
                                            first[0]["image"].as_tensor())


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_training_dataset_gives_fresh_patches_without_rereading(tmp_path, root, cache):
    subset = load_datalist(root, "center_1", "training")
    t = train_transforms(CFG)
    calls = _counting(t)
    t.set_random_state(seed=0)
    ds = make_dataset(subset, t, cache=cache, cache_dir=tmp_path / "cache")
    a, b = ds[0], ds[0]
    assert len(calls) == 1 and len(a) == len(b) == CFG["num_patches_per_image"]
    assert all(tuple(p["image"].shape) == (1, *CFG["patch_size"]) for p in a + b)
    assert not all(torch.equal(p["image"], q["image"]) for p, q in zip(a, b, strict=True))


def test_unknown_cache_and_disk_without_folder_are_errors(items):
    with pytest.raises(MedfoundError, match="unknown data cache"):
        make_dataset(items, eval_transforms(CFG), cache="ram")
    with pytest.raises(MedfoundError, match="cache_dir"):
        make_dataset(items, eval_transforms(CFG), cache="disk")


# --- geometry ---------------------------------------------------------------------------------


def test_world_voxel_world_round_trip_within_half_a_voxel(items, evaluated):
    for it, d in zip(items, evaluated, strict=True):
        world = np.asarray(it["box"])
        centres, diameters = boxes_to_world(d["box"], d["image"].affine)
        assert (np.abs(centres - world[:, :3]) <= 0.5 * np.array(CFG["spacing_mm"])).all()
        np.testing.assert_allclose(diameters, world[:, 3], atol=0.5 * min(CFG["spacing_mm"]))


def test_round_trip_on_an_oblique_permuted_grid():
    rot = np.array([[0.0, 0.0, -1.0], [np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0]])
    affine = np.eye(4)
    affine[:3, :3] = rot * [0.7, 0.8, 1.25]
    affine[:3, 3] = [120.0, -40.0, 300.0]
    world = np.array([[10.0, 20.0, 30.0, 6.0, 6.0, 6.0], [-50.0, 5.0, 250.0, 12.0, 12.0, 12.0]])
    centres, _ = boxes_to_world(world_boxes_to_voxel(world, affine), affine)
    np.testing.assert_allclose(centres, world[:, :3], atol=1e-9)


def test_predictions_become_luna16_rows_that_hit_the_nodules(items, evaluated):
    rows, annotations = [], []
    for it, d in zip(items, evaluated, strict=True):
        scores = torch.linspace(0.9, 0.5, len(d["box"]))
        rows += predictions_to_rows(it["seriesuid"], d["box"], scores, d["image"].affine)
        annotations += [{"seriesuid": it["seriesuid"], "coordX": b[0], "coordY": b[1],
                         "coordZ": b[2], "diameter_mm": b[3]} for b in it["box"]]
    assert set(rows[0]) == {"seriesuid", "coordX", "coordY", "coordZ", "probability",
                            "diameter_mm"}
    # The box size survives the trip through the resampled grid (within a voxel).
    np.testing.assert_allclose([r["diameter_mm"] for r in rows],
                               [a["diameter_mm"] for a in annotations], atol=3.0)
    summary = evaluate_luna16(rows, annotations, [it["seriesuid"] for it in items],
                              n_bootstraps=10)
    assert summary["cpm"] == 1.0


# --- LUNA16 -----------------------------------------------------------------------------------


def test_prepare_luna16_writes_a_datalist_whose_boxes_land_on_the_spheres(tmp_path, luna):
    path = prepare_luna16(luna, tmp_path / "prepared", val_subsets=(8,), test_subsets=(9,))
    assert path == tmp_path / "prepared" / "luna16" / "datalist.json"
    assert (path.parent / "annotations.csv").read_text() == (luna / "annotations.csv").read_text()
    assert (path.parent / "candidates.csv").is_file()
    train = load_datalist(tmp_path / "prepared", ["luna16"], "training")
    val = load_datalist(tmp_path / "prepared", ["luna16"], "validation")
    assert [it["seriesuid"][-3:] for it in train] == ["100", "200"] and len(val) == 1
    assert train[1]["box"] == [] and train[0]["image"].endswith(".mhd")
    t = eval_transforms({**CFG, "spacing_mm": [1.5, 1.5, 2.0]})
    for it in train + val:
        d = t(it)
        a = d["image"][0].numpy()
        affine = np.asarray(d["image"].affine)
        assert (np.diag(affine)[:3] > 0).all()  # canonical axes: i → L, j → P, k → S
        for b in d["box"].numpy():
            c = np.floor(0.5 * (b[:3] + b[3:])).astype(int)
            assert a[tuple(c)] == pytest.approx((100 + 1024) / 1324, abs=0.02)
        centres, _ = boxes_to_world(d["box"], affine)
        np.testing.assert_allclose(centres, np.asarray(it["box"]).reshape(-1, 6)[:, :3],
                                   atol=1e-4)


def test_prepare_luna16_errors(tmp_path, luna):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedfoundError, match="no .mhd scans"):
        prepare_luna16(tmp_path / "empty", tmp_path / "out")
    no_csv = tmp_path / "no_csv"
    shutil.copytree(luna / "subset0", no_csv / "subset0")
    with pytest.raises(MedfoundError, match="no annotations.csv"):
        prepare_luna16(no_csv, tmp_path / "out")
