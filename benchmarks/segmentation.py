"""Benchmark: nodule segmentation from scratch vs from the federated-pretrained foundation encoder.

On `--size small --masks` phantoms (3 centers × `--cases` cases, modality mixes CT+PET, CT+MR,
CT+US, as label_efficiency.py):

1. federated self-supervised pretraining (`federate task=pretrain`, Flower simulation) on the
   unlabeled volumes of center_0 and center_1 (every modality they hold);
2. per seed, three segmenters with `experiment=seg_phantoms_small`, trained on center_0 +
   center_1 and scored on the held-out center_2 (mean Dice of the nodule class over its studies,
   as the packaged best validated model records it):
   - scratch;
   - pretrained: encoder from the federated encoder, everything fine-tuned;
   - frozen + adapters: the encoder frozen, adapters, decoder and head trained.
3. the pretrained segmenter exported with `medfound export --data` (parity gate, Dice parity).

    python benchmarks/segmentation.py [--cases 10] [--seeds 0] [--epochs 30]

Phantoms and runs go to benchmarks/_data/ (not committed). Writes
benchmarks/results/segmentation.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from label_efficiency import MIXES, medfound, summary  # noqa: E402
from read_series import machine, write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10, help="cases in the largest center")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10, help="federated pretraining rounds")
    ap.add_argument("--local-epochs", type=int, default=5, help="pretraining epochs per round")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs of an earlier call")
    args = ap.parse_args()

    data = HERE / "_data" / f"seg_{args.cases}"
    runs = HERE / "_data" / "seg_runs"
    if not (data / "phantoms.json").is_file():
        from medfound.data.phantoms import make_phantoms
        make_phantoms(data, centers=3, cases=args.cases, seed=0, modalities=MIXES, size="small", masks=True)
    common = ["trainer.progress=false"]

    encoder = runs / "pretrain" / "encoder"
    pretrain_s = None
    if not (args.reuse and (encoder / "weights.pt").is_file()):
        pretrain_s = medfound("run", "federate", "task=pretrain", "fed.mode=simulation",
                              f"data.root={data}", "fed.centers=[center_0,center_1]",
                              f"fed.rounds={args.rounds}", f"fed.local_epochs={args.local_epochs}",
                              f"out_dir={runs / 'pretrain'}", *common)
    segment = [f"data.root={data}", "data.train_centers=[center_0,center_1]", "data.val_centers=[center_2]",
               "experiment=seg_phantoms_small", f"trainer.epochs={args.epochs}",
               f"trainer.val_every={max(args.epochs // 2, 1)}", *common]
    arms = {"scratch_dice": [],
            "pretrained_dice": [f"finetune.init_encoder={encoder}"],
            "frozen_adapters_dice": [f"finetune.init_encoder={encoder}", "finetune.freeze_encoder=true",
                                     "network.adapter_channels=8"]}
    results: dict[str, list[float]] = {arm: [] for arm in arms}
    nodule: dict[str, list[float]] = {arm: [] for arm in arms}
    seconds: dict[str, list[float | None]] = {arm: [] for arm in arms}
    for seed in args.seeds:
        for arm, extra in arms.items():
            out = runs / f"{arm}_{seed}"
            if args.reuse and (out / "model" / "metrics.json").is_file():
                seconds[arm].append(None)
            else:
                seconds[arm].append(medfound("run", "train_segmenter", *segment, f"seed={seed}",
                                             f"out_dir={out}", *extra))
            packaged = json.loads((out / "model" / "metrics.json").read_text())
            results[arm].append(float(packaged["dice"]))
            nodule[arm].append(float(packaged["nodule_dice"]))
            print(f"seed {seed} {arm}: Dice {results[arm][-1]:.3f}, per nodule {nodule[arm][-1]:.3f} "
                  f"({seconds[arm][-1] or 0:.0f} s)", flush=True)

    exp = runs / "export"
    export_s = medfound("export", str(runs / f"pretrained_dice_{args.seeds[0]}" / "model"), "--out", str(exp),
                        "--data", str(data))
    parity = json.loads((exp / "parity.json").read_text())
    doc = {
        "benchmark": "segmentation", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(), "device": "cpu",
        "phantoms": {"centers": 3, "cases": args.cases, "modalities": MIXES, "size": "small", "masks": True,
                     "train_centers": ["center_0", "center_1"], "eval_center": "center_2"},
        "experiment": "seg_phantoms_small", "epochs": args.epochs, "seeds": args.seeds,
        "pretraining": {"mode": "federated simulation", "rounds": args.rounds,
                        "local_epochs": args.local_epochs, "seconds": pretrain_s},
        **results,
        "nodule_dice": nodule,
        "mean": {arm: statistics.mean(v) for arm, v in results.items()},
        "train_seconds": seconds,
        "export": {"seconds": export_s, "passed": parity["passed"], "max_rel": parity["max_rel"],
                   "dice": parity.get("dice")},
    }
    m, d = doc["machine"], parity.get("dice") or {}
    lines = [
        f"# segmentation — {doc['when']}", "",
        f"{m['cpu']}, {m['cores']} cores; `experiment=seg_phantoms_small`, {args.epochs} epochs; Dice of "
        f"the nodule class on held-out center_2 (seeds {args.seeds}): whole studies (every false positive "
        f"counts) and per nodule (inside a cube of 3× its diameter).", "",
        "| segmenter | Dice per seed | mean ± std | per-nodule Dice |", "|---|---|---|---|",
        *[f"| {name} | {', '.join(f'{v:.3f}' for v in results[arm])} | {summary(results[arm])} | "
          f"{', '.join(f'{v:.3f}' for v in nodule[arm])} |"
          for arm, name in (("scratch_dice", "from scratch"),
                            ("pretrained_dice", "from the federated-pretrained encoder"),
                            ("frozen_adapters_dice", "frozen pretrained encoder + adapters"))],
        "", f"Export of the pretrained segmenter: parity max relative error {parity['max_rel']:.2g}; "
        f"Dice torch {d.get('dice_torch', float('nan')):.4f} vs deployed ONNX path "
        f"{d.get('dice_onnx', float('nan')):.4f}.",
    ]
    write_results("segmentation", doc, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
