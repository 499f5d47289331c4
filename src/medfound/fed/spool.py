"""Streaming aggregation: the coordinator holds one center's update in memory at a time.

Holding every reply until the round's last one arrives costs the coordinator one model per
center, and the aggregation's copies on top (5× the model for three centers,
benchmarks/federation.py). With ``fed.stream_aggregation`` (the default) each training
reply's arrays go to disk as soon as the reply is pulled, one ``.npy`` file per array, in the
transfer dtype (``FED/server/spool/<round>/``); the reply keeps its metrics and center name.
Screening (medfound.fed.screening) then reads each update back one array at a time,
memory-mapped, and `UpdateSpool.weighted_mean` averages the accepted ones one array at a
time, weighted by case count, summing in float64. What the coordinator holds at once: the
global model, the mean being built, and one reply while it is written out. The folder is
removed when the round's aggregation is done, failed or not.

It serves the strategies whose aggregate is the case-weighted mean of the updates: FedAvg
and FedProx (the mean is the new model), FedAdam and FedYogi (Flower's server optimizer steps
from the mean: it gets one reply that holds it). The coordinate-wise robust strategies,
differential privacy (which clips each update), per-modality aggregation (task=pretrain) and
SecAgg+ keep every update in memory as before.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy.fedopt import FedOpt

from medfound.fed.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from medfound.fed.strategies import MEAN_STRATEGIES

__all__ = ["SpooledArray", "UpdateSpool", "aggregate_spooled", "streams"]



def streams(settings: Any) -> bool:
    """Whether a run's rounds aggregate from the spool (`FedSettings`: fed.stream_aggregation
    and a strategy, task and privacy setting it serves)."""
    return bool(settings.stream_aggregation and settings.strategy_name in MEAN_STRATEGIES
                and settings.task == "detect" and settings.privacy["dp"] is None
                and not settings.privacy["secagg"])


def aggregate_spooled(strategy: Any, rnd: int, spool: UpdateSpool, accepted: list[Message],
                      keys: Iterable[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The new global weights (float32) and the strategy's aggregated metrics from the
    accepted, spooled replies: the case-weighted mean, or with a Flower server optimizer
    (FedAdam, FedYogi) its step from that mean, which it gets as the only reply (the mean of
    one reply is that reply: the step is the one it takes from all of them)."""
    mean = spool.weighted_mean(accepted, keys)
    contents = [m.content for m in accepted]
    metrics = dict(strategy.train_metrics_aggr_fn(contents, NUM_EXAMPLES))
    if not isinstance(strategy, FedOpt):
        return mean, metrics
    record = ArrayRecord()
    for key in list(mean):  # one copy at a time: the serialized array replaces the numpy one
        record[key] = Array(mean.pop(key))
    total = float(sum(c[METRICS][NUM_EXAMPLES] for c in contents))
    m = accepted[0].metadata  # the one reply stands in for them all
    reply = Message(RecordDict({ARRAYS: record, METRICS: MetricRecord({NUM_EXAMPLES: total})}),
                    metadata=Metadata(run_id=m.run_id, message_id="", src_node_id=m.src_node_id,
                                      dst_node_id=m.dst_node_id,
                                      reply_to_message_id=m.reply_to_message_id,
                                      group_id=m.group_id, created_at=m.created_at, ttl=m.ttl,
                                      message_type=m.message_type))
    arrays, _ = strategy.aggregate_train(rnd, [reply])
    return {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in arrays.items()}, metrics



class SpooledArray:
    """One array of a spooled update: what screening reads of a Flower `Array`."""

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, dtype, shape

    def numpy(self) -> np.ndarray:
        """The array, memory-mapped read-only (the page cache holds it, not the heap)."""
        return np.load(self.path, mmap_mode="r")


class UpdateSpool:
    """The updates of one round, on disk under `folder` (created; removed by `close`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)  # a crashed run's leftovers
        self.folder.mkdir(parents=True)
        self._updates: dict[str, dict[str, SpooledArray]] = {}

    def take(self, msg: Message) -> Message:
        """Write the reply's arrays out and drop them from it; other replies pass unchanged."""
        if not msg.has_content() or ARRAYS not in msg.content.array_records:
            return msg
        record = msg.content.pop(ARRAYS)
        where = self.folder / f"{len(self._updates):04d}"
        where.mkdir()
        arrays = {}
        for i, (key, array) in enumerate(record.items()):
            path = where / f"{i:05d}.npy"
            np.save(path, array.numpy(), allow_pickle=False)
            arrays[key] = SpooledArray(path, array.dtype, tuple(array.shape))
        self._updates[msg.metadata.message_id] = arrays
        return msg

    def arrays(self, msg: Message) -> Mapping[str, SpooledArray] | None:
        """The spooled arrays of a reply `take` saw (None for one without arrays)."""
        return self._updates.get(msg.metadata.message_id)

    def load(self, msg: Message) -> dict[str, np.ndarray]:
        """A reply's update in memory, float32 (cross-site validation keeps the last ones)."""
        return {k: np.array(a.numpy(), dtype=np.float32) for k, a in self._updates[
            msg.metadata.message_id].items()}

    def weighted_mean(self, replies: Iterable[Message], keys: Iterable[str]
                      ) -> dict[str, np.ndarray]:
        """The case-weighted (``num-examples``) mean of the replies' updates, float32, one
        array at a time (sums in float64)."""
        replies = list(replies)
        weights = np.array([float(m.content[METRICS][NUM_EXAMPLES]) for m in replies])
        weights = weights / weights.sum()
        updates = [self._updates[m.metadata.message_id] for m in replies]
        mean = {}
        for key in keys:
            total = np.zeros(updates[0][key].shape, dtype=np.float64)
            for w, update in zip(weights, updates, strict=True):
                total += w * update[key].numpy()
            mean[key] = total.astype(np.float32)
        return mean

    def close(self) -> None:
        self._updates.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # the spool/ folder too, once no round uses it
            self.folder.parent.rmdir()

    def __enter__(self) -> UpdateSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
