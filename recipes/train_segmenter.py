"""Recipe: train the nodule segmenter on some centers, validate on others.

    medfound run train_segmenter data.root=DIR data.train_centers=[center_0,center_1] \
        data.val_centers=[center_2] experiment=phantoms_smoke out_dir=RUN \
        [finetune.init_encoder=PT/encoder finetune.freeze_encoder=true network.adapter_channels=8]

The data need masks (`medfound phantoms --masks`). Leaves RUN/model/ (weights, resolved config,
preprocessing, Dice), RUN/checkpoints/ and an MLflow run; `medfound export RUN/model` exports it.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medfound.data.detection import make_dataset
from medfound.data.segmentation import (
    check_masks,
    seg_collate,
    seg_eval_transforms,
    seg_train_transforms,
)
from medfound.errors import exit_on_user_error
from medfound.train import segmentation as task
from medfound.train.detection import evaluation_items, training_items
from medfound.train.loop import ByWeights, TrainerConfig, distributed_loader, fit, is_main_process
from medfound.train.package import save_model_package
from medfound.train.tracking import Tracker


@hydra.main(version_base=None, config_path="../configs", config_name="train_segmenter")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir)
    data, model_cfg = cfg.data, cfg.network
    seg_cfg = task.segmenter_config(model_cfg)

    # Data: each center's datalist with its masks; preprocessing cached after the first epoch.
    train_items = check_masks(training_items(data, seed=cfg.seed), data.root)
    val_items = check_masks(evaluation_items(data.root, data.val_centers, data.train_centers,
                                             data.val_split), data.root)
    prep = {**OmegaConf.to_container(model_cfg), **OmegaConf.to_container(data)}
    train_ds = make_dataset(train_items, seg_train_transforms(prep), cache=data.cache,
                            cache_dir=data.cache_dir)
    loader = distributed_loader(train_ds, batch_size=data.batch_size, shuffle=True, seed=cfg.seed,
                                num_workers=data.num_workers, collate_fn=seg_collate)
    val_transform = seg_eval_transforms(prep)

    network = task.build(model_cfg, seed=cfg.seed)
    finetune = OmegaConf.to_container(cfg.get("finetune") or {})
    said = task.apply_finetune(network, finetune, load=not cfg.resume)  # resumed: from the checkpoint
    if said:
        print(said)

    # Scored once per set of weights: the package's evaluation of the best checkpoint reuses
    # its validation's.
    evaluate = ByWeights(lambda model: task.evaluate(model, seg_cfg, val_items, val_transform))

    def validate(model):
        metrics = evaluate(model)
        return {"dice": metrics["dice"], "nodule_dice": metrics["nodule_dice"]}

    trainer = TrainerConfig.from_dict({**OmegaConf.to_container(cfg.trainer), "seed": cfg.seed})
    with Tracker(cfg.tracking, out_dir=out, config=OmegaConf.to_container(cfg, resolve=True),
                 resume=cfg.resume) as tracker:
        result = fit(network, loader, task.train_step, trainer, out, validate=validate,
                     tracker=tracker, resume=cfg.resume)
        if not is_main_process():
            return
        result.load_best(network)
        metrics = evaluate(network)
        package = save_model_package(
            out / "model", network, task=task.TASK, model_config=seg_cfg.to_dict(),
            preprocessing={"spacing_mm": list(seg_cfg.spacing_mm), "hu_window": list(seg_cfg.hu_window),
                           "orientation": "LPS", "modality": "CT",
                           "intensity": "clip to hu_window, scale to [0, 1]"},
            metrics=metrics, config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            provenance={"train_centers": list(data.train_centers),
                        "val_centers": list(data.val_centers), "val_split": data.val_split,
                        "train_cases": len(train_items), "val_cases": len(val_items),
                        "seed": cfg.seed, "init_encoder": finetune.get("init_encoder"),
                        "freeze_encoder": bool(finetune.get("freeze_encoder", False)),
                        "mlflow_run_id": tracker.run_id})
        tracker.log_metrics({"final_dice": metrics["dice"], "final_nodule_dice": metrics["nodule_dice"]})
        tracker.log_artifacts(package, "model")
        print(f"model package: {package}  (validation Dice {metrics['dice']:.3f} on "
              f"{metrics['n_studies_with_nodules']} studies with nodules, per-nodule Dice "
              f"{metrics['nodule_dice']:.3f} on {metrics['n_nodules']} nodules, MLflow run {tracker.run_id})")


if __name__ == "__main__":
    main()
