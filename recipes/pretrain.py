"""Recipe: self-supervised pretraining of the multi-modal foundation encoder (pooled).

    medfound run pretrain data.root=DIR data.train_centers=[center_0,center_1] \
        data.val_centers=[center_2] out_dir=RUN

Set-up, loop, package. Leaves RUN/encoder/ (the encoder's weights: stems + shared body, its
config and per-modality preprocessing), RUN/checkpoints/ and an MLflow run.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medfound.data.detection import make_dataset
from medfound.data.pretrain import (
    load_volume_list,
    modality_counts,
    pretrain_collate,
    pretrain_eval_transforms,
    pretrain_train_transforms,
)
from medfound.errors import MedfoundError, exit_on_user_error
from medfound.train import pretrain as task
from medfound.train.detection import check_world_split
from medfound.train.loop import ByWeights, TrainerConfig, distributed_loader, fit, is_main_process
from medfound.train.package import save_model_package
from medfound.train.tracking import Tracker


@hydra.main(version_base=None, config_path="../configs", config_name="pretrain")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir)
    data, t = cfg.data, OmegaConf.to_container(cfg.task, resolve=True)
    mods = t["encoder"]["modalities"]
    loss = task.loss_params(t["loss"])

    # Data: every modality of every training case. Validation: every case of a held-out center,
    # the validation split of a center also trained on.
    check_world_split(data.root, list(data.train_centers), "data.train_centers")
    check_world_split(data.root, list(data.val_centers), "data.val_centers")
    train_items = load_volume_list(data.root, data.train_centers, "training", mods)
    val_items = [it for c in data.val_centers for it in load_volume_list(
        data.root, [c], "validation" if c in data.train_centers else "all", mods)]
    if not train_items:
        raise MedfoundError(f"no {'/'.join(mods)} volumes in the training centers "
                            f"{list(data.train_centers)}", path=data.root,
                            hint="check data.root, data.train_centers and task.encoder.modalities")
    train_ds = make_dataset(train_items, pretrain_train_transforms(t), cache=data.cache,
                            cache_dir=data.cache_dir)
    loader = distributed_loader(train_ds, batch_size=t["batch_size"], shuffle=True, seed=cfg.seed,
                                num_workers=data.num_workers, collate_fn=pretrain_collate)
    val_loader = None
    if val_items:
        val_ds = make_dataset(val_items, pretrain_eval_transforms(t), cache=data.cache,
                              cache_dir=data.cache_dir)
        val_loader = distributed_loader(val_ds, batch_size=t["batch_size"], shuffle=False,
                                        seed=cfg.seed, collate_fn=pretrain_collate)
    print(f"pretraining on {len(train_items)} volumes {modality_counts(train_items)}, "
          f"validating on {len(val_items)}")

    model = task.build(t["encoder"], seed=cfg.seed)

    # Scored once per set of weights: the package's evaluation of the best checkpoint reuses
    # its validation's.
    validate = ByWeights(lambda m: task.evaluate(m, val_loader, loss, seed=cfg.seed))

    trainer = TrainerConfig.from_dict({**OmegaConf.to_container(cfg.trainer), "seed": cfg.seed})
    with Tracker(cfg.tracking, out_dir=out, config=OmegaConf.to_container(cfg, resolve=True),
                 resume=cfg.resume) as tracker:
        result = fit(model, loader, partial(task.train_step, params=loss), trainer, out,
                     validate=validate if val_loader is not None else None, tracker=tracker,
                     resume=cfg.resume)
        if not is_main_process():
            return
        result.load_best(model)
        metrics = validate(model) if val_loader is not None else {}
        package = save_model_package(
            out / "encoder", model.encoder, task="foundation_encoder",
            model_config={k: v for k, v in t["encoder"].items()},
            preprocessing={"modalities": t["modalities"], "patch_size": t["patch_size"],
                           "orientation": "LPS"},
            metrics=metrics, config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            provenance={"train_centers": list(data.train_centers),
                        "val_centers": list(data.val_centers),
                        "volumes": modality_counts(train_items), "val_volumes": len(val_items),
                        "seed": cfg.seed, "mlflow_run_id": tracker.run_id})
        tracker.log_artifacts(package, "encoder")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"encoder package: {package}  ({shown or 'no validation volumes'}; "
              f"MLflow run {tracker.run_id})")


if __name__ == "__main__":
    main()
