"""A tiny regression trained by `medfound.train.fit`; run under torchrun by test_train_loop.py.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT_DIR BATCH_PER_RANK

Writes OUT_DIR/rank{r}.json (the sample indices this rank trained on, per epoch, its `fit`
history and where its checkpoint went) and OUT_DIR/weights_rank{r}.pt (its final weights).
Run without torchrun it is the single-process reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from medfound.train import dist_info, distributed_loader, fit, seed_everything

N_SAMPLES = 16
EPOCHS = 2


class Points(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(N_SAMPLES, 8, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(N_SAMPLES, generator=g)

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": i}


def main(out_dir: Path, batch_size: int) -> None:
    rank, _, _ = dist_info()
    seed_everything(0)
    model = nn.Linear(8, 1)
    loader = distributed_loader(Points(), batch_size=batch_size, shuffle=True, seed=7)
    seen: list[list[int]] = []

    def train_step(net: nn.Module, batch: dict) -> dict:
        seen.append(batch["index"].tolist())
        loss = nn.functional.mse_loss(net(batch["x"]).squeeze(-1), batch["y"])
        return {"loss": loss}

    def validate(net: nn.Module) -> dict:  # rank 0 only; fit hands the numbers to the other ranks
        data = Points()
        return {"neg_mse": -float(nn.functional.mse_loss(net(data.x).squeeze(-1), data.y))}

    result = fit(model, loader, train_step,
                 {"epochs": EPOCHS, "optimizer": "sgd", "momentum": 0.0, "lr": 0.1, "weight_decay": 0.0,
                  "warmup_epochs": 0, "schedule": "constant", "grad_clip_norm": None, "progress": False,
                  "val_every": 1, "monitor": "neg_mse"},
                 out_dir, validate=validate)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = len(loader)
    by_epoch = [sum(seen[e * steps:(e + 1) * steps], []) for e in range(EPOCHS)]
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "seen": by_epoch, "history": result.history, "last_checkpoint": None if result.last_checkpoint is None else str(result.last_checkpoint)}))
    torch.save(model.state_dict(), out_dir / f"weights_rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
