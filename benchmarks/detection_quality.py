"""Benchmark: the phantom detector's quality, pooled vs each local center (issue 4's bar: CPM ≥ 0.80).

On `--size small` phantoms (3 centers × `--cases` cases, the data of benchmarks/segmentation.py
and label_efficiency.py), `train_detector experiment=phantoms_small` (default) is trained on

- pooled: center_0 + center_1;
- local center_0 and local center_1: one center alone;

and each packaged model (the best validated one, as the recipe keeps it) is scored on the held-out
center_2 with the LUNA16 protocol (CPM, FROC, bootstrap CI), as `train_detector` reports it.
center_2 is both the validation center that picks the checkpoint and the one scored, so that
figure is optimistic; the benchmark also reports every validation's CPM (from the run's MLflow
history) and the last one's, which no selection touched.

    python benchmarks/detection_quality.py [--cases 10] [--experiment phantoms_small] [--seed 0]

Phantoms and runs go to benchmarks/_data/ (not committed). Writes
benchmarks/results/detection_quality.json and .md.
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

from label_efficiency import MIXES, medfound  # noqa: E402
from read_series import machine, write_results  # noqa: E402

ARMS = {"pooled": ["center_0", "center_1"], "local center_0": ["center_0"],
        "local center_1": ["center_1"]}
BAR = 0.80


def validation_curve(run: Path) -> dict[int, float]:
    """Epoch → validation CPM, from the MLflow run the recipe left in RUN/mlflow_run.json."""
    from mlflow.tracking import MlflowClient

    from medfound.train.tracking import RUN_FILE

    ref = json.loads((run / RUN_FILE).read_text())
    history = MlflowClient(ref["tracking_uri"]).get_metric_history(ref["run_id"], "val/cpm")
    return {int(m.step): float(m.value) for m in sorted(history, key=lambda m: m.step)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10, help="cases in the largest center")
    ap.add_argument("--experiment", default="phantoms_small")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    data = HERE / "_data" / f"detection_{args.cases}"
    if not (data / "phantoms.json").is_file():
        from medfound.data.phantoms import make_phantoms
        make_phantoms(data, centers=3, cases=args.cases, seed=0, modalities=MIXES, size="small")
    runs = HERE / "_data" / "detection_runs"
    shutil.rmtree(runs, ignore_errors=True)

    out: dict[str, dict] = {}
    for arm, centers in ARMS.items():
        run = runs / arm.replace(" ", "_")
        seconds = medfound("run", "train_detector", f"data.root={data}", f"experiment={args.experiment}",
                           f"data.train_centers=[{','.join(centers)}]", "data.val_centers=[center_2]",
                           f"seed={args.seed}", "trainer.progress=false", f"out_dir={run}")
        metrics = json.loads((run / "model" / "metrics.json").read_text())
        provenance = json.loads((run / "model" / "model.json").read_text())["provenance"]
        curve = validation_curve(run)
        out[arm] = {"train_centers": centers, "train_cases": provenance.get("train_cases"),
                    "seconds": seconds, "cpm": metrics["cpm"], "cpm_ci95": metrics.get("cpm_ci95"),
                    "froc": metrics.get("froc"), "val_cpm_by_epoch": curve,
                    "last_cpm": curve[max(curve)] if curve else None}
        print(f"{arm}: CPM {metrics['cpm']:.3f}, last validation {out[arm]['last_cpm']} "
              f"({seconds:.0f} s)", flush=True)

    doc = {"benchmark": "detection_quality", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": machine(), "device": "cpu", "experiment": args.experiment, "seed": args.seed,
           "phantoms": {"centers": 3, "cases": args.cases, "modalities": MIXES, "size": "small",
                        "eval_center": "center_2"},
           "bar_cpm": BAR, "arms": out, "pooled_meets_bar": out["pooled"]["cpm"] >= BAR}
    m = doc["machine"]
    lines = [f"# detection_quality — {doc['when']}", "",
             f"{m['cpu']}, {m['cores']} cores; `experiment={args.experiment}`, seed {args.seed}; "
             "LUNA16 CPM of the packaged model on the held-out center_2.", "",
             "| trained on | cases | CPM (95% CI) | sensitivity at 1/8 … 8 FP/scan | last-epoch CPM | train s |",
             "|---|---|---|---|---|---|"]
    for arm, r in out.items():
        ci = r["cpm_ci95"] or [float("nan")] * 2
        froc = " / ".join(f"{v:.2f}" for v in (r["froc"] or {}).values())
        lines.append(f"| {arm} | {r['train_cases']} | {r['cpm']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
                     f"{froc} | {r['last_cpm']:.3f} | {r['seconds']:.0f} |")
    lines += ["", "Validation CPM on center_2 by epoch (the packaged model is the best of these):", ""]
    lines += [f"- {arm}: " + ", ".join(f"{e}: {v:.2f}" for e, v in r["val_cpm_by_epoch"].items())
              for arm, r in out.items()]
    lines += ["", f"Bar: pooled CPM ≥ {BAR} — {'met' if doc['pooled_meets_bar'] else 'not met'} "
              f"(best validated); last epoch {out['pooled']['last_cpm']:.3f}."]
    write_results("detection_quality", doc, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
