"""The multi-modal foundation encoder: phantoms with per-center modality mixes, the encoder and
its pretraining losses, per-modality-group aggregation (real Flower records), pooled
pretraining end to end, and a detector fine-tuned from the pretrained encoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from medfound.data.phantoms import make_phantoms
from medfound.data.pretrain import (
    load_volume_list,
    modality_counts,
    pretrain_collate,
    pretrain_eval_transforms,
    pretrain_train_transforms,
)
from medfound.errors import MedfoundError
from medfound.fed.strategies import aggregate_by_group, build_strategy, group_of
from medfound.models import PRESETS, build_network
from medfound.models.foundation import (
    FOUNDATION_PRESETS,
    FoundationConfig,
    FoundationEncoder,
    detector_state_from_encoder,
    freeze_,
)
from medfound.train.pretrain import info_nce, random_block_mask

MIXES = "ct,pet;mr,us;ct"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Three centers: CT + PET, MR + US (no CT, so no nodules), CT only."""
    root = tmp_path_factory.mktemp("foundation") / "phantoms"
    make_phantoms(root, centers=3, cases=2, seed=3, modalities=MIXES, size="small", progress=False)
    return root


@pytest.fixture(scope="module")
def task() -> dict:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/task/pretrain.yaml").read_text())


def test_phantom_centers_can_hold_different_modality_mixes(mixed: Path) -> None:
    manifest = json.loads((mixed / "phantoms.json").read_text())
    assert manifest["center_modalities"] == [["ct", "pet"], ["mr", "us"], ["ct"]]
    assert manifest["modalities"] == ["ct", "mr", "pet", "us"]
    assert sorted(p.name for p in (mixed / "center_1" / "case_000").iterdir()) == ["mr", "us"]
    entry = json.loads((mixed / "center_1" / "datalist.json").read_text())["training"][0]
    assert "box" not in entry and entry["mr"] == "case_000/mr"
    items = load_volume_list(mixed, ["center_0", "center_1", "center_2"], "all")
    counts = {c: modality_counts([i for i in items if i["center"] == c]) for c in
              ("center_0", "center_1", "center_2")}
    assert counts["center_0"] == {"ct": 2, "mr": 0, "pet": 2, "us": 0}
    assert counts["center_1"] == {"ct": 0, "mr": 2, "pet": 0, "us": 2}
    assert counts["center_2"] == {"ct": 1, "mr": 0, "pet": 0, "us": 0}
    with pytest.raises(MedfoundError, match="xray"):
        make_phantoms(mixed.parent / "bad", modalities="ct;xray", progress=False)


def test_every_modality_becomes_same_shape_views_in_zero_one(mixed: Path, task: dict) -> None:
    items = load_volume_list(mixed, ["center_0", "center_1"], "all")
    train, evaluate = pretrain_train_transforms(task), pretrain_eval_transforms(task)
    patch = task["patch_size"]
    one_each = {it["modality"]: it for it in items}
    assert sorted(one_each) == ["ct", "mr", "pet", "us"]
    for item in one_each.values():
        pair = train(dict(item))
        batch = pretrain_collate([pair, evaluate(dict(item))])
        assert list(batch["view1"].shape) == [2, 1, *patch]
        assert float(batch["view1"].min()) >= -0.15 and float(batch["view1"].max()) <= 1.15
        assert float(batch["view2"][1].sub(batch["view1"][1]).abs().max()) == 0  # eval: one view
        assert float(pair[0]["image"].std()) > 0  # not a constant pad


def test_a_single_ultrasound_frame_becomes_a_stack_of_that_frame(tmp_path: Path, task: dict) -> None:
    import nibabel as nib

    frame = np.random.default_rng(0).integers(0, 256, size=(80, 60, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(frame, np.diag([0.3, 0.3, 1.0, 1.0])), tmp_path / "frame.nii.gz")
    item = {"image": str(tmp_path / "frame.nii.gz"), "modality": "us", "center": "c", "case": "0"}
    view = pretrain_eval_transforms(task)(item)["image"]
    assert list(view.shape) == [1, *task["patch_size"]]
    for k in range(1, view.shape[-1]):  # every slice of the stack is the (scaled) frame
        assert torch.equal(view[..., k], view[..., 0])
    assert 0 <= float(view.min()) and float(view.max()) <= 1 and float(view.std()) > 0.1


def test_each_sample_goes_through_its_own_modality_stem() -> None:
    enc = FoundationEncoder(FOUNDATION_PRESETS["tiny"], seed=0).eval()
    x = torch.rand(3, 1, 32, 32, 16)
    with torch.no_grad():
        mixed = enc(x, ["ct", "us", "ct"])[-1]
        alone = [enc(x[n:n + 1], [m])[-1] for n, m in enumerate(["ct", "us", "ct"])]
        as_mr = enc(x[1:2], ["mr"])[-1]
    for n in range(3):
        torch.testing.assert_close(mixed[n:n + 1], alone[n], rtol=1e-5, atol=1e-6)
    assert float((as_mr - alone[1]).abs().max()) > 1e-4  # another stem, another answer
    groups = {group_of(k) for k in enc.state_dict()}
    assert groups == {"ct", "mr", "pet", "us", "shared"}
    assert group_of("encoder.stems.pet.bn1.running_var") == "pet"
    assert group_of("encoder.body.layer1.0.conv1.weight") == "shared"
    with pytest.raises(MedfoundError, match="xray"):
        enc(x[:1], ["xray"])


def test_masks_hide_the_asked_share_and_infonce_rewards_matching_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = random_block_mask((64, 1, 32, 32, 16), [4, 4, 4], 0.6, generator=gen)
    assert mask.shape == (64, 1, 32, 32, 16) and abs(float(mask.float().mean()) - 0.6) < 0.02
    cell = mask[0, 0, :4, :4, :4]
    assert bool(cell.all()) or not bool(cell.any())  # whole blocks
    z = torch.randn(16, 8, generator=gen)
    matched, acc = info_nce(z, z + 0.01 * torch.randn(16, 8, generator=gen), 0.2)
    shuffled, _ = info_nce(z, z[torch.randperm(16, generator=gen)], 0.2)
    assert float(acc) == 1.0 and float(matched) < float(shuffled)


def test_a_pretrained_encoder_becomes_the_detector_backbone_exactly() -> None:
    enc = FoundationEncoder(FOUNDATION_PRESETS["tiny"], seed=1)
    with torch.no_grad():
        for stem in enc.stems.values():
            stem.embedding.normal_()  # a non-zero embedding must fold into bn1's bias
    network = build_network(PRESETS["tiny"], seed=0)
    state = network.state_dict()
    network.load_state_dict({**state, **detector_state_from_encoder(enc.state_dict(), state)})
    enc.eval(), network.eval()
    x = torch.rand(1, 1, 32, 32, 16)
    body = network.feature_extractor.body
    with torch.no_grad():
        feats = enc(x, ["ct"])
        y = body["maxpool"](body["act"](body["bn1"](body["conv1"](x))))
        y1 = body["layer1"](y)
        y2 = body["layer2"](y1)
    torch.testing.assert_close(y1, feats[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, feats[2], rtol=1e-5, atol=1e-5)
    wide = FoundationEncoder({**FOUNDATION_PRESETS["tiny"], "block_inplanes": [16, 16, 32, 64]})
    with pytest.raises(MedfoundError, match="shape"):
        detector_state_from_encoder(wide.state_dict(), state)
    ct_less = FoundationEncoder({**FOUNDATION_PRESETS["tiny"], "modalities": ["mr"]})
    with pytest.raises(MedfoundError, match="no 'ct' stem"):
        detector_state_from_encoder(ct_less.state_dict(), state)


def test_a_frozen_backbone_keeps_weights_and_batchnorm_statistics() -> None:
    network = build_network(PRESETS["tiny"], seed=0)
    body = freeze_(network.feature_extractor.body)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    network.train()
    out = network(torch.rand(2, 1, 64, 64, 32))
    sum(o.sum() for maps in out.values() for o in maps).backward()
    assert all(p.grad is None for p in body.parameters())
    assert any(p.grad is not None for p in network.classification_head.parameters())
    for key, value in body.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_adapters_start_as_the_identity_and_train_alone_in_a_frozen_backbone() -> None:
    from medfound.train.detection import freeze_backbone

    plain = build_network(PRESETS["tiny"], seed=0).eval()
    adapted = build_network({**PRESETS["tiny"], "adapter_channels": 4}, seed=0)
    state = adapted.state_dict()
    adapted.load_state_dict({**state, **plain.state_dict()})
    adapted.eval()
    x = torch.rand(1, 1, 64, 64, 32)
    with torch.no_grad():
        a, b = plain(x), adapted(x)
    for key in a:
        for u, v in zip(a[key], b[key], strict=True):
            torch.testing.assert_close(u, v)
    freeze_backbone(adapted)
    trainable = {n.split(".")[2] for n, p in adapted.named_parameters()
                 if p.requires_grad and n.startswith("feature_extractor.body.")}
    assert trainable == {"adapter1", "adapter2"}
    # The 1×1×1 bottlenecks (the box-regression conv's low-rank adapter: the next test).
    adapters = sum(p.numel() for n, p in adapted.named_parameters()
                   if ".adapter" in n and "bbox_reg" not in n)
    assert 0 < adapters < 0.02 * sum(p.numel() for p in adapted.parameters())


def test_adapter_only_fine_tuning_trains_under_a_twentieth_of_the_detector() -> None:
    from medfound.models.detection import AdaptedConv3d
    from medfound.models.foundation import train_only_

    net = build_network({**PRESETS["tiny"], "adapter_channels": 4}, seed=0)
    conv = net.regression_head.bbox_reg
    assert isinstance(conv, AdaptedConv3d)
    # Low rank: the adapter's weights are (in·k³ + out)·rank (+ out), a fraction of the conv's.
    rank, k3 = 4, 27
    assert sum(p.numel() for p in conv.adapter.parameters()) == (
        (conv.in_channels * k3 + conv.out_channels) * rank + conv.out_channels)
    names = train_only_(net, ["adapter", "cls_logits"])
    assert "regression_head.bbox_reg.weight" not in names
    assert "regression_head.bbox_reg.adapter.up.weight" in names
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trained < 0.05 * sum(p.numel() for p in net.parameters())
    # It learns: one step moves the adapter's output, while the frozen conv stays as it was.
    x = torch.rand(1, PRESETS["tiny"]["fpn_channels"], 8, 8, 4)
    before = conv.weight.detach().clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    conv(x).square().mean().backward()
    opt.step()
    assert torch.equal(conv.weight, before)
    assert float(conv.adapter.up.weight.detach().abs().sum()) > 0


def test_a_whole_detector_package_starts_an_adapted_detector_as_itself(tmp_path: Path) -> None:
    """finetune.init_model: every weight from a trained detector package; the adapters it lacks
    start as the identity, so the adapted network computes what the package's does. A package
    of another network is refused with the fix."""
    from medfound.train.detection import apply_finetune
    from medfound.train.package import save_model_package

    trained = build_network(PRESETS["tiny"], seed=3).eval()
    package = save_model_package(tmp_path / "model", trained, task="lung_nodule_detection",
                                 model_config=dict(PRESETS["tiny"]), preprocessing={})
    adapted = build_network({**PRESETS["tiny"], "adapter_channels": 4}, seed=0)
    said = apply_finetune(adapted, {"init_model": str(package),
                                    "train_only": ["adapter", "cls_logits"]})
    assert said.startswith(f"all {len(trained.state_dict())} weights from the detector")
    x = torch.rand(1, 1, 64, 64, 32)
    with torch.no_grad():
        a, b = trained(x), adapted.eval()(x)
    for key in a:
        for u, v in zip(a[key], b[key], strict=True):
            torch.testing.assert_close(u, v)
    # Only a center that builds the network without loading (load=False) skips the package.
    fresh = build_network({**PRESETS["tiny"], "adapter_channels": 4}, seed=0)
    apply_finetune(fresh, {"init_model": str(package)}, load=False)
    assert not torch.equal(fresh.state_dict()["classification_head.cls_logits.weight"],
                           trained.state_dict()["classification_head.cls_logits.weight"])

    wider = build_network({**PRESETS["tiny"], "fpn_channels": 24}, seed=0)
    with pytest.raises(MedfoundError, match="does not fit this network"):
        apply_finetune(wider, {"init_model": str(package)})
    with pytest.raises(MedfoundError, match="both set"):
        apply_finetune(adapted, {"init_model": str(package), "init_encoder": str(package)})
    # Loading a package into the network its model.json describes: another one is refused
    # with the keys that differ.
    from medfound.train.package import load_weights

    load_weights(package, build_network(PRESETS["tiny"], seed=0))
    with pytest.raises(MedfoundError, match=r"weights do not fit the network \(shape differs: "):
        load_weights(package, wider)


def _record(arrays: dict[str, float], metrics: dict[str, float]) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(np.full((2,), v, dtype=np.float32))
                                              for k, v in arrays.items()}),
                       "metrics": MetricRecord(metrics)})


def test_each_modality_stem_is_averaged_only_among_the_centers_that_have_it() -> None:
    keys = ("encoder.stems.ct.conv1.weight", "encoder.stems.pet.conv1.weight",
            "encoder.stems.mr.conv1.weight", "encoder.body.layer1.weight")
    values = [dict(zip(keys, v, strict=True)) for v in ([1.0, 10.0, 5.0, 1.0],
                                                        [3.0, 0.0, 5.0, 3.0],
                                                        [7.0, 99.0, 5.0, 7.0])]
    counts = [{"num-examples": 4, "volumes/ct": 1, "volumes/pet": 3},  # CT + PET
              {"num-examples": 2, "volumes/ct": 2},                   # CT only: pet untouched
              {"num-examples": 2, "volumes/ct": 0, "volumes/pet": 0}]  # neither
    out = aggregate_by_group([_record(v, c) for v, c in zip(values, counts, strict=True)],
                             "num-examples")
    got = {k: float(out[k].numpy()[0]) for k in keys}
    assert got["encoder.stems.ct.conv1.weight"] == pytest.approx((1 * 1 + 3 * 2) / 3)
    assert got["encoder.stems.pet.conv1.weight"] == pytest.approx(10.0)  # only center 0 has PET
    assert got["encoder.stems.mr.conv1.weight"] == pytest.approx(5.0)  # nobody: all equal anyway
    assert got["encoder.body.layer1.weight"] == pytest.approx((1 * 4 + 3 * 2 + 7 * 2) / 8)
    assert out["encoder.body.layer1.weight"].numpy().dtype == np.float32
    assert type(build_strategy({"name": "fedadam"}, 2, group_by_modality=True)).__name__ == \
        "GroupedFedAdam"
    with pytest.raises(MedfoundError, match="fedmedian"):
        build_strategy({"name": "fedmedian"}, 2, group_by_modality=True)


@pytest.mark.long  # two recipes end to end: minutes on 2 cores
def test_pretrain_recipe_then_a_detector_fine_tuned_from_its_encoder(mixed: Path,
                                                                      tmp_path: Path) -> None:
    from mlflow import MlflowClient

    run = tmp_path / "PT"
    res = subprocess.run(
        [sys.executable, "-m", "medfound", "run", "pretrain", f"data.root={mixed}",
         "data.train_centers=[center_0,center_1]", "data.val_centers=[center_2]",
         f"out_dir={run}", "trainer.epochs=2", "trainer.val_every=1", "trainer.progress=false",
         "task.batch_size=4"], capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "pretraining on 4 volumes {'ct': 1, 'mr': 1, 'pet': 1, 'us': 1}, validating on 1" in res.stdout
    meta = json.loads((run / "encoder" / "model.json").read_text())
    assert meta["task"] == "foundation_encoder"
    assert meta["provenance"]["volumes"] == {"ct": 1, "mr": 1, "pet": 1, "us": 1}
    assert 0 < meta["metrics"]["reconstruction"] < 1
    encoder = torch.load(run / "encoder" / "weights.pt", weights_only=True)
    fresh = FoundationEncoder(FoundationConfig.from_dict(meta["model"]), seed=0).state_dict()
    assert encoder.keys() == fresh.keys()
    assert not torch.equal(encoder["stems.mr.conv1.weight"], fresh["stems.mr.conv1.weight"])
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    history = MlflowClient(f"sqlite:///{run / 'mlruns' / 'mlflow.db'}").get_metric_history(
        run_id, "val/reconstruction")
    assert [m.step for m in history] == [1, 2]

    ft = tmp_path / "FT"
    res = subprocess.run(
        [sys.executable, "-m", "medfound", "run", "train_detector", f"data.root={mixed}",
         "data.train_centers=[center_0]", "data.val_centers=[center_2]",
         "experiment=phantoms_smoke", f"out_dir={ft}", "trainer.epochs=1", "trainer.progress=false",
         f"finetune.init_encoder={run / 'encoder'}", "finetune.freeze_encoder=true",
         "network.adapter_channels=4"],
        capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "weights from the pretrained encoder" in res.stdout
    weights = torch.load(ft / "model" / "weights.pt", weights_only=True)
    body = "feature_extractor.body."
    assert torch.equal(weights[body + "layer1.0.conv1.weight"], encoder["body.layer1.0.conv1.weight"])
    assert torch.equal(weights[body + "conv1.weight"], encoder["stems.ct.conv1.weight"])
    torch.testing.assert_close(weights[body + "bn1.bias"],
                               encoder["stems.ct.bn1.bias"] + encoder["stems.ct.embedding"])
    assert torch.equal(weights[body + "bn1.running_mean"], encoder["stems.ct.bn1.running_mean"])
    provenance = json.loads((ft / "model" / "model.json").read_text())["provenance"]
    assert provenance["init_encoder"] == str(run / "encoder") and provenance["freeze_encoder"]
    assert float(weights[body + "adapter1.up.weight"].abs().sum()) > 0  # the adapters trained

    # The fine-tuned detector (adapters included) goes through the exporter's parity gate.
    exp = subprocess.run([sys.executable, "-m", "medfound", "export", str(ft / "model"),
                          "--out", str(tmp_path / "EXP"), "--allow-unvalidated"], capture_output=True, text=True,
                         timeout=600, check=False)
    assert exp.returncode == 0, exp.stdout[-2000:] + exp.stderr[-3000:]
    assert json.loads((tmp_path / "EXP" / "parity.json").read_text())["passed"] is True

    bad = subprocess.run(
        [sys.executable, "-m", "medfound", "run", "train_detector", f"data.root={mixed}",
         "data.train_centers=[center_0]", "data.val_centers=[center_2]",
         "experiment=phantoms_smoke", f"out_dir={tmp_path / 'BAD'}",
         f"finetune.init_encoder={ft / 'model'}"], capture_output=True, text=True, timeout=600,
        check=False)
    assert bad.returncode != 0 and "not a foundation encoder package" in bad.stderr
    assert "Traceback" not in bad.stderr
