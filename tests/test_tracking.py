"""MLflow tracking of a training run, read back through a real MlflowClient (no mocks)."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfound.errors import MedfoundError
from medfound.train import (
    Tracker,
    TrainerConfig,
    fit,
    flatten_config,
    load_checkpoint,
    seed_everything,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One local store (a folder) shared by the runs of this module: creating one costs seconds."""
    return tmp_path_factory.mktemp("mlflow_store")


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g)
    return DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=4, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def train_step(model, batch):
    x, y = batch
    loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
    return {"loss": loss, "mse": loss.detach()}


def validate(model):
    return {"score": float(model.weight.sum())}


def config(epochs: int) -> TrainerConfig:
    return TrainerConfig.from_dict({"epochs": epochs, "lr": 0.01, "val_every": 1, "monitor": "score",
                                    "progress": False})


def test_a_tracked_run_records_params_one_metric_point_per_epoch_and_artifacts(store, tmp_path, capsys):
    cfg = config(epochs=3)
    run_config = OmegaConf.create({"trainer": cfg.to_dict(), "model": {"width": 5, "notes": "x" * 7000}})
    seed_everything(0)
    model = nn.Linear(5, 1)
    tracking = OmegaConf.create({"uri": str(store), "experiment": "medfound-tests", "run_name": "pooled"})
    with Tracker(tracking, out_dir=tmp_path, config=run_config) as tracker:
        result = fit(model, loader(), train_step, cfg, tmp_path, validate=validate, tracker=tracker)
        tracker.log_artifacts(tmp_path / "checkpoints", artifact_path="checkpoints")
        tracker.log_artifacts(tmp_path / "mlflow_run.json")

    info = json.loads((tmp_path / "mlflow_run.json").read_text())
    assert info["run_id"] == tracker.run_id and info["run_id"] in capsys.readouterr().out
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "pooled"
    assert run.data.params["trainer.lr"] == "0.01" and run.data.params["model.width"] == "5"
    assert len(run.data.params["model.notes"]) == MAX_PARAM_VAL_LENGTH
    for name in ("train/loss", "train/mse", "lr", "val/score"):
        points = client.get_metric_history(info["run_id"], name)
        assert [p.step for p in points] == [1, 2, 3], name
        assert [p.value for p in points] == pytest.approx([h[name] for h in result.history])
    assert {a.path for a in client.list_artifacts(info["run_id"], "checkpoints")} == \
        {"checkpoints/last.pt", "checkpoints/best.pt"}
    assert "mlflow_run.json" in {a.path for a in client.list_artifacts(info["run_id"])}

    best = nn.Linear(5, 1)
    assert result.load_best(best) == tmp_path / "checkpoints" / "best.pt"
    assert float(best.weight.detach().sum()) == result.best_metric == max(h["val/score"] for h in result.history)


def test_only_rank_0_tracks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with Tracker({"uri": None, "experiment": "medfound-tests"}, out_dir=tmp_path, config={"a": 1}) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_artifacts(tmp_path)
    assert tracker.run_id is None and not any(tmp_path.iterdir())


def test_a_crash_marks_the_run_failed_keeps_the_last_epoch_and_resume_continues_it(tmp_path):
    calls = {"n": 0}

    def fails_in_epoch_2(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 steps per epoch
            raise RuntimeError("disk unplugged")
        return train_step(model, batch)

    seed_everything(0)
    with pytest.raises(RuntimeError, match="disk unplugged"):  # tracking_uri=None: a store in out_dir
        with Tracker.start("medfound-tests", out_dir=tmp_path) as tracker:
            fit(nn.Linear(5, 1), loader(), fails_in_epoch_2, config(epochs=3), tmp_path, validate=validate,
                tracker=tracker)
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1  # nothing lost

    with Tracker.start("medfound-tests", out_dir=tmp_path, resume=True) as resumed:
        fit(nn.Linear(5, 1), loader(), train_step, config(epochs=3), tmp_path, validate=validate,
            tracker=resumed, resume=True)
    assert resumed.run_id == tracker.run_id
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert [p.step for p in client.get_metric_history(tracker.run_id, "train/loss")] == [1, 2, 3]


def test_an_unreachable_tracking_server_is_one_clear_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes
    started = time.monotonic()
    with pytest.raises(MedfoundError, match="unreachable") as err:
        Tracker.start("medfound-tests", tracking_uri=uri, out_dir=tmp_path)
    assert uri in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - started < 10


def test_config_is_flattened_with_dotted_keys():
    flat = flatten_config({"trainer": {"lr": 0.001, "amp": "auto"}, "data": {"centers": ["a", "b"]},
                           "seed": 0, "model": {}})
    assert flat == {"trainer.lr": "0.001", "trainer.amp": "auto", "data.centers": "['a', 'b']",
                    "seed": "0", "model": "{}"}


def test_a_file_uri_is_that_folder_not_a_folder_named_file(tmp_path):
    from medfound.train.tracking import _resolve_store
    folder = tmp_path / "store"
    for uri in (f"file:{folder}", f"file://{folder}", str(folder)):
        resolved, artifacts = _resolve_store(uri, tmp_path / "run")
        assert resolved == f"sqlite:///{folder.resolve() / 'mlflow.db'}"
        assert artifacts == folder.resolve() / "artifacts"


@pytest.mark.long  # two recipe processes and a fresh MLflow database: about two minutes
def test_recipes_given_one_store_land_in_one_database_named_and_tagged(tmp_path):
    import subprocess
    import sys

    from medfound.data.phantoms import make_phantoms
    from medfound.train.tracking import git_commit

    data = tmp_path / "phantoms"
    make_phantoms(data, centers=2, cases=2, seed=4, size="small", progress=False)
    shared = tmp_path / "demo" / "mlruns"

    def medfound(*args: str) -> None:
        res = subprocess.run([sys.executable, "-m", "medfound", "run", *args, f"tracking.uri={shared}"],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    medfound("train_detector", f"data.root={data}", "data.train_centers=[center_0]",
             "data.val_centers=[center_1]", "experiment=phantoms_smoke", "trainer.epochs=1",
             "data.num_patches_per_image=1", "data.batch_size=1", "trainer.progress=false",
             f"out_dir={tmp_path / 'local'}")
    medfound("evaluate_detector", f"model={tmp_path / 'local' / 'model'}", f"data.root={data}",
             "data.centers=[center_1]", "eval.n_bootstraps=10", f"out_dir={tmp_path / 'eval'}",
             "threads=1")

    # One database holds both; each recipe's own out_dir/mlruns was not made.
    assert sorted(p.name for p in shared.iterdir()) == ["artifacts", "mlflow.db"]
    assert not (tmp_path / "local" / "mlruns").exists() and not (tmp_path / "eval" / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{shared / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medfound-detection")
    found = client.search_runs([experiment.experiment_id])
    listing = [(r.info.run_name, r.info.run_id, r.data.tags.get("model_run_id")) for r in found]
    assert sorted(name for name, _, _ in listing) == [
        "evaluation of local center_0 on center_1", "local center_0"], listing  # one run each
    runs = {r.info.run_name: r for r in found}
    train, evaluation = runs["local center_0"], runs["evaluation of local center_0 on center_1"]
    assert train.info.status == evaluation.info.status == "FINISHED"
    commit = train.data.tags["git_commit"]  # the checkout's HEAD (it may move on while this runs)
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit) or (commit == "unknown" == git_commit())
    for run, role, centers in ((train, "local", "center_0"), (evaluation, "evaluation", "center_1")):
        tags = run.data.tags
        assert tags["task"] == "lung_nodule_detection" and tags["role"] == role
        assert tags["centers"] == centers and tags["data"] == f"{data.resolve()} [{centers}]"
        assert tags["git_commit"] == tags["mlflow.source.git.commit"]
    assert evaluation.data.tags["model_run_id"] == train.info.run_id, listing
    assert evaluation.data.tags["model_role"] == "local"
    assert evaluation.data.params["torch_threads"] == "1"  # as asked (threads=1)
    # The package names the run and the commit it came from.
    provenance = json.loads((tmp_path / "local" / "model" / "model.json").read_text())["provenance"]
    assert provenance["mlflow_run_id"] == train.info.run_id and provenance["git_commit"] == commit


def test_git_commit_is_the_checkout_head_or_unknown_without_git(monkeypatch):
    import subprocess

    from medfound.train import tracking

    tracking.git_commit.cache_clear()
    head = subprocess.run(["git", "-C", str(Path(tracking.__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    assert tracking.git_commit().split("+")[0] == (head or "unknown")
    tracking.git_commit.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")  # no git executable
    try:
        assert tracking.git_commit() == "unknown"
    finally:
        tracking.git_commit.cache_clear()


def test_a_run_is_named_and_tagged_from_its_config():
    from medfound.train.tracking import describe_run

    name, tags = describe_run({"fed": {"centers": ["center_0", "center_1"],
                                       "strategy": {"name": "fedavg"}},
                               "task": {"name": "detect"}, "data": {"root": "/d"}})
    assert name == "federated fedavg center_0+center_1"
    assert tags["role"] == "federated" and tags["task"] == "lung_nodule_detection"
    name, tags = describe_run({"center": "center_2", "task": "detect", "data": {"root": "/d"}})
    assert tags["role"] == "center" and tags["center"] == "center_2" and name == "center center_2"
    name, tags = describe_run({"data": {"root": "/d", "train_centers": ["a", "b"]}})
    assert (name, tags["role"], tags["centers"]) == ("pooled a+b", "pooled", "a,b")
    with pytest.raises(MedfoundError, match="tracking.tags"):
        Tracker({"tags": "x"})
