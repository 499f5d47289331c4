"""Check the centers' training replies before anything is aggregated.

A reply is rejected, logged and left out of the round when

- its weights are not the global model's: missing or extra arrays, another shape, or a dtype
  other than the transfer dtype the coordinator sent;
- any weight or shared metric is NaN or ±Inf, or "num-examples" is not a count > 0;
- its update is far larger than the others': the distance from the global model
  ``‖w_center − w_global‖₂`` (all arrays together) exceeds ``norm_factor`` × the median of the
  other centers' distances.

Error replies (a center that failed or refused) are reported apart as ``failed``. Accepted
replies come back with their arrays in float32 (aggregation is always float32) and
sorted by center name, so the aggregate does not depend on the order replies arrived in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from medfound.fed.protocol import ARRAYS, METRICS, NUM_EXAMPLES, center_of
from medfound.fed.spool import UpdateSpool

__all__ = ["Screening", "screen_updates"]


@dataclasses.dataclass
class Screening:
    """The outcome for one round's training replies."""

    accepted: list[Message]
    rejected: list[dict[str, str]]  # {"center", "reason"}
    failed: list[dict[str, str]]  # {"center", "reason"}: error replies
    update_norms: dict[str, float]  # per center that sent well-formed weights


def screen_updates(replies: Iterable[Message], global_arrays: Mapping[str, np.ndarray], *,
                   transfer_dtype: str, norm_factor: float | None,
                   known_centers: Mapping[int, str] | None = None,
                   spool: UpdateSpool | None = None) -> Screening:
    """Split `replies` into accepted / rejected / failed (see the module docstring).

    Memory: the checks go one array at a time, so beyond the replies themselves the
    coordinator holds about one array's temporaries (and, for float16 transfers, each
    accepted reply's float32 copy, which replaces its float16 payload). With `spool`
    (medfound.fed.spool) the updates are read from disk instead and stay there."""
    result = Screening([], [], [], {})
    candidates: list[tuple[str, Message]] = []
    for msg in replies:
        center = center_of(msg, known_centers)
        if msg.has_error():
            result.failed.append({"center": center, "reason": str(msg.error.reason)})
            continue
        arrays = (spool.arrays(msg) if spool is not None
                  else msg.content.array_records.get(ARRAYS))
        reason, norm = _check(msg, arrays, global_arrays, transfer_dtype)
        if reason:
            result.rejected.append({"center": center, "reason": reason})
            continue
        result.update_norms[center] = norm
        candidates.append((center, msg))

    keep = []
    for center, msg in candidates:
        others = [result.update_norms[c] for c, _ in candidates if c != center]
        norm = result.update_norms[center]
        if norm_factor is not None and others:
            reference = float(np.median(others))
            if norm > norm_factor * max(reference, 1e-12):
                result.rejected.append({
                    "center": center,
                    "reason": f"update norm {norm:.4g} is more than {norm_factor:g}× the other "
                              f"centers' median {reference:.4g}"})
                continue
        if transfer_dtype != "float32" and spool is None:  # aggregation is float32: re-encode
            record: ArrayRecord = msg.content[ARRAYS]
            msg.content[ARRAYS] = ArrayRecord({k: Array(np.asarray(a.numpy(), dtype=np.float32))
                                               for k, a in record.items()})
        keep.append((center, msg))
    result.accepted = [msg for _, msg in sorted(keep, key=lambda cm: cm[0])]
    return result


def _check(msg: Message, record: Mapping[str, Any] | None,
           global_arrays: Mapping[str, np.ndarray], transfer_dtype: str
           ) -> tuple[str | None, float]:
    """(why the reply is rejected or None, its distance ‖w_center − w_global‖₂). `record`:
    the reply's arrays (Flower `Array`s, or spooled ones: dtype, shape, numpy())."""
    content = msg.content
    if record is None or METRICS not in content.metric_records:
        return f"reply lacks '{ARRAYS}' or '{METRICS}'", math.nan
    metrics = content[METRICS]
    n = metrics.get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not n > 0 or not math.isfinite(n):
        return f"'{NUM_EXAMPLES}' must be a count > 0, got {n!r}", math.nan
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(float(v)) for v in values):
            return f"metric '{key}' is not finite ({value!r})", math.nan
    missing = sorted(set(global_arrays) - set(record))
    extra = sorted(set(record) - set(global_arrays))
    if missing or extra:
        return (f"weights differ from the global model (missing {_few(missing)}; "
                f"unexpected {_few(extra)})"), math.nan
    for key, ref in global_arrays.items():
        array = record[key]
        if array.dtype != transfer_dtype:
            return f"'{key}' has dtype {array.dtype}, expected {transfer_dtype}", math.nan
        if tuple(array.shape) != tuple(ref.shape):
            return f"'{key}' has shape {tuple(array.shape)}, expected {tuple(ref.shape)}", math.nan
    total = 0.0
    for key, ref in global_arrays.items():  # one array at a time
        value = record[key].numpy()
        if not np.isfinite(value).all():
            return f"'{key}' holds NaN or Inf", math.nan
        d = value.astype(np.float64).ravel() - ref.astype(np.float64).ravel()
        total += float(np.dot(d, d))
    return None, math.sqrt(total)


def _few(keys: list[Any]) -> str:
    return "none" if not keys else ", ".join(map(str, keys[:3])) + (" ..." if len(keys) > 3 else "")
