"""The message contract between the coordinator (ServerApp) and the centers (ClientApp).

Coordinator → center, for "train" and "evaluate" messages (a Flower RecordDict):

    "arrays"  ArrayRecord   global network weights (see medfound.fed.params), fed.transfer_dtype
    "config"  ConfigRecord  "server-round" (set by Flower's strategy), "task" (JSON: the
                            task group (name "detect" | "pretrain" and, for pretrain,
                            the encoder, loss and per-modality knobs), the
                            network / trainer / data knobs, seed, local_epochs, transfer_dtype,
                            eval_bootstraps, run_tag), "versions" (JSON), "proximal-mu"
                            under FedProx, and in a train message "evaluate-received" (true:
                            score the received weights on the validation split before
                            training, fed.evaluate_with_train)
    with fed.exchange=trainable, "arrays" holds the whole model in round 1 and only the
    trainable weights (FPN, heads, adapters) after; a center keeps its frozen backbone between
    rounds in its own round state
    cross-site evaluation after the last round (medfound.fed.cross_site): "arrays:<model>"
    per model instead of "arrays", and "cross-site-models" (JSON list) in "config"

Center → coordinator, everything that ever leaves a center:

    train     "arrays" (updated weights: same keys, shapes and dtype as received),
              "metrics" MetricRecord ("num-examples" = training cases, "train/loss", ...,
              "train/seconds" = the local training's wall time, "evaluate/seconds" = the
              scoring's when the message asked for it (below); task=pretrain:
              "num-examples" = training volumes and "volumes/<m>" per modality),
              "center" ConfigRecord ({"name": the center's name in the federation}),
              and when the message asked for it "evaluate-metrics" (the evaluate reply's
              "metrics" for the received weights, i.e. the previous round's global model)
    evaluate  "metrics" ("num-examples" = validation cases, "n_nodules", and "cpm",
              "froc/<fp rate>" when the validation cases hold nodules), "center";
              in a cross-site evaluation one "metrics:<model>" per model instead of "metrics";
              task=pretrain: "num-examples" = validation volumes, "reconstruction",
              "contrastive", "contrastive_accuracy", "loss"

No path, series UID, patient attribute or image array is ever put in a reply; the test
suite checks the bytes of every outbound payload for them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from medfound import __version__
from medfound.errors import MedfoundError

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
CENTER = "center"
NUM_EXAMPLES = "num-examples"  # the key Flower's strategies weight by
ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
EVALUATE_RECEIVED = "evaluate-received"  # train config: score the received weights first
EVALUATION = "evaluate-metrics"  # train reply: those scores (the coordinator pops them)
CROSS_SITE = "cross-site-models"  # JSON list of the models a cross-site evaluation scores

# data.* keys a center needs to prepare its studies like every other center; the rest
# (root, cache_dir, which centers) is the coordinator's or the center's own business.
_DATA_KEYS_NOT_SENT = ("root", "cache_dir", "train_centers", "val_centers", "val_split",
                       "train_split", "label_fraction")


class VersionMismatch(MedfoundError):
    """A center's medfound / flwr / torch would not interoperate with the coordinator's."""


def task_spec(cfg: Mapping[str, Any], *, local_epochs: int, transfer_dtype: str,
              eval_bootstraps: int, run_tag: str, exchange: str = "all") -> str:
    """The JSON "task" string of a train / evaluate message's config."""
    data = {k: v for k, v in dict(cfg["data"]).items() if k not in _DATA_KEYS_NOT_SENT}
    return json.dumps({"task": dict(cfg.get("task") or {"name": "detect"}),
                       "network": dict(cfg["network"]), "trainer": dict(cfg["trainer"]),
                       "data": data, "seed": int(cfg["seed"]), "local_epochs": local_epochs,
                       "transfer_dtype": transfer_dtype, "eval_bootstraps": eval_bootstraps,
                       "run_tag": run_tag, "exchange": exchange,
                       "freeze_encoder": bool((cfg.get("finetune") or {}).get("freeze_encoder")),
                       "train_only": list((cfg.get("finetune") or {}).get("train_only") or [])},
                      sort_keys=True)


def read_task(config: Mapping[str, Any]) -> dict[str, Any]:
    """The task dict of a received ConfigRecord, with the round and FedProx's μ merged in."""
    try:
        task = json.loads(str(config["task"]))
        task["round"] = int(config[ROUND])
    except (KeyError, TypeError, ValueError) as err:
        raise MedfoundError(f"the coordinator's message has no readable task ({err})",
                            hint="coordinator and center run different medfound versions") from err
    task["proximal_mu"] = float(config.get(PROXIMAL_MU, 0.0) or 0.0)
    return task


def versions() -> dict[str, str]:
    """medfound, flwr and torch versions of this process."""
    import flwr
    import torch

    return {"medfound": __version__, "flwr": flwr.__version__,
            "torch": torch.__version__.split("+")[0]}


def check_versions(theirs: Mapping[str, str], ours: Mapping[str, str] | None = None) -> None:
    """Refuse (`VersionMismatch`) when versions would not interoperate: medfound and flwr
    must agree on major.minor (message contract, Flower protocol), torch on the major."""
    ours = dict(ours or versions())
    parts = {"medfound": 2, "flwr": 2, "torch": 1}
    wrong = []
    for name, n in parts.items():
        a, b = str(theirs.get(name, "?")), str(ours.get(name, "?"))
        if a.split(".")[:n] != b.split(".")[:n]:
            wrong.append(f"{name} {a} at the coordinator, {b} here")
    if wrong:
        raise VersionMismatch("versions do not interoperate: " + "; ".join(wrong),
                              hint="install the coordinator's versions at this center")


def center_of(message: Any, known: Mapping[int, str] | None = None) -> str:
    """The center a reply came from: the name it sent, else a name learnt for its node id."""
    if message.has_content() and CENTER in message.content.config_records:
        return str(message.content[CENTER].get("name", "?"))
    node = message.metadata.src_node_id
    return (known or {}).get(node, f"node-{node}")
