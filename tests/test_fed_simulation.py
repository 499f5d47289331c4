"""The federate recipe in simulation mode, end to end: real Flower simulation engine (Ray),
real centers on phantoms, real MLflow store; then what left the centers, byte by byte."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from medfound.data.phantoms import make_phantoms
from medfound.fed.audit import read_audit

pytestmark = pytest.mark.slow

CENTERS = ["center_0", "center_1", "center_2"]
FAST = ["fed.mode=simulation", f"fed.centers=[{','.join(CENTERS)}]", "experiment=phantoms_smoke",
        "trainer.progress=false", "data.num_patches_per_image=1", "fed.eval_bootstraps=10",
        # One inference window per study keeps each center's evaluation to about a second.
        "network.sw_roi_size=[144,144,96]"]


def federate(*overrides: str) -> subprocess.CompletedProcess:
    keys = {o.split("=", 1)[0] for o in overrides}
    base = [o for o in FAST if o.split("=", 1)[0] not in keys]
    return subprocess.run([sys.executable, "-m", "medfound", "run", "federate", *base, *overrides],
                          capture_output=True, text=True, check=False, timeout=600)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fed") / "phantoms"
    make_phantoms(root, centers=3, cases=3, seed=5, size="small", progress=False)
    return root


@pytest.fixture(scope="module")
def federated(phantoms: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fed_run") / "FED"
    res = federate(f"data.root={phantoms}", "fed.rounds=2", "fed.audit_payloads=true",
                   "fed.share_local_models=true", f"out_dir={out}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


def test_simulation_leaves_a_model_package_metrics_audit_logs_and_an_mlflow_run(
        federated: Path) -> None:
    from mlflow import MlflowClient

    from medfound.models.detection import DetectorConfig, build_network
    from medfound.train.package import load_weights, read_model_json

    metrics = json.loads((federated / "metrics.json").read_text())
    assert metrics["rounds_completed"] == 2 and metrics["centers"] == CENTERS
    assert [g["round"] for g in metrics["global"]] == [1, 2]
    assert len(metrics["round_durations_s"]) == 2 and min(metrics["round_durations_s"]) > 0
    for record in metrics["rounds"]:
        assert record["aggregated"] and record["train"]["accepted"] == CENTERS
        assert record["train"]["rejected"] == [] and record["train"]["failed"] == []
        assert sorted(record["evaluate"]["centers"]) == CENTERS
        assert not record["evaluate"]["pending"]
        for center in CENTERS:
            assert record["train"]["centers"][center]["num-examples"] >= 1
    # One exchange a round: round 1's model is scored inside round 2's train message; the
    # last model in an evaluate message of its own.
    assert [r["evaluate"]["in_round"] for r in metrics["rounds"]] == [2, 2]
    # The updates were spooled to disk as they arrived (fed.stream_aggregation); none is left.
    assert not (federated / "server" / "spool").exists()
    # Bytes each center sent = the sum of its audit log; an update is about one fp32 model.
    for center in CENTERS:
        audit = read_audit(federated / "audit" / f"{center}.jsonl")
        # Before round 1 the coordinator asked each node who it is (a query: its name only).
        assert [(a["round"], a["kind"]) for a in audit] == [(1, "query"), (1, "train"), (2, "train"),
                                                            (2, "evaluate"), (2, "cross-site")]
        assert "n_nodules" in audit[2]["metrics"]  # the scores rode in the train reply
        assert metrics["bytes_per_center"][center]["sent"] == sum(a["bytes"] for a in audit)
        for a in audit:
            if a["kind"] == "train":
                assert a["bytes"] <= 1.05 * metrics["model_bytes_fp32"]

    # The package is what evaluate_detector and export load; it holds the last global model.
    meta = read_model_json(federated / "model")
    assert meta["task"] == "lung_nodule_detection"
    assert meta["provenance"]["federated"] is True
    assert meta["provenance"]["train_centers"] == CENTERS
    network = load_weights(federated / "model", build_network(DetectorConfig.from_dict(meta["model"])))
    state = torch.load(federated / "server" / "state.pt", weights_only=True)
    assert state["round"] == 2
    for key, value in state["model"].items():
        torch.testing.assert_close(network.state_dict()[key], value, rtol=0, atol=0)

    run_id = json.loads((federated / "mlflow_run.json").read_text())["run_id"]
    assert meta["provenance"]["mlflow_run_id"] == run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{federated / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["fed.strategy.name"] == "fedavg"
    assert [m.step for m in client.get_metric_history(run_id, "round_duration_s")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "center_0/train/loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "center_2/bytes_sent")] == [1, 2]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"metrics.json", "model",
                                                               "cross_site.csv", "cross_site.png"}

    # Each center keeps its own MLflow run (in its work folder), reopened every round.
    with_validation = 0
    for center in CENTERS:
        local = MlflowClient(tracking_uri=f"sqlite:///{federated / 'centers' / center / 'mlruns' / 'mlflow.db'}")
        runs = local.search_runs([local.get_experiment_by_name("medfound-center").experiment_id])
        assert len(runs) == 1 and runs[0].info.run_name.startswith(center)
        assert runs[0].info.status == "FINISHED" and runs[0].data.params["center"] == center
        local_id = runs[0].info.run_id
        assert [m.step for m in local.get_metric_history(local_id, "train/loss")] == [1, 2]
        assert [m.value for m in local.get_metric_history(local_id, "round")] == [1, 2]
        cpm = local.get_metric_history(local_id, "val/cpm")
        if cpm:
            with_validation += 1
            assert [m.step for m in cpm] == [1, 2]
            assert [m.value for m in cpm] == [metrics["rounds"][r]["evaluate"]["centers"][center]["cpm"]
                                              for r in (0, 1)]
    assert with_validation >= 1


def test_cross_site_matrix_scores_the_global_and_each_local_model_at_every_center(
        federated: Path) -> None:
    from medfound.fed.cross_site import read_cross_site

    metrics = json.loads((federated / "metrics.json").read_text())
    models, centers, matrix = read_cross_site(federated / "cross_site.csv")
    assert models == ["global", *(f"local:{c}" for c in CENTERS)] and centers == CENTERS
    last = metrics["rounds"][-1]["evaluate"]["centers"]
    detail = metrics["cross_site"]["models"]
    assert metrics["cross_site"]["failed"] == [] and metrics["cross_site"]["round"] == 2
    for j, center in enumerate(CENTERS):
        if "cpm" not in last[center]:  # no validation nodules there: no CPM for any model
            assert np.isnan(matrix[:, j]).all()
            continue
        # The global row is evaluated again: it must repeat the last round's evaluation.
        assert matrix[0, j] == pytest.approx(last[center]["cpm"], abs=1e-4)
        assert detail["global"][center] == last[center]
        for i, model in enumerate(models):
            assert 0.0 <= matrix[i, j] <= 1.0
            assert detail[model][center]["num-examples"] == last[center]["num-examples"]
    assert not np.isnan(matrix).all()
    assert (federated / "cross_site.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The local models are the centers' own round-2 updates, not the global model again.
    assert metrics["rounds"][-1]["train"]["update_norms"]["center_0"] > 0


def test_no_phi_and_no_image_data_in_any_outbound_payload(federated: Path,
                                                          phantoms: Path) -> None:
    from medfound.data.detection import eval_transforms, load_datalist
    from medfound.io.reader import read_volume

    # Every payload that left a center, checked against the hash its audit log recorded.
    payloads = []
    for center in CENTERS:
        for entry in read_audit(federated / "audit" / f"{center}.jsonl"):
            data = (federated / "audit" / center / f"{entry['sha256']}.bin").read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            assert len(data) == entry["bytes"]
            payloads.append(data)
    # per center: its name (the query), 2 train, 1 evaluate, 1 cross-site
    assert len(payloads) == 3 * (1 + 2 + 1 + 1)

    def leaked(needle: bytes) -> bool:
        return any(needle in p for p in payloads)

    # PHI: every identifying header value of every phantom file, and where the data lives.
    phi: set[str] = {str(phantoms), "case_000", "datalist"}
    for path in phantoms.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for key in ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate",
                    "AccessionNumber", "InstitutionName", "ReferringPhysicianName",
                    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = str(ds.get(key, "") or "")
            if len(value) >= 6:
                phi.add(value)
    assert len(phi) > 100
    found = sorted(v for v in phi if leaked(v.encode()) or leaked(v.encode("utf-16-le")))
    assert found == []

    # Image data: stored pixels, HU volumes (float32 and float16) and the preprocessed input
    # the network sees, 64-byte runs from the middle of each study (where tissue varies).
    runs: list[bytes] = []
    for center in CENTERS:
        for item in load_datalist(phantoms, [center], "all"):
            hu = read_volume(item["image"]).array
            i, j, k = (n // 2 for n in hu.shape)
            for dk in (-10, 0, 10):
                runs.append(np.ascontiguousarray(hu[i - 8:i + 8, j, k + dk], np.float32).tobytes())
                runs.append(np.ascontiguousarray(hu[i - 16:i + 16, j, k + dk], np.float16).tobytes())
            image = eval_transforms({"spacing_mm": [2.8125, 2.8125, 3.0]})(dict(item))["image"]
            a = image.numpy()[0]
            runs.append(np.ascontiguousarray(a[a.shape[0] // 2 - 8:a.shape[0] // 2 + 8,
                                               a.shape[1] // 2, a.shape[2] // 2]).tobytes())
        for path in sorted((phantoms / center).rglob("*.dcm"))[::20]:
            pixels = pydicom.dcmread(path).PixelData
            middle = len(pixels) // 2
            runs += [pixels[middle + d:middle + d + 64] for d in (-2048, 0, 2048)]
    runs = [r for r in runs if len(set(r)) > 8]  # a constant run proves nothing either way
    assert len(runs) > 50 and all(len(r) == 64 for r in runs)
    assert not any(leaked(r) for r in runs)


def _assert_same_model(run: Path, reference: Path) -> None:
    """The model packages of two federated runs hold bit-identical weights."""
    ref = torch.load(reference / "model" / "weights.pt", weights_only=True)
    got = torch.load(run / "model" / "weights.pt", weights_only=True)
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)


@pytest.mark.long  # a second federation, compared with the first
def test_a_separate_evaluate_exchange_gives_the_same_scores_and_model(
        federated: Path, phantoms: Path, tmp_path: Path) -> None:
    """fed.evaluate_with_train=false: an evaluate exchange after each round's training. The
    scores and the trained model must be those of the default (scores in the next train
    message): evaluating first must not change what a center trains."""
    out = tmp_path / "FED"
    res = federate(f"data.root={phantoms}", "fed.rounds=2", f"out_dir={out}",
                   "fed.cross_site=false", "+fed.evaluate_with_train=false")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    a = json.loads((federated / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["global"] == a["global"] and any("cpm" in g for g in b["global"])
    assert [r["evaluate"]["in_round"] for r in b["rounds"]] == [1, 2]
    for center in CENTERS:
        audit = read_audit(out / "audit" / f"{center}.jsonl")
        assert [(x["round"], x["kind"]) for x in audit] == [(1, "query"), (1, "train"),
                                                            (1, "evaluate"), (2, "train"),
                                                            (2, "evaluate")]
    _assert_same_model(out, federated)


@pytest.mark.long  # a second federation, compared with the first
def test_evaluate_every_scores_only_those_rounds_and_trains_the_same_model(
        federated: Path, phantoms: Path, tmp_path: Path) -> None:
    """fed.evaluate_every=2 over 2 rounds: round 1's model is never scored (no evaluate request
    reaches a center), the last one is, and what the centers train is unchanged."""
    out = tmp_path / "FED"
    res = federate(f"data.root={phantoms}", "fed.rounds=2", f"out_dir={out}",
                   "fed.cross_site=false", "fed.evaluate_every=2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    a = json.loads((federated / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert [g["round"] for g in b["global"]] == [2] and b["global"][0] == a["global"][1]
    assert b["rounds"][0]["evaluate"]["skipped"] is True
    for center in CENTERS:
        audit = read_audit(out / "audit" / f"{center}.jsonl")
        assert [(x["round"], x["kind"]) for x in audit] == [(1, "query"), (1, "train"),
                                                            (2, "train"), (2, "evaluate")]
    _assert_same_model(out, federated)


@pytest.mark.long
def test_resume_after_a_completed_round_gives_the_uninterrupted_result(
        federated: Path, phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "FED"
    first = federate(f"data.root={phantoms}", "fed.rounds=1", f"out_dir={out}",
                     "fed.cross_site=false")
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    resumed = federate(f"data.root={phantoms}", "fed.rounds=2", "resume=true", f"out_dir={out}",
                       "fed.cross_site=false")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after round 1" in resumed.stdout

    straight = torch.load(federated / "model" / "weights.pt", weights_only=True)
    again = torch.load(out / "model" / "weights.pt", weights_only=True)
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=0)
    a = json.loads((federated / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["rounds_completed"] == 2 and b["global"] == a["global"]
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id


def test_adapter_only_fine_tuning_exchanges_a_tenth_of_the_model_after_round_1(
        phantoms: Path, tmp_path: Path) -> None:
    from medfound.models import PRESETS, build_network
    from medfound.models.foundation import FOUNDATION_PRESETS, FoundationEncoder
    from medfound.train.package import save_model_package

    encoder = FoundationEncoder(FOUNDATION_PRESETS["tiny"], seed=3)
    package = save_model_package(tmp_path / "encoder", encoder, task="foundation_encoder",
                                 model_config=FOUNDATION_PRESETS["tiny"], preprocessing={})
    out = tmp_path / "FED"
    res = federate(f"data.root={phantoms}", "fed.rounds=2", f"out_dir={out}", "fed.cross_site=false",
                   f"finetune.init_encoder={package}", "finetune.freeze_encoder=true",
                   "finetune.train_only=[adapter,cls_logits]",
                   "network.adapter_channels=4", "fed.exchange=trainable")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "backbone frozen" in res.stdout and "training only" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    first, second = (r["bytes"] for r in metrics["rounds"])
    for center in CENTERS:
        # Round 1 brings the whole model (one train message), round 2 only the adapters and
        # the classification conv (3.7% of the tiny detector's weights; each message also
        # carries ~6 kB of task spec) in two messages (train, and the last model's evaluate),
        # both ways; a center's replies never carry what it keeps frozen.
        assert second[center]["received"] <= 2 * 0.08 * first[center]["received"]
        assert second[center]["sent"] <= 0.08 * metrics["model_bytes_fp32"]
        assert first[center]["sent"] <= 0.08 * metrics["model_bytes_fp32"]
    weights = torch.load(out / "model" / "weights.pt", weights_only=True)
    state = encoder.state_dict()
    body = "feature_extractor.body."
    for key in ("layer1.0.conv1.weight", "layer2.0.bn1.running_mean"):  # frozen all along
        assert torch.equal(weights[body + key], state["body." + key]), key
    assert torch.equal(weights[body + "conv1.weight"], state["stems.ct.conv1.weight"])
    # The FPN and the head towers stay as round 1 sent them (the seeded initialisation)...
    fresh = build_network({**PRESETS["tiny"], "adapter_channels": 4}, seed=0).state_dict()
    for key in ("feature_extractor.fpn.layer_blocks.0.weight", "classification_head.conv.0.weight",
                "regression_head.conv.3.weight"):
        assert torch.equal(weights[key], fresh[key]), key
    # ...and so does the box-regression conv, under its low-rank adapter...
    assert torch.equal(weights["regression_head.bbox_reg.weight"], fresh["regression_head.bbox_reg.weight"])
    # ...while the adapters (body, head towers, box regression) and the classification conv trained.
    for key in (body + "adapter1.up.weight", "classification_head.conv.adapter.up.weight",
                "regression_head.bbox_reg.adapter.up.weight"):
        assert float(weights[key].abs().sum()) > 0, key  # from zero
    assert not torch.equal(weights["classification_head.cls_logits.weight"],
                           fresh["classification_head.cls_logits.weight"])


@pytest.mark.parametrize(("override", "expected"), [
    ("fed.centers=[center_0,center_9]", "center_9"),
    ("fed.transfer_dtype=int8", "fed.transfer_dtype"),
    ("fed.evaluate_every=0", "fed.evaluate_every"),
])
def test_bad_config_ends_in_one_line(phantoms: Path, tmp_path: Path, override: str,
                                     expected: str) -> None:
    res = federate(f"data.root={phantoms}", f"out_dir={tmp_path}", override)
    assert res.returncode == 2
    assert expected in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr



@pytest.mark.long
@pytest.mark.parametrize(("where", "noise"), [("client", 0.0), ("server", 1.0)])
def test_differential_privacy_clips_each_update_and_adds_the_reported_noise(
        phantoms: Path, tmp_path: Path, where: str, noise: float) -> None:
    """Client-side, noise 0: the aggregate of updates clipped to L2 norm c moves the model by
    at most c. Server-side, noise 1: the model moves by the noise, std × sqrt(#weights)."""
    from medfound.fed.params import shared_state
    from medfound.models.detection import DetectorConfig, build_network
    from medfound.train.package import read_model_json

    clip = 1e-3
    out = tmp_path / "FED"
    res = federate(f"data.root={phantoms}", "fed.rounds=1", f"out_dir={out}", "fed.cross_site=false",
                   f"fed.privacy.dp={where}", f"fed.privacy.clipping_norm={clip}",
                   f"fed.privacy.noise_multiplier={noise}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"differential privacy: {where}-side clipping" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    stdev = noise * clip / len(CENTERS)
    privacy = metrics["privacy"]
    assert {k: privacy[k] for k in ("dp", "clipping_norm", "noise_multiplier", "delta")} == {
        "dp": where, "clipping_norm": clip, "noise_multiplier": noise, "delta": 1e-5}
    assert privacy["noise_stdev"] == pytest.approx(stdev)
    record = metrics["rounds"][0]
    eps = privacy["epsilon"]  # per center, from its share of the round's cases
    assert sorted(eps) == CENTERS
    if noise == 0:
        assert all(e == float("inf") for e in eps.values())
    else:
        counts = {c: m["num-examples"] for c, m in record["train"]["centers"].items()}
        assert all(0 < e < float("inf") for e in eps.values())
        assert eps[max(counts, key=counts.get)] == max(eps.values())  # the biggest share leaks most
        assert eps[min(counts, key=counts.get)] < max(eps.values())
        assert "ε = " in res.stdout
    assert record["aggregated"] and record["train"]["accepted"] == CENTERS
    norms = record["train"]["update_norms"]
    if where == "client":  # the coordinator measures what arrived: already clipped
        assert max(norms.values()) <= clip * 1.01, norms
    else:  # it measures before it clips: the centers' own updates are far larger
        assert min(norms.values()) > 100 * clip, norms

    meta = read_model_json(out / "model")
    assert meta["provenance"]["privacy"]["dp"] == where
    start = shared_state(build_network(DetectorConfig.from_dict(meta["model"]),
                                       seed=0).state_dict())
    final = torch.load(out / "server" / "state.pt", weights_only=True)["model"]
    moved = float(torch.sqrt(sum(((final[k] - start[k]) ** 2).sum() for k in start)))
    if noise == 0:
        assert 0 < moved <= clip * 1.01
    else:
        n = sum(v.numel() for v in start.values())
        assert moved == pytest.approx(stdev * n ** 0.5, rel=0.1)


@pytest.mark.long
def test_secure_aggregation_gives_the_fedavg_aggregate_and_no_update_leaves_in_clear(
        phantoms: Path, tmp_path: Path) -> None:
    """fed.privacy.secagg=true (Flower's SecAgg+): the same round as plain FedAvg ends at the
    same global model within the quantization step, while the replies carry only masked
    integers — the center's trained weights, found in clear in the plain run's replies, are in
    none of its secure ones."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from medfound.fed.params import shared_state
    from medfound.models.detection import DetectorConfig, build_network
    from medfound.train.package import read_model_json

    runs = {}
    for name, extra in (("plain", ()), ("secure", ("fed.privacy.secagg=true",
                                                   "fed.privacy.secagg_max_weight=10"))):
        out = tmp_path / name
        res = federate(f"data.root={phantoms}", "fed.rounds=1", f"out_dir={out}",
                       "fed.audit_payloads=true", "fed.cross_site=" + str(name == "secure").lower(),
                       *extra)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        runs[name] = out
    assert "secure aggregation (Flower's SecAgg+)" in res.stdout

    plain = torch.load(runs["plain"] / "model" / "weights.pt", weights_only=True)
    secure = torch.load(runs["secure"] / "model" / "weights.pt", weights_only=True)
    meta = read_model_json(runs["plain"] / "model")
    start = shared_state(build_network(DetectorConfig.from_dict(meta["model"]), seed=0).state_dict())
    assert plain.keys() == secure.keys()
    moved = max(float((plain[k] - start[k]).abs().max()) for k in start)
    gap = max(float((plain[k] - secure[k]).abs().max()) for k in start)
    assert moved > 0.01  # the round trained
    # 2^22 levels over ±8, each update scaled by cases / 10 before quantization: ~4e-6 / case
    # share per value, stochastically rounded.
    assert gap < 1e-4, (gap, moved)

    record = json.loads((runs["secure"] / "metrics.json").read_text())["rounds"][0]["train"]
    assert record["accepted"] == CENTERS and record["secagg"]["halted_at"] is None
    assert record["update_norms"] == {}  # the coordinator never saw one
    assert set(record["centers"]) == set(CENTERS)
    table = (runs["secure"] / "cross_site.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in table[1:]] == ["global"]  # no local model to score

    def payloads(run: Path, kind: str) -> list[bytes]:
        return [(run / "audit" / "center_0" / f"{e['sha256']}.bin").read_bytes()
                for e in read_audit(run / "audit" / "center_0.jsonl") if e["kind"] == kind]

    kinds = [e["kind"] for e in read_audit(runs["secure"] / "audit" / "center_0.jsonl")]
    assert kinds[:5] == ["query", "secagg-setup", "secagg-share_keys",
                         "secagg-collect_masked_vectors", "secagg-unmask"]
    # center_0's trained weights (what a plain reply carries), 64-byte runs of them.
    def trained_runs(run: Path) -> list[bytes]:
        ckpt = next((run / "centers" / "center_0" / "rounds").glob("*/0001/checkpoints/last.pt"))
        state = torch.load(ckpt, weights_only=False)["model"]
        return [np.ascontiguousarray(v.flatten()[:16].numpy(), np.float32).tobytes()
                for k, v in state.items() if k.endswith("conv1.weight") or k.endswith("bbox_reg.weight")]

    clear = payloads(runs["plain"], "train")
    assert clear and all(any(r in p for p in clear) for r in trained_runs(runs["plain"]))
    masked = payloads(runs["secure"], "secagg-collect_masked_vectors")
    assert len(masked) == 1 and not any(r in masked[0] for r in trained_runs(runs["secure"]))
    proto = ProtoRecordDict()
    proto.ParseFromString(masked[0])
    content = recorddict_from_proto(proto)
    assert all(len(rec) == 0 for rec in content.array_records.values())  # no arrays at all
