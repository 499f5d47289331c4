"""The recipe contract: `medfound run train_detector` / `evaluate_detector` / `prepare_luna16`,
run as real processes on phantoms, tracked in a real MLflow store."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medfound.data.phantoms import make_phantoms

pytestmark = pytest.mark.slow

FAST = ["experiment=phantoms_smoke", "trainer.progress=false", "data.num_patches_per_image=1"]


def medfound(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medfound", *args], capture_output=True,
                          text=True, check=False, timeout=600)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes") / "phantoms"
    make_phantoms(root, centers=3, cases=3, seed=5, size="small", progress=False)
    return root


@pytest.fixture(scope="module")
def trained(phantoms: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "RUN"
    res = medfound("run", "train_detector", f"data.root={phantoms}",
                   "data.train_centers=[center_0,center_1]", "data.val_centers=[center_2]",
                   f"out_dir={run}", *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def test_training_leaves_a_model_package_checkpoints_and_an_mlflow_run(trained: Path) -> None:
    from mlflow import MlflowClient

    meta = json.loads((trained / "model" / "model.json").read_text())
    assert meta["task"] == "lung_nodule_detection"
    assert meta["preprocessing"]["spacing_mm"] == [2.8125, 2.8125, 3.0]
    assert meta["provenance"]["train_centers"] == ["center_0", "center_1"]
    assert set(meta["metrics"]) >= {"cpm", "froc", "cpm_ci95", "n_scans", "n_nodules"}
    state = torch.load(trained / "model" / "weights.pt", weights_only=True)
    assert any(k.startswith("feature_extractor") for k in state)
    assert (trained / "checkpoints" / "last.pt").is_file()
    assert "data:" in (trained / "model" / "config.yaml").read_text()
    # configs/hydra/default.yaml: Hydra's own files in out_dir/.hydra_run; the composed config
    # holds configs/finetune/none.yaml's keys and the detector's init_model
    hydra_config = (trained / ".hydra_run" / ".hydra" / "config.yaml").read_text()
    assert all(f"  {key}:" in hydra_config
               for key in ("init_encoder", "init_model", "freeze_encoder", "train_only"))

    run_id = json.loads((trained / "mlflow_run.json").read_text())["run_id"]
    assert meta["provenance"]["mlflow_run_id"] == run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{trained / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.train_centers"] == "['center_0', 'center_1']"
    assert run.data.params["network.patch_size"] == "[64, 64, 32]"
    losses = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2]
    assert len(client.get_metric_history(run_id, "val/cpm")) == 2
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert "model/weights.pt" in artifacts and "model/model.json" in artifacts


def test_resume_continues_where_the_run_stopped(trained: Path, phantoms: Path, tmp_path) -> None:
    import shutil

    run = tmp_path / "RUN"
    shutil.copytree(trained, run)
    res = medfound("run", "train_detector", f"data.root={phantoms}", f"out_dir={run}", *FAST,
                   "trainer.epochs=3", "resume=true")
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 3
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2, 3]


def test_evaluate_writes_luna16_predictions_metrics_and_froc(trained: Path, phantoms: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "EVAL"
    res = medfound("run", "evaluate_detector", f"model={trained / 'model'}",
                   f"data.root={phantoms}", "data.centers=[center_2]",
                   f"out_dir={out}", "eval.n_bootstraps=50")
    assert res.returncode == 0, res.stderr[-3000:]
    with (out / "predictions.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
        rows = list(reader)
    datalist = json.loads((phantoms / "center_2" / "datalist.json").read_text())
    series = {e["seriesuid"] for e in datalist["training"] + datalist["validation"]}
    assert {r["seriesuid"] for r in rows} <= series
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics)[:5] == ["cpm", "froc", "cpm_ci95", "n_scans", "n_nodules"]
    assert list(metrics["froc"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    assert metrics["n_scans"] == len(series)
    assert 0.0 <= metrics["cpm_ci95"][0] <= metrics["cpm"] <= metrics["cpm_ci95"][1] <= 1.0
    assert "ap" in metrics["coco"]
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("override", "expected"), [
    ("data.train_centers=[center_9]", "center_9"),
    ("network.patch_size=[60,64,32]", "patch_size"),
    ("trainer.lr=-1", "lr"),
])
def test_bad_config_ends_in_one_line(phantoms: Path, tmp_path: Path, override: str,
                                     expected: str) -> None:
    res = medfound("run", "train_detector", f"data.root={phantoms}", f"out_dir={tmp_path}",
                   *FAST, override)
    assert res.returncode == 2
    assert expected in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_prepare_luna16_then_train_on_it(luna: Path, tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    res = medfound("run", "prepare_luna16", f"luna_dir={luna}", f"out={prepared}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (prepared / "luna16" / "datalist.json").is_file()
    assert (prepared / ".hydra_run" / ".hydra" / "overrides.yaml").is_file()  # out, not out_dir
    # data=luna16 with the tiny network: the reference network is too large for CI's CPU.
    res = medfound("run", "train_detector", "data=luna16", f"data.root={prepared}",
                   f"out_dir={tmp_path / 'RUN'}", "data.cache=none", "data.num_workers=0",
                   "data.batch_size=1", "trainer.epochs=1", "trainer.progress=false",
                   "network.spacing_mm=[1.5,1.5,2.0]", "network.patch_size=[32,32,16]",
                   "network.sw_roi_size=[32,32,16]")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "RUN" / "model" / "weights.pt").is_file()
