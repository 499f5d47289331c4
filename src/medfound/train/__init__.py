"""medfound.train: the one training loop shared by pooled, local and federated runs (see DESIGN.md).

`fit` trains any model given a ``train_step`` and an optional ``validate``; `Tracker` records the
run in MLflow; checkpoints are plain dicts written atomically by `save_checkpoint`.
"""

from medfound.train.checkpoint import load_checkpoint, save_checkpoint
from medfound.train.loop import (
    FitResult,
    TrainerConfig,
    dist_info,
    distributed_loader,
    fit,
    is_main_process,
    move_to,
    seed_everything,
)
from medfound.train.tracking import Tracker, flatten_config

__all__ = [
    "FitResult",
    "Tracker",
    "TrainerConfig",
    "dist_info",
    "distributed_loader",
    "fit",
    "flatten_config",
    "is_main_process",
    "load_checkpoint",
    "move_to",
    "save_checkpoint",
    "seed_everything",
]
