"""What the coordinator does with the centers' updates: screening, then Flower's strategies.

Hand-made replies (real Flower messages and records) with numbers simple enough to check by
hand; every strategy is Flower's own Message-API implementation, built from configs/fed/.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from medfound.errors import MedfoundError
from medfound.fed.params import decode_arrays, encode_arrays
from medfound.fed.reporting import weighted_mean
from medfound.fed.screening import screen_updates
from medfound.fed.settings import FedSettings
from medfound.fed.strategies import (
    build_strategy,
    dp_epsilons,
    gaussian_epsilon,
    restore_strategy_state,
    strategy_state,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPES = {"conv.weight": (2, 3), "conv.bias": (2,)}
GLOBAL = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def reply(center: str, value: float | dict[str, np.ndarray], cases: int = 1, node: int = 0,
          dtype: str = "float32", loss: float = 0.5) -> Message:
    """A center's training reply whose arrays are all `value` (or the given arrays)."""
    arrays = value if isinstance(value, dict) else {k: np.full(s, value) for k, s in SHAPES.items()}
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v, dtype=dtype)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": cases, "train/loss": loss}),
        "center": ConfigRecord({"name": center})})
    return Message(content, metadata=_metadata(node or hash(center) % 1000 + 1))


def error_reply(node: int, reason: str) -> Message:
    return Message(Error(code=2, reason=reason), metadata=_metadata(node))


def _metadata(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"i{node}", group_id="", created_at=0.0, ttl=60.0,
                    message_type=MessageType.TRAIN)


def strategy(name: str, **keys):
    spec = yaml.safe_load((CONFIGS / "fed" / f"{name}.yaml").read_text())["strategy"]
    return build_strategy({**spec, **keys}, min_centers=2)


def aggregate(strat, replies: list[Message], rnd: int = 1) -> dict[str, np.ndarray]:
    screened = screen_updates(replies, GLOBAL, transfer_dtype="float32", norm_factor=None)
    arrays, _ = strat.aggregate_train(rnd, screened.accepted)
    return decode_arrays(arrays)


# --- weighting and the strategies' numbers ----------------------------------------------------


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_weight_each_center_by_its_case_count(name: str) -> None:
    out = aggregate(strategy(name), [reply("a", 1.0, cases=1), reply("b", 2.0, cases=1),
                                     reply("c", 4.0, cases=2)])
    for value in out.values():
        np.testing.assert_allclose(value, (1 * 1 + 1 * 2 + 2 * 4) / 4)


def test_fedprox_sends_its_mu_to_the_centers() -> None:
    assert strategy("fedprox", proximal_mu=0.25).proximal_mu == 0.25


def test_fedadam_and_fedyogi_take_a_server_optimizer_step_on_the_mean_update() -> None:
    spec = yaml.safe_load((CONFIGS / "fed" / "fedadam.yaml").read_text())["strategy"]
    eta, b1, b2, tau = spec["eta"], spec["beta_1"], spec["beta_2"], spec["tau"]
    replies = [reply("a", 1.0, cases=1), reply("b", 3.0, cases=3)]
    delta = (1 * 1 + 3 * 3) / 4  # the case-weighted mean, minus the global weights (0)
    m, v = (1 - b1) * delta, (1 - b2) * delta**2

    adam = strategy("fedadam")
    adam.current_arrays = dict(GLOBAL)  # what configure_train records when it sends the weights
    out = aggregate(adam, replies)
    eta_norm = eta * np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2)  # bias correction at round 1
    np.testing.assert_allclose(out["conv.bias"], eta_norm * m / (np.sqrt(v) + tau), rtol=1e-5)

    yogi = strategy("fedyogi")
    yogi.current_arrays = dict(GLOBAL)
    out = aggregate(yogi, [reply("a", 1.0, cases=1), reply("b", 3.0, cases=3)])
    np.testing.assert_allclose(out["conv.bias"], eta * m / (np.sqrt(v) + tau), rtol=1e-5)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimizers_average_running_statistics_instead_of_stepping_on_them(name: str) -> None:
    """BatchNorm's running variance measured at the centers (here 4 and 8, case-weighted 7)
    becomes the global one; Adam's step of about eta would have left it near its start."""
    shapes = {**SHAPES, "bn.running_var": (2,)}
    start = {k: np.ones(s, dtype=np.float32) for k, s in shapes.items()}
    s = build_strategy({"name": name}, min_centers=2, statistics=["bn.running_var"])
    s.current_arrays = dict(start)
    replies = [reply("a", {k: np.full(v, 4.0) for k, v in shapes.items()}, cases=1),
               reply("b", {k: np.full(v, 8.0) for k, v in shapes.items()}, cases=3)]
    arrays, _ = s.aggregate_train(1, screen_updates(replies, start, transfer_dtype="float32",
                                                    norm_factor=None).accepted)
    out = {k: a.numpy() for k, a in arrays.items()}
    np.testing.assert_allclose(out["bn.running_var"], 7.0)
    assert np.all(out["conv.weight"] < 1.1)  # the trained weights took one server-optimizer step
    assert {a.dtype for a in out.values()} == {np.dtype(np.float32)}


def test_server_optimizer_state_survives_a_checkpoint_round_trip() -> None:
    def two_rounds(resume_between: bool) -> dict[str, np.ndarray]:
        s = strategy("fedadam")
        s.current_arrays = dict(GLOBAL)
        first = aggregate(s, [reply("a", 1.0), reply("b", 2.0)], rnd=1)
        if resume_between:  # a new coordinator process, restored from the checkpoint
            state = strategy_state(s)
            s = strategy("fedadam")
            restore_strategy_state(s, state)
        s.current_arrays = first
        return aggregate(s, [reply("a", 0.5), reply("b", 1.5)], rnd=2)

    straight, resumed = two_rounds(False), two_rounds(True)
    for key in SHAPES:
        np.testing.assert_array_equal(straight[key], resumed[key])
    assert strategy_state(strategy("fedavg")) == {}


def test_robust_strategies_ignore_a_wild_update() -> None:
    def replies() -> list[Message]:  # fresh ones each time: Flower's robust strategies consume them
        honest = [reply("a", 1.0), reply("b", 1.2), reply("c", 0.9), reply("d", 1.1)]
        return [*honest, reply("e", 1000.0, cases=50)]  # many cases buy a wild update no say

    median = aggregate(strategy("fedmedian"), replies())
    np.testing.assert_allclose(median["conv.weight"], 1.1)
    trimmed = aggregate(strategy("trimmed_mean"), replies())  # beta 0.2: 1 of 5 at each tail
    np.testing.assert_allclose(trimmed["conv.weight"], (1.0 + 1.1 + 1.2) / 3, rtol=1e-6)
    krum = aggregate(strategy("krum", num_malicious_nodes=1), replies())
    assert 0.9 <= float(krum["conv.weight"].max()) <= 1.2
    fedavg = aggregate(strategy("fedavg"), replies())
    assert float(fedavg["conv.weight"].max()) > 500  # what the robust ones protect against


# --- screening: bad updates are rejected and reported, not aggregated ----------------------------


def test_nan_wrong_shape_wrong_dtype_and_missing_arrays_are_rejected_with_a_reason() -> None:
    nan = {k: np.full(s, np.nan) for k, s in SHAPES.items()}
    reshaped = {"conv.weight": np.ones((3, 2)), "conv.bias": np.ones(2)}
    missing = {"conv.weight": np.ones((2, 3))}
    replies = [reply("good_1", 1.0), reply("good_2", 1.5), reply("nan", nan),
               reply("shape", reshaped), reply("dtype", 1.0, dtype="float64"),
               reply("missing", missing), reply("bad_loss", 1.0, loss=float("inf")),
               error_reply(77, "train failed at center x: MedfoundError")]
    screened = screen_updates(replies, GLOBAL, transfer_dtype="float32", norm_factor=10.0)

    assert [m.content["center"]["name"] for m in screened.accepted] == ["good_1", "good_2"]
    reasons = {r["center"]: r["reason"] for r in screened.rejected}
    assert set(reasons) == {"nan", "shape", "dtype", "missing", "bad_loss"}
    assert "NaN" in reasons["nan"]
    assert "shape (3, 2)" in reasons["shape"] and "expected (2, 3)" in reasons["shape"]
    assert "float64" in reasons["dtype"]
    assert "missing conv.bias" in reasons["missing"]
    assert "train/loss" in reasons["bad_loss"]
    assert screened.failed == [{"center": "node-77",
                                "reason": "train failed at center x: MedfoundError"}]


def test_an_update_far_larger_than_the_others_is_rejected() -> None:
    replies = [reply("a", 0.1), reply("b", 0.12), reply("c", 0.09), reply("big", 5.0)]
    screened = screen_updates(replies, GLOBAL, transfer_dtype="float32", norm_factor=10.0)
    assert [r["center"] for r in screened.rejected] == ["big"]
    assert "median" in screened.rejected[0]["reason"]
    assert sorted(screened.update_norms) == ["a", "b", "big", "c"]
    out, _ = strategy("fedavg").aggregate_train(1, screened.accepted)
    assert float(decode_arrays(out)["conv.bias"].max()) < 0.2
    # Switched off, the same update is aggregated.
    screened = screen_updates(replies, GLOBAL, transfer_dtype="float32", norm_factor=None)
    assert len(screened.accepted) == 4


def test_float16_updates_are_aggregated_in_float32_in_center_order() -> None:
    replies = [reply("b", 1.0 / 3, dtype="float16"), reply("a", 2.0 / 3, dtype="float16")]
    screened = screen_updates(replies, GLOBAL, transfer_dtype="float16", norm_factor=None)
    assert [m.content["center"]["name"] for m in screened.accepted] == ["a", "b"]
    assert all(a.dtype == "float32" for m in screened.accepted for a in m.content["arrays"].values())
    # A float32 reply where float16 was sent is a wrong dtype.
    screened = screen_updates([reply("a", 1.0), reply("b", 1.0)], GLOBAL,
                              transfer_dtype="float16", norm_factor=None)
    assert len(screened.rejected) == 2
    # Sending float16 halves the array bytes.
    full = encode_arrays({"w": np.ones(1000)}, "float32")["w"]
    half = encode_arrays({"w": np.ones(1000)}, "float16")["w"]
    assert len(half.data) < 0.55 * len(full.data)


# --- streaming aggregation (medfound.fed.spool) -----------------------------------------------


def _spooled(replies: list[Message], folder: Path):
    from medfound.fed.spool import UpdateSpool

    spool = UpdateSpool(folder)
    return spool, [spool.take(m) for m in replies]


def test_spooled_screening_rejects_what_in_memory_screening_rejects(tmp_path: Path) -> None:
    def replies() -> list[Message]:
        return [reply("good_1", 1.0), reply("good_2", 1.5), reply("c", 0.9), reply("big", 50.0),
                reply("nan", {k: np.full(s, np.nan) for k, s in SHAPES.items()}),
                reply("shape", {"conv.weight": np.ones((3, 2)), "conv.bias": np.ones(2)}),
                reply("dtype", 1.0, dtype="float64"), error_reply(77, "train failed")]

    memory = screen_updates(replies(), GLOBAL, transfer_dtype="float32", norm_factor=10.0)
    spool, spooled = _spooled(replies(), tmp_path / "spool")
    assert all("arrays" not in m.content.array_records for m in spooled if m.has_content())
    disk = screen_updates(spooled, GLOBAL, transfer_dtype="float32", norm_factor=10.0,
                          spool=spool)
    assert ([m.content["center"]["name"] for m in disk.accepted]
            == [m.content["center"]["name"] for m in memory.accepted] == ["c", "good_1", "good_2"])
    assert disk.rejected == memory.rejected and len(disk.rejected) == 4
    assert disk.failed == memory.failed and disk.update_norms == pytest.approx(memory.update_norms)
    spool.close()
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_spooled_aggregation_gives_flowers_aggregate(name: str, dtype: str, tmp_path: Path) -> None:
    """The array-by-array case-weighted mean from disk, and for FedAdam/FedYogi Flower's step
    from it, equal Flower's aggregation of the replies held in memory."""
    from medfound.fed.spool import aggregate_spooled

    shapes = {**SHAPES, "bn.running_var": (2,)}
    rng = np.random.default_rng(3)
    start = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
    updates = {c: {k: v + rng.normal(0, 0.1, v.shape) for k, v in start.items()}
               for c in ("a", "b", "c")}

    def replies() -> list[Message]:
        return [reply(c, u, cases=n, dtype=dtype, loss=n / 10)
                for (c, u), n in zip(updates.items(), (2, 5, 11), strict=True)]

    def built():
        s = build_strategy({"name": name}, min_centers=2, statistics=["bn.running_var"])
        s.current_arrays = {k: v.copy() for k, v in start.items()}  # as configure_train sets it
        return s

    in_memory = built()
    arrays, metrics = in_memory.aggregate_train(
        2, screen_updates(replies(), start, transfer_dtype=dtype, norm_factor=10.0).accepted)
    spool, spooled = _spooled(replies(), tmp_path / "spool")
    accepted = screen_updates(spooled, start, transfer_dtype=dtype, norm_factor=10.0,
                              spool=spool).accepted
    streamed = built()
    new, aggregate_metrics = aggregate_spooled(streamed, 2, spool, accepted, list(start))
    expected = decode_arrays(arrays)
    assert list(new) == list(start) and {a.dtype for a in new.values()} == {np.dtype(np.float32)}
    for key in start:
        np.testing.assert_allclose(new[key], expected[key], rtol=1e-6, atol=1e-7)
    assert aggregate_metrics == pytest.approx(dict(metrics))
    for attr in ("m_t", "v_t"):  # a server optimizer's moments, as Flower's own run left them
        for key, value in (getattr(in_memory, attr, None) or {}).items():
            np.testing.assert_allclose(getattr(streamed, attr)[key], value, rtol=1e-5, atol=1e-7)


def test_which_runs_stream_their_aggregation() -> None:
    from medfound.fed.spool import streams

    base = yaml.safe_load((CONFIGS / "federate.yaml").read_text())

    def settings(**fed) -> FedSettings:
        return FedSettings.from_config({**base, "fed": {
            **base["fed"], "centers": ["a", "b"], "strategy": {"name": "fedavg"}, **fed}})

    assert streams(settings())
    assert streams(settings(strategy={"name": "fedadam"}))
    assert not streams(settings(stream_aggregation=False))
    assert not streams(settings(strategy={"name": "fedmedian"}))  # coordinate-wise: all in memory
    assert not streams(settings(privacy={"dp": "server"}))  # clips each update


# --- federated evaluation and config errors ---------------------------------------------------


def test_global_evaluation_is_the_case_weighted_mean_of_the_centers_that_can_compute_it() -> None:
    centers = [{"num-examples": 1, "n_nodules": 2, "cpm": 0.5},
               {"num-examples": 3, "n_nodules": 4, "cpm": 0.9},
               {"num-examples": 2, "n_nodules": 0},  # no nodules: no CPM to share
               {"num-examples": 0, "n_nodules": 0}]  # no validation split
    out = weighted_mean(centers)
    assert out["num-examples"] == 6 and out["n_nodules"] == 6
    assert out["cpm"] == pytest.approx((1 * 0.5 + 3 * 0.9) / 4)


@pytest.mark.parametrize(("spec", "expected"), [
    ({"name": "fedsgd"}, "fed.strategy.name"),
    ({"name": "fedavg", "proximal_mu": 0.1}, "unknown key(s) ['proximal_mu']"),
    ({"name": "trimmed_mean", "beta": 0.5}, "fed.strategy.beta"),
    ({"name": "fedadam", "eta": -1}, "fed.strategy.eta"),
])
def test_a_bad_strategy_config_names_the_key(spec: dict, expected: str) -> None:
    with pytest.raises(MedfoundError, match=re.escape(expected)):
        build_strategy(spec, min_centers=2)


def test_fed_settings_name_the_key_a_user_got_wrong() -> None:
    fed = yaml.safe_load((CONFIGS / "federate.yaml").read_text())["fed"]
    fed = {**fed, "strategy": {"name": "fedavg"}}
    good = {"fed": {**fed, "centers": ["a", "b"]}, "trainer": {"schedule": "constant"}}
    assert FedSettings.from_config(good).centers == ("a", "b")
    cases = [({"fed": {**fed, "centers": ["a"]}}, "fed.min_centers"),
             ({"fed": {**fed, "centers": ["a", "a"]}}, "fed.centers"),
             ({"fed": {**fed, "centers": ["a", "b"], "rounds": 0}}, "fed.rounds"),
             ({"fed": {**fed, "centers": ["a", "b"], "reject_norm_factor": 0.5}},
              "fed.reject_norm_factor"),
             ({"fed": {**fed, "centers": ["a", "b"], "typo": 1}}, "unknown key(s) ['typo']"),
             ({"fed": {**fed, "centers": ["a", "b"]}, "trainer": {"schedule": "cosine"}},
              "trainer.schedule"),
             ({"fed": {**fed, "centers": ["a", "b"], "strategy": {"name": "fedmedian"},
                       "privacy": {"secagg": True}}}, "needs fed=fedavg or fed=fedprox"),
             ({"fed": {**fed, "centers": ["a", "b"], "privacy": {"secagg": True, "dp": "client"}}},
              "does not combine with fed.privacy.dp"),
             ({"fed": {**fed, "centers": ["a", "b"], "privacy": {"secagg": "yes"}}},
              "fed.privacy.secagg"),
             ({"fed": {**fed, "centers": ["a", "b"], "privacy": {"secagg_max_weight": 0}}},
              "fed.privacy.secagg_max_weight")]
    for cfg, expected in cases:
        with pytest.raises(MedfoundError, match=re.escape(expected)):
            FedSettings.from_config(cfg)


def test_dp_epsilon_is_the_tight_gaussian_bound_and_composes_over_rounds() -> None:
    import math

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    delta = 1e-5
    for mu in (0.3, 1.0, 3.0):
        eps = gaussian_epsilon(mu, delta)
        # δ(ε) of μ-GDP at the returned ε is the asked δ ...
        got = phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)
        assert got == pytest.approx(delta, rel=1e-6)
        # ... and ε is below the looser RDP bound min_α α μ²/2 + log(1/δ)/(α − 1).
        rdp = min(a * mu * mu / 2 + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20000))
        assert eps < rdp
    assert gaussian_epsilon(1.0, 1e-5) == pytest.approx(4.377, abs=2e-3)
    # Two centers, σ = 2, three centers in the federation: center_a holds 3/4 of the cases in
    # two rounds (μ per round 0.75·3/2), center_b 1/4 and then sits a round out.
    privacy = {"dp": "server", "noise_multiplier": 2.0}
    eps = dp_epsilons(privacy, 3, [{"a": 0.75, "b": 0.25}, {"a": 1.0}], delta)
    assert eps["a"] == pytest.approx(gaussian_epsilon(math.hypot(0.75 * 1.5, 1.5), delta))
    assert eps["b"] == pytest.approx(gaussian_epsilon(0.25 * 1.5, delta)) and eps["b"] < eps["a"]
    assert dp_epsilons({"dp": None}, 3, [{"a": 1.0}], delta) is None
    assert dp_epsilons({"dp": "client", "noise_multiplier": 0.0}, 3, [{"a": 1.0}], delta) == {"a": math.inf}


def test_a_center_refuses_to_mask_an_update_that_is_not_finite_or_would_be_clipped() -> None:
    """Under SecAgg+ the coordinator cannot screen an update, so the center does, before the
    masking: NaN, and values the quantization would clip, end the center's turn with a reason."""
    from flwr.app import Context
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    from medfound.fed.secagg import masked_input

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    context.state.config_records[RECORD_KEY_STATE] = ConfigRecord(
        {"max_weight": 10.0, "clipping_range": 8.0})
    sent = Message(RecordDict({"arrays": encode_arrays(GLOBAL, "float32")}),
                   metadata=_metadata(1))
    ok = masked_input(sent, reply("c0", 0.5, cases=4), context)  # 0.5 × 4/10 ≤ 8
    assert ok.content.metric_records["fitres.num_examples"]["num_examples"] == 4
    assert ok.content["center"]["name"] == "c0" and ok.content["metrics"]["train/loss"] == 0.5
    with pytest.raises(MedfoundError, match="NaN or Inf"):
        masked_input(sent, reply("c0", float("nan"), cases=4), context)
    with pytest.raises(MedfoundError, match="secagg_clipping_range"):
        masked_input(sent, reply("c0", 30.0, cases=4), context)  # 30 × 4/10 = 12 > 8
