"""The nodule-segmentation task: what the training loop needs to train and validate a segmenter.

Loss: MONAI's DiceCELoss (softmax over `num_classes`, one-hot masks, Dice over the batch).
Validation: whole studies through MONAI's sliding window (the config's `sw_*`), argmax, then
the Dice of the nodule class per study (MONAI DiceMetric; a study without nodules does not
count), averaged over studies — every false positive in the lungs counts — and the per-nodule
Dice inside each nodule's own region (`nodule_dice`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from torch import nn
from tqdm.auto import tqdm

from medfound.models.segmentation import (
    SegmentationNet,
    SegmenterConfig,
    build_segmenter,
    freeze_encoder,
)

TASK = "nodule_segmentation"
# Dice over the whole batch (batch=True): a patch without nodule voxels does not make the Dice
# term jump between 0 and 1, which stalled training on background.
_LOSS = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)


def segmenter_config(model_cfg: Any) -> SegmenterConfig:
    return SegmenterConfig.from_dict(model_cfg)


def build(model_cfg: Any, seed: int | None = None) -> SegmentationNet:
    return build_segmenter(segmenter_config(model_cfg), seed=seed)


def init_from_encoder(network: SegmentationNet, package: str | Path, modality: str = "ct",
                      freeze: bool = False) -> int:
    """Start the encoder from a pretrained foundation encoder package (its `modality` stem and
    body stages; medfound.train.detection.load_encoder). `freeze`: only the decoder, the head
    and the adapters learn. Returns the weights loaded."""
    from medfound.train.detection import load_encoder

    n = load_encoder(network, package, modality, prefix="encoder.")
    if freeze:
        freeze_encoder(network)
    return n


def apply_finetune(network: SegmentationNet, finetune: Mapping[str, Any] | None, load: bool = True
                   ) -> str | None:
    """`finetune.{init_encoder, freeze_encoder, train_only}` on a fresh segmenter: the
    detector's `apply_finetune` with the segmenter's encoder loading and freezing."""
    from medfound.train.detection import apply_finetune as apply

    return apply(network, finetune, load, init=init_from_encoder, freeze=freeze_encoder, part="encoder")


def train_step(network: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Losses of one batch {"image", "mask"}: {"loss"} (Dice + cross-entropy)."""
    logits = network(batch["image"])
    return {"loss": _LOSS(logits, batch["mask"].long())}


def sliding_window(network: nn.Module, cfg: SegmenterConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """image (1, C, i, j, k) → logits (1, num_classes, i, j, k) over a whole study."""
    def run(image: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(image, roi_size=list(cfg.sw_roi_size), sw_batch_size=cfg.sw_batch_size,
                                        predictor=network, overlap=cfg.sw_overlap, mode=cfg.sw_mode)
    return run


def dice_per_study(predictions: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[float]:
    """Dice of the nodule class per study (label maps, any shape); NaN where the mask is empty."""
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    out = []
    for pred, mask in zip(predictions, masks, strict=True):
        p = torch.as_tensor(np.asarray(pred) > 0)[None, None].float()
        m = torch.as_tensor(np.asarray(mask) > 0)[None, None].float()
        onehot = [torch.cat([1 - t, t], dim=1) for t in (p, m)]
        out.append(float(metric(*onehot).reshape(-1)[0]))
    return out


def nodule_dice(prediction: np.ndarray, mask: np.ndarray, boxes_voxel: np.ndarray,
                 margin: float = 1.0) -> list[float]:
    """Dice of each nodule inside its own region: the nodule's box (voxel xyzxyz on the label
    maps' grid) grown by `margin` × its size on every side (a cube of 3× the diameter) — the
    per-nodule Dice of nodule-segmentation studies, blind to false positives elsewhere."""
    out = []
    for box in np.asarray(boxes_voxel, dtype=np.float64).reshape(-1, 6):
        size = box[3:] - box[:3]
        lo = np.maximum(np.floor(box[:3] - margin * size), 0).astype(int)
        hi = np.minimum(np.ceil(box[3:] + margin * size), mask.shape).astype(int)
        region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        p, m = np.asarray(prediction[region]) > 0, np.asarray(mask[region]) > 0
        if m.sum() == 0:
            continue  # the nodule is below the grid's resolution
        out.append(float(2 * np.logical_and(p, m).sum() / (p.sum() + m.sum())))
    return out


def summarize(dices: Sequence[float], seriesuids: Sequence[str],
              nodule_dices: Sequence[float] | None = None) -> dict[str, Any]:
    """{"dice" (mean over studies with nodules), "dice_std", "nodule_dice" (mean over nodules),
    "n_studies", "n_studies_with_nodules", "n_nodules", "per_study"}."""
    valid = [d for d in dices if np.isfinite(d)]
    nodules = list(nodule_dices or [])
    return {"dice": float(np.mean(valid)) if valid else float("nan"),
            "dice_std": float(np.std(valid)) if valid else float("nan"),
            "nodule_dice": float(np.mean(nodules)) if nodules else float("nan"),
            "n_studies": len(dices), "n_studies_with_nodules": len(valid), "n_nodules": len(nodules),
            "per_study": {uid: (d if np.isfinite(d) else None) for uid, d in zip(seriesuids, dices, strict=True)}}


@torch.no_grad()
def evaluate(network: nn.Module, cfg: SegmenterConfig, items: Sequence[dict[str, Any]], transform: Callable,
             progress: bool = False) -> dict[str, Any]:
    """`summarize`'s metrics of `network` on whole studies (`transform`: seg_eval_transforms):
    Dice per study over the whole volume, and per nodule inside its region (`nodule_dice`)."""
    from medfound.data.detection import world_boxes_to_voxel

    net = getattr(network, "module", network)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    run = sliding_window(net, cfg)
    preds, masks, nodules = [], [], []
    try:
        for item in tqdm(items, desc="segment", unit="study", disable=not progress):
            data = transform(dict(item))
            logits = run(data["image"].as_tensor()[None].to(device))
            preds.append(logits.argmax(1)[0].cpu().numpy())
            masks.append(data["mask"].as_tensor()[0].numpy())
            boxes = world_boxes_to_voxel(item.get("box", []), np.asarray(data["image"].affine))
            nodules += nodule_dice(preds[-1], masks[-1], boxes)
    finally:
        net.train(was_training)
    return summarize(dice_per_study(preds, masks), [it["seriesuid"] for it in items], nodules)
