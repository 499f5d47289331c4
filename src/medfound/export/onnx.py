"""Model package → ONNX network + model card, behind a parity gate.

    export_model_package(RUN/model, EXP) writes
    EXP/model.onnx        the RetinaNet *network* only: image (B, C, i, j, k) float32 in [0, 1] →
                          cls_0..cls_L (B, A*num_classes, ...), box_0..box_L (B, A*6, ...)
    EXP/model_card.json   everything `medfound.infer` needs to rebuild the detector logic in numpy
                          (anchors, box coder, box selection, sliding window, preprocessing), plus
                          metrics, versions and the sha256 of model.onnx
    EXP/MODEL_CARD.md     the same for people
    EXP/parity.json       onnxruntime against torch on random patches

Only the network is exported because MONAI's detector logic (anchors, top-k, NMS, sliding window)
is data-dependent control flow that ONNX expresses badly and that is cheap in numpy; the split
mirrors MONAI's own network/detector split. The card's detector numbers are read from the live
MONAI `RetinaNetDetector` built for the package, not re-derived from the config, so the numpy
core reproduces what torch actually does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfound import __version__
from medfound.errors import MedfoundError
from medfound.infer.engine import CARD_FORMAT, sha256_of
from medfound.models.detection import DetectorConfig, build_detector, build_network, size_divisible
from medfound.train.package import load_weights, read_model_json

__all__ = [
    "FP32_RTOL",
    "ListOutputNetwork",
    "check_parity",
    "export_model_package",
    "output_names",
]

INPUT_NAME = "image"
FP32_RTOL = 1e-4  # the parity bound for fp32: max |onnx - torch| / max |torch| per output
_TASK_MODALITY = {"lung_nodule_detection": "CT"}


class ListOutputNetwork(nn.Module):
    """RetinaNet with a flat tuple output: (cls_0..cls_L, box_0..box_L).

    MONAI's network returns ``{"classification": [...], "box_regression": [...]}``; ONNX graphs
    have named flat outputs, so the wrapper fixes one order — the order MONAI's
    `predict_with_inferer` stitches them in (all classification levels, then all box levels).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network(image)
        return tuple(out[self.network.cls_key]) + tuple(out[self.network.box_reg_key])


def output_names(num_levels: int) -> list[str]:
    """ONNX output names for a network with `num_levels` pyramid levels, in graph order."""
    return [f"cls_{n}" for n in range(num_levels)] + [f"box_{n}" for n in range(num_levels)]


def export_model_package(model_dir: str | Path, out_dir: str | Path, opset: int | None = None,
                         dynamic: bool = True, parity_patches: int = 3, seed: int = 0,
                         rtol: float = FP32_RTOL) -> dict[str, Any]:
    """Export a model package's network to `out_dir`; return the model card (parity included).

    `dynamic`: batch and spatial axes of the ONNX input are symbolic (spatial sizes must stay
    multiples of the network's `size_divisible`, recorded in the card); otherwise the input is
    fixed to (1, C, *sw_roi_size), the shape the sliding window feeds.
    `opset`: ONNX opset, or None for the exporter's default.

    Raises `MedfoundError` when the package cannot be read or exported, and when onnxruntime's
    outputs differ from torch's by more than `rtol` (relative to each output's largest
    magnitude); then parity.json records the failure and no model.onnx is left in `out_dir`.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    meta = read_model_json(model_dir)
    try:
        cfg = DetectorConfig.from_dict(meta["model"])
    except KeyError:
        raise MedfoundError("model.json has no 'model' section", path=model_dir / "model.json",
                            hint="re-train: the package was not written by medfound") from None
    network = load_weights(model_dir, build_network(cfg)).eval()
    detector = build_detector(cfg, network).eval()
    num_levels = len(cfg.returned_layers) + 1
    names = output_names(num_levels)

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    staged = out_dir / ".model.onnx.staged"
    for stale in (onnx_path, staged, out_dir / "model.onnx.rejected"):
        stale.unlink(missing_ok=True)
    _export_network(network, cfg, staged, names, opset=opset, dynamic=dynamic)

    shapes = _parity_shapes(cfg, dynamic)
    try:
        parity = check_parity(network, staged, shapes, out_dir / "parity.json",
                              patches=parity_patches, seed=seed, rtol=rtol)
    except MedfoundError:
        # Keep the rejected file for inspection, under a name nothing will load by mistake.
        staged.replace(out_dir / "model.onnx.rejected")
        raise
    staged.replace(onnx_path)

    card = _model_card(meta, cfg, detector, onnx_path, names, dynamic, parity)
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "MODEL_CARD.md").write_text(_card_markdown(card))
    return card


def check_parity(network: nn.Module, onnx_path: str | Path, shapes: Sequence[Sequence[int]],
                 out_json: str | Path | None = None, patches: int = 3, seed: int = 0,
                 rtol: float = FP32_RTOL) -> dict[str, Any]:
    """Run torch and onnxruntime (CPU) on the same random [0, 1] patches and compare outputs.

    For each output: max abs error and relative error = max |onnx - torch| / max |torch| (an
    element-wise ratio would explode on logits near zero; scaling by the output's range is what
    a score or box offset can tolerate). Writes the report to `out_json` when given and raises
    `MedfoundError` when any relative error exceeds `rtol` or an output is not finite.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    wrapper = ListOutputNetwork(network).eval()
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for a broken graph
        raise MedfoundError(f"onnxruntime cannot load the exported graph ({err})", path=onnx_path,
                            hint="re-export; try another --opset") from None
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    worst: dict[str, dict[str, float]] = {n: {"max_abs": 0.0, "max_rel": 0.0} for n in names}
    runs = []
    for shape in shapes:
        for _ in range(patches):
            x = rng.random(tuple(shape), dtype=np.float32)
            with torch.no_grad():
                ref = [t.numpy() for t in wrapper(torch.from_numpy(x))]
            got = session.run(names, {session.get_inputs()[0].name: x})
            for name, a, b in zip(names, got, ref, strict=True):
                if a.shape != b.shape:
                    raise MedfoundError(f"ONNX output {name} has shape {a.shape}, torch {b.shape}",
                                        path=onnx_path, hint="re-export the package")
                abs_err = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
                scale = float(np.max(np.abs(b))) if b.size else 0.0
                rel_err = abs_err / max(scale, np.finfo(np.float32).tiny)
                if not (np.isfinite(a).all() and np.isfinite(abs_err)):
                    abs_err = rel_err = math.inf
                worst[name]["max_abs"] = max(worst[name]["max_abs"], abs_err)
                worst[name]["max_rel"] = max(worst[name]["max_rel"], rel_err)
        runs.append({"shape": list(shape), "patches": patches})
    max_abs = max(w["max_abs"] for w in worst.values())
    max_rel = max(w["max_rel"] for w in worst.values())
    report = {
        "passed": bool(max_rel <= rtol),
        "precision": "fp32",
        "rtol": rtol,
        "relative_error": "max |onnx - torch| / max |torch|, per output",
        "max_abs": max_abs,
        "max_rel": max_rel,
        "inputs": {"kind": "random uniform [0, 1]", "seed": seed, "runs": runs},
        "outputs": worst,
        "provider": "CPUExecutionProvider",
        "onnx_sha256": sha256_of(onnx_path),
    }
    if out_json is not None:
        Path(out_json).write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    if not report["passed"]:
        bad = max(worst, key=lambda n: worst[n]["max_rel"])
        raise MedfoundError(
            f"ONNX parity failed: output {bad} differs from torch by {worst[bad]['max_rel']:.3g} "
            f"relative (max abs {worst[bad]['max_abs']:.3g}), bound {rtol:g}",
            path=onnx_path.parent / "parity.json" if out_json is not None else onnx_path,
            hint="do not deploy this file; re-export (another --opset) or report the exporter bug")
    return report


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's per-op chatter (e.g. 'torchvision is not installed') for one export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export",
                                               "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_network(network: nn.Module, cfg: DetectorConfig, path: Path, names: list[str], *,
                    opset: int | None, dynamic: bool) -> None:
    wrapper = ListOutputNetwork(network).eval()
    example = torch.rand(1, cfg.n_input_channels, *cfg.sw_roi_size, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = None
    if dynamic:
        # Spatial sizes are symbolic multiples of size_divisible, which is what lets the exporter
        # prove the strided convolutions and the FPN's upsampling line up for every size.
        div = size_divisible(cfg)
        axes = {0: torch.export.Dim("batch", min=1, max=1024)}
        for n, (axis, d) in enumerate(zip("ijk", div, strict=True)):
            axes[2 + n] = d * torch.export.Dim(f"blocks_{axis}", min=1, max=max(2, 8192 // d))
        dynamic_shapes = {"image": axes}
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(wrapper, (example,), str(path), dynamo=True, input_names=[INPUT_NAME],
                              output_names=names, opset_version=opset, dynamic_shapes=dynamic_shapes,
                              external_data=False, optimize=True, verbose=False)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MedfoundError(f"torch.onnx.export failed ({type(err).__name__}: {first})", path=path.parent,
                            hint="try dynamic=False (medfound export --fixed-shape) or another --opset") from err
    if not path.is_file():
        raise MedfoundError("torch.onnx.export wrote no file", path=path)


def _parity_shapes(cfg: DetectorConfig, dynamic: bool) -> list[list[int]]:
    """Input shapes the gate checks: the sliding-window roi (what inference feeds) and, for a
    dynamic graph, the training patch and a batch of two as well."""
    c = cfg.n_input_channels
    shapes = [[1, c, *cfg.sw_roi_size]]
    if dynamic:
        shapes += [[1, c, *cfg.patch_size], [2, c, *cfg.sw_roi_size]]
    unique: list[list[int]] = []
    for s in shapes:
        if s not in unique:
            unique.append(s)
    return unique


def _versions(meta: dict[str, Any]) -> dict[str, Any]:
    import monai
    import onnx
    import onnxruntime
    import onnxscript

    return {"medfound": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "trained_with": meta.get("versions", {})}


def _model_card(meta: dict[str, Any], cfg: DetectorConfig, detector: Any, onnx_path: Path,
                names: list[str], dynamic: bool, parity: dict[str, Any]) -> dict[str, Any]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)

    def dims(value_info: Any) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    num_levels = len(cfg.returned_layers) + 1
    selector, inferer, anchors = detector.box_selector, detector.inferer, detector.anchor_generator
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
            "size_divisible": list(size_divisible(cfg)),
            "output_names": names,
            "output_shapes": {o.name: dims(o) for o in graph.graph.output},
            "outputs": "cls_l: (B, A*num_classes, i_l, j_l, k_l) logits, box_l: (B, A*6, i_l, j_l, "
                       "k_l) box offsets; level 0 is the finest, level l is 2**l times coarser",
        },
        "detector": {
            "num_classes": cfg.num_classes,
            "num_levels": num_levels,
            "num_anchors_per_location": len(cfg.base_anchor_shapes),
            "base_anchor_shapes": [list(map(float, s)) for s in cfg.base_anchor_shapes],
            "feature_map_scales": [2**level for level in range(num_levels)],
            "cell_anchors": [c.tolist() for c in anchors.cell_anchors],
            "anchor_indexing": anchors.indexing,
            "box_mode": "xyzxyz (i0, j0, k0, i1, j1, k1), voxels of the network input",
            "box_coder_weights": [float(w) for w in detector.box_coder.weights],
            "box_xform_clip": float(detector.box_coder.boxes_xform_clip),
            "apply_sigmoid": bool(selector.apply_sigmoid),
            "score_thresh": float(selector.score_thresh),
            "topk_candidates_per_level": int(selector.topk_candidates_per_level),
            "nms_thresh": float(selector.nms_thresh),
            "detections_per_img": int(selector.detections_per_img),
            "size_divisible": list(size_divisible(cfg)),
            "sw_roi_size": [int(s) for s in inferer.roi_size],
            "sw_overlap": float(inferer.overlap),
            "sw_mode": str(getattr(inferer.mode, "value", inferer.mode)),
            "sw_sigma_scale": float(inferer.sigma_scale),
            "sw_batch_size": int(inferer.sw_batch_size),
            "sw_padding_value": float(inferer.cval),
        },
        "metrics": meta.get("metrics", {}),
        "training": {k: provenance[k] for k in ("federated", "strategy", "rounds", "train_centers",
                                               "val_centers", "val_split", "train_cases",
                                               "val_cases", "seed") if k in provenance},
        "parity": {k: parity[k] for k in ("passed", "precision", "rtol", "max_abs", "max_rel")},
        "versions": _versions(meta),
    }


def _card_markdown(card: dict[str, Any]) -> str:
    inp, onx, det = card["input"], card["onnx"], card["detector"]
    metrics = card.get("metrics") or {}
    cpm = metrics.get("cpm")
    lines = [
        f"# Model card — {card['task']}",
        "",
        "## Input",
        f"- modality: {inp['modality']}",
        f"- spacing: {inp['spacing_mm']} mm (i, j, k), orientation {inp['orientation']}",
        f"- intensity: HU window {inp['hu_window']} — {inp['intensity']}",
        f"- training patch: {inp['patch_size']} voxels; sliding window {det['sw_roi_size']} "
        f"(overlap {det['sw_overlap']}, {det['sw_mode']} blending)",
        "",
        "## Network (model.onnx)",
        f"- input `{onx['input_name']}` {onx['input_shape']} float32; spatial sizes multiples of "
        f"{onx['size_divisible']}",
        f"- outputs {', '.join(f'`{n}`' for n in onx['output_names'])}",
        f"- opset {onx['opset']}, sha256 `{onx['sha256']}`",
        "",
        "## Detector logic (medfound.infer, numpy)",
        f"- anchors: base shapes {det['base_anchor_shapes']} × scales {det['feature_map_scales']}",
        f"- box coder weights {det['box_coder_weights']}, clip {det['box_xform_clip']:.4f}",
        f"- per level: score > {det['score_thresh']}, top {det['topk_candidates_per_level']}; "
        f"NMS IoU {det['nms_thresh']}; at most {det['detections_per_img']} detections",
        "",
        "## Evaluation",
        f"- CPM: {cpm if cpm is not None else 'not recorded'}",
        *[f"- FROC {k} FP/scan: {v}" for k, v in (metrics.get("froc") or {}).items()],
        "",
        "## Training data",
        *([f"- {k}: {v}" for k, v in card["training"].items()] or ["- not recorded"]),
        "",
        "## Parity (onnxruntime vs torch, fp32)",
        f"- passed: {card['parity']['passed']} — max relative error {card['parity']['max_rel']:.3g} "
        f"(bound {card['parity']['rtol']:g}), max abs {card['parity']['max_abs']:.3g}",
        "",
        "## Versions",
        *[f"- {k}: {v}" for k, v in card["versions"].items() if k != "trained_with"],
        "",
    ]
    return "\n".join(lines)
