"""Recipe: train the lung-nodule detector on some centers, validate on others.

    medfound run train_detector data.root=DIR data.train_centers=[center_0,center_1] \
        data.val_centers=[center_2] experiment=phantoms_smoke out_dir=RUN

Set-up, loop, package, in the order they happen. Leaves RUN/model/ (weights, resolved config,
preprocessing, metrics), RUN/checkpoints/ and an MLflow run (id in RUN/mlflow_run.json; named
"pooled CENTERS" or "local CENTER" and tagged, see medfound.train.tracking). On CPU a rerun with
the same seed, data, torch threads and data.num_workers writes the same metrics.json and
weights; the package's provenance and the run's params ("reproducibility.*") record them.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medfound.data.detection import (
    detection_collate,
    eval_transforms,
    make_dataset,
    train_transforms,
)
from medfound.errors import exit_on_user_error
from medfound.train import detection as task
from medfound.train.loop import (
    ByWeights,
    TrainerConfig,
    distributed_loader,
    fit,
    is_main_process,
    reproducibility,
    set_threads,
)
from medfound.train.package import save_model_package
from medfound.train.tracking import Tracker, git_commit


@hydra.main(version_base=None, config_path="../configs", config_name="train_detector")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir)
    data, model_cfg = cfg.data, cfg.network
    trainer = TrainerConfig.from_dict({**OmegaConf.to_container(cfg.trainer), "seed": cfg.seed})
    set_threads(trainer.threads)  # before anything computes: results depend on the count

    # Data: each center's datalist; preprocessing cached after the first epoch.
    train_items = task.training_items(data, seed=cfg.seed)
    val_items = task.evaluation_items(data.root, data.val_centers, data.train_centers,
                                      data.val_split)
    prep = {**OmegaConf.to_container(model_cfg), **OmegaConf.to_container(data)}
    train_ds = make_dataset(train_items, train_transforms(prep), cache=data.cache,
                            cache_dir=data.cache_dir)
    loader = distributed_loader(train_ds, batch_size=data.batch_size, shuffle=True,
                                seed=cfg.seed, num_workers=data.num_workers,
                                collate_fn=detection_collate)
    val_transform = eval_transforms(prep)

    # Model: the network alone (tensors in, tensors out) inside the detector logic.
    network, detector = task.build(model_cfg, seed=cfg.seed)
    finetune = OmegaConf.to_container(cfg.get("finetune") or {})
    said = task.apply_finetune(network, finetune, load=not cfg.resume)  # resumed: from the checkpoint
    if said:
        print(said)

    # Predictions once per set of weights: the package's evaluation of the best checkpoint
    # reuses those its validation made.
    predict = ByWeights(lambda model: task.predict(model, val_items, val_transform))

    def validate(model):
        metrics = task.score(predict(model), val_items, n_bootstraps=200, seed=cfg.seed)
        return {"cpm": metrics["cpm"], **{f"froc_{k}fp": v for k, v in metrics["froc"].items()}}

    repro = reproducibility(trainer, num_workers=data.num_workers)
    role = "pooled" if len(data.train_centers) > 1 else "local"
    with Tracker(cfg.tracking, out_dir=out, config=OmegaConf.to_container(cfg, resolve=True),
                 resume=cfg.resume, tags={"task": "lung_nodule_detection", "role": role,
                                          "deterministic": repro["deterministic"]}) as tracker:
        tracker.log_params({"reproducibility": repro})
        result = fit(detector, loader, task.train_step, trainer, out, validate=validate,
                     tracker=tracker, resume=cfg.resume)
        if not is_main_process():
            return
        # Package the best validated weights (the last ones when validation never ran).
        result.load_best(detector)
        metrics = task.score(predict(detector), val_items, seed=cfg.seed)
        package = save_model_package(
            out / "model", network, task="lung_nodule_detection",
            model_config=task.detector_config(model_cfg).to_dict(),
            preprocessing={"spacing_mm": list(model_cfg.spacing_mm),
                           "hu_window": list(model_cfg.hu_window), "orientation": "LPS",
                           "intensity": "clip to hu_window, scale to [0, 1]"},
            metrics=metrics, config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            provenance={"role": role, "train_centers": list(data.train_centers),
                        "val_centers": list(data.val_centers), "val_split": data.val_split,
                        "train_split": task.training_split(data),
                        "train_cases": len(train_items),
                        "val_cases": len(val_items), "seed": cfg.seed,
                        "init_encoder": finetune.get("init_encoder"),
                        "init_model": finetune.get("init_model"),
                        "freeze_encoder": bool(finetune.get("freeze_encoder", False)),
                        "train_only": finetune.get("train_only"),
                        "reproducibility": repro, "git_commit": git_commit(),
                        "mlflow_run_id": tracker.run_id})
        tracker.log_metrics({"final_cpm": metrics["cpm"]})
        tracker.log_artifacts(package, "model")
        print(f"model package: {package}  (validation CPM {metrics['cpm']:.3f}, "
              f"MLflow run {tracker.run_id})")


if __name__ == "__main__":
    main()
