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

A center does not trust the coordinator: `read_task` checks every field of a message's config
(types, names from a strict alphabet, numbers in range, sizes) before anything at the center
uses it, and refuses a message that breaks a rule with `InvalidMessage`, whose text names the
field and the rule but never quotes the value at length. ``run_tag`` and the round become
folder names at the center, so they are the strictest: a run tag is 1-64 of ``[A-Za-z0-9_-]``,
a round an integer in [0, MAX_ROUND].
"""

from __future__ import annotations

import json
import math
import re
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
SCORE_LOSS = "score-loss"  # cross-site config: also the detection loss on the validation studies
EVALUATION = "evaluate-metrics"  # train reply: those scores (the coordinator pops them)
CROSS_SITE = "cross-site-models"  # JSON list of the models a cross-site evaluation scores

# data.* keys a center needs to prepare its studies like every other center; the rest
# (root, cache_dir, which centers) is the coordinator's or the center's own business.
_DATA_KEYS_NOT_SENT = ("root", "cache_dir", "train_centers", "val_centers", "val_split",
                       "train_split", "label_fraction")


class VersionMismatch(MedfoundError):
    """A center's medfound / flwr / torch would not interoperate with the coordinator's."""


class InvalidMessage(MedfoundError):
    """A coordinator's message breaks the contract: a field of the wrong type, out of range or
    not from its alphabet. The text names the field and the rule only."""


RUN_TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the coordinator's run tags: 12 hex digits
MODEL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}(:[A-Za-z0-9_.-]{1,64})?")  # "global", "local:<center>"
MAX_ROUND = 100_000
MAX_TASK_BYTES = 1 << 20  # the task JSON of the recipes is ~3 KB
_MAX_DEPTH, _MAX_STRING, _MAX_LIST = 8, 256, 1024
TASKS = ("detect", "pretrain")
EXCHANGES = ("all", "trainable")
TRANSFER_DTYPES = ("float32", "float16")
CACHES = ("memory", "disk", "none")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,2})?")
# Knobs that size what a center computes or allocates: [low, high] (ints unless a float bound).
_TOP_RANGES = {"seed": (0, 2**31 - 1), "local_epochs": (1, 1000), "eval_bootstraps": (1, 100_000)}
_SECTION_RANGES = {
    "data": {"batch_size": (1, 256), "num_patches_per_image": (1, 256), "num_workers": (0, 64)},
    "trainer": {"num_workers": (0, 64), "lr": (0.0, 100.0), "log_every": (1, 10**6),
                "epochs": (1, 10**6), "step_epochs": (1, 10**6), "val_every": (1, 10**6)},
    "network": {"sw_batch_size": (1, 256), "fpn_channels": (1, 4096), "detections_per_img": (0, 10**5),
                "topk_candidates_per_level": (0, 10**6), "hns_batch_size_per_image": (0, 10**6),
                "adapter_channels": (0, 4096), "n_input_channels": (1, 64), "num_classes": (1, 1024)},
    "task": {"batch_size": (1, 256)},
}
_VOXEL_LISTS = ("patch_size", "sw_roi_size")  # (i, j, k) voxels: each side and the product capped
_MAX_SIDE, _MAX_VOXELS = 2048, 1 << 28
# Resampling to a finer grid multiplies a volume's voxels: every "spacing_mm" anywhere in the
# task is bounded (the reference detector uses 0.703125 mm).
_SPACING_MM = (0.5, 50.0)
_WIDTH_LISTS = {"block_inplanes": 4096, "layers": 256}


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
    """The task dict of a received ConfigRecord, with the round and FedProx's μ merged in
    (and "evaluate_received", "cross_site_models" when the message has them), every field
    checked (`InvalidMessage` names the first that breaks the contract)."""
    try:
        text, round_ = config["task"], config[ROUND]
    except (KeyError, TypeError) as err:
        raise MedfoundError(f"the coordinator's message has no readable task ({err})",
                            hint="coordinator and center run different medfound versions") from err
    _need(isinstance(text, str) and len(text.encode("utf-8", "replace")) <= MAX_TASK_BYTES,
          "task", f"must be a JSON text of at most {MAX_TASK_BYTES} bytes")
    try:
        task = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        task = None
    _need(isinstance(task, dict), "task", "must be a JSON object (finite numbers only)")
    _check_tree(task, "task", 0)
    task["round"] = check_round(round_)
    mu = config.get(PROXIMAL_MU, 0.0)
    if mu is None:
        mu = 0.0
    _need(_number(mu) and 0.0 <= mu <= 1e6, PROXIMAL_MU, "must be a number in [0, 1e6]")
    task["proximal_mu"] = float(mu)
    if EVALUATE_RECEIVED in config:
        _need(isinstance(config[EVALUATE_RECEIVED], bool), EVALUATE_RECEIVED, "must be true or false")
    task["evaluate_received"] = bool(config.get(EVALUATE_RECEIVED, False))
    if CROSS_SITE in config:
        task["cross_site_models"] = cross_site_models(config[CROSS_SITE])
    if SCORE_LOSS in config:
        _need(isinstance(config[SCORE_LOSS], bool), SCORE_LOSS, "must be true or false")
    task["score_loss"] = bool(config.get(SCORE_LOSS, False))
    _check_task(task)
    return task


def check_run_tag(value: Any) -> str:
    """`value` if it is a valid run tag (a folder name at the center), else `InvalidMessage`."""
    _need(isinstance(value, str) and RUN_TAG.fullmatch(value) is not None, "run_tag",
          "must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def check_round(value: Any) -> int:
    """`value` if it is a valid round number (an int in [0, MAX_ROUND]), else `InvalidMessage`."""
    _need(isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ROUND,
          ROUND, f"must be an integer in [0, {MAX_ROUND}]")
    return int(value)


def cross_site_models(value: Any) -> list[str]:
    """The model names of a cross-site evaluation's config (a JSON list of names)."""
    try:
        names = json.loads(value) if isinstance(value, str) and len(value) <= 65536 else None
    except ValueError:
        names = None
    _need(isinstance(names, list) and 0 < len(names) <= _MAX_LIST
          and all(isinstance(n, str) and MODEL_NAME.fullmatch(n) for n in names)
          and len(set(names)) == len(names), CROSS_SITE,
          "must be a JSON list of distinct model names (global, local:<center>)")
    return names


def _check_task(task: dict[str, Any]) -> None:
    """The fields of a decoded task: the ones that name folders, size work or pick code."""
    check_run_tag(task.get("run_tag"))
    for key, (low, high) in _TOP_RANGES.items():
        _need(_integer(task.get(key)) and low <= task[key] <= high, key,
              f"must be an integer in [{low}, {high}]")
    for key in ("network", "trainer", "data"):
        _need(isinstance(task.get(key), dict), key, "must be an object")
    group = task.get("task")
    if group is None:
        task["task"] = group = {"name": "detect"}
    _need(isinstance(group, dict) and group.get("name", "detect") in TASKS, "task.name",
          f"must be one of {', '.join(TASKS)}")
    _need(task.get("exchange", "all") in EXCHANGES, "exchange", f"must be one of {', '.join(EXCHANGES)}")
    _need(task.get("transfer_dtype") in TRANSFER_DTYPES, "transfer_dtype",
          f"must be one of {', '.join(TRANSFER_DTYPES)}")
    _need(isinstance(task.get("freeze_encoder", False), bool), "freeze_encoder", "must be true or false")
    only = task.get("train_only", [])
    _need(isinstance(only, list) and all(isinstance(n, str) and re.fullmatch(r"[A-Za-z0-9_.]{1,64}", n)
                                         for n in only), "train_only", "must be a list of weight-name parts")
    for section, ranges in _SECTION_RANGES.items():
        values = task[section] if section != "task" else group
        for key, (low, high) in ranges.items():
            if values.get(key) is None:
                continue
            ok = (_number(values[key]) if isinstance(low, float) else _integer(values[key]))
            _need(ok and low <= values[key] <= high, f"{section}.{key}", f"must be in [{low}, {high}]")
    data = task["data"]
    _need(data.get("cache", "memory") in CACHES, "data.cache", f"must be one of {', '.join(CACHES)}")
    # The center's own business: where its data and cache live is never the coordinator's say.
    for key in _DATA_KEYS_NOT_SENT:
        data.pop(key, None)
    device = task["trainer"].get("device", "auto")
    _need(isinstance(device, str) and _DEVICE.fullmatch(device) is not None, "trainer.device",
          "must be auto, cpu, mps, cuda or cuda:N")
    network = task["network"]
    for section, values in (("network", network), ("task", group)):
        for key in _VOXEL_LISTS:
            size = values.get(key)
            if size is None:
                continue
            _need(isinstance(size, list) and 0 < len(size) <= 3
                  and all(_integer(n) and 1 <= n <= _MAX_SIDE for n in size)
                  and math.prod(size) <= _MAX_VOXELS, f"{section}.{key}",
                  f"must be at most 3 sides of 1-{_MAX_SIDE} voxels, {_MAX_VOXELS} in all")
    _check_spacings(task, "task")
    for key, high in _WIDTH_LISTS.items():
        widths = network.get(key)
        if widths is not None:
            _need(isinstance(widths, list) and len(widths) <= 8
                  and all(_integer(n) and 0 <= n <= high for n in widths), f"network.{key}",
                  f"must be at most 8 integers in [0, {high}]")


def _check_spacings(value: Any, where: str) -> None:
    """Every "spacing_mm" in the task: null, or 1-3 numbers in _SPACING_MM."""
    if isinstance(value, list):
        for item in value:
            _check_spacings(item, where)
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        field = f"{where}.{key}"
        if key == "spacing_mm" and item is not None:
            low, high = _SPACING_MM
            _need(isinstance(item, list) and 0 < len(item) <= 3
                  and all(_number(x) and low <= x <= high for x in item), field,
                  f"must be null or at most 3 numbers in [{low}, {high}] mm")
        else:
            _check_spacings(item, field)


def _check_tree(value: Any, where: str, depth: int) -> None:
    """JSON of bounded shape: depth, string and list lengths, finite numbers, short str keys."""
    _need(depth <= _MAX_DEPTH, where, f"nests deeper than {_MAX_DEPTH} levels")
    if isinstance(value, dict):
        _need(len(value) <= _MAX_LIST, where, f"has more than {_MAX_LIST} keys")
        for key, item in value.items():
            _need(isinstance(key, str) and 0 < len(key) <= 64, where, "has a key longer than 64")
            _check_tree(item, f"{where}.{key}" if len(where) < 200 else where, depth + 1)
    elif isinstance(value, list):
        _need(len(value) <= _MAX_LIST, where, f"has more than {_MAX_LIST} items")
        for item in value:
            _check_tree(item, where, depth + 1)
    elif isinstance(value, str):
        _need(len(value) <= _MAX_STRING, where, f"is a text longer than {_MAX_STRING} characters")
    elif isinstance(value, float):
        _need(math.isfinite(value), where, "must be a finite number")
    elif _integer(value):
        _need(abs(value) <= 2**53, where, "is an integer beyond 2**53")
    else:
        _need(value is None or isinstance(value, bool), where, "is not a JSON value")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _need(ok: bool, field: str, rule: str) -> None:
    if not ok:
        raise InvalidMessage(f"the coordinator's message has an invalid {field[:120]}: {rule}",
                             hint="the coordinator sent what this center's medfound refuses to use")


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
