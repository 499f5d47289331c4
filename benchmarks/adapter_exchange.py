"""Benchmark: adapter-only vs full federated fine-tuning of the detector from the foundation encoder.

Two federations (Flower simulation) of center_0 + center_1 start the detector's backbone from
the same federated-pretrained encoder (benchmarks/segmentation.py writes it; run that first, or
pass --encoder), with `experiment=phantoms_small`, `--rounds` rounds of `--local-epochs`:

- full: every weight trains and travels every round (fed.exchange=all);
- adapters: backbone, FPN, head towers and box-regression conv frozen; only the adapters
  (network.adapter_channels=4: after the backbone stages and each head tower, and a low-rank one
  on the box-regression conv) and the classification conv train
  (finetune.train_only=[adapter,cls_logits]); round 1 sends the whole model, later
  rounds only those weights (fed.exchange=trainable).

Bytes per round are what the coordinator counted on the wire for each center (FED/metrics.json:
train + evaluate messages, both ways); CPM is the packaged global model's on the held-out
center_2 (`evaluate_detector`).

    python benchmarks/adapter_exchange.py [--rounds 10] [--local-epochs 15]

Writes benchmarks/results/adapter_exchange.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from label_efficiency import medfound  # noqa: E402
from read_series import machine  # noqa: E402


def round_bytes(fed: Path) -> list[int]:
    """Bytes on the wire per round, all centers, both directions."""
    rounds = json.loads((fed / "metrics.json").read_text())["rounds"]
    return [sum(c["sent"] + c["received"] for c in r["bytes"].values()) for r in rounds]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=15)  # 150 epochs: the detector leaves
    # the class prior after ~75 (README, detection)
    ap.add_argument("--encoder", type=Path, default=HERE / "_data" / "seg_runs" / "pretrain" / "encoder")
    args = ap.parse_args()
    data = HERE / "_data" / f"seg_{args.cases}"
    if not (args.encoder / "weights.pt").is_file() or not (data / "phantoms.json").is_file():
        sys.exit("run benchmarks/segmentation.py first (it writes the phantoms and the encoder)")
    runs = HERE / "_data" / "adapter_runs"
    shutil.rmtree(runs, ignore_errors=True)
    common = [f"data.root={data}", "fed.centers=[center_0,center_1]", "fed.mode=simulation",
              "experiment=phantoms_small", "trainer.schedule=constant", "trainer.progress=false",
              f"fed.rounds={args.rounds}", f"fed.local_epochs={args.local_epochs}", "fed.cross_site=false",
              f"finetune.init_encoder={args.encoder}"]
    arms = {"full": ["fed.exchange=all"],
            "adapters": ["fed.exchange=trainable", "finetune.freeze_encoder=true", "network.adapter_channels=4",
                         "finetune.train_only=[adapter,cls_logits]"]}
    out: dict[str, dict] = {}
    for arm, extra in arms.items():
        fed = runs / arm
        seconds = medfound("run", "federate", *common, *extra, f"out_dir={fed}")
        medfound("run", "evaluate_detector", f"model={fed / 'model'}", f"data.root={data}",
                 "data.centers=[center_2]", f"out_dir={runs / (arm + '_eval')}")
        metrics = json.loads((runs / (arm + "_eval") / "metrics.json").read_text())
        per_round = round_bytes(fed)
        out[arm] = {"seconds": seconds, "bytes_per_round": per_round, "cpm": metrics["cpm"],
                    "cpm_ci95": metrics.get("cpm_ci95"),
                    "model_bytes_fp32": json.loads((fed / "metrics.json").read_text())["model_bytes_fp32"]}
        print(f"{arm}: CPM {metrics['cpm']:.3f}, bytes per round {per_round}", flush=True)
    full, ad = out["full"], out["adapters"]
    later = ad["bytes_per_round"][1:]
    ratio_later = (sum(later) / len(later)) / (sum(full["bytes_per_round"]) / len(full["bytes_per_round"]))
    ratio_all = sum(ad["bytes_per_round"]) / sum(full["bytes_per_round"])
    doc = {"benchmark": "adapter_exchange", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": machine(), "device": "cpu", "rounds": args.rounds, "local_epochs": args.local_epochs,
           "experiment": "phantoms_small", "train_centers": ["center_0", "center_1"],
           "eval_center": "center_2", **out,
           "bytes_ratio_after_round_1": ratio_later, "bytes_ratio_whole_run": ratio_all,
           "cpm_difference": ad["cpm"] - full["cpm"],
           "goal": {"bytes_ratio": 0.10, "cpm_within": 0.03}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adapter_exchange.json").write_text(json.dumps(doc, indent=2) + "\n")
    m = doc["machine"]
    lines = [
        f"# adapter_exchange — {doc['when']}", "",
        f"{m['cpu']}, {m['cores']} cores; Flower simulation, center_0 + center_1, {args.rounds} rounds × "
        f"{args.local_epochs} local epochs, `experiment=phantoms_small`; CPM on held-out center_2.", "",
        "| federated fine-tuning | bytes round 1 | bytes per later round | CPM (95% CI) |", "|---|---|---|---|",
        *[f"| {name} | {out[a]['bytes_per_round'][0]:,} | "
          f"{sum(out[a]['bytes_per_round'][1:]) / max(len(out[a]['bytes_per_round']) - 1, 1):,.0f} | "
          f"{out[a]['cpm']:.3f} {out[a]['cpm_ci95']} |"
          for a, name in (("full", "full model, every round"), ("adapters", "adapters + classification conv"))],
        "", f"Bytes per round after round 1: {ratio_later:.1%} of a full round (goal ≤ 10%); "
        f"whole run {ratio_all:.1%}. CPM difference {doc['cpm_difference']:+.3f} (goal within 0.03).",
    ]
    (RESULTS / "adapter_exchange.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
