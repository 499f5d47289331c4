"""Benchmark: what a deployment-mode federation costs beyond local training, on 127.0.0.1.

Three measurements, in one run on one machine:

1. Round time. `scripts/local_federation.sh` (one SuperLink, three SuperNodes as separate
   processes, TLS, node authentication) trains `--rounds` rounds of `--local-epochs` epochs.
   Per round: its wall time at the coordinator (``duration_s`` in metrics.json: weights out,
   every center's work, updates back, screening, aggregation) against the slowest center's
   local training in that round (``train/seconds``, timed around `fit` at the center), and
   against the slowest center's local work (training plus scoring the received model,
   ``evaluate/seconds``). The rounds between the first (cold caches) and the last (which adds
   the final model's evaluate exchange) are the steady state. Arms, the same federation each:
   - the default: each center's long-lived worker (medfound.fed.worker), and federated
     evaluation inside the next round's train message (fed.evaluate_with_train): one
     exchange a round;
   - ``fed.evaluate_with_train=false``: an evaluate exchange after each round's training;
   - ``--no-worker``: Flower starts a fresh ClientApp process for every message;
   - the default with `--long-local-epochs` per round: the federation's cost is a fixed cost
     per round, so its share depends on how long a center trains between two exchanges.
2. Bytes. Each center's training reply against the fp32 model size, with
   ``fed.transfer_dtype=float32`` (the default run) and ``float16`` (a one-round run).
3. Coordinator memory. The memory the coordinator allocates (tracemalloc: Python and numpy)
   while three updates of the reference model (ResNet-50 FPN) arrive and are screened and
   averaged, against the model's fp32 size: all replies in memory then Flower's FedAvg
   (fed.stream_aggregation=false), and each reply spooled to disk as it arrives then the mean
   taken array by array (the default).

    python benchmarks/federation.py [--cases 4] [--rounds 4] [--local-epochs 3] [--long-local-epochs 12]

Phantoms and runs go to benchmarks/_data/ (not committed). Writes
benchmarks/results/federation.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
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

from read_series import machine, write_results  # noqa: E402

sys.path.insert(0, str(HERE.parent / "tests"))
from processes import free_port_block  # noqa: E402

CENTERS = ["center_0", "center_1", "center_2"]


def run_deployment(data: Path, out: Path, *overrides: str, join_args: str = "",
                   threads: int = 1) -> dict:
    """Run scripts/local_federation.sh; its metrics.json, and each center's audit records.

    Every process it starts gets `threads` OpenMP/MKL threads: three centers on one
    small machine otherwise run 3 × cores threads, and torch's spinning OpenMP threads then
    slow whichever center overlaps another far more than time-sharing would."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PORT": str(free_port_block(6)), "JOIN_ARGS": join_args,
           **dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CENTER_THREADS"), str(threads)),
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
        centers = record["train"]["centers"]
        local = {c: m["train/seconds"] for c, m in centers.items()}
        work = {c: m["train/seconds"] + m.get("evaluate/seconds", 0.0) for c, m in centers.items()}
        slowest, slowest_work = max(local.values()), max(work.values())
        rows.append({"round": record["round"], "round_s": record["duration_s"],
                     "train_phase_s": record["train_s"], "local_train_s": local,
                     "slowest_local_s": slowest, "slowest_local_work_s": slowest_work,
                     "round_over_slowest_local": record["duration_s"] / slowest,
                     "round_over_slowest_work": record["duration_s"] / slowest_work,
                     "overhead_s": record["duration_s"] - slowest_work})
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


def coordinator_memory(centers: int = 3, spool_dir: Path | None = None) -> dict:
    """Peak allocations while `centers` reference-model updates arrive and are screened and
    averaged (FedAvg): all replies held, then Flower's FedAvg (`spool_dir` None), or each reply
    spooled to disk as it arrives and the mean taken array by array (medfound.fed.spool, the
    default since fed.stream_aggregation). The global model is held before and after and is
    not counted; neither are the spool's memory-mapped file pages (the OS's page cache)."""
    from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

    from medfound.fed.params import encode_arrays, shared_state
    from medfound.fed.protocol import ARRAYS, CENTER, METRICS, NUM_EXAMPLES
    from medfound.fed.screening import screen_updates
    from medfound.fed.spool import UpdateSpool, aggregate_spooled
    from medfound.fed.strategies import build_strategy
    from medfound.models.detection import PRESETS, DetectorConfig, build_network

    network = build_network(DetectorConfig.from_dict(PRESETS["reference"]), seed=0)
    global_arrays = {k: v.numpy().copy() for k, v in shared_state(network.state_dict()).items()}
    del network
    model_bytes = sum(a.nbytes for a in global_arrays.values())
    rng = np.random.default_rng(0)
    strategy = build_strategy({"name": "fedavg"}, centers)
    gc.collect()

    def arrive(i: int) -> Message:  # what a pull hands the coordinator: one serialized update
        update = {k: v + rng.normal(0, 1e-3, v.shape).astype(np.float32)
                  for k, v in global_arrays.items()}
        content = RecordDict({ARRAYS: encode_arrays(update, "float32"),
                              METRICS: MetricRecord({NUM_EXAMPLES: 10 + i}),
                              CENTER: ConfigRecord({"name": f"center_{i}"})})
        del update
        return Message(content, metadata=Metadata(
            run_id=1, message_id=f"r{i}", src_node_id=i + 1, dst_node_id=0,
            reply_to_message_id=f"m{i}", group_id="", created_at=0.0, ttl=600.0,
            message_type=MessageType.TRAIN))

    spool = UpdateSpool(spool_dir) if spool_dir is not None else None
    tracemalloc.start()
    started = time.perf_counter()
    replies = [spool.take(arrive(i)) if spool is not None else arrive(i) for i in range(centers)]
    gc.collect()
    received, _ = tracemalloc.get_traced_memory()
    screening = screen_updates(replies, global_arrays, transfer_dtype="float32",
                               norm_factor=10.0, known_centers={}, spool=spool)
    if spool is not None:
        new, _ = aggregate_spooled(strategy, 1, spool, screening.accepted, list(global_arrays))
    else:
        new_arrays, _ = strategy.aggregate_train(1, screening.accepted)
        new = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in new_arrays.items()}
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if spool is not None:
        spool.close()
    assert len(new) == len(global_arrays) and len(screening.accepted) == centers
    return {"path": "spooled (fed.stream_aggregation=true)" if spool is not None
            else "in memory (fed.stream_aggregation=false)",
            "model": "reference (ResNet-50 FPN)", "model_bytes_fp32": model_bytes,
            "centers": centers, "held_after_arrival_bytes": received,
            "held_after_arrival_over_model": received / model_bytes,
            "peak_bytes": peak, "peak_over_model": peak / model_bytes,
            "seconds": seconds}


def render(result: dict) -> str:
    """federation.md from the results (also: python -c 'import federation as f, json;
    print(f.render(json.load(open("results/federation.json"))))' in benchmarks/)."""
    m, setup, timing, memory = (result["machine"], result["setup"], result["timing"],
                                result["coordinator_memory"])
    lines = [
        f"# federation — {result['when']}",
        "",
        f"{m['cpu']}, {m['cores']} cores. Deployment mode on 127.0.0.1 (one SuperLink, three "
        f"SuperNodes, TLS, node authentication), tiny model, {setup['cases_per_center']} phantom cases per "
        f"center, {setup['patches_per_case']} patches per case per epoch, {setup['rounds']} rounds, "
        f"{setup['threads_per_process']} OpenMP thread(s) per process.",
        "",
        "| arm | round | whole round (s) | slowest center's training (s) | round ÷ training | "
        "slowest center's training + scoring (s) | round ÷ training + scoring |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, t in timing.items():
        for r in t["rounds"]:
            work = ("— | —" if arm == "separate_evaluate" else  # scored in untimed messages
                    f"{r['slowest_local_work_s']:.1f} | {r['round_over_slowest_work']:.2f}")
            lines.append(f"| {t['name']} | {r['round']} | {r['round_s']:.1f} | "
                         f"{r['slowest_local_s']:.1f} | {r['round_over_slowest_local']:.2f} | "
                         f"{work} |")
    lines += ["", "Median over the steady rounds (after the first, before the last):", ""]
    for arm, t in timing.items():
        if arm == "separate_evaluate":  # its scoring runs in evaluate messages, untimed
            lines.append(f"- {t['name']}: whole round {t['round_over_slowest_local_median']:.2f}× "
                         f"the slowest center's training ({t['overhead_s_median']:.1f} s beyond "
                         "it: two exchanges and the evaluation phase)")
            continue
        lines.append(f"- {t['name']}: whole round {t['round_over_slowest_local_median']:.2f}× the "
                     f"slowest center's training, {t['round_over_slowest_work_median']:.2f}× its "
                     f"training + scoring ({t['overhead_s_median']:.1f} s beyond the centers' work)")
    lines += ["", "| transfer dtype | training reply (bytes) | ÷ fp32 model | all replies of a center "
                  "in a round | ÷ fp32 model |", "|---|---|---|---|---|"]
    for b in result["bytes"]:
        lines.append(f"| {b['dtype']} | {b['train_reply_bytes_max']:,} | "
                     f"{b['train_reply_over_model']:.3f} | {b['all_replies_per_center_round_max']:,}"
                     f" | {b['all_replies_over_model']:.3f} |")
    lines += ["", f"Coordinator memory while {memory[0]['centers']} updates of the reference model "
                  f"({memory[0]['model_bytes_fp32'] / 2**20:.0f} MiB fp32) arrive and are screened "
                  "and averaged (FedAvg), tracemalloc, global model not counted:", "",
              "| path | held once all arrived ÷ model | peak ÷ model | seconds |", "|---|---|---|---|"]
    for mem in memory:
        lines.append(f"| {mem['path']} | {mem['held_after_arrival_over_model']:.2f} | "
                     f"{mem['peak_over_model']:.2f} | {mem['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=4, help="phantom cases per center")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=3, help="local epochs per round")
    ap.add_argument("--patches", type=int, default=4, help="training patches per case and epoch")
    ap.add_argument("--long-local-epochs", type=int, nargs="*", default=[12, 60],
                    help="local epochs per round of the longer-round runs (none: skip them)")
    ap.add_argument("--skip-no-worker", action="store_true", help="leave the --no-worker arm out")
    ap.add_argument("--center-threads", type=int, default=1,
                    help="OpenMP threads of each process of the federation (see `run_deployment`)")
    args = ap.parse_args()

    work = HERE / "_data" / "fed_runs"
    memory = [coordinator_memory(), coordinator_memory(spool_dir=work / "spool")]
    for m in memory:
        print(f"coordinator, {m['path']}: {m['held_after_arrival_over_model']:.2f}× the model "
              f"held once the updates arrived, peak {m['peak_over_model']:.2f}×", flush=True)

    data = HERE / "_data" / f"fed_{args.cases}"
    if not (data / "phantoms.json").is_file():
        from medfound.data.phantoms import make_phantoms
        make_phantoms(data, centers=3, cases=args.cases, seed=0, size="small")
    rounds_args = (f"fed.rounds={args.rounds}", f"fed.local_epochs={args.local_epochs}",
                   f"data.num_patches_per_image={args.patches}")
    deployment = functools.partial(run_deployment, threads=args.center_threads)
    arms = {"default": deployment(data, work / "fp32", *rounds_args),
            "separate_evaluate": deployment(data, work / "separate", *rounds_args,
                                            "+fed.evaluate_with_train=false")}
    if not args.skip_no_worker:
        arms["no_worker"] = deployment(data, work / "no_worker", *rounds_args,
                                       join_args="--no-worker")
    for epochs in args.long_local_epochs:
        arms[f"longer_{epochs}"] = deployment(data, work / f"longer_{epochs}",
                                              f"fed.rounds={args.rounds}",
                                              f"fed.local_epochs={epochs}",
                                              f"data.num_patches_per_image={args.patches}")
    fp16 = deployment(data, work / "fp16", "fed.rounds=1", "fed.local_epochs=1",
                      "data.num_patches_per_image=1", "fed.transfer_dtype=float16")

    def summary(run: dict) -> dict:
        rounds = round_times(run)
        steady = [r for r in rounds if 1 < r["round"] < len(rounds)] or rounds
        return {"rounds": rounds, "steady_rounds": [r["round"] for r in steady],
                **{f"{key}_median": statistics.median(r[key] for r in steady)
                   for key in ("round_over_slowest_local", "round_over_slowest_work",
                               "overhead_s", "round_s", "slowest_local_s")}}

    names = {"default": f"worker, evaluation in the train message, {args.local_epochs} local epochs",
             "separate_evaluate": f"worker, separate evaluate exchange, {args.local_epochs} local "
                                  "epochs",
             "no_worker": f"--no-worker, evaluation in the train message, {args.local_epochs} "
                          "local epochs",
             **{f"longer_{e}": f"worker, evaluation in the train message, {e} local epochs"
                for e in args.long_local_epochs}}
    timing = {arm: {"name": names[arm], **summary(run)} for arm, run in arms.items()}
    result = {
        "benchmark": "federation",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "setup": {"mode": "deployment, 127.0.0.1, TLS, node authentication",
                  "centers": 3, "cases_per_center": args.cases, "rounds": args.rounds,
                  "local_epochs": args.local_epochs, "long_local_epochs": args.long_local_epochs,
                  "threads_per_process": args.center_threads,
                  "patches_per_case": args.patches, "experiment": "phantoms_smoke",
                  "model": "tiny"},
        "timing": timing,
        "bytes": [reply_bytes(arms["default"]), reply_bytes(fp16)],
        "coordinator_memory": memory,
        "wall_s": {**{arm: run["wall_s"] for arm, run in arms.items()}, "fp16": fp16["wall_s"]},
    }
    write_results("federation", result, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
