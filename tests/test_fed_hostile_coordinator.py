"""The coordinator reads every field of a center's reply as hostile (medfound.fed.screening's
`ReplyGate`): real Flower messages and records, hand-made, one lie at a time.

Each refusal names its reason; nothing a reply carries reaches the round record, the
aggregate or MLflow before it passed. The federation with lying centers end to end is
tests/test_fed_hostile_coordinator_sim.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from medfound.errors import MedfoundError
from medfound.fed.reporting import data_flows, privacy_report
from medfound.fed.screening import ReplyGate, screen_updates
from medfound.fed.settings import FedSettings

CENTERS = ("center_0", "center_1", "center_2")
SHAPES = {"conv.weight": (2, 3), "conv.bias": (2,)}
GLOBAL = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def sent_to(node: int, kind: str = MessageType.TRAIN) -> Message:
    """The message the coordinator sent to `node` (what a reply answers)."""
    return Message(RecordDict(), metadata=Metadata(
        run_id=1, message_id=f"out{node}", src_node_id=0, dst_node_id=node,
        reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0, message_type=kind))


def reply(node: int, name: object = "center_0", cases: object = 4, value: float = 1.0,
          arrays: dict | None = None, metrics: dict | None = None, kind: str = MessageType.TRAIN,
          records: dict | None = None) -> Message:
    arrays = arrays if arrays is not None else {k: np.full(s, value, np.float32)
                                                for k, s in SHAPES.items()}
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": cases, "train/loss": 0.5, **(metrics or {})}),
        "center": ConfigRecord({"name": name})})
    if kind == MessageType.TRAIN:
        content["arrays"] = ArrayRecord({k: Array(v) if not isinstance(v, Array) else v
                                         for k, v in arrays.items()})
    for key, record in (records or {}).items():
        content[key] = record
    return Message(content, metadata=Metadata(
        run_id=1, message_id=f"in{node}-{id(content)}", src_node_id=node, dst_node_id=0,
        reply_to_message_id=f"out{node}", group_id="1", created_at=0.0, ttl=60.0,
        message_type=kind))


def gate(**keys) -> ReplyGate:
    keys.setdefault("max_cases", 1000)
    return ReplyGate(CENTERS, **keys)


def admit(g: ReplyGate, msg: Message, kind: str = "train", models=()) -> Message | None:
    node = msg.metadata.src_node_id
    sent_kind = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    return g.admit(msg, sent=sent_to(node, sent_kind), kind=kind, rnd=1, arrays=GLOBAL,
                   models=models)


def refused(g: ReplyGate, msg: Message, kind: str = "train", models=()) -> str:
    assert admit(g, msg, kind, models) is None, "the reply was admitted"
    return g.refused[-1]["reason"]


# --- identity -----------------------------------------------------------------------------


def test_a_name_belongs_to_the_node_that_first_answered_with_it() -> None:
    """center_2's node answering as center_0 (+100 on every weight) is refused while the
    real center_0's node is connected; the node keeps its own name; unknown names are refused."""
    g = gate(connected=lambda: [11, 12])
    assert admit(g, reply(11, "center_0")) is not None
    assert admit(g, reply(12, "center_2")) is not None
    assert "claims to be 'center_0', which node 11 is" in refused(g, reply(13, "center_0", value=100))
    assert "claims to be 'center_0', but node 12 is 'center_2'" in refused(
        g, reply(12, "center_0", value=100))
    assert "not a center of fed.centers" in refused(g, reply(14, "center_9"))
    assert "not a center of fed.centers" in refused(g, reply(14, "../../x"))
    assert "names no center" in refused(g, Message(RecordDict({"metrics": MetricRecord(
        {"num-examples": 1})}), metadata=reply(15).metadata))
    assert g.known == {11: "center_0", 12: "center_2"}
    entry = g.refused[0]
    assert entry["node"] == 13 and entry["claimed"] == "center_0" and entry["center"] == "node-13"
    assert entry["round"] == 1 and entry["exchange"] == "train"


def test_a_restarted_center_takes_its_name_back_once_its_old_node_is_gone() -> None:
    online = {11}
    g = gate(connected=lambda: online)
    assert admit(g, reply(11, "center_0")) is not None
    assert admit(g, reply(21, "center_0")) is None  # node 11 still connected
    online.clear()
    online.add(21)
    assert admit(g, reply(21, "center_0")) is not None
    assert g.known == {21: "center_0"} and "node 11 is gone" in g.notes[-1]


def test_registered_nodes_pin_the_names() -> None:
    g = gate(nodes={"center_0": 11, "center_1": 12})
    assert "registered as node 11" in refused(g, reply(99, "center_0"))
    assert "fed.nodes does not list" in refused(g, reply(99, "center_2"))
    assert admit(g, reply(12, "center_1")) is not None
    assert admit(g, reply(11, "center_0")) is not None


def test_replies_to_no_message_of_the_exchange_or_of_another_type_are_refused() -> None:
    g = gate()
    msg = reply(11)
    assert g.admit(msg, sent=None, kind="train", rnd=1, arrays=GLOBAL) is None
    assert "answers no message" in g.refused[-1]["reason"]
    assert g.admit(reply(11), sent=sent_to(11, MessageType.EVALUATE), kind="evaluate",
                   rnd=1) is None
    assert "'train' reply to a 'evaluate' message" in g.refused[-1]["reason"]


# --- case counts --------------------------------------------------------------------------


@pytest.mark.parametrize("cases", [0, -3, 2.5, float("nan"), float("inf"), 10**9, [4]])
def test_a_case_count_that_is_not_a_bounded_integer_is_refused(cases: object) -> None:
    reason = refused(gate(), reply(11, cases=cases))
    assert ("'num-examples' must be a case count in 1..1000" in reason
            or "metric 'num-examples' is not a finite number" in reason), reason


def test_case_counts_are_held_to_the_data_card_and_to_the_first_accepted_update() -> None:
    g = gate(declared_cases={"center_0": 10})
    assert "its data card declared 10" in refused(g, reply(11, cases=11))
    first = admit(g, reply(11, cases=4.0))
    g.weigh([first])
    assert first.content["metrics"]["num-examples"] == 4 and g.cases == {"center_0": 4}
    assert "its first accepted update had 4" in refused(g, reply(11, cases=9))
    # The weights are the coordinator's record: a center re-sending its count is weighted by it.
    again = admit(g, reply(11, cases=4))
    g.weigh([again])
    assert again.content["metrics"]["num-examples"] == 4


def test_per_modality_volume_counts_are_bounded_and_held_to_the_first_accepted_update() -> None:
    g = gate()
    assert "'volumes/CT' must be a count in 0..4" in refused(
        g, reply(11, cases=4, metrics={"volumes/CT": 5}))
    first = admit(g, reply(11, cases=4, metrics={"volumes/CT": 3, "volumes/MR": 1}))
    g.weigh([first])
    assert "its first accepted update had" in refused(
        g, reply(11, cases=4, metrics={"volumes/CT": 4, "volumes/MR": 0}))
    assert g.state()["group_cases"] == {"center_0": {"volumes/CT": 3, "volumes/MR": 1}}


def test_a_billion_cases_with_an_in_bound_update_does_not_become_the_global_model() -> None:
    """FedAvg of two honest centers (values 1 and 3, 4 cases each) and a liar (value 50,
    10⁹ cases): the liar is refused; the aggregate is the honest mean, 2."""
    from medfound.fed.params import decode_arrays
    from medfound.fed.strategies import build_strategy

    g = gate(connected=lambda: [11, 12, 13])
    replies = [admit(g, reply(11, "center_0", cases=4, value=1.0)),
               admit(g, reply(12, "center_1", cases=4, value=3.0)),
               admit(g, reply(13, "center_2", cases=10**9, value=50.0))]
    kept = [m for m in replies if m is not None]
    screened = screen_updates(kept, GLOBAL, transfer_dtype="float32", norm_factor=None,
                              known_centers=g.known)
    g.weigh(screened.accepted)
    arrays, _ = build_strategy({"name": "fedavg"}, min_centers=2).aggregate_train(1, screened.accepted)
    for value in decode_arrays(arrays).values():
        np.testing.assert_allclose(value, 2.0)
    assert [r["claimed"] for r in g.refused] == ["center_2"]


# --- metrics ------------------------------------------------------------------------------


@pytest.mark.parametrize(("metrics", "expected"), [
    ({"x/../y": 1.0}, "metric name 'x/../y' is not allowed"),
    ({"../etc": 1.0}, "is not allowed"),
    ({"a b": 1.0}, "is not allowed"),
    ({"/abs": 1.0}, "is not allowed"),
    ({"n" * 65: 1.0}, "is not allowed"),
    ({"train/loss2": float("nan")}, "is not a finite number"),
    ({"train/loss2": float("-inf")}, "is not a finite number"),
    ({"train/curve": [0.1, 0.2]}, "is not a finite number"),
    ({f"m{i}": 1.0 for i in range(200)}, "holds 202 metrics"),
])
def test_bad_metric_names_and_values_are_refused(metrics: dict, expected: str) -> None:
    assert expected in refused(gate(), reply(11, metrics=metrics))


def test_evaluate_and_cross_site_replies_are_checked_the_same_way() -> None:
    g = gate()
    ok = reply(11, kind=MessageType.EVALUATE, metrics={"cpm": 0.5, "froc/0.125": 0.25})
    assert admit(g, ok, kind="evaluate") is not None
    assert "is not allowed" in refused(g, reply(11, kind=MessageType.EVALUATE,
                                                metrics={"x/../y": 1.0}), kind="evaluate")
    assert "'num-examples' must be a case count in 0..1000" in refused(
        g, reply(11, kind=MessageType.EVALUATE, cases=10**9), kind="evaluate")
    with_weights = reply(11, kind=MessageType.EVALUATE,
                         records={"arrays": ArrayRecord({"w": Array(np.ones(2, np.float32))})})
    assert "unexpected records arrays" in refused(g, with_weights, kind="evaluate")
    # cross-site: one "metrics:<model>" per model it was sent, nothing else
    good = MetricRecord({"cpm": 0.5})
    cross = Message(RecordDict({"metrics:global": good, "center": ConfigRecord({"name": "center_0"})}),
                    metadata=reply(11, kind=MessageType.EVALUATE).metadata)
    assert admit(g, cross, kind="cross-site", models=["global"]) is not None
    other = Message(RecordDict({"metrics:local:center_1": good,
                                "center": ConfigRecord({"name": "center_0"})}),
                    metadata=reply(11, kind=MessageType.EVALUATE).metadata)
    assert "unexpected records metrics:local:center_1" in refused(g, other, kind="cross-site",
                                                                  models=["global"])


def test_scores_riding_in_a_training_reply_are_checked_as_an_evaluate_reply() -> None:
    scores = {"evaluate-metrics": MetricRecord({"num-examples": 10**9, "cpm": 0.5})}
    assert "'num-examples' must be a case count in 0..1000" in refused(gate(), reply(11, records=scores))
    scores = {"evaluate-metrics": MetricRecord({"num-examples": 2, "x/../y": 0.5})}
    assert "metric name 'x/../y'" in refused(gate(), reply(11, records=scores))


def test_a_reply_with_an_extra_metric_record_is_refused() -> None:
    extra = {"metrics/../x": MetricRecord({"a": 1.0})}
    assert "unexpected records" in refused(gate(), reply(11, records=extra))


# --- arrays -------------------------------------------------------------------------------


def test_wrong_keys_shapes_dtypes_and_oversized_arrays_are_refused_before_spooling() -> None:
    g = gate()
    full = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    assert "missing conv.bias" in refused(g, reply(11, arrays={"conv.weight": full["conv.weight"]}))
    assert "unexpected x" in refused(g, reply(11, arrays={**full, "x": np.ones(1, np.float32)}))
    assert "has shape (3, 2)" in refused(g, reply(11, arrays={**full, "conv.weight":
                                                              np.ones((3, 2), np.float32)}))
    assert "has dtype float64" in refused(g, reply(11, arrays={**full, "conv.bias":
                                                               np.ones(2, np.float64)}))
    # An Array whose metadata says (2,) but whose bytes hold 10⁶ values.
    big = Array(np.ones(10**6, np.float32))
    liar = Array(dtype="float32", shape=(2,), stype=big.stype, data=big.data)
    assert "more than its shape (2,) needs" in refused(g, reply(11, arrays={**full, "conv.bias": liar}))
    # Within the byte budget but decoding to another shape: screening refuses it.
    small = Array(np.ones(3, np.float32))
    wrong = Array(dtype="float32", shape=(2,), stype=small.stype, data=small.data)
    msg = admit(g, reply(11, arrays={**full, "conv.bias": wrong}))
    assert msg is not None
    out = screen_updates([msg], GLOBAL, transfer_dtype="float32", norm_factor=None)
    assert out.accepted == [] and "decodes to shape (3,)" in out.rejected[0]["reason"]


def test_nan_weights_are_rejected_by_screening_with_a_reason() -> None:
    g = gate()
    msg = admit(g, reply(11, value=math.nan))
    out = screen_updates([msg], GLOBAL, transfer_dtype="float32", norm_factor=None,
                         known_centers=g.known)
    assert out.accepted == [] and "holds NaN or Inf" in out.rejected[0]["reason"]


# --- settings and the privacy report ------------------------------------------------------


def _cfg(**fed) -> dict:
    base = {"mode": "simulation", "centers": list(CENTERS), "rounds": 1, "local_epochs": 1,
            "min_centers": 2, "round_timeout_s": 60, "transfer_dtype": "float32",
            "reject_norm_factor": None, "eval_bootstraps": 10, "audit_payloads": False,
            "cross_site": True, "strategy": {"name": "fedavg"}}
    return {"fed": {**base, **fed}, "trainer": {}}


@pytest.mark.parametrize(("fed", "expected"), [
    ({"share_local_models": True, "privacy": {"dp": "server"}}, "fed.share_local_models=true"),
    ({"share_local_models": True, "privacy": {"secagg": True}}, "fed.privacy.secagg"),
    ({"max_cases": 0}, "'fed.max_cases'"),
    ({"declared_cases": {"center_9": 3}}, "names 'center_9'"),
    ({"declared_cases": {"center_0": -1}}, "'fed.declared_cases.center_0'"),
    ({"nodes": {"center_0": 5, "center_1": 5}}, "the same node id"),
    ({"centers": ["../x", "center_1"]}, "'fed.centers'"),
])
def test_the_new_fed_keys_name_what_is_wrong(fed: dict, expected: str) -> None:
    with pytest.raises(MedfoundError, match=expected.replace(".", r"\.").replace("'", "'")):
        FedSettings.from_config(_cfg(**fed))


def test_the_privacy_report_says_what_left_each_center_and_to_whom() -> None:
    settings = FedSettings.from_config(_cfg(privacy={"dp": "server"}))
    history = [{"round": 1, "train": {"centers": {c: {"num-examples": 3} for c in CENTERS},
                                      "accepted": list(CENTERS)},
                "bytes": {c: {"sent": 10, "received": 20} for c in CENTERS}}]
    cross = {"sent": {c: ["global"] for c in CENTERS}}
    report = privacy_report(history, settings, cross)
    assert set(report["epsilon"]) == set(CENTERS)
    flow = report["flows"]["center_1"]
    assert flow["sent"]["to"] == "coordinator" and flow["sent"]["train_rounds"] == [1]
    assert "the coordinator clips it" in flow["sent"]["update"]
    assert flow["received"] == {"from": "coordinator", "global_model_rounds": [1],
                                "cross_site_models": ["global"], "local_updates_of": []}
    assert flow["summary"].endswith("cross-site: the global model only")
    shared = data_flows(history, FedSettings.from_config(_cfg(share_local_models=True)),
                        {"sent": {c: ["global", "local:center_0", "local:center_2"]
                                  for c in CENTERS}})
    assert shared["center_1"]["received"]["local_updates_of"] == ["center_0", "center_2"]
