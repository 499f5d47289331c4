"""Benchmark: what a deployment-mode federation costs beyond local training, on 127.0.0.1.

Three measurements, in one run on one machine:

1. Round time. `scripts/local_federation.sh` (one SuperLink, three SuperNodes as separate
   processes, TLS, node authentication) trains `--rounds` rounds of `--local-epochs` epochs.
   Per round: the coordinator's training phase (weights out, updates back, screening,
   aggregation: ``train_s`` in metrics.json) against the slowest center's local training in
   that round (``train/seconds``, timed around `fit` at the center). The difference is the
   federation's overhead. Measured twice, the same federation: with each center's long-lived
   worker (medfound.fed.worker, the default of `medfound center join`), and with
   ``--no-worker``, where Flower starts a fresh ClientApp process for every message (each one
   imports torch and MONAI and prepares the center's studies again). Then once more with
   workers and `--long-local-epochs` per round: the overhead is a fixed cost per round, so
   its share depends on how long a center trains between two exchanges.
2. Bytes. Each center's training reply against the fp32 model size, with
   ``fed.transfer_dtype=float32`` (the run above) and ``float16`` (a second, one-round run).
3. Coordinator memory. The memory the coordinator allocates (tracemalloc: Python and numpy)
   while it screens and aggregates three updates of the reference model (ResNet-50 FPN), against
   the model's fp32 size: the received updates themselves, and the working memory beyond them.

    python benchmarks/federation.py [--cases 4] [--rounds 3] [--local-epochs 3] [--long-local-epochs 12]

Phantoms and runs go to benchmarks/_data/ (not committed). Writes
benchmarks/results/federation.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from read_series import machine  # noqa: E402

CENTERS = ["center_0", "center_1", "center_2"]


def free_port() -> int:
    """A port p with p..p+5 free on 127.0.0.1 (the SuperLink and the SuperNodes' local APIs)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        try:
            for port in range(base, base + 6):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports")


def deployment(data: Path, out: Path, *overrides: str, join_args: str = "") -> dict:
    """Run scripts/local_federation.sh; its metrics.json, and each center's audit records."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PORT": str(free_port()), "JOIN_ARGS": join_args,
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    started = time.time()
    res = subprocess.run([str(REPO / "scripts" / "local_federation.sh"), str(data), str(out),
                          "fed.cross_site=false", "trainer.progress=false", *overrides],
                         env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"local federation failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    audit = {c: [json.loads(line) for line in
                 (out / "centers" / c / "audit" / f"{c}.jsonl").read_text().splitlines()]
             for c in CENTERS}
    return {"metrics": metrics, "audit": audit, "wall_s": time.time() - started}


def round_times(run: dict) -> list[dict]:
    rows = []
    for record in run["metrics"]["rounds"]:
        local = {c: m["train/seconds"] for c, m in record["train"]["centers"].items()}
        slowest = max(local.values())
        rows.append({"round": record["round"], "train_phase_s": record["train_s"],
                     "round_s": record["duration_s"], "local_train_s": local,
                     "slowest_local_s": slowest, "ratio": record["train_s"] / slowest,
                     "overhead_s": record["train_s"] - slowest})
    return rows


def reply_bytes(run: dict) -> dict:
    model = run["metrics"]["model_bytes_fp32"]
    train = [a["bytes"] for c in CENTERS for a in run["audit"][c] if a["kind"] == "train"]
    per_round = [sum(a["bytes"] for a in run["audit"][c] if a["round"] == r)
                 for c in CENTERS for r in {a["round"] for a in run["audit"][c]}]
    return {"dtype": run["metrics"]["transfer_dtype"], "model_bytes_fp32": model,
            "train_reply_bytes_max": max(train), "train_reply_over_model": max(train) / model,
            "all_replies_per_center_round_max": max(per_round),
            "all_replies_over_model": max(per_round) / model}


def coordinator_memory(centers: int = 3) -> dict:
    """Peak allocations of screening + FedAvg aggregation of `centers` reference-model updates."""
    from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

    from medfound.fed.params import encode_arrays, shared_state
    from medfound.fed.protocol import ARRAYS, CENTER, METRICS, NUM_EXAMPLES
    from medfound.fed.screening import screen_updates
    from medfound.fed.strategies import build_strategy
    from medfound.models.detection import PRESETS, DetectorConfig, build_network

    network = build_network(DetectorConfig.from_dict(PRESETS["reference"]), seed=0)
    global_arrays = {k: v.numpy().copy() for k, v in shared_state(network.state_dict()).items()}
    del network
    model_bytes = sum(a.nbytes for a in global_arrays.values())
    rng = np.random.default_rng(0)
    strategy = build_strategy({"name": "fedavg"}, centers)
    gc.collect()

    tracemalloc.start()
    replies = []
    for i in range(centers):  # what arrives: one serialized update per center
        update = {k: v + rng.normal(0, 1e-3, v.shape).astype(np.float32)
                  for k, v in global_arrays.items()}
        content = RecordDict({ARRAYS: encode_arrays(update, "float32"),
                              METRICS: MetricRecord({NUM_EXAMPLES: 10 + i}),
                              CENTER: ConfigRecord({"name": f"center_{i}"})})
        del update
        replies.append(Message(content, metadata=Metadata(
            run_id=1, message_id=f"r{i}", src_node_id=i + 1, dst_node_id=0,
            reply_to_message_id=f"m{i}", group_id="", created_at=0.0, ttl=600.0,
            message_type=MessageType.TRAIN)))
    gc.collect()
    received, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    screening = screen_updates(replies, global_arrays, transfer_dtype="float32",
                               norm_factor=10.0, known_centers={})
    new_arrays, _ = strategy.aggregate_train(1, screening.accepted)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert new_arrays is not None and len(screening.accepted) == centers
    return {"model": "reference (ResNet-50 FPN)", "model_bytes_fp32": model_bytes,
            "centers": centers, "received_bytes": received,
            "received_over_model": received / model_bytes,
            "peak_during_aggregation_bytes": peak,
            "peak_over_model": peak / model_bytes,
            "working_over_model": (peak - received) / model_bytes,
            "aggregation_s": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=4, help="phantom cases per center")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=3, help="local epochs per round")
    ap.add_argument("--patches", type=int, default=4, help="training patches per case and epoch")
    ap.add_argument("--long-local-epochs", type=int, default=12,
                    help="local epochs per round of the longer-round run (0: skip it)")
    args = ap.parse_args()

    memory = coordinator_memory()
    print(f"coordinator: peak {memory['peak_over_model']:.2f}× the model while aggregating "
          f"({memory['received_over_model']:.2f}× received, "
          f"{memory['working_over_model']:.2f}× working)", flush=True)

    data = HERE / "_data" / f"fed_{args.cases}"
    if not (data / "phantoms.json").is_file():
        from medfound.data.phantoms import make_phantoms
        make_phantoms(data, centers=3, cases=args.cases, seed=0, size="small")
    work = HERE / "_data" / "fed_runs"
    rounds_args = (f"fed.rounds={args.rounds}", f"fed.local_epochs={args.local_epochs}",
                   f"data.num_patches_per_image={args.patches}")
    fp32 = deployment(data, work / "fp32", *rounds_args)
    no_worker = deployment(data, work / "no_worker", *rounds_args, join_args="--no-worker")
    longer = (deployment(data, work / "longer", f"fed.rounds={args.rounds}",
                         f"fed.local_epochs={args.long_local_epochs}",
                         f"data.num_patches_per_image={args.patches}")
              if args.long_local_epochs else None)
    fp16 = deployment(data, work / "fp16", "fed.rounds=1", "fed.local_epochs=1",
                      "data.num_patches_per_image=1", "fed.transfer_dtype=float16")

    def summary(run: dict) -> dict:
        rounds = round_times(run)
        later = [r for r in rounds if r["round"] > 1] or rounds
        return {"rounds": rounds,
                "train_phase_over_slowest_local_median": statistics.median(r["ratio"] for r in later),
                "overhead_s_median": statistics.median(r["overhead_s"] for r in later)}

    timing, timing_without = summary(fp32), summary(no_worker)
    rounds, ratio, overhead = (timing["rounds"], timing["train_phase_over_slowest_local_median"],
                               timing["overhead_s_median"])
    result = {
        "benchmark": "federation",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "setup": {"mode": "deployment, 127.0.0.1, TLS, node authentication",
                  "centers": 3, "cases_per_center": args.cases, "rounds": args.rounds,
                  "local_epochs": args.local_epochs, "patches_per_case": args.patches,
                  "experiment": "phantoms_smoke", "model": "tiny"},
        "rounds": rounds,
        "train_phase_over_slowest_local_median": ratio,
        "overhead_s_median": overhead,
        "without_worker": timing_without,
        "longer_rounds": None if longer is None else {"local_epochs": args.long_local_epochs,
                                                      **summary(longer)},
        "bytes": [reply_bytes(fp32), reply_bytes(fp16)],
        "coordinator_memory": memory,
        "wall_s": {"fp32": fp32["wall_s"], "no_worker": no_worker["wall_s"],
                   "fp16": fp16["wall_s"], "longer": None if longer is None else longer["wall_s"]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "federation.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        f"# federation — {result['when']}",
        "",
        f"{m['cpu']}, {m['cores']} cores. Deployment mode on 127.0.0.1 (one SuperLink, three "
        f"SuperNodes, TLS, node authentication), tiny model, {args.cases} phantom cases per "
        f"center, {args.local_epochs} local epochs × {args.patches} patches per case per round.",
        "",
        "| centers run | round | coordinator train phase (s) | slowest center's local training "
        "(s) | ratio | overhead (s) | whole round (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    runs = [(f"worker (default), {args.local_epochs} local epochs", timing),
            (f"--no-worker, {args.local_epochs} local epochs", timing_without)]
    if result["longer_rounds"] is not None:
        runs.append((f"worker (default), {args.long_local_epochs} local epochs",
                     result["longer_rounds"]))
    for name, t in runs:
        for r in t["rounds"]:
            lines.append(f"| {name} | {r['round']} | {r['train_phase_s']:.1f} | "
                         f"{r['slowest_local_s']:.1f} | {r['ratio']:.2f} | {r['overhead_s']:.1f} | "
                         f"{r['round_s']:.1f} |")
    lines += ["", f"Median over rounds after the first: train phase = {ratio:.2f} × the slowest "
                  f"center's local training ({overhead:.1f} s overhead per round) with each "
                  "center's worker; "
                  f"{timing_without['train_phase_over_slowest_local_median']:.2f} × "
                  f"({timing_without['overhead_s_median']:.1f} s) with a fresh process per "
                  "message (--no-worker)."
              + ("" if longer is None else
                 f" With {args.long_local_epochs} local epochs a round (workers): "
                 f"{result['longer_rounds']['train_phase_over_slowest_local_median']:.2f} × "
                 f"({result['longer_rounds']['overhead_s_median']:.1f} s)."), "",
              "| transfer dtype | training reply (bytes) | ÷ fp32 model | all replies of a center "
              "in a round | ÷ fp32 model |", "|---|---|---|---|---|"]
    for b in result["bytes"]:
        lines.append(f"| {b['dtype']} | {b['train_reply_bytes_max']:,} | "
                     f"{b['train_reply_over_model']:.3f} | {b['all_replies_per_center_round_max']:,}"
                     f" | {b['all_replies_over_model']:.3f} |")
    lines += ["", f"Coordinator memory while screening and aggregating {memory['centers']} updates "
                  f"of the reference model ({memory['model_bytes_fp32'] / 2**20:.0f} MiB fp32): "
                  f"received updates {memory['received_over_model']:.2f}×, peak "
                  f"{memory['peak_over_model']:.2f}× (working memory beyond the received updates "
                  f"{memory['working_over_model']:.2f}×), {memory['aggregation_s']:.1f} s."]
    (RESULTS / "federation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
