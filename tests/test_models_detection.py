"""The nodule detector: MONAI's 3D RetinaNet built from a config, trainable and usable without torchvision."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from monai.data.box_utils import convert_box_mode
from monai.networks.nets.resnet import resnet50

from medfound.errors import MedfoundError
from medfound.models import (
    PRESETS,
    DetectorConfig,
    build_detector,
    build_network,
    count_parameters,
    size_divisible,
)
from medfound.models.detection import PositiveNormalizedFocalLoss


@pytest.fixture(scope="module")
def tiny() -> DetectorConfig:
    return DetectorConfig.preset("tiny")


def sphere_patch(cfg: DetectorConfig, centre: list[float], diameter_mm: float, seed: int = 0):
    """A (1, 1, i, j, k) patch in [0, 1] with a bright sphere (round in mm) on a dim noisy background,
    and its box in the detector's "xyzxyz" voxel mode."""
    sp = torch.tensor(cfg.spacing_mm)
    c = torch.tensor(centre)
    grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in cfg.patch_size], indexing="ij")
    dist_mm = sum(((g - ci) * si) ** 2 for g, ci, si in zip(grid, c, sp, strict=True)).sqrt()
    noise = torch.randn(cfg.patch_size, generator=torch.Generator().manual_seed(seed))
    image = torch.where(dist_mm <= diameter_mm / 2, 1.0, 0.1) + 0.02 * noise
    box_cccwhd = torch.cat([c, diameter_mm / sp])[None]
    return image[None, None], convert_box_mode(box_cccwhd, src_mode="cccwhd", dst_mode="xyzxyz")


def test_detector_builds_trains_and_infers_with_torchvision_blocked(tmp_path):
    script = textwrap.dedent("""
        import importlib.abc, json, sys
        class NoTorchvision(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torchvision" or name.startswith("torchvision."):
                    raise ImportError("torchvision is blocked in this test")
        sys.meta_path.insert(0, NoTorchvision())
        import torch
        import medfound.models as m
        cfg = m.DetectorConfig.preset("tiny")
        det = m.build_detector(cfg, m.build_network(cfg, seed=0))
        x = torch.rand(1, 1, *cfg.patch_size)
        det.train()
        target = [{"box": torch.tensor([[20.0, 20.0, 10.0, 28.0, 28.0, 15.0]]), "label": torch.tensor([0])}]
        sum(det(x, target).values()).backward()
        det.eval()
        with torch.no_grad():
            det(x, use_inferer=True)
        print(json.dumps(sorted(k for k in sys.modules if k.split(".")[0] == "torchvision")))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_presets_are_plain_dicts_with_the_config_keys():
    fields = list(DetectorConfig.__dataclass_fields__)
    for name, values in PRESETS.items():
        assert list(values) == fields, name
        cfg = DetectorConfig.from_dict(values)
        assert cfg.to_dict() == values
        assert json.loads(json.dumps(cfg.to_dict())) == values  # dumpable as YAML/JSON


def test_reference_preset_matches_monai_luna16_tutorial():
    ref = DetectorConfig.preset("reference")
    assert (ref.block, ref.layers, ref.returned_layers) == ("bottleneck", [3, 4, 6, 3], [1, 2])
    assert (ref.conv1_t_stride, ref.conv1_t_size) == ([2, 2, 1], [7, 7, 7])
    assert ref.base_anchor_shapes == [[6, 8, 4], [8, 6, 5], [10, 10, 6]]
    assert (ref.patch_size, ref.spacing_mm, ref.hu_window) == (
        [192, 192, 80], [0.703125, 0.703125, 1.25], [-1024.0, 300.0])
    assert size_divisible(ref) == (16, 16, 8)


@pytest.mark.parametrize(("override", "key"), [
    ({"patch_size": [60, 64, 32]}, "patch_size"),
    ({"sw_roi_size": [64, 64, 36]}, "sw_roi_size"),
    ({"fpn_channels": 12}, "fpn_channels"),
    ({"block": "resnext"}, "block"),
    ({"returned_layers": [2, 1]}, "returned_layers"),
    ({"score_thresh": "high"}, "score_thresh"),
    ({"anchor_shapes": [[4, 4, 4]]}, "anchor_shapes"),
    ({"layers": [1.5, 1, 1, 1]}, "layers"),
    ({"returned_layers": 2}, "returned_layers"),
    ({"gt_box_mode": "xyz"}, "gt_box_mode"),
    ({"base_anchor_shapes": [[4, 4]]}, "base_anchor_shapes"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(MedfoundError, match=key):
        DetectorConfig.preset("tiny", **override)


def test_missing_key_and_unknown_preset_are_named():
    values = dict(PRESETS["tiny"])
    del values["nms_thresh"]
    with pytest.raises(MedfoundError, match="nms_thresh"):
        DetectorConfig.from_dict(values)
    with pytest.raises(MedfoundError, match="huge"):
        DetectorConfig.preset("huge")


def test_tiny_network_maps_a_patch_to_per_level_class_and_box_maps(tiny):
    net = build_network(tiny, seed=0)
    div = size_divisible(tiny)
    assert div == (16, 16, 8) and all(s % d == 0 for s, d in zip(tiny.patch_size, div, strict=True))
    with torch.no_grad():
        out = net(torch.rand(2, 1, *tiny.patch_size))
    assert set(out) == {"classification", "box_regression"}
    n_levels = len(tiny.returned_layers) + 1
    assert len(out["classification"]) == len(out["box_regression"]) == n_levels
    a = len(tiny.base_anchor_shapes)
    # finest level: conv1 stride × max-pool 2; each level below halves again
    finest = [s // (c * 2) for s, c in zip(tiny.patch_size, tiny.conv1_t_stride, strict=True)]
    for level, (cls, box) in enumerate(zip(out["classification"], out["box_regression"], strict=True)):
        spatial = [f // 2**level for f in finest]
        assert cls.shape == (2, a * tiny.num_classes, *spatial)
        assert box.shape == (2, a * 6, *spatial)
    assert count_parameters(net) < 200_000


def test_training_step_gives_finite_losses_and_updates_weights(tiny):
    net = build_network(tiny, seed=0)
    det = build_detector(tiny, net).train()
    image, box = sphere_patch(tiny, [30.0, 25.0, 17.0], diameter_mm=10.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    losses = det(image, [{"box": box, "label": torch.tensor([0])}])
    assert set(losses) == {"classification", "box_regression"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    (losses["classification"] + losses["box_regression"]).backward()
    opt.step()
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    heads = ("classification_head.cls_logits.weight", "regression_head.bbox_reg.weight",
             "feature_extractor.body.conv1.weight")
    assert all(h in changed for h in heads)


def test_ignore_inside_gt_turns_atss_negatives_inside_a_nodule_into_ignored_anchors(tiny):
    image, box = sphere_patch(tiny, [30.0, 25.0, 17.0], diameter_mm=12.0)
    target = [{"box": box, "label": torch.tensor([0])}]
    matched = {}
    for flag in (False, True):
        det = build_detector(dataclasses.replace(tiny, ignore_inside_gt=flag), build_network(tiny, seed=0))
        head = det.network(image)
        det.generate_anchors(image, head)
        levels = [x.shape[2:].numel() for x in head["classification"]]
        matched[flag] = det.compute_anchor_matched_idxs(det.anchors, target, levels)[0]
    plain, ignoring = matched[False], matched[True]
    anchors = det.anchors[0]
    centres = (anchors[:, :3] + anchors[:, 3:]) / 2
    inside = ((centres >= box[0, :3]) & (centres <= box[0, 3:])).all(dim=1)
    # ATSS alone: a few positives, every other anchor background (none ignored).
    assert 0 < int((plain >= 0).sum()) < int(inside.sum())
    assert not (plain == -2).any()
    # With the flag: the positives stay; exactly the background anchors centred inside become -2.
    assert torch.equal(ignoring >= 0, plain >= 0)
    assert torch.equal(ignoring == -2, inside & (plain == -1))
    assert torch.equal(ignoring[~inside], plain[~inside])


def test_focal_loss_is_retinanets_sum_over_anchors_per_positive_anchor():
    logits = torch.tensor([[2.0], [-3.0], [0.5], [1.0], [-0.2]])
    target = torch.tensor([[1.0], [0.0], [0.0], [1.0], [0.0]])
    p = torch.sigmoid(logits)
    p_t = torch.where(target > 0, p, 1 - p)
    alpha_t = torch.where(target > 0, 0.25, 0.75)
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).sum() / 2  # two positive anchors
    assert torch.allclose(PositiveNormalizedFocalLoss()(logits, target), expected, rtol=1e-6)
    # No positive anchor (a background patch): normalised by 1, not 0.
    assert torch.isfinite(PositiveNormalizedFocalLoss()(logits, torch.zeros_like(target)))


def test_sliding_window_inference_on_a_volume_larger_than_the_window(tiny):
    cfg = DetectorConfig.preset("tiny", score_thresh=0.0, detections_per_img=10)
    det = build_detector(cfg, build_network(cfg, seed=0)).eval()
    shape = (100, 90, 40)  # larger than sw_roi_size (64, 64, 32) and not a multiple of size_divisible
    with torch.no_grad():
        out = det(torch.rand(1, 1, *shape), use_inferer=True)
    assert len(out) == 1
    pred = out[0]
    assert pred["box"].shape == (10, 6) and pred["box"].dtype == torch.float32
    assert pred["label_scores"].shape == (10,) and pred["label"].shape == (10,)
    assert pred["label"].dtype == torch.int64 and (pred["label"] == 0).all()
    assert (pred["label_scores"][:-1] >= pred["label_scores"][1:]).all()
    lo, hi = pred["box"][:, :3], pred["box"][:, 3:]
    assert (lo >= 0).all() and (hi <= torch.tensor(shape, dtype=torch.float32)).all() and (hi > lo).all()


def test_same_seed_gives_the_same_weights_without_touching_the_global_rng(tiny):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b, c = build_network(tiny, seed=7), build_network(tiny, seed=7), build_network(tiny, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_reference_network_is_monai_resnet50_fpn_with_compatible_weights():
    ref = DetectorConfig.preset("reference")
    net = build_network(ref, seed=0)
    # MONAI's resnet_fpn_feature_extractor keeps ResNet-50 up to the deepest returned stage
    # (layer2) under "body." and the FPN under "fpn.": same names here, so its weights load.
    r50 = resnet50(spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7])
    kept = ("conv1", "bn1", "layer1", "layer2")
    r50_keys = {f"body.{k}" for k in r50.state_dict() if k.split(".")[0] in kept}
    body_keys = {k for k in net.feature_extractor.state_dict() if k.startswith("body.")}
    assert body_keys == r50_keys
    r50_body = sum(p.numel() for n, p in r50.named_parameters() if n.split(".")[0] in kept)
    assert count_parameters(net.feature_extractor.body) == r50_body
    # Heads (4 × 3×3×3 convs of 256 channels, twice) dominate: ~14.3 M of ~20.9 M weights.
    assert 19e6 < count_parameters(net) < 23e6
    assert net.feature_extractor.out_channels == 256 and net.num_anchors == 3


def test_network_alone_exports_with_torch_export(tiny):
    """The ONNX exporter traces the network through torch.export; detector logic stays outside."""
    net = build_network(tiny, seed=0).eval()
    x = torch.rand(1, 1, *tiny.patch_size)
    program = torch.export.export(net, (x,))
    with torch.no_grad():
        eager, exported = net(x), program.module()(x)
    for key in ("classification", "box_regression"):
        for e, p in zip(eager[key], exported[key], strict=True):
            torch.testing.assert_close(p, e)


@pytest.mark.parametrize("cls_loss", ["hard_negative_bce", "focal"])
def test_tiny_detector_overfits_one_patch_and_finds_the_sphere(tiny, cls_loss):
    tiny = dataclasses.replace(tiny, cls_loss=cls_loss)
    net = build_network(tiny, seed=0)
    det = build_detector(tiny, net)
    assert (det.fg_bg_sampler is None) == (cls_loss == "focal")
    centre = [30.0, 25.0, 17.0]
    image, box = sphere_patch(tiny, centre, diameter_mm=10.0)
    targets = [{"box": box, "label": torch.tensor([0])}]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    torch.manual_seed(0)  # the hard-negative sampler draws negatives at random
    det.train()
    for _ in range(40):
        losses = det(image, targets)
        opt.zero_grad()
        (losses["classification"] + losses["box_regression"]).backward()
        opt.step()
    det.eval()
    with torch.no_grad():
        pred = det(image)[0]
    assert pred["label_scores"][0] > 0.5
    top = convert_box_mode(pred["box"][:1], src_mode="xyzxyz", dst_mode="cccwhd")[0]
    assert (top[:3] - torch.tensor(centre)).abs().max() < 2.0
    assert (top[3:] - (box[0, 3:] - box[0, :3])).abs().max() < 2.0
