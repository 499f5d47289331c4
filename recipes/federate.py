"""Recipe: train the lung-nodule detector (or pretrain the foundation encoder) federated.

    medfound run federate fed.mode=simulation data.root=DIR \
        fed.centers=[center_0,center_1,center_2] experiment=phantoms_smoke fed.rounds=2 out_dir=FED
    medfound run federate task=pretrain fed.mode=simulation data.root=DIR fed.rounds=2 out_dir=FED

Each center trains with the same loop as pooled training on its own folder only; the
coordinator aggregates with the strategy chosen by fed=<name> (configs/fed/). Leaves
FED/model/ (the model package), FED/metrics.json, FED/audit/<center>.jsonl (what each center
sent), FED/server/state.pt (resume=true continues after its last round) and an MLflow run.
With task=pretrain the centers pretrain the encoder on every volume of the modalities they
hold, each modality's stem averaged only among the centers that have it; FED/encoder/ instead.
The rounds themselves are medfound.fed.server_app; this file only composes and checks.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medfound.errors import exit_on_user_error
from medfound.fed.server_app import STATE_FILE
from medfound.fed.settings import FedSettings, all_centers
from medfound.fed.strategies import build_strategy
from medfound.models.foundation import FoundationConfig
from medfound.train import detection as task
from medfound.train.checkpoint import load_checkpoint
from medfound.train.loop import TrainerConfig
from medfound.train.pretrain import loss_params


@hydra.main(version_base=None, config_path="../configs", config_name="federate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    if config["fed"]["centers"] in (None, "all"):  # every center folder of data.root
        config["fed"]["centers"] = all_centers(Path(config["data"]["root"]))

    # Check every knob here, before Ray and Flower start: a bad value is one line.
    settings = FedSettings.from_config(config)
    build_strategy(settings.strategy, settings.min_centers,
                   group_by_modality=settings.task == "pretrain")
    TrainerConfig.from_dict(config["trainer"])
    if settings.task == "pretrain":
        FoundationConfig.from_dict(config["task"]["encoder"])
        loss_params(config["task"]["loss"])
    else:
        task.detector_config(config["network"])
        finetune = config.get("finetune") or {}
        if finetune.get("init_encoder"):  # the coordinator starts from it: check before Ray starts
            task.check_encoder_package(finetune["init_encoder"])
        if finetune.get("init_model"):
            task.init_from_model(task.build(config["network"], seed=0)[0], finetune["init_model"])

    if config["resume"]:  # one line now, not after Ray has started
        load_checkpoint(Path(config["out_dir"]) / STATE_FILE)
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(config))
    if settings.mode == "deployment":
        from medfound.fed.deployment import run_deployment

        run_deployment(config, config_yaml)
        return
    from medfound.fed.simulation import run_simulation

    run_simulation(config, config_yaml)


if __name__ == "__main__":
    main()
