"""The model package: what a training run leaves in RUN/model/ for evaluation and export.

    RUN/model/weights.pt     the network's state_dict (tensors only; loaded with weights_only)
    RUN/model/model.json     task, network config, preprocessing, metrics, versions, provenance
    RUN/model/config.yaml    the fully resolved Hydra config of the run

A package is written to a temporary folder and renamed into place, so a crash never leaves a
half-written package behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from medfound import __version__
from medfound.errors import MedfoundError, read_json
from medfound.train.checkpoint import state_mismatch

WEIGHTS = "weights.pt"
MODEL_JSON = "model.json"
CONFIG_YAML = "config.yaml"


def save_model_package(path: str | Path, network: torch.nn.Module, *, task: str,
                       model_config: dict[str, Any], preprocessing: dict[str, Any],
                       metrics: dict[str, Any] | None = None, config_yaml: str = "",
                       provenance: dict[str, Any] | None = None) -> Path:
    """Write a model package to `path` atomically (replacing an older one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        net = getattr(network, "module", network)  # unwrap DistributedDataParallel
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp / WEIGHTS)
        meta = {
            "format": "medfound-model/1",
            "task": task,
            "model": model_config,
            "preprocessing": preprocessing,
            "metrics": metrics or {},
            "provenance": provenance or {},
            "versions": {"medfound": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        }
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / CONFIG_YAML).write_text(config_yaml)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_model_json(path: str | Path) -> dict[str, Any]:
    """The package's model.json, with a clear error when `path` is not a package."""
    path = Path(path)
    meta_path = path / MODEL_JSON
    if not meta_path.is_file() or not (path / WEIGHTS).is_file():
        raise MedfoundError("not a model package (needs model.json and weights.pt)", path=path,
                            hint="pass RUN/model from a finished `medfound run train_detector`")
    meta = read_json(meta_path)
    if meta.get("format") != "medfound-model/1":
        raise MedfoundError(f"unknown package format {meta.get('format')!r}", path=meta_path,
                            hint="re-train or re-export with this medfound version")
    return meta


def load_weights(path: str | Path, network: torch.nn.Module) -> torch.nn.Module:
    """Load the package's weights into `network` (built from the package's model config)."""
    weights = Path(path) / WEIGHTS
    state = torch.load(weights, map_location="cpu", weights_only=True)
    problem = state_mismatch(network.state_dict(), state)
    if problem:
        raise MedfoundError(f"weights do not fit the network ({problem})", path=weights,
                            hint="the package's model.json and weights.pt come from different runs")
    network.load_state_dict(state)
    return network
