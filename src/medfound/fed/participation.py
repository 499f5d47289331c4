"""Who takes part in a round, and how long a round waits for them.

Before each round the coordinator names every connected node (medfound.fed.server_app's
query), then `draw_round` picks the round's centers:

- by default every connected center (Flower's ``fraction_train=1``);
- ``fed.fraction`` f: ⌈f × the connected centers that gave their name⌉ of them, drawn at random;
- ``fed.centers_per_round`` k: k of them, drawn at random.

A draw takes at least ``fed.min_centers`` centers (all when fewer are connected) and is
seeded by (``seed``, round) over the centers' names in name order: a resumed run, or a rerun
with the same centers connected, draws the same ones. Centers come and go between rounds (a
center that joins late, leaves or restarts): each round draws from those connected then.

The round's deadline: it ends when every drawn center has replied, after
``fed.replies_per_round`` replies with content (k of n: the rest are stragglers), or after
``fed.round_timeout_s``, whichever comes first. A straggler's reply is never read; the round
record lists it as ``late``.

`RoundGrid` is the Flower Grid the round's strategy and exchanges see: it offers only the
drawn nodes (so Flower's strategies, which send to every node a grid offers, send to those)
and notes which of them answered. `RoundGrid.record` is the round's ``participation`` record
in FED/metrics.json: ``connected`` (how many nodes the SuperLink listed), ``available`` (the
connected centers by name), ``sampled`` (the drawn ones) and ``late`` (drawn, no reply when
the training exchange ended).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["RoundGrid", "draw", "draw_round", "sample_size"]

_STREAM = 0x5A3B1E  # the draw's own random stream (separate from the training seeds)
WAIT_NOTE_S = 30.0  # how often a coordinator waiting for centers says so


def sample_size(available: int, fraction: float | None, per_round: int | None,
                min_centers: int) -> int:
    """How many of `available` centers a round draws (module docstring)."""
    if fraction is not None:
        wanted = math.ceil(fraction * available - 1e-9)
    elif per_round is not None:
        wanted = per_round
    else:
        wanted = available
    return min(available, max(wanted, min_centers))


def draw_round(grid: Grid, known: Mapping[int, str], rnd: int, settings: Any, seed: int,
               sleep: Callable[[float], None] = time.sleep) -> RoundGrid:
    """Wait until at least ``fed.min_centers`` nodes are connected, then draw the round's
    centers (`settings`: a `FedSettings`; `known`: node id → center name)."""
    waited = 0.0
    while len(connected := sorted(grid.get_node_ids())) < settings.min_centers:
        if waited % WAIT_NOTE_S == 0:
            print(f"round {rnd}: waiting for centers to connect: {len(connected)} connected, "
                  f"fed.min_centers is {settings.min_centers}", flush=True)
        sleep(1.0)
        waited += 1.0
    return RoundGrid(grid, draw(connected, known, rnd, settings, seed), connected, known)


def draw(connected: Iterable[int], known: Mapping[int, str], rnd: int, settings: Any,
         seed: int) -> list[int]:
    """The nodes of `connected` that take part in round `rnd`: all of them without
    ``fed.fraction`` / ``fed.centers_per_round``, else a draw among those `known` by name,
    seeded by (`seed`, `rnd`) over the names in name order."""
    connected = sorted(int(n) for n in connected)
    if settings.fraction is None and settings.centers_per_round is None:
        return connected
    named = sorted((n for n in connected if n in known), key=lambda n: (known[n], n))
    k = sample_size(len(named), settings.fraction, settings.centers_per_round,
                    settings.min_centers)
    rng = np.random.default_rng([int(seed), int(rnd), _STREAM])
    return sorted(int(named[i]) for i in rng.choice(len(named), size=k, replace=False))


class RoundGrid(Grid):
    """`grid` as one round sees it: only the drawn `nodes`; every call goes to `grid`.
    Notes which drawn node answered which message type (`record`)."""

    def __init__(self, grid: Grid, nodes: Iterable[int], connected: Iterable[int],
                 known: Mapping[int, str]) -> None:
        self.grid = grid
        self.nodes = sorted(int(n) for n in nodes)
        self.connected = sorted(int(n) for n in connected)
        self.known = known  # the coordinator's live binding (it learns names from replies)
        self._asked: dict[str, tuple[int, str]] = {}  # message id → (node, message type)
        self.answered: dict[str, set[int]] = {}  # message type → nodes that replied

    # Flower's Grid interface: the drawn nodes only, everything else as `grid` does it.
    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        for msg, mid in zip(messages, ids, strict=True):
            self._asked[mid] = (int(msg.metadata.dst_node_id), str(msg.metadata.message_type))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            node, kind = self._asked.get(reply.metadata.reply_to_message_id, (None, ""))
            if node is not None:
                self.answered.setdefault(kind, set()).add(node)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)

    # --- the round's record ---

    def name(self, node: int) -> str:
        return self.known.get(node, f"node-{node}")

    def record(self, kind: str = "train") -> dict[str, Any]:
        """The round's ``participation`` record (module docstring); ``late``: drawn nodes that
        were sent a `kind` message and had not replied when its exchange ended."""
        asked = {node for node, k in self._asked.values() if k == kind}
        late = asked - self.answered.get(kind, set())
        return {"connected": len(self.connected),
                "available": sorted(self.name(n) for n in self.connected),
                "sampled": sorted(self.name(n) for n in self.nodes),
                "late": sorted(self.name(n) for n in late)}
