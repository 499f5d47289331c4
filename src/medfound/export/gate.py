"""The gate every export passes, whatever the task: the network exported with
torch.onnx.export (dynamo) to a staged file, onnxruntime against torch on random patches
(parity.json), and the rule for a task's own quality gate (CPM for the detector, Dice for the
segmenter): its record goes into parity.json and the card, and a failure turns model.onnx into
model.onnx.rejected without a card."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfound.errors import MedfoundError
from medfound.export.card import _write_json, write_card
from medfound.infer.engine import sha256_of
from medfound.outputs import disk_error, is_disk_error

INPUT_NAME = "image"
FP32_RTOL = 1e-4  # the parity bound for fp32: max |onnx - torch| / max |torch| per output


def network_config(meta: dict[str, Any], model_dir: Path, config_type: Any) -> Any:
    """The package's network config: `config_type.from_dict` of model.json's "model" section."""
    try:
        return config_type.from_dict(meta["model"])
    except KeyError:
        raise MedfoundError("model.json has no 'model' section", path=model_dir / "model.json",
                            hint="re-train: the package was not written by medfound") from None


class ListOutputNetwork(nn.Module):
    """RetinaNet with a flat tuple output: (cls_0..cls_L, box_0..box_L).

    MONAI's network returns ``{"classification": [...], "box_regression": [...]}``; ONNX graphs
    have named flat outputs, so the wrapper fixes one order — the order MONAI's
    `predict_with_inferer` stitches them in (all classification levels, then all box levels).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network(image)
        return tuple(out[self.network.cls_key]) + tuple(out[self.network.box_reg_key])


class TupleOutputNetwork(nn.Module):
    """A one-tensor network (the segmenter) with the tuple output the exporter and gate expect."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.network(image),)


def as_tuple_output(network: nn.Module) -> nn.Module:
    """The exportable form of `network`: RetinaNet → ListOutputNetwork, else TupleOutputNetwork."""
    return ListOutputNetwork(network) if hasattr(network, "cls_key") else TupleOutputNetwork(network)


def export_and_gate(network: nn.Module, cfg: Any, divisible: Sequence[int], out_dir: Path, names: list[str], *,
                    opset: int | None, dynamic: bool, parity_patches: int, seed: int, rtol: float
                    ) -> tuple[Path, dict[str, Any]]:
    """Export `network` (config `cfg`: n_input_channels, sw_roi_size, patch_size) to a staged
    file in `out_dir` — after removing an older model.onnx, staged or rejected file — and run
    the random-patch parity gate (parity.json). Returns (staged file, parity report); the caller
    renames the staged file to model.onnx. A failed gate leaves it as model.onnx.rejected."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / ".model.onnx.staged"
    for stale in (out_dir / "model.onnx", staged, out_dir / "model.onnx.rejected"):
        stale.unlink(missing_ok=True)
    _export_network(network, cfg.n_input_channels, cfg.sw_roi_size, divisible, staged, names,
                    opset=opset, dynamic=dynamic)
    try:
        parity = check_parity(network, staged, _parity_shapes(cfg, dynamic), out_dir / "parity.json",
                              patches=parity_patches, seed=seed, rtol=rtol)
    except MedfoundError:
        # Keep the rejected file for inspection, under a name nothing will load by mistake.
        staged.replace(out_dir / "model.onnx.rejected")
        raise
    return staged, parity


def record_quality_gate(out_dir: Path, parity: dict[str, Any], card: dict[str, Any], key: str,
                        quality: dict[str, Any], failure: str, hint: str) -> None:
    """Record a quality gate's result (`quality`, with "passed") under `key` in parity.json and
    the model card; on failure reject the export and raise `failure`, else rewrite the card."""
    parity[key] = card["parity"][key] = quality
    _write_json(out_dir / "parity.json", parity)
    if not quality["passed"]:
        reject(out_dir)
        raise MedfoundError(failure, path=out_dir / "parity.json", hint=hint)
    write_card(out_dir, card)


def reject(out_dir: Path) -> None:
    """A model.onnx that failed a quality gate becomes model.onnx.rejected, without its card."""
    (out_dir / "model.onnx").replace(out_dir / "model.onnx.rejected")
    (out_dir / "model_card.json").unlink(missing_ok=True)


def check_parity(network: nn.Module, onnx_path: str | Path, shapes: Sequence[Sequence[int]],
                 out_json: str | Path | None = None, patches: int = 3, seed: int = 0,
                 rtol: float = FP32_RTOL) -> dict[str, Any]:
    """Run torch and onnxruntime (CPU) on the same random [0, 1] patches and compare outputs.

    For each output: max abs error and relative error = max |onnx - torch| / max |torch| (an
    element-wise ratio would explode on logits near zero; scaling by the output's range is what
    a score or box offset can tolerate). Writes the report to `out_json` when given and raises
    `MedfoundError` when any relative error exceeds `rtol` or an output is not finite.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    wrapper = as_tuple_output(network).eval()
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for a broken graph
        raise MedfoundError(f"onnxruntime cannot load the exported graph ({err})", path=onnx_path,
                            hint="re-export; try another --opset") from None
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    worst: dict[str, dict[str, float]] = {n: {"max_abs": 0.0, "max_rel": 0.0} for n in names}
    runs = []
    for shape in shapes:
        for _ in range(patches):
            x = rng.random(tuple(shape), dtype=np.float32)
            with torch.no_grad():
                ref = [t.numpy() for t in wrapper(torch.from_numpy(x))]
            got = session.run(names, {session.get_inputs()[0].name: x})
            for name, a, b in zip(names, got, ref, strict=True):
                if a.shape != b.shape:
                    raise MedfoundError(f"ONNX output {name} has shape {a.shape}, torch {b.shape}",
                                        path=onnx_path, hint="re-export the package")
                abs_err = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
                scale = float(np.max(np.abs(b))) if b.size else 0.0
                rel_err = abs_err / max(scale, np.finfo(np.float32).tiny)
                if not (np.isfinite(a).all() and np.isfinite(abs_err)):
                    abs_err = rel_err = math.inf
                worst[name]["max_abs"] = max(worst[name]["max_abs"], abs_err)
                worst[name]["max_rel"] = max(worst[name]["max_rel"], rel_err)
        runs.append({"shape": list(shape), "patches": patches})
    max_abs = max(w["max_abs"] for w in worst.values())
    max_rel = max(w["max_rel"] for w in worst.values())
    report = {
        "passed": bool(max_rel <= rtol),
        "precision": "fp32",
        "rtol": rtol,
        "relative_error": "max |onnx - torch| / max |torch|, per output",
        "max_abs": max_abs,
        "max_rel": max_rel,
        "inputs": {"kind": "random uniform [0, 1]", "seed": seed, "runs": runs},
        "outputs": worst,
        "provider": "CPUExecutionProvider",
        "onnx_sha256": sha256_of(onnx_path),
    }
    if out_json is not None:
        _write_json(Path(out_json), report)
    if not report["passed"]:
        bad = max(worst, key=lambda n: worst[n]["max_rel"])
        raise MedfoundError(
            f"ONNX parity failed: output {bad} differs from torch by {worst[bad]['max_rel']:.3g} "
            f"relative (max abs {worst[bad]['max_abs']:.3g}), bound {rtol:g}",
            path=onnx_path.parent / "parity.json" if out_json is not None else onnx_path,
            hint="do not deploy this file; re-export (another --opset) or report the exporter bug")
    return report


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's per-op chatter (e.g. 'torchvision is not installed') for one export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export",
                                               "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_network(network: nn.Module, channels: int, example_size: Sequence[int], div: Sequence[int],
                    path: Path, names: list[str], *, opset: int | None, dynamic: bool) -> None:
    """torch.onnx.export (dynamo) of `network` as a tuple-output graph; the example input is
    (1, channels, *example_size); `dynamic`: batch and spatial axes symbolic, spatial sizes
    multiples of `div`."""
    wrapper = as_tuple_output(network).eval()
    example = torch.rand(1, channels, *example_size, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = None
    if dynamic:
        # Spatial sizes are symbolic multiples of size_divisible, which is what lets the exporter
        # prove the strided convolutions and the upsampling line up for every size.
        axes = {0: torch.export.Dim("batch", min=1, max=1024)}
        for n, (axis, d) in enumerate(zip("ijk", div, strict=True)):
            axes[2 + n] = d * torch.export.Dim(f"blocks_{axis}", min=1, max=max(2, 8192 // d))
        dynamic_shapes = {"image": axes}
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(wrapper, (example,), str(path), dynamo=True, input_names=[INPUT_NAME],
                              output_names=names, opset_version=opset, dynamic_shapes=dynamic_shapes,
                              external_data=False, optimize=True, verbose=False)
    except Exception as err:
        if is_disk_error(err):
            needed = sum(p.numel() * p.element_size() for p in network.parameters())
            raise disk_error(err, path.parent, needed=needed) from err
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MedfoundError(f"torch.onnx.export failed ({type(err).__name__}: {first})", path=path.parent,
                            hint="try dynamic=False (medfound export --fixed-shape) or another --opset") from err
    if not path.is_file():
        raise MedfoundError("torch.onnx.export wrote no file", path=path)


def _parity_shapes(cfg: Any, dynamic: bool) -> list[list[int]]:
    """Input shapes the gate checks: the sliding-window roi (what inference feeds) and, for a
    dynamic graph, the training patch and a batch of two as well."""
    c = cfg.n_input_channels
    shapes = [[1, c, *cfg.sw_roi_size]]
    if dynamic:
        shapes += [[1, c, *cfg.patch_size], [2, c, *cfg.sw_roi_size]]
    unique: list[list[int]] = []
    for s in shapes:
        if s not in unique:
            unique.append(s)
    return unique
