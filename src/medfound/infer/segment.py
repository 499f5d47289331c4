"""Segmentation with an exported segmenter: onnxruntime or OpenVINO + numpy, no torch.

`OnnxSegmenter(EXP)` loads model.onnx + model_card.json written by `medfound export` for a
``nodule_segmentation`` package. `logits(volume)` runs the network over the whole (preprocessed)
volume with the same sliding window as MONAI's `sliding_window_inference`
(medfound.infer.sliding_window: window positions, Gaussian or constant blending), `segment`
takes the argmax: a uint8 label map (0 background, 1 nodule) on the volume's grid.
Preprocessing (canonical axes, resampling to the card's spacing, HU window) is the detector's:
medfound.infer.preprocess.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medfound.errors import MedfoundError
from medfound.infer.engine import choose_variant, load_model_card, open_engine
from medfound.infer.sliding_window import sliding_window

__all__ = ["OnnxSegmenter"]


class OnnxSegmenter:
    """An exported segmenter. `providers`/`threads`/`engine` as for `OnnxDetector` (fp32 only)."""

    def __init__(self, model: str | Path, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, verify_sha256: bool = True,
                 engine: str = "onnxruntime", precision: str = "fp32"):
        self.onnx_path, self.card = load_model_card(model)
        if "segmentation" not in self.card:
            raise MedfoundError(f"this export is a {self.card.get('task')!r} model, not a segmenter",
                                path=self.onnx_path.parent,
                                hint="load a detector export with medfound.infer.engine.OnnxDetector")
        self.seg = self.card["segmentation"]
        self.choice = choose_variant(self.card, engine, precision, providers=providers)
        self.precision = self.choice["precision"]
        self.output_name = self.card["onnx"]["output_names"][0]
        self.engine = open_engine(self.onnx_path, [self.output_name], self.choice["engine"], "fp32",
                                  sha256=self.card["onnx"]["sha256"] if verify_sha256 else None,
                                  providers=providers, threads=threads)
        self.providers = list(self.engine.providers)

    def network(self, batch: np.ndarray) -> list[np.ndarray]:
        """The exported network on a (n, C, i, j, k) float32 batch: [logits (n, classes, i, j, k)]."""
        return self.engine.network(batch)

    def logits(self, volume: np.ndarray) -> np.ndarray:
        """(num_classes, i, j, k) float32 logits of a preprocessed volume (i, j, k) or (C, i, j, k)."""
        image = np.asarray(volume, dtype=np.float32)
        image = image[None, None] if image.ndim == 3 else image[None]
        s = self.seg
        return sliding_window(image, self.network, s["sw_roi_size"], s["sw_overlap"], s["sw_mode"],
                              sigma_scale=0.125, batch_size=int(s["sw_batch_size"]))[0][0]

    def segment(self, volume: np.ndarray) -> np.ndarray:
        """uint8 label map (i, j, k): argmax of `logits` (labels in the card's `labels`)."""
        return self.logits(volume).argmax(axis=0).astype(np.uint8)
