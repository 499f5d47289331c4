"""Benchmark: does leave-one-out contribution (fed.contribution) find the center with bad labels?

Phantoms of three centers (`make_phantoms(centers=4, cases=8, seed=5)`, centers 0, 1 and 3: 6,
6 and 4 cases), center_1's training nodule boxes moved to random places in their scans
(`medfound.data.phantoms.scramble_training_boxes`: it trains on labels that mark no nodule).
A simulated FedAvg federation with `fed.contribution=true` (docs/audit.md), experiment=
phantoms_small, `--rounds` rounds of `--local-epochs` local epochs, once per arm and training
seed:

- ``geometric``: experiment=phantoms_small as it is (flips and quarter turns on);
- ``intensity``: ``data.flip_prob=0 data.rot90_prob=0`` (intensity augmentation only), the
  setting under which the demo's detector leaves the class prior within its budget
  (docs/detection.md).

Per run: the global model's validation scores at each center (anchor_auc, CPM, loss), each
center's effect on the other centers' scores (the global model's score minus the model
without it, case-weighted), and which center came out lowest. The claim "the scrambled center
contributes least" is only meaningful where the global model ranks nodules (anchor_auc well
above 0.5), so that is reported beside it.

    python benchmarks/contribution.py [--arms geometric intensity] [--seeds 0 1] [--rounds 6] [--local-epochs 10]

Phantoms and runs go to benchmarks/_data/contribution/ (each invocation's runs in a new
folder; not committed). Writes benchmarks/results/contribution.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / "_data" / "contribution"
sys.path.insert(0, str(HERE))

from read_series import machine, write_results  # noqa: E402

CENTERS = ["center_0", "center_1", "center_3"]
SCRAMBLED = "center_1"
ARMS = {"geometric": [], "intensity": ["data.flip_prob=0", "data.rot90_prob=0"]}


def phantoms() -> Path:
    """The three centers, center_1's training boxes scrambled (made once, then reused)."""
    root = WORK / "phantoms"
    if not (root / "scrambled.json").is_file():
        from medfound.data.phantoms import make_phantoms, scramble_training_boxes

        make_phantoms(root, centers=4, cases=8, seed=5, size="small", progress=False)
        moved = scramble_training_boxes(root / SCRAMBLED, seed=0)
        (root / "scrambled.json").write_text(json.dumps({"center": SCRAMBLED, "boxes": moved}))
    return root


def run(root: Path, out: Path, arm: str, seed: int, rounds: int, local_epochs: int,
        threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "medfound", "run", "federate", "fed.mode=simulation",
           f"fed.centers=[{','.join(CENTERS)}]", "experiment=phantoms_small",
           "data.train_split=training", "trainer.progress=false", "fed.eval_bootstraps=10",
           f"data.root={root}", f"fed.rounds={rounds}", f"fed.local_epochs={local_epochs}",
           "fed.contribution=true", "fed.share_local_models=true", f"seed={seed}",
           f"trainer.threads={threads}", f"out_dir={out}",
           f"tracking.uri={WORK / 'mlruns'}", *ARMS[arm]]
    started = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    doc = json.loads((out / "contribution.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    glob = metrics["cross_site"]["models"]["global"]
    return {"arm": arm, "seed": seed, "wall_s": round(time.time() - started, 1),
            "global": {c: {k: glob[c].get(k) for k in ("anchor_auc", "cpm", "loss", "n_nodules")}
                       for c in CENTERS},
            "effect": {c: doc["centers"][c]["effect"] for c in CENTERS},
            "lowest": doc["lowest"]}


def render(result: dict) -> str:
    m, setup = result["machine"], result["setup"]
    lines = [f"# contribution — {result['when']}", "",
             f"{m['cpu']}, {m['cores']} cores. Three phantom centers (6, 6, 4 cases), "
             f"{SCRAMBLED}'s training boxes scrambled; FedAvg, {setup['rounds']} rounds × "
             f"{setup['local_epochs']} local epochs, experiment=phantoms_small, "
             f"{setup['threads']} torch thread(s); effects on the other centers' validation data "
             "(leave-one-out over the last round's updates, docs/audit.md).", "",
             "| arm | seed | global anchor_auc (c0 / c1 / c3) | effect on anchor_auc (c0 / c1 / c3) "
             "| effect on loss (c0 / c1 / c3) | lowest (anchor_auc, loss) |",
             "|---|---|---|---|---|---|"]

    def three(values: list, signed: bool = False) -> str:
        form = "{:+.3f}" if signed else "{:.3f}"
        return " / ".join("—" if v is None else form.format(v) for v in values)

    for r in result["runs"]:
        auc = [r["global"][c]["anchor_auc"] for c in CENTERS]
        e_auc = [r["effect"][c].get("anchor_auc") for c in CENTERS]
        e_loss = [r["effect"][c].get("loss") for c in CENTERS]
        lowest = f"{r['lowest'].get('anchor_auc', '—')}, {r['lowest'].get('loss', '—')}"
        lines.append(f"| {r['arm']} | {r['seed']} | {three(auc)} | {three(e_auc, True)} | "
                     f"{three(e_loss, True)} | {lowest} |")
    lines += ["", "Per arm: runs in which the scrambled center came out lowest, and the global "
                  "model's mean anchor_auc (0.5 is chance):", ""]
    for arm, s in result["summary"].items():
        lines.append(f"- {arm}: lowest on anchor_auc in {s['lowest_auc']} of {s['runs']} runs, on "
                     f"loss in {s['lowest_loss']} of {s['runs']}; global anchor_auc mean "
                     f"{s['global_auc_mean']:.3f}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each center")
    args = ap.parse_args()
    root = phantoms()
    runs_dir = WORK / "runs" / time.strftime("%Y%m%d-%H%M%S")
    runs_dir.mkdir(parents=True)
    runs = []
    for arm in args.arms:
        for seed in args.seeds:
            r = run(root, runs_dir / f"{arm}_{seed}", arm, seed, args.rounds, args.local_epochs,
                    args.threads)
            print(f"{arm} seed {seed}: global anchor_auc "
                  + ", ".join(f"{c} {r['global'][c]['anchor_auc']:.3f}" for c in CENTERS)
                  + f"; lowest {r['lowest']} ({r['wall_s']:.0f} s)", flush=True)
            runs.append(r)
    summary = {}
    for arm in args.arms:
        mine = [r for r in runs if r["arm"] == arm]
        summary[arm] = {
            "runs": len(mine),
            "lowest_auc": sum(r["lowest"].get("anchor_auc") == SCRAMBLED for r in mine),
            "lowest_loss": sum(r["lowest"].get("loss") == SCRAMBLED for r in mine),
            "global_auc_mean": statistics.mean(r["global"][c]["anchor_auc"] for r in mine
                                               for c in CENTERS
                                               if r["global"][c]["anchor_auc"] is not None)}
    result = {"benchmark": "contribution", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(),
              "setup": {"rounds": args.rounds, "local_epochs": args.local_epochs,
                        "threads": args.threads, "centers": CENTERS, "scrambled": SCRAMBLED,
                        "phantoms": "make_phantoms(centers=4, cases=8, seed=5, size='small')"},
              "runs": runs, "summary": summary}
    write_results("contribution", result, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
