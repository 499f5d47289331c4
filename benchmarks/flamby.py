"""Benchmark: the FLamby-style table — pooled vs each center alone vs federated, same budget.

Three phantom centers with different vendors, slice thickness and noise (the third is small).
Every model gets the same number of training epochs over its data and the same recipe
settings (``--experiment``); each is then scored with `evaluate_detector` on the validation
splits of all three centers together and of each center alone (LUNA16 CPM):

- pooled: `train_detector` on the training splits of all centers;
- local <center>: `train_detector` on that center's training split only;
- FedAvg, FedProx, FedAdam: `federate` (simulation) over the three centers, ``--rounds``
  rounds of ``epochs / rounds`` local epochs each.

No checkpoint selection: every run validates only at its end, and the last model is scored.
Every arm uses the same step LR schedule (a tenth after two thirds of the epochs).

    python benchmarks/flamby.py [--cases 10] [--epochs 300] [--rounds 15] [--only FedAdam ...]

``--only`` re-runs the named rows (e.g. after a fix to one strategy) and keeps the others from
the existing results file, which must have the same setup; each row records when it ran.

Phantoms and runs go to benchmarks/_data/ (not committed). Writes
benchmarks/results/flamby.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from read_series import machine, write_results  # noqa: E402

CENTERS = ["center_0", "center_1", "center_2"]
STRATEGIES = {"FedAvg": "fedavg", "FedProx": "fedprox", "FedAdam": "fedadam"}


def medfound_run(*args: str) -> float:
    """`medfound run ARGS` in a fresh process; its wall time. Exits on failure."""
    started = time.time()
    quiet = [] if args[0] == "evaluate_detector" else ["trainer.progress=false"]
    res = subprocess.run([sys.executable, "-m", "medfound", "run", *args, *quiet],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"medfound run {' '.join(args)} failed:\n{res.stdout[-2000:]}\n"
                         f"{res.stderr[-3000:]}")
    return time.time() - started


def evaluate(model: Path, root: Path, out: Path) -> dict:
    """CPM on all centers' validation splits together (one evaluate_detector run), and on
    each center's alone (from the same predictions; None where a center has no nodules)."""
    from medfound.data.detection import load_datalist
    from medfound.metrics.froc import froc

    medfound_run("evaluate_detector", f"model={model}", f"data.root={root}",
                 f"data.centers=[{','.join(CENTERS)}]", "data.split=validation", f"out_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    scores = {"all": {"cpm": metrics["cpm"], "cpm_ci95": metrics.get("cpm_ci95"),
                      "n_scans": metrics["n_scans"], "n_nodules": metrics["n_nodules"]}}
    for center in CENTERS:
        items = load_datalist(root, [center], "validation")
        uids = [it["seriesuid"] for it in items]
        annotations = root / center / "annotations.csv"
        n_nodules = sum(len(it["label"]) for it in items)
        cpm = (froc(out / "predictions.csv", annotations, uids).cpm if n_nodules else None)
        scores[center] = {"cpm": cpm, "cpm_ci95": None, "n_scans": len(uids),
                          "n_nodules": n_nodules}
    return scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10, help="phantom cases per large center")
    ap.add_argument("--epochs", type=int, default=300, help="training epochs of every model")
    ap.add_argument("--rounds", type=int, default=15, help="federated rounds (divides --epochs)")
    ap.add_argument("--experiment", default="phantoms_small")
    ap.add_argument("--only", nargs="+", metavar="METHOD",
                    help="re-run only these rows (pooled, 'local center_0', FedAvg, ...); keep "
                         "the others from results/flamby.json")
    args = ap.parse_args()
    if args.epochs % args.rounds:
        raise SystemExit("--epochs must be a multiple of --rounds")
    setup = {"cases_per_center": args.cases, "epochs": args.epochs, "rounds": args.rounds,
             "experiment": args.experiment}
    kept: dict[str, dict] = {}
    if args.only:
        methods = ["pooled", *(f"local {c}" for c in CENTERS), *STRATEGIES]
        unknown = sorted(set(args.only) - set(methods))
        if unknown:
            raise SystemExit(f"--only: unknown method(s) {unknown}; choose from {methods}")
        previous = json.loads((RESULTS / "flamby.json").read_text())
        if any(previous["setup"].get(k) != v for k, v in setup.items()):
            raise SystemExit(f"--only: results/flamby.json was measured with {previous['setup']}, "
                             f"not {setup}; run the whole table")
        kept = {row["method"]: {"when": previous["when"], **row} for row in previous["rows"]}

    root = HERE / "_data" / f"flamby_{args.cases}"
    if not (root / "phantoms.json").is_file():
        from medfound.data.phantoms import make_phantoms
        make_phantoms(root, centers=3, cases=args.cases, seed=0, size="small")
    work = HERE / "_data" / "flamby_runs"
    if not args.only:
        shutil.rmtree(work, ignore_errors=True)
    # One LR schedule for every arm: a tenth after two thirds of the epochs. (Cosine needs a fixed
    # total length, which federated rounds do not give it; the pooled and local runs would
    # otherwise end at LR 0 and the federated ones at full LR.)
    step_at = 2 * args.epochs // 3
    common = [f"experiment={args.experiment}", f"data.root={root}", "trainer.schedule=step",
              f"trainer.step_epochs={step_at}", "trainer.step_gamma=0.1"]
    # data.train_split=training: the centers' training splits only, the data a federated center
    # trains on (the experiment may train on all cases of centers it does not validate on).
    train = [*common, f"trainer.epochs={args.epochs}", f"trainer.val_every={args.epochs}",
             "trainer.early_stopping_patience=0", "data.train_split=training"]

    rows = []
    plans = [("pooled", CENTERS)] + [(f"local {c}", [c]) for c in CENTERS]
    for name, centers in plans:
        if args.only and name not in args.only:
            rows.append(kept[name])
            continue
        out = work / name.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        listed = f"[{','.join(centers)}]"
        seconds = medfound_run("train_detector", *train, f"data.train_centers={listed}",
                               f"data.val_centers=[{','.join(CENTERS)}]",
                               "data.val_split=validation", f"out_dir={out}")
        rows.append({"method": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "train_s": seconds, "scores": evaluate(out / "model", root, out / "eval")})
        print(name, rows[-1]["scores"], f"{seconds:.0f} s", flush=True)
    for name, strategy in STRATEGIES.items():
        if args.only and name not in args.only:
            rows.append(kept[name])
            continue
        out = work / strategy
        shutil.rmtree(out, ignore_errors=True)
        seconds = medfound_run("federate", *common, f"fed={strategy}", "fed.mode=simulation",
                               f"fed.centers=[{','.join(CENTERS)}]", f"fed.rounds={args.rounds}",
                               f"fed.local_epochs={args.epochs // args.rounds}",
                               "fed.cross_site=false", f"out_dir={out}")
        rows.append({"method": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "train_s": seconds, "scores": evaluate(out / "model", root, out / "eval")})
        print(name, rows[-1]["scores"], f"{seconds:.0f} s", flush=True)

    result = {"benchmark": "flamby", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(),
              "setup": {**setup,
                        "centers": json.loads((root / "phantoms.json").read_text()).get("centers")},
              "rows": rows}
    m = result["machine"]
    pooled = rows[0]["scores"]["all"]["cpm"]
    lines = [f"# flamby — {result['when']}", "",
             f"{m['cpu']}, {m['cores']} cores. `experiment={args.experiment}`, {args.epochs} "
             f"epochs per model (federated: {args.rounds} rounds × {args.epochs // args.rounds} "
             f"local epochs), phantoms `--size small --cases {args.cases}`. CPM on the "
             "validation splits, last model (no checkpoint selection); LR a tenth after "
             f"{step_at} epochs in every arm.", "",
             "| method | CPM, all centers (95% CI) | " + " | ".join(CENTERS)
             + " | Δ vs pooled | training time (s) | measured |",
             "|---|---|" + "---|" * len(CENTERS) + "---|---|---|"]
    def f(x: float | None, fmt: str = ".3f") -> str:
        return "n/a" if x is None else format(x, fmt)

    for row in rows:
        s = row["scores"]
        ci = s["all"]["cpm_ci95"] or [None, None]
        delta = None if None in (s["all"]["cpm"], pooled) else s["all"]["cpm"] - pooled
        lines.append(f"| {row['method']} | {f(s['all']['cpm'])} ({f(ci[0], '.2f')}–"
                     f"{f(ci[1], '.2f')}) | " + " | ".join(f(s[c]["cpm"]) for c in CENTERS)
                     + f" | {f(delta, '+.3f')} | {row['train_s']:.0f} | "
                     f"{row.get('when', result['when'])[:16]} |")
    n = rows[0]["scores"]
    lines += ["", "Validation scans / nodules: all " + f"{n['all']['n_scans']}/{n['all']['n_nodules']}"
              + "".join(f", {c} {n[c]['n_scans']}/{n[c]['n_nodules']}" for c in CENTERS) + "."]
    write_results("flamby", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
