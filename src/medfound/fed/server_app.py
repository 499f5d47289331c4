"""The ServerApp: the coordinator's loop over rounds, and everything it leaves in FED/.

Every reply a center sends passes `medfound.fed.screening.ReplyGate` before any of it is
read: its name must be the one bound to its node (``fed.nodes``, or the first name the node
gave), its records, arrays, metric names and values, and case count what the message type
allows; a refused reply is printed, recorded with its reason (the round's ``rejected``, and
``rejected_replies`` in FED/metrics.json) and left out, and the round goes on with the others.
The aggregation weights are the coordinator's record of each center's case count.

Each round, in order:

1. train — `medfound.fed.participation.draw_round` picks the round's centers among the
   connected ones (all of them, or a seeded draw: ``fed.fraction``, ``fed.centers_per_round``;
   at least ``fed.min_centers``), the strategy sends them the global weights and the round
   waits for their replies (all, ``fed.replies_per_round`` of them, or until
   ``fed.round_timeout_s``); replies are screened (medfound.fed.screening: bad
   updates are rejected and logged) and the accepted ones aggregated by the Flower strategy,
   weighted by each center's training case count where the strategy weights at all. With
   fewer than ``fed.min_centers`` accepted updates the round keeps the previous weights;
2. evaluate — every center scores the new global weights on its validation split; the global
   metric is the case-weighted mean over the centers that could compute it. With
   ``fed.evaluate_with_train`` (the default) this rides in the next round's train message:
   each center scores the weights it receives before it trains, so a round is one exchange,
   not two (Flower's per-message cost, a few seconds, is paid once). Round r's evaluate
   record then stays ``pending`` until round r + 1's replies fill it; the last round's model
   gets an evaluate message of its own. SecAgg+ runs keep the separate exchange;
3. checkpoint — ``FED/server/state.pt`` (global weights, strategy state, round, history) is
   written atomically, then ``FED/metrics.json``, then the round's numbers go to MLflow.

After the last round (``fed.cross_site``), cross-site validation: the global model is scored at
every center, and with ``fed.share_local_models`` (off by default; refused with differential
privacy or secure aggregation) each center's last local update too (medfound.fed.cross_site →
``FED/cross_site.csv``, ``FED/cross_site.png``, ``metrics.json["cross_site"]``). No center is
sent another center's individual update otherwise; ``metrics.json["privacy"]["flows"]`` states
what left each center and what each one was sent.

``resume=true`` continues after the last round in ``FED/server/state.pt``: with the same seed
on CPU the result equals an uninterrupted run's (the centers replay from their own per-round
state, see medfound.fed.client_app). At the end the global weights become the model package
``FED/model/`` (medfound.train.package), which evaluate_detector and export accept.

``task=pretrain`` (federated pretraining of the foundation encoder): the same rounds with the
encoder's pretrainer, aggregated per parameter group (medfound.fed.strategies); evaluation is
the validation reconstruction and contrastive losses; no cross-site matrix; the encoder package
goes to ``FED/encoder/``.

FED/metrics.json: ``rounds`` (one record per round: started_at (epoch seconds), duration_s,
train_s (the training phase: weights out, updates back, screening, aggregation),
participation {connected, available, sampled, late}, train {centers, accepted,
rejected, failed, update_norms, aggregate, timing {exchange_s, screen_s, aggregate_s}}, evaluate {global, centers, failed, pending,
in_round (the round whose messages carried the scores)}, bytes
{center: {sent, received}} as the center sees it), ``global`` (per-round global metrics),
``bytes_per_center`` (totals, cross-site validation included), ``round_durations_s``,
``rejected_replies`` (every refused reply: round, exchange, node, the center bound to the node,
the name it claimed, why) and ``privacy`` (`privacy_report`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from medfound.errors import MedfoundError
from medfound.fed.audit import ReceiptLog
from medfound.fed.contribution import LeaveOneOut, contribution_report, write_contribution
from medfound.fed.params import decode_arrays, encode_arrays, payload_bytes, shared_state
from medfound.fed.participation import draw_round
from medfound.fed.protocol import (
    ARRAYS,
    EVALUATE_RECEIVED,
    EVALUATION,
    METRICS,
    NUM_EXAMPLES,
    SCORE_LOSS,
    center_of,
    task_spec,
    versions,
)
from medfound.fed.screening import ReplyGate, reason_text, screen_updates
from medfound.fed.settings import FedSettings
from medfound.fed.spool import UpdateSpool, aggregate_spooled, streams
from medfound.fed.strategies import (
    build_strategy,
    dp_epsilons,
    dp_noise_stdev,
    restore_strategy_state,
    running_statistics,
    strategy_state,
    with_privacy,
)

__all__ = ["STATE_FILE", "make_server_app", "run_coordinator"]

STATE_FILE = Path("server") / "state.pt"
SPOOL_DIR = Path("server") / "spool"  # a round's updates while it aggregates (fed.stream_aggregation)
METRICS_FILE = "metrics.json"
RECEIPTS_FILE = "receipts.jsonl"  # one chained receipt per message sent or received
_FORMAT = "medfound-fed-server/1"


def make_server_app(cfg: Mapping[str, Any], config_yaml: str = "") -> ServerApp:
    """A ServerApp running `run_coordinator` for the resolved recipe config `cfg`."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_coordinator(grid, cfg, config_yaml)

    return server


def run_coordinator(grid: Grid, cfg: Mapping[str, Any], config_yaml: str = "") -> Path:
    """Run the federation's rounds over `grid`; returns the model package's path."""
    from medfound.train import detection as task
    from medfound.train.checkpoint import load_checkpoint, save_checkpoint
    from medfound.train.tracking import Tracker

    settings = FedSettings.from_config(cfg)
    out = Path(cfg["out_dir"])
    pretrain = settings.task == "pretrain"
    if pretrain:
        from medfound.train import pretrain as pretrain_task

        network = pretrain_task.build(cfg["task"]["encoder"], seed=cfg["seed"])
    else:
        network, _ = task.build(cfg["network"], seed=cfg["seed"])
        said = task.apply_finetune(network, cfg.get("finetune"))
        if said:
            print(said + " (at every center)", flush=True)
    strategy = with_privacy(build_strategy(settings.strategy, settings.min_centers,
                                           group_by_modality=pretrain,
                                           statistics=running_statistics(network)),
                            settings.privacy, len(settings.centers))
    if settings.privacy["secagg"]:
        print("secure aggregation (Flower's SecAgg+): the coordinator sees only the case-weighted "
              "mean of the centers' updates; each center checks its own update, and the "
              "cross-site matrix scores the global model only", flush=True)
    if settings.privacy["dp"] is not None:
        p = settings.privacy
        print(f"differential privacy: {p['dp']}-side clipping of each update to L2 norm "
              f"{p['clipping_norm']:g}, Gaussian noise of std "
              f"{dp_noise_stdev(p, len(settings.centers)):.4g} on each aggregate", flush=True)
    # fed.exchange=trainable: after round 1 only these weights travel (both ways).
    exchanged = ([name for name, p in network.named_parameters() if p.requires_grad]
                 if settings.exchange == "trainable" else None)
    global_arrays = {k: v.numpy().astype(np.float32)
                     for k, v in shared_state(network.state_dict()).items()}
    model_bytes = int(sum(a.nbytes for a in global_arrays.values()))

    # --- set-up: a fresh run, or the state of the last completed round ---
    history: list[dict[str, Any]] = []
    run_tag, first_round = uuid.uuid4().hex[:12], 1
    if cfg.get("resume"):
        state = load_checkpoint(out / STATE_FILE)
        _check_resumable(state, settings, out / STATE_FILE)
        global_arrays = {k: v.numpy() for k, v in state["model"].items()}
        restore_strategy_state(strategy, state["strategy"])
        history, run_tag = list(state["history"]), state["run_tag"]
        resumed_refusals = list(state.get("rejected_replies") or [])
        first_round = int(state["round"]) + 1
        print(f"resuming after round {state['round']} from {out / STATE_FILE}", flush=True)
    task_json = task_spec(cfg, local_epochs=settings.local_epochs,
                          transfer_dtype=settings.transfer_dtype,
                          eval_bootstraps=settings.eval_bootstraps, run_tag=run_tag,
                          exchange=settings.exchange)
    versions_json = json.dumps(versions())

    def instruction(evaluate_received: bool = False) -> ConfigRecord:
        """A fresh one each time: strategies write the round in."""
        config = ConfigRecord({"task": task_json, "versions": versions_json})
        if evaluate_received:
            config[EVALUATE_RECEIVED] = True
        return config

    # fed.evaluate_with_train: round r's train message also asks each center to score the
    # weights it receives (round r - 1's model); SecAgg+ keeps the evaluate exchange.
    evaluate_with_train = settings.evaluate_with_train and not settings.privacy["secagg"]

    # Every reply passes the gate first (medfound.fed.screening.ReplyGate): node id → center
    # name (gate.known), each center's recorded case count, every refused reply.
    gate = ReplyGate(settings.centers, max_cases=settings.max_cases,
                     declared_cases=settings.declared_cases, nodes=settings.nodes,
                     connected=grid.get_node_ids)
    if cfg.get("resume"):
        gate.restore(state.get("gate") or {})
        gate.refused.extend(resumed_refusals)
        gate.take_refused()
    known = gate.known
    receipts = ReceiptLog(out / RECEIPTS_FILE)
    # fed.contribution: each center's share of the last round's aggregate (fed.contribution)
    loo = LeaveOneOut() if settings.contribution else None
    if loo is not None and cfg.get("resume"):
        loo.restore(state.get("contribution"))
    local_models: dict[str, dict[str, np.ndarray]] = {}  # the last round's accepted updates
    cross_site: dict[str, Any] | None = None

    with Tracker(cfg["tracking"], out_dir=out, config=cfg, resume=bool(cfg.get("resume"))) as tracker:
        # --- the loop ---
        for rnd in range(first_round, settings.rounds + 1):
            started = time.time()
            traffic = _Traffic(receipts)
            cross_site_now = settings.cross_site and not pretrain and rnd == settings.rounds
            keep = local_models if cross_site_now and settings.share_local_models else None
            sent = _exchanged(global_arrays, exchanged, whole=rnd == 1)
            scored = (history[-1] if history and history[-1]["evaluate"].get("pending")
                      and not settings.privacy["secagg"] else None)
            _name_nodes(grid, settings, gate, traffic, rnd)
            drawn = draw_round(grid, known, rnd, settings, seed=int(cfg["seed"]))
            train, new = _train_round(drawn, strategy, rnd, sent, instruction, settings, gate,
                                      traffic, seed=int(cfg["seed"]), keep=keep,
                                      evaluate_received=scored is not None,
                                      spool_dir=out / SPOOL_DIR, loo=loo)
            if scored is not None:  # the previous round's model, scored by this round's centers
                scored["evaluate"] = train.pop("evaluated")
                tracker.log_metrics(_flat_evaluate(scored["evaluate"]), step=scored["round"])
            global_arrays = {**global_arrays, **new}
            train_s = time.time() - started
            if rnd % settings.evaluate_every and rnd < settings.rounds:
                evaluate = {"global": {}, "centers": {}, "failed": [], "skipped": True}
            elif evaluate_with_train and rnd < settings.rounds:
                evaluate = {"global": {}, "centers": {}, "failed": [], "pending": True}
            else:
                evaluate = _evaluate_round(grid if rnd == settings.rounds else drawn, strategy,
                                           rnd, _exchanged(global_arrays, exchanged, whole=rnd == 1),
                                           instruction, settings, gate, traffic)
            record = {"round": rnd, "started_at": round(started, 3),
                      "duration_s": round(time.time() - started, 3), "train_s": round(train_s, 3),
                      "participation": drawn.record(),
                      "aggregated": train.pop("aggregated"), "train": train,
                      "evaluate": evaluate, "bytes": traffic.by_center(known)}
            history.append(record)

            # checkpoint (atomic), then metrics.json, then MLflow
            save_checkpoint({"format": _FORMAT, "round": rnd, "run_tag": run_tag,
                             "strategy_name": settings.strategy_name, "task": settings.task,
                             "transfer_dtype": settings.transfer_dtype,
                             "model": {k: torch.from_numpy(v) for k, v in global_arrays.items()},
                             "strategy": strategy_state(strategy), "history": history,
                             "gate": gate.state(), "rejected_replies": gate.refused,
                             "contribution": None if loo is None else _tensors(loo.state())},
                            out / STATE_FILE)
            write_metrics(out / METRICS_FILE, history, settings, model_bytes,
                          rejected=gate.refused)
            tracker.log_metrics(_flat_round(record), step=rnd)
            print(_round_summary(record, settings.rounds, scored), flush=True)

        if not history:
            raise MedfoundError("the federation completed no round", path=out,
                                hint="set fed.rounds >= 1")
        # --- cross-site validation: the global and each center's last local model, everywhere ---
        if settings.cross_site and not pretrain:
            cross_site = _cross_site(grid, out, _exchanged(global_arrays, exchanged, whole=False),
                                     local_models, instruction,
                                     settings, gate, history[-1]["round"], tracker, receipts,
                                     loo)

        # --- package the global model ---
        for name, value in shared_state(network.state_dict()).items():
            value.copy_(torch.from_numpy(global_arrays[name]))
        package = (_package_encoder if pretrain else _package)(
            out, network, cfg, config_yaml, settings, history, tracker.run_id)
        write_metrics(out / METRICS_FILE, history, settings, model_bytes, cross_site,
                      rejected=gate.refused)
        tracker.log_artifact(out / METRICS_FILE)
        for path in write_contribution(out, contribution_report(
                history, settings.centers, gate.cases, gate.refused,
                byte_totals(history, cross_site), cross_site, measured=loo is not None,
                strategy=settings.strategy_name)):
            tracker.log_artifact(path)
        tracker.log_artifacts(package, package.name)
    eps = privacy_report(history, settings, cross_site).get("epsilon")
    if eps:
        print(f"differential privacy after {len(history)} rounds, δ = {settings.privacy['delta']:g}: "
              + ", ".join(f"{c} ε = {e:.3g}" for c, e in eps.items()), flush=True)
    if settings.privacy["dp"] is not None or settings.privacy["secagg"]:
        for flow in privacy_report(history, settings, cross_site)["flows"].values():
            print(f"what left: {flow['summary']}", flush=True)
    final = history[-1]["evaluate"]["global"]
    if pretrain:
        rec = final.get("reconstruction")
        print(f"encoder package: {package}  (federated validation reconstruction L1 "
              f"{'n/a' if rec is None else f'{rec:.4f}'} after {len(history)} rounds, "
              f"MLflow run {tracker.run_id})", flush=True)
        return package
    cpm = final.get("cpm")
    print(f"model package: {package}  (federated validation CPM "
          f"{'n/a' if cpm is None else f'{cpm:.3f}'} after {len(history)} rounds, "
          f"MLflow run {tracker.run_id})", flush=True)
    return package


# --- helpers, in the order the loop uses them ---


def _exchanged(arrays: dict[str, np.ndarray], names: list[str] | None, whole: bool
               ) -> dict[str, np.ndarray]:
    """What travels: everything (`whole`: round 1, or fed.exchange=all when `names` is None),
    else only the trainable weights `names`; the centers keep the rest from round 1."""
    if names is None or whole:
        return arrays
    return {k: arrays[k] for k in names}


def _check_resumable(state: Mapping[str, Any], settings: FedSettings, path: Path) -> None:
    if state.get("format") != _FORMAT:
        raise MedfoundError("not a federated coordinator checkpoint", path=path,
                            hint="point out_dir at the FED folder of a federate run")
    for key, now in (("strategy_name", settings.strategy_name),
                     ("transfer_dtype", settings.transfer_dtype), ("task", settings.task)):
        if state.get(key, "detect" if key == "task" else None) != now:
            raise MedfoundError(f"the run started with {key} {state.get(key)!r}, not {now!r}",
                                path=path, hint="resume with the settings the run started with")


def _train_round(grid: Grid, strategy: Any, rnd: int, global_arrays: dict[str, np.ndarray],
                 instruction: Any, settings: FedSettings, gate: ReplyGate,
                 traffic: _Traffic, seed: int = 0,
                 keep: dict[str, dict[str, np.ndarray]] | None = None,
                 evaluate_received: bool = False, spool_dir: Path | None = None,
                 loo: LeaveOneOut | None = None,
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Send the global weights for training, screen the updates, aggregate the accepted ones.

    Returns the round's train record and the new global weights (the old ones when fewer
    than ``fed.min_centers`` updates were accepted). `keep`, when given, receives a float32
    copy of each accepted update by center (for cross-site validation). With
    `evaluate_received` the centers first score the weights they receive; the record's
    "evaluated" is then the evaluate record of those weights (`_evaluate_round`'s).
    `spool_dir`: aggregate from the updates spooled there (medfound.fed.spool), for the
    strategies `streams` allows. `loo`: records each accepted center's share of the
    aggregate (fed.contribution)."""
    messages = strategy.configure_train(rnd, encode_arrays(global_arrays, "float32"),
                                        instruction(evaluate_received), grid)
    if settings.privacy["secagg"]:
        return _secure_train_round(grid, rnd, list(messages), global_arrays, settings, gate,
                                   traffic)
    known = gate.known
    streaming = spool_dir is not None and streams(settings)
    with (UpdateSpool(spool_dir / f"{rnd:04d}") if streaming else contextlib.nullcontext()
          ) as spool:
        clock = _Clock()
        replies = _exchange(grid, messages, settings, gate, traffic, kind="train", rnd=rnd,
                            arrays=global_arrays, spool=spool, quorum=settings.replies_per_round)
        clock.lap("exchange_s")
        refused = _refusals(gate.take_refused())
        # Flower's strategies take exactly one MetricRecord per reply: the scores come out first.
        scores = {center_of(m, known): m.content.pop(EVALUATION) for m in replies
                  if m.has_content() and EVALUATION in m.content.metric_records}
        if replies and all(m.has_error() for m in replies) and not refused:
            reasons = sorted({reason_text(m.error.reason) for m in replies})
            raise MedfoundError(f"round {rnd}: no center could train ({'; '.join(reasons)})",
                                hint="read each center's log (its work folder's center.log)")
        screening = screen_updates(replies, global_arrays, transfer_dtype=settings.transfer_dtype,
                                   norm_factor=settings.reject_norm_factor, known_centers=known,
                                   spool=spool)
        clock.lap("screen_s")
        gate.weigh(screening.accepted)  # the weights: the coordinator's record of each count
        rejected = refused + screening.rejected
        for item in screening.rejected:
            print(f"round {rnd}: rejected the update of {item['center']}: {item['reason']}", flush=True)
        for item in screening.failed:
            print(f"round {rnd}: no update from {item['center']}: {item['reason']}", flush=True)

        record = {"aggregated": False,
                  "centers": dict(sorted(((center_of(m, known), _metrics(m))
                                          for m in replies if m.has_content()),
                                         key=lambda item: item[0])),
                  "accepted": sorted(center_of(m, known) for m in screening.accepted),
                  "rejected": rejected, "failed": screening.failed,
                  "update_norms": dict(sorted(screening.update_norms.items())), "aggregate": {},
                  "timing": clock.laps}
        if evaluate_received:
            record["evaluated"] = _evaluate_record(
                {c: _metric_dict(r) for c, r in scores.items()},
                [{"center": center_of(m, known),
                  "reason": (reason_text(m.error.reason) if m.has_error()
                             else "no evaluation in its reply")}
                 for m in replies if center_of(m, known) not in scores], rnd)
        if keep is not None:
            keep.update({center_of(m, known): spool.load(m) if spool is not None
                         else decode_arrays(m.content[ARRAYS]) for m in screening.accepted})
        if len(screening.accepted) >= settings.min_centers:
            if loo is not None:  # before the strategies consume the replies' arrays
                by_center = {center_of(m, known): m for m in screening.accepted}
                loo.add_round(rnd, {c: float(m.content[METRICS][NUM_EXAMPLES])
                                    for c, m in by_center.items()},
                              lambda c: (spool.load(by_center[c]) if spool is not None
                                         else decode_arrays(by_center[c].content[ARRAYS])),
                              global_arrays)
            # Flower's DP noise draws from numpy's global RNG: seed it from (seed, round) so a
            # resumed run adds the noise an uninterrupted one would have.
            np.random.seed(np.random.SeedSequence([seed, rnd]).generate_state(1)[0])  # noqa: NPY002
            if spool is not None:
                new, metrics = aggregate_spooled(strategy, rnd, spool, screening.accepted,
                                                 global_arrays)
                global_arrays = {**global_arrays, **new}
                record.update(aggregated=True, aggregate=metrics)
            else:
                # Flower's robust strategies consume the replies' arrays: nothing reads them after.
                new_arrays, metrics = strategy.aggregate_train(rnd, screening.accepted)
                if new_arrays is not None:
                    global_arrays = {k: v.astype(np.float32)
                                     for k, v in decode_arrays(new_arrays).items()}
                    if settings.privacy["dp"] is not None:
                        _keep_variances_positive(global_arrays)
                    record.update(aggregated=True, aggregate=dict(metrics or {}))
        clock.lap("aggregate_s")
        return record, global_arrays


class _Clock:
    """Seconds between successive `lap`s, by name (a training round's ``timing``)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 4)
        self._last = now


def _secure_train_round(grid: Grid, rnd: int, messages: list[Message],
                        global_arrays: dict[str, np.ndarray], settings: FedSettings,
                        gate: ReplyGate, traffic: _Traffic,
                        ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`_train_round` under fed.privacy.secagg (medfound.fed.secagg): the coordinator gets
    the case-weighted mean update and each center's shared metrics, never an update."""
    from medfound.fed.secagg import secure_mean

    known = gate.known
    result = secure_mean(lambda batch: _exchange(grid, batch, settings, gate, traffic,
                                                 kind="secagg", rnd=rnd),
                         messages, rnd, settings.privacy)
    refused = _refusals(gate.take_refused())
    contributed = sorted(center_of(m, known) for m in result.replies)
    failed = [{"center": known.get(node, f"node-{node}"), "reason": reason_text(reason)}
              for node, reason in sorted(result.failed.items())]
    for item in failed:
        print(f"round {rnd}: no update from {item['center']}: {item['reason']}", flush=True)
    centers = dict(sorted(((center_of(m, known), _metrics(m)) for m in result.replies),
                          key=lambda item: item[0]))
    record: dict[str, Any] = {
        "aggregated": False, "centers": centers, "accepted": [], "rejected": refused,
        "failed": failed, "update_norms": {}, "aggregate": {},
        "secagg": {"halted_at": result.halted_at, "contributed": contributed}}
    if result.halted_at is not None:
        print(f"round {rnd}: SecAgg+ halted at its {result.halted_at} stage (too few centers "
              "left to rebuild the masks); the model is kept", flush=True)
    mean = result.mean
    if mean is not None and not all(np.isfinite(v).all() for v in mean.values()):
        print(f"round {rnd}: the securely aggregated update is not finite; the model is kept",
              flush=True)
        mean = None
    if mean is not None and len(contributed) >= settings.min_centers:
        record["secagg"]["mean_update_norm"] = float(np.sqrt(sum(
            float(np.square(v, dtype=np.float64).sum()) for v in mean.values())))
        global_arrays = {k: (v + mean[k]).astype(np.float32) if k in mean else v
                         for k, v in global_arrays.items()}
        record.update(aggregated=True, accepted=contributed,
                      aggregate=weighted_mean(centers.values()))
    return record, global_arrays


def _cross_site(grid: Grid, out: Path, global_arrays: dict[str, np.ndarray],
                local_models: Mapping[str, dict[str, np.ndarray]], instruction: Any,
                settings: FedSettings, gate: ReplyGate, rnd: int, tracker: Any,
                receipts: ReceiptLog | None = None, loo: LeaveOneOut | None = None,
                ) -> dict[str, Any]:
    """Cross-site validation (medfound.fed.cross_site): FED/cross_site.csv and .png, to MLflow.

    Each center gets the global model and, only with fed.share_local_models, the other
    centers' last local updates (`local_models` is empty otherwise) and, with `loo`
    (fed.contribution), the global model without each center's shares, scored with the
    detection loss too."""
    from medfound.fed.cross_site import GLOBAL, cross_site_evaluate, local_name, write_cross_site

    known = gate.known
    shared = local_models if settings.share_local_models else {}
    models = {GLOBAL: global_arrays,
              **{local_name(c): shared[c] for c in settings.centers if c in shared},
              **(loo.models(global_arrays) if loo is not None else {})}
    ask = instruction
    if loo is not None:
        def ask() -> ConfigRecord:
            config = instruction()
            config[SCORE_LOSS] = True
            return config
    traffic = _Traffic(receipts)
    result = cross_site_evaluate(
        grid, models, ask, rnd, known=known,
        exchange=lambda messages: _exchange(grid, messages, settings, gate, traffic,
                                            kind="cross-site", rnd=rnd, models=list(models)))
    result["rejected"] = _refusals(gate.take_refused())
    result["bytes"] = traffic.by_center(known)
    table, heatmap = write_cross_site(out, result, list(settings.centers))
    for item in result["failed"]:
        print(f"cross-site validation: no result from {item['center']}: {item['reason']}",
              flush=True)
    tracker.log_metrics({f"cross_site/{model}/{center}/cpm": m["cpm"]
                         for model, row in result["models"].items()
                         for center, m in row.items() if "cpm" in m}, step=rnd)
    tracker.log_artifact(table)
    tracker.log_artifact(heatmap)
    print(f"cross-site validation of {len(models)} models at {len(settings.centers)} centers: "
          f"{table}, {heatmap.name}", flush=True)
    return result


def _keep_variances_positive(arrays: dict[str, np.ndarray], floor: float = 1e-5) -> None:
    """BatchNorm running variances travel with the weights; DP noise can push one below 0."""
    for name, value in arrays.items():
        if name.endswith("running_var"):
            np.maximum(value, floor, out=value)


def _evaluate_round(grid: Grid, strategy: Any, rnd: int, global_arrays: dict[str, np.ndarray],
                    instruction: Any, settings: FedSettings, gate: ReplyGate,
                    traffic: _Traffic) -> dict[str, Any]:
    """Every center scores the global weights; the round's evaluate record."""
    known = gate.known
    messages = strategy.configure_evaluate(rnd, encode_arrays(global_arrays, "float32"),
                                           instruction(), grid)
    replies = _exchange(grid, messages, settings, gate, traffic, kind="evaluate", rnd=rnd)
    record = _evaluate_record(
        {center_of(m, known): _metrics(m) for m in replies if m.has_content()},
        [{"center": center_of(m, known), "reason": reason_text(m.error.reason)}
         for m in replies if m.has_error()], rnd)
    record["rejected"] = _refusals(gate.take_refused())
    return record


def _evaluate_record(centers: Mapping[str, dict[str, float]], failed: list[dict[str, str]],
                     in_round: int) -> dict[str, Any]:
    """A round model's evaluate record: each center's scores (sorted by center), their
    case-weighted mean, the centers that gave none, and the round whose replies carried them."""
    centers = dict(sorted(centers.items()))
    return {"global": weighted_mean(centers.values()), "centers": centers, "failed": failed,
            "pending": False, "in_round": in_round}


class _Traffic:
    """Bytes per round: sent to each node, received from each center; and with `receipts`
    (FED/receipts.jsonl) a receipt for every message either way."""

    def __init__(self, receipts: ReceiptLog | None = None) -> None:
        self.to_node: dict[int, int] = {}
        self.from_center: dict[str, int] = {}
        self.receipts = receipts

    def receipt(self, direction: str, node: int, center: str | None, rnd: int, kind: str,
                digest: str, size: int, origin: str | None = None) -> None:
        if self.receipts is not None:
            self.receipts.record(direction=direction, node=node, center=center, round=rnd,
                                 kind=kind, digest=digest, size=size, origin=origin)

    def by_center(self, known: Mapping[int, str]) -> dict[str, dict[str, int]]:
        """{center: {"sent": bytes the center sent, "received": bytes it was sent}}."""
        out: dict[str, dict[str, int]] = {}
        for center, n in self.from_center.items():
            out.setdefault(center, {"sent": 0, "received": 0})["sent"] += n
        for node, n in self.to_node.items():
            center = known.get(node, f"node-{node}")
            out.setdefault(center, {"sent": 0, "received": 0})["received"] += n
        return dict(sorted(out.items()))


def _send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float,
                      on_reply: Callable[[Message], Message | None], one_at_a_time: bool = False,
                      poll_s: float = 0.25, enough: int | None = None) -> list[Message]:
    """Push `messages`, then pull replies every `poll_s` until each has one, `enough` of the
    kept replies carry content (fed.replies_per_round), or `timeout` passes; each reply goes
    through `on_reply` as it arrives (None: leave it out).

    Flower's `Grid.send_and_receive` waits 3 s between pulls: 1.5 s per exchange on average,
    for nothing. `one_at_a_time`: pull each reply alone, and hand it to `on_reply` before the
    next is pulled (streaming aggregation: only one is ever in memory whole)."""
    pending = set(grid.push_messages(messages))
    end = time.monotonic() + timeout
    replies: list[Message] = []
    answered = 0  # kept replies with content
    while pending:
        for batch in ([{mid} for mid in sorted(pending)] if one_at_a_time else [set(pending)]):
            for reply in grid.pull_messages(batch):
                pending.discard(reply.metadata.reply_to_message_id)
                kept = on_reply(reply)
                if kept is not None:
                    replies.append(kept)
                    answered += kept.has_content()
            if enough is not None and answered >= enough:
                return replies  # the rest are stragglers: their replies are never read
        if not pending or time.monotonic() >= end:
            break
        time.sleep(poll_s)
    return replies


def _exchange(grid: Grid, messages: Iterable[Message], settings: FedSettings,
              gate: ReplyGate, traffic: _Traffic, *, kind: str, rnd: int,
              arrays: Mapping[str, np.ndarray] | None = None, models: Iterable[str] = (),
              spool: UpdateSpool | None = None, quorum: int | None = None) -> list[Message]:
    """Put the weights in the transfer dtype, send, and wait up to ``fed.round_timeout_s``
    (or until `quorum` replies with content have come: fed.replies_per_round).

    Each reply passes `gate` as it arrives (`kind`, `arrays`, `models`: what
    `ReplyGate.admit` checks it against); a refused one is printed, recorded by the gate and
    left out of the returned replies. Counts the bytes both ways. With `spool` each admitted
    reply's arrays go to disk as it arrives (medfound.fed.spool)."""
    known = gate.known
    models = list(models)
    messages = list(messages)
    sizes: dict[int, tuple[int, str]] = {}
    for msg in messages:
        content = msg.content
        if id(content) not in sizes:  # strategies share one content among their messages
            for key in list(content.array_records):
                content[key] = encode_arrays(decode_arrays(content[key]), settings.transfer_dtype)
            data = payload_bytes(content)
            sizes[id(content)] = (len(data), hashlib.sha256(data).hexdigest())
        node = msg.metadata.dst_node_id
        size, digest = sizes[id(content)]
        traffic.to_node[node] = traffic.to_node.get(node, 0) + size
        traffic.receipt("sent", node, known.get(node), rnd, kind, digest, size)
    if not messages:
        return []
    nodes = {m.metadata.dst_node_id for m in messages}
    sent: dict[str, Message] = {}  # by message id, which pushing the messages sets

    def received(msg: Message) -> Message | None:
        if not sent:
            sent.update({m.metadata.message_id: m for m in messages})
        # An error the SuperLink makes for a center that stopped answering (no heartbeat)
        # comes from the SuperLink itself: re-address it as coming from the center's node.
        origin = None
        if (msg.has_error() and msg.metadata.src_node_id not in nodes
                and msg.metadata.reply_to_message_id in sent):
            msg = Message(msg.error, reply_to=sent[msg.metadata.reply_to_message_id])
            origin = "superlink"
        asked = sent.get(msg.metadata.reply_to_message_id)
        if asked is not None and asked.metadata.dst_node_id != msg.metadata.src_node_id:
            asked = None  # a reply to a message sent to another node
        data = _reply_bytes(msg)
        size = len(data)
        admitted = gate.admit(msg, sent=asked, kind=kind, rnd=rnd, arrays=arrays,
                              transfer_dtype=settings.transfer_dtype, models=models)
        node = int(msg.metadata.src_node_id)
        center = known.get(node, f"node-{node}")
        traffic.from_center[center] = traffic.from_center.get(center, 0) + size
        traffic.receipt("received", node, known.get(node), rnd,
                        "error" if msg.has_error() else kind, hashlib.sha256(data).hexdigest(),
                        size, origin)
        for note in gate.notes:
            print(f"round {rnd}: {note}", flush=True)
        gate.notes.clear()
        if admitted is None:
            item = gate.refused[-1]
            print(f"round {rnd}: refused a {kind} reply from {item['center']} (node "
                  f"{item['node']}): {item['reason']}", flush=True)
            return None
        return spool.take(admitted) if spool is not None else admitted

    return _send_and_receive(grid, messages, timeout=settings.round_timeout_s, on_reply=received,
                             one_at_a_time=spool is not None, enough=quorum)


# How long the coordinator waits for nodes to say who they are before a round: a base, plus a
# share per node asked (Flower's simulation engine answers the queries a few at a time, so 20
# new centers take far longer than one); never longer than the round's own timeout.
NAME_TIMEOUT_S = 30.0
NAME_TIMEOUT_PER_NODE_S = 5.0


def _name_nodes(grid: Grid, settings: FedSettings, gate: ReplyGate, traffic: _Traffic,
                rnd: int) -> None:
    """Ask each connected node the gate cannot name yet who it is (a query: the center's name,
    nothing else), so that a center that fails before its first reply is still recorded and
    logged by name. The answer passes the gate like any reply: a name is bound by its rules.
    A node that cannot answer (an error) is named by its first reply instead."""
    unnamed = sorted(n for n in grid.get_node_ids() if n not in gate.known)
    if not unnamed:
        return
    messages = [Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY,
                        group_id=str(rnd)) for n in unnamed]
    empty = payload_bytes(RecordDict({}))
    for n in unnamed:
        traffic.receipt("sent", n, None, rnd, "query", hashlib.sha256(empty).hexdigest(),
                        len(empty))
    sent: dict[str, Message] = {}

    def named(reply: Message) -> None:
        if not sent:
            sent.update({m.metadata.message_id: m for m in messages})
        asked = sent.get(reply.metadata.reply_to_message_id)
        node = int(reply.metadata.src_node_id)
        data = _reply_bytes(reply)
        try:
            if reply.has_error() or asked is None or asked.metadata.dst_node_id != node:
                return None
            return _admit_name(reply, asked, node, gate, traffic, rnd)
        finally:
            traffic.receipt("received", node, gate.known.get(node), rnd,
                            "error" if reply.has_error() else "query",
                            hashlib.sha256(data).hexdigest(), len(data))

    wait = NAME_TIMEOUT_S + NAME_TIMEOUT_PER_NODE_S * len(unnamed)
    _send_and_receive(grid, messages, timeout=min(wait, settings.round_timeout_s), on_reply=named)


def _reply_bytes(msg: Message) -> bytes:
    """A reply's content as the center's audit log hashes it: the content, or the error's
    reason."""
    return payload_bytes(msg.content) if msg.has_content() else str(msg.error.reason).encode()


def _admit_name(reply: Message, asked: Message, node: int, gate: ReplyGate, traffic: _Traffic,
                rnd: int) -> None:
    """A query reply through the gate (which binds the node's name) and into the traffic."""
    if gate.admit(reply, sent=asked, kind="query", rnd=rnd) is None:
        item = gate.refused[-1]
        print(f"round {rnd}: refused a query reply from node {node}: {item['reason']}",
              flush=True)
        return None
    center = gate.known[node]
    traffic.to_node[node] = traffic.to_node.get(node, 0) + len(payload_bytes(asked.content))
    traffic.from_center[center] = (traffic.from_center.get(center, 0)
                                   + len(payload_bytes(reply.content)))
    return None


def _refusals(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Refused replies as a round record's ``rejected`` entries."""
    return [{"center": i["center"], "reason": f"reply refused: {i['reason']}", "node": i["node"],
             "claimed": i["claimed"]} for i in items]


def _metrics(msg: Message) -> dict[str, float]:
    if METRICS not in msg.content.metric_records:
        return {}
    return _metric_dict(msg.content[METRICS])


def _metric_dict(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if not isinstance(v, list)}


def weighted_mean(per_center: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Case-weighted mean of each metric over the centers that report it; counts are summed.

    Weights are ``num-examples``; a center with none (no validation split) adds nothing.
    """
    per_center = list(per_center)
    out: dict[str, float] = {}
    for key in ("num-examples", "n_nodules"):
        if any(key in m for m in per_center):
            out[key] = float(sum(m.get(key, 0) for m in per_center))
    keys = sorted({k for m in per_center for k in m} - {NUM_EXAMPLES, "n_nodules"})
    for key in keys:
        pairs = [(float(m[key]), float(m.get(NUM_EXAMPLES, 0))) for m in per_center if key in m]
        total = sum(w for _, w in pairs)
        if total > 0:
            out[key] = sum(v * w for v, w in pairs) / total
    return out


def privacy_report(history: list[dict[str, Any]], settings: FedSettings,
                   cross_site: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's privacy settings, the noise std and, with DP, each center's (ε, δ) after the
    completed rounds (medfound.fed.strategies.dp_epsilons): with task=detect from each round's
    aggregation weights (shares of the accepted centers' cases), with task=pretrain from weight
    1 (a stem a single center holds is that center's alone).

    ``flows``: what left each center and to whom, and what each center was sent, from the
    round records and the cross-site record (`data_flows`)."""
    rounds = []
    for r in history:
        counts = {c: float(m.get(NUM_EXAMPLES, 0)) for c, m in r["train"]["centers"].items()
                  if c in r["train"]["accepted"]}
        total = sum(counts.values())
        rounds.append({c: (1.0 if settings.task == "pretrain" or total <= 0 else n / total)
                       for c, n in counts.items()})
    eps = dp_epsilons(settings.privacy, len(settings.centers), rounds, settings.privacy["delta"])
    report = {**settings.privacy, "noise_stdev": dp_noise_stdev(settings.privacy, len(settings.centers))}
    if eps is not None:
        report["epsilon"] = eps
        report["accounting"] = ("center-level: one center's clipped update vs none, aggregation weights "
                                "fixed; rounds composed as Gaussian DP (tight conversion to (ε, δ))")
    report["flows"] = data_flows(history, settings, cross_site)
    return report


def data_flows(history: list[dict[str, Any]], settings: FedSettings,
               cross_site: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per center of fed.centers: ``sent`` (what left it, to the coordinator: the rounds
    whose training reply reached the coordinator, in which form, and its metrics),
    ``received`` (what the coordinator sent it: the rounds it got the global model in, and
    the models of the cross-site validation) and ``summary``, the same in words.

    Only the coordinator ever receives a center's reply; no center is sent another center's
    individual update unless ``local_updates_of`` lists one (fed.share_local_models)."""
    p = settings.privacy
    if p["secagg"]:
        form = "masked SecAgg+ shares of its update (the coordinator learns only the mean)"
    elif p["dp"] == "client":
        form = f"its update, clipped at the center to L2 norm {p['clipping_norm']:g}"
    elif p["dp"] == "server":
        form = (f"its update, not clipped (the coordinator clips it to L2 norm "
                f"{p['clipping_norm']:g} before the noised aggregate)")
    else:
        form = "its updated weights, in clear"
    flows: dict[str, Any] = {}
    for center in settings.centers:
        trained = [r["round"] for r in history if center in r["train"]["centers"]]
        got_global = [r["round"] for r in history
                      if r.get("bytes", {}).get(center, {}).get("received", 0) > 0]
        models = list((cross_site or {}).get("sent", {}).get(center, []))
        others = sorted(m.split(":", 1)[1] for m in models if m.startswith("local:"))
        loo = sorted(m.split(":", 1)[1] for m in models if m.startswith("without:"))
        sent = {"to": "coordinator", "train_rounds": trained, "update": form,
                "metrics": "training losses and case count each round; validation scores of "
                           "the models it was sent"}
        received = {"from": "coordinator", "global_model_rounds": got_global,
                    "cross_site_models": models, "local_updates_of": others}
        if loo:  # fed.contribution: the global model less each center's shares
            received["leave_one_out_of"] = loo
        words = (f"{center} → coordinator: {form}, rounds {_rounds_text(trained)}, with its "
                 f"metrics; coordinator → {center}: the global model, rounds "
                 f"{_rounds_text(got_global)}")
        if models:
            words += ("; cross-site: " + (f"the global model and the local updates of "
                                          f"{', '.join(others)}" if others else
                                          "the global model only"))
            if loo:
                words += (f", and the global model without each of {', '.join(loo)} "
                          "(leave-one-out: each reveals that center's share of the updates)")
        flows[center] = {"sent": sent, "received": received, "summary": words}
    return flows


def _rounds_text(rounds: list[int]) -> str:
    if not rounds:
        return "none"
    if rounds == list(range(rounds[0], rounds[-1] + 1)):
        return str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"
    return ", ".join(map(str, rounds))


def byte_totals(history: list[dict[str, Any]], cross_site: Mapping[str, Any] | None
                ) -> dict[str, dict[str, int]]:
    """{center: {"sent", "received"}} over every round and the cross-site exchange."""
    totals: dict[str, dict[str, int]] = {}
    exchanges = [r["bytes"] for r in history] + ([cross_site["bytes"]] if cross_site else [])
    for by_center in exchanges:
        for center, b in by_center.items():
            t = totals.setdefault(center, {"sent": 0, "received": 0})
            t["sent"] += b["sent"]
            t["received"] += b["received"]
    return totals


def _tensors(tree: Any) -> Any:
    """numpy arrays in `tree` as torch tensors (state.pt is loaded with weights_only)."""
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tree))
    if isinstance(tree, dict):
        return {k: _tensors(v) for k, v in tree.items()}
    return tree


def write_metrics(path: Path, history: list[dict[str, Any]], settings: FedSettings,
                  model_bytes: int, cross_site: Mapping[str, Any] | None = None,
                  rejected: Iterable[Mapping[str, Any]] = ()) -> None:
    """FED/metrics.json from the round records, the cross-site validation and `rejected`,
    every reply the coordinator refused (medfound.fed.screening.ReplyGate) (atomic:
    temporary file, then rename)."""
    totals = byte_totals(history, cross_site)
    doc = {
        "format": "medfound-fed-metrics/1", "strategy": settings.strategy,
        "centers": list(settings.centers), "rounds_planned": settings.rounds,
        "rounds_completed": len(history), "transfer_dtype": settings.transfer_dtype,
        "model_bytes_fp32": model_bytes,
        "privacy": privacy_report(history, settings, cross_site),
        "global": [{"round": r["round"], **r["evaluate"]["global"]} for r in history
                   if not (r["evaluate"].get("pending") or r["evaluate"].get("skipped"))],
        "bytes_per_center": totals,
        "round_durations_s": [r["duration_s"] for r in history],
        "rejected_replies": list(rejected),
        "rounds": history,
    }
    if cross_site is not None:
        doc["cross_site"] = cross_site
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def _flat_round(record: Mapping[str, Any]) -> dict[str, float]:
    """One round's numbers as MLflow metrics (logged with step = round)."""
    flat = {"round_duration_s": record["duration_s"],
            "updates_accepted": len(record["train"]["accepted"]),
            "updates_rejected": len(record["train"]["rejected"]),
            "centers_failed": len(record["train"]["failed"]),
            "centers_sampled": len(record["participation"]["sampled"]),
            "centers_late": len(record["participation"]["late"])}
    flat.update({f"aggregate/{k}": v for k, v in record["train"]["aggregate"].items()})
    for center, metrics in record["train"]["centers"].items():
        flat.update({f"{center}/{k}": v for k, v in metrics.items() if k != NUM_EXAMPLES})
    for center, b in record["bytes"].items():
        flat[f"{center}/bytes_sent"] = b["sent"]
        flat[f"{center}/bytes_received"] = b["received"]
    return {**_finite(flat), **_flat_evaluate(record["evaluate"])}


def _flat_evaluate(evaluate: Mapping[str, Any]) -> dict[str, float]:
    """A round model's scores as MLflow metrics (step = that round, whenever they arrive)."""
    flat = {f"global/{k}": v for k, v in evaluate["global"].items()}
    for center, metrics in evaluate["centers"].items():
        flat.update({f"{center}/val/{k}": v for k, v in metrics.items()})
    return _finite(flat)


def _finite(flat: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def _round_summary(record: Mapping[str, Any], rounds: int,
                   scored: Mapping[str, Any] | None = None) -> str:
    """One line per round; `scored`: the earlier round whose model this round's centers scored."""
    train = record["train"]
    parts = [f"round {record['round']}/{rounds}",
             f"{len(train['accepted'])} updates accepted, {len(train['rejected'])} rejected, "
             f"{len(train['failed'])} failed" + ("" if record["aggregated"] else " (model kept)")]
    taking = record["participation"]
    if len(taking["sampled"]) < taking["connected"] or taking["late"]:
        parts.append(f"{len(taking['sampled'])} of {taking['connected']} centers drawn, "
                     f"{len(taking['late'])} late")
    if "train/loss" in train["aggregate"]:
        parts.append(f"train/loss {train['aggregate']['train/loss']:.4g}")
    for r in ([scored] if scored is not None else []) + [record]:
        glob, which = r["evaluate"]["global"], ("global" if r is record else
                                                f"round-{r['round']} model")
        if "cpm" in glob:
            parts.append(f"{which} CPM {glob['cpm']:.3f}")
        if "reconstruction" in glob:
            parts.append(f"{which} reconstruction {glob['reconstruction']:.4f}")
    parts.append(f"{record['duration_s']:.1f} s")
    return "  ".join(parts)


def _package(out: Path, network: torch.nn.Module, cfg: Mapping[str, Any], config_yaml: str,
             settings: FedSettings, history: list[dict[str, Any]], run_id: str | None) -> Path:
    from medfound.train import detection as task
    from medfound.train.package import save_model_package

    last = history[-1]
    glob = last["evaluate"]["global"]
    metrics = {
        "cpm": glob.get("cpm"),
        "froc": {k.split("/", 1)[1]: v for k, v in glob.items() if k.startswith("froc/")},
        "n_scans": int(glob.get(NUM_EXAMPLES, 0)), "n_nodules": int(glob.get("n_nodules", 0)),
        "centers": last["evaluate"]["centers"], "round": last["round"],
    }
    train_cases = {c: int(m.get(NUM_EXAMPLES, 0)) for c, m in last["train"]["centers"].items()}
    net_cfg = cfg["network"]
    return save_model_package(
        out / "model", network, task="lung_nodule_detection",
        model_config=task.detector_config(net_cfg).to_dict(),
        preprocessing={"spacing_mm": list(net_cfg["spacing_mm"]),
                       "hu_window": list(net_cfg["hu_window"]), "orientation": "LPS",
                       "intensity": "clip to hu_window, scale to [0, 1]"},
        metrics=metrics, config_yaml=config_yaml,
        provenance={"federated": True, "strategy": settings.strategy,
                    "rounds": last["round"], "train_centers": list(settings.centers),
                    "val_centers": list(settings.centers), "val_split": "validation",
                    "train_cases": train_cases, "seed": cfg["seed"],
                    "transfer_dtype": settings.transfer_dtype, "privacy": settings.privacy,
                    "mlflow_run_id": run_id})


def _package_encoder(out: Path, network: torch.nn.Module, cfg: Mapping[str, Any], config_yaml: str,
                     settings: FedSettings, history: list[dict[str, Any]], run_id: str | None) -> Path:
    """FED/encoder/: the federated-pretrained encoder (stems + shared body), as `pretrain` leaves it."""
    from medfound.train.package import save_model_package

    last = history[-1]
    t = cfg["task"]
    volumes = {c: {k.split("/", 1)[1]: int(v) for k, v in m.items() if k.startswith("volumes/")}
               for c, m in last["train"]["centers"].items()}
    return save_model_package(
        out / "encoder", network.encoder, task="foundation_encoder",
        model_config=dict(t["encoder"]),
        preprocessing={"modalities": t["modalities"], "patch_size": t["patch_size"],
                       "orientation": "LPS"},
        metrics={**last["evaluate"]["global"], "round": last["round"]}, config_yaml=config_yaml,
        provenance={"federated": True, "strategy": settings.strategy, "rounds": last["round"],
                    "train_centers": list(settings.centers), "volumes": volumes,
                    "seed": cfg["seed"], "transfer_dtype": settings.transfer_dtype,
                    "privacy": settings.privacy, "mlflow_run_id": run_id})
