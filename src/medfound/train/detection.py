"""The nodule-detection task: what pooled, local and federated training all plug into the loop.

Like a Flower app's task.py: build the detector, one training step, prediction on whole
studies, and LUNA16 validation. World coordinates are LPS mm; the detector itself works in
voxel "xyzxyz" boxes of the resampled image, and `medfound.data.detection` converts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medfound.data.detection import label_subset, load_datalist, predictions_to_rows
from medfound.errors import MedfoundError
from medfound.metrics.froc import evaluate_luna16
from medfound.models.detection import DetectorConfig, build_detector, build_network

PREDICTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")


# data.train_centers / data.val_centers = world: the split the world's phantoms.json names
# (configs/experiment/benchmark.yaml): its train centers, validated on their validation splits.
WORLD = "world"


def world_centers(data: Any) -> None:
    """Resolve `data.train_centers` / `data.val_centers` given as ``world`` to the world's
    train centers (DATA_ROOT/phantoms.json of `medfound phantoms --preset benchmark`), in
    place, so that everything after (the validation items, the provenance, the logged
    config) sees the centers; then `check_world_split`."""
    from medfound.data.phantoms import read_world

    keys = [k for k in ("train_centers", "val_centers") if data.get(k) == WORLD]
    if keys:
        world = read_world(data["root"])
        if world is None:
            raise MedfoundError(f"data.{keys[0]}=world, but data.root holds no world's split",
                                path=Path(data["root"]) / "phantoms.json",
                                hint="generate one with `medfound phantoms --preset benchmark "
                                     "--out DIR`, or list the centers: data.train_centers=[...]")
        for k in keys:
            data[k] = list(world["train_centers"])
    for k in ("train_centers", "val_centers"):
        check_world_split(data["root"], data.get(k) or [], f"data.{k}")


def check_world_split(root: str | Path, centers: Sequence[str], key: str) -> None:
    """Refuse to train or select checkpoints on a test center of the world at `root` (the
    "test_centers" of its phantoms.json): its score would no longer be a held-out one.
    Folders without a world's phantoms.json have no split and pass."""
    from medfound.data.phantoms import read_world

    if isinstance(centers, str):
        centers = [centers]
    world = read_world(root)
    if world is None:
        return
    held_out = [c for c in centers if c in world["test_centers"]]
    if held_out:
        raise MedfoundError(
            f"{key} names {', '.join(held_out)}, a test center of this world: training or "
            f"checkpoint selection on it would void its held-out score",
            path=Path(root) / "phantoms.json",
            hint=f"train and validate on its train centers ({', '.join(world['train_centers'])}; "
                 f"experiment=benchmark does); score the test centers with evaluate_detector")


def evaluation_items(root: str, centers: Sequence[str], trained_on: Sequence[str],
                     split: str = "auto") -> list[dict[str, Any]]:
    """Datalist items to validate or evaluate on. split "auto": every case of a center the
    model never trained on (a held-out center), only the validation split of one it did.
    (Scoring a world's test centers is what they are for; training recipes refuse to train or
    validate on them in `training_items`.)"""
    items: list[dict[str, Any]] = []
    for center in centers:
        which = split if split != "auto" else ("validation" if center in trained_on else "all")
        items += load_datalist(root, [center], which)
    return items


def training_split(data: Mapping[str, Any]) -> str:
    """The split of the training centers' datalists to train on: `data.train_split`, "training"
    (default) or "all" (their validation cases too, when validation is on other centers only)."""
    split = str(data.get("train_split", "training"))
    if split not in ("training", "all"):
        raise MedfoundError(f"config key 'data.train_split' = {split!r}: must be training or all")
    both = sorted(set(data.get("train_centers") or []) & set(data.get("val_centers") or []))
    if split == "all" and both:
        raise MedfoundError(f"data.train_split=all would train on the validation cases of "
                            f"{', '.join(both)}, which data.val_centers also validates on",
                            hint="validate on other centers, or keep data.train_split=training")
    return split


def training_items(data: Mapping[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """The items a pooled / local recipe trains on: the `training_split` of each training center,
    then `data.label_fraction` of them (drawn with `seed`). `data.train_centers` /
    `data.val_centers` = world are resolved in `data` first (`world_centers`), and a world's
    test center in either is refused."""
    world_centers(data)
    items = load_datalist(data["root"], data["train_centers"], training_split(data))
    return label_subset(items, data.get("label_fraction", 1.0), seed=seed)


def detector_config(model_cfg: Any) -> DetectorConfig:
    """DetectorConfig from a Hydra `model` group (its `name` key is the group's, not the net's)."""
    values = {k: v for k, v in dict(model_cfg).items() if k != "name"}
    return DetectorConfig.from_dict(values)


def build(model_cfg: Any, seed: int | None = None):
    """(network, detector) for a model config; the detector holds the network."""
    cfg = detector_config(model_cfg)
    network = build_network(cfg, seed=seed)
    return network, build_detector(cfg, network)


def load_encoder(network: torch.nn.Module, package: str | Path, modality: str = "ct",
                 prefix: str = "feature_extractor.body.") -> int:
    """Load a pretrained foundation encoder package (RUN/encoder of `medfound run pretrain`, or
    FED/encoder of a federated pretraining) into the ResNet of `network` whose weights are named
    ``<prefix>conv1…`` (the detector's backbone; the segmenter's ``encoder.``): the encoder's
    `modality` stem and body stages (medfound.models.foundation.detector_state_from_encoder).
    Everything else keeps its fresh initialisation. Returns the weights loaded."""
    from medfound.models.foundation import detector_state_from_encoder
    from medfound.train.package import WEIGHTS

    check_encoder_package(package)
    encoder = torch.load(Path(package) / WEIGHTS, map_location="cpu", weights_only=True)
    state = network.state_dict()
    new = detector_state_from_encoder(encoder, state, modality=modality, prefix=prefix)
    network.load_state_dict({**state, **new})
    return len(new)


def init_from_encoder(network: torch.nn.Module, package: str | Path, modality: str = "ct",
                      freeze: bool = False) -> int:
    """Start the detector's backbone from a pretrained foundation encoder package
    (`load_encoder`); the FPN and heads keep their fresh initialisation. `freeze`: the backbone
    is not trained (`freeze_backbone`), so only the FPN, the heads and the adapters
    (``network.adapter_channels`` > 0) learn. Returns the weights loaded."""
    n = load_encoder(network, package, modality)
    if freeze:
        freeze_backbone(network)
    return n


def init_from_model(network: torch.nn.Module, package: str | Path) -> int:
    """Start every weight of the detector from a detector model package (RUN/model, FED/model)
    trained with the same network config. Weights the package lacks may only be adapters
    (``network.adapter_channels`` > 0 on a package trained without): they keep their
    initialisation, under which each adapter is the identity, so the network starts as the
    package's detector. Returns the weights loaded."""
    from medfound.train.checkpoint import state_mismatch
    from medfound.train.package import WEIGHTS, read_model_json

    meta = read_model_json(package)
    if meta.get("task") != "lung_nodule_detection":
        raise MedfoundError(f"not a detector package (task {meta.get('task')!r})", path=package,
                            hint="pass RUN/model of `medfound run train_detector` or `federate`")
    state = torch.load(Path(package) / WEIGHTS, map_location="cpu", weights_only=True)
    problem = state_mismatch(network.state_dict(), state, may_lack=lambda key: "adapter" in key)
    if problem:
        raise MedfoundError(f"the detector package does not fit this network ({problem})",
                            path=package,
                            hint="use the network config the package was trained with "
                                 "(its model.json); only network.adapter_channels may differ")
    network.load_state_dict(state, strict=False)
    return len(state)


def apply_finetune(network: torch.nn.Module, finetune: Mapping[str, Any] | None, load: bool = True, *,
                   init: Callable[..., int] | None = None, freeze: Callable[[Any], None] | None = None,
                   part: str = "backbone") -> str | None:
    """The `finetune` config on a fresh detector network, the same at every place one is built
    (the recipe, the coordinator, each center): `init_encoder` or `init_model` (a whole
    detector package, `init_from_model`; either is loaded only when `load`: a resumed run or a
    center takes the weights from its checkpoint or message),
    `freeze_encoder` (freeze the backbone but its adapters) and `train_only` (name parts of the
    only weights that train, e.g. [adapter, cls_logits, bbox_reg]: adapter-only fine-tuning).
    `init`/`freeze`/`part`: another network's loading and freezing of its encoder (the
    segmenter's). Returns a console line about what was loaded and frozen, or None."""
    from medfound.models.foundation import train_only_

    finetune = finetune or {}
    said = []
    if finetune.get("init_model") and finetune.get("init_encoder"):
        raise MedfoundError("finetune.init_model and finetune.init_encoder are both set",
                            hint="start from a whole detector (init_model) or from an encoder "
                                 "(init_encoder), not both")
    if finetune.get("init_model") and load:
        n = init_from_model(network, finetune["init_model"])
        said.append(f"all {n} weights from the detector {finetune['init_model']}")
    if finetune.get("init_encoder") and load:
        n = (init or init_from_encoder)(network, finetune["init_encoder"])
        said.append(f"{part}: {n} weights from the pretrained encoder {finetune['init_encoder']}")
    if finetune.get("freeze_encoder"):
        (freeze or freeze_backbone)(network)
        said.append(f"{part} frozen")
    if finetune.get("train_only"):
        trained = train_only_(network, list(finetune["train_only"]))
        n = sum(p.numel() for name, p in network.named_parameters() if name in trained)
        total = sum(p.numel() for p in network.parameters())
        said.append(f"training only {list(finetune['train_only'])}: {n} of {total} weights")
    return "; ".join(said) or None


def check_encoder_package(package: str | Path) -> dict[str, Any]:
    """The model.json of a foundation encoder package; a clear error for anything else."""
    from medfound.train.package import read_model_json

    meta = read_model_json(package)
    if meta.get("task") != "foundation_encoder":
        raise MedfoundError(f"not a foundation encoder package (task {meta.get('task')!r})",
                            path=package, hint="pass RUN/encoder of `medfound run pretrain`")
    return meta


def freeze_backbone(network: torch.nn.Module) -> None:
    """Freeze the detector's ResNet body (no gradients, BatchNorm on its running statistics),
    all but its adapters."""
    from medfound.models.foundation import freeze_

    for name, module in network.feature_extractor.body.items():
        if not name.startswith("adapter"):
            freeze_(module)


def train_step(detector, batch: Sequence[dict[str, Any]], cls_weight: float = 1.0
               ) -> dict[str, torch.Tensor]:
    """Losses for one batch of patches: {"loss", "classification", "box_regression"}."""
    images = [item["image"] for item in batch]
    targets = [{"box": item["box"], "label": item["label"]} for item in batch]
    det = getattr(detector, "module", detector)
    out = detector(images, targets)
    cls, reg = out[det.cls_key], out[det.box_reg_key]
    return {"loss": cls_weight * cls + reg, "classification": cls.detach(),
            "box_regression": reg.detach()}


@torch.no_grad()
def validation_scores(detector, items: Sequence[dict[str, Any]], transform: Callable
                      ) -> dict[str, float]:
    """Scores of `detector` on whole studies that move before the CPM does (an untrained
    detector finds nothing, so its CPM is 0 whatever it learnt):

    - ``loss``, ``loss/classification``, ``loss/box_regression``: the training loss, averaged
      over `items` (BatchNorm with its running statistics);
    - ``anchor_auc``: how well the classification logits rank the anchors matched to a
      nodule (by the training matcher) above the background anchors, pooled over `items`
      (the probability that a random matched anchor outscores a random background one; 0.5
      is chance). It does not depend on calibration, which is most of what early training
      changes.

    `transform` is the evaluation transform (voxel boxes)."""
    from monai.apps.detection.utils.detector_utils import preprocess_images

    det = getattr(detector, "module", detector)
    was_training = det.training
    det.eval()
    device = next(det.parameters()).device
    totals = {"loss": 0.0, "loss/classification": 0.0, "loss/box_regression": 0.0}
    above, pairs = 0.0, 0.0
    try:
        for item in items:
            data = transform(dict(item))
            images, _ = preprocess_images([data["image"].to(device)], det.spatial_dims,
                                          det.size_divisible)
            head = det.network(images)
            det.anchors, det.previous_image_shape = None, None  # predict's windows cached theirs
            det.generate_anchors(images, head)
            per_level = [x.shape[2:].numel() for x in head[det.cls_key]]
            for key in (det.cls_key, det.box_reg_key):
                head[key] = det._reshape_maps(head[key])
            targets = [{det.target_box_key: data["box"].to(device),
                        det.target_label_key: data["label"].to(device)}]
            losses = det.compute_loss(head, targets, det.anchors, per_level)
            cls, reg = float(losses[det.cls_key]), float(losses[det.box_reg_key])
            totals["loss"] += cls + reg
            totals["loss/classification"] += cls
            totals["loss/box_regression"] += reg
            matched = det.compute_anchor_matched_idxs(det.anchors, targets, per_level)[0]
            logits = head[det.cls_key][0].max(dim=-1).values
            positive, negative = logits[matched >= 0], torch.sort(logits[matched == -1]).values
            if len(positive) and len(negative):
                below = torch.searchsorted(negative, positive, right=False).double()
                upto = torch.searchsorted(negative, positive, right=True).double()
                above += float((below + upto).sum()) / 2  # ties count half
                pairs += float(len(positive) * len(negative))
    finally:
        det.train(was_training)
        det.anchors, det.previous_image_shape = None, None
    scores = {k: v / max(len(items), 1) for k, v in totals.items()}
    if pairs:
        scores["anchor_auc"] = above / pairs
    return scores


@torch.no_grad()
def predict(detector, items: Sequence[dict[str, Any]], transform: Callable,
            progress: bool = False) -> list[dict[str, Any]]:
    """LUNA16 prediction rows (LPS mm centre + probability) for whole studies.

    `transform` is the evaluation transform (read, resample, clip): it gives "image" as a
    MetaTensor (1, i, j, k) whose affine maps the resampled voxels to LPS mm.
    """
    det = getattr(detector, "module", detector)
    was_training = det.training
    det.eval()
    device = next(det.parameters()).device
    rows: list[dict[str, Any]] = []
    try:
        for item in tqdm(items, desc="predict", unit="study", disable=not progress):
            data = transform(dict(item))
            image = data["image"]
            out = det([image.to(device)], use_inferer=True)[0]
            boxes = out[det.target_box_key].detach().cpu().numpy()
            scores = out[det.pred_score_key].detach().cpu().numpy()
            affine = np.asarray(image.affine, dtype=np.float64)
            rows += predictions_to_rows(item["seriesuid"], boxes, scores, affine)
    finally:
        det.train(was_training)
    return rows


def annotations_of(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """LUNA16 annotation rows from datalist items (world cccwhd boxes, LPS mm), with each
    nodule's ``nodule_type`` where the datalist names it (None otherwise)."""
    rows = []
    for item in items:
        boxes = np.asarray(item["box"], dtype=np.float64).reshape(-1, 6)
        types = list(item.get("nodule_type") or [])
        for n, box in enumerate(boxes):
            rows.append({"seriesuid": item["seriesuid"], "coordX": box[0], "coordY": box[1],
                         "coordZ": box[2], "diameter_mm": float(np.mean(box[3:])),
                         "nodule_type": str(types[n]) if len(types) == len(boxes) else None})
    return rows


def evaluate(detector, items: Sequence[dict[str, Any]], transform: Callable, *,
             n_bootstraps: int = 1000, seed: int = 0, progress: bool = False
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(LUNA16 metrics, prediction rows) of `detector` on `items`."""
    rows = predict(detector, items, transform, progress=progress)
    return score(rows, items, n_bootstraps=n_bootstraps, seed=seed), rows


def score(rows: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]], *,
          n_bootstraps: int = 1000, seed: int = 0) -> dict[str, Any]:
    """LUNA16 metrics of prediction rows (`predict`) against the annotations of `items`."""
    return evaluate_luna16(list(rows), annotations_of(items), [it["seriesuid"] for it in items],
                           n_bootstraps=n_bootstraps, seed=seed)
