"""`OnnxDetector`: an exported network (model.onnx) + its model card → boxes, scores, labels.

onnxruntime runs the network; everything around it (padding, sliding window, anchors, box
decoding, selection) is numpy, so this runs where torch and MONAI are not installed. Given the
same preprocessed volume it returns what MONAI's ``RetinaNetDetector(..., use_inferer=True)``
returns for the same weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfound.errors import MedfoundError, read_json
from medfound.infer.boxes import (
    cell_anchors,
    decode_boxes,
    grid_anchors,
    reshape_head_output,
    select_boxes,
)
from medfound.infer.sliding_window import sliding_window

__all__ = ["CARD_FORMAT", "PROVIDER_PREFERENCE", "OnnxDetector", "choose_providers",
           "load_model_card", "sha256_of"]

CARD_FORMAT = "medfound-onnx/1"  # written by medfound.export.onnx, read here
# Fastest first; onnxruntime falls back along the list for operators a provider lacks.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (ONNX files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model_card(path: str | Path, precision: str = "fp32") -> tuple[Path, dict[str, Any]]:
    """(ONNX file, model card) from an export folder or a model file beside its card.

    precision: "fp32" (model.onnx, the card's `onnx` section) or "int8" (model.int8.onnx, the
    card's `int8` section, written by `medfound export --int8` only when its CPM was accepted).
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    card_path = folder / "model_card.json"
    if not card_path.is_file():
        raise MedfoundError("no model_card.json beside the ONNX model", path=folder,
                            hint="pass the folder written by `medfound export` (model.onnx + model_card.json)")
    card = read_json(card_path)
    if card.get("format") != CARD_FORMAT:
        raise MedfoundError(f"unknown model card format {card.get('format')!r}", path=card_path,
                            hint=f"re-export with this medfound version (expects {CARD_FORMAT})")
    if precision not in ("fp32", "int8"):
        raise MedfoundError(f"unknown precision {precision!r}", hint="use fp32 or int8")
    section = card.get("onnx" if precision == "fp32" else "int8")
    if precision == "int8" and (not section or section.get("accepted") is False):
        raise MedfoundError("this export has no accepted INT8 model", path=card_path,
                            hint="re-export with --int8 (it is kept only when the CPM drop is small)")
    onnx_path = path if path.is_file() else folder / section.get("file", "model.onnx")
    if not onnx_path.is_file():
        raise MedfoundError("ONNX model file missing", path=onnx_path,
                            hint="re-export: a failed parity gate leaves no model file")
    return onnx_path, card


def open_session(onnx_path: Path, sha256: str | None, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, trt_cache: str | Path | None = None, fp16: bool = False):
    """(onnxruntime InferenceSession, providers used) for an exported model; with `sha256`, the
    file must hash to it (the card's record), else a clear error."""
    import onnxruntime as ort

    if sha256 and sha256_of(onnx_path) != sha256:
        raise MedfoundError(f"{Path(onnx_path).name} does not match the sha256 in model_card.json",
                            path=onnx_path, hint="the file was changed after export; re-export the model")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    chosen = choose_providers(providers)
    provider_options = [_provider_options(p, trt_cache, fp16) for p in chosen]
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=chosen,
                                       provider_options=provider_options)
    except Exception as err:  # onnxruntime raises its own exception types for a bad file
        raise MedfoundError(f"onnxruntime cannot load the model ({err})", path=onnx_path,
                            hint="re-export it with `medfound export`") from None
    return session, chosen


def choose_providers(requested: Sequence[str] | str | None = None) -> list[str]:
    """Execution providers to use: `requested` (all must be available) or, by default, the
    available ones among TensorRT, CUDA, CPU in that order."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        chosen = [p for p in PROVIDER_PREFERENCE if p in available]
        return chosen or list(available)
    requested = [requested] if isinstance(requested, str) else list(requested)
    short = {p.removesuffix("ExecutionProvider").lower(): p for p in available}
    resolved = [short.get(p.lower(), p) for p in requested]
    missing = [p for p in resolved if p not in available]
    if missing:
        raise MedfoundError(f"execution provider(s) {missing} not available in this onnxruntime",
                            hint=f"available: {available} (install onnxruntime-gpu for CUDA/TensorRT)")
    return resolved


class OnnxDetector:
    """Nodule detector from an export folder (or model.onnx beside its model_card.json).

    `providers`: onnxruntime execution providers ("cpu", "cuda", "tensorrt" or full names);
    default: the best available. `threads`: onnxruntime intra-op threads (None: its default).
    `verify_sha256`: refuse a model.onnx whose hash differs from the card's (a file swapped or
    corrupted after export). `precision`: "fp32" (model.onnx) or "int8" (model.int8.onnx).
    TensorRT options: `trt_cache` (a folder: built engines are kept there and reused by the
    next process, which skips minutes of engine building) and `fp16` (let TensorRT run fp16
    kernels). `io_binding`: bind inputs and outputs with onnxruntime's IOBinding (default: on
    when the first provider is CUDA or TensorRT, so the window is copied to the GPU once and the
    head outputs come back in one copy, without onnxruntime's per-run staging).
    """

    def __init__(self, model: str | Path, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, verify_sha256: bool = True, precision: str = "fp32",
                 trt_cache: str | Path | None = None, fp16: bool = False,
                 io_binding: bool | None = None):
        self.onnx_path, self.card = load_model_card(model, precision)
        if "detector" not in self.card:
            raise MedfoundError(f"this export is a {self.card.get('task')!r} model, not a detector",
                                path=self.onnx_path.parent,
                                hint="load a segmentation export with medfound.infer.segment.OnnxSegmenter")
        self.precision = precision
        self.sha256 = self.card["onnx" if precision == "fp32" else "int8"]["sha256"]
        det = self.card["detector"]
        self.detector = det
        self.output_names = list(self.card["onnx"]["output_names"])
        self.num_levels = int(det["num_levels"])
        self.num_anchors = int(det["num_anchors_per_location"])
        self.cells = cell_anchors(det["base_anchor_shapes"], det["feature_map_scales"])
        self.session, self.providers = open_session(self.onnx_path, self.sha256 if verify_sha256 else None,
                                                    providers, threads, trt_cache, fp16)
        self.input_name = self.session.get_inputs()[0].name
        batch_dim = self.session.get_inputs()[0].shape[0]
        # A graph exported with a fixed batch of 1 cannot take sw_batch_size windows at once.
        self.sw_batch_size = int(det["sw_batch_size"]) if not isinstance(batch_dim, int) else batch_dim
        gpu = self.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        self.io_binding = gpu if io_binding is None else bool(io_binding)
        self._device = "cuda" if gpu else "cpu"

    def network(self, batch: np.ndarray) -> list[np.ndarray]:
        """The exported network on a (n, C, i, j, k) float32 batch: cls_0..cls_L, box_0..box_L."""
        batch = np.ascontiguousarray(batch, np.float32)
        if not self.io_binding:
            return self.session.run(self.output_names, {self.input_name: batch})
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name,
                                    ort.OrtValue.ortvalue_from_numpy(batch, self._device, 0))
        for name in self.output_names:  # allocated by onnxruntime on the provider's device
            binding.bind_output(name, self._device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def head_outputs(self, volume: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        """Sliding-window head outputs on `volume` padded at the end to `size_divisible`.

        Returns (outputs in output_names order, padded spatial size) — MONAI's
        `preprocess_images` + `predict_with_inferer`.
        """
        det = self.detector
        image = _as_batch(volume, int(self.card["input"].get("channels", 1)))
        size = list(image.shape[2:])
        padded = [int(np.ceil(s / d) * d) for s, d in zip(size, det["size_divisible"], strict=True)]
        if padded != size:
            image = np.pad(image, [(0, 0), (0, 0), *[(0, p - s) for p, s in zip(padded, size, strict=True)]])
        outs = sliding_window(image, self.network, det["sw_roi_size"], det["sw_overlap"],
                              mode=det["sw_mode"], sigma_scale=det.get("sw_sigma_scale", 0.125),
                              batch_size=self.sw_batch_size, pad_value=det.get("sw_padding_value", 0.0))
        return outs, padded

    def predict(self, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detections on one preprocessed volume.

        `volume`: (i, j, k) or (C, i, j, k) float, already resampled to the card's spacing_mm and
        scaled to [0, 1] (see `medfound.infer.preprocess`). Returns boxes (N, 6) float32 xyzxyz
        in voxels of `volume` (voxel n covers [n, n + 1)), scores (N,) float32 in [0, 1] and
        labels (N,) int64, highest score first.
        """
        outs, padded = self.head_outputs(volume)
        return self.postprocess(outs, padded, list(np.shape(volume)[-3:]))

    def postprocess(self, outs: Sequence[np.ndarray], padded: Sequence[int], size: Sequence[int]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`head_outputs` → boxes, scores, labels: anchors, box decoding, per-level top-k,
        score threshold and NMS (MONAI's `postprocess_detections`). `size`: the unpadded
        volume's (i, j, k), to which boxes are clipped."""
        det = self.detector
        cls_maps, box_maps = outs[: self.num_levels], outs[self.num_levels:]
        grids = [m.shape[2:] for m in cls_maps]
        anchors = grid_anchors(self.cells, grids, padded)
        boxes, logits = [], []
        for cls_map, box_map, level_anchors in zip(cls_maps, box_maps, anchors, strict=True):
            rel = reshape_head_output(box_map, self.num_anchors)[0]
            boxes.append(decode_boxes(rel, level_anchors, det["box_coder_weights"], det["box_xform_clip"]))
            logits.append(reshape_head_output(cls_map, self.num_anchors)[0])
        return select_boxes(boxes, logits, list(size), score_thresh=det["score_thresh"],
                            topk_candidates_per_level=det["topk_candidates_per_level"],
                            nms_thresh=det["nms_thresh"], detections_per_img=det["detections_per_img"],
                            apply_sigmoid=det.get("apply_sigmoid", True))


def _provider_options(provider: str, trt_cache: str | Path | None, fp16: bool) -> dict[str, Any]:
    if provider != "TensorrtExecutionProvider":
        return {}
    opts: dict[str, Any] = {"trt_fp16_enable": bool(fp16)}
    if trt_cache is not None:
        Path(trt_cache).mkdir(parents=True, exist_ok=True)
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache),
                    trt_timing_cache_enable=True, trt_timing_cache_path=str(trt_cache))
    return opts


def _as_batch(volume: np.ndarray, channels: int) -> np.ndarray:
    arr = np.asarray(volume, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] != channels:
        raise MedfoundError(f"volume must be (i, j, k) or ({channels}, i, j, k), got shape {arr.shape}",
                            hint="pass one preprocessed volume (see medfound.infer.preprocess)")
    return arr[None]
