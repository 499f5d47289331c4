"""The numpy + onnxruntime inference core gives MONAI's detector results, and runs without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.data.box_utils import batched_nms

from conftest import BLOCK_TORCH
from medfound.errors import MedfoundError
from medfound.export.onnx import export_model_package
from medfound.infer import OnnxDetector, normalize_hu, resample_to_spacing
from medfound.infer.boxes import cell_anchors, grid_anchors, nms
from medfound.models.detection import DetectorConfig, build_detector, build_network
from medfound.train.package import save_model_package

torch.set_num_threads(1)

# score_thresh low so that the random-weight network gives detections to compare.
CFG = DetectorConfig.preset("tiny", patch_size=[32, 32, 16], sw_roi_size=[32, 32, 16], score_thresh=0.02)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    root = tmp_path_factory.mktemp("infer")
    network = build_network(CFG, seed=0)
    with torch.no_grad():  # a zero prior bias spreads scores around 0.5: many boxes reach NMS
        network.classification_head.cls_logits.bias.zero_()
    package = save_model_package(root / "model", network, task="lung_nodule_detection",
                                 model_config=CFG.to_dict(),
                                 preprocessing={"spacing_mm": CFG.spacing_mm, "hu_window": CFG.hu_window})
    export_model_package(package, root / "exp", parity_patches=1, allow_unvalidated=True)
    return network.eval(), root / "exp"


def _with_detector(exp: Path, dst: Path, **changes) -> Path:
    """A copy of the export whose card's detector settings are changed (same model.onnx)."""
    shutil.copytree(exp, dst)
    card = json.loads((dst / "model_card.json").read_text())
    card["detector"].update(changes)
    (dst / "model_card.json").write_text(json.dumps(card))
    return dst


def _torch_detections(network, volume: np.ndarray, mode: str, detections_per_img: int):
    detector = build_detector(CFG, network).eval()
    detector.set_sliding_window_inferer(roi_size=CFG.sw_roi_size, overlap=CFG.sw_overlap,
                                        sw_batch_size=CFG.sw_batch_size, mode=mode)
    detector.set_box_selector_parameters(score_thresh=CFG.score_thresh,
                                         topk_candidates_per_level=CFG.topk_candidates_per_level,
                                         nms_thresh=CFG.nms_thresh, detections_per_img=detections_per_img)
    with torch.no_grad():
        out = detector([torch.from_numpy(volume)[None]], use_inferer=True)[0]
    return out["box"].numpy(), out["label_scores"].numpy(), out["label"].numpy()


@pytest.mark.parametrize(("mode", "shape", "max_dets"), [
    ("constant", (45, 40, 27), 100),   # larger than the 32x32x16 window: 2x2x3 windows, end padding
    ("gaussian", (45, 40, 27), 100),
    ("gaussian", (20, 70, 12), 7),     # smaller than the window on i and k: centred padding
])
def test_numpy_detector_equals_monai_detector(model, tmp_path, mode, shape, max_dets):
    network, exp = model
    volume = np.random.default_rng(1).random(shape, dtype=np.float32)
    onnx_detector = OnnxDetector(_with_detector(exp, tmp_path / "exp", sw_mode=mode,
                                                detections_per_img=max_dets), providers="cpu")
    boxes, scores, labels = onnx_detector.predict(volume)
    ref_boxes, ref_scores, ref_labels = _torch_detections(network, volume, mode, max_dets)

    assert len(ref_boxes) > 0
    assert boxes.shape == ref_boxes.shape and boxes.dtype == np.float32
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, ref_boxes, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(labels, ref_labels)


def test_anchors_equal_monai_anchor_generator():
    shapes, scales = [[3, 4, 2], [4, 3, 3], [5, 5, 3]], [1, 2, 4]
    monai_gen = AnchorGeneratorWithAnchorShape(feature_map_scales=scales,
                                               base_anchor_shapes=[list(map(float, s)) for s in shapes])
    image, grids = (1, 1, 48, 64, 24), [(12, 16, 12), (6, 8, 6), (3, 4, 3)]
    ref = monai_gen(torch.zeros(image), [torch.zeros(1, 3, *g) for g in grids])[0].numpy()
    ours = np.concatenate(grid_anchors(cell_anchors(shapes, scales), grids, image[2:]))
    np.testing.assert_array_equal(ours, ref)


def test_nms_equals_monai_batched_nms():
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 40, (300, 3)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(2, 12, (300, 3)).astype(np.float32)], 1)
    scores = rng.random(300, dtype=np.float32)
    labels = rng.integers(0, 2, 300)
    ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels),
                      0.22, max_proposals=50).numpy()
    offsets = labels.astype(np.float32) * (boxes.max() + 1)
    np.testing.assert_array_equal(nms(boxes + offsets[:, None], scores, 0.22, 50), ref)


def test_inference_core_runs_without_torch_or_monai(model):
    _, exp = model
    volume = np.random.default_rng(1).random((45, 40, 27), dtype=np.float32)
    expected = OnnxDetector(exp, providers="cpu").predict(volume)
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import sys
        import numpy as np
        from medfound.infer import OnnxDetector
        volume = np.random.default_rng(1).random((45, 40, 27), dtype=np.float32)
        boxes, scores, labels = OnnxDetector({str(exp)!r}).predict(volume)
        assert not any(m.split(".")[0] in ("torch", "monai") for m in sys.modules)
        np.savez(sys.argv[1], boxes=boxes, scores=scores, labels=labels)
    """)
    out = exp.parent / "torch_free.npz"
    run = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    np.testing.assert_array_equal(got["boxes"], expected[0])
    np.testing.assert_array_equal(got["scores"], expected[1])
    assert len(got["boxes"]) > 0


def test_a_changed_onnx_file_is_refused(model, tmp_path):
    _, exp = model
    copy = shutil.copytree(exp, tmp_path / "exp")
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(MedfoundError, match="sha256"):
        OnnxDetector(copy)


def test_missing_provider_is_a_clear_error(model):
    with pytest.raises(MedfoundError, match="not available"):
        OnnxDetector(model[1], providers=["NoSuchExecutionProvider"])


def test_preprocess_windows_hu_and_resamples_to_spacing():
    hu = np.array([[[-2000.0, -1024.0, 300.0, 1000.0]]])
    np.testing.assert_allclose(normalize_hu(hu, [-1024.0, 300.0]).ravel(), [0, 0, 1, 1])

    affine = np.diag([0.7, 0.7, 1.25, 1.0])
    affine[:3, 3] = [-100.0, -50.0, 20.0]
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None] * 0.7, (40, 8, 16))
    out, new_affine = resample_to_spacing(ramp, affine, [1.4, 1.4, 2.5])
    assert out.shape == (20, 4, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.diag(new_affine)[:3], [1.4, 1.4, 2.5])
    np.testing.assert_allclose(new_affine[:3, 3], affine[:3, 3])
    # A linear ramp in mm is reproduced exactly by linear interpolation.
    np.testing.assert_allclose(out[:, 0, 0], np.arange(20) * 1.4, atol=1e-4)


def test_io_binding_gives_the_same_outputs(model):
    """The IOBinding path (used on CUDA/TensorRT) runs here on the CPU and must not change a number."""
    _, exp = model
    volume = np.random.default_rng(2).random((45, 40, 27), dtype=np.float32)
    plain = OnnxDetector(exp, providers="cpu", io_binding=False)
    bound = OnnxDetector(exp, providers="cpu", io_binding=True)
    assert not plain.io_binding and bound.io_binding
    for a, b in zip(plain.predict(volume), bound.predict(volume), strict=True):
        np.testing.assert_array_equal(a, b)
