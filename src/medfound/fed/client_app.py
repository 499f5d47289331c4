"""The ClientApp: what runs at each center, on that center's data only.

For a "train" message a center loads the global weights into the detector and trains
``local_epochs`` epochs with the one training loop (`medfound.train.fit`) on its own training
split, then replies with its weights and a few loss numbers (medfound.fed.protocol). When the
message asks ("evaluate-received", fed.evaluate_with_train) it first scores the weights it
brought, the previous round's global model, as an evaluate message would, and the scores
ride in the same reply. For an "evaluate" message it scores the global weights on its own
validation split (LUNA16 CPM); after the last round it scores the other centers' models the
same way (medfound.fed.cross_site).
With ``task=pretrain`` (federated self-supervised pretraining of the foundation encoder) the
same two jobs train and score the encoder's pretrainer on every volume of the modalities the
center holds (medfound.train.pretrain), and the train reply adds ``volumes/<m>`` counts.

Between rounds a center keeps its local training state — optimizer moments, step counter,
every RNG stream — in ``work_dir/rounds/<run_tag>/<round>/checkpoints/last.pt`` and hands it to
`fit` as ``start_state`` with the new global weights swapped in. Round r starts from the state
of the latest round before r, so a coordinator that resumes and re-sends a round gets the very
same update back (CPU, same seed). Augmentation draws are seeded from (seed, center, round).

Each center keeps its own MLflow run per federation (``work_dir/mlruns``, experiment
"medfound-center", run name "<center> <run_tag>"): every local epoch's losses (step = the
center's epoch count) and every round's validation metrics (step = round), reopened each
round. It stays at the center; the coordinator's run gets only what the replies carry.

The coordinator is not trusted with the center's file system: every field of a message is
checked before use (medfound.fed.protocol.read_task: the run tag and round become folder names,
so they come from a strict alphabet and range), every folder the center writes or deletes is
resolved and checked to lie inside ``work_dir`` (`inside`), and only round folders medfound
names itself are ever deleted (`_prune_rounds`). A message that breaks the contract gets an
error reply naming the field, is recorded in the audit log like every reply, and the center
serves the next message as before.

Privacy at the boundary:
- every message passes the audit mod, which appends a line to the center's audit log
  (medfound.fed.audit: a hash chain, signed with the center's node key where it has one) for
  what arrived, and one for the reply before it leaves;
- an exception inside the center is logged locally (``work_dir/center.log`` and stderr) and
  the coordinator only learns its type: messages can quote paths or series UIDs. A version
  refusal is the exception — it quotes version numbers only.

Where a center's data and folders are: in simulation `make_client_app` gets one `Site` per
virtual node (Flower's ``partition-id`` picks it); under a Flower SuperNode the node config
gives them (``center``, ``data-dir``, ``work-dir``, optional ``audit-file`` and ``audit-key``,
the node key that signs the audit log), and the
module-level ``app`` is the ClientApp to point the SuperNode at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from medfound.errors import MedfoundError
from medfound.fed.audit import AuditLog
from medfound.fed.params import from_arrays, payload_bytes, shared_state, to_arrays
from medfound.fed.protocol import (
    ARRAYS,
    CENTER,
    CONFIG,
    CROSS_SITE,
    EVALUATION,
    MAX_ROUND,
    METRICS,
    NUM_EXAMPLES,
    ROUND,
    RUN_TAG,
    InvalidMessage,
    VersionMismatch,
    check_round,
    check_run_tag,
    check_versions,
    read_task,
)
from medfound.fed.secagg import is_secagg, secagg_reply, stage_of

__all__ = ["Site", "app", "evaluate_center", "inside", "make_client_app", "train_center"]


@dataclasses.dataclass(frozen=True)
class Site:
    """One center as its ClientApp sees it. Paths are local to the center's machine."""

    center: str  # the center's name in the federation
    data_dir: Path  # its folder: datalist.json and the studies it lists
    work_dir: Path  # local training state between rounds, cache, center.log
    audit_file: Path  # outbound audit log (JSON lines)
    keep_payloads: bool = False  # also keep each outbound payload beside the audit log
    signing_key: Path | None = None  # the center's node key: signs the audit log (None: unsigned)

    def audit_log(self) -> AuditLog:
        return AuditLog(self.audit_file, self.center, self.keep_payloads, self.signing_key)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Site:
        """A SuperNode's site from ``--node-config "center='c0' data-dir='/data/c0' work-dir='/var/medfound'"``."""
        missing = [k for k in ("center", "data-dir", "work-dir") if not node_config.get(k)]
        if missing:
            raise MedfoundError(f"the SuperNode's node config lacks {', '.join(missing)}",
                                hint="start it with --node-config \"center='NAME' data-dir='DIR' "
                                     "work-dir='DIR'\"")
        work = Path(str(node_config["work-dir"]))
        audit = node_config.get("audit-file") or work / "audit" / f"{node_config['center']}.jsonl"
        key = node_config.get("audit-key")
        return cls(center=str(node_config["center"]), data_dir=Path(str(node_config["data-dir"])),
                   work_dir=work, audit_file=Path(str(audit)),
                   keep_payloads=bool(node_config.get("keep-payloads", False)),
                   signing_key=Path(str(key)) if key else None)


def make_client_app(sites: Sequence[Site] | None = None) -> ClientApp:
    """The ClientApp. `sites`: one per simulated node, by partition id; None: the node config."""
    sites = list(sites) if sites is not None else None

    def site_of(context: Context) -> Site:
        if sites is None:
            return Site.from_node_config(context.node_config)
        return sites[int(context.node_config["partition-id"])]

    # Mods wrap outside-in: the audit log sees the reply exactly as it leaves, after clipping.
    client = _CenterApp(site_of, mods=[_audit_mod(site_of), _secagg_mod(site_of),
                                       _dp_clipping_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        site = site_of(context)
        return _reply_privately(msg, site, lambda: train_center(site, msg))

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = site_of(context)
        return _reply_privately(msg, site, lambda: evaluate_center(site, msg))

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        """Who this center is: its name, so that a coordinator can name a node before its first
        reply (and when it dies mid-round). Nothing else leaves."""
        site = site_of(context)
        return Message(RecordDict({CENTER: ConfigRecord({"name": site.center})}), reply_to=msg)

    return client


class _CenterApp(ClientApp):
    """Flower's ClientApp, but a message of a type the center does not serve gets an error
    reply that the audit log records (Flower's raises before any mod sees the message)."""

    SERVED = (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY)

    def __init__(self, site_of: Callable[[Context], Site], mods: list[Callable]):
        super().__init__(mods=mods)
        self._site_of = site_of

    def __call__(self, message: Message, context: Context) -> Message:
        kind = str(message.metadata.message_type)
        if kind in self.SERVED:
            return super().__call__(message, context)
        site = self._site_of(context)
        reason = (f"center {site.center} refused a message of type {kind[:40]!r}: it serves "
                  f"{', '.join(self.SERVED)}")
        _log_at_center(site, f"refused a message of type {kind!r}")
        log = site.audit_log()
        log.record(round=-1, kind=kind[:40], payload=_content_bytes(message),
                   direction="received")
        log.record(round=-1, kind="error", payload=reason.encode())
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                       reply_to=message)


# --- the two jobs of a center -----------------------------------------------------------------


def train_center(site: Site, msg: Message) -> Message:
    """Train on the site's training split from the global weights in `msg`; the reply."""
    from medfound.train.checkpoint import load_checkpoint
    from medfound.train.loop import TrainerConfig, fit

    task = _received_task(msg)
    round_, run_tag = check_round(task["round"]), check_run_tag(task["run_tag"])
    rounds_dir = _rounds_dir(site, run_tag)
    # fed.evaluate_with_train: the received weights are the previous round's global model;
    # score them before training changes anything (one exchange a round instead of two).
    scores, evaluate_s = None, {}
    if task.get("evaluate_received", False):
        started = time.perf_counter()
        scores = _evaluation(site, {**task, "round": round_ - 1}, msg.content)[METRICS]
        evaluate_s = {"evaluate/seconds": time.perf_counter() - started}
    seed = center_seed(task["seed"], site.center)
    job = (_pretrain_job if task_name(task) == "pretrain" else _detect_job)(site, task, seed)
    network, model = job["network"], job["model"]
    global_state = from_arrays(msg.content[ARRAYS])

    previous = _latest_round_state(rounds_dir, before=round_)
    _check_complete(network, global_state, previous, site)
    start_state, epochs_done = None, 0
    if previous is not None:
        start_state = load_checkpoint(previous)
        model.load_state_dict(start_state["model"])
        epochs_done = int(start_state["epoch"])
    _load_global(network, global_state)
    if start_state is not None:
        start_state["model"] = model.state_dict()

    trainer = TrainerConfig.from_dict({**task["trainer"], "seed": seed,
                                       "epochs": epochs_done + int(task["local_epochs"])})
    step = job["step"]
    if task["proximal_mu"] > 0:
        step = _proximal(step, network, global_state, task["proximal_mu"])
    started = time.perf_counter()
    with _center_run(site, task) as tracker:
        out = inside(site.work_dir, rounds_dir / _round_name(round_))
        result = fit(model, job["loader"], step, trainer, out, start_state=start_state,
                     tracker=tracker)
        tracker.log_metrics({"round": float(round_), **job["logged"]},
                            step=epochs_done + int(task["local_epochs"]))
    _prune_rounds(site.work_dir / "rounds", run_tag, keep_from=round_ - 1)

    last = result.history[-1]
    metrics = MetricRecord({NUM_EXAMPLES: job["num_examples"], **job["shared"],
                            **{k: float(v) for k, v in last.items() if k.startswith("train/")},
                            "train/seconds": time.perf_counter() - started, **evaluate_s})
    state = network.state_dict()
    if task.get("exchange") == "trainable":  # only what this center trained leaves it
        state = {k: state[k] for k, p in network.named_parameters() if p.requires_grad}
    content = RecordDict({ARRAYS: to_arrays(state, task["transfer_dtype"]), METRICS: metrics,
                          CENTER: ConfigRecord({"name": site.center})})
    if scores is not None:
        content[EVALUATION] = scores
    return Message(content, reply_to=msg)


def _check_complete(network: torch.nn.Module, global_state: Mapping[str, torch.Tensor],
                    base: Path | None, site: Site) -> None:
    """A message that carries only part of the model (fed.exchange=trainable, after round 1)
    needs the rest from this center's own earlier round."""
    if base is None and _lacks(network, global_state):
        raise MedfoundError("the coordinator sent only the trainable weights and this center has "
                            "no earlier round to take the frozen backbone from",
                            path=site.work_dir,
                            hint="a center joins a fed.exchange=trainable federation in round 1")


def _lacks(network: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether `weights` leave some of the network's exchanged (floating-point) entries out."""
    return bool(set(shared_state(network.state_dict())) - set(weights))


# A job: "network" (whose weights are exchanged), "model" (what `fit` trains: the network or
# its detector), "loader", "step", "num_examples" (the aggregation weight), "shared" (extra
# metrics the reply carries) and "logged" (extra metrics for the center's own MLflow run only).


def _detect_job(site: Site, task: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Nodule detection: the network inside its detector, the site's training cases."""
    from medfound.data.detection import detection_collate, load_datalist
    from medfound.train import detection as task_lib
    from medfound.train.loop import distributed_loader

    network, detector = task_lib.build(task["network"], seed=task["seed"])
    task_lib.apply_finetune(network, {"freeze_encoder": task.get("freeze_encoder"),
                                      "train_only": task.get("train_only")}, load=False)
    items = load_datalist(site.data_dir.parent, [site.data_dir.name], "training")
    dataset = _training_dataset(site, items, {**task["network"], **task["data"]},
                                task["data"].get("cache", "memory"))
    # fit seeds MONAI's random transforms from (center seed, epoch): a re-sent round repeats.
    loader = distributed_loader(dataset, batch_size=int(task["data"]["batch_size"]), shuffle=True,
                                seed=seed, num_workers=int(task["data"].get("num_workers", 0)),
                                collate_fn=detection_collate)
    return {"network": network, "model": detector, "loader": loader, "step": task_lib.train_step,
            "num_examples": len(items), "shared": {}, "logged": {"train/cases": float(len(items))}}


def _pretrain_job(site: Site, task: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Self-supervised pretraining: every volume of the modalities this site holds. The
    reply's ``volumes/<m>`` counts weight each modality's stem in the per-group aggregation."""
    from functools import partial

    from medfound.data.pretrain import (
        load_volume_list,
        modality_counts,
        pretrain_collate,
        pretrain_train_transforms,
    )
    from medfound.train import pretrain as task_lib
    from medfound.train.loop import distributed_loader

    t = task["task"]
    model = task_lib.build(t["encoder"], seed=task["seed"])
    items = load_volume_list(site.data_dir.parent, [site.data_dir.name], "training",
                             t["encoder"]["modalities"])
    if not items:
        raise MedfoundError(f"no {'/'.join(t['encoder']['modalities'])} volumes in the training "
                            "split", path=site.data_dir)
    dataset = _training_dataset(site, items, t, task["data"].get("cache", "memory"),
                                transforms=pretrain_train_transforms)
    loader = distributed_loader(dataset, batch_size=int(t["batch_size"]), shuffle=True, seed=seed,
                                num_workers=int(task["data"].get("num_workers", 0)),
                                collate_fn=pretrain_collate)
    counts = {f"volumes/{m}": float(n) for m, n in modality_counts(items).items()}
    return {"network": model, "model": model, "loader": loader,
            "step": partial(task_lib.train_step, params=task_lib.loss_params(t["loss"])),
            "num_examples": len(items), "shared": counts, "logged": counts}


def task_name(task: Mapping[str, Any]) -> str:
    """"detect" or "pretrain" (messages of older coordinators carry no task group: detect)."""
    return str((task.get("task") or {}).get("name", "detect"))


def evaluate_center(site: Site, msg: Message) -> Message:
    """LUNA16 metrics of the global weights in `msg` on the site's validation split; for a
    cross-site evaluation, of each model the message carries. Every model's metrics are also
    logged to the center's own MLflow run (``val/`` or ``cross_site/<model>/``, step = round)."""
    task = _received_task(msg)
    return Message(RecordDict({**_evaluation(site, task, msg.content),
                               CENTER: ConfigRecord({"name": site.center})}), reply_to=msg)


def _evaluation(site: Site, task: Mapping[str, Any], content: RecordDict) -> dict[str, Any]:
    """The MetricRecords an evaluate reply carries (by key) for the weights in `content`;
    `task["round"]` is the round whose global model they are (the step of the center's log)."""
    if task_name(task) == "pretrain":
        return _evaluate_pretrain(site, task, content)
    models = task.get("cross_site_models")
    if models is None:
        weights = {"val": (METRICS, content[ARRAYS])}
    else:
        weights = {f"cross_site/{name}": (f"{METRICS}:{name}", content[f"{ARRAYS}:{name}"])
                   for name in models}
    items = _validation_items(site)
    base = _latest_round_state(_rounds_dir(site, check_run_tag(task["run_tag"])),
                               before=int(task["round"]) + 1)
    records, logged = {}, {}
    for prefix, (key, arrays) in weights.items():
        metrics, ci = _evaluate_weights(task, arrays, items, site, base)
        records[key] = MetricRecord(metrics)
        if ci is not None:
            logged.update({f"{prefix}/{k}": float(v) for k, v in metrics.items()}
                          | {f"{prefix}/cpm_ci95_lo": ci[0], f"{prefix}/cpm_ci95_hi": ci[1]})
    if logged:
        with _center_run(site, task) as tracker:
            tracker.log_metrics(logged, step=int(task["round"]))
    return records


def _evaluate_pretrain(site: Site, task: Mapping[str, Any], content: RecordDict
                       ) -> dict[str, Any]:
    """Validation losses (masked reconstruction, InfoNCE) of the global encoder on the site's
    validation volumes; a site without a validation split reports only its count (0)."""
    from medfound.data.pretrain import load_volume_list, pretrain_collate, pretrain_eval_transforms
    from medfound.train import pretrain as task_lib

    t = task["task"]
    items = load_volume_list(site.data_dir.parent, [site.data_dir.name], "validation",
                             t["encoder"]["modalities"])
    metrics: dict[str, float] = {NUM_EXAMPLES: len(items)}
    if items:
        model = task_lib.build(t["encoder"], seed=task["seed"])
        _load_global(model, from_arrays(content[ARRAYS]))
        model.to(_device(task["trainer"]))
        transform = _cached(pretrain_eval_transforms(t), json.dumps(t, sort_keys=True))
        prepared, size = [transform(dict(it)) for it in items], int(t["batch_size"])
        batches = [pretrain_collate(prepared[i:i + size]) for i in range(0, len(prepared), size)]
        metrics.update(task_lib.evaluate(model, batches, task_lib.loss_params(t["loss"]),
                                         seed=task["seed"]))
        with _center_run(site, task) as tracker:
            tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()},
                                step=int(task["round"]))
    return {METRICS: MetricRecord(metrics)}


def _evaluate_weights(task: Mapping[str, Any], arrays: Any, items: list[dict[str, Any]],
                      site: Site, base: Path | None = None
                      ) -> tuple[dict[str, float], tuple[float, float] | None]:
    """The metrics of one set of weights on the validation `items`, and the CPM's 95% CI
    (None when the items hold no nodule: CPM is a sensitivity, undefined without one).
    Weights the message lacks (fed.exchange=trainable) come from the round state `base`."""
    from medfound.data.detection import eval_transforms
    from medfound.train import detection as task_lib

    n_nodules = sum(len(it["label"]) for it in items)
    metrics: dict[str, float] = {NUM_EXAMPLES: len(items), "n_nodules": n_nodules}
    if n_nodules == 0:
        return metrics, None
    network, detector = task_lib.build(task["network"], seed=task["seed"])
    weights = from_arrays(arrays)
    _check_complete(network, weights, base, site)
    if base is not None and _lacks(network, weights):
        from medfound.train.checkpoint import load_checkpoint

        detector.load_state_dict(load_checkpoint(base)["model"])
    _load_global(network, weights)
    detector.to(_device(task["trainer"]))
    transform = _cached(eval_transforms({**task["network"], **task["data"]}),
                        json.dumps({**task["network"], **task["data"]}, sort_keys=True))
    luna, _ = task_lib.evaluate(detector, items, transform,
                                n_bootstraps=int(task["eval_bootstraps"]), seed=task["seed"])
    metrics["cpm"] = float(luna["cpm"])
    metrics.update({f"froc/{rate}": float(s) for rate, s in luna["froc"].items()})
    if task.get("score_loss"):  # fed.contribution: a score that moves before the CPM does
        metrics.update(task_lib.validation_scores(detector, items, transform))
    return metrics, (float(luna["cpm_ci95"][0]), float(luna["cpm_ci95"][1]))


def _center_run(site: Site, task: Mapping[str, Any]) -> Any:
    """The center's own MLflow run for this federation (created on first use, then reopened)."""
    from medfound.train.tracking import Tracker

    run_tag = check_run_tag(task["run_tag"])
    return Tracker({"uri": str(site.work_dir / "mlruns"), "experiment": "medfound-center",
                    "run_name": f"{site.center} {run_tag}"},
                   out_dir=inside(site.work_dir, site.work_dir / "mlflow" / run_tag), resume=True,
                   config={"center": site.center, "run_tag": run_tag,
                           **{k: task.get(k) for k in ("task", "network", "trainer", "data",
                                                       "seed", "local_epochs", "transfer_dtype")}})


def center_seed(seed: int, center: str) -> int:
    """A center's own seed: the run's seed offset by a stable hash of the center's name."""
    return int(seed) + zlib.crc32(center.encode()) % 100_000


# --- helpers ----------------------------------------------------------------------------------


def _received_task(msg: Message) -> dict[str, Any]:
    config = msg.content[CONFIG]
    try:
        theirs = json.loads(str(config["versions"]))
    except (KeyError, ValueError):
        theirs = {}
    if not isinstance(theirs, dict):
        theirs = {}
    check_versions(theirs)
    return read_task(config)


def _load_global(network: torch.nn.Module, global_state: Mapping[str, torch.Tensor]) -> None:
    """Put the global (floating-point) weights into `network`; its own counters stay."""
    from medfound.train.checkpoint import load_model_state

    load_model_state(network, {**network.state_dict(), **global_state}, "the coordinator's weights")


def _proximal(step: Callable, network: torch.nn.Module, global_state: Mapping[str, torch.Tensor],
              mu: float) -> Callable:
    """FedProx: `step`'s loss plus μ/2·‖w − w_global‖² over the network's parameters."""
    pairs = [(p, global_state[name].detach().clone()) for name, p in network.named_parameters()
             if name in global_state]

    def step_with_proximal_term(model: Any, batch: Any) -> dict[str, torch.Tensor]:
        losses = dict(step(model, batch))
        term = sum(((p - g.to(p.device)) ** 2).sum() for p, g in pairs)
        losses["loss"] = losses["loss"] + 0.5 * mu * term
        losses["proximal"] = term.detach()
        return losses

    return step_with_proximal_term


# One training dataset per (center, preprocessing) and process: a simulation actor serves
# several rounds (and centers), and the deterministic head of the pipeline is cached inside.
_DATASETS: dict[str, Any] = {}


def _training_dataset(site: Site, items: list[dict[str, Any]], prep: dict[str, Any],
                      cache: str, transforms: Callable | None = None) -> Any:
    from medfound.data.detection import make_dataset, train_transforms

    transforms = transforms or train_transforms
    key = json.dumps([str(site.data_dir), [it["image"] for it in items], prep, cache,
                      transforms.__name__], sort_keys=True, default=str)
    if key not in _DATASETS:
        _DATASETS[key] = make_dataset(items, transforms(prep), cache=cache,
                                      cache_dir=site.work_dir / "cache")
    return _DATASETS[key]


_PREPARED: dict[tuple[str, str], Any] = {}


def _cached(transform: Callable, key: str) -> Callable:
    """`transform` (deterministic) remembering its output per study for this process: a
    center evaluates the same validation studies every round."""

    def prepared(item: dict[str, Any]) -> Any:
        k = (key, str(item["image"]))
        if k not in _PREPARED:
            _PREPARED[k] = transform(item)
        return _PREPARED[k]

    return prepared


def _validation_items(site: Site) -> list[dict[str, Any]]:
    from medfound.data.detection import DATALIST, load_datalist

    try:
        listed = json.loads((site.data_dir / DATALIST).read_text()).get("validation") or []
    except (OSError, ValueError, AttributeError):
        listed = ["?"]  # let load_datalist name what is wrong
    if not listed:
        return []  # a center without a validation split shares only its case count (0)
    return load_datalist(site.data_dir.parent, [site.data_dir.name], "validation")


def inside(root: Path, path: Path) -> Path:
    """`path`, if it resolves (symbolic links followed) to `root` or below it; otherwise a
    `MedfoundError`: nothing a message makes a center write or delete may lie elsewhere."""
    base, target = Path(root).resolve(), Path(path).resolve()
    if target != base and base not in target.parents:
        raise MedfoundError("refused a folder outside the center's work folder", path=root,
                            hint="the work folder's rounds/ and mlflow/ must not be links "
                                 "out of it")
    return target


def _rounds_dir(site: Site, run_tag: str) -> Path:
    """WORK/rounds/<run_tag>, the run's round states, checked to lie inside the work folder."""
    return inside(site.work_dir, site.work_dir / "rounds" / check_run_tag(run_tag))


def _round_name(round_: int) -> str:
    return f"{round_:04d}"


def _round_of(folder: Path) -> int | None:
    """The round a round-state folder holds, or None for anything medfound did not name so
    (and for links: a round folder is always a real folder)."""
    name = folder.name
    if not (name.isascii() and name.isdigit() and 4 <= len(name) <= 6) or folder.is_symlink():
        return None
    n = int(name)
    return n if n <= MAX_ROUND and name == _round_name(n) and folder.is_dir() else None


def _latest_round_state(rounds_dir: Path, before: int) -> Path | None:
    done = [n for p in rounds_dir.glob("*") if (n := _round_of(p)) is not None and n < before
            and (p / "checkpoints" / "last.pt").is_file()]
    return rounds_dir / _round_name(max(done)) / "checkpoints" / "last.pt" if done else None


def _prune_rounds(root: Path, run_tag: str, keep_from: int) -> None:
    """Drop other runs' state and this run's rounds before `keep_from` (a resumed coordinator
    may re-send round keep_from + 1, which starts from round keep_from's state).

    Only what medfound itself names is deleted: round folders (``0001``...) in run folders
    named like run tags, under `root`, never through a link; a run folder goes once empty."""
    base = root.resolve()
    if not root.is_dir() or root.is_symlink():
        return
    for run in root.iterdir():
        if run.is_symlink() or not run.is_dir() or not RUN_TAG.fullmatch(run.name):
            continue
        for folder in run.iterdir():
            n = _round_of(folder)
            if n is None or (run.name == run_tag and n >= keep_from):
                continue
            if folder.resolve().parent.parent == base:
                shutil.rmtree(folder, ignore_errors=True)
        if run.name != run_tag:
            with contextlib.suppress(OSError):
                run.rmdir()  # only if empty: anything else in it is not medfound's


def _device(trainer: Mapping[str, Any]) -> torch.device:
    wanted = str(trainer.get("device", "auto"))
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def _reply_privately(msg: Message, site: Site, job: Callable[[], Message]) -> Message:
    """Run `job`; on an exception log it at the center and reply with its type only."""
    try:
        return job()
    except Exception as err:  # any failure: the details stay at the center
        kind = msg.metadata.message_type
        _log_at_center(site, f"{kind} failed:\n" + "".join(traceback.format_exception(err)))
        print(f"center {site.center}: {kind} failed: {err}", file=sys.stderr, flush=True)
        if isinstance(err, (VersionMismatch, InvalidMessage)):
            reason = f"center {site.center} refused the {kind[:20]} message: {err}"
        else:
            reason = (f"{kind} failed at center {site.center}: {type(err).__name__} "
                      "(details stay in the center's log)")
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                       reply_to=msg)


def _log_at_center(site: Site, text: str) -> None:
    """Append `text` to the center's own log (``work_dir/center.log``), which never leaves."""
    site.work_dir.mkdir(parents=True, exist_ok=True)
    with open(site.work_dir / "center.log", "a") as log:
        log.write(f"{datetime.now(timezone.utc).isoformat()} {text}\n")


def _dp_clipping_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Flower's `fixedclipping_mod` when the coordinator asks for client-side DP clipping
    (its train config then carries the clipping norm); otherwise the reply passes unchanged."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = msg.content.config_records.get(CONFIG) if msg.has_content() else None
    if msg.metadata.message_type == "train" and config is not None and KEY_CLIPPING_NORM in config:
        norm = config[KEY_CLIPPING_NORM]
        if not (isinstance(norm, (int, float)) and not isinstance(norm, bool)
                and math.isfinite(norm) and norm > 0):
            raise InvalidMessage(f"the coordinator's message has an invalid {KEY_CLIPPING_NORM}: "
                                 "must be a finite number > 0")
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _secagg_mod(site_of: Callable[[Context], Site]) -> Callable:
    """A Flower mod for fed.privacy.secagg: the SecAgg+ steps (medfound.fed.secagg) mask the
    update before it leaves; a failure replies with its type only, as training does."""

    def secagg(msg: Message, context: Context, call_next: Callable) -> Message:
        if not is_secagg(msg):
            return call_next(msg, context)
        site = site_of(context)
        return _reply_privately(msg, site,
                                lambda: secagg_reply(msg, context, call_next, site.center))

    return secagg


def _audit_mod(site_of: Callable[[Context], Site]) -> Callable:
    """A Flower mod that records every message in the center's audit log as it arrives, and
    its reply before it leaves."""

    def audit(msg: Message, context: Context, call_next: Callable) -> Message:
        step = f"secagg-{stage_of(msg)}" if is_secagg(msg) else None  # before the mod pops it
        site = site_of(context)
        log = site.audit_log()
        config = msg.content.config_records.get(CONFIG) if msg.has_content() else None
        group = msg.metadata.group_id  # SecAgg+ steps carry the round only there
        round_ = _audit_round(config.get(ROUND, 0) if config is not None
                              else int(group) if group.isascii() and group.isdigit()
                              and len(group) <= 6 else 0)
        received_kind = step or ("cross-site" if config is not None and CROSS_SITE in config
                                 else msg.metadata.message_type)
        # What arrived, hashed as the coordinator hashed what it sent (before any mod changes it).
        log.record(round=round_, kind=received_kind, payload=_content_bytes(msg),
                   direction="received")
        # What the inner mods raise (a refused clipping norm, a SecAgg+ step) is answered and
        # recorded like a failure of the job itself.
        reply = _reply_privately(msg, site, lambda: call_next(msg, context))
        if reply.has_error():
            payload, kind, names = str(reply.error.reason).encode(), "error", []
        else:
            payload, kind = payload_bytes(reply.content), received_kind
            names = [n for rec in reply.content.metric_records.values() for n in rec]
        log.record(round=round_, kind=kind, payload=payload, metric_names=names)
        return reply

    return audit


def _content_bytes(msg: Message) -> bytes:
    """A received message's content as the coordinator's receipt hashes it (b"" for none)."""
    return payload_bytes(msg.content) if msg.has_content() else b""


def _audit_round(value: Any) -> int:
    """The round an audit record names: the message's round, or -1 when it is not a valid one
    (a refused message is recorded too)."""
    try:
        return check_round(value)
    except InvalidMessage:
        return -1


# The ClientApp a Flower SuperNode loads (its node config names the center and folders).
app = make_client_app()
