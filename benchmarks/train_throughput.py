"""Benchmark: detector training throughput, and what the dataset cache saves per epoch.

Two measurements, in one run on one machine:

1. Network training steps (forward, ATSS matching + hard-negative sampling, losses, backward,
   AdamW step) on patches of each preset's own patch size, for the `tiny` and the `reference`
   (ResNet-50 FPN, 192×192×80) RetinaNet: patches per second, seconds per step, and on CUDA the
   peak GPU memory. Random patches with one box each: the cost does not depend on the content.
2. Epoch wall time of the smoke training on phantoms with `data.cache=memory` against
   `data.cache=none`: epoch 1 reads every DICOM series in both; after that the cached dataset
   only crops, the uncached one reads and resamples again.

    python benchmarks/train_throughput.py [--device cpu|cuda] [--steps 10] [--ref-steps 2]

Phantoms go to benchmarks/_data/ (not committed). Writes benchmarks/results/train_throughput.json
and .md (the device in the file name when it is not the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from read_series import machine, write_results  # noqa: E402

from medfound.data.detection import (  # noqa: E402
    detection_collate,
    load_datalist,
    make_dataset,
    train_transforms,
)
from medfound.models.detection import PRESETS, DetectorConfig, count_parameters  # noqa: E402
from medfound.train import detection as task  # noqa: E402

# One LUNA16 training epoch as MONAI's recipe runs it: 9 of 10 folds' scans (≈ 800 of 888), each
# giving `num_patches_per_image` patches; the estimate covers the network steps only.
LUNA16_TRAIN_SCANS = 800
LUNA16_PATCHES_PER_SCAN = 4
LUNA16_TRAIN_PATCHES = LUNA16_TRAIN_SCANS * LUNA16_PATCHES_PER_SCAN
SMOKE = {"spacing_mm": [2.8125, 2.8125, 3.0], "patch_size": [64, 64, 32],
         "sw_roi_size": [128, 128, 64]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network_steps(preset: str, batch: int, steps: int, device: torch.device) -> dict:
    """Time `steps` training steps (after one warm-up step) of `preset` on `batch` patches."""
    cfg = DetectorConfig.preset(preset)
    network, detector = task.build(cfg.to_dict(), seed=0)
    detector.to(device).train()
    opt = torch.optim.AdamW(network.parameters(), lr=1e-4)
    patch = list(cfg.patch_size)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, *patch, generator=g).to(device)
    lo = torch.tensor(patch, dtype=torch.float32) * 0.4
    box = torch.cat([lo, lo + 8.0])[None].to(device)
    targets = [{"box": box, "label": torch.zeros(1, dtype=torch.long, device=device)}
               for _ in range(batch)]
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, enabled=amp):
            losses = detector(images, targets)
            loss = losses["classification"] + losses["box_regression"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync(device)
        if step > 0:  # step 0 warms up (allocations, kernel selection)
            times.append(time.perf_counter() - t0)
    per_step = statistics.median(times)
    return {
        "preset": preset, "params": count_parameters(network), "patch_size": patch,
        "batch": batch, "steps_timed": steps, "median_s_per_step": per_step,
        "patches_per_s": batch / per_step, "amp": amp,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def epoch_times(root: Path, cache: str, epochs: int, device: torch.device) -> dict:
    """Wall time per epoch of the smoke training (data + steps) with one cache mode."""
    items = load_datalist(root, ["center_0", "center_1"], "training")
    prep = {**PRESETS["tiny"], **SMOKE, "num_patches_per_image": 2}
    t_build = time.perf_counter()
    dataset = make_dataset(items, train_transforms(prep), cache=cache)  # memory: reads here
    build_s = time.perf_counter() - t_build  # counted in epoch 1
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True,
                                         collate_fn=detection_collate,
                                         generator=torch.Generator().manual_seed(0))
    network, detector = task.build({**PRESETS["tiny"], **SMOKE}, seed=0)
    detector.to(device).train()
    opt = torch.optim.AdamW(network.parameters(), lr=1e-3)
    seconds = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for batch in loader:
            batch = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
                     for b in batch]
            loss = task.train_step(detector, batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        seconds.append(time.perf_counter() - t0 + (build_s if not seconds else 0.0))
    return {"cache": cache, "cases": len(items), "epoch_s": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of the tiny model")
    ap.add_argument("--ref-steps", type=int, default=2, help="timed steps of the reference model")
    ap.add_argument("--ref-batch", type=int, default=None,
                    help="reference-model patches per step (default: 4 on CUDA as MONAI's LUNA16 "
                         "recipe, 1 on CPU)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per cache mode")
    ap.add_argument("--cases", type=int, default=4, help="phantom cases per center")
    args = ap.parse_args()
    device = torch.device(args.device)
    threads = torch.get_num_threads()

    nets = [network_steps("tiny", 8, args.steps, device),
            network_steps("reference", args.ref_batch or (4 if device.type == "cuda" else 1),
                          args.ref_steps, device)]
    for n in nets:
        print(f"{n['preset']}: {n['patches_per_s']:.2f} patches/s ({n['median_s_per_step']:.2f} s/step)",
              flush=True)

    root = HERE / "_data" / f"throughput_{args.cases}"
    if not (root / "phantoms.json").is_file():
        from medfound.data.phantoms import make_phantoms
        make_phantoms(root, centers=2, cases=args.cases, seed=0, size="small")
    caches = [epoch_times(root, "memory", args.epochs, device),
              epoch_times(root, "none", args.epochs, device)]
    mem, none = caches
    later = slice(1, None)
    ratio = statistics.mean(none["epoch_s"][later]) / statistics.mean(mem["epoch_s"][later])
    ref = nets[1]
    luna_epoch_s = LUNA16_TRAIN_PATCHES / ref["patches_per_s"]

    result = {
        "benchmark": "train_throughput",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": threads,
        "networks": nets,
        "epochs": caches,
        "uncached_over_cached_epoch_after_first": ratio,
        "reference_luna16_epoch_s_estimate": luna_epoch_s,
    }
    suffix = "" if device.type == "cpu" else "_" + device.type
    lines = [
        f"# train_throughput — {result['when']}",
        "",
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores, torch threads {threads}; "
        f"device: {result['device']}.",
        "",
        "| model | weights | patch | batch | s/step | patches/s | peak GPU MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in nets:
        gpu = "—" if n["peak_gpu_mib"] is None else f"{n['peak_gpu_mib']:.0f}"
        lines.append(f"| {n['preset']} | {n['params'] / 1e6:.2f} M | {'×'.join(map(str, n['patch_size']))} "
                     f"| {n['batch']} | {n['median_s_per_step']:.2f} | {n['patches_per_s']:.2f} | {gpu} |")
    lines += [
        "",
        f"Smoke training epoch ({mem['cases']} cases, tiny model), seconds per epoch "
        "(epoch 1 includes filling the cache):",
        "",
        "| data.cache | " + " | ".join(f"epoch {i + 1}" for i in range(args.epochs)) + " |",
        "|---|" + "---|" * args.epochs,
    ]
    for c in caches:
        lines.append(f"| {c['cache']} | " + " | ".join(f"{s:.1f}" for s in c["epoch_s"]) + " |")
    lines += ["", f"After the first epoch an uncached epoch takes {ratio:.1f}× a cached one.", "",
              f"Reference model, one LUNA16 epoch ({LUNA16_TRAIN_PATCHES} patches: {LUNA16_TRAIN_SCANS} "
              f"training scans × {LUNA16_PATCHES_PER_SCAN} patches, network steps only, data loading "
              f"assumed to keep up): about {luna_epoch_s / 60:.0f} min on this device."]
    write_results(f"train_throughput{suffix}", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
