"""Nodule segmentation: phantom masks, the UNet-style segmenter on the foundation encoder (from
scratch, from a pretrained encoder, frozen with adapters), Dice, the recipe and its export
through the parity gate, and the torch-free segmentation path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medfound.data.detection import load_datalist
from medfound.data.phantoms import make_phantoms
from medfound.data.segmentation import (
    check_masks,
    seg_collate,
    seg_eval_transforms,
    seg_train_transforms,
)
from medfound.errors import MedfoundError
from medfound.io.reader import read_volume
from medfound.models.foundation import FOUNDATION_PRESETS, FoundationEncoder
from medfound.models.segmentation import SEGMENTER_PRESETS, SegmenterConfig, build_segmenter
from medfound.train import segmentation as task
from medfound.train.package import save_model_package

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"spacing_mm": [2.8125, 2.8125, 3.0], "patch_size": [64, 64, 32]}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg") / "phantoms"
    make_phantoms(root, centers=3, cases=3, seed=5, size="small", progress=False, masks=True)
    return root


def test_phantom_masks_cover_each_annotated_nodule_on_the_ct_grid(phantoms: Path) -> None:
    items = check_masks(load_datalist(phantoms, ["center_0", "center_1"], "all"), phantoms)
    nodules = 0
    for item in items:
        mask, ct = read_volume(item["mask"]), read_volume(item["image"])
        # The mask lies on the CT's grid: mask voxel → CT voxel is a flip/permutation of indices.
        to_ct = np.linalg.inv(ct.affine) @ mask.affine
        np.testing.assert_allclose(to_ct, np.round(to_ct), atol=1e-4)
        assert abs(np.linalg.det(to_ct[:3, :3])) == pytest.approx(1.0)
        assert sorted(mask.shape) == sorted(ct.shape)
        assert set(np.unique(mask.array)) <= {0.0, 1.0}
        inv = np.linalg.inv(mask.affine)
        voxel_mm3 = float(np.prod(np.linalg.norm(mask.affine[:3, :3], axis=0)))
        half_diagonal = float(np.linalg.norm(np.linalg.norm(mask.affine[:3, :3], axis=0))) / 2
        for x, y, z, d, *_ in item["box"]:
            if d / 2 < 1.5 * half_diagonal:
                continue  # the voxel nearest a small nodule's centre may lie outside its outline
            i, j, k = np.round((inv @ [x, y, z, 1.0])[:3]).astype(int)
            assert mask.array[i, j, k] == 1  # the centre is inside
            nodules += 1
        if item["box"]:
            spheres = sum(np.pi / 6 * b[3] ** 3 for b in item["box"])
            assert 0.4 * spheres < mask.array.sum() * voxel_mm3 < 2.5 * spheres  # lobulated spheres
        else:
            assert mask.array.sum() == 0
        ijk = np.argwhere(mask.array > 0)
        if len(ijk):  # the CT is brighter than lung (-850 HU) where the mask says nodule
            at_ct = np.round((to_ct @ np.c_[ijk, np.ones(len(ijk))].T)[:3]).astype(int)
            assert np.median(ct.array[tuple(at_ct)]) > -700
    assert nodules > 0


def test_the_config_file_is_the_tiny_preset_and_bad_keys_are_named() -> None:
    values = yaml.safe_load((ROOT / "configs/network/unet_tiny.yaml").read_text())
    values.pop("name")
    assert values == SEGMENTER_PRESETS["tiny"]
    with pytest.raises(MedfoundError, match="decoder_channels"):
        SegmenterConfig.preset("tiny", decoder_channels=[8, 8])
    with pytest.raises(MedfoundError, match="patch_size.*multiples of"):
        SegmenterConfig.preset("tiny", patch_size=[60, 64, 32])
    with pytest.raises(MedfoundError, match="unknown key"):
        SegmenterConfig.from_dict({**SEGMENTER_PRESETS["tiny"], "bogus": 1})


def test_image_and_mask_stay_aligned_through_preprocessing_and_crops(phantoms: Path) -> None:
    items = check_masks(load_datalist(phantoms, ["center_0"], "training"), phantoms)
    item = next(it for it in items if it["box"])
    whole = seg_eval_transforms(SMOKE)(dict(item))
    assert whole["image"].shape == whole["mask"].shape
    torch.testing.assert_close(whole["image"].affine, whole["mask"].affine)
    assert set(torch.unique(whole["mask"]).tolist()) == {0.0, 1.0}
    batch = seg_collate([seg_train_transforms({**SMOKE, "num_patches_per_image": 4, "pos_fraction": 1.0})(dict(item))])
    assert batch["image"].shape == batch["mask"].shape == (4, 1, 64, 64, 32)
    assert all(batch["mask"][n].sum() > 0 for n in range(4))  # positive crops hold nodule voxels


def test_dice_counts_studies_with_nodules_only() -> None:
    mask = np.zeros((8, 8, 8))
    mask[2:4, 2:4, 2:4] = 1
    half = mask.copy()
    half[2:3] = 0
    dices = task.dice_per_study([mask, np.zeros_like(mask), half, np.zeros_like(mask)],
                                [mask, mask, mask, np.zeros_like(mask)])
    assert dices[:3] == [1.0, 0.0, pytest.approx(2 * 4 / (4 + 8))] and np.isnan(dices[3])
    summary = task.summarize(dices, ["a", "b", "c", "d"], [0.5, 1.0])
    assert summary["dice"] == pytest.approx((1 + 0 + 2 / 3) / 3) and summary["nodule_dice"] == 0.75
    assert summary["n_studies_with_nodules"] == 3 and summary["per_study"]["d"] is None
    # Per nodule: only the nodule's own region counts, not a false positive elsewhere.
    noisy = half.copy()
    noisy[6:8, 6:8, 6:8] = 1
    box = np.array([[2, 2, 2, 4, 4, 4]])  # voxel xyzxyz of the nodule
    assert task.nodule_dice(noisy, mask, box, margin=0.5) == [pytest.approx(2 / 3)]
    assert task.dice_per_study([noisy], [mask])[0] < 2 / 3


def _encoder_package(path: Path) -> dict:
    encoder = FoundationEncoder(FOUNDATION_PRESETS["tiny"], seed=7)
    with torch.no_grad():
        encoder.stems["ct"].embedding.normal_()
    save_model_package(path, encoder, task="foundation_encoder", model_config=encoder.cfg.to_dict(),
                       preprocessing={})
    return encoder.state_dict()


def test_a_pretrained_encoder_starts_the_segmenter_and_frozen_only_adapters_and_decoder_learn(tmp_path: Path) -> None:
    enc = _encoder_package(tmp_path / "encoder")
    net = build_segmenter(SegmenterConfig.preset("tiny", adapter_channels=4), seed=0)
    n = task.init_from_encoder(net, tmp_path / "encoder", freeze=True)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert n == len([k for k in enc if k.startswith(("stems.ct.", "body.layer"))]) - 1  # embedding folded
    assert torch.equal(state["encoder.conv1.weight"], enc["stems.ct.conv1.weight"])
    assert torch.equal(state["encoder.layer3.0.conv2.weight"], enc["body.layer3.0.conv2.weight"])
    torch.testing.assert_close(state["encoder.bn1.bias"], enc["stems.ct.bn1.bias"] + enc["stems.ct.embedding"])
    # The segmenter's stem + body compute what the encoder's CT path computes.
    x = torch.rand(1, 1, 32, 32, 16)
    fe = FoundationEncoder(FOUNDATION_PRESETS["tiny"])
    fe.load_state_dict(enc)
    fe.eval(), net.eval()
    e = net.encoder
    with torch.no_grad():
        ours = e["layer1"](e["maxpool"](e["act"](e["bn1"](e["conv1"](x)))))
        torch.testing.assert_close(ours, fe(x, ["ct"])[1])

    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    mask = torch.zeros(2, 1, 32, 32, 16)
    mask[:, :, 10:20, 10:20, 5:10] = 1
    for _ in range(2):
        opt.zero_grad()
        task.train_step(net, {"image": torch.rand(2, 1, 32, 32, 16), "mask": mask})["loss"].backward()
        opt.step()
    after = net.state_dict()
    frozen = [k for k in state if k.startswith("encoder.") and ".adapter" not in k and "adapter" not in k.split(".")[1]]
    assert frozen and all(torch.equal(after[k], state[k]) for k in frozen)  # weights and BN statistics
    assert not torch.equal(after["encoder.adapter1.up.weight"], state["encoder.adapter1.up.weight"])
    assert not torch.equal(after["head.weight"], state["head.weight"])


@pytest.mark.long  # the recipe, then an export with its gate: minutes on 2 cores
def test_train_segmenter_recipe_then_export_through_the_parity_gate(phantoms: Path, tmp_path: Path) -> None:
    from medfound.infer.engine import OnnxDetector
    from medfound.infer.segment import OnnxSegmenter

    _encoder_package(tmp_path / "encoder")
    run = tmp_path / "RUN"
    res = subprocess.run(
        [sys.executable, "-m", "medfound", "run", "train_segmenter", f"data.root={phantoms}",
         "data.train_centers=[center_0,center_1]", "data.val_centers=[center_2]",
         "experiment=phantoms_smoke", f"out_dir={run}", "trainer.epochs=1", "trainer.progress=false",
         f"finetune.init_encoder={tmp_path / 'encoder'}", "finetune.freeze_encoder=true",
         "network.adapter_channels=4"], capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "weights from the pretrained encoder" in res.stdout and "validation Dice" in res.stdout
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["task"] == "nodule_segmentation" and meta["model"]["adapter_channels"] == 4
    assert 0.0 <= meta["metrics"]["dice"] <= 1.0 and meta["metrics"]["n_studies"] >= 1

    exp = tmp_path / "EXP"
    out = subprocess.run([sys.executable, "-m", "medfound", "export", str(run / "model"), "--out", str(exp),
                          "--data", str(phantoms)], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    parity = json.loads((exp / "parity.json").read_text())
    assert parity["passed"] and parity["max_rel"] <= 1e-4
    assert parity["dice"]["passed"] and parity["dice"]["label_agreement"] > 0.999
    assert parity["dice"]["logits_max_rel"] <= 1e-4
    card = json.loads((exp / "model_card.json").read_text())
    assert card["task"] == "nodule_segmentation" and card["onnx"]["output_names"] == ["logits"]
    assert "nodule_segmentation" in (exp / "MODEL_CARD.md").read_text()

    # The deployed path: onnxruntime + numpy sliding window, same labels as torch on a study.
    seg = OnnxSegmenter(exp, providers="cpu")
    cfg = SegmenterConfig.from_dict(meta["model"])
    item = check_masks(load_datalist(phantoms, ["center_2"], "all"), phantoms)[0]
    image = seg_eval_transforms(cfg.to_dict())(dict(item))["image"]
    net = build_segmenter(cfg)
    net.load_state_dict(torch.load(run / "model" / "weights.pt", weights_only=True))
    with torch.no_grad():
        ref = task.sliding_window(net.eval(), cfg)(image.as_tensor()[None])[0].numpy()
    got = seg.logits(image.numpy()[0])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-3 * float(np.abs(ref).max()))
    assert seg.segment(image.numpy()[0]).dtype == np.uint8
    with pytest.raises(MedfoundError, match="not a detector"):
        OnnxDetector(exp)

    # `medfound infer` with the segmenter: labels on the study's grid and a DICOM SEG over it.
    import highdicom as hd
    import pydicom

    study = phantoms / item["image"] if not Path(item["image"]).is_absolute() else Path(item["image"])
    res = subprocess.run([sys.executable, "-m", "medfound", "infer", str(study), "--model", str(exp),
                          "--out", str(tmp_path / "OUT"), "--quiet"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "nodule region(s)" in res.stdout
    volume = read_volume(study, progress=False)
    folder = tmp_path / "OUT" / volume.series_uid
    record = json.loads((folder / "segments.json").read_text())
    assert record["format"] == "medfound-segments/1" and record["series_uid"] == volume.series_uid
    mask = read_volume(folder / "mask.nii.gz", progress=False)
    assert mask.array.shape == volume.array.shape
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-4)
    assert int((mask.array == 1).sum()) == record["nodule_voxels"]
    ds = pydicom.dcmread(folder / "segmentation.dcm")
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == volume.meta.get("study_uid", ds.StudyInstanceUID)
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.series_uid
    assert len(series.ReferencedInstanceSequence) == volume.array.shape[2]
    assert hd.seg.Segmentation.from_dataset(ds).number_of_segments == 1
    assert (folder / "overview.png").stat().st_size > 0


def test_labels_reach_the_study_grid_the_dicom_slices_and_a_seg_a_viewer_reads(
        phantoms: Path, tmp_path: Path) -> None:
    """The phantom's ground-truth mask (on the CT grid, NIfTI) through medfound.io.seg: onto each
    DICOM slice's pixel grid (every voxel lands once), into a DICOM SEG whose frames and
    positions a reader (highdicom) maps back to the same voxels, and measured as regions whose
    centres are the annotated nodule centres."""
    import highdicom as hd
    import pydicom

    from medfound.io.seg import (
        labels_on_grid,
        labels_on_source_slices,
        nodule_components,
        write_labels_nifti,
        write_nodule_seg,
    )
    from medfound.io.sr import read_source_headers

    item = next(it for it in load_datalist(phantoms, ["center_0"], "all") if it["label"])
    ct = read_volume(phantoms / "center_0" / item["image"], progress=False)
    truth = read_volume(phantoms / "center_0" / item["mask"], progress=False)
    labels = (truth.array > 0).astype(np.uint8)
    assert labels.sum() > 0

    headers = read_source_headers(sorted((phantoms / "center_0" / item["image"]).iterdir()),
                                  ct.series_uid)
    frames = labels_on_source_slices(labels, truth.affine, headers)
    assert frames.shape == (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    assert int(frames.sum()) == int(labels.sum())  # same grid: each labelled voxel once

    # Coarser grid (every other voxel) and back: nearest neighbour keeps the labels' place.
    coarse = ct.affine.copy()
    coarse[:3, :3] *= 2
    shape = [s // 2 for s in ct.array.shape]
    there = labels_on_grid(labels, truth.affine, shape, coarse)
    back = labels_on_grid(there, coarse, ct.array.shape, ct.affine)
    assert back.sum() > 0 and (back & labels).sum() > 0

    seg_path = write_nodule_seg(frames, headers, tmp_path / "seg.dcm", algorithm_name="test",
                                algorithm_version="1", model_sha256="0" * 64)
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(seg_path))
    uids = [(ct.series_uid, h.SOPInstanceUID) for h in headers]
    read_back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[u for _, u in uids], segment_numbers=[1],
        combine_segments=True, ignore_spatial_locations=True)
    np.testing.assert_array_equal(read_back, frames)
    empty = write_nodule_seg(np.zeros_like(frames), headers, tmp_path / "empty.dcm",
                             algorithm_name="test", algorithm_version="1")
    empty_ds = pydicom.dcmread(empty)
    assert int(empty_ds.NumberOfFrames) == 1
    (series,) = empty_ds.ReferencedSeriesSequence
    assert len(series.ReferencedInstanceSequence) == len(headers)

    written = read_volume(write_labels_nifti(labels, truth.affine, tmp_path / "m.nii.gz"),
                          progress=False)
    np.testing.assert_allclose(written.affine, truth.affine, atol=1e-4)
    np.testing.assert_array_equal(written.array, labels)

    regions = nodule_components(labels, truth.affine)
    centres = np.array([b[:3] for b in item["box"]])
    for region in regions:
        nearest = np.linalg.norm(centres - np.array(region["center_lps_mm"]), axis=1).min()
        assert nearest < 3.0, (region, centres)
    assert len(regions) == len(item["box"])


def test_data_without_masks_is_refused_with_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "nomask"
    make_phantoms(root, centers=1, cases=1, seed=1, size="small", progress=False)
    res = subprocess.run(
        [sys.executable, "-m", "medfound", "run", "train_segmenter", f"data.root={root}",
         "data.train_centers=[center_0]", "data.val_centers=[center_0]", f"out_dir={tmp_path / 'R'}"],
        capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode != 0 and "has no 'mask'" in res.stderr and "--masks" in res.stderr
    assert "Traceback" not in res.stderr
