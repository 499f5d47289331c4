"""Benchmark: the deployed inference path (onnxruntime + numpy) against torch and MONAI.

Three measurements, side by side in one run, same weights, same inputs, same thread count:

1. Network only, one sliding window, CPU: torch eager fp32 vs onnxruntime fp32 vs onnxruntime
   INT8 (static QDQ, per-channel, calibrated on phantom windows), for the `tiny` detector at the
   phantom geometry (window 128×128×64) and the `reference` ResNet-50 FPN (window 192×192×80,
   its training patch). Median seconds per window over `--reps` runs after one warm-up.
2. End to end on a `--size full` phantom CT (512×512, 2.5 mm or thinner slices): `medfound
   infer`'s path (read DICOM, canonical axes + resample + HU window in numpy, sliding window
   through onnxruntime, numpy box logic) against MONAI's own path on the same weights (MONAI
   transforms: LoadVolumed, Spacingd, ScaleIntensityRanged, then RetinaNetDetector with its
   SlidingWindowInferer), with the stage breakdown. The detector is the tiny design at the tiny
   preset's 1.4 mm spacing with a 128×128×64 window.
3. The physical floor: the network's FLOPs for that study (per window, counted by torch's
   FlopCounterMode, × the number of windows) divided by the measured float32 matrix-multiply rate
   of the same machine and threads, beside the measured network time.

    python benchmarks/inference.py [--threads 2] [--reps 5] [--ref-reps 2] [--skip-reference]

Weights are random (seeded): speed does not depend on them. Phantoms and exports go to
benchmarks/_data/ (not committed). Writes benchmarks/results/inference.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = HERE / "_data"
sys.path.insert(0, str(HERE))

from read_series import machine, write_results  # noqa: E402

from medfound.export.gate import INPUT_NAME, ListOutputNetwork  # noqa: E402
from medfound.export.onnx import export_model_package  # noqa: E402
from medfound.export.quantize import quantize_int8  # noqa: E402
from medfound.infer import OnnxDetector  # noqa: E402
from medfound.infer.sliding_window import window_starts  # noqa: E402
from medfound.models.detection import DetectorConfig, build_network, size_divisible  # noqa: E402
from medfound.train.package import save_model_package  # noqa: E402

TINY = {"spacing_mm": [2.8125, 2.8125, 3.0], "patch_size": [64, 64, 32], "sw_roi_size": [128, 128, 64]}
TINY_FULL = {"spacing_mm": [1.40625, 1.40625, 2.5], "patch_size": [64, 64, 32],
             "sw_roi_size": [128, 128, 64]}
REFERENCE = {"sw_roi_size": [192, 192, 80]}


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up (allocations, onnxruntime's first-run graph work)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def export(preset: str, geometry: dict, folder: Path, fixed: bool, rtol: float = 1e-4
           ) -> tuple[torch.nn.Module, Path]:
    cfg = DetectorConfig.preset(preset, **geometry)
    network = build_network(cfg, seed=0).eval()
    package = save_model_package(folder / "model", network, task="lung_nodule_detection",
                                 model_config=cfg.to_dict(),
                                 preprocessing={"spacing_mm": cfg.spacing_mm, "hu_window": cfg.hu_window,
                                                "orientation": "LPS"})
    export_model_package(package, folder / "exp", dynamic=not fixed, parity_patches=1, rtol=rtol,
                         allow_unvalidated=True)  # speed only: random weights
    return network, folder / "exp"


def network_only(preset: str, geometry: dict, threads: int, reps: int, with_int8: bool) -> dict:
    """torch eager vs onnxruntime fp32 (and INT8) on one window of the sliding-window size."""
    folder = DATA / f"infer_{preset}"
    # The random-weight ResNet-50 FPN misses the 1e-4 gate narrowly (1.1e-4 measured on box_0):
    # for timing, the bound is relaxed to 1e-3 and the measured error is reported.
    network, exp = export(preset, geometry, folder, fixed=True, rtol=1e-4 if preset == "tiny" else 1e-3)
    parity = json.loads((exp / "parity.json").read_text())
    cfg = DetectorConfig.preset(preset, **geometry)
    rng = np.random.default_rng(0)
    shape = (1, 1, *cfg.sw_roi_size)
    # lung-like intensities in [0, 1]: mostly ~0.13 with brighter structures
    x = np.clip(rng.normal(0.15, 0.1, shape), 0, 1).astype(np.float32)
    wrapper = ListOutputNetwork(network).eval()
    xt = torch.from_numpy(x)

    def run_torch():
        with torch.no_grad():
            wrapper(xt)

    ort_fp32 = OnnxDetector(exp, providers="cpu", threads=threads)
    row = {"preset": preset, "window": list(cfg.sw_roi_size), "parity_max_rel": parity["max_rel"],
           "torch_eager_fp32_s": statistics.median(timed(run_torch, reps)),
           "onnxruntime_fp32_s": statistics.median(timed(lambda: ort_fp32.network(x), reps))}
    if with_int8:
        calib = [np.clip(rng.normal(0.15, 0.1, shape), 0, 1).astype(np.float32) for _ in range(4)]
        int8_path = quantize_int8(exp / "model.onnx", folder / "model.int8.onnx", calib,
                                  input_name=INPUT_NAME)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(str(int8_path), opts, providers=["CPUExecutionProvider"])
        row["onnxruntime_int8_s"] = statistics.median(
            timed(lambda: sess.run(None, {INPUT_NAME: x}), reps))
    row["speedup_fp32"] = row["torch_eager_fp32_s"] / row["onnxruntime_fp32_s"]
    if "onnxruntime_int8_s" in row:
        row["speedup_int8"] = row["torch_eager_fp32_s"] / row["onnxruntime_int8_s"]
    print(json.dumps(row), flush=True)
    return row


def full_ct() -> Path:
    root = DATA / "full_ct"
    if not (root / "phantoms.json").is_file():
        from medfound.data.phantoms import make_phantoms

        make_phantoms(root, centers=1, cases=1, seed=7, size="full")
    return next((root / "center_0").glob("case_*/ct"))


def matmul_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    s = statistics.median(timed(lambda: torch.mm(a, b), 5))
    return 2 * 2048**3 / s / 1e9


def window_flops(network: torch.nn.Module, roi: list[int]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, *roi)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ListOutputNetwork(network).eval()(x)
    return float(counter.get_total_flops())


def end_to_end(threads: int, study: Path) -> dict:
    """medfound infer's path vs MONAI's path on one full-size CT, same weights."""
    from medfound.data.detection import eval_transforms
    from medfound.infer.study import detect_study
    from medfound.models.detection import build_detector

    network, exp = export("tiny", TINY_FULL, DATA / "infer_full", fixed=False)
    cfg = DetectorConfig.preset("tiny", **TINY_FULL)
    ort_det = OnnxDetector(exp, providers="cpu", threads=threads)
    detect_study(ort_det, study, threshold=1.0)  # warm-up: file cache, onnxruntime first run
    ours = []
    for _ in range(2):
        volume, _, facts = detect_study(ort_det, study, threshold=1.0)
        ours.append(facts["timings_s"])
    ours_t = {k: min(t[k] for t in ours) for k in ours[0]}
    shape = facts["input_shape"]

    detector = build_detector(cfg, network).eval()
    transform = eval_transforms(cfg.to_dict())
    monai_t = []
    for _ in range(2):
        t0 = time.perf_counter()
        data = transform({"image": str(study), "box": [], "label": []})
        t1 = time.perf_counter()
        with torch.no_grad():
            detector([data["image"]], use_inferer=True)
        t2 = time.perf_counter()
        monai_t.append({"read_and_preprocess": t1 - t0, "network_and_postprocess": t2 - t1})
    monai = {k: min(t[k] for t in monai_t) for k in monai_t[0]}

    padded = [max(int(np.ceil(s / d) * d), r)
              for s, d, r in zip(shape, size_divisible(cfg), cfg.sw_roi_size, strict=True)]
    n_windows = int(np.prod([len(s) for s in window_starts(padded, cfg.sw_roi_size, cfg.sw_overlap)]))
    flops = window_flops(network, cfg.sw_roi_size) * n_windows
    rate = matmul_gflops(threads)
    row = {
        "study_shape": list(volume.shape), "spacing_mm": [round(s, 4) for s in volume.spacing],
        "network_input_shape": shape, "windows": n_windows, "window": cfg.sw_roi_size,
        "medfound_infer_s": ours_t, "medfound_infer_total_s": sum(ours_t.values()),
        "monai_s": monai, "monai_total_s": sum(monai.values()),
        "network_gflop": flops / 1e9, "matmul_gflops": rate,
        "floor_network_s": flops / 1e9 / rate,
    }
    row["speedup_total"] = row["monai_total_s"] / row["medfound_infer_total_s"]
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ref-reps", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    DATA.mkdir(parents=True, exist_ok=True)

    nets = [network_only("tiny", TINY, args.threads, args.reps, with_int8=True)]
    if not args.skip_reference:
        nets.append(network_only("reference", REFERENCE, args.threads, args.ref_reps, with_int8=True))
    e2e = end_to_end(args.threads, full_ct())

    result = {"benchmark": "inference", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(), "threads": args.threads, "device": "cpu",
              "gpu": "none measured: the lent GPU machine's image has only the CPU onnxruntime",
              "network_only": nets, "end_to_end": e2e}
    m = result["machine"]
    lines = [f"# inference — {result['when']}", "",
             f"{m['cpu']}, {m['cores']} cores; torch and onnxruntime both at {args.threads} threads.", "",
             "Network only, one sliding window, median seconds:", "",
             "| model | window | torch eager fp32 | onnxruntime fp32 | onnxruntime INT8 | fp32 speed-up | INT8 speed-up | fp32 parity (max rel) |",
             "|---|---|---|---|---|---|---|---|"]
    for n in nets:
        lines.append(f"| {n['preset']} | {'×'.join(map(str, n['window']))} | {n['torch_eager_fp32_s']:.3f} "
                     f"| {n['onnxruntime_fp32_s']:.3f} | {n.get('onnxruntime_int8_s', float('nan')):.3f} "
                     f"| {n['speedup_fp32']:.2f}× | {n.get('speedup_int8', float('nan')):.2f}× "
                     f"| {n['parity_max_rel']:.1e} |")
    o, mo = e2e["medfound_infer_s"], e2e["monai_s"]
    lines += ["", f"End to end, one full phantom CT {'×'.join(map(str, e2e['study_shape']))} "
              f"({e2e['spacing_mm']} mm) → network input {'×'.join(map(str, e2e['network_input_shape']))}, "
              f"{e2e['windows']} windows of {'×'.join(map(str, e2e['window']))}, seconds (best of 2):", "",
              "| path | read | preprocess | network | postprocess | total |", "|---|---|---|---|---|---|",
              f"| medfound infer (onnxruntime + numpy) | {o['read']:.2f} | {o['preprocess']:.2f} "
              f"| {o['network']:.2f} | {o['postprocess']:.2f} | {e2e['medfound_infer_total_s']:.2f} |",
              f"| MONAI transforms + RetinaNetDetector (torch) | {mo['read_and_preprocess']:.2f} (read + preprocess) "
              f"| | {mo['network_and_postprocess']:.2f} (network + postprocess) | | {e2e['monai_total_s']:.2f} |",
              "", f"medfound infer is {e2e['speedup_total']:.2f}× faster end to end.", "",
              f"Physical floor: {e2e['network_gflop']:.1f} GFLOP for the study's windows at the measured "
              f"{e2e['matmul_gflops']:.0f} GFLOP/s float32 matmul rate = {e2e['floor_network_s']:.2f} s, "
              f"against {o['network']:.2f} s measured for the network.", "",
              f"GPU: {result['gpu']}."]
    write_results("inference", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
