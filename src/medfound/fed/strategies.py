"""Aggregation strategies: configs/fed/<name>.yaml → Flower's Message-API strategy.

    fedavg        FedAvg         weighted mean, weights = each center's training case count
    fedprox       FedProx        FedAvg on the coordinator; centers add μ/2·‖w − w_global‖²
                                 to their loss (`strategy.proximal_mu`)
    fedadam       FedAdam        server-side Adam on the averaged update (eta, beta_1, beta_2, tau)
    fedyogi       FedYogi        server-side Yogi, same keys
    fedmedian     FedMedian      coordinate-wise median (robust; unweighted by definition)
    trimmed_mean  FedTrimmedAvg  coordinate-wise mean without the `beta` share at each tail
    krum          Krum           the one update closest to the others (`num_malicious_nodes`)

Differential privacy (``fed.privacy.dp``) wraps any of them in Flower's fixed-clipping
wrapper: ``client`` — each center clips its update (w_center − w_global) to L2 norm
``clipping_norm`` before it leaves (`flwr.clientapp.mod.fixedclipping_mod`, see
medfound.fed.client_app); ``server`` — the coordinator clips each update it receives. Both add
Gaussian noise of std ``noise_multiplier × clipping_norm / centers`` to the aggregate.

The server optimizers (FedAdam, FedYogi) step on the trained weights only. A network's running
statistics (BatchNorm's running mean and variance, `statistics=` in `build_strategy`) are
not gradients' results: Adam's step of about ``eta`` per round would leave them near their
initial 0 and 1 whatever the centers measured, and the global model would normalise with the
wrong statistics. They take the case-weighted mean, as in FedAvg. Every array keeps the dtype
the centers sent.

FedAdam did not learn the detector of the FLamby benchmark (benchmarks/flamby.py: 15 rounds of
20 local AdamW epochs) in any of three settings: eta 0.01 / tau 1e-3 (the defaults, Reddi et
al.'s), eta 0.1 / tau 1e-3 (Flower's eta; stopped after 10 rounds) and eta 0.1 / tau 0.02 (tau
at the scale of a round's update, 0.02 rms per weight). Each stayed at CPM 0, the centers'
training classification loss near the class prior (0.67-0.76; FedAvg's: 0.34). With eta 0.1 /
tau 0.02 the global prediction convs ended twice as noisy as FedAvg's (weight std 0.056 against
0.028). A likely reading, untested: Adam's per-weight normalisation gives a weight whose
updates only wander across rounds a step as large as one that moves steadily.

Per parameter group (``group_by_modality``, used by federated pretraining of the multi-modal
foundation encoder, medfound.models.foundation): FedAvg, FedProx, FedAdam and FedYogi average each
modality's stem (the weights under ``stems.<m>.``) only among the centers that trained it,
weighted by each one's volume count of that modality (the ``volumes/<m>`` metric of its
reply), and the shared weights among all, weighted by ``num-examples``. A center without a
modality never updates that stem, so its unchanged copy would only drag the average back.
The coordinate-wise robust strategies have no per-group form and are refused.

Every strategy samples all connected centers and needs at least ``fed.min_centers``. The
server optimizers' moments are the strategy's state: `strategy_state` / `restore_strategy_state`
put them in (and take them from) the coordinator's per-round checkpoint, so a resumed run
continues with the same moments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from medfound.errors import MedfoundError
from medfound.fed.protocol import NUM_EXAMPLES

__all__ = ["GROUP_WEIGHT_PREFIX", "MEAN_STRATEGIES", "aggregate_by_group", "build_strategy", "dp_noise_stdev", "group_of",
           "restore_strategy_state", "running_statistics", "strategy_state", "with_privacy"]

GROUP_WEIGHT_PREFIX = "volumes/"  # a reply's metric "volumes/<group>": its weight for that group

# name → (Flower class, {config key: default}) — the keys a configs/fed/<name>.yaml may set.
_STRATEGIES: dict[str, tuple[type, dict[str, Any]]] = {
    "fedavg": (flwr_strategy.FedAvg, {}),
    "fedprox": (flwr_strategy.FedProx, {"proximal_mu": 0.01}),
    "fedadam": (flwr_strategy.FedAdam, {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    "fedyogi": (flwr_strategy.FedYogi, {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    "fedmedian": (flwr_strategy.FedMedian, {}),
    "trimmed_mean": (flwr_strategy.FedTrimmedAvg, {"beta": 0.2}),
    "krum": (flwr_strategy.Krum, {"num_malicious_nodes": 0}),
}
# The strategies whose aggregate is the case-weighted mean of the updates (then, for FedAdam
# and FedYogi, a server optimizer's step from it): they have a per-group form, and can average
# from the coordinator's spool (medfound.fed.spool).
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
# Attributes holding a strategy's state between rounds (FedOpt's first and second moments).
_STATE_ATTRS = ("m_t", "v_t")


def group_of(key: str) -> str:
    """Parameter group of a state_dict key: the modality of a foundation-encoder stem weight
    (``[encoder.]stems.<m>.…``, medfound.models.foundation), else "shared"."""
    parts = key.split(".")
    if "stems" in parts[:-1]:
        return parts[parts.index("stems") + 1]
    return "shared"


def aggregate_by_group(records: list[RecordDict], weighted_by_key: str,
                       keys: Iterable[str] | None = None) -> ArrayRecord:
    """Weighted mean of the replies' arrays (or of those under `keys`), one parameter group
    at a time.

    Weights: ``weighted_by_key`` for the "shared" group; ``volumes/<m>`` for modality m's stem,
    among the replies where it is > 0 (if none is, all replies count equally: none of them
    changed that stem). Sums in float64; each result keeps the dtype of the replies' arrays.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    arrays = [next(iter(r.array_records.values())) for r in records]
    wanted = None if keys is None else set(keys)
    out: dict[str, Array] = {}
    for key in arrays[0].keys():
        if wanted is not None and key not in wanted:
            continue
        group = group_of(key)
        name = weighted_by_key if group == "shared" else GROUP_WEIGHT_PREFIX + group
        weights = np.array([float(m.get(name, 0.0) or 0.0) for m in metrics])
        if weights.sum() <= 0:
            weights = np.ones(len(records))
        weights = weights / weights.sum()
        values = [a[key].numpy() for a in arrays]
        total = sum(w * v.astype(np.float64) for w, v in zip(weights, values, strict=True) if w > 0)
        out[key] = Array(np.ascontiguousarray(total, dtype=values[0].dtype))
    return ArrayRecord(out)


class _GroupedFedAvg(flwr_strategy.FedAvg):
    """FedAvg's aggregation, per parameter group (`aggregate_by_group`); metrics as FedAvg."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        return (aggregate_by_group(contents, self.weighted_by_key),
                self.train_metrics_aggr_fn(contents, self.weighted_by_key))


def _grouped(cls: type) -> type:
    """`cls` with FedAvg's aggregation replaced by the per-group one (FedOpt's server
    optimizers then step on the per-group average)."""
    if cls is flwr_strategy.FedAvg:
        return _GroupedFedAvg
    return type(f"Grouped{cls.__name__}", (cls, _GroupedFedAvg), {})


class _StatisticsAveraged:
    """Mixin for Flower's FedOpt strategies: the server optimizer's step for the trained
    weights; for the keys in `statistics`, the case-weighted mean (per parameter group, as the
    strategy averages: `aggregate_by_group`); every array in the dtype the centers sent."""

    statistics: frozenset[str] = frozenset()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        contents = [m.content for m in replies if m.has_content()]
        if not contents:
            return super().aggregate_train(server_round, replies)
        means = (aggregate_by_group(contents, self.weighted_by_key, keys=self.statistics)
                 if self.statistics else ArrayRecord())
        dtypes = {k: a.numpy().dtype for k, a in next(iter(contents[0].array_records.values())).items()}
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        return ArrayRecord({
            key: means[key] if key in means
            else Array(np.ascontiguousarray(value.numpy(), dtype=dtypes[key]))
            for key, value in arrays.items()}), metrics


def _statistics_averaged(cls: type) -> type:
    """`cls` (a FedOpt subclass) with `_StatisticsAveraged` in front."""
    return type(cls.__name__, (_StatisticsAveraged, cls), {})


def build_strategy(spec: Mapping[str, Any], min_centers: int, group_by_modality: bool = False,
                   statistics: Iterable[str] = ()) -> flwr_strategy.Strategy:
    """The Flower strategy for a `fed.strategy` mapping ({"name": ..., its keys}).

    `group_by_modality`: aggregate per parameter group (module docstring). `statistics`: the
    state_dict keys of running statistics (`running_statistics`), which a server optimizer
    averages instead of stepping on."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in _STRATEGIES:
        raise MedfoundError(f"config key 'fed.strategy.name' = {name!r} is not a known strategy",
                            hint=f"choose fed=<one of {', '.join(_STRATEGIES)}>")
    cls, defaults = _STRATEGIES[name]
    unknown = sorted(set(spec) - set(defaults))
    if unknown:
        raise MedfoundError(f"fed.strategy ({name}): unknown key(s) {unknown}",
                            hint=f"valid keys are {sorted(defaults) or 'none'}")
    params = {**defaults, **spec}
    for key, value in params.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise MedfoundError(f"config key 'fed.strategy.{key}' = {value!r}: must be a number >= 0")
    if name == "trimmed_mean" and not params["beta"] < 0.5:
        raise MedfoundError(f"config key 'fed.strategy.beta' = {params['beta']!r}: must be < 0.5")
    if name == "krum":
        params["num_malicious_nodes"] = int(params["num_malicious_nodes"])
    if group_by_modality:
        if name not in MEAN_STRATEGIES:
            raise MedfoundError(f"fed={name} cannot aggregate per modality group (task=pretrain)",
                                hint=f"use fed=<one of {', '.join(MEAN_STRATEGIES)}>")
        cls = _grouped(cls)
    if issubclass(cls, FedOpt):
        cls = _statistics_averaged(cls)
    strategy = cls(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_centers,
                   min_evaluate_nodes=min_centers, min_available_nodes=min_centers,
                   weighted_by_key=NUM_EXAMPLES, **params)
    if isinstance(strategy, _StatisticsAveraged):
        strategy.statistics = frozenset(statistics)
    return strategy


def running_statistics(network: torch.nn.Module) -> list[str]:
    """The state_dict keys of `network`'s floating-point buffers: running statistics (BatchNorm's
    running mean and variance), which travel with the weights but are not trained."""
    return [name for name, buffer in network.named_buffers() if buffer.is_floating_point()]


def with_privacy(strategy: flwr_strategy.Strategy, privacy: Mapping[str, Any],
                 num_centers: int) -> flwr_strategy.Strategy:
    """`strategy` wrapped in Flower's client- or server-side fixed-clipping DP (or as it is)."""
    wrappers = {"client": flwr_strategy.DifferentialPrivacyClientSideFixedClipping,
                "server": flwr_strategy.DifferentialPrivacyServerSideFixedClipping}
    mode = privacy.get("dp")
    if mode is None:
        return strategy
    return wrappers[mode](strategy, noise_multiplier=float(privacy["noise_multiplier"]),
                          clipping_norm=float(privacy["clipping_norm"]),
                          num_sampled_clients=num_centers)


def dp_noise_stdev(privacy: Mapping[str, Any], num_centers: int) -> float | None:
    """Std of the Gaussian noise added to each aggregate (None without DP)."""
    if privacy.get("dp") is None:
        return None
    from flwr.supercore.differential_privacy import compute_stdv

    return float(compute_stdv(float(privacy["noise_multiplier"]), float(privacy["clipping_norm"]),
                              num_centers))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The tight ε of a mechanism that is μ-GDP (a composition of Gaussian mechanisms: μ is the
    root sum of squares of each one's sensitivity / noise std) at `delta`, by bisection on
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Dong, Roth & Su 2019, Cor. 2.13; Balle & Wang 2018).
    0 for μ = 0; inf when no finite ε reaches `delta`."""
    if mu <= 0:
        return 0.0

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2.0))

    def delta_of(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, 2 * hi
        if hi > 500:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def dp_epsilons(privacy: Mapping[str, Any], num_centers: int, rounds: Sequence[Mapping[str, float]],
                delta: float) -> dict[str, float] | None:
    """Center-level (ε, δ) of a run with fed.privacy.dp, per center: `rounds` holds, per
    completed round, each accepted center's aggregation weight (its share of the round's
    examples; 1.0 for a bound that holds whatever the weights). A center's clipped update
    (norm ≤ C) moves the weighted aggregate by at most w·C and the aggregate gets Gaussian noise
    of std σ·C/num_centers, so each round is a Gaussian mechanism with μ = w·num_centers/σ;
    rounds compose as μ-GDP. None without DP; inf with zero noise."""
    if privacy.get("dp") is None:
        return None
    sigma = float(privacy["noise_multiplier"])
    centers = sorted({c for r in rounds for c in r})
    if sigma == 0:
        return {c: math.inf for c in centers}
    return {c: gaussian_epsilon(math.sqrt(sum((r.get(c, 0.0) * num_centers / sigma) ** 2 for r in rounds)), delta)
            for c in centers}


def _inner(strategy: flwr_strategy.Strategy) -> flwr_strategy.Strategy:
    """The aggregation strategy inside a DP wrapper (which holds no state of its own)."""
    return getattr(strategy, "strategy", strategy)


def strategy_state(strategy: flwr_strategy.Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """The strategy's between-round state as tensors (empty for stateless strategies)."""
    strategy = _inner(strategy)
    state = {}
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if value:
            state[attr] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
    return state


def restore_strategy_state(strategy: flwr_strategy.Strategy,
                           state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Inverse of `strategy_state`."""
    strategy = _inner(strategy)
    for attr, arrays in state.items():
        if attr not in _STATE_ATTRS or not hasattr(strategy, attr):
            raise MedfoundError(f"the coordinator checkpoint holds '{attr}' state, which the "
                                f"{type(strategy).__name__} strategy does not have",
                                hint="resume with the strategy the run started with (fed=...)")
        setattr(strategy, attr, {k: v.numpy() for k, v in arrays.items()})
