"""The one training loop: pooled, local and federated training all call `fit`.

The loop knows nothing about the task. A recipe hands it

- ``train_step(model, batch) -> dict[str, Tensor]``: the forward pass and the losses, with the
  total to optimise under ``"loss"`` (other entries are logged). ``batch`` has already been moved
  to the model's device. Under DDP ``model`` is the `DistributedDataParallel` wrapper, so call
  ``model(...)`` (its forward), not another method, for gradients to be synchronised.
- ``validate(model) -> dict[str, float]`` (optional): metrics on held-out data; it is called on
  rank 0 only, on the bare model, in eval mode under ``torch.no_grad()``.

and `fit` does the rest, in this order each epoch: shuffle (``sampler.set_epoch``), forward under
autocast, backward through the GradScaler, gradient clipping, optimizer and per-step LR schedule,
validation every ``val_every`` epochs, early stopping, and the checkpoints
``out_dir/checkpoints/last.pt`` (every epoch) and ``best.pt`` (each improvement of ``monitor``).
A checkpoint holds everything a resumed run needs to continue bit for bit on CPU: weights,
optimizer, scheduler, scaler, counters, history and every RNG stream (python, numpy, torch CPU and
CUDA, and the data loader's generators). Launched by ``torchrun`` (``WORLD_SIZE`` > 1), `fit`
trains with DistributedDataParallel and only rank 0 validates, writes and logs.

Reproducibility: the same seed, data, torch CPU thread count (``threads``), data-loader worker
count, world size, device and library versions give bit-identical weights and metrics on CPU.
The thread count changes the order of floating-point sums in convolutions, so 1 and 2 threads
differ in the last bits after one step and visibly after hundreds of epochs; pin it with
``trainer.threads``. Workers are seeded from the loader's generator (`distributed_loader`), so
``num_workers`` 0 and 1 give the same batches and more workers other, equally reproducible
ones. `reproducibility` is the record a run keeps of these settings.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import multiprocessing.context
import os
import random
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from medfound.config import from_mapping, plain
from medfound.errors import MedfoundError
from medfound.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)

__all__ = [
    "FitResult",
    "TrainerConfig",
    "distributed_loader",
    "dist_info",
    "fit",
    "is_main_process",
    "move_to",
    "reproducibility",
    "seed_everything",
    "seed_worker",
    "set_threads",
]

TrainStep = Callable[[nn.Module, Any], Mapping[str, Tensor]]
Validate = Callable[[nn.Module], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Every knob of the loop: the keys of configs/trainer/*.yaml (plus ``seed``)."""

    epochs: int = 20
    optimizer: str = "adamw"  # "adamw" | "sgd"
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0  # linear warm-up from lr/steps to lr, per step
    schedule: str = "cosine"  # "cosine" (to 0 at the last step) | "step" | "constant"
    step_epochs: int = 10  # "step": multiply lr by step_gamma every step_epochs after warm-up
    step_gamma: float = 0.1
    grad_clip_norm: float | None = 10.0  # max global L2 norm; null or 0 = no clipping
    amp: str | bool = "auto"  # "auto": mixed precision on CUDA only; true | false
    device: str = "auto"  # "auto": cuda (this rank's GPU) when available, else cpu
    val_every: int = 2  # epochs; the last epoch is always validated
    early_stopping_patience: int = 0  # validations without improvement before stopping; 0 = off
    monitor: str = "cpm"  # key of validate()'s result that decides best.pt and early stopping
    mode: str = "max"  # "max" | "min": which direction of `monitor` is better
    seed: int = 0
    deterministic: bool = True  # deterministic kernels (warn where none exists)
    threads: int | None = None  # torch CPU threads; null: torch's default (the machine's cores)
    num_workers: int = 0  # data-loader worker processes (used by the recipe's loaders)
    log_every: int = 10  # steps between progress-bar updates
    progress: bool = True  # tqdm bars (also off when stderr is not a terminal and off rank 0)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> TrainerConfig:
        """Validate a mapping (or a Hydra DictConfig); missing keys take the defaults above."""
        values = plain(values or {})
        if not isinstance(values, dict):
            raise MedfoundError(f"trainer config must be a mapping, got {type(values).__name__}")
        return from_mapping(cls, {**values, **overrides}, "trainer config", ignore=())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _validate(self) -> None:
        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise MedfoundError(f"trainer config key '{key}' = {getattr(self, key)!r}: {why}")

        check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an integer >= 1")
        check(self.optimizer in ("adamw", "sgd"), "optimizer", "must be 'adamw' or 'sgd'")
        check(_num(self.lr) and self.lr > 0, "lr", "must be a number > 0")
        check(_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be a number >= 0")
        check(_num(self.momentum) and self.momentum >= 0, "momentum", "must be a number >= 0")
        check(_num(self.step_gamma) and self.step_gamma > 0, "step_gamma", "must be a number > 0")
        check(_num(self.warmup_epochs) and self.warmup_epochs >= 0, "warmup_epochs", "must be a number >= 0")
        check(self.schedule in ("cosine", "step", "constant"), "schedule",
              "must be 'cosine', 'step' or 'constant'")
        check(isinstance(self.step_epochs, int) and self.step_epochs >= 1, "step_epochs", "must be an integer >= 1")
        check(self.grad_clip_norm is None or (_num(self.grad_clip_norm) and self.grad_clip_norm >= 0),
              "grad_clip_norm", "must be a number >= 0, or null")
        check(self.amp in ("auto", True, False), "amp", "must be 'auto', true or false")
        check(isinstance(self.val_every, int) and self.val_every >= 1, "val_every", "must be an integer >= 1")
        check(isinstance(self.early_stopping_patience, int) and self.early_stopping_patience >= 0,
              "early_stopping_patience", "must be an integer >= 0 (0 = off)")
        check(self.mode in ("max", "min"), "mode", "must be 'max' or 'min'")
        check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", "must be an integer >= 0")
        check(self.threads is None or (isinstance(self.threads, int) and not isinstance(self.threads, bool)
                                       and self.threads >= 1), "threads", "must be an integer >= 1, or null")
        check(isinstance(self.log_every, int) and self.log_every >= 1, "log_every", "must be an integer >= 1")


@dataclasses.dataclass
class FitResult:
    """What `fit` did. ``history`` has one flat record per completed epoch (resumed runs included):
    ``epoch`` (1-based), ``lr`` (at the epoch's end), ``train/<loss key>`` (mean over the epoch and
    the ranks) and, on validated epochs, ``val/<metric>``."""

    epochs_completed: int
    global_step: int
    best_metric: float | None
    best_epoch: int | None
    stopped_early: bool
    history: list[dict[str, float]]
    last_checkpoint: Path | None  # None off rank 0
    best_checkpoint: Path | None  # None without validation (or off rank 0)

    def load_best(self, model: nn.Module) -> Path:
        """Load the best validated weights into `model` (the last ones when none were validated)."""
        path = self.best_checkpoint or self.last_checkpoint
        if path is None:
            raise MedfoundError("this process wrote no checkpoint (only rank 0 does)")
        load_model_state(model, load_checkpoint(path)["model"], path)
        return path


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (all devices); optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (libraries draw from the global stream)
    torch.manual_seed(seed)
    _deterministic_kernels(deterministic)


def _deterministic_kernels(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def reproducibility(cfg: TrainerConfig | Mapping[str, Any], num_workers: int = 0) -> dict[str, Any]:
    """The settings a rerun must match to reproduce a run bit for bit, and ``deterministic``:
    False, with ``why_not``, when a setting of this run is known to break run-to-run equality.
    `num_workers`: the training loader's worker processes."""
    cfg = cfg if isinstance(cfg, TrainerConfig) else TrainerConfig.from_dict(cfg)
    _, world, local_rank = dist_info()
    if cfg.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = torch.device(cfg.device).type
    why_not = []
    if not cfg.deterministic:
        why_not.append("trainer.deterministic=false: torch may choose nondeterministic kernels")
    if device == "cuda":
        why_not.append("CUDA: some operations have no deterministic kernel; torch only warns "
                       "about them (use_deterministic_algorithms warn_only)")
    return {
        "deterministic": not why_not, "why_not": "; ".join(why_not) or None,
        "seed": cfg.seed, "torch_threads": torch.get_num_threads(),
        "threads_setting": cfg.threads, "num_workers": int(num_workers),
        "deterministic_algorithms": cfg.deterministic, "device": device, "world_size": world,
        "torch": torch.__version__,
        "same_result_needs": "the same seed, data, torch_threads, num_workers, world_size, device "
                             "and library versions",
    }


def weights_digest(model: nn.Module) -> str:
    """sha256 over a model's state (names, dtypes, shapes and bytes of its weights and buffers)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in getattr(model, "module", model).state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ByWeights:
    """`fn(model, ...)` computed once per set of weights: a recipe's final evaluation of the
    best checkpoint gets what validation already computed for those weights (its predictions
    on the validation studies), instead of predicting them again."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._results: dict[str, Any] = {}

    def __call__(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        key = weights_digest(model)
        if key not in self._results:
            self._results[key] = self.fn(model, *args, **kwargs)
        return self._results[key]


def set_threads(threads: int | None) -> int:
    """Use `threads` torch CPU threads (None: leave torch's choice); returns the count in use."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def is_main_process() -> bool:
    """True in a plain process and on torchrun's rank 0: the one that writes, logs and prints."""
    return dist_info()[0] == 0


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def distributed_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                       collate_fn: Callable | None = None, num_workers: int = 0,
                       drop_last: bool = False) -> DataLoader:
    """A DataLoader that shards `dataset` over torchrun's ranks (one shard in a plain process).

    `batch_size` is per process. The order is a function of (seed, epoch) only — `fit` calls
    ``sampler.set_epoch`` — so N processes with batch b see, step by step, exactly the samples one
    process with batch N*b sees. Worker processes are seeded from the loader's own generator:
    worker 0 continues the dataset's random transforms as `fit` seeded them for the epoch (so
    ``num_workers`` 1 gives exactly the batches of 0), worker k > 0 reseeds them from its own
    worker seed (else every worker would repeat worker 0's crops and flips).
    """
    rank, world, _ = dist_info()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=seed_worker if num_workers > 0 else None,
                      multiprocessing_context=worker_context() if num_workers > 0 else None,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def worker_context() -> multiprocessing.context.BaseContext:
    """Where data-loader workers come from: a forkserver that imported torch and MONAI once.

    A worker forked from the training process itself inherits whatever threads and native
    libraries that process holds (OpenMP, gRPC, an inference runtime a notebook or test loaded);
    fork() of such a process can crash or deadlock it. The forkserver is a clean interpreter, so
    every worker starts the same way, and its preloaded imports keep the start cheap. The dataset
    (with its random transforms as `fit` seeded them) is pickled to each worker, as fork copied it.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "monai.transforms", "medfound.data.detection"])
    return context


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy's global stream from the worker's seed (torch seeds
    python's and its own; numpy's would be a copy of the parent's, or fresh entropy under
    spawn / forkserver), and the dataset's random transforms of worker k > 0 from it too."""
    info = torch.utils.data.get_worker_info()
    np.random.seed(info.seed % 2**32)  # noqa: NPY002 (libraries draw from the global stream)
    transform = getattr(info.dataset, "transform", None)
    if worker_id > 0 and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=info.seed % 2**31)


def move_to(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor inside dicts / lists / tuples moved to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def fit(model: nn.Module, train_loader: DataLoader, train_step: TrainStep, cfg: TrainerConfig | Mapping[str, Any],
        out_dir: str | Path, *, validate: Validate | None = None, tracker: Any = None, resume: bool = False,
        start_state: Mapping[str, Any] | None = None) -> FitResult:
    """Train `model` for ``cfg.epochs`` epochs (in total, counting a resumed run's past epochs).

    `out_dir`/checkpoints/ receives last.pt and best.pt. ``resume=True`` continues from last.pt;
    `start_state` continues from a checkpoint dict already in memory (e.g. a federated round).
    `tracker` (a `medfound.train.tracking.Tracker`, or anything with ``log_metrics(dict, step)``)
    receives each epoch's record of `FitResult.history` with ``step`` = the epoch number.
    The model is moved to the training device and stays there; the trained weights are in
    `model` when `fit` returns. Raises `MedfoundError` for an empty loader, a non-finite loss,
    a missing or incompatible checkpoint, or a `monitor` that `validate` does not return.
    """
    cfg = cfg if isinstance(cfg, TrainerConfig) else TrainerConfig.from_dict(cfg)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    rank, world, local_rank = dist_info()
    distributed = world > 1
    owns_group = distributed and not dist.is_initialized()
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owns_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    tracker = tracker if is_main else None
    set_threads(cfg.threads)

    try:
        steps_per_epoch = len(train_loader)
    except TypeError:
        steps_per_epoch = 0
    if steps_per_epoch == 0:
        raise MedfoundError("the train loader yields no batches",
                            hint="check the training datalist / centers, or lower batch_size when drop_last is on")

    # --- set-up: model, optimizer, schedule, scaler ---
    model.to(device)
    use_amp = device.type == "cuda" if cfg.amp == "auto" else bool(cfg.amp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _build_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    generators = _loader_generators(train_loader)

    epoch, global_step, best_metric, best_epoch, bad_validations = 0, 0, None, None, 0
    history: list[dict[str, float]] = []
    rng_state = None
    if resume or start_state is not None:
        source = ckpt_dir / "last.pt" if start_state is None else "start_state"
        state = load_checkpoint(source) if start_state is None else dict(start_state)
        load_model_state(model, state["model"], source)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, global_step = state["epoch"], state["global_step"]
        best_metric, best_epoch, bad_validations = state["best_metric"], state["best_epoch"], state["bad_validations"]
        history = [dict(h) for h in state["history"]]
        rng_state = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
    else:
        seed_everything(cfg.seed + rank, cfg.deterministic)
    if rng_state is not None:
        _deterministic_kernels(cfg.deterministic)
        restore_rng_state(rng_state, generators)

    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else model
    sampler = getattr(train_loader, "sampler", None)
    show_bar = cfg.progress and is_main and sys.stderr.isatty()
    stopped_early = (cfg.early_stopping_patience > 0 and bad_validations >= cfg.early_stopping_patience)
    last_path = ckpt_dir / "last.pt" if is_main else None
    best_path = None

    try:
        # --- the loop ---
        while epoch < cfg.epochs and not stopped_early:
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            _reseed_transforms(train_loader, cfg.seed, rank, epoch)
            net.train()
            sums: dict[str, float] = {}
            steps = 0
            bar = tqdm(train_loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not show_bar, leave=False, dynamic_ncols=True)
            for batch in bar:
                batch = move_to(batch, device)
                with torch.autocast(device.type, enabled=use_amp):
                    losses = train_step(net, batch)
                loss = _total_loss(losses)
                _check_finite(loss, epoch, steps, global_step, optimizer, distributed)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip_norm:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                global_step += 1
                steps += 1
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach() if isinstance(value, Tensor) else value)
                if show_bar and steps % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            bar.close()
            if steps == 0:
                raise MedfoundError(f"the train loader yielded no batches in epoch {epoch + 1}",
                                    hint="check the training datalist / centers")
            epoch += 1
            record = {"epoch": float(epoch), "lr": float(optimizer.param_groups[0]["lr"])}
            record.update({f"train/{k}": v for k, v in _mean_over_ranks(sums, steps, distributed).items()})

            # --- validation, best checkpoint, early stopping ---
            improved = False
            if validate is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
                metrics = _validate_on_rank0(validate, model, is_main, distributed)
                if cfg.monitor not in metrics:
                    raise MedfoundError(f"trainer.monitor = '{cfg.monitor}' is not among the validation "
                                        f"metrics {sorted(metrics)}", hint="set trainer.monitor to one of them")
                record.update({f"val/{k}": float(v) for k, v in metrics.items()})
                value = float(metrics[cfg.monitor])
                improved = math.isfinite(value) and (
                    best_metric is None or (value > best_metric if cfg.mode == "max" else value < best_metric))
                if improved:
                    best_metric, best_epoch, bad_validations = value, epoch, 0
                else:
                    bad_validations += 1
                stopped_early = 0 < cfg.early_stopping_patience <= bad_validations
            history.append(record)

            # --- checkpoint (after validation, so the RNG state is the one the next epoch starts from) ---
            rng = [capture_rng_state(generators)]
            if distributed:
                rng = [None] * world
                dist.all_gather_object(rng, capture_rng_state(generators))
            if is_main:
                state = {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch, "global_step": global_step, "best_metric": best_metric,
                    "best_epoch": best_epoch, "bad_validations": bad_validations, "history": history,
                    "rng": rng, "config": cfg.to_dict(),
                }
                save_checkpoint(state, last_path)
                if improved:
                    best_path = save_checkpoint(state, ckpt_dir / "best.pt")
                if tracker is not None:
                    tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
                print(_summary(record, cfg), flush=True)
                if stopped_early:
                    print(f"early stopping: no improvement of {cfg.monitor} in "
                          f"{bad_validations} validations (best {best_metric:.4g} at epoch {best_epoch})", flush=True)
        if distributed:
            dist.barrier()  # leave together: rank 0 has just written the checkpoint
    finally:
        if owns_group:
            dist.destroy_process_group()

    if is_main and best_path is None and best_epoch is not None and (ckpt_dir / "best.pt").is_file():
        best_path = ckpt_dir / "best.pt"
    return FitResult(epochs_completed=epoch, global_step=global_step, best_metric=best_metric,
                     best_epoch=best_epoch, stopped_early=stopped_early, history=history,
                     last_checkpoint=last_path if is_main and last_path.is_file() else None,
                     best_checkpoint=best_path)


# --- helpers, in the order fit uses them ---

def _build_optimizer(cfg: TrainerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise MedfoundError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainerConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of cfg.lr after `step` optimizer steps: linear warm-up, then the schedule."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        if cfg.schedule == "step":
            return cfg.step_gamma ** ((step - warmup) // (cfg.step_epochs * steps_per_epoch))
        return 1.0

    return factor


def _reseed_transforms(loader: DataLoader, seed: int, rank: int, epoch: int) -> None:
    """Seed the dataset's random transforms (MONAI's draw from OS entropy unless told) from
    (seed, rank, epoch): reruns and resumed runs then crop and augment exactly alike."""
    transform = getattr(getattr(loader, "dataset", None), "transform", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=(seed * 10_007 + rank * 101 + epoch) % 2**31)


def _loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The loader's own random streams (shuffling, worker seeds), each once, in a fixed order."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                  getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def _total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    if not isinstance(losses, Mapping) or "loss" not in losses:
        raise MedfoundError("train_step must return a dict of losses with the total under 'loss'",
                            hint=f"it returned {type(losses).__name__}"
                                 f"{' with keys ' + str(sorted(losses)) if isinstance(losses, Mapping) else ''}")
    loss = losses["loss"]
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise MedfoundError("train_step's 'loss' must be a scalar tensor")
    return loss.reshape(())


def _check_finite(loss: Tensor, epoch: int, step: int, global_step: int, optimizer: torch.optim.Optimizer,
                  distributed: bool) -> None:
    finite = torch.isfinite(loss.detach()).float()
    if distributed:  # every rank must stop together, or the others hang in the next all-reduce
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        lr = optimizer.param_groups[0]["lr"]
        raise MedfoundError(f"the training loss is {float(loss.detach())} at epoch {epoch + 1}, step {step + 1} "
                            f"(global step {global_step + 1})",
                            hint=f"lower trainer.lr (now {lr:.3g}) or set trainer.grad_clip_norm, and check "
                                 "the inputs for NaN; checkpoints/last.pt holds the last good epoch")


def _mean_over_ranks(sums: dict[str, float], steps: int, distributed: bool) -> dict[str, float]:
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [float(steps)], dtype=torch.float64)
    if distributed:
        dist.all_reduce(totals)
    return {k: float(totals[i] / totals[-1]) for i, k in enumerate(keys)}


def _validate_on_rank0(validate: Validate, model: nn.Module, is_main: bool, distributed: bool) -> dict[str, float]:
    metrics: dict[str, float] | None = None
    if is_main:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in dict(validate(model)).items()}
        model.train(was_training)
    if distributed:  # every rank needs the numbers to stop early at the same epoch
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _summary(record: Mapping[str, float], cfg: TrainerConfig) -> str:
    parts = [f"epoch {int(record['epoch'])}/{cfg.epochs}"]
    parts += [f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"]
    return "  ".join(parts)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

