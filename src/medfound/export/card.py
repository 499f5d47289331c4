"""The model card every export writes: model_card.json (what `medfound.infer` rebuilds the
model from, with metrics, parity, validation and versions) and MODEL_CARD.md (the same for
people). `card_common` fills the sections every task shares; each task's exporter adds its own
(``detector`` or ``segmentation``) and `card_markdown` renders either."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medfound import __version__
from medfound.infer.engine import CARD_FORMAT
from medfound.outputs import atomic_write, write_json

_TASK_MODALITY = {"lung_nodule_detection": "CT"}


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data, allow_nan=True)


def write_card(out_dir: Path, card: dict[str, Any]) -> None:
    """model_card.json and MODEL_CARD.md in `out_dir`."""
    atomic_write(out_dir / "MODEL_CARD.md", card_markdown(card))
    _write_json(out_dir / "model_card.json", card)  # last: a card means the export is whole


def card_common(meta: dict[str, Any], cfg: Any, onnx_path: Path, names: list[str], dynamic: bool,
                parity: dict[str, Any], divisible: Sequence[int], outputs: str) -> dict[str, Any]:
    """The model card's sections every task shares: input, onnx, metrics, training, parity,
    versions. `cfg`: the network config (n_input_channels, spacing_mm, hu_window, patch_size)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)

    def dims(value_info: Any) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    preprocessing = dict(meta.get("preprocessing", {}))
    provenance = meta.get("provenance", {})
    return {
        "format": CARD_FORMAT,
        "task": meta.get("task"),
        "input": {
            "modality": preprocessing.get("modality", _TASK_MODALITY.get(meta.get("task"), "unknown")),
            "spacing_mm": list(preprocessing.get("spacing_mm", cfg.spacing_mm)),
            "hu_window": list(preprocessing.get("hu_window", cfg.hu_window)),
            "orientation": preprocessing.get("orientation", "LPS"),
            "intensity": preprocessing.get("intensity", "clip to hu_window, scale to [0, 1]"),
            "axes": "(batch, channel, i, j, k); i, j, k = column, row, slice at spacing_mm",
            "patch_size": list(cfg.patch_size),
            "channels": cfg.n_input_channels,
        },
        "onnx": {
            "file": onnx_path.name,
            "sha256": parity["onnx_sha256"],  # hashed by the gate; the file was only renamed
            "opset": opset,
            "input_name": graph.graph.input[0].name,
            "input_shape": dims(graph.graph.input[0]),
            "dynamic": dynamic,
            "size_divisible": list(divisible),
            "output_names": names,
            "output_shapes": {o.name: dims(o) for o in graph.graph.output},
            "outputs": outputs,
        },
        "metrics": meta.get("metrics", {}),
        "training": {k: provenance[k] for k in ("federated", "strategy", "rounds", "train_centers",
                                               "val_centers", "val_split", "train_cases",
                                               "val_cases", "seed", "init_encoder", "freeze_encoder")
                     if k in provenance},
        "parity": {k: parity[k] for k in ("passed", "precision", "rtol", "max_abs", "max_rel")},
        "versions": _versions(meta),
    }


def _versions(meta: dict[str, Any]) -> dict[str, Any]:
    import monai
    import onnx
    import onnxruntime
    import onnxscript

    return {"medfound": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "trained_with": meta.get("versions", {})}


def card_markdown(card: dict[str, Any]) -> str:
    """MODEL_CARD.md: the model card for people (any task)."""
    inp, onx = card["input"], card["onnx"]
    sw = card.get("detector") or card["segmentation"]  # both carry the sliding window
    lines = [
        f"# Model card — {card['task']}",
        "",
        *_use_lines(card),
        "## Input",
        f"- modality: {inp['modality']}",
        f"- spacing: {inp['spacing_mm']} mm (i, j, k), orientation {inp['orientation']}",
        f"- intensity: HU window {inp['hu_window']} — {inp['intensity']}",
        f"- training patch: {inp['patch_size']} voxels; sliding window {sw['sw_roi_size']} "
        f"(overlap {sw['sw_overlap']}, {sw['sw_mode']} blending)",
        "",
        "## Network (model.onnx)",
        f"- input `{onx['input_name']}` {onx['input_shape']} float32; spatial sizes multiples of "
        f"{onx['size_divisible']}",
        f"- outputs {', '.join(f'`{n}`' for n in onx['output_names'])}",
        f"- opset {onx['opset']}, sha256 `{onx['sha256']}`",
        "",
        *_task_lines(card),
        "",
        "## Training data",
        *([f"- {k}: {v}" for k, v in card["training"].items()] or ["- not recorded"]),
        "",
        "## Parity (onnxruntime vs torch, fp32)",
        f"- passed: {card['parity']['passed']} — max relative error {card['parity']['max_rel']:.3g} "
        f"(bound {card['parity']['rtol']:g}), max abs {card['parity']['max_abs']:.3g}",
        *_quality_lines(card),
        "",
        "## Versions",
        *[f"- {k}: {v}" for k, v in card["versions"].items() if k != "trained_with"],
        "",
    ]
    return "\n".join(lines)


def _use_lines(card: dict[str, Any]) -> list[str]:
    """Intended use, limitations and the validation set with its CPM, at the top of the card."""
    v = card.get("validation")
    if not v:
        return []
    ci = v.get("cpm_ci95")
    cpm = "not recorded" if v.get("cpm") is None else (
        f"{v['cpm']:.3f}" + (f" (95% CI {ci[0]:.2f}–{ci[1]:.2f})" if ci else ""))
    points = ", ".join(f"{k} FP/scan: {float(x):.2f}" for k, x in (v.get("froc") or {}).items())
    if "cpm" not in v:  # a task gated by another figure (the segmenter's Dice)
        return ["## Validation", f"- status: **{v['status']}** — {v['reason']}",
                f"- centers {v.get('centers') or 'none'}", ""]
    return ["## Intended use", card.get("intended_use", ""), "",
            "## Limitations", *[f"- {x}" for x in card.get("limitations", [])], "",
            "## Validation", f"- status: **{v['status']}** — {v['reason']}",
            f"- set: centers {v['centers'] or 'none'} ({v.get('split') or 'n/a'} split), "
            f"{v.get('n_scans')} scans, {v.get('n_nodules')} nodules; {v['source']}",
            f"- CPM: {cpm}",
            *([f"- sensitivity at {points}"] if points else []),
            *(["- the checkpoint was chosen on these validation centers: the figure is optimistic"]
              if v.get("checkpoint_selected_on_validation") else []), ""]


def _task_lines(card: dict[str, Any]) -> list[str]:
    """The card's task-specific part: the detector's numpy logic, or the segmenter's labels."""
    metrics = card.get("metrics") or {}
    if "segmentation" in card:
        seg = card["segmentation"]
        return ["## Segmentation (medfound.infer.segment, numpy)",
                f"- argmax of the logits; labels {seg['labels']}", "",
                "## Evaluation",
                f"- Dice (nodule, mean over validation studies with nodules): {metrics.get('dice', 'not recorded')}"]
    det = card["detector"]
    cpm = metrics.get("cpm")
    return ["## Detector logic (medfound.infer, numpy)",
            f"- anchors: base shapes {det['base_anchor_shapes']} × scales {det['feature_map_scales']}",
            f"- box coder weights {det['box_coder_weights']}, clip {det['box_xform_clip']:.4f}",
            f"- per level: score > {det['score_thresh']}, top {det['topk_candidates_per_level']}; "
            f"NMS IoU {det['nms_thresh']}; at most {det['detections_per_img']} detections", "",
            "## Evaluation",
            f"- CPM: {cpm if cpm is not None else 'not recorded'}",
            *[f"- FROC {k} FP/scan: {v}" for k, v in (metrics.get("froc") or {}).items()]]


def _quality_lines(card: dict[str, Any]) -> list[str]:
    lines = []
    q = card["parity"].get("cpm")
    if q:
        lines.append(f"- CPM on {q['n_scans']} validation scans: torch {q['cpm_torch']:.4f}, deployed "
                     f"ONNX path {q['cpm_onnx']:.4f} (bound |diff| ≤ {q['tolerance']})")
    q = card["parity"].get("dice")
    if q:
        lines.append(f"- Dice on {q['n_studies']} validation studies: torch {q['dice_torch']:.4f}, deployed "
                     f"path {q['dice_onnx']:.4f} (bound |diff| ≤ {q['tolerance']}); labels agree on "
                     f"{100 * q['label_agreement']:.4f}% of voxels")
    for v in card.get("variants") or []:
        if "cpm" not in v:
            lines.append(f"- variant {v['engine']} {v['precision']}: FAILED — {v['reason']}")
            continue
        a = v["agreement"]
        lines.append(f"- variant {v['engine']} {v['precision']} ({v['file']}): CPM {v['cpm']:.4f}, "
                     f"ΔCPM {v['delta']:+.4f} vs torch fp32 (bound {v['max_cpm_diff']}): "
                     f"{'passed' if v['passed'] else 'FAILED, never used'}; nodules hit "
                     f"{a['n_hit']} vs {a['n_hit_torch']} (same: {a['same_nodules_hit']}), "
                     f"probabilities within {a['max_probability_diff']:.3g}; "
                     f"{v['seconds_per_window']:.3g} s per window on {v['cpu']['cpu']}")
    d = card.get("int8")
    if d and "accepted" in d:
        lines.append(f"- INT8 ({d['file']}): CPM {d['cpm_int8']:.4f}, drop {d['cpm_drop']:.4f} "
                     f"(bound {d['max_cpm_drop']}): {'accepted' if d['accepted'] else 'REJECTED'}")
    return lines
