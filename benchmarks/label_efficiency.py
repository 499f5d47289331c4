"""Benchmark: label efficiency of the federated-pretrained foundation encoder.

On `--size small` phantoms (3 centers × `--cases` cases; every center has CT, and each one a
second modality: PET, MR, ultrasound):

1. federated self-supervised pretraining (`federate task=pretrain`, Flower simulation) on the
   unlabeled volumes of center_0 and center_1 (every modality they hold);
2. for each seed, three detectors with `--experiment` (default phantoms_small), trained on
   center_0 + center_1 and scored on the held-out center_2 (LUNA16 CPM of the packaged, best
   validated model, as the detection recipe reports it):
   - pretrained, 25%: `finetune.init_encoder=<the federated encoder>`, `data.label_fraction=0.25`;
   - scratch, 25%: the same 25% of the labeled cases (same seed draws the same cases);
   - scratch, 100%: every labeled training case.

    python benchmarks/label_efficiency.py [--cases 10] [--seeds 0 1 2] [--rounds 10]

Phantoms and runs go to benchmarks/_data/ (not committed). Writes
benchmarks/results/label_efficiency.json (``pretrained_cpm``, ``scratch_cpm``,
``scratch_full_cpm``: one value per seed) and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from read_series import machine, write_results  # noqa: E402

MIXES = "ct,pet;ct,mr;ct,us"


def medfound(*args: str) -> float:
    """Run a medfound command; its wall time in seconds (exits on failure with its output)."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "medfound", *args], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"failed: medfound {' '.join(args)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def cpm(run: Path) -> float:
    return float(json.loads((run / "model" / "metrics.json").read_text())["cpm"])


def summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10, help="cases in the largest center")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fraction", type=float, default=0.25, help="share of labeled cases")
    ap.add_argument("--experiment", default="phantoms_small")
    ap.add_argument("--epochs", type=int, default=None, help="override trainer.epochs")
    ap.add_argument("--rounds", type=int, default=10, help="federated pretraining rounds")
    ap.add_argument("--local-epochs", type=int, default=5, help="pretraining epochs per round")
    ap.add_argument("--reuse", action="store_true",
                    help="keep finished runs of an earlier call (their packaged metrics) and train "
                         "only what is missing")
    args = ap.parse_args()

    data = HERE / "_data" / f"label_eff_{args.cases}"
    runs = HERE / "_data" / "label_eff_runs"
    if not (data / "phantoms.json").is_file():
        from medfound.data.phantoms import make_phantoms
        make_phantoms(data, centers=3, cases=args.cases, seed=0, modalities=MIXES, size="small")
    if not args.reuse:
        shutil.rmtree(runs, ignore_errors=True)
    common = ["trainer.progress=false"]

    encoder = runs / "pretrain" / "encoder"
    pretrain_s = None  # not measured again when an earlier call's encoder is reused
    if not (encoder / "weights.pt").is_file():
        pretrain_s = medfound("run", "federate", "task=pretrain", "fed.mode=simulation",
                              f"data.root={data}", "fed.centers=[center_0,center_1]",
                              f"fed.rounds={args.rounds}", f"fed.local_epochs={args.local_epochs}",
                              f"out_dir={runs / 'pretrain'}", *common)
    pre_metrics = json.loads((runs / "pretrain" / "metrics.json").read_text())["global"]
    print(f"federated pretraining: {pretrain_s or float('nan'):.0f} s, validation reconstruction "
          f"{pre_metrics[0].get('reconstruction', float('nan')):.4f} → "
          f"{pre_metrics[-1].get('reconstruction', float('nan')):.4f}", flush=True)

    detect = [f"data.root={data}", "data.train_centers=[center_0,center_1]",
              "data.val_centers=[center_2]", f"experiment={args.experiment}", *common,
              *([f"trainer.epochs={args.epochs}"] if args.epochs else [])]
    arms = {"pretrained_cpm": [f"data.label_fraction={args.fraction}",
                               f"finetune.init_encoder={encoder}"],
            "scratch_cpm": [f"data.label_fraction={args.fraction}"],
            "scratch_full_cpm": []}
    results: dict[str, list[float]] = {arm: [] for arm in arms}
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    for seed in args.seeds:
        for arm, extra in arms.items():
            out = runs / f"{arm}_{seed}"
            if args.reuse and (out / "model" / "metrics.json").is_file():
                seconds[arm].append(None)  # finished by an earlier call
            else:
                seconds[arm].append(medfound("run", "train_detector", *detect, f"seed={seed}",
                                             f"out_dir={out}", *extra))
            results[arm].append(cpm(out))
            took = "earlier run" if seconds[arm][-1] is None else f"{seconds[arm][-1]:.0f} s"
            print(f"seed {seed} {arm}: CPM {results[arm][-1]:.3f} ({took})", flush=True)

    doc = {
        "benchmark": "label_efficiency", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(), "device": "cpu",
        "phantoms": {"centers": 3, "cases": args.cases, "modalities": MIXES, "size": "small",
                     "train_centers": ["center_0", "center_1"], "eval_center": "center_2"},
        "experiment": args.experiment, "epochs": args.epochs, "label_fraction": args.fraction,
        "seeds": args.seeds,
        "pretraining": {"mode": "federated simulation", "centers": ["center_0", "center_1"],
                        "rounds": args.rounds, "local_epochs": args.local_epochs,
                        "seconds": pretrain_s, "global": pre_metrics},
        **results,
        "mean": {arm: statistics.mean(v) for arm, v in results.items()},
        "std": {arm: statistics.stdev(v) if len(v) > 1 else 0.0 for arm, v in results.items()},
        "train_seconds": seconds,
        "pretrained_beats_scratch": statistics.mean(results["pretrained_cpm"])
        > statistics.mean(results["scratch_cpm"]),
    }
    m = doc["machine"]
    lines = [
        f"# label_efficiency — {doc['when']}", "",
        f"{m['cpu']}, {m['cores']} cores; `experiment={args.experiment}`; held-out center_2 CPM "
        f"(mean ± std over seeds {args.seeds}).", "",
        "| detector | labeled cases | CPM per seed | mean ± std |", "|---|---|---|---|",
        f"| fine-tuned from the federated-pretrained encoder | {args.fraction:.0%} | "
        f"{', '.join(f'{v:.3f}' for v in results['pretrained_cpm'])} | "
        f"{summary(results['pretrained_cpm'])} |",
        f"| from scratch | {args.fraction:.0%} | {', '.join(f'{v:.3f}' for v in results['scratch_cpm'])} "
        f"| {summary(results['scratch_cpm'])} |",
        f"| from scratch | 100% | {', '.join(f'{v:.3f}' for v in results['scratch_full_cpm'])} | "
        f"{summary(results['scratch_full_cpm'])} |",
        "", f"Federated pretraining: {args.rounds} rounds × {args.local_epochs} local epochs"
        + (f", {pretrain_s / 60:.1f} min." if pretrain_s else " (an earlier call's encoder)."),
    ]
    write_results("label_efficiency", doc, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
