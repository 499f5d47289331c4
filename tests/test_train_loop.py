"""The one training loop: determinism, exact resume, checkpoints, early stopping, errors, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medfound.errors import MedfoundError
from medfound.train import TrainerConfig, distributed_loader, fit, load_checkpoint, seed_everything

TESTS = Path(__file__).parent


class Cubes(Dataset):
    """16 random 6³ volumes whose target is their mean intensity."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 6, 6, 6, generator=g)
        self.targets = self.images.mean(dim=(1, 2, 3, 4))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "target": self.targets[i]}


def tiny_net(width: int = 4) -> nn.Module:
    # Dropout makes the torch RNG part of the result, so a resume that forgot it would differ.
    return nn.Sequential(nn.Conv3d(1, width, 3), nn.ReLU(), nn.Dropout(0.3),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(width, 1))


def train_step(model: nn.Module, batch: dict) -> dict:
    mse = nn.functional.mse_loss(model(batch["image"]).squeeze(-1), batch["target"])
    return {"loss": mse, "mse": mse.detach()}


def make_validate(data: Cubes):
    def validate(model: nn.Module) -> dict:
        mse = nn.functional.mse_loss(model(data.images).squeeze(-1), data.targets)
        # Validation may draw random numbers too (random crops): the checkpoint must come after it.
        return {"neg_mse": -float(mse), "jitter": float(torch.rand(()))}
    return validate


def shuffling_loader(seed: int = 0) -> DataLoader:
    return DataLoader(Cubes(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))


def config(**overrides) -> TrainerConfig:
    base = {"epochs": 4, "lr": 0.01, "warmup_epochs": 1, "val_every": 1, "monitor": "neg_mse",
            "mode": "max", "progress": False, "seed": 0}
    return TrainerConfig.from_dict({**base, **overrides})


def run(out_dir: Path, seed: int = 0, **overrides):
    seed_everything(seed)
    model = tiny_net()
    result = fit(model, shuffling_loader(seed), train_step, config(seed=seed, **overrides), out_dir,
                 validate=make_validate(Cubes(seed=99)))
    return model, result


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_same_seed_gives_the_same_numbers_and_another_seed_does_not(tmp_path):
    model_a, result_a = run(tmp_path / "a", seed=1)
    model_b, result_b = run(tmp_path / "b", seed=1)
    model_c, result_c = run(tmp_path / "c", seed=2)
    assert result_a.history == result_b.history
    assert same_weights(model_a, model_b)
    assert result_a.history != result_c.history
    assert len(result_a.history) == 4 and result_a.global_step == 16


def test_monai_random_transforms_are_seeded_from_the_run_seed(tmp_path):
    # MONAI's random transforms seed themselves from OS entropy; fit reseeds them per epoch.
    from monai.data import Dataset as MonaiDataset
    from monai.transforms import Compose, RandGaussianNoised, RandSpatialCropd

    def loader():
        cubes = Cubes()
        items = [cubes[i] for i in range(len(cubes))]
        transform = Compose([RandGaussianNoised("image", prob=1.0, std=0.5),
                             RandSpatialCropd("image", roi_size=(4, 4, 4), random_size=False)])
        return DataLoader(MonaiDataset(items, transform), batch_size=4, shuffle=False)

    def train(out_dir, seed):
        seed_everything(seed)
        model = tiny_net()
        fit(model, loader(), train_step, config(seed=seed, epochs=2), out_dir)
        return model

    a, b = train(tmp_path / "a", 3), train(tmp_path / "b", 3)
    assert same_weights(a, b)
    assert not same_weights(a, train(tmp_path / "c", 4))


def test_resume_after_an_interruption_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full_model, full = run(tmp_path / "full")

    calls = {"n": 0}

    def crashes_in_epoch_3(model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 3:  # third step of the third epoch (4 steps per epoch)
            raise RuntimeError("power cut")
        return train_step(model, batch)

    seed_everything(0)
    with pytest.raises(RuntimeError, match="power cut"):
        fit(tiny_net(), shuffling_loader(), crashes_in_epoch_3, config(), tmp_path / "cut",
            validate=make_validate(Cubes(seed=99)))
    after_epoch_2 = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert after_epoch_2["epoch"] == 2

    seed_everything(12345)  # a fresh process: other weights, other RNG state, a fresh loader
    resumed_model = tiny_net()
    resumed = fit(resumed_model, shuffling_loader(), train_step, config(), tmp_path / "cut",
                  validate=make_validate(Cubes(seed=99)), resume=True)
    assert resumed.history == full.history
    assert resumed.epochs_completed == 4 and resumed.global_step == full.global_step
    assert same_weights(resumed_model, full_model)

    # A checkpoint already in memory (a federated round hands one over) continues the same way.
    from_memory_model = tiny_net()
    from_memory = fit(from_memory_model, shuffling_loader(), train_step, config(), tmp_path / "memory",
                      validate=make_validate(Cubes(seed=99)), start_state=after_epoch_2)
    assert from_memory.history == full.history and same_weights(from_memory_model, full_model)


def test_checkpoints_hold_everything_a_resume_needs(tmp_path):
    _, result = run(tmp_path, epochs=2)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]  # no temporary files left
    last = load_checkpoint(result.last_checkpoint)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "best_metric",
            "bad_validations", "rng", "history", "config"} <= set(last)
    assert last["epoch"] == 2 and last["global_step"] == 8
    assert load_checkpoint(result.best_checkpoint)["epoch"] == result.best_epoch
    assert last["best_metric"] == result.best_metric == max(h["val/neg_mse"] for h in result.history)


def test_learning_rate_warms_up_then_follows_the_schedule(tmp_path):
    _, cosine = run(tmp_path / "cos", epochs=3, warmup_epochs=1, schedule="cosine", lr=0.01)
    assert cosine.history[0]["lr"] == pytest.approx(0.01)  # end of warm-up: the peak
    assert cosine.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero
    _, step = run(tmp_path / "step", epochs=3, warmup_epochs=0, schedule="step", step_epochs=1,
                  step_gamma=0.5, lr=0.01, optimizer="sgd")
    assert [h["lr"] for h in step.history] == pytest.approx([0.005, 0.0025, 0.00125])


def test_early_stopping_after_patience_validations_without_improvement(tmp_path):
    scores = iter([0.5, 0.6, 0.6, 0.55, 0.9, 0.9])

    def stalls(model):
        return {"cpm": next(scores)}

    seed_everything(0)
    result = fit(tiny_net(), shuffling_loader(), train_step,
                 config(epochs=10, monitor="cpm", early_stopping_patience=2), tmp_path, validate=stalls)
    assert result.stopped_early
    assert result.epochs_completed == 4  # validations 3 and 4 did not beat 0.6
    assert result.best_epoch == 2 and result.best_metric == 0.6
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["epoch"] == 2


def test_validation_every_n_epochs_and_always_at_the_end(tmp_path):
    _, result = run(tmp_path, epochs=5, val_every=2)
    assert ["val/neg_mse" in h for h in result.history] == [False, True, False, True, True]


def test_config_from_hydra_and_bad_keys():
    cfg = TrainerConfig.from_dict(OmegaConf.create({"epochs": 3, "lr": 0.1, "amp": "auto"}))
    assert cfg.epochs == 3 and cfg.optimizer == "adamw"
    with pytest.raises(MedfoundError, match="unknown key.*'epoch'"):
        TrainerConfig.from_dict({"epoch": 3})
    with pytest.raises(MedfoundError, match="'schedule'"):
        TrainerConfig.from_dict({"schedule": "linear"})


def test_clear_errors_a_user_can_cause(tmp_path):
    with pytest.raises(MedfoundError, match="no batches"):
        fit(tiny_net(), DataLoader(Cubes(n=0), batch_size=4), train_step, config(), tmp_path / "empty")

    def diverges(model, batch):
        return {"loss": train_step(model, batch)["loss"] * float("nan")}

    with pytest.raises(MedfoundError, match=r"loss is nan at epoch 1, step 1.*lower trainer\.lr") as err:
        fit(tiny_net(), shuffling_loader(), diverges, config(), tmp_path / "nan")
    assert "\n" not in str(err.value)

    with pytest.raises(MedfoundError, match="no checkpoint to resume from"):
        fit(tiny_net(), shuffling_loader(), train_step, config(), tmp_path / "never", resume=True)

    run(tmp_path / "narrow", epochs=1)
    with pytest.raises(MedfoundError, match="incompatible model.*shape differs"):
        fit(tiny_net(width=8), shuffling_loader(), train_step, config(), tmp_path / "narrow", resume=True)

    with pytest.raises(MedfoundError, match="monitor = 'cpm'.*neg_mse"):
        fit(tiny_net(), shuffling_loader(), train_step, config(monitor="cpm"), tmp_path / "monitor",
            validate=make_validate(Cubes()))


def _free_port() -> int:
    from processes import free_port_block

    return free_port_block(1)


def test_ddp_two_processes_train_on_disjoint_shards_like_one_process_with_the_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(TESTS)}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(TESTS / "ddp_worker.py"),
         str(tmp_path / "ddp"), "2"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen_0, seen_1 in zip(ranks[0]["seen"], ranks[1]["seen"], strict=True):
        assert not set(seen_0) & set(seen_1)
        assert sorted(seen_0 + seen_1) == list(range(16))
    assert ranks[0]["last_checkpoint"] and ranks[1]["last_checkpoint"] is None  # only rank 0 writes
    # Losses are averaged over ranks and rank 0's validation reaches rank 1: both see one history.
    assert ranks[0]["history"] == ranks[1]["history"]
    assert all("val/neg_mse" in h for h in ranks[1]["history"])

    sys.path.insert(0, str(TESTS))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(TESTS))
    ddp_worker.main(tmp_path / "single", batch_size=4)  # same global batch, one process
    single = torch.load(tmp_path / "single" / "weights_rank0.pt")
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"weights_rank{r}.pt") for r in (0, 1))
    saved = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["model"]
    seed_everything(0)
    initial = nn.Linear(8, 1).state_dict()  # what the worker started from
    for key in single:
        assert torch.equal(rank0[key], rank1[key])  # DDP keeps the replicas identical
        assert torch.equal(saved[key], rank0[key])
        torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=1e-6)
        assert not torch.equal(single[key], initial[key])


def test_distributed_loader_in_one_process_covers_the_dataset_once_per_epoch():
    loader = distributed_loader(Cubes(n=10), batch_size=4, shuffle=True, seed=3)
    loader.sampler.set_epoch(0)
    first = torch.cat([b["target"] for b in loader])
    loader.sampler.set_epoch(1)
    second = torch.cat([b["target"] for b in loader])
    assert len(first) == 10 and sorted(first.tolist()) == sorted(Cubes(n=10).targets.tolist())
    assert not torch.equal(first, second)


# Data-loader workers and torch's thread count are process-wide state: these checks run in a
# fresh interpreter each, so they neither inherit nor leave behind the state of other tests.
_NOISY_BATCHES = """
import hashlib, sys, torch
from monai.data import Dataset
from monai.transforms import Compose, RandGaussianNoised
from medfound.train import distributed_loader

def batches(workers):
    items = [{"image": torch.zeros(1, 2, 2, 2)} for _ in range(4)]
    dataset = Dataset(items, Compose([RandGaussianNoised("image", prob=1.0, std=1.0)]))
    dataset.transform.set_random_state(seed=7)  # as fit seeds it for an epoch
    loader = distributed_loader(dataset, batch_size=1, shuffle=False, num_workers=workers)
    return [hashlib.sha256(torch.as_tensor(b["image"]).numpy().tobytes()).hexdigest()[:16]
            for b in loader]

if __name__ == "__main__":
    for workers in sys.argv[1:]:
        print(" ".join(batches(int(workers))))
"""


def _noisy_batches(tmp_path: Path, *workers: int) -> list[list[str]]:
    """The batch hashes of one loader per worker count in `workers`, one process for all."""
    script = tmp_path / "noisy_batches.py"
    script.write_text(_NOISY_BATCHES)
    res = subprocess.run([sys.executable, str(script), *map(str, workers)], capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return [line.split() for line in res.stdout.strip().splitlines()]


def test_loader_workers_draw_their_own_augmentations_reproducibly(tmp_path):
    none, one, two, again = _noisy_batches(tmp_path, 0, 1, 2, 2)
    assert len(none) == len(one) == len(two) == 4
    # One worker continues the stream the main process would have used: the same batches.
    assert none == one
    # Two workers: each its own stream (a copy of the same one would noise items 0 and 1 alike),
    # and the same again from a new loader, after the process's global random state has moved.
    assert two[0] != two[1]
    assert two == again


_THREADS = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import test_train_loop as t
from medfound.train.loop import fit, reproducibility
fit(t.tiny_net(), t.shuffling_loader(), t.train_step, t.config(epochs=1, threads=1), sys.argv[2])
print(json.dumps({"threads": torch.get_num_threads(),
                  "record": reproducibility(t.config(threads=1), num_workers=0)}))
"""


def test_trainer_threads_sets_torch_threads_and_is_recorded(tmp_path):
    # Two threads to start from, whatever the machine, so that setting one is seen.
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-c", _THREADS, str(TESTS), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    record = out["record"]
    assert out["threads"] == 1
    assert record["torch_threads"] == 1 and record["threads_setting"] == 1
    assert record["deterministic"] is True and record["device"] == "cpu"
    with pytest.raises(MedfoundError, match="threads"):
        config(threads=0)


def test_by_weights_computes_once_per_set_of_weights_and_again_after_a_change(tmp_path):
    from medfound.train.loop import ByWeights, load_model_state

    calls = []
    net = tiny_net()
    scored = ByWeights(lambda model, tag: calls.append(tag) or float(len(calls)))
    first = scored(net, "a")
    assert scored(net, "b") == first and calls == ["a"]  # same weights: the kept result
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    assert scored(net, "c") != first and calls == ["a", "c"]
    load_model_state(net, saved, tmp_path)  # as load_best brings back a validated checkpoint
    assert scored(net, "d") == first and calls == ["a", "c"]
