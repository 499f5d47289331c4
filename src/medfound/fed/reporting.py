"""The coordinator's round records, and what is made of them: FED/metrics.json, the privacy
report, the MLflow metrics and the line printed after each round.

A round's record is a `RoundRecord` (its training a `TrainRecord`, the scores of its model an
`EvaluateRecord`), built once and never changed: when round r's model is scored in round
r + 1's train message (``fed.evaluate_with_train``), round r's record is replaced by a copy
that holds those scores. `to_dict` gives a record's JSON form, the one FED/metrics.json and
the checkpoint's ``history`` hold; `RoundRecord.from_dict` reads it back (``resume=true``). The
functions over a whole history (`privacy_report`, `data_flows`, `byte_totals`,
`write_metrics`) take that JSON form, as medfound.fed.contribution and the benchmarks read it.

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

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfound.fed.protocol import NUM_EXAMPLES
from medfound.fed.settings import FedSettings
from medfound.fed.strategies import dp_epsilons, dp_noise_stdev

__all__ = ["EvaluateRecord", "RoundRecord", "TrainRecord", "byte_totals", "data_flows",
           "flat_evaluate", "flat_round", "privacy_report", "round_summary", "weighted_mean",
           "write_metrics"]


def _json_form(record: Any, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A record's fields by name, in their order (`names`: the JSON key of a field named
    otherwise); a field that is None is left out, nested records become their JSON form."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if value is not None:
            out[(names or {}).get(f.name, f.name)] = (value.to_dict() if hasattr(value, "to_dict")
                                                     else value)
    return out


@dataclass(frozen=True)
class TrainRecord:
    """A round's training (``train`` in a round's record): each replying center's metrics, the
    accepted centers, the rejected and failed ones with why, each screened update's L2 norm,
    the strategy's aggregated metrics, the phases' seconds (``timing``) and, under SecAgg+,
    ``secagg`` {halted_at, contributed, mean_update_norm}."""

    centers: dict[str, dict[str, float]]
    accepted: list[str]
    rejected: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    update_norms: dict[str, float] = field(default_factory=dict)
    aggregate: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] | None = None
    secagg: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _json_form(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainRecord:
        return cls(centers=d["centers"], accepted=d["accepted"], rejected=d["rejected"],
                   failed=d["failed"], update_norms=d.get("update_norms", {}),
                   aggregate=d.get("aggregate", {}), timing=d.get("timing"),
                   secagg=d.get("secagg"))


@dataclass(frozen=True)
class EvaluateRecord:
    """The scores of a round's model (``evaluate`` in a round's record): their case-weighted
    mean over the centers (``global``), each center's, the centers that gave none; ``skipped``
    (fed.evaluate_every), ``pending`` (the scores come with the next round's replies),
    ``in_round`` (the round whose replies carried them) and the replies refused on the way."""

    global_scores: dict[str, float] = field(default_factory=dict)
    centers: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: bool | None = None
    pending: bool | None = None
    in_round: int | None = None
    rejected: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _json_form(self, {"global_scores": "global"})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluateRecord:
        return cls(global_scores=d["global"], centers=d["centers"], failed=d["failed"],
                   skipped=d.get("skipped"), pending=d.get("pending"),
                   in_round=d.get("in_round"), rejected=d.get("rejected"))


@dataclass(frozen=True)
class RoundRecord:
    """One round of FED/metrics.json's ``rounds`` (the module docstring); ``aggregated``:
    whether the round's updates made a new model (else the previous one was kept)."""

    round: int
    started_at: float
    duration_s: float
    train_s: float
    participation: dict[str, Any]
    aggregated: bool
    train: TrainRecord
    evaluate: EvaluateRecord
    bytes: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return _json_form(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        """A record from its JSON form (a checkpoint's ``history``)."""
        return cls(round=d["round"], started_at=d["started_at"], duration_s=d["duration_s"],
                   train_s=d["train_s"], participation=d["participation"],
                   aggregated=d["aggregated"], train=TrainRecord.from_dict(d["train"]),
                   evaluate=EvaluateRecord.from_dict(d["evaluate"]), bytes=d["bytes"])


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


def flat_round(record: RoundRecord) -> dict[str, float]:
    """One round's numbers as MLflow metrics (logged with step = round)."""
    train, taking = record.train, record.participation
    flat = {"round_duration_s": record.duration_s,
            "updates_accepted": len(train.accepted),
            "updates_rejected": len(train.rejected),
            "centers_failed": len(train.failed),
            "centers_sampled": len(taking["sampled"]),
            "centers_late": len(taking["late"])}
    flat.update({f"aggregate/{k}": v for k, v in train.aggregate.items()})
    for center, metrics in train.centers.items():
        flat.update({f"{center}/{k}": v for k, v in metrics.items() if k != NUM_EXAMPLES})
    for center, b in record.bytes.items():
        flat[f"{center}/bytes_sent"] = b["sent"]
        flat[f"{center}/bytes_received"] = b["received"]
    return {**_finite(flat), **flat_evaluate(record.evaluate)}


def flat_evaluate(evaluate: EvaluateRecord) -> dict[str, float]:
    """A round model's scores as MLflow metrics (step = that round, whenever they arrive)."""
    flat = {f"global/{k}": v for k, v in evaluate.global_scores.items()}
    for center, metrics in evaluate.centers.items():
        flat.update({f"{center}/val/{k}": v for k, v in metrics.items()})
    return _finite(flat)


def _finite(flat: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def round_summary(record: RoundRecord, rounds: int, scored: RoundRecord | None = None) -> str:
    """One line per round; `scored`: the earlier round whose model this round's centers scored."""
    train = record.train
    parts = [f"round {record.round}/{rounds}",
             f"{len(train.accepted)} updates accepted, {len(train.rejected)} rejected, "
             f"{len(train.failed)} failed" + ("" if record.aggregated else " (model kept)")]
    taking = record.participation
    if len(taking["sampled"]) < taking["connected"] or taking["late"]:
        parts.append(f"{len(taking['sampled'])} of {taking['connected']} centers drawn, "
                     f"{len(taking['late'])} late")
    if "train/loss" in train.aggregate:
        parts.append(f"train/loss {train.aggregate['train/loss']:.4g}")
    for r in ([scored] if scored is not None else []) + [record]:
        glob, which = r.evaluate.global_scores, ("global" if r is record else
                                                 f"round-{r.round} model")
        if "cpm" in glob:
            parts.append(f"{which} CPM {glob['cpm']:.3f}")
        if "reconstruction" in glob:
            parts.append(f"{which} reconstruction {glob['reconstruction']:.4f}")
    parts.append(f"{record.duration_s:.1f} s")
    return "  ".join(parts)
