"""Lung-nodule detector: MONAI's 3D RetinaNet (ResNet-FPN, ATSS matching) without torchvision.

Two objects, built from one `DetectorConfig`:

- `build_network(cfg)` → `monai.apps.detection.networks.retinanet_network.RetinaNet`: pure tensors
  in, tensors out. Input (B, C, D0, D1, D2) with spatial size divisible by `size_divisible(cfg)`;
  output ``{"classification": [B, A*num_classes, ...] per level, "box_regression":
  [B, A*6, ...] per level}``. This is the part that is trained, saved and exported to ONNX.
- `build_detector(cfg, network)` → a `RetinaNetDetector` around it: anchors, ATSS matching,
  hard-negative sampling and losses in training; box decoding, NMS and sliding-window
  inference in evaluation. It holds no weights of its own.

Axes and units. Arrays are indexed (i, j, k) = (column, row, slice) as ITK and MONAI do, so a
patch is (B, C, i, j, k) and `spacing_mm`, `patch_size`, anchor shapes and boxes are all ordered
(i, j, k). Images are resampled to `spacing_mm` and HU are clipped to `hu_window` and scaled to
[0, 1] before they reach the network (the data stage's job; the numbers live here because the
weights depend on them).

Boxes. Annotations arrive as `gt_box_mode` "cccwhd" (centre i, j, k, then size i, j, k), the
mode of MONAI's LUNA16 datalists. The detector itself takes and returns MONAI's StandardMode
"xyzxyz" = (i0, j0, k0, i1, j1, k1), in voxel units of the array it is given (voxel centres at
integer indices, as `monai.apps.detection.transforms.dictionary.AffineBoxToImageCoordinated`
produces). Convert with `monai.data.box_utils.convert_box_mode(b, src_mode="cccwhd",
dst_mode="xyzxyz")`. Targets and outputs use the keys "box", "label" and "label_scores".

torchvision. MONAI reaches torchvision in three places on this path and all are avoided:
`BackboneWithFPN` (IntermediateLayerGetter) is replaced by `ResNetFPN` below; the torchvision
`Matcher` / `BalancedPositiveNegativeSampler` are replaced by MONAI's ATSS matcher and hard-negative
sampler; and `RetinaNetDetector.compute_anchor_matched_idxs`, which tests
``isinstance(matcher, torchvision Matcher)`` first and so fails without torchvision, is overridden
in `AtssRetinaNetDetector`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.data.box_utils import get_boxmode
from monai.losses import FocalLoss
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import Tensor, nn

from medfound.config import from_mapping
from medfound.errors import MedfoundError

__all__ = [
    "CLS_LOSSES",
    "PRESETS",
    "AdaptedConv3d",
    "Adapter",
    "AtssRetinaNetDetector",
    "DetectorConfig",
    "PositiveNormalizedFocalLoss",
    "ResNetFPN",
    "build_detector",
    "build_feature_extractor",
    "build_network",
    "count_parameters",
    "size_divisible",
]

SPATIAL_DIMS = 3
CLS_LOSSES = ("hard_negative_bce", "focal")
_BLOCKS = {"basic": ResNetBlock, "bottleneck": ResNetBottleneck}
_SCALARS: dict[str, Any] = {"int": int, "float": (int, float), "bool": bool, "str": str}

# "reference" is MONAI's LUNA16 RetinaNet (tutorials/detection, config_train_luna16_16g.json and
# luna16_training.py). "tiny" is the same design at half resolution (spacing doubled, so anchors
# halve) and a few thousand times fewer weights: it trains in seconds on a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {
        "n_input_channels": 1,
        "num_classes": 1,
        "block": "bottleneck",
        "layers": [3, 4, 6, 3],
        "block_inplanes": [64, 128, 256, 512],
        "conv1_t_size": [7, 7, 7],
        "conv1_t_stride": [2, 2, 1],
        "returned_layers": [1, 2],
        "fpn_channels": 256,
        "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
        "spacing_mm": [0.703125, 0.703125, 1.25],
        "hu_window": [-1024.0, 300.0],
        "gt_box_mode": "cccwhd",
        "patch_size": [192, 192, 80],
        "atss_num_candidates": 4,
        "atss_center_in_gt": False,
        "hns_batch_size_per_image": 64,
        "hns_positive_fraction": 0.3,
        "hns_pool_size": 20,
        "hns_min_neg": 16,
        "score_thresh": 0.05,
        "topk_candidates_per_level": 1000,
        "nms_thresh": 0.22,
        "detections_per_img": 100,
        "sw_roi_size": [512, 512, 208],
        "sw_overlap": 0.25,
        "sw_batch_size": 1,
        "sw_mode": "constant",
        "adapter_channels": 0,
        "ignore_inside_gt": False,
        "cls_loss": "hard_negative_bce",
    },
}
# Differences from "reference" only: everything else (matching, sampling, NMS) is shared.
PRESETS["tiny"] = {
    **PRESETS["reference"],
    "block": "basic",
    "layers": [1, 1, 1, 1],
    "block_inplanes": [8, 16, 32, 64],
    "fpn_channels": 16,
    "base_anchor_shapes": [[3, 4, 2], [4, 3, 3], [5, 5, 3]],
    "spacing_mm": [1.40625, 1.40625, 2.5],
    "patch_size": [64, 64, 32],
    "sw_roi_size": [64, 64, 32],
}


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Every number of the detector, with the keys of `PRESETS` (and of configs/model/*.yaml).

    Triples are ordered (i, j, k); sizes are voxels at `spacing_mm` unless the name says mm.
    """

    n_input_channels: int
    num_classes: int
    block: str  # "basic" | "bottleneck"
    layers: list[int]  # ResNet blocks per stage (4 stages; stages after the last returned are dropped)
    block_inplanes: list[int]  # ResNet stage widths before the block expansion
    conv1_t_size: list[int]
    conv1_t_stride: list[int]
    returned_layers: list[int]  # ResNet stages (1-4) fed to the FPN; one more level is max-pooled
    fpn_channels: int  # multiple of 8: the heads use GroupNorm(8)
    base_anchor_shapes: list[list[float]]  # voxels, finest level; level l uses 2**l times these
    spacing_mm: list[float]
    hu_window: list[float]  # HU clipped to [lo, hi] and scaled to [0, 1]
    gt_box_mode: str  # box mode of annotations before conversion to "xyzxyz"
    patch_size: list[int]  # training patch, voxels
    atss_num_candidates: int
    atss_center_in_gt: bool
    hns_batch_size_per_image: int
    hns_positive_fraction: float
    hns_pool_size: float
    hns_min_neg: int
    score_thresh: float
    topk_candidates_per_level: int
    nms_thresh: float
    detections_per_img: int
    sw_roi_size: list[int]  # sliding-window inference window, voxels
    sw_overlap: float
    sw_batch_size: int
    sw_mode: str  # "constant" | "gaussian" blending
    adapter_channels: int = 0  # >0: a residual bottleneck adapter of this width after each
    #                            returned ResNet stage and each head's conv tower (fine-tuning)
    ignore_inside_gt: bool = False  # training: an anchor ATSS leaves negative but whose centre
    #                                 lies inside a nodule's box is ignored, not a hard negative
    cls_loss: str = "hard_negative_bce"  # "hard_negative_bce": MONAI's LUNA16 setting (BCE on the
    #   positives and hns_* sampled hard negatives); "focal": RetinaNet's sigmoid focal loss on
    #   every anchor, normalised by the number of positive anchors (the hns_* keys are unused)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DetectorConfig:
        """Validate a plain mapping (or a Hydra DictConfig) and return a config.

        Raises `MedfoundError` naming the key for an unknown, missing or inconsistent value.
        """
        # adapter_channels has a default: packages written before adapters existed lack it.
        return from_mapping(cls, values, "model config", ignore=(),
                            hint="start from a preset: medfound.models.PRESETS")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DetectorConfig:
        """A preset ("tiny" or "reference"), with keys replaced by `overrides`."""
        if name not in PRESETS:
            raise MedfoundError(f"model preset '{name}' does not exist", hint=f"use one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of lists and scalars, ready for YAML or JSON."""
        return dataclasses.asdict(self)

    def _validate(self) -> None:
        def bad(key: str, why: str) -> MedfoundError:
            return MedfoundError(f"model config key '{key}' = {getattr(self, key)!r}: {why}")

        for f in dataclasses.fields(self):
            kind = _SCALARS.get(str(f.type))
            value = getattr(self, f.name)
            if kind and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
                raise bad(f.name, f"must be of type {f.type}")
            if kind in (int, (int, float)) and value < 0:
                raise bad(f.name, "must not be negative")
        for key in ("conv1_t_size", "conv1_t_stride", "patch_size", "sw_roi_size"):
            if not _is_seq(getattr(self, key), SPATIAL_DIMS, integer=True) or min(getattr(self, key)) < 1:
                raise bad(key, f"must be a list of {SPATIAL_DIMS} positive integers (i, j, k)")
        if not _is_seq(self.spacing_mm, SPATIAL_DIMS) or min(self.spacing_mm) <= 0:
            raise bad("spacing_mm", f"must be a list of {SPATIAL_DIMS} positive numbers (i, j, k)")
        if self.block not in _BLOCKS:
            raise bad("block", f"must be one of {sorted(_BLOCKS)}")
        for key in ("layers", "block_inplanes"):
            if not _is_seq(getattr(self, key), 4, integer=True) or min(getattr(self, key)) < 1:
                raise bad(key, "must be 4 positive integers, one per ResNet stage")
        rl = self.returned_layers
        if not (isinstance(rl, list) and rl and _is_seq(rl, len(rl), integer=True)
                and rl == sorted(set(rl)) and rl[0] >= 1 and rl[-1] <= 4):
            raise bad("returned_layers", "must be increasing ResNet stages in 1..4")
        if self.fpn_channels < 8 or self.fpn_channels % 8:
            raise bad("fpn_channels", "must be a positive multiple of 8 (GroupNorm with 8 groups)")
        shapes = self.base_anchor_shapes
        if not shapes or not all(_is_seq(s, SPATIAL_DIMS) and min(s) > 0 for s in shapes):
            raise bad("base_anchor_shapes", "must be a list of positive (i, j, k) anchor sizes")
        if not _is_seq(self.hu_window, 2) or self.hu_window[0] >= self.hu_window[1]:
            raise bad("hu_window", "must be [low, high] HU with low < high")
        if not 0.0 < self.hns_positive_fraction < 1.0:
            raise bad("hns_positive_fraction", "must be in (0, 1)")
        for key in ("score_thresh", "nms_thresh"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "must be in [0, 1]")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise bad("sw_overlap", "must be in [0, 1)")
        try:
            get_boxmode(self.gt_box_mode)
        except ValueError:
            raise bad("gt_box_mode", "must be a MONAI box mode such as 'cccwhd' or 'xyzxyz'") from None
        if self.sw_mode not in ("constant", "gaussian"):
            raise bad("sw_mode", "must be 'constant' or 'gaussian'")
        if self.cls_loss not in CLS_LOSSES:
            raise bad("cls_loss", f"must be one of {', '.join(CLS_LOSSES)}")
        div = size_divisible(self)
        for key in ("patch_size", "sw_roi_size"):
            if any(s % d for s, d in zip(getattr(self, key), div, strict=True)):
                raise bad(key, f"each size must be a multiple of {list(div)} (the network's size_divisible)")


def size_divisible(cfg: DetectorConfig | Mapping[str, Any]) -> tuple[int, int, int]:
    """Spatial multiple the network input must have, per axis (i, j, k).

    conv1 stride × 2 (max-pool) × 2 per ResNet stage after the first up to the deepest returned
    one × 2 (the FPN's extra max-pooled level).
    """
    cfg = _config(cfg)
    i, j, k = (int(s) * 2 * 2 ** max(cfg.returned_layers) for s in cfg.conv1_t_stride)
    return i, j, k


class Adapter(nn.Module):
    """Residual bottleneck adapter: x + up(relu(down(x))), 1×1×1 convolutions. `up` starts at
    zero, so a freshly added adapter is the identity and fine-tuning starts from the
    pretrained features."""

    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.down = nn.Conv3d(channels, bottleneck, 1)
        self.up = nn.Conv3d(bottleneck, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(torch.relu(self.down(x)))


class AdaptedConv3d(nn.Conv3d):
    """A prediction convolution with a low-rank residual adapter (``<conv>.adapter``):
    conv(x) + up(down(x)), `down` the conv's own kernel onto `rank` channels, `up` 1×1×1 and zero
    at the start (so the output is the conv's). The conv keeps its state_dict keys; frozen, only
    the adapter trains: (in·k³ + out)·rank weights instead of in·out·k³ — for the tiny detector's
    box regression (16 channels in, 3 anchors × 6 out, 3×3×3) 1,822 instead of 7,794."""

    def __init__(self, conv: nn.Conv3d, rank: int):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, bias=conv.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.adapter = nn.Module()
        self.adapter.down = nn.Conv3d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride,
                                      padding=conv.padding, bias=False)
        self.adapter.up = nn.Conv3d(rank, conv.out_channels, 1)
        nn.init.zeros_(self.adapter.up.weight)
        nn.init.zeros_(self.adapter.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.adapter.up(self.adapter.down(x))


class ResNetFPN(nn.Module):
    """ResNet stages up to the deepest returned one, then a feature pyramid.

    Does what MONAI's `BackboneWithFPN` does (same sub-module names, so the same state_dict keys
    as `resnet_fpn_feature_extractor`) without torchvision's IntermediateLayerGetter.
    With `adapter_channels` > 0 an `Adapter` (``body.adapter<k>``) follows each returned stage
    and the pyramid takes its output.
    forward: (B, C, i, j, k) → dict of len(returned_layers)+1 maps of `out_channels`, finest first.
    """

    def __init__(self, backbone: ResNet, returned_layers: Sequence[int], in_channels_list: Sequence[int],
                 out_channels: int, adapter_channels: int = 0):
        super().__init__()
        last = f"layer{max(returned_layers)}"
        body = OrderedDict()
        widths = dict(zip((f"layer{k}" for k in returned_layers), in_channels_list, strict=True))
        self.return_layers = {}
        for name, module in backbone.named_children():
            if name == "maxpool" and backbone.no_max_pool:
                continue
            body[name] = module
            if name in widths:
                tap = name
                if adapter_channels > 0:
                    tap = f"adapter{name[len('layer'):]}"
                    body[tap] = Adapter(widths[name], adapter_channels)
                self.return_layers[tap] = str(len(self.return_layers))
            if name == last:
                break
        self.body = nn.ModuleDict(body)
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=SPATIAL_DIMS,
            in_channels_list=list(in_channels_list),
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(SPATIAL_DIMS),
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = OrderedDict()
        for name, module in self.body.items():
            x = module(x)
            if name in self.return_layers:
                features[self.return_layers[name]] = x
        return self.fpn(features)


def build_feature_extractor(cfg: DetectorConfig | Mapping[str, Any]) -> ResNetFPN:
    """3D ResNet body (MONAI's `ResNet`) + FPN with `cfg.fpn_channels` channels per level."""
    cfg = _config(cfg)
    block = _BLOCKS[cfg.block]
    backbone = ResNet(
        block=block,
        layers=list(cfg.layers),
        block_inplanes=list(cfg.block_inplanes),
        spatial_dims=SPATIAL_DIMS,
        n_input_channels=cfg.n_input_channels,
        conv1_t_size=tuple(cfg.conv1_t_size),
        conv1_t_stride=tuple(cfg.conv1_t_stride),
        feed_forward=False,
    )
    in_channels = [cfg.block_inplanes[k - 1] * block.expansion for k in cfg.returned_layers]
    return ResNetFPN(backbone, cfg.returned_layers, in_channels, cfg.fpn_channels,
                     adapter_channels=cfg.adapter_channels)


def build_network(cfg: DetectorConfig | Mapping[str, Any], seed: int | None = None) -> RetinaNet:
    """The RetinaNet network: (B, n_input_channels, i, j, k) → classification and box-regression maps.

    With `seed`, weights are initialised from that seed without touching the global RNG, so the
    same seed gives the same state_dict.
    """
    cfg = _config(cfg)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        net = RetinaNet(
            spatial_dims=SPATIAL_DIMS,
            num_classes=cfg.num_classes,
            num_anchors=len(cfg.base_anchor_shapes),
            feature_extractor=build_feature_extractor(cfg),
            size_divisible=size_divisible(cfg),
        )
        if cfg.adapter_channels > 0:
            # An adapter closes each head's conv tower too (``<head>.conv.adapter``, before the
            # prediction conv), so a frozen tower can still adapt: adapter-only fine-tuning.
            for head in (net.classification_head, net.regression_head):
                head.conv.add_module("adapter", Adapter(cfg.fpn_channels, cfg.adapter_channels))
            # The box-regression conv is 80% of the trainable weights of the tiny detector's
            # adapter-only fine-tuning; a low-rank adapter of the same width
            # (``regression_head.bbox_reg.adapter``) lets it stay frozen too. The classification
            # conv (one class) is smaller than such an adapter would be and trains whole.
            net.regression_head.bbox_reg = AdaptedConv3d(net.regression_head.bbox_reg,
                                                         cfg.adapter_channels)
        return net


class AtssRetinaNetDetector(RetinaNetDetector):
    """MONAI's `RetinaNetDetector`, restricted to the ATSS matcher so that it runs without torchvision.

    `ignore_inside_gt`: ATSS keeps a handful of anchors per nodule as positives and calls every
    other anchor background — including the ones next to them whose centres lie inside the same
    nodule. When a nodule spans only one or two feature cells (coarse spacing), those neighbours
    see the same voxels as the positives, and the hard-negative sampler picks exactly them (they
    score highest): the classifier is told "nodule" and "not nodule" for one input and stays at the
    prior. With the flag, such anchors are ignored (MONAI's BETWEEN_THRESHOLDS), as RetinaNet's
    IoU band between background and foreground is.
    """

    ignore_inside_gt: bool = False

    def compute_anchor_matched_idxs(self, anchors: list[Tensor], targets: list[dict[str, Tensor]],
                                    num_anchor_locs_per_level: Sequence[int]) -> list[Tensor]:
        if not isinstance(getattr(self, "proposal_matcher", None), ATSSMatcher):
            raise TypeError("AtssRetinaNetDetector needs set_atss_matcher(...) before training")
        # ATSSMatcher returns all -1 (background) for an image without boxes, and builds that
        # tensor on the CPU: move every result to the anchors' device, or the hard-negative
        # sampler mixes CPU and CUDA indices on a GPU.
        matched = []
        for a, t in zip(anchors, targets, strict=True):
            boxes = t[self.target_box_key].to(a.device)
            idx = self.proposal_matcher(boxes, a, num_anchor_locs_per_level,
                                        self.num_anchors_per_loc)[1].to(a.device)
            if self.ignore_inside_gt and len(boxes):
                idx = ignore_inside_boxes(idx, a, boxes, ATSSMatcher.BELOW_LOW_THRESHOLD,
                                          ATSSMatcher.BETWEEN_THRESHOLDS)
            matched.append(idx)
        return matched


def ignore_inside_boxes(matched: Tensor, anchors: Tensor, boxes: Tensor, background: int,
                        ignore: int) -> Tensor:
    """`matched` with every `background` anchor whose centre lies inside one of `boxes` (all
    xyzxyz) set to `ignore`."""
    dims = boxes.shape[1] // 2
    centres = (anchors[:, :dims] + anchors[:, dims:]) / 2
    inside = ((centres[:, None] >= boxes[None, :, :dims]) & (centres[:, None] <= boxes[None, :, dims:])
              ).all(dim=2).any(dim=1)
    return torch.where(inside & (matched == background), torch.full_like(matched, ignore), matched)


class PositiveNormalizedFocalLoss(nn.Module):
    """RetinaNet's classification loss: MONAI's sigmoid focal loss (γ 2, α 0.25) summed over every
    anchor and divided by the number of positive anchors (at least 1), so that the thousands of
    easy background anchors neither drown the few positives nor need sampling."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25):
        super().__init__()
        self.focal = FocalLoss(gamma=gamma, alpha=alpha, reduction="none", use_softmax=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        # (anchors, classes) → (1, classes, anchors): MONAI's losses take channels second.
        loss = self.focal(logits.t()[None], target.t()[None]).sum()
        return loss / target.sum().clamp(min=1.0)


def build_detector(cfg: DetectorConfig | Mapping[str, Any], network: RetinaNet) -> AtssRetinaNetDetector:
    """Detector logic around `network`: anchors, ATSS + hard-negative sampling, NMS, sliding window.

    train(): ``detector(images, targets) -> {"classification": loss, "box_regression": loss}`` with
    targets ``[{"box": (N, 6) xyzxyz voxels, "label": (N,) int64}]``.
    eval(): ``detector(images, use_inferer=True) -> [{"box", "label", "label_scores"}]`` per image;
    `use_inferer` slides `sw_roi_size` windows over volumes of any size.
    """
    cfg = _config(cfg)
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**level for level in range(len(cfg.returned_layers) + 1)],
        base_anchor_shapes=[list(map(float, s)) for s in cfg.base_anchor_shapes],
    )
    detector = AtssRetinaNetDetector(network=network, anchor_generator=anchors)
    detector.ignore_inside_gt = cfg.ignore_inside_gt
    detector.set_atss_matcher(num_candidates=cfg.atss_num_candidates, center_in_gt=cfg.atss_center_in_gt)
    if cfg.cls_loss == "focal":
        detector.set_cls_loss(PositiveNormalizedFocalLoss())  # every anchor, no sampler
    else:
        detector.set_hard_negative_sampler(
            batch_size_per_image=cfg.hns_batch_size_per_image,
            positive_fraction=cfg.hns_positive_fraction,
            pool_size=cfg.hns_pool_size,
            min_neg=cfg.hns_min_neg,
        )
    detector.set_target_keys(box_key="box", label_key="label")
    detector.set_box_selector_parameters(
        score_thresh=cfg.score_thresh,
        topk_candidates_per_level=cfg.topk_candidates_per_level,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
    )
    detector.set_sliding_window_inferer(
        roi_size=list(cfg.sw_roi_size),
        overlap=cfg.sw_overlap,
        sw_batch_size=cfg.sw_batch_size,
        mode=cfg.sw_mode,
    )
    return detector


def count_parameters(network: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar weights in `network` (only those with requires_grad if `trainable_only`)."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad or not trainable_only)


def _config(cfg: DetectorConfig | Mapping[str, Any]) -> DetectorConfig:
    return cfg if isinstance(cfg, DetectorConfig) else DetectorConfig.from_dict(cfg)


def _is_seq(value: Any, n: int, integer: bool = False) -> bool:
    kind = int if integer else (int, float)
    return isinstance(value, list) and len(value) == n and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value)
