"""The benchmark world (`medfound phantoms --preset benchmark`): a network that can tell.

A reduced world (scale 0.1: 21 scans) is generated once for this module and checked through
the real files; the whole world (202 scans, a few minutes) is checked in the `long` tests.
The split refusal is checked through `training_items` and the train_detector recipe.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medfound.data.phantom_anatomy import (
    NODULE_LOCATION_SHARES,
    NODULE_TYPE_SHARES,
    draw_nodule_attributes,
)
from medfound.data.phantoms import (
    ANNOTATION_COLUMNS,
    LOOKALIKE_COLUMNS,
    make_phantoms,
    make_world,
    world_plan,
)
from medfound.errors import MedfoundError
from medfound.io.reader import read_volume
from medfound.train.detection import training_items

SEED = 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tenth of the benchmark world, made by two processes."""
    return make_world(tmp_path_factory.mktemp("world") / "w", seed=SEED, scale=0.1, workers=2,
                      progress=False)


def manifest(root: Path) -> dict:
    return json.loads((root / "phantoms.json").read_text())


def table(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def nodules(root: Path, centers=None) -> list[dict]:
    names = centers or manifest(root)["train_centers"] + manifest(root)["test_centers"]
    return [r for c in names for r in table(root / c / "annotations.csv")]


def lookalikes(root: Path) -> list[dict]:
    return [r for c in sorted(root.glob("center_*")) for r in table(c / "lookalikes.csv")]


def xyz(row: dict) -> np.ndarray:
    return np.array([float(row[k]) for k in ("coordX", "coordY", "coordZ")])


def peak(vol, point) -> float:
    """The highest HU of the 3×3×3 voxels around an LPS point."""
    i, j, k = np.round(vol.world_to_voxel([point])[0]).astype(int)
    return float(vol.array[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, max(k - 1, 0):k + 2].max())


# --- the network and its split ----------------------------------------------------------------


def check_network(root: Path) -> dict:
    m = manifest(root)
    assert m["complete"] and m["preset"] == "benchmark" and m["seed"] == SEED
    centers = m["train_centers"] + m["test_centers"]
    assert len(centers) == m["centers"] >= 6 and len(m["test_centers"]) >= 2
    assert sorted(p.name for p in root.glob("center_*")) == sorted(centers)
    assert not set(m["train_centers"]) & set(m["test_centers"])
    # Scanners differ as real ones do.
    cards = [json.loads((root / c / "center.json").read_text()) for c in centers]
    for key in ("manufacturer", "slice_thickness_mm", "pixel_spacing_mm", "noise_hu", "kernel",
                "hu_offset"):
        assert len({card[key] for card in cards}) >= 4, key
    assert len({card["manufacturer"] for card in cards}) == 6
    scanner = [s["scanner_slice_thickness_mm"] for s in m["scanners"].values()]
    assert min(scanner) == 0.625 and max(scanner) == 2.5
    # One center much smaller than the others, and it trains.
    cases = dict(zip(centers, m["center_cases"], strict=True))
    small = m["small_center"]
    assert small in m["train_centers"] and cases[small] == min(cases.values())
    assert all(cases[small] < n for c, n in cases.items() if c != small)
    for center in centers:
        datalist = json.loads((root / center / "datalist.json").read_text())
        assert len(datalist["training"]) + len(datalist["validation"]) == cases[center]
        if center in m["train_centers"]:  # checkpoint selection has its own cases
            assert datalist["validation"] and datalist["training"]
    return m


def test_the_world_names_its_split_and_its_centers_differ(world: Path) -> None:
    m = check_network(world)
    assert m["train_centers"] == ["center_0", "center_1", "center_2", "center_3"]
    assert m["test_centers"] == ["center_4", "center_5"]
    assert m["center_cases"] == [4, 4, 2, 3, 4, 4]


def test_the_planned_world_meets_the_test_minimums() -> None:
    """The whole world's plan, for several seeds: ≥ 150 nodules in ≥ 60 scans of the test
    centers (what is placed is checked in test_the_whole_world)."""
    for seed in range(4):
        plan = world_plan("benchmark", seed)
        test = [c for c in plan if c["role"] == "test"]
        assert len(plan) >= 6 and len(test) >= 2
        assert sum(len(c["nodules"]) for c in test) >= 60
        assert sum(sum(c["nodules"]) for c in test) >= 150
        sizes = sorted(len(c["nodules"]) for c in plan)
        assert sizes[0] * 3 <= sizes[1]  # one much smaller center
        assert all(0 <= k <= 5 for c in plan for k in c["nodules"])
        assert sum(k == 0 for c in plan for k in c["nodules"]) > 0  # scans without nodules too


# --- nodules ----------------------------------------------------------------------------------


def test_nodule_types_locations_and_sizes_follow_the_stated_distribution() -> None:
    rng = np.random.default_rng(0)
    draws = [draw_nodule_attributes(rng) for _ in range(20000)]
    kinds = Counter(k for k, _, _ in draws)
    places = Counter(w for _, w, _ in draws)
    for kind, share in NODULE_TYPE_SHARES.items():
        assert kinds[kind] / len(draws) == pytest.approx(share, abs=0.01), kind
    for where, share in NODULE_LOCATION_SHARES.items():
        assert places[where] / len(draws) == pytest.approx(share, abs=0.01), where
    assert set(NODULE_TYPE_SHARES) == {"solid", "part-solid", "ground-glass"}
    assert NODULE_TYPE_SHARES["solid"] == 0.75
    check_sizes(np.array([d for _, _, d in draws]))


def check_sizes(d: np.ndarray) -> None:
    """Most 4–10 mm, a fifth or so larger, a few to ~25 mm, few under 4 mm."""
    assert 0.6 <= np.mean((d >= 4) & (d <= 10)) <= 0.8
    assert 0.12 <= np.mean(d > 10) <= 0.32
    assert np.mean(d < 4) <= 0.15
    assert 6.0 <= np.median(d) <= 9.0
    assert d.min() >= 3.5 and d.max() <= 30.0


def check_nodules(root: Path, tolerance: float) -> list[dict]:
    rows = nodules(root)
    for center in manifest(root)["train_centers"] + manifest(root)["test_centers"]:
        with (root / center / "annotations.csv").open(newline="") as f:
            assert csv.DictReader(f).fieldnames == ANNOTATION_COLUMNS
    kinds = Counter(r["nodule_type"] for r in rows)
    places = Counter(r["location"] for r in rows)
    for kind, share in NODULE_TYPE_SHARES.items():
        assert kinds[kind] / len(rows) == pytest.approx(share, abs=tolerance), (kind, kinds)
    for where, share in NODULE_LOCATION_SHARES.items():
        assert places[where] / len(rows) == pytest.approx(share, abs=tolerance), (where, places)
    return rows


def test_world_nodules_carry_type_and_location_and_sit_where_annotated(world: Path) -> None:
    rows = check_nodules(world, tolerance=0.2)
    m = manifest(world)
    assert len(rows) == sum(m["center_nodules"]) == sum(sum(c["nodules"]) for c in world_plan(
        "benchmark", SEED, 0.1))  # every planned nodule found a place
    assert {r["location"] for r in rows} == {"isolated", "juxtapleural", "juxtavascular"}
    # Solid nodules of 8 mm or more are denser than the lung around them, on every scanner.
    checked = 0
    for center in sorted(world.glob("center_*")):
        datalist = json.loads((center / "datalist.json").read_text())
        for e in datalist["training"] + datalist["validation"]:
            assert len(e["nodule_type"]) == len(e["nodule_location"]) == len(e["box"])
            for box, kind in zip(e["box"], e["nodule_type"], strict=True):
                if kind != "solid" or box[3] < 8:
                    continue
                vol = read_volume(center / e["image"])
                assert peak(vol, box[:3]) > -500, (center.name, box)
                checked += 1
    assert checked >= 5


# --- look-alikes ------------------------------------------------------------------------------


def check_lookalikes(root: Path) -> list[dict]:
    fakes = lookalikes(root)
    with (root / "center_0" / "lookalikes.csv").open(newline="") as f:
        assert csv.DictReader(f).fieldnames == LOOKALIKE_COLUMNS
    assert {r["kind"] for r in fakes} == {"vessel-branching", "calcified-granuloma", "scar"}
    by_series: dict[str, list[dict]] = {}
    for r in nodules(root):
        by_series.setdefault(r["seriesuid"], []).append(r)
    for fake in fakes:  # not a nodule: none is annotated there, nor within its reach
        for r in by_series.get(fake["seriesuid"], []):
            gap = np.linalg.norm(xyz(fake) - xyz(r))
            assert gap >= (float(fake["diameter_mm"]) + float(r["diameter_mm"])) / 2 + 8
    return fakes


def test_lookalikes_are_listed_apart_from_the_nodules_and_visible(world: Path) -> None:
    fakes = check_lookalikes(world)
    m = manifest(world)
    assert len(fakes) == sum(m["center_lookalikes"]) >= 2 * sum(m["center_cases"])
    # A calcified granuloma of 5 mm or more reads far denser than lung (-845 HU), even through
    # the softest kernel at 3.5 mm voxels.
    images = {}
    for center in sorted(world.glob("center_*")):
        datalist = json.loads((center / "datalist.json").read_text())
        images.update({e["seriesuid"]: center / e["image"]
                       for e in datalist["training"] + datalist["validation"]})
    dense = [f for f in fakes if f["kind"] == "calcified-granuloma" and float(f["diameter_mm"]) >= 5]
    assert dense
    for fake in dense:
        vol = read_volume(images[fake["seriesuid"]])
        assert peak(vol, xyz(fake)) > -650, fake


# --- the split is enforced ----------------------------------------------------------------------


@pytest.mark.parametrize("key, centers", [
    ("train_centers", ["center_0", "center_4"]),
    ("val_centers", ["center_5"]),
])
def test_training_or_validating_on_a_test_center_is_refused(world: Path, key, centers) -> None:
    data = {"root": str(world), "train_centers": ["center_0", "center_1"],
            "val_centers": ["center_2"], key: centers}
    with pytest.raises(MedfoundError, match=f"data.{key} names center_[45], a test center") as err:
        training_items(data)
    assert Path(err.value.path) == world / "phantoms.json"
    assert "\n" not in str(err.value)


def test_world_resolves_to_the_train_centers_and_their_validation_splits(world: Path) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("train_detector", overrides=[f"data.root={world}", "experiment=benchmark",
                                                   "out_dir=unused"])
    assert cfg.data.train_centers == "world" and cfg.data.val_centers == "world"
    items = training_items(cfg.data)
    train = manifest(world)["train_centers"]
    assert list(cfg.data.train_centers) == list(cfg.data.val_centers) == train
    want = sum(len(json.loads((world / c / "datalist.json").read_text())["training"])
               for c in train)
    assert len(items) == want


def test_federating_or_pretraining_on_a_test_center_is_refused(world: Path, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from medfound.fed.settings import FedSettings
    from medfound.fed.simulation import simulation_sites

    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("federate", overrides=[f"data.root={world}", "experiment=phantoms_smoke",
                                             "fed.centers=[center_0,center_5]",
                                             f"out_dir={tmp_path / 'fed'}"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    with pytest.raises(MedfoundError, match="fed.centers names center_5, a test center"):
        simulation_sites(plain, FedSettings.from_config(plain))
    res = subprocess.run([sys.executable, "-m", "medfound", "run", "pretrain", f"data.root={world}",
                          "data.train_centers=[center_0]", "data.val_centers=[center_4]",
                          f"out_dir={tmp_path / 'pre'}"],
                         capture_output=True, text=True, check=False, cwd=REPO)
    assert res.returncode == 2 and "center_4" in res.stderr and "Traceback" not in res.stderr


def test_world_needs_a_world(tmp_path: Path) -> None:
    classic = make_phantoms(tmp_path / "classic", centers=2, cases=1, seed=SEED, progress=False)
    # A classic phantom folder has no split: any center trains.
    data = {"root": str(classic), "train_centers": ["center_0"], "val_centers": ["center_1"]}
    assert len(training_items(data)) == 1
    with pytest.raises(MedfoundError, match="data.train_centers=world, but data.root holds no"):
        training_items({**data, "train_centers": "world"})


def test_the_recipe_refuses_a_test_center_in_one_line(world: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "medfound", "run", "train_detector",
                          f"data.root={world}", "experiment=benchmark",
                          "data.train_centers=[center_0,center_4]", f"out_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, check=False, cwd=REPO)
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "center_4" in line and "phantoms.json" in line and "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_preset_refuses_settings_it_makes_itself(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "medfound", "phantoms", "--preset", "benchmark",
                          "--centers", "3", "--out", str(tmp_path / "w"), "--quiet"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "--centers" in res.stderr
    assert not (tmp_path / "w").exists()


# --- determinism --------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_gives_the_same_world_whatever_the_processes(world: Path, tmp_path: Path) -> None:
    again = make_world(tmp_path / "again", seed=SEED, scale=0.1, workers=1, progress=False)
    for center in manifest(world)["train_centers"] + manifest(world)["test_centers"]:
        for name in ("annotations.csv", "lookalikes.csv", "datalist.json", "center.json"):
            assert (world / center / name).read_bytes() == (again / center / name).read_bytes()
    assert manifest(world) == manifest(again)
    a = sorted((world / "center_5" / "case_000" / "ct").glob("*.dcm"))
    b = sorted((again / "center_5" / "case_000" / "ct").glob("*.dcm"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


# --- the whole world (minutes) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def whole_world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("world") / "whole", seed=SEED, progress=False)


@pytest.mark.long
def test_the_whole_world(whole_world: Path) -> None:
    m = check_network(whole_world)
    test = nodules(whole_world, m["test_centers"])
    test_scans = sum(n for c, n in zip(m["train_centers"] + m["test_centers"], m["center_cases"],
                                       strict=True) if c in m["test_centers"])
    assert len(test) >= 150 and test_scans >= 60
    assert len({r["seriesuid"] for r in test}) >= 0.8 * test_scans  # spread over the scans
    rows = check_nodules(whole_world, tolerance=0.06)
    check_sizes(np.array([float(r["diameter_mm"]) for r in rows]))
    fakes = check_lookalikes(whole_world)
    assert len(fakes) >= 2 * sum(m["center_cases"])
    kinds = Counter(r["kind"] for r in fakes)
    assert min(kinds.values()) >= 0.2 * len(fakes)
