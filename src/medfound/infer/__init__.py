"""medfound.infer: the deployable inference core — onnxruntime + numpy, no torch, no MONAI.

Nothing imported here may import torch or monai (a test runs this package with both blocked):
the point of the stage is that a center's inference box needs only numpy and onnxruntime.
"""

from medfound.infer.engine import OnnxDetector, choose_providers, load_model_card
from medfound.infer.preprocess import normalize_hu, preprocess, resample_to_spacing

__all__ = [
    "OnnxDetector",
    "choose_providers",
    "load_model_card",
    "normalize_hu",
    "preprocess",
    "resample_to_spacing",
]
