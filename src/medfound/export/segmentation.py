"""Export of a segmentation package (task ``nodule_segmentation``): the shared gate (export.gate),
then the segmenter's own: Dice of the deployed path against torch.

    EXP/model.onnx        image (B, C, i, j, k) float32 in [0, 1] → logits (B, num_classes, i, j, k)
    EXP/model_card.json   input, onnx, segmentation (labels, sliding window), metrics, parity
    EXP/MODEL_CARD.md     the same for people
    EXP/parity.json       onnxruntime vs torch on random patches; with a data root also on the
                          package's validation studies: the deployed path (medfound.infer.segment,
                          numpy sliding window) against torch (MONAI sliding window), logits and
                          Dice, the Dice difference bounded by DICE_TOL

`medfound.export.onnx.export_model_package` dispatches here on the package's task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfound.export.card import card_common, write_card
from medfound.export.gate import export_and_gate, network_config, record_quality_gate
from medfound.models.segmentation import (
    LABELS,
    SegmenterConfig,
    build_segmenter,
    segmenter_size_divisible,
)
from medfound.train.package import load_weights

DICE_TOL = 0.005  # |Dice(onnx) - Dice(torch)| allowed on the validation studies
_SIGMA_SCALE = 0.125  # MONAI's sliding-window Gaussian default, used by both paths


def export_segmenter_package(meta: dict[str, Any], model_dir: Path, out_dir: Path, *, opset: int | None,
                             dynamic: bool, parity_patches: int, seed: int, rtol: float,
                             data_root: str | Path | None) -> dict[str, Any]:
    """Export, gate and card a segmentation package (arguments as `export_model_package`)."""
    cfg = network_config(meta, model_dir, SegmenterConfig)
    network = load_weights(model_dir, build_segmenter(cfg)).eval()
    names = ["logits"]
    onnx_path = out_dir / "model.onnx"
    staged, parity = export_and_gate(network, cfg, segmenter_size_divisible(cfg), out_dir, names, opset=opset,
                                     dynamic=dynamic, parity_patches=parity_patches, seed=seed, rtol=rtol)
    staged.replace(onnx_path)
    card = card_common(meta, cfg, onnx_path, names, dynamic, parity, segmenter_size_divisible(cfg),
                       "logits: (B, num_classes, i, j, k) on the input grid; argmax → label map")
    card["segmentation"] = {
        "num_classes": cfg.num_classes,
        "labels": {str(k): v for k, v in LABELS.items()},
        "sw_roi_size": list(cfg.sw_roi_size),
        "sw_overlap": float(cfg.sw_overlap),
        "sw_mode": cfg.sw_mode,
        "sw_sigma_scale": _SIGMA_SCALE,
        "sw_batch_size": int(cfg.sw_batch_size),
    }
    card["validation"] = {"status": "not validated", "centers": list(meta.get("provenance", {}).get("val_centers") or []),
                          "reason": "medfound sets no validation bar for the segmenter (Dice is reported, not gated)",
                          "dice": (meta.get("metrics") or {}).get("dice")}
    write_card(out_dir, card)
    if data_root is None:
        return card
    quality = _dice_parity(meta, cfg, network, out_dir, data_root)
    record_quality_gate(out_dir, parity, card, "dice", quality,
                        f"Dice parity failed: onnx {quality['dice_onnx']:.4f} vs torch "
                        f"{quality['dice_torch']:.4f} (bound {DICE_TOL})",
                        hint="do not deploy; compare the card's sliding-window settings")
    return card


def _dice_parity(meta: dict[str, Any], cfg: SegmenterConfig, network: torch.nn.Module, out_dir: Path,
                 data_root: str | Path) -> dict[str, Any]:
    """Torch (MONAI sliding window) and the deployed path (onnxruntime + numpy sliding window) on
    the package's validation studies, preprocessed once: logits error and Dice of each."""
    from medfound.data.segmentation import check_masks, seg_eval_transforms
    from medfound.export.quality import validation_items
    from medfound.infer.segment import OnnxSegmenter
    from medfound.train.segmentation import dice_per_study, sliding_window, summarize

    items = check_masks(validation_items(meta, data_root), data_root)
    transform = seg_eval_transforms({**cfg.to_dict(), **meta.get("preprocessing", {})})
    deployed = OnnxSegmenter(out_dir, providers="cpu")
    run = sliding_window(network, cfg)
    torch_pred, onnx_pred, masks, max_abs, max_rel = [], [], [], 0.0, 0.0
    for item in items:
        data = transform(dict(item))
        image = data["image"].as_tensor()[None]
        with torch.no_grad():
            ref = run(image)[0].numpy()
        got = deployed.logits(image[0].numpy())
        err = float(np.max(np.abs(got.astype(np.float64) - ref)))
        max_abs, max_rel = max(max_abs, err), max(max_rel, err / max(float(np.max(np.abs(ref))), 1e-30))
        torch_pred.append(ref.argmax(0))
        onnx_pred.append(got.argmax(0))
        masks.append(data["mask"].as_tensor()[0].numpy())
    uids = [it["seriesuid"] for it in items]
    d_torch = summarize(dice_per_study(torch_pred, masks), uids)["dice"]
    d_onnx = summarize(dice_per_study(onnx_pred, masks), uids)["dice"]
    diff = abs(d_onnx - d_torch) if np.isfinite(d_onnx) and np.isfinite(d_torch) else (
        0.0 if np.isnan(d_onnx) and np.isnan(d_torch) else float("inf"))
    agree = float(np.mean([np.mean(a == b) for a, b in zip(torch_pred, onnx_pred, strict=True)]))
    return {"passed": bool(diff <= DICE_TOL), "dice_torch": d_torch, "dice_onnx": d_onnx,
            "dice_abs_diff": diff, "tolerance": DICE_TOL, "label_agreement": agree,
            "logits_max_abs": max_abs, "logits_max_rel": max_rel, "n_studies": len(items),
            "studies": uids}
