"""Benchmark: which body for the foundation encoder, and how fast it pretrains.

Two measurements, in one run on one machine, on random volumes (the cost does not depend on
the content):

1. Body candidates side by side, at one patch size (64×64×32, batch 4): a training step of the
   encoder alone (forward, loss = mean of the deepest features, backward, AdamW) for
   - the 3D ResNet body medfound uses (MONAI ResNet stages, the tiny detector's widths),
   - the same ResNet twice as wide with a fourth stage (more weights than the Swin below), and
   - the Swin-ViT body of MONAI's SwinUNETR (SwinTransformer: patch 2, window 7, depths
     2-2-2-2, heads 3-6-12-24, feature size 12, the smallest SwinUNETR setting):
   weights, seconds per step, volumes per second. One (CT) stem each.
2. The full pretraining step of the recipe (configs/task/pretrain.yaml: two masked views per
   volume, reconstruction + InfoNCE, backward, AdamW) at its patch size and batch: volumes/s.

    python benchmarks/pretrain_throughput.py [--device cpu|cuda] [--steps 10]

Writes benchmarks/results/pretrain_throughput.json and .md (the device in the file name when it
is not the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from read_series import machine, write_results  # noqa: E402

from medfound.models.foundation import FOUNDATION_PRESETS, FoundationEncoder  # noqa: E402
from medfound.train import pretrain as task  # noqa: E402

TASK = yaml.safe_load((HERE.parent / "configs" / "task" / "pretrain.yaml").read_text())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, steps: int, device: torch.device) -> float:
    """Median seconds of `steps` calls of `step` after one warm-up call."""
    times = []
    for n in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if n:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def body_step(name: str, patch: list[int], batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    if name.startswith("resnet"):
        cfg = {**FOUNDATION_PRESETS["tiny"], "modalities": ["ct"]}
        if name == "resnet-wide":
            cfg.update(block_inplanes=[16, 32, 64, 128], stages=4)
        enc = FoundationEncoder(cfg).to(device)

        def forward(x):
            return enc(x, ["ct"] * x.shape[0])[-1]
    else:
        from monai.networks.nets.swin_unetr import SwinTransformer

        enc = SwinTransformer(in_chans=1, embed_dim=12, window_size=(7, 7, 7), patch_size=(2, 2, 2),
                              depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)).to(device)

        def forward(x):
            return enc(x)[-1]
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, *patch, device=device)

    def step():
        loss = forward(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = timed(step, steps, device)
    return {"body": name, "params": sum(p.numel() for p in enc.parameters()), "patch": patch,
            "batch": batch, "median_s_per_step": s, "volumes_per_s": batch / s}


def pretrain_step(steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = task.build(TASK["encoder"], seed=0).to(device)
    params = task.loss_params(TASK["loss"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, patch = int(TASK["batch_size"]), list(TASK["patch_size"])
    mods = (["ct", "mr", "pet", "us"] * batch)[:batch]
    data = {"view1": torch.rand(batch, 1, *patch, device=device),
            "view2": torch.rand(batch, 1, *patch, device=device), "modality": mods}

    def step():
        loss = task.train_step(model, data, params)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = timed(step, steps, device)
    return {"params": sum(p.numel() for p in model.parameters()),
            "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
            "patch": patch, "batch": batch, "median_s_per_step": s, "volumes_per_s": batch / s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    bodies = [body_step(name, [64, 64, 32], 4, args.steps, device)
              for name in ("resnet", "resnet-wide", "swin")]
    full = pretrain_step(args.steps, device)
    res, wide, swin = bodies
    doc = {"benchmark": "pretrain_throughput", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": machine(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch_threads": torch.get_num_threads(), "bodies": bodies, "pretrain_step": full,
           "resnet_over_swin_volumes_per_s": res["volumes_per_s"] / swin["volumes_per_s"],
           "resnet_wide_over_swin_volumes_per_s": wide["volumes_per_s"] / swin["volumes_per_s"]}
    suffix = "" if device.type == "cpu" else "_" + device.type
    m = doc["machine"]
    lines = [f"# pretrain_throughput — {doc['when']}", "",
             f"{m['cpu']}, {m['cores']} cores, torch threads {doc['torch_threads']}; device: "
             f"{doc['device']}.", "",
             "| body | weights | patch | batch | s/step | volumes/s |", "|---|---|---|---|---|---|"]
    for b in bodies:
        lines.append(f"| {b['body']} | {b['params'] / 1e3:.0f} k | {'×'.join(map(str, b['patch']))} | "
                     f"{b['batch']} | {b['median_s_per_step']:.3f} | {b['volumes_per_s']:.1f} |")
    lines += ["", f"ResNet body: {doc['resnet_over_swin_volumes_per_s']:.1f}× the Swin-ViT body's "
              f"volumes per second; the wide ResNet (more weights than the Swin): "
              f"{doc['resnet_wide_over_swin_volumes_per_s']:.1f}×.", "",
              f"Full pretraining step (two masked views, reconstruction + InfoNCE), patch "
              f"{'×'.join(map(str, full['patch']))}, batch {full['batch']}: "
              f"{full['volumes_per_s']:.1f} volumes/s ({full['median_s_per_step']:.3f} s/step, "
              f"{full['params'] / 1e3:.0f} k weights of which the encoder {full['encoder_params'] / 1e3:.0f} k)."]
    write_results(f"pretrain_throughput{suffix}", doc, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
