"""Validated config dataclasses from mappings (plain dicts, Hydra DictConfigs, model.json).

Every tunable of a model or a trainer is a key of a frozen dataclass (DetectorConfig,
SegmenterConfig, FoundationConfig, TrainerConfig). They are all built the same way, by
`from_mapping`: plain values, no unknown key, no missing key (or the class's defaults), then the
class's own `_validate()`. Every error names the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from medfound.errors import MedfoundError

__all__ = ["from_mapping", "plain"]

T = TypeVar("T")


def plain(value: Any) -> Any:
    """Hydra DictConfig/ListConfig, tuples → plain dicts and lists (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, what: str, *,
                 defaults: Mapping[str, Any] | None = None, ignore: Sequence[str] = ("name",),
                 hint: str = "") -> T:
    """An instance of the dataclass `cls` from `values`, validated.

    what: how errors name the config ("model config", "trainer config").
    defaults: values for keys the mapping may leave out (a field with a dataclass default may
    always be left out). ignore: keys dropped silently (a Hydra group's `name`).
    hint: what to do about a missing key. Raises `MedfoundError` naming the keys; calls the
    instance's `_validate()` when it has one.
    """
    values = plain(values if values is not None else {})
    if not isinstance(values, dict):
        raise MedfoundError(f"{what} must be a mapping of keys to values, got {type(values).__name__}")
    values = {**dict(defaults or {}), **{k: v for k, v in values.items() if k not in ignore}}
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise MedfoundError(f"{what}: unknown key(s) {unknown}", hint=f"valid keys are {names}")
    optional = {f.name for f in fields
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    missing = [n for n in names if n not in values and n not in optional]
    if missing:
        raise MedfoundError(f"{what}: missing key(s) {missing}", hint=hint or None)
    cfg = cls(**values)
    if hasattr(cfg, "_validate"):
        cfg._validate()
    return cfg
