"""Training checkpoints: atomic save, checked load, and the RNG states that make resume exact.

A checkpoint is a plain dict saved with `torch.save` (see `medfound.train.loop.fit` for its
keys). It holds only tensors, numbers, strings and lists/dicts/tuples of them, so it loads with
``torch.load(weights_only=True)``: opening a checkpoint never runs code from the file.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfound.errors import MedfoundError

__all__ = [
    "capture_rng_state",
    "load_checkpoint",
    "load_model_state",
    "restore_rng_state",
    "save_checkpoint",
    "state_mismatch",
]


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically: a crash mid-write leaves the previous file intact,
    and a full or read-only disk is a one-line `MedfoundError` (the temporary file removed)."""
    from medfound.outputs import disk_error, is_disk_error

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_error(err):
            raise disk_error(err, path) from err
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; `MedfoundError` if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MedfoundError("no checkpoint to resume from", path=path,
                            hint="start without resume, or point out_dir at a run that saved one")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise MedfoundError(f"checkpoint cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})",
                            path=path, hint="the file is damaged or not a medfound checkpoint") from err
    if not isinstance(state, dict) or "model" not in state:
        raise MedfoundError("not a medfound checkpoint (no 'model' entry)", path=path)
    return state


def state_mismatch(own: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                   may_lack: Callable[[str], bool] | None = None) -> str | None:
    """Why `weights` do not fit a model whose state_dict is `own` ("missing: …; unexpected: …;
    shape differs: …", three keys of each at most), or None when they fit. Keys for which
    `may_lack` is true may be absent from `weights`."""
    missing = sorted(k for k in set(own) - set(weights) if not (may_lack and may_lack(k)))
    unexpected = sorted(set(weights) - set(own))
    reshaped = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    parts = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected),
                                ("shape differs", reshaped)) if keys]
    return "; ".join(parts) or None


def load_model_state(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load `weights` strictly; a different architecture gives a `MedfoundError` naming `source`."""
    problem = state_mismatch(model.state_dict(), weights)
    if problem:
        raise MedfoundError(f"checkpoint is from an incompatible model ({problem})",
                            path=source, hint="use the model config the checkpoint was trained with, "
                                              "or start a new out_dir")
    model.load_state_dict(weights)


def capture_rng_state(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """Every random stream a training epoch draws from: python, numpy, torch (CPU, CUDA), loaders."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global stream is the one to save)
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def restore_rng_state(state: Mapping[str, Any], generators: Iterable[torch.Generator] = ()) -> None:
    """Inverse of `capture_rng_state`, with the same `generators` in the same order."""
    random.setstate(_as_tuple(state["python"]))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generators = list(generators)
    if len(generators) != len(state["generators"]):
        raise MedfoundError(f"checkpoint holds {len(state['generators'])} data-loader generator "
                            f"state(s) but the loader has {len(generators)}",
                            hint="resume with the same data loader settings as the interrupted run")
    for g, g_state in zip(generators, state["generators"], strict=True):
        g.set_state(g_state)


def _as_tuple(value: Any) -> Any:
    # random.setstate wants tuples; a checkpoint round trip may hand back lists.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
