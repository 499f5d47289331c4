"""The `fed.*` keys of configs/federate.yaml, checked once before any process starts.

`FedSettings.from_config(cfg)` turns the resolved Hydra config (a plain dict) into one frozen
record and raises a one-line `MedfoundError` naming the key for anything a user can get
wrong. The coordinator, the simulation launcher and the recipe all read this record, so a
bad value is caught before Ray or Flower start.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medfound.errors import MedfoundError

MODES = ("simulation", "deployment")
TRANSFER_DTYPES = ("float32", "float16")
# fed/<name>.yaml → the Flower Message-API strategy behind it (see medfound.fed.strategies).
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmed_mean", "krum")
# fed.exchange: which weights travel after the first round.
EXCHANGES = ("all", "trainable")
# task=<name> (configs/task/): what the federation trains.
TASKS = ("detect", "pretrain")
# fed.privacy.dp: where updates are clipped before the coordinator adds Gaussian noise.
DP_MODES = ("client", "server")
# fed.max_cases: the default cap on the training cases one center's reply may claim.
MAX_CASES = 1_000_000
DATALIST = "datalist.json"  # what makes a folder of data.root a center (medfound.data.detection)
# A center's name: what the coordinator accepts in a reply and puts in paths and metric names.
CENTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclasses.dataclass(frozen=True)
class FedSettings:
    """Validated `fed.*` keys. Units: seconds for timeouts; epochs are local epochs per round."""

    mode: str
    centers: tuple[str, ...]
    rounds: int
    local_epochs: int
    min_centers: int
    round_timeout_s: float
    transfer_dtype: str
    reject_norm_factor: float | None
    eval_bootstraps: int
    audit_payloads: bool
    cross_site: bool
    strategy: dict[str, Any]
    simulation: dict[str, Any]
    deployment: dict[str, Any] = dataclasses.field(default_factory=dict)
    privacy: dict[str, Any] = dataclasses.field(default_factory=dict)
    exchange: str = "all"  # "all" | "trainable" (see configs/federate.yaml)
    # Internal switches, not in configs/federate.yaml: the benchmarks' A/B arms set them
    # (`+fed.evaluate_with_train=false`, benchmarks/federation.py).
    evaluate_with_train: bool = True  # score round r's model in round r+1's train message
    evaluate_every: int = 1  # score the global model every this many rounds (and the last one)
    stream_aggregation: bool = True  # spool updates to disk, average array by array
    task: str = "detect"  # task.name: "detect" (the nodule detector) | "pretrain" (the encoder)
    # cross-site validation also sends each center's last local update to every other center
    # (never under differential privacy or secure aggregation)
    share_local_models: bool = False
    # leave-one-out models of each center scored at every center after the last round
    # (FED/contribution.json; medfound.fed.contribution); needs share_local_models
    contribution: bool = False
    max_cases: int = MAX_CASES  # the most training cases a center's reply may claim
    # {center: its case count from its data card}: a reply claiming more is rejected
    declared_cases: dict[str, int] = dataclasses.field(default_factory=dict)
    # {center: Flower node id} from `medfound fed register`: the only node that may answer
    # as that center (unset: a name is bound to the first node that answers with it)
    nodes: dict[str, int] = dataclasses.field(default_factory=dict)
    # participation (medfound.fed.participation): the share or number of the connected
    # centers drawn each round (None: every one), and the replies a round waits for
    fraction: float | None = None
    centers_per_round: int | None = None
    replies_per_round: int | None = None

    @property
    def strategy_name(self) -> str:
        return str(self.strategy["name"])

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], centers: list[str] | None = None) -> FedSettings:
        """Validate `cfg["fed"]` (and the trainer keys federated training constrains).

        `centers` replaces ``fed.centers`` when the caller resolved it (null or "all" = every
        center folder of data.root, which the recipe lists).
        """
        fed = dict(cfg.get("fed") or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fed) - known)
        if unknown:
            raise MedfoundError(f"fed config: unknown key(s) {unknown}",
                                hint=f"valid keys are {sorted(known)}")

        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise MedfoundError(f"config key 'fed.{key}' = {fed.get(key)!r}: {why}")

        need(fed.get("mode") in MODES, "mode", f"must be one of {', '.join(MODES)}")
        names = centers if centers is not None else fed.get("centers")
        need(isinstance(names, (list, tuple)) and len(names) > 0
             and all(isinstance(c, str) and CENTER_NAME.fullmatch(c) for c in names), "centers",
             "must be a non-empty list of center names (letters, digits, '_', '.', '-'; up to "
             "64), e.g. fed.centers=[center_0,center_1], or all (every center folder of "
             "data.root, which `medfound run federate` lists)")
        need(len(set(names)) == len(names), "centers", "lists a center twice")
        fed.setdefault("evaluate_every", 1)
        for key in ("rounds", "local_epochs", "min_centers", "evaluate_every"):
            need(_int(fed.get(key)) and fed[key] >= 1, key, "must be an integer >= 1")
        need(fed["min_centers"] <= len(names), "min_centers",
             f"is more than the {len(names)} centers in fed.centers")
        participation = _participation(fed, len(names))
        need(_num(fed.get("round_timeout_s")) and fed["round_timeout_s"] > 0, "round_timeout_s",
             "must be a number of seconds > 0")
        need(fed.get("transfer_dtype") in TRANSFER_DTYPES, "transfer_dtype",
             f"must be one of {', '.join(TRANSFER_DTYPES)}")
        factor = fed.get("reject_norm_factor")
        need(factor is None or (_num(factor) and factor > 1), "reject_norm_factor",
             "must be a number > 1, or null to switch the norm check off")
        need(_int(fed.get("eval_bootstraps")) and fed["eval_bootstraps"] >= 1, "eval_bootstraps",
             "must be an integer >= 1")
        for key in ("audit_payloads", "cross_site"):
            need(isinstance(fed.get(key), bool), key, "must be true or false")
        switches = {key: fed.get(key, True) for key in ("evaluate_with_train", "stream_aggregation")}
        for key, value in switches.items():
            need(isinstance(value, bool), key, "must be true or false")
        strategy = dict(fed.get("strategy") or {})
        if strategy.get("name") not in STRATEGIES:
            raise MedfoundError(f"config key 'fed.strategy.name' = {strategy.get('name')!r} is not "
                                "a known strategy", hint=f"choose fed=<one of {', '.join(STRATEGIES)}>")
        simulation = dict(fed.get("simulation") or {})
        for key in ("cpus", "cpus_per_center", "gpus_per_center"):
            value = simulation.get(key)
            if value is not None and not (_num(value) and value >= 0):
                raise MedfoundError(f"config key 'fed.simulation.{key}' = {value!r}: must be a "
                                    "number >= 0 (or null)")

        deployment = dict(fed.get("deployment") or {})
        unknown = sorted(set(deployment) - {"superlink", "root_certificates", "insecure"})
        if unknown:
            raise MedfoundError(f"fed config: unknown key(s) fed.deployment.{unknown}",
                                hint="valid keys are superlink, root_certificates, insecure")
        if fed["mode"] == "deployment":
            parse_host_port(deployment.get("superlink"), "config key 'fed.deployment.superlink'")
            insecure = deployment.get("insecure", False)
            if not isinstance(insecure, bool):
                raise MedfoundError(f"config key 'fed.deployment.insecure' = {insecure!r}: must "
                                    "be true or false")

        privacy = _privacy(fed.get("privacy"))
        _check_participation_privacy(participation, privacy)
        share = fed.get("share_local_models", False)
        need(isinstance(share, bool), "share_local_models", "must be true or false")
        if share and (privacy["dp"] is not None or privacy["secagg"]):
            raise MedfoundError(
                "fed.share_local_models=true would send each center's un-noised update to every "
                "other center, which fed.privacy." + ("dp" if privacy["dp"] else "secagg")
                + " is there to prevent", hint="set fed.share_local_models=false (cross-site "
                "validation then scores the global model only)")
        contribution = fed.get("contribution", False)
        need(isinstance(contribution, bool), "contribution", "must be true or false")
        if contribution and not (share and fed["cross_site"]):
            raise MedfoundError(
                "fed.contribution=true scores, at every center, the model without each center's "
                "updates, which reveals that center's share of the updates to the others",
                hint="set fed.share_local_models=true and fed.cross_site=true if the centers "
                     "agreed to see each other's updates, or fed.contribution=false")
        max_cases = fed.get("max_cases", MAX_CASES)
        need(_int(max_cases) and max_cases >= 1, "max_cases", "must be an integer >= 1")
        declared = _center_ints(fed.get("declared_cases"), names, "declared_cases", minimum=1)
        nodes = _center_ints(fed.get("nodes"), names, "nodes", minimum=1)
        if len(set(nodes.values())) != len(nodes):
            raise MedfoundError("config key 'fed.nodes' gives two centers the same node id",
                                hint="each registered key has its own node id "
                                     "(`medfound fed register` prints them)")
        exchange = fed.get("exchange", "all")
        need(exchange in EXCHANGES, "exchange", f"must be one of {', '.join(EXCHANGES)}")
        finetune = cfg.get("finetune") or {}
        if exchange == "trainable" and not (finetune.get("freeze_encoder") or finetune.get("train_only")):
            raise MedfoundError("config key 'fed.exchange' = 'trainable' needs a frozen backbone",
                                hint="set finetune.init_encoder=ENCODER finetune.freeze_encoder=true "
                                     "(and network.adapter_channels=8 for adapters), or "
                                     "finetune.train_only=[adapter,cls_logits]")
        task = str((cfg.get("task") or {}).get("name", "detect"))
        if task not in TASKS:
            raise MedfoundError(f"config key 'task.name' = {task!r} is not a federated task",
                                hint=f"choose task=<one of {', '.join(TASKS)}>")
        need(task == "detect" or exchange == "all", "exchange",
             "must be 'all' with task=pretrain (the whole encoder trains)")
        if privacy["secagg"] and (task != "detect" or strategy["name"] not in SECAGG_STRATEGIES):
            raise MedfoundError(
                f"fed.privacy.secagg=true needs fed=fedavg or fed=fedprox with task=detect, not "
                f"fed={strategy['name']} task={task}: under SecAgg+ the coordinator learns only "
                "the case-weighted mean of the updates",
                hint="set fed=fedavg (or fedprox), or fed.privacy.secagg=false")

        schedule = (cfg.get("trainer") or {}).get("schedule")
        if schedule == "cosine":
            raise MedfoundError(
                "config key 'trainer.schedule' = 'cosine' cannot be used for federated training: "
                "its length depends on the total number of epochs, which grows every round",
                hint="use trainer.schedule=constant or trainer.schedule=step")
        return cls(mode=fed["mode"], centers=tuple(names), rounds=int(fed["rounds"]),
                   local_epochs=int(fed["local_epochs"]), min_centers=int(fed["min_centers"]),
                   round_timeout_s=float(fed["round_timeout_s"]),
                   transfer_dtype=fed["transfer_dtype"],
                   reject_norm_factor=None if factor is None else float(factor),
                   eval_bootstraps=int(fed["eval_bootstraps"]),
                   audit_payloads=fed["audit_payloads"], cross_site=fed["cross_site"],
                   strategy=strategy,
                   simulation=simulation, deployment=deployment, privacy=privacy,
                   exchange=exchange, task=task, share_local_models=share,
                   contribution=contribution and task == "detect",
                   max_cases=int(max_cases), declared_cases=declared, nodes=nodes,
                   evaluate_every=int(fed["evaluate_every"]), **participation, **switches)


def _participation(fed: Mapping[str, Any], n_centers: int) -> dict[str, Any]:
    """`fed.fraction`, `fed.centers_per_round`, `fed.replies_per_round` (each null or set)."""
    fraction, per_round, replies = (fed.get(k) for k in ("fraction", "centers_per_round",
                                                          "replies_per_round"))
    minimum = fed["min_centers"]
    if fraction is not None and not (_num(fraction) and 0 < fraction <= 1):
        raise MedfoundError(f"config key 'fed.fraction' = {fraction!r}: must be a number in "
                            "(0, 1] (the share of the connected centers drawn each round), or null")
    if fraction is not None and per_round is not None:
        raise MedfoundError("fed.fraction and fed.centers_per_round are both set",
                            hint="choose one: a share of the connected centers each round, or "
                                 "a number of them")
    for key, value in (("centers_per_round", per_round), ("replies_per_round", replies)):
        if value is not None and not (_int(value) and minimum <= value <= n_centers):
            raise MedfoundError(f"config key 'fed.{key}' = {value!r}: must be an integer from "
                                f"fed.min_centers ({minimum}) to the {n_centers} centers, or null")
    if replies is not None and per_round is not None and replies > per_round:
        raise MedfoundError(f"config key 'fed.replies_per_round' = {replies}: more than the "
                            f"{per_round} centers drawn each round (fed.centers_per_round)")
    return {"fraction": None if fraction is None else float(fraction),
            "centers_per_round": per_round, "replies_per_round": replies}


def _check_participation_privacy(participation: Mapping[str, Any],
                                 privacy: Mapping[str, Any]) -> None:
    """Sampling and the k-of-n deadline do not combine with DP (the accounting assumes every
    center in every round) nor with SecAgg+ (its stages need the drawn centers' replies)."""
    drawn = participation["fraction"] is not None or participation["centers_per_round"] is not None
    for on, what in ((privacy["dp"] is not None, "fed.privacy.dp"),
                     (privacy["secagg"], "fed.privacy.secagg")):
        if on and drawn:
            raise MedfoundError(f"{what} does not combine with fed.fraction / "
                                "fed.centers_per_round in medfound (the privacy accounting "
                                "assumes every center takes part in every round)",
                                hint="set fed.fraction=null fed.centers_per_round=null")
    if privacy["secagg"] and participation["replies_per_round"] is not None:
        raise MedfoundError("fed.privacy.secagg does not combine with fed.replies_per_round: "
                            "SecAgg+ rebuilds the masks from the centers it started with",
                            hint="set fed.replies_per_round=null (fed.round_timeout_s still "
                                 "bounds the round)")


# fed.privacy keys and their defaults (configs/federate.yaml explains each).
PRIVACY_DEFAULTS: dict[str, Any] = {
    "dp": None, "clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5,
    "secagg": False, "secagg_max_weight": 1000.0, "secagg_clipping_range": 8.0}
# Strategies whose aggregate is the case-weighted mean of the updates: the one thing SecAgg+
# lets the coordinator compute.
SECAGG_STRATEGIES = ("fedavg", "fedprox")


def _privacy(value: Any) -> dict[str, Any]:
    """`fed.privacy`: dp (null | client | server), clipping_norm, noise_multiplier, delta;
    secagg (true: Flower's SecAgg+), secagg_max_weight, secagg_clipping_range."""
    privacy = {**PRIVACY_DEFAULTS, **dict(value or {})}
    unknown = sorted(set(privacy) - set(PRIVACY_DEFAULTS))
    if unknown:
        raise MedfoundError(f"fed config: unknown key(s) fed.privacy.{unknown}",
                            hint=f"valid keys are {', '.join(PRIVACY_DEFAULTS)}")
    if not (_num(privacy["delta"]) and 0 < privacy["delta"] < 1):
        raise MedfoundError(f"config key 'fed.privacy.delta' = {privacy['delta']!r}: must be in (0, 1) "
                            "(the δ of the reported (ε, δ); well below 1 / number of centers)")
    if privacy["dp"] is not None and privacy["dp"] not in DP_MODES:
        raise MedfoundError(f"config key 'fed.privacy.dp' = {privacy['dp']!r}: must be null "
                            f"(no differential privacy) or one of {', '.join(DP_MODES)}")
    clip, noise = privacy["clipping_norm"], privacy["noise_multiplier"]
    if not (_num(clip) and clip > 0):
        raise MedfoundError(f"config key 'fed.privacy.clipping_norm' = {clip!r}: must be a "
                            "number > 0 (the L2 bound on each center's update)")
    if not (_num(noise) and noise >= 0):
        raise MedfoundError(f"config key 'fed.privacy.noise_multiplier' = {noise!r}: must be a "
                            "number >= 0 (noise std = multiplier × clipping_norm / centers)")
    if not isinstance(privacy["secagg"], bool):
        raise MedfoundError(f"config key 'fed.privacy.secagg' = {privacy['secagg']!r}: must be "
                            "true or false")
    for key in ("secagg_max_weight", "secagg_clipping_range"):
        if not (_num(privacy[key]) and privacy[key] > 0):
            raise MedfoundError(f"config key 'fed.privacy.{key}' = {privacy[key]!r}: must be a "
                                "number > 0")
    if privacy["secagg"] and privacy["dp"] is not None:
        raise MedfoundError("fed.privacy.secagg=true does not combine with fed.privacy.dp in "
                            "medfound (the noise would have to be added by the centers)",
                            hint="choose one: fed.privacy.secagg=true or fed.privacy.dp=...")
    return {"dp": privacy["dp"], "clipping_norm": float(clip), "noise_multiplier": float(noise),
            "delta": float(privacy["delta"]), "secagg": privacy["secagg"],
            "secagg_max_weight": float(privacy["secagg_max_weight"]),
            "secagg_clipping_range": float(privacy["secagg_clipping_range"])}


def all_centers(root: Path) -> list[str]:
    """``fed.centers=all`` (or null): the center folders of `root` (data.root), each one
    holding a datalist.json, in name order."""
    root = Path(root)
    if not root.is_dir():
        raise MedfoundError("fed.centers=all: no such data folder", path=root,
                            hint="point data.root at the folder holding the center folders")
    found = sorted(p.name for p in root.iterdir() if (p / DATALIST).is_file())
    if not found:
        raise MedfoundError("fed.centers=all: no center folder (one holding a datalist.json) "
                            "under data.root", path=root,
                            hint="generate some with `medfound phantoms --out DIR`, or list them: "
                                 "fed.centers=[center_0,center_1]")
    return found


def parse_host_port(address: Any, what: str = "address") -> tuple[str, int]:
    """(host, port) of a "HOST:PORT" string; a one-line MedfoundError naming `what` otherwise."""
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not host or not port.isdigit():
        raise MedfoundError(f"{what} = {address!r}: must be HOST:PORT, e.g. 127.0.0.1:9092")
    return host, int(port)


def _center_ints(value: Any, centers: Any, key: str, minimum: int) -> dict[str, int]:
    """`fed.<key>`: null, or a mapping from centers of fed.centers to integers >= `minimum`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MedfoundError(f"config key 'fed.{key}' = {value!r}: must be a mapping "
                            f"{{center: integer}}, e.g. fed.{key}={{center_0:12}}")
    out = {}
    for center, n in dict(value).items():
        if center not in centers:
            raise MedfoundError(f"config key 'fed.{key}' names {center!r}, which is not in "
                                "fed.centers", hint=f"fed.centers: {', '.join(centers)}")
        if not (_int(n) and n >= minimum):
            raise MedfoundError(f"config key 'fed.{key}.{center}' = {n!r}: must be an integer "
                                f">= {minimum}")
        out[str(center)] = int(n)
    return out


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
