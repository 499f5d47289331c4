"""Same seed, same data, same thread count and worker count: `train_detector` writes the same
metrics.json, weights and per-epoch losses, and records the settings that decide them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from medfound.data.phantoms import make_phantoms

SHORT = ["experiment=phantoms_smoke", "trainer.progress=false", "trainer.epochs=2",
         "trainer.val_every=2", "data.num_patches_per_image=1", "data.batch_size=1",
         "trainer.threads=1", "'data.train_centers=[center_0]'", "'data.val_centers=[center_1]'"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reproducible") / "phantoms"
    make_phantoms(root, centers=2, cases=2, seed=3, size="small", progress=False)
    return root


def train(phantoms: Path, run: Path, *extra: str) -> Path:
    args = [f"data.root={phantoms}", f"out_dir={run}", *[a.strip("'") for a in SHORT], *extra]
    res = subprocess.run([sys.executable, "-m", "medfound", "run", "train_detector", *args],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return run


def losses(run: Path) -> list[dict[str, float]]:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["history"]


def test_two_runs_with_the_same_settings_write_identical_metrics_and_weights(phantoms, tmp_path):
    """The rerun loads its data in one loader worker, which draws exactly what the main
    process draws: the same settings for the result, and the worker path checked with them."""
    a = train(phantoms, tmp_path / "a")
    c = train(phantoms, tmp_path / "c", "data.num_workers=1")
    assert (a / "model" / "metrics.json").read_bytes() == (c / "model" / "metrics.json").read_bytes()
    assert (a / "model" / "weights.pt").read_bytes() == (c / "model" / "weights.pt").read_bytes()
    assert losses(a) == losses(c) and len(losses(a)) == 2

    # The settings a rerun must match are in the package's provenance and the run's params.
    repro = json.loads((c / "model" / "model.json").read_text())["provenance"]["reproducibility"]
    assert repro["deterministic"] is True and repro["why_not"] is None
    assert repro["torch_threads"] == 1 and repro["num_workers"] == 1
    assert repro["deterministic_algorithms"] is True and repro["seed"] == 0
    ref = json.loads((c / "mlflow_run.json").read_text())
    run = MlflowClient(ref["tracking_uri"]).get_run(ref["run_id"])
    assert run.data.params["reproducibility.torch_threads"] == "1"
    assert run.data.params["reproducibility.num_workers"] == "1"
    assert run.data.params["reproducibility.deterministic"] == "True"
    assert run.data.tags["deterministic"] == "True"


def test_nondeterministic_kernels_are_recorded_as_breaking_determinism():
    from medfound.train.loop import reproducibility

    assert reproducibility({"deterministic": True, "device": "cpu"}, 0)["deterministic"] is True
    off = reproducibility({"deterministic": False, "device": "cpu", "threads": 3}, 2)
    assert off["deterministic"] is False and "trainer.deterministic=false" in off["why_not"]
    assert off["threads_setting"] == 3 and off["num_workers"] == 2
