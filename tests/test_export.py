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
    card = export_model_package(model_dir, root / "exp", allow_unvalidated=True)
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


def test_a_detector_below_min_cpm_is_not_exported_as_validated(exported, tmp_path):
    model_dir, _, _ = exported  # its package records a validation CPM of 0.25
    with pytest.raises(MedfoundError, match="below min_cpm 0.5"):
        export_model_package(model_dir, tmp_path / "refused", parity_patches=1)
    refused = tmp_path / "refused"
    assert not (refused / "model_card.json").exists() and not (refused / "model.onnx").exists()
    assert json.loads((refused / "parity.json").read_text())["validation"]["status"] == "not validated"
    # Allowed, it is exported and says so; at a lower bar it is validated.
    card = export_model_package(model_dir, tmp_path / "allowed", parity_patches=1, allow_unvalidated=True)
    assert card["validation"]["status"] == "not validated"
    card = export_model_package(model_dir, tmp_path / "ok", parity_patches=1, min_cpm=0.2)
    v = card["validation"]
    assert v["status"] == "validated" and v["cpm"] == 0.25 and v["froc"] == {"0.125": 0.1}
    assert "Research use" in card["intended_use"] and len(card["limitations"]) >= 2
    text = (tmp_path / "ok" / "MODEL_CARD.md").read_text()
    assert "## Intended use" in text and "## Limitations" in text and "**validated**" in text


def test_failed_parity_leaves_no_model_onnx(exported, tmp_path):
    model_dir, _, _ = exported
    pkg = shutil.copytree(model_dir, tmp_path / "model")
    # An impossible bound makes the real gate fail on the real export.
    with pytest.raises(MedfoundError, match="parity failed"):
        export_model_package(pkg, tmp_path / "exp", rtol=0.0, parity_patches=1, allow_unvalidated=True)
    assert not (tmp_path / "exp" / "model.onnx").exists()
    assert (tmp_path / "exp" / "model.onnx.rejected").is_file()
    assert json.loads((tmp_path / "exp" / "parity.json").read_text())["passed"] is False


def test_export_command_writes_the_files_and_refuses_a_non_package(exported, tmp_path):
    from medfound.cli import main

    model_dir, _, _ = exported
    assert main(["export", str(model_dir), "--out", str(tmp_path / "exp"), "--allow-unvalidated"]) == 0
    assert {p.name for p in (tmp_path / "exp").iterdir()} >= {
        "model.onnx", "model_card.json", "MODEL_CARD.md", "parity.json"}
    assert json.loads((tmp_path / "exp" / "parity.json").read_text())["passed"] is True
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "exp2")]) != 0
    assert not (tmp_path / "exp2" / "model.onnx").exists()


# --- CPM parity and INT8 on phantom studies ----------------------------------------------------

QCFG = DetectorConfig.preset("tiny", spacing_mm=[2.8125, 2.8125, 3.0], patch_size=[32, 32, 16],
                             sw_roi_size=[64, 64, 32], score_thresh=0.02)


@pytest.fixture(scope="module")
def phantom_package(tmp_path_factory) -> tuple[Path, Path]:
    from medfound.data.phantoms import make_phantoms

    root = tmp_path_factory.mktemp("export_quality")
    data = make_phantoms(root / "phantoms", centers=2, cases=2, seed=4, size="small", progress=False)
    network = build_network(QCFG, seed=0)
    with torch.no_grad():  # scores spread around 0.5: many candidates, some on nodules
        network.classification_head.cls_logits.bias.zero_()
    package = save_model_package(root / "model", network, task="lung_nodule_detection",
                                 model_config=QCFG.to_dict(),
                                 preprocessing={"spacing_mm": QCFG.spacing_mm, "hu_window": QCFG.hu_window,
                                                "orientation": "LPS"},
                                 provenance={"train_centers": ["center_0"], "val_centers": ["center_1"],
                                             "val_split": "auto", "seed": 0})
    return package, data


def test_int8_acceptance_rule():
    from medfound.export.quality import int8_decision

    assert int8_decision(0.80, 0.795)["accepted"]
    assert int8_decision(0.80, 0.79)["accepted"]  # exactly the 0.01 allowed
    assert not int8_decision(0.80, 0.785)["accepted"]
    assert int8_decision(0.50, 0.52)["accepted"]  # a gain is fine
    assert not int8_decision(0.80, float("nan"))["accepted"]


def test_cpm_parity_and_int8_follow_the_rule(phantom_package, tmp_path):
    from medfound.export.quality import int8_decision
    from medfound.infer import OnnxDetector

    package, data = phantom_package
    card = export_model_package(package, tmp_path / "exp", data_root=data, int8=True,
                                calibration_patches=4, parity_patches=1, allow_unvalidated=True)
    parity = json.loads((tmp_path / "exp" / "parity.json").read_text())
    q = parity["cpm"]
    assert q["passed"] and q["n_scans"] >= 1 and q["n_nodules"] >= 1
    assert abs(q["cpm_onnx"] - q["cpm_torch"]) <= 0.005
    # The deployed path's rows that the gate scores are merged by infer's rule (one finding per
    # object), as the torch path's are: no row is left for merge_by_centre to drop.
    from medfound.export.quality import onnx_predictions, validation_items
    from medfound.infer.boxes import merge_by_centre

    rows = onnx_predictions(OnnxDetector(tmp_path / "exp", providers="cpu"),
                            validation_items(json.loads((package / "model.json").read_text()), data))
    assert len(rows) > 1
    for uid in {r["seriesuid"] for r in rows}:
        mine = [r for r in rows if r["seriesuid"] == uid]
        centres = np.array([[r["coordX"], r["coordY"], r["coordZ"]] for r in mine])
        kept = merge_by_centre(centres, np.array([r["diameter_mm"] for r in mine]),
                               np.array([r["probability"] for r in mine]))
        assert len(kept) == len(mine)
    d = parity["int8"]
    assert d == card["int8"]
    assert d["accepted"] == int8_decision(d["cpm_fp32"], d["cpm_int8"])["accepted"]
    assert d["accepted"]  # raised otherwise
    assert (tmp_path / "exp" / "model.int8.onnx").is_file()
    assert d["sha256"] == sha256_of(tmp_path / "exp" / "model.int8.onnx")
    assert d["input_shape"] == [1, 1, *QCFG.sw_roi_size]  # quantized at the fixed window shape
    assert d["calibration"]["center"] == "center_0" and d["calibration"]["patches"] == 4
    # The quantized graph computes nearly what fp32 computes on a real-intensity window.
    fp32 = OnnxDetector(tmp_path / "exp", providers="cpu")
    int8 = OnnxDetector(tmp_path / "exp", providers="cpu", precision="int8")
    x = np.random.default_rng(0).random((1, 1, *QCFG.sw_roi_size), dtype=np.float32) * 0.3 + 0.1
    a, b = fp32.network(x)[0], int8.network(x)[0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
    assert np.abs(a - b).mean() <= 0.05 * np.abs(a).max()
    assert "INT8" in (tmp_path / "exp" / "MODEL_CARD.md").read_text()


def test_rejected_int8_leaves_only_the_fp32_model(phantom_package, tmp_path):
    from medfound.infer import OnnxDetector

    package, data = phantom_package
    with pytest.raises(MedfoundError, match="INT8 rejected"):
        export_model_package(package, tmp_path / "exp", data_root=data, int8=True,
                             calibration_patches=2, parity_patches=1, max_cpm_drop=-1.0,
                             allow_unvalidated=True)
    out = tmp_path / "exp"
    assert not (out / "model.int8.onnx").exists() and (out / "model.int8.onnx.rejected").is_file()
    assert json.loads((out / "parity.json").read_text())["int8"]["accepted"] is False
    OnnxDetector(out, providers="cpu")  # the fp32 model passed and stays usable
    with pytest.raises(MedfoundError, match="no accepted INT8"):
        OnnxDetector(out, providers="cpu", precision="int8")


def test_int8_needs_validation_data(exported, tmp_path):
    model_dir, _, _ = exported
    with pytest.raises(MedfoundError, match="CPM drop"):
        export_model_package(model_dir, tmp_path / "exp", int8=True, parity_patches=1)
    assert not (tmp_path / "exp" / "model.onnx").exists()



def test_the_task_exporters_stand_on_the_shared_gate_without_the_entry_point():
    """The exporters import the shared gate and card, never the entry point (export.onnx, which
    dispatches to them): in a fresh interpreter export.segmentation loads neither export.onnx nor
    export.detection, and export.detection then adds only itself."""
    import subprocess
    import sys

    code = ("import sys\n"
            "def loaded(): return {m for m in sys.modules if m.startswith('medfound.export.')}\n"
            "import medfound.export.segmentation\n"
            "first = loaded()\n"
            "import medfound.export.detection\n"
            "print(' '.join(sorted(first)), '|', ' '.join(sorted(loaded() - first)))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    first, added = (set(part.split()) for part in run.stdout.split("|"))
    assert first == {"medfound.export.card", "medfound.export.gate", "medfound.export.segmentation"}
    assert added == {"medfound.export.detection"}
