"""The ServerApp: the coordinator's loop over rounds, and everything it leaves in FED/.

Every reply a center sends passes `medfound.fed.screening.ReplyGate` before any of it is
read: its name must be the one bound to its node (``fed.nodes``, or the first name the node
gave), its records, arrays, metric names and values, and case count what the message type
allows; a refused reply is printed, recorded with its reason (the round's ``rejected``, and
``rejected_replies`` in FED/metrics.json) and left out, and the round goes on with the others.
The aggregation weights are the coordinator's record of each center's case count.

Each round, in order (`run_coordinator`, in the shape of Flower's `Strategy.start`):

1. configure — `medfound.fed.participation.draw_round` picks the round's centers among the
   connected ones (all of them, or a seeded draw: ``fed.fraction``, ``fed.centers_per_round``;
   at least ``fed.min_centers``), and the strategy addresses the global weights to them;
2. exchange — the round waits for their replies (all, ``fed.replies_per_round`` of them, or
   until ``fed.round_timeout_s``);
3. screen — replies are screened (medfound.fed.screening: bad updates are rejected and logged);
4. aggregate — the accepted ones are aggregated by the Flower strategy, weighted by each
   center's training case count where the strategy weights at all. With fewer than
   ``fed.min_centers`` accepted updates the round keeps the previous weights;
5. evaluate — every center scores the new global weights on its validation split; the global
   metric is the case-weighted mean over the centers that could compute it. With
   ``fed.evaluate_with_train`` (the default) this rides in the next round's train message:
   each center scores the weights it receives before it trains, so a round is one exchange,
   not two (Flower's per-message cost, a few seconds, is paid once). Round r's evaluate
   record then stays ``pending`` until round r + 1's replies fill it; the last round's model
   gets an evaluate message of its own. SecAgg+ runs keep the separate exchange;
6. checkpoint — ``FED/server/state.pt`` (global weights, strategy state, round, history) is
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

The round records and FED/metrics.json: medfound.fed.reporting.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
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
from medfound.fed.participation import RoundGrid, draw_round
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
from medfound.fed.reporting import (
    EvaluateRecord,
    RoundRecord,
    TrainRecord,
    byte_totals,
    flat_evaluate,
    flat_round,
    privacy_report,
    round_summary,
    weighted_mean,
    write_metrics,
)
from medfound.fed.screening import ReplyGate, reason_text, screen_updates
from medfound.fed.settings import FedSettings
from medfound.fed.spool import UpdateSpool, aggregate_spooled, streams
from medfound.fed.strategies import (
    build_strategy,
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
    """Run the federation's rounds over `grid`; returns the model package's path.

    Each round runs the phases of the module docstring, in order; the set-up and the state
    between rounds are `_Coordinator`'s."""
    from medfound.train.tracking import Tracker

    run = _Coordinator(grid, cfg)
    settings, history, gate = run.settings, run.history, run.gate
    with Tracker(cfg["tracking"], out_dir=run.out, config=cfg, resume=run.resumed) as tracker:
        for rnd in range(run.first_round, settings.rounds + 1):
            started, traffic = time.time(), _Traffic(run.receipts)
            # --- configure: name new nodes, draw the round's centers, address the weights ---
            scored = run.awaiting_scores()
            _name_nodes(grid, settings, gate, traffic, rnd)
            drawn = draw_round(grid, gate.known, rnd, settings, seed=run.seed)
            training = run.training(rnd, drawn, traffic, evaluate_received=scored is not None)
            messages = training.configure()
            with training:
                # --- exchange: the weights out, each reply through the gate as it arrives ---
                training.exchange(messages)
                # --- screen: each update checked before it counts ---
                training.screen()
                # --- aggregate: the accepted updates into the new global weights ---
                trained = training.aggregate()
            if scored is not None:  # the previous round's model, scored by this round's centers
                scored = replace(scored, evaluate=trained.evaluated)
                history[-1] = scored
                tracker.log_metrics(flat_evaluate(scored.evaluate), step=scored.round)
            run.global_arrays = {**run.global_arrays, **trained.arrays}
            train_s = time.time() - started
            # --- evaluate: the new global weights at the centers, now or with the next round ---
            evaluate = run.evaluate(rnd, drawn, traffic)
            record = RoundRecord(round=rnd, started_at=round(started, 3),
                                 duration_s=round(time.time() - started, 3),
                                 train_s=round(train_s, 3), participation=drawn.record(),
                                 aggregated=trained.aggregated, train=trained.record,
                                 evaluate=evaluate, bytes=traffic.by_center(gate.known))
            history.append(record)
            # --- checkpoint: state.pt (atomic), then metrics.json, then MLflow ---
            run.checkpoint(rnd)
            tracker.log_metrics(flat_round(record), step=rnd)
            print(round_summary(record, settings.rounds, scored), flush=True)

        if not history:
            raise MedfoundError("the federation completed no round", path=run.out,
                                hint="set fed.rounds >= 1")
        cross_site = _cross_site(run, tracker) if settings.cross_site and not run.pretrain else None
        package = _package_global(run, cfg, config_yaml, tracker.run_id)
        _write_reports(run, cross_site, tracker)
        tracker.log_artifacts(package, package.name)
    _print_outcome(run, package, cross_site, tracker.run_id)
    return package


class _Coordinator:
    """A run's set-up and its state between rounds: the settings, the network and strategy,
    the global weights, the round records, the reply gate and the receipts; on resume, all of
    them as the last completed round in ``FED/server/state.pt`` left them."""

    def __init__(self, grid: Grid, cfg: Mapping[str, Any]) -> None:
        from medfound.train.checkpoint import load_checkpoint

        self.grid, self.cfg = grid, cfg
        self.settings = settings = FedSettings.from_config(cfg)
        self.out = Path(cfg["out_dir"])
        self.seed = int(cfg["seed"])
        self.pretrain = settings.task == "pretrain"
        self.network = self._build_network()
        self.strategy = with_privacy(
            build_strategy(settings.strategy, settings.min_centers, group_by_modality=self.pretrain,
                           statistics=running_statistics(self.network)),
            settings.privacy, len(settings.centers))
        _print_privacy(settings)
        # fed.exchange=trainable: after round 1 only these weights travel (both ways).
        self.exchanged = ([name for name, p in self.network.named_parameters() if p.requires_grad]
                          if settings.exchange == "trainable" else None)
        self.global_arrays = {k: v.numpy().astype(np.float32)
                              for k, v in shared_state(self.network.state_dict()).items()}
        self.model_bytes = int(sum(a.nbytes for a in self.global_arrays.values()))

        self.resumed = bool(cfg.get("resume"))
        self.history: list[RoundRecord] = []
        self.run_tag, self.first_round = uuid.uuid4().hex[:12], 1
        state: Mapping[str, Any] = {}
        if self.resumed:
            state = load_checkpoint(self.out / STATE_FILE)
            _check_resumable(state, settings, self.out / STATE_FILE)
            self.global_arrays = {k: v.numpy() for k, v in state["model"].items()}
            restore_strategy_state(self.strategy, state["strategy"])
            self.history = [RoundRecord.from_dict(r) for r in state["history"]]
            self.run_tag = state["run_tag"]
            self.first_round = int(state["round"]) + 1
            print(f"resuming after round {state['round']} from {self.out / STATE_FILE}", flush=True)
        self.task_json = task_spec(cfg, local_epochs=settings.local_epochs,
                                   transfer_dtype=settings.transfer_dtype,
                                   eval_bootstraps=settings.eval_bootstraps, run_tag=self.run_tag,
                                   exchange=settings.exchange)
        self.versions_json = json.dumps(versions())
        # fed.evaluate_with_train: round r's train message also asks each center to score the
        # weights it receives (round r - 1's model); SecAgg+ keeps the evaluate exchange.
        self.evaluate_with_train = settings.evaluate_with_train and not settings.privacy["secagg"]

        # Every reply passes the gate first (medfound.fed.screening.ReplyGate): node id → center
        # name (gate.known), each center's recorded case count, every refused reply.
        self.gate = ReplyGate(settings.centers, max_cases=settings.max_cases,
                              declared_cases=settings.declared_cases, nodes=settings.nodes,
                              connected=grid.get_node_ids)
        if self.resumed:
            self.gate.restore(state.get("gate") or {})
            self.gate.refused.extend(list(state.get("rejected_replies") or []))
            self.gate.take_refused()
        self.receipts = ReceiptLog(self.out / RECEIPTS_FILE)
        # fed.contribution: each center's share of the last round's aggregate
        self.loo = LeaveOneOut() if settings.contribution else None
        if self.loo is not None and self.resumed:
            self.loo.restore(state.get("contribution"))
        self.local_models: dict[str, dict[str, np.ndarray]] = {}  # the last round's accepted updates

    def _build_network(self) -> torch.nn.Module:
        from medfound.train import detection as task

        cfg = self.cfg
        if self.pretrain:
            from medfound.train import pretrain as pretrain_task

            return pretrain_task.build(cfg["task"]["encoder"], seed=cfg["seed"])
        network, _ = task.build(cfg["network"], seed=cfg["seed"])
        said = task.apply_finetune(network, cfg.get("finetune"))
        if said:
            print(said + " (at every center)", flush=True)
        return network

    def instruction(self, evaluate_received: bool = False) -> ConfigRecord:
        """A fresh one each time: strategies write the round in."""
        config = ConfigRecord({"task": self.task_json, "versions": self.versions_json})
        if evaluate_received:
            config[EVALUATE_RECEIVED] = True
        return config

    def sent(self, rnd: int) -> dict[str, np.ndarray]:
        """The global weights that travel in round `rnd` (`_exchanged`)."""
        return _exchanged(self.global_arrays, self.exchanged, whole=rnd == 1)

    def awaiting_scores(self) -> RoundRecord | None:
        """The last round's record when its model's scores come with this round's replies."""
        last = self.history[-1] if self.history else None
        if last is not None and last.evaluate.pending and not self.settings.privacy["secagg"]:
            return last
        return None

    def training(self, rnd: int, grid: RoundGrid, traffic: _Traffic,
                 evaluate_received: bool) -> _Training:
        """Round `rnd`'s training among the drawn centers `grid`."""
        kind = _SecureTraining if self.settings.privacy["secagg"] else _Training
        return kind(self, rnd, grid, traffic, evaluate_received=evaluate_received)

    def evaluate(self, rnd: int, drawn: RoundGrid, traffic: _Traffic) -> EvaluateRecord:
        """Round `rnd`'s evaluate record: skipped (fed.evaluate_every), pending (scored with
        the next round's train message) or scored now, by every center after the last round."""
        settings, last = self.settings, rnd == self.settings.rounds
        if rnd % settings.evaluate_every and not last:
            return EvaluateRecord(skipped=True)
        if self.evaluate_with_train and not last:
            return EvaluateRecord(pending=True)
        return _evaluate_round(self.grid if last else drawn, self.strategy, rnd, self.sent(rnd),
                               self.instruction, settings, self.gate, traffic)

    def rounds(self) -> list[dict[str, Any]]:
        """The round records' JSON form (medfound.fed.reporting)."""
        return [r.to_dict() for r in self.history]

    def checkpoint(self, rnd: int) -> None:
        """``FED/server/state.pt`` after round `rnd` (atomic), then FED/metrics.json."""
        from medfound.train.checkpoint import save_checkpoint

        settings, gate, rounds = self.settings, self.gate, self.rounds()
        save_checkpoint({"format": _FORMAT, "round": rnd, "run_tag": self.run_tag,
                         "strategy_name": settings.strategy_name, "task": settings.task,
                         "transfer_dtype": settings.transfer_dtype,
                         "model": {k: torch.from_numpy(v) for k, v in self.global_arrays.items()},
                         "strategy": strategy_state(self.strategy), "history": rounds,
                         "gate": gate.state(), "rejected_replies": gate.refused,
                         "contribution": None if self.loo is None else _tensors(self.loo.state())},
                        self.out / STATE_FILE)
        write_metrics(self.out / METRICS_FILE, rounds, settings, self.model_bytes,
                      rejected=gate.refused)


def _print_privacy(settings: FedSettings) -> None:
    """Say what the coordinator sees under SecAgg+ and how DP clips and noises."""
    if settings.privacy["secagg"]:
        print("secure aggregation (Flower's SecAgg+): the coordinator sees only the case-weighted "
              "mean of the centers' updates; each center checks its own update, and the "
              "cross-site matrix scores the global model only", flush=True)
    if settings.privacy["dp"] is not None:
        p = settings.privacy
        print(f"differential privacy: {p['dp']}-side clipping of each update to L2 norm "
              f"{p['clipping_norm']:g}, Gaussian noise of std "
              f"{dp_noise_stdev(p, len(settings.centers)):.4g} on each aggregate", flush=True)


# --- after the last round ---


def _package_global(run: _Coordinator, cfg: Mapping[str, Any], config_yaml: str,
                    run_id: str | None) -> Path:
    """The global weights into the network, and the network into its package."""
    for name, value in shared_state(run.network.state_dict()).items():
        value.copy_(torch.from_numpy(run.global_arrays[name]))
    return (_package_encoder if run.pretrain else _package)(
        run.out, run.network, cfg, config_yaml, run.settings, run.history[-1], run_id)


def _write_reports(run: _Coordinator, cross_site: Mapping[str, Any] | None, tracker: Any) -> None:
    """The final FED/metrics.json and the contribution report, both to MLflow too."""
    settings, gate, rounds = run.settings, run.gate, run.rounds()
    write_metrics(run.out / METRICS_FILE, rounds, settings, run.model_bytes, cross_site,
                  rejected=gate.refused)
    tracker.log_artifact(run.out / METRICS_FILE)
    for path in write_contribution(run.out, contribution_report(
            rounds, settings.centers, gate.cases, gate.refused,
            byte_totals(rounds, cross_site), cross_site, measured=run.loo is not None,
            strategy=settings.strategy_name)):
        tracker.log_artifact(path)


def _print_outcome(run: _Coordinator, package: Path, cross_site: Mapping[str, Any] | None,
                   run_id: str | None) -> None:
    """The run's last lines: each center's ε, what left each center, the package and its score."""
    settings, rounds = run.settings, run.rounds()
    eps = privacy_report(rounds, settings, cross_site).get("epsilon")
    if eps:
        print(f"differential privacy after {len(rounds)} rounds, δ = {settings.privacy['delta']:g}: "
              + ", ".join(f"{c} ε = {e:.3g}" for c, e in eps.items()), flush=True)
    if settings.privacy["dp"] is not None or settings.privacy["secagg"]:
        for flow in privacy_report(rounds, settings, cross_site)["flows"].values():
            print(f"what left: {flow['summary']}", flush=True)
    final = run.history[-1].evaluate.global_scores
    if run.pretrain:
        rec = final.get("reconstruction")
        print(f"encoder package: {package}  (federated validation reconstruction L1 "
              f"{'n/a' if rec is None else f'{rec:.4f}'} after {len(rounds)} rounds, "
              f"MLflow run {run_id})", flush=True)
        return
    cpm = final.get("cpm")
    print(f"model package: {package}  (federated validation CPM "
          f"{'n/a' if cpm is None else f'{cpm:.3f}'} after {len(rounds)} rounds, "
          f"MLflow run {run_id})", flush=True)


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


@dataclass(frozen=True)
class _Trained:
    """A round's training as the loop takes it up: its record, whether it made a new model,
    the global weights that travelled, updated, and with `evaluated` the scores of the weights
    the centers received (round r - 1's model)."""

    record: TrainRecord
    aggregated: bool
    arrays: dict[str, np.ndarray]
    evaluated: EvaluateRecord | None = None


class _Training:
    """One training round among the drawn centers `grid`, phase by phase: `configure` the
    train messages, `exchange` them, `screen` the replies, `aggregate` the accepted updates.
    Inside ``with`` the updates go to a spool as they arrive (medfound.fed.spool, for the
    strategies `streams` allows), which is removed at the end.

    With `evaluate_received` the centers first score the weights they receive; `aggregate`'s
    `_Trained.evaluated` is then the evaluate record of those weights (`_evaluate_round`'s).
    With cross-site validation and fed.share_local_models, the last round keeps a float32 copy
    of each accepted update by center (`_Coordinator.local_models`); with fed.contribution
    each accepted center's share of the aggregate is recorded (`_Coordinator.loo`)."""

    def __init__(self, run: _Coordinator, rnd: int, grid: RoundGrid, traffic: _Traffic,
                 evaluate_received: bool = False) -> None:
        settings = run.settings
        self.run, self.rnd, self.grid, self.traffic = run, rnd, grid, traffic
        self.settings, self.gate = settings, run.gate
        self.evaluate_received = evaluate_received
        self.sent = run.sent(rnd)
        cross_site_now = settings.cross_site and not run.pretrain and rnd == settings.rounds
        self.keep = run.local_models if cross_site_now and settings.share_local_models else None
        self.spool: UpdateSpool | None = None

    def configure(self) -> Iterable[Message]:
        """The strategy's train messages: the weights that travel, to the drawn centers."""
        return self.run.strategy.configure_train(self.rnd, encode_arrays(self.sent, "float32"),
                                                 self.run.instruction(self.evaluate_received),
                                                 self.grid)

    def __enter__(self) -> _Training:
        if streams(self.settings):
            self.spool = UpdateSpool(self.run.out / SPOOL_DIR / f"{self.rnd:04d}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.spool is not None:
            self.spool.close()

    def exchange(self, messages: Iterable[Message]) -> None:
        self.clock = _Clock()
        self.replies = _exchange(self.grid, messages, self.settings, self.gate, self.traffic,
                                 kind="train", rnd=self.rnd, arrays=self.sent, spool=self.spool,
                                 quorum=self.settings.replies_per_round)
        self.clock.lap("exchange_s")

    def screen(self) -> None:
        known, replies, rnd = self.gate.known, self.replies, self.rnd
        self.refused = _refusals(self.gate.take_refused())
        # Flower's strategies take exactly one MetricRecord per reply: the scores come out first.
        self.scores = {center_of(m, known): m.content.pop(EVALUATION) for m in replies
                       if m.has_content() and EVALUATION in m.content.metric_records}
        if replies and all(m.has_error() for m in replies) and not self.refused:
            reasons = sorted({reason_text(m.error.reason) for m in replies})
            raise MedfoundError(f"round {rnd}: no center could train ({'; '.join(reasons)})",
                                hint="read each center's log (its work folder's center.log)")
        self.screening = screen_updates(replies, self.sent, transfer_dtype=self.settings.transfer_dtype,
                                        norm_factor=self.settings.reject_norm_factor,
                                        known_centers=known, spool=self.spool)
        self.clock.lap("screen_s")

    def aggregate(self) -> _Trained:
        """The new global weights (the old ones when fewer than ``fed.min_centers`` updates
        were accepted) and the round's train record."""
        settings, gate, known, rnd = self.settings, self.gate, self.gate.known, self.rnd
        replies, screening, spool = self.replies, self.screening, self.spool
        gate.weigh(screening.accepted)  # the weights: the coordinator's record of each count
        for item in screening.rejected:
            print(f"round {rnd}: rejected the update of {item['center']}: {item['reason']}", flush=True)
        for item in screening.failed:
            print(f"round {rnd}: no update from {item['center']}: {item['reason']}", flush=True)
        centers = dict(sorted(((center_of(m, known), _metrics(m)) for m in replies if m.has_content()),
                              key=lambda item: item[0]))
        accepted = sorted(center_of(m, known) for m in screening.accepted)
        evaluated = None
        if self.evaluate_received:
            evaluated = _evaluate_record(
                {c: _metric_dict(r) for c, r in self.scores.items()},
                [{"center": center_of(m, known),
                  "reason": (reason_text(m.error.reason) if m.has_error()
                             else "no evaluation in its reply")}
                 for m in replies if center_of(m, known) not in self.scores], rnd)
        if self.keep is not None:
            self.keep.update({center_of(m, known): spool.load(m) if spool is not None
                              else decode_arrays(m.content[ARRAYS]) for m in screening.accepted})
        arrays, aggregated, metrics = self.sent, False, {}
        if len(screening.accepted) >= settings.min_centers:
            loo = self.run.loo
            if loo is not None:  # before the strategies consume the replies' arrays
                by_center = {center_of(m, known): m for m in screening.accepted}
                loo.add_round(rnd, {c: float(m.content[METRICS][NUM_EXAMPLES])
                                    for c, m in by_center.items()},
                              lambda c: (spool.load(by_center[c]) if spool is not None
                                         else decode_arrays(by_center[c].content[ARRAYS])),
                              arrays)
            # Flower's DP noise draws from numpy's global RNG: seed it from (seed, round) so a
            # resumed run adds the noise an uninterrupted one would have.
            np.random.seed(np.random.SeedSequence([self.run.seed, rnd]).generate_state(1)[0])  # noqa: NPY002
            if spool is not None:
                new, metrics = aggregate_spooled(self.run.strategy, rnd, spool, screening.accepted,
                                                 arrays)
                arrays, aggregated = {**arrays, **new}, True
            else:
                # Flower's robust strategies consume the replies' arrays: nothing reads them after.
                new_arrays, new_metrics = self.run.strategy.aggregate_train(rnd, screening.accepted)
                if new_arrays is not None:
                    arrays = {k: v.astype(np.float32) for k, v in decode_arrays(new_arrays).items()}
                    if settings.privacy["dp"] is not None:
                        _keep_variances_positive(arrays)
                    aggregated, metrics = True, dict(new_metrics or {})
        self.clock.lap("aggregate_s")
        record = TrainRecord(centers=centers, accepted=accepted,
                             rejected=self.refused + screening.rejected, failed=screening.failed,
                             update_norms=dict(sorted(screening.update_norms.items())),
                             aggregate=metrics, timing=self.clock.laps)
        return _Trained(record, aggregated, arrays, evaluated)


class _SecureTraining(_Training):
    """`_Training` under fed.privacy.secagg (medfound.fed.secagg): the coordinator gets the
    case-weighted mean update and each center's shared metrics, never an update; it screens
    the mean only (each center checks its own update)."""

    def exchange(self, messages: Iterable[Message]) -> None:
        from medfound.fed.secagg import secure_mean

        self.result = secure_mean(lambda batch: _exchange(self.grid, batch, self.settings,
                                                          self.gate, self.traffic,
                                                          kind="secagg", rnd=self.rnd),
                                  list(messages), self.rnd, self.settings.privacy)

    def screen(self) -> None:
        known, result, rnd = self.gate.known, self.result, self.rnd
        self.refused = _refusals(self.gate.take_refused())
        self.contributed = sorted(center_of(m, known) for m in result.replies)
        self.failed = [{"center": known.get(node, f"node-{node}"), "reason": reason_text(reason)}
                       for node, reason in sorted(result.failed.items())]
        for item in self.failed:
            print(f"round {rnd}: no update from {item['center']}: {item['reason']}", flush=True)
        if result.halted_at is not None:
            print(f"round {rnd}: SecAgg+ halted at its {result.halted_at} stage (too few centers "
                  "left to rebuild the masks); the model is kept", flush=True)
        self.mean = result.mean
        if self.mean is not None and not all(np.isfinite(v).all() for v in self.mean.values()):
            print(f"round {rnd}: the securely aggregated update is not finite; the model is kept",
                  flush=True)
            self.mean = None

    def aggregate(self) -> _Trained:
        known, mean, contributed = self.gate.known, self.mean, self.contributed
        centers = dict(sorted(((center_of(m, known), _metrics(m)) for m in self.result.replies),
                              key=lambda item: item[0]))
        secagg: dict[str, Any] = {"halted_at": self.result.halted_at, "contributed": contributed}
        arrays, aggregated, accepted, aggregate = self.sent, False, [], {}
        if mean is not None and len(contributed) >= self.settings.min_centers:
            secagg["mean_update_norm"] = float(np.sqrt(sum(
                float(np.square(v, dtype=np.float64).sum()) for v in mean.values())))
            arrays = {k: (v + mean[k]).astype(np.float32) if k in mean else v
                      for k, v in arrays.items()}
            aggregated, accepted, aggregate = True, contributed, weighted_mean(centers.values())
        record = TrainRecord(centers=centers, accepted=accepted, rejected=self.refused,
                             failed=self.failed, update_norms={}, aggregate=aggregate,
                             secagg=secagg)
        return _Trained(record, aggregated, arrays)


class _Clock:
    """Seconds between successive `lap`s, by name (a training round's ``timing``)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 4)
        self._last = now


def _cross_site(run: _Coordinator, tracker: Any) -> dict[str, Any]:
    """Cross-site validation (medfound.fed.cross_site): FED/cross_site.csv and .png, to MLflow.

    Each center gets the global model and, only with fed.share_local_models, the other
    centers' last local updates (`run.local_models` is empty otherwise) and, with `run.loo`
    (fed.contribution), the global model without each center's shares, scored with the
    detection loss too."""
    from medfound.fed.cross_site import GLOBAL, cross_site_evaluate, local_name, write_cross_site

    settings, gate, loo, rnd = run.settings, run.gate, run.loo, run.history[-1].round
    known = gate.known
    global_arrays = _exchanged(run.global_arrays, run.exchanged, whole=False)
    shared = run.local_models if settings.share_local_models else {}
    models = {GLOBAL: global_arrays,
              **{local_name(c): shared[c] for c in settings.centers if c in shared},
              **(loo.models(global_arrays) if loo is not None else {})}
    ask = run.instruction
    if loo is not None:
        def ask() -> ConfigRecord:
            config = run.instruction()
            config[SCORE_LOSS] = True
            return config
    traffic = _Traffic(run.receipts)
    result = cross_site_evaluate(
        run.grid, models, ask, rnd, known=known,
        exchange=lambda messages: _exchange(run.grid, messages, settings, gate, traffic,
                                            kind="cross-site", rnd=rnd, models=list(models)))
    result["rejected"] = _refusals(gate.take_refused())
    result["bytes"] = traffic.by_center(known)
    table, heatmap = write_cross_site(run.out, result, list(settings.centers))
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
                    traffic: _Traffic) -> EvaluateRecord:
    """Every center scores the global weights; the round's evaluate record."""
    known = gate.known
    messages = strategy.configure_evaluate(rnd, encode_arrays(global_arrays, "float32"),
                                           instruction(), grid)
    replies = _exchange(grid, messages, settings, gate, traffic, kind="evaluate", rnd=rnd)
    record = _evaluate_record(
        {center_of(m, known): _metrics(m) for m in replies if m.has_content()},
        [{"center": center_of(m, known), "reason": reason_text(m.error.reason)}
         for m in replies if m.has_error()], rnd)
    return replace(record, rejected=_refusals(gate.take_refused()))


def _evaluate_record(centers: Mapping[str, dict[str, float]], failed: list[dict[str, str]],
                     in_round: int) -> EvaluateRecord:
    """A round model's evaluate record: each center's scores (sorted by center), their
    case-weighted mean, the centers that gave none, and the round whose replies carried them."""
    centers = dict(sorted(centers.items()))
    return EvaluateRecord(global_scores=weighted_mean(centers.values()), centers=centers,
                          failed=failed, pending=False, in_round=in_round)


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



def _tensors(tree: Any) -> Any:
    """numpy arrays in `tree` as torch tensors (state.pt is loaded with weights_only)."""
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tree))
    if isinstance(tree, dict):
        return {k: _tensors(v) for k, v in tree.items()}
    return tree


def _package(out: Path, network: torch.nn.Module, cfg: Mapping[str, Any], config_yaml: str,
             settings: FedSettings, last: RoundRecord, run_id: str | None) -> Path:
    from medfound.train import detection as task
    from medfound.train.package import save_model_package

    glob = last.evaluate.global_scores
    metrics = {
        "cpm": glob.get("cpm"),
        "froc": {k.split("/", 1)[1]: v for k, v in glob.items() if k.startswith("froc/")},
        "n_scans": int(glob.get(NUM_EXAMPLES, 0)), "n_nodules": int(glob.get("n_nodules", 0)),
        "centers": last.evaluate.centers, "round": last.round,
    }
    train_cases = {c: int(m.get(NUM_EXAMPLES, 0)) for c, m in last.train.centers.items()}
    net_cfg = cfg["network"]
    return save_model_package(
        out / "model", network, task="lung_nodule_detection",
        model_config=task.detector_config(net_cfg).to_dict(),
        preprocessing={"spacing_mm": list(net_cfg["spacing_mm"]),
                       "hu_window": list(net_cfg["hu_window"]), "orientation": "LPS",
                       "intensity": "clip to hu_window, scale to [0, 1]"},
        metrics=metrics, config_yaml=config_yaml,
        provenance={"federated": True, "strategy": settings.strategy,
                    "rounds": last.round, "train_centers": list(settings.centers),
                    "val_centers": list(settings.centers), "val_split": "validation",
                    "train_cases": train_cases, "seed": cfg["seed"],
                    "transfer_dtype": settings.transfer_dtype, "privacy": settings.privacy,
                    "mlflow_run_id": run_id})


def _package_encoder(out: Path, network: torch.nn.Module, cfg: Mapping[str, Any], config_yaml: str,
                     settings: FedSettings, last: RoundRecord, run_id: str | None) -> Path:
    """FED/encoder/: the federated-pretrained encoder (stems + shared body), as `pretrain` leaves it."""
    from medfound.train.package import save_model_package

    t = cfg["task"]
    volumes = {c: {k.split("/", 1)[1]: int(v) for k, v in m.items() if k.startswith("volumes/")}
               for c, m in last.train.centers.items()}
    return save_model_package(
        out / "encoder", network.encoder, task="foundation_encoder",
        model_config=dict(t["encoder"]),
        preprocessing={"modalities": t["modalities"], "patch_size": t["patch_size"],
                       "orientation": "LPS"},
        metrics={**last.evaluate.global_scores, "round": last.round}, config_yaml=config_yaml,
        provenance={"federated": True, "strategy": settings.strategy, "rounds": last.round,
                    "train_centers": list(settings.centers), "volumes": volumes,
                    "seed": cfg["seed"], "transfer_dtype": settings.transfer_dtype,
                    "privacy": settings.privacy, "mlflow_run_id": run_id})
