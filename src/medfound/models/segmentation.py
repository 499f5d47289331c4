"""Nodule segmentation: the foundation encoder's body with a UNet-style decoder.

    image (B, 1, i, j, k) in [0, 1]
      │  encoder: conv1 → bn1 → ReLU ─────────────────────────── skip 1 (stride conv1_t_stride)
      │           max-pool → layer1 [→ adapter1] ─────────────── skip 2 (×2)
      │           layer2 [→ adapter2] ────────────────────────── skip 3 (×4)   …
      │           layer{stages} [→ adapter{stages}]              bottom
      ▼  decoder: per skip, finest last: upsample to the skip's size, concatenate, two 3×3×3
      │           conv + BatchNorm + LeakyReLU (MONAI's UnetBasicBlock, as in DynUNet);
      │           a last block joins the image itself, so the output is at input resolution
      ▼
    logits (B, num_classes, i, j, k); argmax → label map (0 background, 1 nodule)

The encoder is a MONAI 3D ResNet under the same names as the detector's backbone
(``encoder.conv1``, ``encoder.bn1``, ``encoder.layer1`` …, adapters ``encoder.adapter<k>``), so
a pretrained foundation encoder starts it through the very mapping the detector uses
(`medfound.models.foundation.detector_state_from_encoder` with prefix ``encoder.``). The network
is tensors in, tensor out: what `medfound export` turns into ONNX.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import Tensor, nn

from medfound.config import from_mapping
from medfound.errors import MedfoundError
from medfound.models.detection import Adapter
from medfound.models.foundation import FOUNDATION_PRESETS

__all__ = ["SEGMENTER_PRESETS", "SegmentationNet", "SegmenterConfig", "build_segmenter",
           "freeze_encoder", "segmenter_size_divisible"]

_BLOCKS = {"basic": ResNetBlock, "bottleneck": ResNetBottleneck}
LABELS = {0: "background", 1: "nodule"}

# "tiny": the encoder of the "tiny" foundation preset (so a pretrained encoder fits).
SEGMENTER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "n_input_channels": 1,
        "num_classes": 2,
        **{k: FOUNDATION_PRESETS["tiny"][k] for k in ("block", "layers", "block_inplanes", "conv1_t_size",
                                                        "conv1_t_stride", "stages")},
        "decoder_channels": [32, 16, 16, 8],
        "adapter_channels": 0,
        "spacing_mm": [1.40625, 1.40625, 2.5],
        "hu_window": [-1024.0, 300.0],
        "patch_size": [64, 64, 32],
        "sw_roi_size": [64, 64, 32],
        "sw_overlap": 0.25,
        "sw_batch_size": 1,
        "sw_mode": "gaussian",
    },
}


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """The segmenter's numbers: the keys of configs/network/unet_tiny.yaml."""

    n_input_channels: int
    num_classes: int  # output channels, background included (2: background, nodule)
    block: str  # "basic" | "bottleneck" (MONAI ResNet blocks)
    layers: list[int]  # blocks per ResNet stage (4 values; stages beyond `stages` unused)
    block_inplanes: list[int]  # stage widths before the block expansion
    conv1_t_size: list[int]  # stem kernel (i, j, k)
    conv1_t_stride: list[int]  # stem stride (i, j, k)
    stages: int  # ResNet stages in the encoder (1..4)
    decoder_channels: list[int]  # one width per decoder block, deepest first (stages + 1 values)
    spacing_mm: list[float]  # (i, j, k) the network sees, after resampling
    hu_window: list[float]  # HU clipped to [lo, hi] and scaled to [0, 1]
    patch_size: list[int]  # training patch (i, j, k)
    sw_roi_size: list[int]  # sliding-window tile for whole studies
    sw_overlap: float
    sw_batch_size: int
    sw_mode: str  # "gaussian" | "constant" blending of overlapping tiles
    adapter_channels: int = 0  # >0: a residual bottleneck adapter after each encoder stage

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SegmenterConfig:
        """Validate a mapping (or Hydra DictConfig, whose `name` is ignored); errors name the key."""
        return from_mapping(cls, values, "segmenter config",
                            hint="start from medfound.models.segmentation.SEGMENTER_PRESETS")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SegmenterConfig:
        if name not in SEGMENTER_PRESETS:
            raise MedfoundError(f"unknown segmenter preset {name!r}", hint=f"one of {sorted(SEGMENTER_PRESETS)}")
        return cls.from_dict({**SEGMENTER_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _validate(self) -> None:
        def bad(key: str, why: str) -> MedfoundError:
            return MedfoundError(f"segmenter config key '{key}' = {getattr(self, key)!r}: {why}")

        if self.block not in _BLOCKS:
            raise bad("block", f"must be one of {sorted(_BLOCKS)}")
        if not 1 <= self.stages <= 4:
            raise bad("stages", "must be 1..4")
        if self.num_classes < 2:
            raise bad("num_classes", "must be >= 2 (background and at least one structure)")
        for key in ("layers", "block_inplanes"):
            v = getattr(self, key)
            if len(v) != 4 or min(v) < 1:
                raise bad(key, "must be 4 positive integers, one per ResNet stage")
        for key in ("conv1_t_size", "conv1_t_stride", "spacing_mm", "patch_size", "sw_roi_size"):
            v = getattr(self, key)
            if len(v) != 3 or min(v) <= 0:
                raise bad(key, "must be 3 positive numbers (i, j, k)")
        if len(self.decoder_channels) != self.stages + 1 or min(self.decoder_channels) < 1:
            raise bad("decoder_channels", f"must be {self.stages + 1} positive integers (stages + 1), "
                      "deepest block first")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise bad("hu_window", "must be [low, high] with low < high")
        div = segmenter_size_divisible(self)
        for key in ("patch_size", "sw_roi_size"):
            if any(int(s) % d for s, d in zip(getattr(self, key), div, strict=True)):
                raise bad(key, f"must be multiples of {list(div)} (the encoder's total stride)")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise bad("sw_overlap", "must be in [0, 1)")
        if self.sw_mode not in ("gaussian", "constant"):
            raise bad("sw_mode", "must be 'gaussian' or 'constant'")
        if self.adapter_channels < 0:
            raise bad("adapter_channels", "must be >= 0")


def segmenter_size_divisible(cfg: SegmenterConfig) -> tuple[int, int, int]:
    """Spatial sizes the network takes: multiples of its deepest feature map's stride."""
    return tuple(int(s) * 2 * 2 ** (cfg.stages - 1) for s in cfg.conv1_t_stride)


class _Up(nn.Module):
    """Upsample to the skip's size (trilinear), concatenate, UnetBasicBlock.

    BatchNorm, not DynUNet's InstanceNorm: instance statistics of a nodule-centred training patch
    differ from those of a large, mostly-lung inference window, and the segmenter must give the
    same answer for any sliding-window size (running statistics do)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.block = UnetBasicBlock(3, in_channels + skip_channels, out_channels, kernel_size=3,
                                    stride=1, norm_name="batch")

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class SegmentationNet(nn.Module):
    """ResNet encoder (+ optional adapters) and UNet decoder. forward(image) → logits."""

    def __init__(self, cfg: SegmenterConfig | Mapping[str, Any]):
        super().__init__()
        cfg = cfg if isinstance(cfg, SegmenterConfig) else SegmenterConfig.from_dict(cfg)
        self.cfg = cfg
        block = _BLOCKS[cfg.block]
        r = ResNet(block=block, layers=list(cfg.layers), block_inplanes=list(cfg.block_inplanes),
                   spatial_dims=3, n_input_channels=cfg.n_input_channels,
                   conv1_t_size=tuple(cfg.conv1_t_size), conv1_t_stride=tuple(cfg.conv1_t_stride),
                   feed_forward=False)
        widths = [cfg.block_inplanes[0]] + [cfg.block_inplanes[s] * block.expansion
                                            for s in range(cfg.stages)]
        enc: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=r.conv1, bn1=r.bn1, act=r.act, maxpool=r.maxpool)
        for s in range(1, cfg.stages + 1):
            enc[f"layer{s}"] = getattr(r, f"layer{s}")
            if cfg.adapter_channels > 0:
                enc[f"adapter{s}"] = Adapter(widths[s], cfg.adapter_channels)
        self.encoder = nn.ModuleDict(enc)
        skips = [cfg.n_input_channels] + widths[:-1]  # image, stem, layer1 … layer{stages-1}
        ups, c = [], widths[-1]
        for skip, out in zip(reversed(skips), cfg.decoder_channels, strict=True):
            ups.append(_Up(c, skip, out))
            c = out
        self.decoder = nn.ModuleList(ups)
        self.head = nn.Conv3d(c, cfg.num_classes, kernel_size=1)

    def forward(self, image: Tensor) -> Tensor:
        e = self.encoder
        skips = [image]
        x = e["act"](e["bn1"](e["conv1"](image)))
        skips.append(x)
        x = e["maxpool"](x)
        for s in range(1, self.cfg.stages + 1):
            x = e[f"layer{s}"](x)
            if f"adapter{s}" in e:
                x = e[f"adapter{s}"](x)
            skips.append(x)
        skips.pop()  # the deepest map is the decoder's input, not a skip
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)


def build_segmenter(cfg: SegmenterConfig | Mapping[str, Any], seed: int | None = None) -> SegmentationNet:
    """The network, initialised from `seed` without touching the global RNG (None: as it comes)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return SegmentationNet(cfg)


def freeze_encoder(network: SegmentationNet) -> None:
    """Freeze the encoder (no gradients, BatchNorm on running statistics), all but its adapters."""
    from medfound.models.foundation import freeze_

    for name, module in network.encoder.items():
        if not name.startswith("adapter"):
            freeze_(module)
