"""Benchmark: adapter-only vs full federated fine-tuning of a detector, bytes and CPM.

Adapters adapt a model that already does the task; they cannot stand in for heads that were
never trained (a first protocol that started both arms from the pretrained encoder alone, with
random FPN and heads, gave adapters CPM 0 against 0.257: frozen random towers do not learn).
So both arms start from one detector, as a federation would from a foundation model's task
model: `--start-epochs` epochs of `train_detector` on center_0 alone, its backbone from the
federated-pretrained encoder (benchmarks/segmentation.py writes the phantoms and the encoder; run
it first, or pass --encoder). Then two federations (Flower simulation) of center_0 + center_1,
`experiment=phantoms_small`, `--rounds` rounds of `--local-epochs`, start from that detector
(finetune.init_model):

- full: every weight trains and travels every round (fed.exchange=all);
- adapters: backbone, FPN, head towers and box-regression conv frozen; only the adapters
  (network.adapter_channels=4: after the backbone stages and each head tower, and a low-rank one
  on the box-regression conv; they start as the identity) and the classification conv train
  (finetune.train_only=[adapter,cls_logits]); round 1 sends the whole model, later
  rounds only those weights (fed.exchange=trainable).

Bytes per round are what the coordinator counted on the wire for each center (FED/metrics.json:
train + evaluate messages, both ways); CPM is each model's on the held-out center_2
(`evaluate_detector`), the starting detector's included. No checkpoint selection anywhere.

    python benchmarks/adapter_exchange.py [--start-epochs 300] [--rounds 5] [--local-epochs 10]

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
from read_series import machine, write_results  # noqa: E402


def round_bytes(fed: Path) -> list[int]:
    """Bytes on the wire per round, all centers, both directions."""
    rounds = json.loads((fed / "metrics.json").read_text())["rounds"]
    return [sum(c["sent"] + c["received"] for c in r["bytes"].values()) for r in rounds]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--start-epochs", type=int, default=300,
                    help="epochs of the starting detector on center_0")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=10)
    ap.add_argument("--encoder", type=Path, default=HERE / "_data" / "seg_runs" / "pretrain" / "encoder")
    args = ap.parse_args()
    data = HERE / "_data" / f"seg_{args.cases}"
    if not (args.encoder / "weights.pt").is_file() or not (data / "phantoms.json").is_file():
        sys.exit("run benchmarks/segmentation.py first (it writes the phantoms and the encoder)")
    runs = HERE / "_data" / "adapter_runs"
    shutil.rmtree(runs, ignore_errors=True)

    def evaluate(model: Path, name: str) -> dict:
        medfound("run", "evaluate_detector", f"model={model}", f"data.root={data}",
                 "data.centers=[center_2]", f"out_dir={runs / (name + '_eval')}")
        return json.loads((runs / (name + "_eval") / "metrics.json").read_text())

    start = runs / "start"
    start_s = medfound("run", "train_detector", f"data.root={data}", "experiment=phantoms_small",
                       "data.train_centers=[center_0]", "data.val_centers=[center_2]",
                       f"trainer.epochs={args.start_epochs}", f"trainer.val_every={args.start_epochs}",
                       "trainer.progress=false", f"finetune.init_encoder={args.encoder}",
                       f"out_dir={start}")
    start_metrics = evaluate(start / "model", "start")
    print(f"starting detector (center_0 alone): CPM {start_metrics['cpm']:.3f}", flush=True)

    common = [f"data.root={data}", "fed.centers=[center_0,center_1]", "fed.mode=simulation",
              "experiment=phantoms_small", "trainer.schedule=constant", "trainer.progress=false",
              f"fed.rounds={args.rounds}", f"fed.local_epochs={args.local_epochs}", "fed.cross_site=false",
              f"finetune.init_model={start / 'model'}"]
    arms = {"full": ["fed.exchange=all"],
            "adapters": ["fed.exchange=trainable", "network.adapter_channels=4",
                         "finetune.train_only=[adapter,cls_logits]"]}
    out: dict[str, dict] = {}
    for arm, extra in arms.items():
        fed = runs / arm
        seconds = medfound("run", "federate", *common, *extra, f"out_dir={fed}")
        metrics = evaluate(fed / "model", arm)
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
           "eval_center": "center_2",
           "start": {"epochs": args.start_epochs, "center": "center_0", "seconds": start_s,
                     "cpm": start_metrics["cpm"], "cpm_ci95": start_metrics.get("cpm_ci95")},
           **out,
           "bytes_ratio_after_round_1": ratio_later, "bytes_ratio_whole_run": ratio_all,
           "cpm_difference": ad["cpm"] - full["cpm"],
           "goal": {"bytes_ratio": 0.10, "cpm_within": 0.03}}
    write_report(doc)
    return 0


def write_report(doc: dict) -> None:
    """results/adapter_exchange.md from the results document (also: print it)."""
    m, start = doc["machine"], doc["start"]

    def cpm(d: dict) -> str:
        lo, hi = d.get("cpm_ci95") or (None, None)
        return f"{d['cpm']:.3f}" + (f" ({lo:.2f}–{hi:.2f})" if lo is not None else "")

    lines = [
        f"# adapter_exchange — {doc['when']}", "",
        f"{m['cpu']}, {m['cores']} cores. Both arms start from one detector: {start['epochs']} "
        f"epochs on {start['center']} alone from the pretrained encoder, CPM {cpm(start)} on "
        f"{doc['eval_center']}. Then Flower simulation, {' + '.join(doc['train_centers'])}, "
        f"{doc['rounds']} rounds × {doc['local_epochs']} local epochs, "
        f"`experiment={doc['experiment']}`; CPM on held-out {doc['eval_center']}.", "",
        "| federated fine-tuning | bytes round 1 | bytes per later round | CPM (95% CI) |", "|---|---|---|---|",
        *[f"| {name} | {doc[a]['bytes_per_round'][0]:,} | "
          f"{sum(doc[a]['bytes_per_round'][1:]) / max(len(doc[a]['bytes_per_round']) - 1, 1):,.0f} | "
          f"{cpm(doc[a])} |"
          for a, name in (("full", "full model, every round"), ("adapters", "adapters + classification conv"))],
        "", f"Bytes per round after round 1: {doc['bytes_ratio_after_round_1']:.1%} of a full round "
        f"(goal ≤ 10%); whole run {doc['bytes_ratio_whole_run']:.1%}. CPM difference "
        f"{doc['cpm_difference']:+.3f} (goal within 0.03).",
    ]
    write_results("adapter_exchange", doc, "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
