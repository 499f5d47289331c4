"""Hydra configs compose, and the model YAMLs are the presets the code documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from medfound.models.detection import PRESETS, DetectorConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_model_yaml_matches_the_preset(preset: str) -> None:
    values = yaml.safe_load((CONFIGS / "network" / f"retinanet_{preset}.yaml").read_text())
    assert values.pop("name") == "retinanet"
    assert values == PRESETS[preset]


@pytest.mark.parametrize("experiment", ["phantoms_smoke", "phantoms_small"])
def test_train_detector_composes_with_each_experiment(experiment: str) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train_detector", overrides=[
            "data.root=/tmp/x", "out_dir=/tmp/run", f"experiment={experiment}",
            "data.train_centers=[center_0]"])
    assert cfg.data.train_centers == ["center_0"]
    model = {k: v for k, v in cfg.network.items() if k != "name"}
    DetectorConfig.from_dict(model)  # every key valid, sizes consistent
    assert cfg.trainer.epochs >= 1 and cfg.trainer.monitor == "cpm"


def test_reference_model_composes() -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train_detector", overrides=[
            "data=luna16", "network=retinanet_reference", "data.root=/d", "out_dir=/o"])
    assert list(cfg.network.patch_size) == [192, 192, 80]
    assert list(cfg.network.spacing_mm) == [0.703125, 0.703125, 1.25]


def test_run_names_the_known_recipes_for_an_unknown_one() -> None:
    res = subprocess.run([sys.executable, "-m", "medfound", "run", "no_such_recipe"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert "no_such_recipe" in res.stderr and "train_detector" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_train_split_all_is_refused_when_a_training_center_is_also_validated() -> None:
    from medfound.errors import MedfoundError
    from medfound.train.detection import training_split
    data = {"train_centers": ["center_0", "center_1"], "val_centers": ["center_2"]}
    assert training_split(data) == "training"
    assert training_split({**data, "train_split": "all"}) == "all"
    with pytest.raises(MedfoundError, match="center_1.*validates on"):
        training_split({**data, "train_split": "all", "val_centers": ["center_1", "center_2"]})
    with pytest.raises(MedfoundError, match="data.train_split"):
        training_split({**data, "train_split": "validation"})


def test_installed_flower_is_the_pinned_one_the_docs_name() -> None:
    """The suite runs on the flwr that pyproject pins; docs/federation.md names that version."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    root = CONFIGS.parent
    pyproject = (root / "pyproject.toml").read_text()
    line = next(x for x in pyproject.splitlines() if x.strip().startswith('"flwr['))
    text = line.strip().strip('",')  # flwr[simulation]>=A,<B
    pin = Requirement(text)
    installed = version("flwr")
    assert pin.specifier.contains(installed), f"flwr {installed} is outside the pin {pin}"
    docs = (root / "docs" / "federation.md").read_text()
    assert f"flwr {installed}" in docs
    assert f"`{text}`" in docs
