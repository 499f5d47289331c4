"""Model weights ⇄ Flower ArrayRecords, and the bytes a message puts on the wire.

What crosses between coordinator and centers is the network's floating-point state_dict
entries (weights and BatchNorm statistics), in `fed.transfer_dtype` (float32, or float16 to
halve the bytes). Integer buffers (BatchNorm's ``num_batches_tracked``) stay where they are:
they are counters, not something to average. The coordinator always aggregates in float32.

`payload_bytes` is the canonical serialization of a message's content (Flower's protobuf,
deterministic field order): its length is what the metrics report as bytes and its sha256 is
what a center's audit log records.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from medfound.errors import MedfoundError

__all__ = ["decode_arrays", "encode_arrays", "from_arrays", "payload_bytes", "shared_state",
           "to_arrays"]

_NUMPY = {"float32": np.float32, "float16": np.float16}


def shared_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a state_dict that are federated: the floating-point ones, in order."""
    return {k: v for k, v in state.items() if v.is_floating_point()}


def to_arrays(state: Mapping[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """ArrayRecord of the floating-point entries of `state`, cast to `dtype`."""
    if dtype not in _NUMPY:
        raise MedfoundError(f"unknown transfer dtype {dtype!r}", hint="use float32 or float16")
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy(), dtype=_NUMPY[dtype]))
                        for k, v in shared_state(state).items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """float32 tensors from an ArrayRecord (any float dtype), keyed as the state_dict."""
    return {k: torch.from_numpy(np.array(a.numpy(), dtype=np.float32)) for k, a in record.items()}


def encode_arrays(arrays: Mapping[str, np.ndarray], dtype: str) -> ArrayRecord:
    """ArrayRecord of numpy arrays cast to the transfer `dtype`."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=_NUMPY[dtype]))
                        for k, v in arrays.items()})


def decode_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """float32 numpy arrays from an ArrayRecord (what the coordinator aggregates)."""
    return {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in record.items()}


def payload_bytes(content: RecordDict) -> bytes:
    """The message content as Flower serializes it (deterministic protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString(deterministic=True)
