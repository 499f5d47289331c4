"""`OnnxDetector`: an exported network (model.onnx) + its model card → boxes, scores, labels.

An engine runs the network (`open_engine`: `OrtEngine`, onnxruntime on CPU, CUDA or TensorRT;
`OpenVinoEngine`, OpenVINO on CPU in fp32, bf16 or INT8), each exposing the same
``network(batch)`` → raw head outputs; everything around it (padding, sliding window, anchors,
box decoding, selection) is numpy, so this runs where torch and MONAI are not installed. Given
the same preprocessed volume it returns what MONAI's ``RetinaNetDetector(..., use_inferer=True)``
returns for the same weights.

Which engine and precision run is `choose_variant`'s decision, from the model card: the export
gate (`medfound export --data`) records in ``card["variants"]`` each engine × precision it
measured on the validation data, with its CPM against torch fp32 and its speed; ``auto`` picks
the fastest variant that passed and this machine can run, and a variant that failed is refused
even when asked for by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfound.errors import MedfoundError, read_json
from medfound.infer.boxes import (
    cell_anchors,
    decode_boxes,
    grid_anchors,
    reshape_head_output,
    select_boxes,
)
from medfound.infer.sliding_window import sliding_window

__all__ = ["CARD_FORMAT", "ENGINES", "PRECISIONS", "PROVIDER_PREFERENCE", "OnnxDetector",
           "OpenVinoEngine", "OrtEngine", "available_engines", "choose_providers", "choose_variant",
           "cpu_capabilities", "load_model_card", "open_engine", "sha256_of"]

CARD_FORMAT = "medfound-onnx/1"  # written by medfound.export.onnx, read here
# Fastest first; onnxruntime falls back along the list for operators a provider lacks.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ENGINES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (ONNX files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model_card(path: str | Path, precision: str = "fp32") -> tuple[Path, dict[str, Any]]:
    """(ONNX file, model card) from an export folder or a model file beside its card.

    precision: "fp32" or "bf16" (model.onnx, the card's `onnx` section; bf16 is the engine's
    arithmetic on the same file) or "int8" (model.int8.onnx, the card's `int8` section, written
    by `medfound export --int8` only when its CPM was accepted).
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    card_path = folder / "model_card.json"
    if not card_path.is_file():
        raise MedfoundError("no model_card.json beside the ONNX model", path=folder,
                            hint="pass the folder written by `medfound export` (model.onnx + model_card.json)")
    card = read_json(card_path)
    if card.get("format") != CARD_FORMAT:
        raise MedfoundError(f"unknown model card format {card.get('format')!r}", path=card_path,
                            hint=f"re-export with this medfound version (expects {CARD_FORMAT})")
    if precision not in PRECISIONS:
        raise MedfoundError(f"unknown precision {precision!r}", hint="use fp32, bf16 or int8")
    section = card.get("int8" if precision == "int8" else "onnx")
    if precision == "int8" and (not section or section.get("accepted") is False):
        raise MedfoundError("this export has no accepted INT8 model", path=card_path,
                            hint="re-export with --int8 (it is kept only when the CPM drop is small)")
    onnx_path = path if path.is_file() else folder / section.get("file", "model.onnx")
    if not onnx_path.is_file():
        raise MedfoundError("ONNX model file missing", path=onnx_path,
                            hint="re-export: a failed parity gate leaves no model file")
    return onnx_path, card


def open_session(onnx_path: Path, sha256: str | None, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, trt_cache: str | Path | None = None, fp16: bool = False):
    """(onnxruntime InferenceSession, providers used) for an exported model; with `sha256`, the
    file must hash to it (the card's record), else a clear error."""
    import onnxruntime as ort

    if sha256 and sha256_of(onnx_path) != sha256:
        raise MedfoundError(f"{Path(onnx_path).name} does not match the sha256 in model_card.json",
                            path=onnx_path, hint="the file was changed after export; re-export the model")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    chosen = choose_providers(providers)
    provider_options = [_provider_options(p, trt_cache, fp16) for p in chosen]
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=chosen,
                                       provider_options=provider_options)
    except Exception as err:  # onnxruntime raises its own exception types for a bad file
        raise MedfoundError(f"onnxruntime cannot load the model ({err})", path=onnx_path,
                            hint="re-export it with `medfound export`") from None
    return session, chosen


def choose_providers(requested: Sequence[str] | str | None = None) -> list[str]:
    """Execution providers to use: `requested` (all must be available) or, by default, the
    available ones among TensorRT, CUDA, CPU in that order."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        chosen = [p for p in PROVIDER_PREFERENCE if p in available]
        return chosen or list(available)
    requested = [requested] if isinstance(requested, str) else list(requested)
    short = {p.removesuffix("ExecutionProvider").lower(): p for p in available}
    resolved = [short.get(p.lower(), p) for p in requested]
    missing = [p for p in resolved if p not in available]
    if missing:
        raise MedfoundError(f"execution provider(s) {missing} not available in this onnxruntime",
                            hint=f"available: {available} (install onnxruntime-gpu for CUDA/TensorRT)")
    return resolved


# ---------------------------------------------------------------------------------------------
# Engines: one class per runtime, each with network(batch) → the graph's outputs in card order.


class OrtEngine:
    """onnxruntime session on an exported graph (CPU, CUDA or TensorRT providers).

    `io_binding`: bind inputs and outputs with IOBinding (default: on when the first provider
    is CUDA or TensorRT, so the window is copied to the GPU once and the head outputs come back
    in one copy, without onnxruntime's per-run staging)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, output_names: Sequence[str], *, precision: str = "fp32",
                 providers: Sequence[str] | str | None = None, threads: int | None = None,
                 trt_cache: str | Path | None = None, fp16: bool = False,
                 io_binding: bool | None = None):
        if precision == "bf16":
            raise MedfoundError("onnxruntime has no bf16 CPU path for this graph",
                                hint="use --engine openvino --precision bf16, or fp32 / int8")
        self.precision = precision
        self.output_names = list(output_names)
        self.session, self.providers = open_session(onnx_path, None, providers, threads, trt_cache, fp16)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.batch_dim = first.shape[0] if isinstance(first.shape[0], int) else None
        gpu = self.providers[0] in _GPU_PROVIDERS
        self.io_binding = gpu if io_binding is None else bool(io_binding)
        self._device = "cuda" if gpu else "cpu"

    @property
    def device(self) -> str:
        return f"onnxruntime {', '.join(self.providers)}"

    def network(self, batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, np.float32)
        if not self.io_binding:
            return self.session.run(self.output_names, {self.input_name: batch})
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name,
                                    ort.OrtValue.ortvalue_from_numpy(batch, self._device, 0))
        for name in self.output_names:  # allocated by onnxruntime on the provider's device
            binding.bind_output(name, self._device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


class OpenVinoEngine:
    """OpenVINO on the CPU: fp32 (INFERENCE_PRECISION_HINT=f32), bf16 (hint bf16; only on a
    CPU whose OPTIMIZATION_CAPABILITIES list BF16) or int8 (the QDQ model.int8.onnx, its
    unquantized operations in f32).

    The graph is compiled once per input shape met (the sliding window feeds one or two), each
    with static shapes, which OpenVINO's CPU plugin runs faster than a dynamic graph."""

    name = "openvino"
    _HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}

    def __init__(self, onnx_path: Path, output_names: Sequence[str], *, precision: str = "fp32",
                 threads: int | None = None):
        ov = _import_openvino()
        if precision not in self._HINT:
            raise MedfoundError(f"unknown precision {precision!r}", hint="use fp32, bf16 or int8")
        if precision == "bf16" and not cpu_capabilities()["bf16"]:
            raise MedfoundError("this CPU has no bf16 arithmetic (OpenVINO lists no BF16 among its "
                                "OPTIMIZATION_CAPABILITIES)", hint="use --precision fp32 or int8")
        self.precision = precision
        self.output_names = list(output_names)
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(str(onnx_path))
        except Exception as err:  # OpenVINO raises its own exception types for a bad file
            raise MedfoundError(f"OpenVINO cannot read the model ({str(err).splitlines()[0][:200]})",
                                path=onnx_path, hint="re-export it with `medfound export`") from None
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self._HINT[precision],
                                        "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        port = self._model.inputs[0]
        self.input_name = port.get_any_name()
        first = port.get_partial_shape()[0]
        self.batch_dim = first.get_length() if first.is_static else None
        self.providers = [f"OpenVINO CPU ({self._HINT[precision]})"]
        self.io_binding = False
        self._compiled: dict[tuple[int, ...], Any] = {}

    @property
    def device(self) -> str:
        return self.providers[0]

    def _request(self, shape: tuple[int, ...]) -> Any:
        request = self._compiled.get(shape)
        if request is None:
            model = self._model.clone()
            if not model.inputs[0].get_partial_shape().is_static:
                model.reshape({self.input_name: list(shape)})
            try:
                compiled = self._core.compile_model(model, "CPU", self._config)
            except Exception as err:
                raise MedfoundError(f"OpenVINO cannot compile the model for input {list(shape)} "
                                    f"({str(err).splitlines()[0][:200]})",
                                    hint="use --engine onnxruntime") from None
            request = compiled.create_infer_request()
            self._compiled[shape] = request
        return request

    def network(self, batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, np.float32)
        request = self._request(tuple(batch.shape))
        request.infer({0: batch})
        return [np.array(request.get_tensor(name).data) for name in self.output_names]


def _import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise MedfoundError("OpenVINO is not installed", hint="pip install 'medfound[infer]' "
                            "(or pip install openvino), or use --engine onnxruntime") from None
    return ov


def available_engines() -> list[str]:
    """The engines importable here, in ENGINES order."""
    import importlib.util

    return [e for e in ENGINES if importlib.util.find_spec(e) is not None]


def cpu_capabilities() -> dict[str, Any]:
    """This machine's CPU as the engines see it: ``cpu`` (its name), ``flags`` (the
    /proc/cpuinfo flags that matter for inference: avx2, avx512f, avx512_vnni, avx512_bf16,
    amx_bf16, amx_int8), ``openvino`` (OpenVINO's OPTIMIZATION_CAPABILITIES for the CPU, None
    without OpenVINO) and ``bf16`` (whether OpenVINO lists BF16: native bf16 arithmetic, by
    AVX512_BF16 or AMX)."""
    import platform

    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "model name":
                    name = value.strip()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    caps = None
    if "openvino" in available_engines():
        ov = _import_openvino()
        core = ov.Core()
        caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
        name = str(core.get_property("CPU", "FULL_DEVICE_NAME")) if name in ("", "x86_64") else name
    return {"cpu": name, "flags": [f for f in wanted if f in flags], "openvino": caps,
            "bf16": bool(caps and "BF16" in caps)}


def open_engine(onnx_path: Path, output_names: Sequence[str], engine: str = "onnxruntime",
                precision: str = "fp32", *, sha256: str | None = None,
                providers: Sequence[str] | str | None = None, threads: int | None = None,
                trt_cache: str | Path | None = None, fp16: bool = False,
                io_binding: bool | None = None) -> OrtEngine | OpenVinoEngine:
    """The engine `engine` ("onnxruntime" or "openvino") on `onnx_path` at `precision`; with
    `sha256`, the file must hash to it (the card's record), else a clear error. `providers`,
    `trt_cache`, `fp16` and `io_binding` are onnxruntime's."""
    if sha256 and sha256_of(onnx_path) != sha256:
        raise MedfoundError(f"{Path(onnx_path).name} does not match the sha256 in model_card.json",
                            path=onnx_path, hint="the file was changed after export; re-export the model")
    if engine == "onnxruntime":
        return OrtEngine(onnx_path, output_names, precision=precision, providers=providers,
                         threads=threads, trt_cache=trt_cache, fp16=fp16, io_binding=io_binding)
    if engine == "openvino":
        if providers is not None or trt_cache is not None or fp16:
            raise MedfoundError("execution providers, --trt-cache and --fp16 are onnxruntime's",
                                hint="drop them, or use --engine onnxruntime")
        return OpenVinoEngine(onnx_path, output_names, precision=precision, threads=threads)
    raise MedfoundError(f"unknown engine {engine!r}", hint=f"use one of {', '.join(ENGINES)} or auto")


# ---------------------------------------------------------------------------------------------
# Which variant runs: the card's gate record, this machine, the request.


def _variant_key(v: dict[str, Any]) -> tuple[str, str]:
    return str(v.get("engine")), str(v.get("precision"))


def _ungated_allowed(card: dict[str, Any], engine: str, precision: str) -> str | None:
    """Why `engine` `precision` may run although the card's variants do not record it (None:
    it may not): fp32 is the model the random-patch parity gate checked; onnxruntime INT8 the
    one the INT8 CPM gate accepted."""
    if precision == "fp32":
        return "the fp32 model passed the export's parity gate"
    if precision == "int8" and engine == "onnxruntime" and (card.get("int8") or {}).get("accepted"):
        return "its CPM drop passed the export's INT8 gate"
    return None


def choose_variant(card: dict[str, Any], engine: str = "auto", precision: str = "auto", *,
                   providers: Sequence[str] | str | None = None, folder: Path | None = None,
                   caps: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine and precision to run and why: {"engine", "precision", "reason"}.

    A variant the card's ``variants`` record as failed (ΔCPM against torch fp32 over the gate's
    bound) is never chosen; asked for by name it is a MedfoundError. ``auto`` (engine and/or
    precision) picks, among the passed variants this machine can run (its engine installed,
    bf16 only on a CPU with bf16 arithmetic, its file in `folder`), the fastest per window as
    measured at export; a card without variants (exported without --data) runs the fp32
    model, with onnxruntime when the engine is auto. With onnxruntime providers asked for, or
    a GPU provider present, the engine is onnxruntime.
    """
    if engine not in ("auto", *ENGINES):
        raise MedfoundError(f"unknown engine {engine!r}", hint=f"use auto, {', '.join(ENGINES)}")
    if precision not in ("auto", *PRECISIONS):
        raise MedfoundError(f"unknown precision {precision!r}", hint=f"use auto, {', '.join(PRECISIONS)}")
    if "segmentation" in card:
        if precision not in ("auto", "fp32"):
            raise MedfoundError(f"a segmenter export runs in fp32 only, not {precision}",
                                hint="drop --precision / --int8")
        chosen = "onnxruntime" if engine == "auto" else engine
        return {"engine": chosen, "precision": "fp32",
                "reason": "a segmenter export runs in fp32" + (
                    "; onnxruntime is the default engine" if engine == "auto" else ", as asked")}
    caps = cpu_capabilities() if caps is None else caps
    installed = available_engines()
    variants = [v for v in card.get("variants") or [] if isinstance(v, dict)]
    recorded = {_variant_key(v): v for v in variants}

    def unusable(e: str, p: str) -> str | None:
        """Why `e` `p` cannot run here (None: it can)."""
        if p == "int8" and (card.get("int8") or {}).get("accepted") is False:
            return "this export has no accepted INT8 model (it failed the INT8 CPM gate)"
        v = recorded.get((e, p))
        if v is not None and not v.get("passed"):
            return f"it failed the export gate ({v.get('reason', 'no reason recorded')})"
        if v is None and _ungated_allowed(card, e, p) is None:
            return ("the export gate did not measure it (export with --data to measure every "
                    "engine and precision)")
        if e not in installed:
            return f"{e} is not installed"
        if p == "bf16" and not caps.get("bf16"):
            return "this CPU has no bf16 arithmetic (OpenVINO lists no BF16)"
        if p == "int8" and not (card.get("int8") or {}).get("file"):
            return "the export has no INT8 model"
        if folder is not None:
            file = (card.get("int8" if p == "int8" else "onnx") or {}).get("file")
            if file and not (Path(folder) / file).is_file():
                return f"{file} is missing from the export"
        return None

    if engine == "auto" and (providers is not None or _gpu_provider()):
        engine = "onnxruntime"
        why_engine = ("onnxruntime providers were asked for" if providers is not None
                      else "a GPU execution provider is available")
        if precision == "auto":
            precision = "fp32"
        bad = unusable(engine, precision)
        if bad:
            raise MedfoundError(f"onnxruntime {precision} cannot be used: {bad}",
                                hint="choose another --precision")
        return {"engine": engine, "precision": precision,
                "reason": f"{why_engine}; {precision} as asked" if precision != "fp32" or
                          providers is not None else f"{why_engine}; fp32 on it"}
    if engine != "auto" and precision != "auto":
        bad = unusable(engine, precision)
        if bad:
            raise MedfoundError(f"{engine} {precision} is not used: {bad}", hint=_usable_hint(
                [(e, p) for e in ENGINES for p in PRECISIONS if not unusable(e, p)]))
        v = recorded.get((engine, precision))
        return {"engine": engine, "precision": precision, "reason": "as asked; " + (
            _measured(v) if v else _ungated_allowed(card, engine, precision)
            + " (not measured on the validation data: exported without --data)")}
    engines = list(ENGINES) if engine == "auto" else [engine]
    precisions = list(PRECISIONS) if precision == "auto" else [precision]
    candidates = [v for v in variants if v.get("engine") in engines
                  and v.get("precision") in precisions and v.get("passed")
                  and v.get("seconds_per_window") is not None]
    runnable = [v for v in candidates if unusable(*_variant_key(v)) is None]
    if runnable:
        best = min(runnable, key=lambda v: float(v["seconds_per_window"]))
        left = [f"{e} {p}: {unusable(e, p)}" for e, p in map(_variant_key, candidates)
                if unusable(e, p)]
        failed = [f"{e} {p}" for e, p in recorded if not recorded[(e, p)].get("passed")]
        reason = (f"the fastest of {len(runnable)} variant(s) the export gate passed that this "
                  f"machine can run; {_measured(best)}")
        if left:
            reason += "; not runnable here: " + "; ".join(left)
        if failed:
            reason += "; failed the gate, never used: " + ", ".join(failed)
        return {"engine": best["engine"], "precision": best["precision"], "reason": reason}
    # No measured variant fits: the parity-gated fp32 model (or the accepted INT8 one).
    fallback = [(e, p) for p in precisions for e in (["onnxruntime", "openvino"] if engine == "auto"
                                                      else engines)
                if (e, p) not in recorded and unusable(e, p) is None]
    if not fallback:
        raise MedfoundError(f"no usable variant for --engine {engine} --precision {precision}: "
                            + "; ".join(f"{e} {p}: {unusable(e, p)}" for e in engines
                                        for p in precisions), hint=_usable_hint(
            [(e, p) for e in ENGINES for p in PRECISIONS if not unusable(e, p)]))
    e, p = fallback[0]
    why = ("the card records no measured variants (exported without --data)" if not variants
           else "no measured variant fits the request")
    return {"engine": e, "precision": p,
            "reason": f"{why}: {e} {p}, since {_ungated_allowed(card, e, p)}"}


def _measured(v: dict[str, Any]) -> str:
    cpu = (v.get("cpu") or {}).get("cpu")
    speed = v.get("seconds_per_window")
    return (f"the export gate passed it: CPM {v.get('cpm', float('nan')):.4f}, ΔCPM "
            f"{v.get('delta', float('nan')):+.4f} against torch fp32"
            + (f", {float(speed):.3g} s per window" if speed is not None else "")
            + (f" on {cpu}" if cpu else ""))


def _usable_hint(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return "re-export the model with `medfound export --data ROOT`"
    return "usable here: " + ", ".join(f"--engine {e} --precision {p}" for e, p in pairs)


def _gpu_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return any(p in ort.get_available_providers() for p in _GPU_PROVIDERS)


class OnnxDetector:
    """Nodule detector from an export folder (or model.onnx beside its model_card.json).

    `engine` ("onnxruntime", "openvino" or "auto") and `precision` ("fp32", "bf16", "int8" or
    "auto"): what runs the network, decided by `choose_variant` from the card's gate record
    (``self.choice``: engine, precision and the reason, which `medfound infer` prints and
    records). `providers`: onnxruntime execution providers ("cpu", "cuda", "tensorrt" or full
    names); default: the best available. `threads`: the engine's intra-op threads (None: its
    default). `verify_sha256`: refuse a model file whose hash differs from the card's (a file
    swapped or corrupted after export). TensorRT options: `trt_cache` (a folder: built engines
    are kept there and reused by the next process, which skips minutes of engine building) and
    `fp16` (let TensorRT run fp16 kernels). `io_binding`: onnxruntime's IOBinding (see
    `OrtEngine`; default on for CUDA and TensorRT). `check_gate=False` runs `engine`
    `precision` as named without consulting the card's gate record: the export gate measuring it.
    """

    def __init__(self, model: str | Path, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, verify_sha256: bool = True, precision: str = "fp32",
                 trt_cache: str | Path | None = None, fp16: bool = False,
                 io_binding: bool | None = None, engine: str = "onnxruntime",
                 check_gate: bool = True):
        _, card = load_model_card(model)
        if "detector" not in card:
            raise MedfoundError(f"this export is a {card.get('task')!r} model, not a detector",
                                path=Path(model) if Path(model).is_dir() else Path(model).parent,
                                hint="load a segmentation export with medfound.infer.segment.OnnxSegmenter")
        folder = Path(model) if Path(model).is_dir() else Path(model).parent
        if check_gate:
            self.choice = choose_variant(card, engine, precision, providers=providers, folder=folder)
        else:  # the export gate, measuring the variant it names
            self.choice = {"engine": engine, "precision": precision,
                           "reason": "measured by the export gate"}
        self.precision = self.choice["precision"]
        self.onnx_path, self.card = load_model_card(folder if Path(model).is_dir() or
                                                    self.precision == "int8" else model,
                                                    self.precision)
        self.sha256 = self.card["int8" if self.precision == "int8" else "onnx"]["sha256"]
        det = self.card["detector"]
        self.detector = det
        self.output_names = list(self.card["onnx"]["output_names"])
        self.num_levels = int(det["num_levels"])
        self.num_anchors = int(det["num_anchors_per_location"])
        self.cells = cell_anchors(det["base_anchor_shapes"], det["feature_map_scales"])
        self.engine = open_engine(self.onnx_path, self.output_names, self.choice["engine"],
                                  self.precision, sha256=self.sha256 if verify_sha256 else None,
                                  providers=providers, threads=threads, trt_cache=trt_cache,
                                  fp16=fp16, io_binding=io_binding)
        # A graph exported with a fixed batch of 1 cannot take sw_batch_size windows at once.
        batch_dim = self.engine.batch_dim
        self.sw_batch_size = int(det["sw_batch_size"]) if batch_dim is None else batch_dim

    @property
    def providers(self) -> list[str]:
        """onnxruntime's execution providers in use, or the OpenVINO device and hint."""
        return list(self.engine.providers)

    @property
    def io_binding(self) -> bool:
        return bool(self.engine.io_binding)

    def network(self, batch: np.ndarray) -> list[np.ndarray]:
        """The exported network on a (n, C, i, j, k) float32 batch: cls_0..cls_L, box_0..box_L."""
        return self.engine.network(batch)

    def head_outputs(self, volume: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        """Sliding-window head outputs on `volume` padded at the end to `size_divisible`.

        Returns (outputs in output_names order, padded spatial size) — MONAI's
        `preprocess_images` + `predict_with_inferer`.
        """
        det = self.detector
        image = _as_batch(volume, int(self.card["input"].get("channels", 1)))
        size = list(image.shape[2:])
        padded = [int(np.ceil(s / d) * d) for s, d in zip(size, det["size_divisible"], strict=True)]
        if padded != size:
            image = np.pad(image, [(0, 0), (0, 0), *[(0, p - s) for p, s in zip(padded, size, strict=True)]])
        outs = sliding_window(image, self.network, det["sw_roi_size"], det["sw_overlap"],
                              mode=det["sw_mode"], sigma_scale=det.get("sw_sigma_scale", 0.125),
                              batch_size=self.sw_batch_size, pad_value=det.get("sw_padding_value", 0.0))
        return outs, padded

    def predict(self, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detections on one preprocessed volume.

        `volume`: (i, j, k) or (C, i, j, k) float, already resampled to the card's spacing_mm and
        scaled to [0, 1] (see `medfound.infer.preprocess`). Returns boxes (N, 6) float32 xyzxyz
        in voxels of `volume` (voxel n covers [n, n + 1)), scores (N,) float32 in [0, 1] and
        labels (N,) int64, highest score first.
        """
        outs, padded = self.head_outputs(volume)
        return self.postprocess(outs, padded, list(np.shape(volume)[-3:]))

    def postprocess(self, outs: Sequence[np.ndarray], padded: Sequence[int], size: Sequence[int]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`head_outputs` → boxes, scores, labels: anchors, box decoding, per-level top-k,
        score threshold and NMS (MONAI's `postprocess_detections`). `size`: the unpadded
        volume's (i, j, k), to which boxes are clipped."""
        det = self.detector
        cls_maps, box_maps = outs[: self.num_levels], outs[self.num_levels:]
        grids = [m.shape[2:] for m in cls_maps]
        anchors = grid_anchors(self.cells, grids, padded)
        boxes, logits = [], []
        for cls_map, box_map, level_anchors in zip(cls_maps, box_maps, anchors, strict=True):
            rel = reshape_head_output(box_map, self.num_anchors)[0]
            boxes.append(decode_boxes(rel, level_anchors, det["box_coder_weights"], det["box_xform_clip"]))
            logits.append(reshape_head_output(cls_map, self.num_anchors)[0])
        return select_boxes(boxes, logits, list(size), score_thresh=det["score_thresh"],
                            topk_candidates_per_level=det["topk_candidates_per_level"],
                            nms_thresh=det["nms_thresh"], detections_per_img=det["detections_per_img"],
                            apply_sigmoid=det.get("apply_sigmoid", True))


def _provider_options(provider: str, trt_cache: str | Path | None, fp16: bool) -> dict[str, Any]:
    if provider != "TensorrtExecutionProvider":
        return {}
    opts: dict[str, Any] = {"trt_fp16_enable": bool(fp16)}
    if trt_cache is not None:
        Path(trt_cache).mkdir(parents=True, exist_ok=True)
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache),
                    trt_timing_cache_enable=True, trt_timing_cache_path=str(trt_cache))
    return opts


def _as_batch(volume: np.ndarray, channels: int) -> np.ndarray:
    arr = np.asarray(volume, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] != channels:
        raise MedfoundError(f"volume must be (i, j, k) or ({channels}, i, j, k), got shape {arr.shape}",
                            hint="pass one preprocessed volume (see medfound.infer.preprocess)")
    return arr[None]
