"""Engines behind medfound.infer: onnxruntime and OpenVINO, chosen by the export gate's record;
and the preprocessing's SimpleITK resampling held to the numpy reference.

One tiny detector (random weights, zero prior bias: many detections near p = 0.5) is exported
with `--data` on small phantoms and `--int8`, so its card records every engine × precision
this machine runs (`card["variants"]`: CPM against torch fp32, agreement, seconds per window).
"""

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

from conftest import BLOCK_TORCH
from medfound.errors import MedfoundError
from medfound.export.onnx import export_model_package
from medfound.infer.engine import OnnxDetector, choose_variant, cpu_capabilities
from medfound.infer.study import run_studies
from medfound.models.detection import DetectorConfig, build_network
from medfound.train.package import save_model_package

torch.set_num_threads(1)

CFG = DetectorConfig.preset("tiny", spacing_mm=[2.8125, 2.8125, 3.0], patch_size=[32, 32, 16],
                            sw_roi_size=[64, 64, 32], score_thresh=0.02)
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> dict:
    from medfound.data.phantoms import make_phantoms

    pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("infer_engines")
    data = make_phantoms(root / "phantoms", centers=2, cases=2, seed=4, size="small", progress=False)
    network = build_network(CFG, seed=0)
    with torch.no_grad():
        network.classification_head.cls_logits.bias.zero_()
    package = save_model_package(root / "model", network, task="lung_nodule_detection",
                                 model_config=CFG.to_dict(),
                                 preprocessing={"spacing_mm": CFG.spacing_mm, "hu_window": CFG.hu_window,
                                                "orientation": "LPS"},
                                 provenance={"train_centers": ["center_0"], "val_centers": ["center_1"],
                                             "val_split": "auto", "seed": 0})
    card = export_model_package(package, root / "exp", data_root=data, int8=True,
                                calibration_patches=4, parity_patches=1, allow_unvalidated=True)
    study = next((data / "center_1").glob("case_*/ct"))
    return {"root": root, "exp": root / "exp", "card": card, "study": study}


def _edited_copy(exp: Path, dst: Path, edit) -> Path:
    """A copy of the export folder whose model_card.json is `edit(card)`."""
    shutil.copytree(exp, dst)
    card = json.loads((dst / "model_card.json").read_text())
    edit(card)
    (dst / "model_card.json").write_text(json.dumps(card))
    return dst


def test_the_export_gate_records_every_engine_and_precision_it_measured(gated):
    card = gated["card"]
    on_disk = json.loads((gated["exp"] / "model_card.json").read_text())
    assert on_disk["variants"] == card["variants"]
    got = {(v["engine"], v["precision"]) for v in card["variants"]}
    expected = {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"),
                ("openvino", "int8")}
    if cpu_capabilities()["bf16"]:
        expected.add(("openvino", "bf16"))
    assert got == expected
    cpm_torch = card["parity"]["cpm"]["cpm_torch"]
    for v in card["variants"]:
        assert v["cpm_torch"] == pytest.approx(cpm_torch)
        assert v["delta"] == pytest.approx(v["cpm"] - cpm_torch, abs=1e-6)
        assert v["passed"] == (abs(v["delta"]) <= 0.01 + 1e-12)
        assert v["seconds_per_window"] > 0 and v["cpu"]["cpu"]
        a = v["agreement"]
        assert a["n_nodules"] >= 1 and a["probability_tolerance"] == 0.02
        assert a["agrees"] == (a["same_nodules_hit"] and a["max_probability_diff"] <= 0.02)
    fp32 = {v["engine"]: v for v in card["variants"] if v["precision"] == "fp32"}
    # onnxruntime fp32 is the deployed path the CPM gate measured; OpenVINO fp32 finds the same.
    assert fp32["onnxruntime"]["cpm"] == pytest.approx(card["parity"]["cpm"]["cpm_onnx"])
    assert fp32["openvino"]["agreement"]["agrees"] and fp32["openvino"]["passed"]
    assert "variant openvino fp32" in (gated["exp"] / "MODEL_CARD.md").read_text()


def test_openvino_fp32_head_outputs_equal_onnxruntime(gated):
    x = np.random.default_rng(0).random((2, 1, *CFG.sw_roi_size), dtype=np.float32) * 0.4 + 0.05
    ort = OnnxDetector(gated["exp"], engine="onnxruntime", precision="fp32", threads=1)
    ov = OnnxDetector(gated["exp"], engine="openvino", precision="fp32", threads=1)
    assert ov.providers == ["OpenVINO CPU (f32)"] and ov.choice["engine"] == "openvino"
    for name, a, b in zip(ort.output_names, ort.network(x), ov.network(x), strict=True):
        assert a.shape == b.shape, name
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), name
    # INT8 on both engines runs the same quantized graph (fixed batch of one window).
    ort8 = OnnxDetector(gated["exp"], engine="onnxruntime", precision="int8", threads=1)
    ov8 = OnnxDetector(gated["exp"], engine="openvino", precision="int8", threads=1)
    assert ort8.sw_batch_size == ov8.sw_batch_size == 1
    a, b = ort8.network(x[:1])[0], ov8.network(x[:1])[0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_openvino_end_to_end_gives_the_onnxruntime_findings(gated, tmp_path):
    ref = run_studies(gated["exp"], [gated["study"]], tmp_path / "ort", engine="onnxruntime",
                      precision="fp32", threshold=THRESHOLD, max_findings=10, sr=False,
                      threads=1, progress=False)
    out = tmp_path / "ov"
    proc = subprocess.run([sys.executable, "-m", "medfound", "infer", "--model", str(gated["exp"]),
                           str(gated["study"]), "--out", str(out), "--engine", "openvino",
                           "--precision", "fp32", "--threshold", str(THRESHOLD),
                           "--max-findings", "10", "--no-sr", "--threads", "1", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "engine: openvino fp32 (OpenVINO CPU (f32))" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    model = summary["model"]
    assert (model["engine"], model["precision"]) == ("openvino", "fp32")
    assert model["engine_reason"].startswith("as asked; the export gate passed it")
    a = json.loads((Path(ref["studies"][0]["out"]) / "findings.json").read_text())
    b = json.loads((Path(summary["studies"][0]["out"]) / "findings.json").read_text())
    assert b["model"]["engine"] == "openvino" and b["model"]["engine_reason"] == model["engine_reason"]
    assert a["model"]["engine"] == "onnxruntime"
    assert len(a["findings"]) == len(b["findings"]) > 0
    for fa, fb in zip(a["findings"], b["findings"], strict=True):
        np.testing.assert_allclose(fa["center_lps_mm"], fb["center_lps_mm"], atol=0.05)
        assert fa["probability"] == pytest.approx(fb["probability"], abs=1e-3)


def test_auto_picks_the_fastest_passed_variant_and_says_why(gated, tmp_path):
    card = gated["card"]
    caps = cpu_capabilities()
    runnable = [v for v in card["variants"] if v["passed"]
                and (v["precision"] != "bf16" or caps["bf16"])]
    fastest = min(runnable, key=lambda v: v["seconds_per_window"])
    choice = choose_variant(card, "auto", "auto", folder=gated["exp"])
    assert (choice["engine"], choice["precision"]) == (fastest["engine"], fastest["precision"])
    assert choice["reason"].startswith(f"the fastest of {len(runnable)} variant(s)")
    summary = run_studies(gated["exp"], [gated["study"]], tmp_path / "auto", engine="auto",
                          precision="auto", threshold=THRESHOLD, sr=False, threads=1,
                          progress=False)
    model = summary["model"]
    assert (model["engine"], model["precision"], model["engine_reason"]) == (
        choice["engine"], choice["precision"], choice["reason"])
    findings = json.loads((Path(summary["studies"][0]["out"]) / "findings.json").read_text())
    assert findings["model"]["engine_reason"] == choice["reason"]
    # A machine without bf16 does not get the bf16 variant, and is told so.
    no_bf16 = {**caps, "bf16": False}
    fast_bf16 = {**card, "variants": [{**v, "seconds_per_window": 1e-6 if v["precision"] == "bf16"
                                       else v["seconds_per_window"]} for v in card["variants"]]}
    if any(v["precision"] == "bf16" and v["passed"] for v in card["variants"]):
        assert choose_variant(fast_bf16, caps=caps)["precision"] == "bf16"
        other = choose_variant(fast_bf16, caps=no_bf16)
        assert other["precision"] != "bf16" and "no bf16" in other["reason"]
    # A card without measured variants runs the parity-gated fp32 model on onnxruntime.
    bare = {k: v for k, v in card.items() if k != "variants"}
    assert choose_variant(bare)["engine"] == "onnxruntime"
    assert "exported without --data" in choose_variant(bare)["reason"]
    assert choose_variant(bare, "openvino")["engine"] == "openvino"
    with pytest.raises(MedfoundError, match="did not measure"):
        choose_variant(bare, "openvino", "bf16", caps={**caps, "bf16": True})


def test_a_variant_that_failed_the_gate_is_never_used(gated, tmp_path):
    def fail_openvino_fp32(card):
        for v in card["variants"]:
            if (v["engine"], v["precision"]) == ("openvino", "fp32"):
                v.update(passed=False, delta=0.03, reason="|ΔCPM| 0.0300 > 0.01",
                         seconds_per_window=1e-6)  # and the fastest: auto must still pass it by

    exp = _edited_copy(gated["exp"], tmp_path / "exp", fail_openvino_fp32)
    card = json.loads((exp / "model_card.json").read_text())
    choice = choose_variant(card, folder=exp)
    assert (choice["engine"], choice["precision"]) != ("openvino", "fp32")
    assert "failed the gate, never used: openvino fp32" in choice["reason"]
    ov = choose_variant(card, "openvino", "auto", folder=exp)
    assert ov["engine"] == "openvino" and ov["precision"] != "fp32"
    with pytest.raises(MedfoundError, match="failed the export gate"):
        OnnxDetector(exp, engine="openvino", precision="fp32")
    proc = subprocess.run([sys.executable, "-m", "medfound", "infer", "--model", str(exp),
                           str(gated["study"]), "--out", str(tmp_path / "out"), "--engine",
                           "openvino", "--precision", "fp32", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # One line (beside the unvalidated model's warning), naming the refused variant and why.
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and "openvino fp32 is not used: it failed the export gate" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "summary.json").exists()


def test_the_openvino_path_needs_no_torch(gated, tmp_path):
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import sys
        from medfound.infer.study import run_studies
        s = run_studies({str(gated["exp"])!r}, [{str(gated["study"])!r}], {str(tmp_path / "out")!r},
                        engine="openvino", precision="auto", threshold={THRESHOLD}, threads=1,
                        progress=False)
        assert not any(m.split(".")[0] in ("torch", "monai") for m in sys.modules)
        assert s["n_ok"] == 1 and s["model"]["engine"] == "openvino", s
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_variant_rule_and_agreement():
    from medfound.export.quality import variant_decision

    assert variant_decision(0.80, 0.79)["passed"]  # exactly the 0.01 allowed
    assert not variant_decision(0.80, 0.785)["passed"]
    assert not variant_decision(0.50, 0.52)["passed"]  # finding more also changes the findings
    assert not variant_decision(0.80, float("nan"))["passed"]


def test_finding_agreement_compares_the_nodules_hit_and_their_probabilities():
    from medfound.export.quality import finding_agreement

    items = [{"seriesuid": "s1", "box": [[0.0, 0.0, 0.0, 10.0, 10.0, 10.0],
                                         [50.0, 0.0, 0.0, 8.0, 8.0, 8.0]]},
             {"seriesuid": "s2", "box": [[0.0, 0.0, 0.0, 6.0, 6.0, 6.0]]}]

    def rows(*found):  # (series, x, probability) per candidate
        return [{"seriesuid": s, "coordX": x, "coordY": 0.0, "coordZ": 0.0, "probability": p}
                for s, x, p in found]

    torch_rows = rows(("s1", 1.0, 0.60), ("s1", 2.0, 0.40), ("s2", 30.0, 0.9), ("s1", 51.0, 0.70))
    same = finding_agreement(torch_rows, rows(("s1", 1.5, 0.61), ("s1", 50.5, 0.69)), items)
    assert same == {"n_nodules": 3, "n_hit_torch": 2, "n_hit": 2, "same_nodules_hit": True,
                    "max_probability_diff": pytest.approx(0.01), "probability_tolerance": 0.02,
                    "agrees": True}
    drift = finding_agreement(torch_rows, rows(("s1", 1.5, 0.65), ("s1", 50.5, 0.70)), items)
    assert drift["same_nodules_hit"] and not drift["agrees"]
    assert drift["max_probability_diff"] == pytest.approx(0.05)
    missed = finding_agreement(torch_rows, rows(("s1", 1.5, 0.60), ("s2", 0.5, 0.3)), items)
    assert not missed["same_nodules_hit"] and not missed["agrees"] and missed["n_hit"] == 2


@pytest.mark.parametrize("old, new, shape", [
    ([0.7, 0.7, 1.25], [1.4, 1.4, 2.5], (40, 33, 20)),      # downsampling by 2
    ([0.6836, 0.6836, 1.0], [1.40625, 1.40625, 2.5], (57, 50, 31)),  # a CT to the tiny grid
    ([2.5, 2.0, 3.0], [1.0, 0.7, 0.9], (9, 12, 7)),          # upsampling: samples past the last centre
    ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], (5, 6, 7)),           # the identity
    ([0.9, 1.3, 0.5], [2.7, 0.65, 0.55], (1, 4, 3)),         # a one-voxel axis
])
def test_simpleitk_resampling_equals_the_numpy_passes(old, new, shape):
    from medfound.infer.preprocess import resample_to_spacing

    rng = np.random.default_rng(sum(shape))
    hu = (rng.random(shape) * 2400 - 1200).astype(np.float32)
    affine = np.diag([*old, 1.0])
    affine[:3, 3] = [-120.0, 30.5, 7.25]
    # memory orders the reader and canonical_axes give: C, i-fastest (Fortran) and flipped views
    for volume in (hu, np.asfortranarray(hu), np.asfortranarray(hu)[::-1, :, ::-1],
                   hu.astype(np.float64), hu.astype(np.int16)):
        a, a_aff = resample_to_spacing(volume, affine, new)
        b, b_aff = resample_to_spacing(volume, affine, new, backend="numpy")
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a_aff, b_aff)
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3)  # HU; float32 rounding only


def test_simpleitk_resampling_keeps_a_linear_ramp_and_the_edge_values():
    from medfound.infer.preprocess import resample_to_spacing

    affine = np.diag([0.7, 0.7, 1.25, 1.0])
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None] * 0.7, (40, 8, 16))
    out, _ = resample_to_spacing(ramp, affine, [0.3, 1.4, 2.5])
    positions = np.arange(out.shape[0]) * 0.3  # mm from the first centre
    np.testing.assert_allclose(out[:, 0, 0], np.minimum(positions, 39 * 0.7), atol=1e-4)
    with pytest.raises(MedfoundError, match="backend"):
        resample_to_spacing(ramp, affine, [1.4, 1.4, 2.5], backend="scipy")
