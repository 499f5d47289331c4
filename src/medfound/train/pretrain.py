"""Self-supervised pretraining task: what pooled and federated pretraining plug into the loop.

Two losses on two views (two random crops of one volume, see medfound.data.pretrain):

- masked-volume reconstruction: blocks of ``mask_block`` voxels are hidden (set to 0) with
  probability ``mask_ratio``, independently in each view; the L1 error on the hidden voxels
  only is the loss (the model has to infer them from context, as in SimMIM / MAE);
- contrastive (InfoNCE, as in SimCLR): the two views' projected embeddings are a positive
  pair and every other volume in the batch a negative, at ``temperature``; symmetric.

``loss = recon_weight × reconstruction + contrastive_weight × InfoNCE``. The masks come from
torch's global RNG, which the loop seeds and checkpoints, so a resumed run masks as the
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medfound.errors import MedfoundError
from medfound.models.foundation import FoundationConfig, FoundationPretrainer

__all__ = ["LOSS_DEFAULTS", "build", "embed", "evaluate", "info_nce", "loss_params", "random_block_mask",
           "train_step"]

LOSS_DEFAULTS = {"mask_ratio": 0.6, "mask_block": [4, 4, 4], "recon_weight": 1.0,
                 "contrastive_weight": 0.1, "temperature": 0.2}


def loss_params(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The loss keys (``task.loss`` in configs/task/pretrain.yaml), defaults filled, checked."""
    p = {**LOSS_DEFAULTS, **dict(cfg or {})}
    unknown = sorted(set(p) - set(LOSS_DEFAULTS))
    if unknown:
        raise MedfoundError(f"task.loss: unknown key(s) {unknown}", hint=f"valid keys are {sorted(LOSS_DEFAULTS)}")
    if not 0.0 < float(p["mask_ratio"]) < 1.0:
        raise MedfoundError(f"config key 'task.loss.mask_ratio' = {p['mask_ratio']}: must be in (0, 1)")
    if len(p["mask_block"]) != 3 or min(p["mask_block"]) < 1:
        raise MedfoundError(f"config key 'task.loss.mask_block' = {list(p['mask_block'])}: "
                            "must be 3 positive integers (i, j, k)")
    if float(p["temperature"]) <= 0:
        raise MedfoundError("config key 'task.loss.temperature' must be > 0")
    if float(p["recon_weight"]) < 0 or float(p["contrastive_weight"]) < 0 or \
            float(p["recon_weight"]) + float(p["contrastive_weight"]) == 0:
        raise MedfoundError("config keys 'task.loss.recon_weight' and 'contrastive_weight' must be "
                            ">= 0 and not both 0")
    p["mask_block"] = [int(b) for b in p["mask_block"]]
    return p


def build(encoder_cfg: Mapping[str, Any], seed: int | None = None) -> FoundationPretrainer:
    return FoundationPretrainer(FoundationConfig.from_dict(encoder_cfg), seed=seed)


def random_block_mask(shape: Sequence[int], block: Sequence[int], ratio: float,
                      generator: torch.Generator | None = None, device: Any = None) -> Tensor:
    """(B, 1, i, j, k) bool mask, True = hidden: each block of `block` voxels hidden with
    probability `ratio` (at least one block per sample hidden)."""
    b, _, *spatial = shape
    cells = [-(-s // c) for s, c in zip(spatial, block, strict=True)]
    coarse = torch.rand((b, 1, *cells), generator=generator) < ratio
    empty = ~coarse.flatten(1).any(dim=1)
    if empty.any():  # never a sample with nothing to reconstruct
        coarse.view(b, -1)[empty, 0] = True
    mask = coarse
    for axis, c in enumerate(block):
        mask = mask.repeat_interleave(c, dim=2 + axis)
    return mask[:, :, : spatial[0], : spatial[1], : spatial[2]].to(device)


def info_nce(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE of paired embeddings (row n of z1 ↔ row n of z2) and the share of rows
    whose partner is their nearest neighbour (retrieval accuracy)."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = z1 @ z2.t() / temperature
    target = torch.arange(z1.shape[0], device=z1.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    accuracy = (logits.argmax(dim=1) == target).float().mean()
    return loss, accuracy


def _losses(model, batch: Mapping[str, Any], p: Mapping[str, Any],
            generator: torch.Generator | None = None) -> dict[str, Tensor]:
    mods = batch["modality"]
    recon, z = [], []
    for key in ("view1", "view2"):
        x = batch[key]
        mask = random_block_mask(x.shape, p["mask_block"], float(p["mask_ratio"]), generator, x.device)
        out, emb = model(x.masked_fill(mask, 0.0), mods)
        recon.append((out - x).abs()[mask].mean())
        z.append(emb)
    rec = 0.5 * (recon[0] + recon[1])
    if z[0].shape[0] > 1:
        nce, acc = info_nce(z[0], z[1], float(p["temperature"]))
    else:  # one volume: no negatives, no contrastive signal
        nce, acc = rec.new_zeros(()), rec.new_ones(())
    loss = float(p["recon_weight"]) * rec + float(p["contrastive_weight"]) * nce
    return {"loss": loss, "reconstruction": rec.detach(), "contrastive": nce.detach(),
            "contrastive_accuracy": acc.detach()}


def train_step(model, batch: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Tensor]:
    """Losses for one batch of view pairs: {"loss", "reconstruction", "contrastive", ...}."""
    return _losses(model, batch, params)


@torch.no_grad()
def evaluate(model, loader, params: Mapping[str, Any], seed: int = 0) -> dict[str, float]:
    """Mean validation losses over `loader` (masks drawn from `seed`: the same every call)."""
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    n = 0
    try:
        for batch in loader:
            batch = {**batch, "view1": batch["view1"].to(device), "view2": batch["view2"].to(device)}
            for key, value in _losses(model, batch, params, generator=gen).items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(batch["modality"])
            n += len(batch["modality"])
    finally:
        model.train(was_training)
    if n == 0:
        return {}
    return {key: value / n for key, value in sums.items()}


@torch.no_grad()
def embed(model, loader) -> tuple[Tensor, list[str], list[str]]:
    """(N, C) pooled deepest encoder features of every volume in `loader`, with modality and
    center names (for embedding plots)."""
    model = getattr(model, "module", model)
    encoder = getattr(model, "encoder", model)
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats, mods, centers = [], [], []
    try:
        for batch in loader:
            f = encoder(batch["view1"].to(device), batch["modality"])[-1]
            feats.append(f.mean(dim=(2, 3, 4)).cpu())
            mods += list(batch["modality"])
            centers += list(batch["center"])
    finally:
        encoder.train(was_training)
    return torch.cat(feats), mods, centers
