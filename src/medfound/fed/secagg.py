"""Secure aggregation (``fed.privacy.secagg=true``): Flower's SecAgg+ in medfound's round loop.

With SecAgg+ the coordinator learns the case-weighted mean of the centers' updates and nothing
about any one center's update: each center adds pairwise masks (agreed with its neighbours by
Diffie-Hellman) and a private mask to its quantized update; the masks cancel in the sum, and
the private masks are removed with secret shares the surviving centers hand back. A center that
drops out after sending its keys is recovered from its neighbours' shares (Bell et al. 2020).

Flower 1.41 implements the protocol as `SecAggPlusWorkflow` (coordinator) and `secaggplus_mod`
(center), written for its legacy strategy API (FitIns/FitRes). medfound uses both unchanged and
adapts at the edges:

- coordinator (`secure_mean`): the workflow's four stages (setup, share keys, collect masked
  vectors, unmask) run one after another, each exchange through medfound's own send-and-wait
  (timeouts, byte counts, node → center names). The "collect" stage carries medfound's train
  message for that center; the legacy strategy the workflow expects is `_OneRound`, which only
  names the nodes and receives the unmasked mean;
- center (`secagg_reply`): Flower's mod around medfound's train handler, with one step between
  them (`masked_input`): the reply's weights become the *update* (received global weights
  subtracted, keys in sorted order), checked finite and inside the quantization range, in the
  legacy FitRes layout the mod masks. The center's name and its loss numbers still travel in
  clear (they are metrics the center chooses to share); its weights never do.

The masked quantity is the update, not the weights: updates are small, so the quantization
(``secagg_clipping_range`` and 2^22 levels, each update first scaled by num_examples /
``secagg_max_weight``) costs little precision, and the coordinator adds the mean update to the
weights it sent. FedAvg and FedProx aggregate exactly this mean; other strategies need the
individual updates and are refused (medfound.fed.settings). What the coordinator can no
longer do: screen each update (NaN, shape, norm) — each center checks its own before masking —
and keep each center's model for the cross-site matrix (only the global model is scored).

A caveat of Flower's implementation, not of the protocol: masks are expanded from 32-bit
seeds by numpy's RandomState, which a coordinator with enough compute could search.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat

from medfound.errors import MedfoundError
from medfound.fed.params import decode_arrays
from medfound.fed.protocol import ARRAYS, CENTER, METRICS, NUM_EXAMPLES

__all__ = ["SecureRound", "is_secagg", "masked_input", "secagg_reply", "secure_mean", "stage_of"]

# Shares of each center's secrets: every other center gets one (num_shares = all), and half
# of them (at least 2) rebuild a secret, so with 3 centers one may drop out mid-round.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 0.5
# The protocol's steps, in order, as Flower names them (also in each center's audit log).
_STAGES = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)


def is_secagg(msg: Message) -> bool:
    """Whether `msg` is a step of the SecAgg+ protocol (it carries the protocol's config)."""
    return (msg.metadata.message_type == "train" and msg.has_content()
            and RECORD_KEY_CONFIGS in msg.content.config_records)


# --- coordinator ---------------------------------------------------------------------------


@dataclasses.dataclass
class SecureRound:
    """What one secure round gave the coordinator."""

    mean: dict[str, np.ndarray] | None  # the case-weighted mean update (None: protocol halted)
    replies: list[Message]  # the centers' "collect" replies: name and metrics, no weights
    failed: dict[int, str]  # node id → why it left the round (the stage and its reason)
    halted_at: str | None = None  # the stage where too few centers remained, if any


class _OneRound:
    """The legacy strategy and client manager `SecAggPlusWorkflow` calls: it names the nodes
    medfound already chose (configure_fit) and keeps the unmasked mean (aggregate_fit)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.mean: list[np.ndarray] | None = None

    def num_available(self) -> int:
        return len(self.nodes)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any
                      ) -> list[tuple[Any, FitIns]]:
        # The workflow replaces nothing but the stage config in what it sends for "collect";
        # medfound swaps in its own train message for each node before that stage.
        return [(SimpleNamespace(node_id=n), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]],
                      failures: list[Any]) -> tuple[Any, dict[str, Any]]:
        if not results:
            return None, {}
        parameters = results[0][1].parameters  # the workflow put the unmasked mean in every one
        self.mean = parameters_to_ndarrays(parameters)
        return parameters, {}


class _Recorder:
    """The Grid the workflow sees: each exchange goes through `exchange` and is kept, as the
    nodes asked and the replies."""

    def __init__(self, exchange: Callable[[list[Message]], list[Message]]) -> None:
        self.exchange = exchange
        self.stages: list[tuple[set[int], list[Message]]] = []

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        replies = self.exchange(messages)
        self.stages.append(({m.metadata.dst_node_id for m in messages}, replies))
        return replies


def secure_mean(exchange: Callable[[list[Message]], list[Message]], messages: list[Message],
                rnd: int, privacy: Mapping[str, Any]) -> SecureRound:
    """Run SecAgg+ for one training round.

    `messages`: medfound's train message for each chosen center (its own RecordDict each, as
    the strategy made them); `exchange`: sends a list of messages and returns the replies.
    Returns the case-weighted mean of the updates, keyed like the weights the messages carry."""
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
        SecAggPlusWorkflow,
        WorkflowState,
    )

    by_node = {m.metadata.dst_node_id: m for m in messages}
    keys = sorted(next(iter(by_node.values())).content[ARRAYS].keys()) if by_node else []
    one_round = _OneRound(sorted(by_node))
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}),
                            strategy=one_round, client_manager=one_round)  # type: ignore[arg-type]
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(NUM_SHARES, RECONSTRUCTION_THRESHOLD,
                                  max_weight=float(privacy["secagg_max_weight"]),
                                  clipping_range=float(privacy["secagg_clipping_range"]))
    grid, state = _Recorder(exchange), WorkflowState()
    halted_at = None
    for i, stage in enumerate((workflow.setup_stage, workflow.share_keys_stage,
                               workflow.collect_masked_vectors_stage, workflow.unmask_stage)):
        if not stage(grid, context, state):
            halted_at = _STAGES[i]
            break
        if i == 0:  # "collect" will carry each center's train message, not an empty FitIns
            state.nid_to_fitins = {n: RecordDict(dict(by_node[n].content.items()))
                                   for n in state.nid_to_fitins}
    failed: dict[int, str] = {}  # each node's first failure: an error, or no reply in time
    for stage_name, (asked, replies) in zip(_STAGES, grid.stages, strict=False):
        for reply in replies:
            if reply.has_error():
                failed.setdefault(reply.metadata.src_node_id,
                                  f"SecAgg+ {stage_name}: {reply.error.reason}")
        for node in asked - {r.metadata.src_node_id for r in replies}:
            failed.setdefault(node, f"SecAgg+ {stage_name}: no reply before fed.round_timeout_s")
    collected = grid.stages[2][1] if len(grid.stages) > 2 else []
    mean = None
    if halted_at is None and one_round.mean is not None:
        mean = {k: np.asarray(v, dtype=np.float32)
                for k, v in zip(keys, one_round.mean, strict=True)}
    return SecureRound(mean=mean, replies=[r for r in collected if r.has_content()],
                       failed=failed, halted_at=halted_at)


# --- center --------------------------------------------------------------------------------


def masked_input(msg: Message, reply: Message, context: Context) -> Message:
    """Turn medfound's train reply into what Flower's secaggplus_mod masks: the update
    (reply weights − received weights, every received key in sorted order; a key the
    reply leaves out did not change) as legacy FitRes parameters, weighted by num-examples.

    Refuses an update that is not finite or that the quantization would clip (after the
    mod scales it by num_examples / max_weight, each value must lie within ±clipping_range)."""
    if reply.has_error():
        raise MedfoundError(f"local training failed: {reply.error.reason}")
    sent = decode_arrays(msg.content[ARRAYS])
    trained = decode_arrays(reply.content[ARRAYS])
    update = [trained[k] - sent[k] if k in trained else np.zeros_like(sent[k])
              for k in sorted(sent)]
    metrics = reply.content[METRICS]
    num_examples = int(metrics[NUM_EXAMPLES])
    config = context.state.config_records[RECORD_KEY_STATE]
    scale = num_examples / float(config["max_weight"])
    limit = float(config["clipping_range"])
    worst = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
    if not np.isfinite(worst):
        raise MedfoundError("the update holds NaN or Inf; it is not sent")
    if worst * scale > limit:
        raise MedfoundError(
            f"the update's largest change ({worst:.3g}) × num_examples / max_weight "
            f"({scale:.3g}) exceeds the SecAgg+ clipping range {limit:g}: it would be clipped",
            hint="raise fed.privacy.secagg_clipping_range or fed.privacy.secagg_max_weight")
    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(update),
                    num_examples=num_examples, metrics={})
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    content[METRICS] = MetricRecord(dict(metrics.items()))
    content[CENTER] = reply.content[CENTER]
    return Message(content, reply_to=msg)


def secagg_reply(msg: Message, context: Context, call_next: Callable, center: str) -> Message:
    """A center's reply to one SecAgg+ step: Flower's `secaggplus_mod` with `masked_input`
    between it and the train handler (`call_next`); the reply also names the `center`, as
    medfound's replies do."""
    from flwr.client.mod import secaggplus_mod

    def train(m: Message, ctx: Context) -> Message:
        return masked_input(m, call_next(m, ctx), ctx)

    reply = secaggplus_mod(msg, context, train)
    reply.content[CENTER] = ConfigRecord({"name": center})
    return reply


def stage_of(msg: Message) -> str:
    """The protocol stage a SecAgg+ message asks for ("setup", "share_keys", ...)."""
    return str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "?"))
