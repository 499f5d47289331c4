"""Federated self-supervised pretraining of the foundation encoder (`federate task=pretrain`)
in Flower's simulation engine: centers with different modality mixes, a modality no center
holds, the per-group aggregation checked against the very updates the centers sent (kept by
their audit logs), and resume after a completed round."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medfound.data.phantoms import make_phantoms
from medfound.fed.audit import read_audit
from medfound.models.foundation import FOUNDATION_PRESETS, FoundationPretrainer

pytestmark = pytest.mark.slow

CENTERS = ["center_0", "center_1"]
FAST = ["task=pretrain", "fed.mode=simulation", f"fed.centers=[{','.join(CENTERS)}]",
        "trainer.progress=false", "task.batch_size=2"]


def federate(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medfound", "run", "federate", *FAST, *overrides],
                          capture_output=True, text=True, check=False, timeout=600)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """center_0: CT + PET, center_1: CT + ultrasound; nobody has MR. One training and one
    validation case each."""
    root = tmp_path_factory.mktemp("fedpt") / "phantoms"
    make_phantoms(root, centers=2, cases=2, seed=7, modalities="ct,pet;ct,us", size="small",
                  progress=False)
    return root


@pytest.fixture(scope="module")
def pretrained(phantoms: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fedpt_run") / "FED"
    res = federate(f"data.root={phantoms}", "fed.rounds=2", "fed.audit_payloads=true",
                   f"out_dir={out}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "global reconstruction" in res.stdout
    return out


def _last_update(out: Path, center: str) -> dict[str, np.ndarray]:
    """The arrays of the last training reply `center` sent, from the payload its audit kept."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict

    entry = [e for e in read_audit(out / "audit" / f"{center}.jsonl") if e["kind"] == "train"][-1]
    proto = RecordDict()
    proto.ParseFromString((out / "audit" / center / f"{entry['sha256']}.bin").read_bytes())
    content = recorddict_from_proto(proto)
    metrics = dict(content["metrics"])
    return {k: a.numpy() for k, a in content["arrays"].items()}, metrics


def test_each_stem_is_averaged_among_the_centers_holding_its_modality(pretrained: Path) -> None:
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["rounds_completed"] == 2 and "cross_site" not in metrics
    sent = metrics["rounds"][-1]["train"]["centers"]
    assert {k: v for k, v in sent["center_0"].items() if k.startswith("volumes/")} == \
        {"volumes/ct": 1, "volumes/mr": 0, "volumes/pet": 1, "volumes/us": 0}
    assert {k: v for k, v in sent["center_1"].items() if k.startswith("volumes/")} == \
        {"volumes/ct": 1, "volumes/mr": 0, "volumes/pet": 0, "volumes/us": 1}
    assert all("reconstruction" in g for g in metrics["global"])

    meta = json.loads((pretrained / "encoder" / "model.json").read_text())
    assert meta["task"] == "foundation_encoder" and meta["provenance"]["federated"]
    final = torch.load(pretrained / "encoder" / "weights.pt", weights_only=True)
    a, ma = _last_update(pretrained, "center_0")
    b, mb = _last_update(pretrained, "center_1")
    wa, wb = ma["num-examples"], mb["num-examples"]

    def check(key: str, expected: np.ndarray) -> None:
        np.testing.assert_allclose(final[key].numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=key)

    for key in final:
        sent_key = f"encoder.{key}"
        if not final[key].is_floating_point():
            continue
        if key.startswith("stems.pet."):  # only center_0 holds PET
            check(key, a[sent_key])
        elif key.startswith("stems.us."):  # only center_1 holds ultrasound
            check(key, b[sent_key])
        elif key.startswith("stems.ct."):  # both, one CT volume each
            check(key, (a[sent_key] + b[sent_key]) / 2)
        elif not key.startswith("stems."):
            check(key, (wa * a[sent_key] + wb * b[sent_key]) / (wa + wb))
    assert not np.allclose(a["encoder.stems.pet.conv1.weight"], b["encoder.stems.pet.conv1.weight"])
    # Nobody holds MR: its stem is still the seeded initialisation.
    fresh_state = FoundationPretrainer(FOUNDATION_PRESETS["tiny"], seed=0).encoder.state_dict()
    for key in (k for k in final if k.startswith("stems.mr.")):
        assert torch.equal(final[key], fresh_state[key]), key
    assert not torch.equal(final["stems.pet.conv1.weight"], fresh_state["stems.pet.conv1.weight"])


@pytest.mark.long
def test_resume_of_a_federated_pretraining_gives_the_uninterrupted_result(
        pretrained: Path, phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "FED"
    first = federate(f"data.root={phantoms}", "fed.rounds=1", f"out_dir={out}")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = federate(f"data.root={phantoms}", "fed.rounds=2", "resume=true", f"out_dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after round 1" in resumed.stdout
    straight = torch.load(pretrained / "encoder" / "weights.pt", weights_only=True)
    again = torch.load(out / "encoder" / "weights.pt", weights_only=True)
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=0)
    a = json.loads((pretrained / "metrics.json").read_text())["global"]
    assert json.loads((out / "metrics.json").read_text())["global"] == a


@pytest.mark.long
@pytest.mark.skipif(shutil.which("openssl") is None, reason="scripts/make_certs.sh needs openssl")
def test_federated_pretraining_in_deployment_mode_over_real_processes(phantoms: Path, tmp_path: Path) -> None:
    """The same job over a SuperLink and one SuperNode per center (TLS, registered keys):
    scripts/local_federation.sh with task=pretrain."""
    from processes import free_port_block, medfound_env

    out = tmp_path / "FED"
    env = {**medfound_env(), "PORT": str(free_port_block())}
    res = subprocess.run([str(Path(__file__).resolve().parents[1] / "scripts" / "local_federation.sh"),
                          str(phantoms), str(out), "task=pretrain", "fed.rounds=1", "trainer.progress=false",
                          "task.batch_size=2"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1]
    assert sorted(metrics["rounds"][0]["train"]["accepted"]) == CENTERS
    meta = json.loads((out / "encoder" / "model.json").read_text())
    assert meta["task"] == "foundation_encoder" and meta["provenance"]["federated"]
    final = torch.load(out / "encoder" / "weights.pt", weights_only=True)
    fresh = FoundationPretrainer(FOUNDATION_PRESETS["tiny"], seed=0).encoder.state_dict()
    assert all(torch.equal(final[k], fresh[k]) for k in final if k.startswith("stems.mr."))  # nobody has MR
    assert not torch.equal(final["stems.us.conv1.weight"], fresh["stems.us.conv1.weight"])
    for center in CENTERS:  # each SuperNode's own audit log records its training reply
        kinds = [r["kind"] for r in read_audit(out / "centers" / center / "audit" / f"{center}.jsonl")]
        assert "train" in kinds
