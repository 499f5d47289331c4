"""What each center contributed to a federation: ``FED/contribution.json`` and its plot.

Bookkeeping, from the coordinator's own records (every run): each center's training cases
(the coordinator's record, as it weighs the aggregate), the rounds it took part in (sent a
reply), the rounds it was connected in, drawn for (medfound.fed.participation) and late in
(drawn, no reply before the round's deadline), its accepted and rejected updates (screening, and every reply the ReplyGate
refused), the bytes it sent and was sent.

Effect on the global model (``fed.contribution=true``): leave-one-out over the recorded
updates of the last round. The final model is the aggregate of the last round's accepted
updates; without center c it would have been the case-weighted mean of the others. With w̄
that round's mean and N its accepted cases, the difference is

    D_c = n_c / (N − n_c) · (w_c − w̄)        (c alone in the round: D_c = w̄ − w_prev)

so the final model without c is w − D_c (`LeaveOneOut`): exactly the FedAvg of the other
centers' last updates for FedAvg and FedProx; for the adaptive and robust strategies it removes
c's FedAvg share, an approximation. Summing the shares over every round instead was measured and
does not work: later updates were computed from models the earlier shares had shaped, and
removing them all leaves the training trajectory (on phantoms, every such model ranked
nodules near chance, anchor_auc 0.37–0.66 against the global model's 0.95–0.98). Cost: one
accumulator the size of the exchanged weights per center on the coordinator (in memory and in
``server/state.pt``), no extra training, and n extra models in the cross-site exchange, each
scored by every center on its own validation split (CPM and FROC, and two scores that move before the CPM does: the
detection loss and ``anchor_auc``, how well the classifier ranks the anchors on its
validation nodules above the background, on whole validation studies;
medfound.train.detection.validation_scores). Nothing new leaves a center: it returns scores,
as it does every round. A center that sent no accepted update in the last round has no
leave-one-out model.

Privacy: a leave-one-out model reveals the left-out center's share of the updates to every
center that scores it (with the global model, it is c's deviation from the mean), so
``fed.contribution=true`` needs ``fed.share_local_models=true``, the operator's agreement that
centers may see each other's updates (refused under DP and SecAgg+, where the coordinator
does not have the individual updates to remove anyway).

A center's effect on a metric: the metric of the global model minus that of the model without
it, case-weighted over the centers that score it other than itself (``effect``: what it
brought the others; ``effect_incl_own`` counts its own validation data too). For the loss,
lower is better, so the effect is reported as the decrease (positive: the center helped).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medfound.outputs import atomic_write

__all__ = ["CONTRIBUTION_FILE", "LeaveOneOut", "contribution_report", "plot_contribution",
           "without_name", "write_contribution"]

CONTRIBUTION_FILE = "contribution.json"
LOWER_IS_BETTER = ("loss",)  # metrics whose decrease is an improvement (and any "loss/…")
RANKED = ("anchor_auc", "loss", "cpm")  # the metrics `lowest` names a center for


def without_name(center: str) -> str:
    """The cross-site row of the model without `center`'s updates."""
    return f"without:{center}"


class LeaveOneOut:
    """Per center, D_c: how far its share of the last round's aggregate moved the global
    model; ``rounds``: the rounds whose aggregate each center had a share in."""

    def __init__(self) -> None:
        self.shift: dict[str, dict[str, np.ndarray]] = {}
        self.rounds: dict[str, list[int]] = {}

    def add_round(self, rnd: int, cases: Mapping[str, float],
                  load: Callable[[str], Mapping[str, np.ndarray]],
                  previous: Mapping[str, np.ndarray]) -> None:
        """One round's accepted updates: `cases` {center: its weight}, `load(center)` its
        weights (called twice per center, so that one update at a time is in memory), sent
        from `previous`."""
        if not cases:
            return
        total = float(sum(cases.values()))
        sums: dict[str, np.ndarray] = {}
        for center, n in cases.items():
            for k, v in load(center).items():
                sums[k] = sums.get(k, 0.0) + float(n) * np.asarray(v, np.float64)
        mean = {k: v / total for k, v in sums.items()}
        self.shift = {}  # only the last aggregated round's shares count (module docstring)
        for center, n in cases.items():
            acc = self.shift.setdefault(center, {})
            for k, v in load(center).items():
                if total - n > 0:
                    step = float(n) / (total - float(n)) * (np.asarray(v, np.float64) - mean[k])
                else:  # alone this round: without it the round would have kept the model
                    step = mean[k] - np.asarray(previous[k], np.float64)
                acc[k] = acc.get(k, 0.0) + step
            self.rounds.setdefault(center, []).append(int(rnd))

    def models(self, final: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """{without:<center>: the final weights less that center's shares}, in float32.
        BatchNorm running variances travel with the weights and are floored at 1e-5: less a
        center's share, one can fall below 0."""
        out = {}
        for c, shift in sorted(self.shift.items()):
            model = {k: (v - shift[k]).astype(np.float32) if k in shift
                     else np.asarray(v, np.float32) for k, v in final.items()}
            for k, v in model.items():
                if k.endswith("running_var"):
                    np.maximum(v, 1e-5, out=v)
            out[without_name(c)] = model
        return out

    def state(self) -> dict[str, Any]:
        return {"shift": {c: {k: np.asarray(v, np.float64) for k, v in s.items()}
                          for c, s in self.shift.items()}, "rounds": dict(self.rounds)}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self.shift = {c: {k: np.asarray(v, np.float64) for k, v in s.items()}
                      for c, s in (state.get("shift") or {}).items()}
        self.rounds = {c: list(r) for c, r in (state.get("rounds") or {}).items()}


def contribution_report(history: list[dict[str, Any]], centers: Iterable[str],
                        cases: Mapping[str, int], rejected: Iterable[Mapping[str, Any]],
                        bytes_per_center: Mapping[str, Mapping[str, int]],
                        cross_site: Mapping[str, Any] | None, measured: bool,
                        strategy: str) -> dict[str, Any]:
    """FED/contribution.json's content (module docstring)."""
    centers = list(centers)
    refused = list(rejected)
    per: dict[str, Any] = {}
    for c in centers:
        took_part = [r["round"] for r in history if c in r["train"]["centers"]
                     or any(f.get("center") == c for f in r["train"]["rejected"])]
        accepted = [r["round"] for r in history if c in r["train"]["accepted"]]
        screened_out = [{"round": r["round"], "reason": f["reason"]} for r in history
                        for f in r["train"]["rejected"] if f.get("center") == c]
        failed = [{"round": r["round"], "reason": f["reason"]} for r in history
                  for f in r["train"]["failed"] if f.get("center") == c]
        drawn = {k: [r["round"] for r in history if c in r.get("participation", {}).get(k, ())]
                 for k in ("available", "sampled", "late")}
        per[c] = {"cases": int(cases.get(c, 0)), "rounds": sorted(set(took_part)),
                  "connected_rounds": drawn["available"], "sampled_rounds": drawn["sampled"],
                  "late_rounds": drawn["late"],
                  "accepted_updates": len(accepted), "accepted_rounds": accepted,
                  "rejected_updates": len(screened_out), "rejected": screened_out,
                  "refused_replies": sum(1 for i in refused if i.get("center") == c),
                  "failed": failed,
                  "bytes": dict(bytes_per_center.get(c, {"sent": 0, "received": 0}))}
    doc: dict[str, Any] = {"format": "medfound-contribution/1", "rounds": len(history),
                           "centers": per}
    if not measured or cross_site is None:
        doc["effect"] = None
        doc["method"] = ("not measured: set fed.contribution=true (it needs "
                         "fed.share_local_models=true and fed.cross_site=true)")
        return doc
    models = cross_site["models"]
    glob = models.get("global", {})
    effects: dict[str, Any] = {}
    for c in centers:
        row = models.get(without_name(c))
        if row is None:
            continue
        effects[c] = {"on_others": _effects(glob, row, exclude=c),
                      "incl_own": _effects(glob, row, exclude=None),
                      "by_center": {e: _delta(glob.get(e, {}), m) for e, m in sorted(row.items())}}
        per[c]["effect"] = effects[c]["on_others"]
        per[c]["effect_incl_own"] = effects[c]["incl_own"]
    n = len(centers)
    doc["method"] = {
        "name": "leave-one-out over the recorded updates of the last round",
        "model_without_c": "w − n_c/(N − n_c)·(w_c − w̄): the case-weighted mean of the other "
                           "centers' last-round updates (no re-training)",
        "exact_for": "fedavg, fedprox; other strategies: c's FedAvg share removed, an "
                     f"approximation (this run: {strategy})",
        "scored_on": "each center's own validation split, in the cross-site exchange after "
                     "the last round; 'effect' averages over the centers other than c "
                     "(case-weighted), 'effect_incl_own' over all",
        "sign": "metric of the global model minus the model without c (for losses, the "
                "decrease): positive means c helped",
        "cost": {"models_scored": n + 1, "evaluations": (n + 1) * n,
                 "extra_training": 0, "coordinator_memory": f"{n} accumulators of the "
                 "exchanged weights (float64)", "extra_exchanges": 0},
    }
    ranking = {m: sorted((c for c in effects if m in effects[c]["on_others"]),
                         key=lambda c: effects[c]["on_others"][m]) for m in RANKED}
    # The center whose effect is lowest, per metric (none where every center's is the same).
    doc["lowest"] = {m: r[0] for m, r in ranking.items()
                     if r and effects[r[0]]["on_others"][m] < effects[r[-1]]["on_others"][m]}
    return doc


def _delta(glob: Mapping[str, float], without: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for k, v in without.items():
        if k in ("num-examples", "n_nodules") or k not in glob:
            continue
        d = float(glob[k]) - float(v)
        out[k] = -d if _lower_is_better(k) else d
    return out


def _lower_is_better(metric: str) -> bool:
    return metric.split("/")[0] in LOWER_IS_BETTER


def _effects(glob: Mapping[str, Mapping[str, float]], row: Mapping[str, Mapping[str, float]],
             exclude: str | None) -> dict[str, float]:
    """Case-weighted mean over the scoring centers (less `exclude`) of each metric's effect."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for e, metrics in row.items():
        if e == exclude or e not in glob:
            continue
        w = float(metrics.get("num-examples", 1.0))
        for k, d in _delta(glob[e], metrics).items():
            sums[k] = sums.get(k, 0.0) + w * d
            weights[k] = weights.get(k, 0.0) + w
    return {k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0}


def write_contribution(out: Path, doc: Mapping[str, Any]) -> list[Path]:
    """FED/contribution.json and, when the effect was measured, FED/contribution.png."""
    paths = [atomic_write(out / CONTRIBUTION_FILE, json.dumps(doc, indent=2) + "\n")]
    if "lowest" in doc:
        paths.append(plot_contribution(doc, out / "contribution.png"))
    return paths


def plot_contribution(doc: Mapping[str, Any], path: Path) -> Path:
    """Bars per center: cases, accepted/rejected updates, and its effect on each metric."""
    from matplotlib.figure import Figure

    centers = list(doc["centers"])
    per = doc["centers"]
    metrics = [m for m in RANKED if any(m in per[c].get("effect", {}) for c in centers)]
    fig = Figure(figsize=(3.2 * (2 + len(metrics)), 3.0), dpi=110)
    x = np.arange(len(centers))
    ax = fig.add_subplot(1, 2 + len(metrics), 1)
    ax.bar(x, [per[c]["cases"] for c in centers], color="#4c72b0")
    ax.set_title("training cases", fontsize=9)
    ax = fig.add_subplot(1, 2 + len(metrics), 2)
    ax.bar(x - 0.2, [per[c]["accepted_updates"] for c in centers], 0.4, label="accepted")
    ax.bar(x + 0.2, [per[c]["rejected_updates"] + per[c]["refused_replies"] for c in centers],
           0.4, label="rejected", color="#c44e52")
    ax.set_title("updates", fontsize=9)
    ax.legend(fontsize=7)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(1, 2 + len(metrics), 3 + i)
        values = [per[c].get("effect", {}).get(m, np.nan) for c in centers]
        ax.bar(x, values, color=["#55a868" if v >= 0 else "#c44e52" for v in np.nan_to_num(values)])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"effect on {m}" + (" (decrease)" if _lower_is_better(m) else ""), fontsize=9)
    for a in fig.axes:
        a.set_xticks(x, labels=centers, rotation=30, fontsize=7)
    fig.suptitle("what each center contributed (leave-one-out on the others' validation data)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
