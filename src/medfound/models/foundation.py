"""Multi-modal foundation encoder: one 3D encoder for CT, MR, PET and ultrasound.

Shape of the network (why: see docs/foundation.md, "Encoder"):

    volume (B, 1, i, j, k) of modality m, intensities already in [0, 1] (medfound.data.pretrain)
      │  stems[m]: conv1 (conv1_t_size, stride conv1_t_stride) → bn1 → + embedding[m] → ReLU
      ▼        (one small stem per modality; `embedding` is a learned per-channel vector that
      │         tells the shared body which modality it is looking at)
      │  body: max-pool → layer1 … layer{stages}   (MONAI's 3D ResNet stages, shared by all)
      ▼
    features [stem, layer1, …, layer{stages}], finest first

The body is the detector's backbone (`medfound.models.detection`: MONAI ResNet, same block,
widths and stem), so a pretrained encoder becomes a detector's feature extractor by renaming
weights (`detector_state_from_encoder`): the CT stem's conv1/bn1 become the ResNet's conv1/bn1
(the CT embedding folds exactly into bn1's bias, since it is added before the ReLU) and
layer1… become the detector's layer1…. The detector network, its FPN and its ONNX export stay
what they are.

Every modality-specific weight lives under ``stems.<m>.`` (the federated per-group strategy,
medfound.fed.strategies.group_of, relies on this: a stem is averaged only among the centers
that have that modality); everything else is shared.

`FoundationPretrainer` adds what self-supervised pretraining needs and fine-tuning drops: a light
top-down decoder that reconstructs the masked volume, and a projection head for the
contrastive (InfoNCE) loss between two views.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import Tensor, nn

from medfound.config import from_mapping
from medfound.errors import MedfoundError

__all__ = [
    "FOUNDATION_PRESETS",
    "FoundationConfig",
    "FoundationEncoder",
    "FoundationPretrainer",
    "detector_state_from_encoder",
    "freeze_",
    "train_only_",
]

_BLOCKS = {"basic": ResNetBlock, "bottleneck": ResNetBottleneck}
MODALITIES = ("ct", "mr", "pet", "us")
# "tiny" has the body of the "tiny" detector preset (so it initialises that detector).
FOUNDATION_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "modalities": list(MODALITIES),
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": [8, 16, 32, 64],
        "conv1_t_size": [7, 7, 7],
        "conv1_t_stride": [2, 2, 1],
        "stages": 3,
        "decoder_channels": 16,
        "projection_dim": 32,
    },
}


@dataclasses.dataclass(frozen=True)
class FoundationConfig:
    """The encoder's numbers: the keys of configs/task/pretrain.yaml's ``encoder``."""

    modalities: list[str]  # one stem per modality
    block: str  # "basic" | "bottleneck" (MONAI ResNet blocks)
    layers: list[int]  # blocks per ResNet stage (4 values; stages beyond `stages` unused)
    block_inplanes: list[int]  # stage widths before the block expansion
    conv1_t_size: list[int]  # stem kernel (i, j, k)
    conv1_t_stride: list[int]  # stem stride (i, j, k)
    stages: int  # ResNet stages in the body (1..4)
    decoder_channels: int  # width of the reconstruction decoder (pretraining only)
    projection_dim: int  # output of the contrastive projection head (pretraining only)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FoundationConfig:
        """Validate a mapping (or Hydra DictConfig); errors name the key."""
        return from_mapping(cls, values, "encoder config",
                            hint="start from medfound.models.foundation.FOUNDATION_PRESETS")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _validate(self) -> None:
        def bad(key: str, why: str) -> MedfoundError:
            return MedfoundError(f"encoder config key '{key}' = {getattr(self, key)!r}: {why}")

        mods = [str(m) for m in self.modalities]
        if not mods or len(set(mods)) != len(mods) or not set(mods) <= set(MODALITIES):
            raise bad("modalities", f"must be distinct names from {list(MODALITIES)}")
        if self.block not in _BLOCKS:
            raise bad("block", f"must be one of {sorted(_BLOCKS)}")
        for key in ("layers", "block_inplanes"):
            v = getattr(self, key)
            if len(v) != 4 or min(v) < 1:
                raise bad(key, "must be 4 positive integers, one per ResNet stage")
        for key in ("conv1_t_size", "conv1_t_stride"):
            v = getattr(self, key)
            if len(v) != 3 or min(v) < 1:
                raise bad(key, "must be 3 positive integers (i, j, k)")
        if not 1 <= self.stages <= 4:
            raise bad("stages", "must be 1..4")
        for key in ("decoder_channels", "projection_dim"):
            if getattr(self, key) < 1:
                raise bad(key, "must be a positive integer")

    def downsampling(self) -> tuple[int, int, int]:
        """Total stride of the deepest feature map, per axis: patches must be multiples of it."""
        return tuple(int(s) * 2 * 2 ** (self.stages - 1) for s in self.conv1_t_stride)


class _Stem(nn.Module):
    def __init__(self, conv: nn.Conv3d, bn: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = conv, bn
        self.embedding = nn.Parameter(torch.zeros(conv.out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.bn1(self.conv1(x)) + self.embedding.view(1, -1, 1, 1, 1)


class FoundationEncoder(nn.Module):
    """Per-modality stems, shared ResNet body. forward(x, modalities) → list of feature maps."""

    def __init__(self, cfg: FoundationConfig | Mapping[str, Any], seed: int | None = None):
        super().__init__()
        cfg = cfg if isinstance(cfg, FoundationConfig) else FoundationConfig.from_dict(cfg)
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            stems = {}
            for m in cfg.modalities:  # a MONAI ResNet per modality: its conv1/bn1, its init
                r = self._resnet(cfg)
                stems[m] = _Stem(r.conv1, r.bn1)
            self.stems = nn.ModuleDict(stems)
            body = self._resnet(cfg)
        self.act = nn.ReLU(inplace=True)
        self.body = nn.ModuleDict({"maxpool": body.maxpool,
                                   **{f"layer{s}": getattr(body, f"layer{s}")
                                      for s in range(1, cfg.stages + 1)}})
        block = _BLOCKS[cfg.block]
        self.channels = [cfg.block_inplanes[0]] + [cfg.block_inplanes[s] * block.expansion
                                                   for s in range(cfg.stages)]

    @staticmethod
    def _resnet(cfg: FoundationConfig) -> ResNet:
        return ResNet(block=_BLOCKS[cfg.block], layers=list(cfg.layers),
                      block_inplanes=list(cfg.block_inplanes), spatial_dims=3, n_input_channels=1,
                      conv1_t_size=tuple(cfg.conv1_t_size), conv1_t_stride=tuple(cfg.conv1_t_stride),
                      feed_forward=False)

    def stem(self, x: Tensor, modalities: Sequence[str]) -> Tensor:
        """Each sample through its modality's stem (samples of one modality share a call)."""
        if len(modalities) != x.shape[0]:
            raise ValueError(f"{len(modalities)} modality names for a batch of {x.shape[0]}")
        unknown = sorted(set(modalities) - set(self.stems))
        if unknown:
            raise MedfoundError(f"this encoder has no stem for modality {unknown}",
                                hint=f"its modalities are {list(self.stems)}")
        out = None
        for m in dict.fromkeys(modalities):
            idx = torch.tensor([n for n, name in enumerate(modalities) if name == m], device=x.device)
            y = self.stems[m](x.index_select(0, idx))
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out = out.index_copy(0, idx, y)
        return self.act(out)

    def forward(self, x: Tensor, modalities: Sequence[str]) -> list[Tensor]:
        feats = [self.stem(x, modalities)]
        y = self.body["maxpool"](feats[0])
        for s in range(1, self.cfg.stages + 1):
            y = self.body[f"layer{s}"](y)
            feats.append(y)
        return feats


class FoundationPretrainer(nn.Module):
    """Encoder + reconstruction decoder + projection head.

    forward(x, modalities) → (reconstruction (B, 1, i, j, k), embedding (B, projection_dim),
    unnormalised). The decoder is top-down (1×1 laterals, upsample and add, like an FPN) and
    ends at the input size.
    """

    def __init__(self, cfg: FoundationConfig | Mapping[str, Any], seed: int | None = None):
        super().__init__()
        cfg = cfg if isinstance(cfg, FoundationConfig) else FoundationConfig.from_dict(cfg)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.encoder = FoundationEncoder(cfg)
            d = cfg.decoder_channels
            self.laterals = nn.ModuleList(nn.Conv3d(c, d, 1) for c in self.encoder.channels)
            self.smooth = nn.Sequential(nn.Conv3d(d, d, 3, padding=1), nn.InstanceNorm3d(d, affine=True),
                                        nn.ReLU(inplace=True))
            self.out = nn.Conv3d(d, 1, 3, padding=1)
            c = self.encoder.channels[-1]
            self.projector = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True),
                                           nn.Linear(c, cfg.projection_dim))

    def forward(self, x: Tensor, modalities: Sequence[str]) -> tuple[Tensor, Tensor]:
        feats = self.encoder(x, modalities)
        y = self.laterals[-1](feats[-1])
        for lateral, f in zip(reversed(self.laterals[:-1]), reversed(feats[:-1]), strict=True):
            y = F.interpolate(y, size=f.shape[2:], mode="trilinear", align_corners=False) + lateral(f)
        y = F.interpolate(self.smooth(y), size=x.shape[2:], mode="trilinear", align_corners=False)
        embedding = self.projector(feats[-1].mean(dim=(2, 3, 4)))
        return self.out(y), embedding


def detector_state_from_encoder(encoder_state: Mapping[str, Tensor], detector_state: Mapping[str, Tensor],
                                modality: str = "ct", prefix: str = "feature_extractor.body."
                                ) -> dict[str, Tensor]:
    """The detector weights that a pretrained encoder provides, under the detector's names.

    `encoder_state`: a `FoundationEncoder` state_dict (keys ``stems.*``, ``body.*``; an
    ``encoder.`` prefix is accepted). `detector_state`: the target network's state_dict, used
    for names and shapes. Returns {detector key: tensor} for the stem (conv1, bn1 with the
    modality embedding folded into its bias) and every body stage the detector has. Raises
    `MedfoundError` when the two architectures do not match.
    """
    enc = {k.removeprefix("encoder."): v for k, v in encoder_state.items()}
    stem = f"stems.{modality}."
    if not any(k.startswith(stem) for k in enc):
        raise MedfoundError(f"the pretrained encoder has no {modality!r} stem",
                            hint=f"it has {sorted({k.split('.')[1] for k in enc if k.startswith('stems.')})}")
    out: dict[str, Tensor] = {}
    for key, value in enc.items():
        if key.startswith(stem) and not key.endswith("embedding"):
            target = prefix + key[len(stem):]
        elif key.startswith("body.layer"):
            target = prefix + key[len("body."):]
        else:
            continue
        if target not in detector_state:
            if key.startswith("body.layer"):
                continue  # a deeper stage than the detector uses
            raise MedfoundError(f"the detector has no weight {target!r} for encoder weight {key!r}")
        if tuple(detector_state[target].shape) != tuple(value.shape):
            raise MedfoundError(
                f"encoder weight {key!r} has shape {list(value.shape)}, the detector's {target!r} "
                f"has {list(detector_state[target].shape)}",
                hint="pretrain an encoder with the detector's block, layers, block_inplanes and "
                     "conv1 settings (configs/task/pretrain.yaml encoder vs configs/network)")
        out[target] = value.clone()
    out[prefix + "bn1.bias"] = out[prefix + "bn1.bias"] + enc[stem + "embedding"]
    missing = [k for k in detector_state if k.startswith(prefix) and k not in out
               and not k[len(prefix):].startswith("adapter")]  # adapters start fresh
    if missing:
        raise MedfoundError(f"the pretrained encoder lacks detector body weights, e.g. {missing[0]!r}",
                            hint="pretrain with at least as many stages as the detector returns")
    return out


class _FrozenBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm that always normalises with its running statistics and never updates them
    (same weights and state_dict keys as the BatchNorm it replaces)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def freeze_(module: nn.Module) -> nn.Module:
    """Freeze `module` in place: no parameter gets gradients and its BatchNorms keep their
    (pretrained) statistics in training mode too. Returns `module`."""
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.__class__ = _FrozenBatchNorm
    return module


def train_only_(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze every weight of `module` whose name contains none of `patterns` (e.g.
    ``["adapter", "cls_logits"]``); a BatchNorm left without trainable weights keeps
    its statistics too. Returns the names still trained; raises `MedfoundError` when a pattern
    matches no weight (a typo would otherwise freeze everything it meant to train)."""
    patterns = [str(p) for p in patterns]
    names = [n for n, _ in module.named_parameters()]
    unused = [p for p in patterns if not any(p in n for n in names)]
    if unused:
        raise MedfoundError(f"config key 'finetune.train_only': {unused} match(es) no weight of the network",
                            hint="use parts of weight names, e.g. adapter, cls_logits, bbox_reg, fpn")
    for name, p in module.named_parameters():
        if not any(s in name for s in patterns):
            p.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters(recurse=False)):
            m.__class__ = _FrozenBatchNorm
    return [n for n, p in module.named_parameters() if p.requires_grad]
