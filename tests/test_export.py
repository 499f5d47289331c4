"""ONNX export of a model package: the files it writes and the parity gate that guards them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from medfound.errors import MedfoundError
from medfound.export.onnx import check_parity, export_model_package
from medfound.infer.engine import sha256_of
from medfound.models.detection import DetectorConfig, build_network
from medfound.train.package import load_weights, save_model_package

torch.set_num_threads(1)

CFG = DetectorConfig.preset("tiny", patch_size=[32, 32, 16], sw_roi_size=[32, 32, 16])


def _package(path: Path) -> Path:
    network = build_network(CFG, seed=0)
    return save_model_package(path, network, task="lung_nodule_detection", model_config=CFG.to_dict(),
                              preprocessing={"spacing_mm": CFG.spacing_mm, "hu_window": CFG.hu_window,
                                             "orientation": "LPS"},
                              metrics={"cpm": 0.25, "froc": {"0.125": 0.1}},
                              provenance={"train_centers": ["center_0"], "seed": 0})


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("export")
    model_dir = _package(root / "run" / "model")
    card = export_model_package(model_dir, root / "exp")
    return model_dir, root / "exp", card


def test_export_writes_onnx_card_and_parity_report(exported):
    _, exp, card = exported
    for name in ("model.onnx", "model_card.json", "MODEL_CARD.md", "parity.json"):
        assert (exp / name).is_file(), name
    on_disk = json.loads((exp / "model_card.json").read_text())
    assert on_disk == json.loads(json.dumps(card))
    assert card["onnx"]["sha256"] == sha256_of(exp / "model.onnx")
    assert card["onnx"]["output_names"] == ["cls_0", "cls_1", "cls_2", "box_0", "box_1", "box_2"]
    assert {"modality": "CT", "spacing_mm": CFG.spacing_mm, "hu_window": CFG.hu_window,
            "patch_size": [32, 32, 16]}.items() <= card["input"].items()
    det = card["detector"]
    assert det["base_anchor_shapes"] == [list(map(float, s)) for s in CFG.base_anchor_shapes]
    assert det["feature_map_scales"] == [1, 2, 4]
    assert det["box_coder_weights"] == [1.0] * 6
    assert (det["score_thresh"], det["nms_thresh"], det["sw_mode"]) == (CFG.score_thresh, CFG.nms_thresh, "constant")
    assert card["metrics"]["cpm"] == 0.25
    assert {"torch", "onnx", "onnxruntime", "monai"} <= set(card["versions"])
    parity = json.loads((exp / "parity.json").read_text())
    assert parity["passed"] and parity["max_rel"] <= 1e-4
    assert parity["onnx_sha256"] == card["onnx"]["sha256"]
    assert card["onnx"]["sha256"] in (exp / "MODEL_CARD.md").read_text()
    # The graph is self-contained (no external weight file) and its batch/spatial axes are symbolic.
    assert not list(exp.glob("*.data"))
    assert all(isinstance(d, str) for i, d in enumerate(card["onnx"]["input_shape"]) if i != 1)


def test_parity_gate_fails_on_a_corrupted_weight(exported, tmp_path):
    model_dir, exp, _ = exported
    graph = onnx.load(str(exp / "model.onnx"))
    # Nudge the largest weight tensor by 1 %: small enough to look plausible, far above 1e-4.
    target = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(target).copy()
    target.CopyFrom(numpy_helper.from_array(weights * np.float32(1.01), target.name))
    bad = tmp_path / "model.onnx"
    onnx.save(graph, str(bad))

    network = load_weights(model_dir, build_network(CFG)).eval()
    with pytest.raises(MedfoundError, match="parity failed"):
        check_parity(network, bad, [[1, 1, 32, 32, 16]], tmp_path / "parity.json", patches=1)
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] is False and report["max_rel"] > 1e-4


def test_export_refuses_a_folder_that_is_not_a_package(tmp_path):
    with pytest.raises(MedfoundError, match="not a model package"):
        export_model_package(tmp_path, tmp_path / "exp")


def test_failed_parity_leaves_no_model_onnx(exported, tmp_path):
    model_dir, _, _ = exported
    pkg = shutil.copytree(model_dir, tmp_path / "model")
    # An impossible bound makes the real gate fail on the real export.
    with pytest.raises(MedfoundError, match="parity failed"):
        export_model_package(pkg, tmp_path / "exp", rtol=0.0, parity_patches=1)
    assert not (tmp_path / "exp" / "model.onnx").exists()
    assert (tmp_path / "exp" / "model.onnx.rejected").is_file()
    assert json.loads((tmp_path / "exp" / "parity.json").read_text())["passed"] is False


def test_export_command_writes_the_files_and_refuses_a_non_package(exported, tmp_path):
    from medfound.cli import main

    model_dir, _, _ = exported
    assert main(["export", str(model_dir), "--out", str(tmp_path / "exp")]) == 0
    assert {p.name for p in (tmp_path / "exp").iterdir()} >= {
        "model.onnx", "model_card.json", "MODEL_CARD.md", "parity.json"}
    assert json.loads((tmp_path / "exp" / "parity.json").read_text())["passed"] is True
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "exp2")]) != 0
    assert not (tmp_path / "exp2" / "model.onnx").exists()
