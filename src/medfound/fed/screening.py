"""Check the centers' replies before the coordinator reads them, then their updates before
anything is aggregated.

Every field of a reply is a center's claim. `ReplyGate` admits a reply, or refuses it with a
reason the run records (``FED/metrics.json``: ``rejected_replies``, and the round's
``rejected``), before any of it is stored, spooled, logged or aggregated:

- identity: the reply names a center of ``fed.centers``, and that name belongs to the node
  that sent it. ``fed.nodes`` (the node ids `medfound fed register` printed) pins each name to
  its registered node; otherwise a name is bound to the first node that answers with it, and
  a node keeps the name it first gave. Another node may take a bound name over only once the
  node holding it is no longer connected (a center that restarted);
- shape of the message: a reply to a message this coordinator sent, of the same type, with
  the records its type carries and no others (arrays only in a training reply: the keys,
  shapes and dtype sent, and no more bytes than those arrays need);
- metrics: names from a strict alphabet (``/``-separated parts of letters, digits, ``_``,
  ``.``, ``-``; no ``.`` or ``..`` part; at most 64 characters), at most 128 per record,
  values finite numbers;
- case counts: ``num-examples`` an integer in 1 … ``fed.max_cases``, at most the center's
  ``fed.declared_cases`` (from its data card) where given, and in every round the count the
  center's first accepted update gave. The aggregation weights are the gate's record of
  each center's count, written back into the reply (`ReplyGate.weigh`), not its claim.

Then `screen_updates` checks the updates themselves. An update is rejected, logged and left out of the round when

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
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from medfound.fed.protocol import ARRAYS, CENTER, EVALUATION, METRICS, NUM_EXAMPLES, center_of
from medfound.fed.spool import UpdateSpool

__all__ = ["METRIC_NAME", "ReplyGate", "Screening", "reason_text", "screen_updates"]

# A metric name a center may send: "/"-separated parts, none of them "." or "..".
METRIC_NAME = re.compile(r"(?!.*(?:^|/)\.{1,2}(?:/|$))[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")
MAX_METRIC_NAME = 64
MAX_METRICS = 128  # per MetricRecord
_GROUP_PREFIX = "volumes/"  # task=pretrain: a training reply's per-modality volume counts
_ARRAY_SLACK = 4096  # bytes an array's .npy header may add to its data
_REASON_CHARS = 300  # an error reply's reason, as the coordinator records it


class ReplyGate:
    """Admits or refuses each reply of a center (module docstring); records every refusal.

    `known` (node id → center name) is the binding; `cases` (center → training cases) the
    counts each center's first accepted update gave; both go into the coordinator's
    checkpoint. `connected`, when given, lists the nodes the SuperLink still holds."""

    def __init__(self, centers: Iterable[str], *, max_cases: int,
                 declared_cases: Mapping[str, int] | None = None,
                 nodes: Mapping[str, int] | None = None,
                 connected: Callable[[], Iterable[int]] | None = None) -> None:
        self.centers = tuple(centers)
        self.max_cases = int(max_cases)
        self.declared = dict(declared_cases or {})
        self.pinned = {int(node): c for c, node in (nodes or {}).items()}
        self.known: dict[int, str] = dict(self.pinned)
        self.cases: dict[str, int] = {}
        self.group_cases: dict[str, dict[str, int]] = {}  # task=pretrain: "volumes/<m>" counts
        self.connected = connected
        self.refused: list[dict[str, Any]] = []  # every refusal of the run
        self._unread = 0  # refusals not yet taken by `take_refused`
        self.notes: list[str] = []  # bindings moved to another node

    # --- the coordinator's calls ---

    def restore(self, state: Mapping[str, Any]) -> None:
        """Bindings and case counts from a checkpoint (`state()`); pinned nodes stay pinned."""
        for node, center in dict(state.get("nodes") or {}).items():
            if int(node) not in self.pinned and center in self.centers \
                    and center not in self.pinned.values():
                self.known[int(node)] = str(center)
        self.cases.update({str(c): int(n) for c, n in dict(state.get("cases") or {}).items()})
        self.group_cases.update({str(c): {str(k): int(n) for k, n in dict(g).items()}
                                 for c, g in dict(state.get("group_cases") or {}).items()})

    def state(self) -> dict[str, Any]:
        return {"nodes": dict(self.known), "cases": dict(self.cases),
                "group_cases": {c: dict(g) for c, g in self.group_cases.items()}}

    def admit(self, msg: Message, *, sent: Message | None, kind: str, rnd: int,
              arrays: Mapping[str, np.ndarray] | None = None, transfer_dtype: str = "float32",
              models: Iterable[str] = ()) -> Message | None:
        """`msg` (its center name made the bound one) or None when refused (recorded).

        `sent`: the message it answers (None: it answers none of this exchange's). `kind`:
        "train" (`arrays`: what was sent, the keys and shapes an update must have),
        "evaluate", "cross-site" (`models`: the models sent) or "secagg" (only identity and
        the shared metrics are checked: SecAgg+ brings its own records)."""
        node = int(msg.metadata.src_node_id)
        claimed = None
        if msg.has_content() and CENTER in msg.content.config_records:
            claimed = msg.content[CENTER].get("name")
        try:
            if sent is None:
                raise _Refused("answers no message of this exchange")
            if msg.has_error():
                return msg
            if msg.metadata.message_type != sent.metadata.message_type:
                raise _Refused(f"is a {_text(msg.metadata.message_type, 40)!r} reply to a "
                               f"{sent.metadata.message_type!r} message")
            center = self._bind(node, claimed)
            _check_layout(msg, kind, arrays, transfer_dtype, models)
            self._check_counts(msg, center, kind)
        except _Refused as why:
            self._refuse(node, claimed, kind, rnd, str(why))
            return None
        if not isinstance(claimed, str) or claimed != center:
            msg.content[CENTER] = ConfigRecord({"name": center})
        return msg

    def weigh(self, accepted: Iterable[Message]) -> None:
        """Record each accepted update's case count (the first time) and write the recorded
        count into the reply, which is what the strategies weight by."""
        for msg in accepted:
            center = center_of(msg, self.known)
            metrics = msg.content[METRICS]
            self.cases.setdefault(center, int(metrics[NUM_EXAMPLES]))
            metrics[NUM_EXAMPLES] = self.cases[center]
            groups = self.group_cases.setdefault(
                center, {k: int(v) for k, v in metrics.items() if k.startswith(_GROUP_PREFIX)})
            for key, n in groups.items():
                metrics[key] = n

    def take_refused(self) -> list[dict[str, Any]]:
        """The refusals since the last call (the round's)."""
        new, self._unread = self.refused[self._unread:], len(self.refused)
        return new

    # --- the checks ---

    def _bind(self, node: int, claimed: Any) -> str:
        bound = self.known.get(node)
        if not isinstance(claimed, str) or claimed not in self.centers:
            raise _Refused(f"claims to be {_text(claimed, 80)!r}, not a center of fed.centers"
                           if claimed is not None else "names no center")
        if bound is not None:
            if claimed != bound:
                raise _Refused(f"claims to be {claimed!r}, but node {node} is {bound!r}")
            return bound
        if self.pinned:
            raise _Refused(f"comes from node {node}, which fed.nodes does not list"
                           if claimed not in self.pinned.values() else
                           f"claims to be {claimed!r}, registered as node "
                           f"{next(n for n, c in self.pinned.items() if c == claimed)}")
        holder = next((n for n, c in self.known.items() if c == claimed), None)
        if holder is not None:
            online = set(self.connected()) if self.connected is not None else {holder}
            if holder in online:
                raise _Refused(f"claims to be {claimed!r}, which node {holder} is")
            del self.known[holder]
            self.notes.append(f"{claimed} now answers from node {node} (node {holder} is gone)")
        self.known[node] = claimed
        return claimed

    def _check_counts(self, msg: Message, center: str, kind: str) -> None:
        if kind == "secagg":
            return
        records = msg.content.metric_records
        if kind == "train" and EVALUATION in records:  # validation cases, as in an evaluate reply
            self._check_validation_count(records[EVALUATION].get(NUM_EXAMPLES), center)
        if METRICS not in records:
            return
        n = records[METRICS].get(NUM_EXAMPLES)
        if kind == "train":
            if not _whole(n) or not 1 <= n <= self.max_cases:
                raise _Refused(f"'{NUM_EXAMPLES}' must be a case count in 1..{self.max_cases} "
                               f"(fed.max_cases), got {_text(n, 40)}")
            n = int(n)
            if center in self.declared and n > self.declared[center]:
                raise _Refused(f"claims {n} training cases; its data card declared "
                               f"{self.declared[center]} (fed.declared_cases)")
            if center in self.cases and n != self.cases[center]:
                raise _Refused(f"claims {n} training cases; its first accepted update "
                               f"had {self.cases[center]}")
            groups = {k: v for k, v in msg.content[METRICS].items() if k.startswith(_GROUP_PREFIX)}
            for key, v in groups.items():
                if not (_whole(v) and 0 <= v <= n):
                    raise _Refused(f"'{key}' must be a count in 0..{n}, got {_text(v, 40)}")
            if center in self.group_cases and groups != self.group_cases[center]:
                raise _Refused(f"claims volume counts {_text(groups, 120)}; its first accepted "
                               f"update had {self.group_cases[center]}")
        else:
            self._check_validation_count(n, center)

    def _check_validation_count(self, n: Any, center: str) -> None:
        top = min(self.max_cases, self.declared.get(center, self.max_cases))
        if n is not None and not (_whole(n) and 0 <= n <= top):
            raise _Refused(f"'{NUM_EXAMPLES}' must be a case count in 0..{top}, "
                           f"got {_text(n, 40)}")

    def _refuse(self, node: int, claimed: Any, kind: str, rnd: int, reason: str) -> None:
        self.refused.append({
            "round": int(rnd), "exchange": kind, "node": node,
            "center": self.known.get(node, f"node-{node}"),
            "claimed": _text(claimed, 80) if claimed is not None else None,
            "reason": reason})


class _Refused(Exception):
    """Why the gate refuses a reply."""


def _check_layout(msg: Message, kind: str, arrays: Mapping[str, np.ndarray] | None,
                  transfer_dtype: str, models: Iterable[str]) -> None:
    content = msg.content
    metric_names = set(content.metric_records)
    array_names = set(content.array_records)
    if kind == "train":
        wanted_metrics, wanted_arrays = {METRICS, EVALUATION}, {ARRAYS}
    elif kind == "evaluate":
        wanted_metrics, wanted_arrays = {METRICS}, set()
    elif kind == "cross-site":
        wanted_metrics, wanted_arrays = {f"{METRICS}:{m}" for m in models}, set()
    elif kind == "query":  # who the center is: its name, nothing else
        wanted_metrics, wanted_arrays = set(), set()
    else:  # secagg: Flower's records; only the shared metrics are read
        wanted_metrics, wanted_arrays = metric_names, array_names
    extra = sorted(metric_names - wanted_metrics) + sorted(array_names - wanted_arrays)
    if extra:
        raise _Refused(f"carries unexpected records {_text(', '.join(extra[:3]), 120)}")
    if kind in ("train", "evaluate") and METRICS not in metric_names:
        raise _Refused(f"lacks '{METRICS}'")
    if kind == "train" and ARRAYS not in array_names:
        raise _Refused(f"lacks '{ARRAYS}'")
    for name in sorted(metric_names):
        _check_metrics(name, content[name])
    if kind == "train" and arrays is not None:
        record = content[ARRAYS]
        missing, extra = sorted(set(arrays) - set(record)), sorted(set(record) - set(arrays))
        if missing or extra:
            raise _Refused(f"weights differ from the global model (missing {_few(missing)}; "
                           f"unexpected {_text(_few(extra), 120)})")
        itemsize = np.dtype(transfer_dtype).itemsize
        for key, ref in arrays.items():
            array = record[key]
            if array.stype != "numpy.ndarray" or array.dtype != transfer_dtype:
                raise _Refused(f"'{key}' has dtype {_text(array.dtype, 20)}, expected "
                               f"{transfer_dtype}")
            if tuple(array.shape) != tuple(ref.shape):
                raise _Refused(f"'{key}' has shape {_text(tuple(array.shape), 60)}, expected "
                               f"{tuple(ref.shape)}")
            if len(array.data) > ref.size * itemsize + _ARRAY_SLACK:
                raise _Refused(f"'{key}' holds {len(array.data)} bytes, more than its shape "
                               f"{tuple(ref.shape)} needs")


def _check_metrics(record_name: str, record: Mapping[str, Any]) -> None:
    if len(record) > MAX_METRICS:
        raise _Refused(f"'{record_name}' holds {len(record)} metrics (at most {MAX_METRICS})")
    for key, value in record.items():
        if not (isinstance(key, str) and len(key) <= MAX_METRIC_NAME and METRIC_NAME.fullmatch(key)):
            raise _Refused(f"metric name {_text(key, 80)!r} is not allowed (letters, digits, "
                           f"'_', '.', '-' in '/'-separated parts, no '.' or '..' part, at most "
                           f"{MAX_METRIC_NAME} characters)")
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value)):
            raise _Refused(f"metric '{key}' is not a finite number ({_text(value, 40)})")


def _whole(n: Any) -> bool:
    """An integer count: an int, or a float holding one (MetricRecords may carry either)."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return False
    return isinstance(n, int) or (math.isfinite(n) and float(n).is_integer())


def reason_text(reason: Any) -> str:
    """An error reply's reason as the coordinator records it: bounded, printable text (it is
    the center's)."""
    return _text(reason, _REASON_CHARS)


def _text(value: Any, limit: int) -> str:
    """`value` as bounded, printable text (it comes from a center)."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    return text if len(text) <= limit else text[:limit] + "..."


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
            result.failed.append({"center": center, "reason": reason_text(msg.error.reason)})
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
        if not all(isinstance(v, (int, float)) and math.isfinite(float(v)) for v in values):
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
        if value.shape != ref.shape or value.dtype != np.dtype(transfer_dtype):
            return (f"'{key}' decodes to shape {value.shape} and dtype {value.dtype}, not the "
                    f"{tuple(ref.shape)} {transfer_dtype} it declares"), math.nan
        if not np.isfinite(value).all():
            return f"'{key}' holds NaN or Inf", math.nan
        d = value.astype(np.float64).ravel() - ref.astype(np.float64).ravel()
        total += float(np.dot(d, d))
    return None, math.sqrt(total)


def _few(keys: list[Any]) -> str:
    return "none" if not keys else ", ".join(map(str, keys[:3])) + (" ..." if len(keys) > 3 else "")
