"""Benchmark: how a federation's costs grow with its number of centers (N = 3, 10, 30, 115).

Three measurements, in one run on one machine:

1. Simulation (Flower's simulation engine, `medfound run federate fed.mode=simulation`), N
   phantom centers of two small cases each (one trains, one validates), the tiny detector of
   experiment=phantoms_smoke, every center in every round, `--rounds` rounds. From each
   run's metrics.json, for the steady round (after the first, which starts the Ray actors,
   and before the last, which adds the final model's evaluate exchange): the whole round's
   time; the coordinator's exchange, screening and aggregation times (the round record's
   ``timing``); the bytes sent to and received from the centers; and the round's time beyond
   the centers' own work (their training and scoring, timed at each center, divided by the
   number of centers that run at once). The coordinator's peak memory is the resident set of
   the recipe process `medfound run federate` starts (it holds the ServerApp and Flower's
   in-memory link state; the centers run in Ray worker processes), sampled every 0.2 s.
2. Coordinator memory at scale (tracemalloc, benchmarks/federation.py's `coordinator_memory`):
   N updates of the reference model (ResNet-50 FPN) arrive and are screened and averaged
   (FedAvg), each spooled to disk as it arrives and the mean taken array by array (the default),
   and all held in memory then Flower's FedAvg (fed.stream_aggregation=false) while they fit
   in this machine's memory.
3. Deployment: `scripts/local_federation.sh` with `--deploy-centers` SuperNodes (each a
   `medfound center join` with its worker) on 127.0.0.1, TLS, node authentication, one or two
   rounds; the memory of each center's processes (proportional set size, PSS: shared pages
   split between the processes that share them, so the sum over centers is what the machine
   holds), sampled every second, by process.

Growth is the slope of log(cost) against log(N) from the smallest to the largest N: about 1
is linear, about 0 constant.

    python benchmarks/federation_scale.py [--centers 3 10 30 115] [--rounds 3] [--deploy-centers 10]

Phantoms go to benchmarks/_data/federation_scale/, each invocation's runs to a new
benchmarks/_data/federation_scale/runs/<time>/ (not committed). Writes
benchmarks/results/federation_scale.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
WORK = HERE / "_data" / "federation_scale"
sys.path.insert(0, str(HERE))

from federation import coordinator_memory  # noqa: E402
from read_series import machine, write_results  # noqa: E402

SMOKE = ["experiment=phantoms_smoke", "trainer.progress=false", "data.num_patches_per_image=1",
         "fed.eval_bootstraps=10", "network.sw_roi_size=[144,144,96]", "fed.cross_site=false",
         "fed.centers=all"]


def phantoms(n: int) -> Path:
    """N centers of two small cases each (made once, reused by later runs)."""
    root = WORK / f"phantoms_{n}"
    if not (root / "phantoms.json").is_file():
        from medfound.data.phantoms import make_phantoms

        make_phantoms(root, centers=n, cases=2, seed=0, size="small", progress=False)
    return root


class Sampler:
    """Peak memory of processes, sampled every `interval` seconds in a thread.

    `groups` maps a process to the name of the group it counts toward (or None: not counted);
    per group the peak of the summed RSS and PSS over the samples is kept."""

    def __init__(self, groups, interval: float = 0.2, pss: bool = False) -> None:
        self.groups, self.interval, self.pss = groups, interval, pss
        self.peak: dict[str, dict[str, int]] = {}
        self.by_process: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            totals: dict[str, dict[str, int]] = {}
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    group = self.groups(proc)
                    if group is None or not proc.info["cmdline"]:
                        continue
                    info = proc.memory_full_info() if self.pss else proc.memory_info()
                    rss, pss = info.rss, getattr(info, "pss", info.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                t = totals.setdefault(group, {"rss": 0, "pss": 0, "processes": 0})
                t["rss"] += rss
                t["pss"] += pss
                t["processes"] += 1
                kind = f"{group}: {process_kind(proc.info['cmdline'] or [])}"
                seen = self.by_process.setdefault(kind, {"rss": 0, "pss": 0})
                seen["rss"], seen["pss"] = max(seen["rss"], rss), max(seen["pss"], pss)
            for group, t in totals.items():
                peak = self.peak.setdefault(group, {"rss": 0, "pss": 0, "processes": 0})
                for key in peak:
                    peak[key] = max(peak[key], t[key])
            self._stop.wait(self.interval)


def process_kind(cmdline: list[str]) -> str:
    """A short name for what a process of a center or the coordinator is."""
    text = " ".join(cmdline)
    for needle, name in (("flower-supernode", "SuperNode"), ("flwr-clientapp", "ClientApp"),
                         ("medfound.fed.worker", "worker"), ("center join", "center join"),
                         ("flower-superlink", "SuperLink"), ("flwr-serverapp", "ServerApp"),
                         ("fed superlink", "fed superlink"), ("run federate", "run federate")):
        if needle in text:
            return name
    if not cmdline:
        return "?"
    program = Path(cmdline[0]).name
    if program.startswith("python") and len(cmdline) > 1:  # python SCRIPT / python -m MODULE
        return " ".join(Path(part).name for part in cmdline[1:3])
    return program


def coordinator_of(launcher_pid: int):
    """A `Sampler` group function: the recipe process `medfound run federate` starts (the
    ServerApp and Flower's simulation driver; its Ray processes are not counted)."""
    def group(proc: psutil.Process) -> str | None:
        try:
            if proc.ppid() == launcher_pid and any(
                    part.endswith("federate.py") for part in proc.info["cmdline"] or []):
                return "coordinator"
        except psutil.Error:
            return None
        return None
    return group


def simulate(n: int, rounds: int, runs: Path) -> dict:
    """One simulation of N centers into `runs`; its round records and the coordinator's peak
    memory."""
    root = phantoms(n)
    out = runs / f"sim_{n}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "medfound", "run", "federate", "fed.mode=simulation",
           f"data.root={root}", f"fed.rounds={rounds}", f"out_dir={out}",
           f"tracking.uri={WORK / 'mlruns'}", *SMOKE]
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    with Sampler(coordinator_of(proc.pid)) as sampler:
        log, _ = proc.communicate()
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"simulation of {n} centers failed:\n{log[-4000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    records = metrics["rounds"]
    cpus = os.cpu_count() or 1
    parallel = min(n, cpus)  # fed.simulation.cpus_per_center=1: this many centers at once
    rows = []
    for record in records:
        centers = record["train"]["centers"]
        work = sum(m.get("train/seconds", 0.0) + m.get("evaluate/seconds", 0.0)
                   for m in centers.values())
        sent = sum(b["received"] for b in record["bytes"].values())  # bytes sent to centers
        received = sum(b["sent"] for b in record["bytes"].values())
        timing = record["train"].get("timing", {})
        rows.append({"round": record["round"], "round_s": record["duration_s"],
                     "replies": len(centers), "accepted": len(record["train"]["accepted"]),
                     "exchange_s": timing.get("exchange_s"), "screen_s": timing.get("screen_s"),
                     "aggregate_s": timing.get("aggregate_s"),
                     "centers_work_s": work, "centers_work_parallel_s": work / parallel,
                     "beyond_work_s": record["duration_s"] - work / parallel,
                     "bytes_to_centers": sent, "bytes_from_centers": received})
    steady = next((r for r in rows if 1 < r["round"] < len(rows)), rows[-1])
    return {"centers": n, "rounds": rows, "steady": steady, "wall_s": wall,
            "model_bytes_fp32": metrics["model_bytes_fp32"],
            "coordinator_peak_rss": sampler.peak.get("coordinator", {}).get("rss")}


def free_block(size: int) -> int:
    """A port p with p..p+size-1 free on 127.0.0.1, below the kernel's ephemeral range (an
    outgoing connection never takes one of them between this check and the bind)."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, low - size)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports")


def deploy(n: int, rounds: int, runs: Path) -> dict:
    """scripts/local_federation.sh with N centers into `runs`; the peak memory of each center's
    processes."""
    root = phantoms(n)
    out = runs / f"deploy_{n}"
    env = {**os.environ, "PORT": str(free_block(n + 3)), "CENTER_THREADS": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    centers = sorted(p.name for p in root.iterdir() if (p / "datalist.json").is_file())
    root_s = str(root)

    def group(proc: psutil.Process) -> str | None:
        """A center's process is one whose command line, or an ancestor's, names its data."""
        try:
            chain = [proc, *proc.parents()]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        if launcher not in {p.pid for p in chain}:
            return None  # another program's process
        for p in chain:
            try:
                text = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if "center join" in text and root_s in text:
                return next((c for c in centers if f"--center {c} " in text + " "), None)
            if "flwr-serverapp" in text or "fed superlink" in text or "run federate" in text:
                return "coordinator"
        return None

    started = time.time()
    proc = subprocess.Popen([str(REPO / "scripts" / "local_federation.sh"), root_s, str(out),
                             f"fed.rounds={rounds}", "fed.cross_site=false",
                             "trainer.progress=false", "data.num_patches_per_image=1",
                             "fed.eval_bootstraps=10", "network.sw_roi_size=[144,144,96]",
                             f"tracking.uri={WORK / 'mlruns'}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    launcher = proc.pid
    with Sampler(group, interval=1.0, pss=True) as sampler:
        log, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"deployment of {n} centers failed:\n{log[-4000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    per_center = {c: sampler.peak[c] for c in centers if c in sampler.peak}
    kinds = {}
    for key, value in sampler.by_process.items():
        group_name, kind = key.split(": ", 1)
        bucket = "coordinator" if group_name == "coordinator" else "center"
        entry = kinds.setdefault(f"{bucket}: {kind}", {"rss": 0, "pss": 0})
        entry["rss"], entry["pss"] = max(entry["rss"], value["rss"]), max(entry["pss"], value["pss"])
    return {"centers": n, "rounds": len(metrics["rounds"]), "wall_s": time.time() - started,
            "joined": len(per_center),
            "replies_per_round": [len(r["train"]["centers"]) for r in metrics["rounds"]],
            "per_center_peak": per_center, "by_process_peak": kinds,
            "coordinator_peak": sampler.peak.get("coordinator")}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """log-log slope from the first to the last point (None where a value is not positive)."""
    if len(xs) < 2 or min(ys[0], ys[-1]) <= 0:
        return None
    return math.log(ys[-1] / ys[0]) / math.log(xs[-1] / xs[0])


def growth_word(s: float | None) -> str:
    if s is None:
        return "n/a"
    if abs(s) < 0.15:
        return "constant"
    if 0.8 <= s <= 1.2:
        return "linear"
    return "sub-linear" if s < 0.8 else "super-linear"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims = result["simulation"]
    ns = [s["centers"] for s in sims]
    series = [
        ("steady round (s)", [s["steady"]["round_s"] for s in sims]),
        ("beyond the centers' work (s)", [s["steady"]["beyond_work_s"] for s in sims]),
        ("screening (s)", [s["steady"]["screen_s"] for s in sims]),
        ("aggregation (s)", [s["steady"]["aggregate_s"] for s in sims]),
        ("coordinator peak RSS (MiB)", [s["coordinator_peak_rss"] / 2**20 for s in sims]),
        ("bytes in + out per round (MiB)", [(s["steady"]["bytes_to_centers"]
                                             + s["steady"]["bytes_from_centers"]) / 2**20
                                            for s in sims]),
    ]
    mem = [m for m in result["coordinator_memory"] if m["path"].startswith("spooled")]
    held = [m for m in result["coordinator_memory"] if m["path"].startswith("in memory")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (title, ys) in zip(axes.flat, series, strict=False):
        if "RSS" in title:  # a linear axis from 0: a constant reads as one
            ax.semilogx(ns, ys, "o-")
            ax.set_ylim(0, 1.1 * max(ys))
        else:
            ax.loglog(ns, [max(y, 1e-4) for y in ys], "o-")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("centers")
    ax = axes.flat[6]
    ax.loglog([m["centers"] for m in mem], [m["peak_over_model"] for m in mem], "o-",
              label="spooled (default)")
    if held:
        ax.loglog([m["centers"] for m in held], [m["peak_over_model"] for m in held], "s--",
                  label="in memory")
    ax.set_title("coordinator peak ÷ model, reference model (tracemalloc)", fontsize=9)
    ax.set_xlabel("centers")
    ax.legend(fontsize=8)
    axes.flat[7].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(result: dict) -> str:
    m, sims, setup = result["machine"], result["simulation"], result["setup"]
    ns = [s["centers"] for s in sims]
    lines = [
        f"# federation_scale — {result['when']}",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m.get('mem_gib', '?')} GiB. Simulation: Flower's "
        f"simulation engine, {setup['cases_per_center']} phantom cases per center (one trains, one "
        f"validates), tiny detector ({sims[0]['model_bytes_fp32'] / 2**20:.2f} MiB fp32), every "
        f"center in every round, {setup['rounds']} rounds, one OpenMP thread per process, "
        f"{min(ns[-1], m['cores'])} centers at once. Steady round: round "
        f"{sims[0]['steady']['round']} (after the cold first round, before the last one's "
        "extra evaluate exchange).",
        "",
        "| centers | steady round (s) | centers' work ÷ parallel (s) | beyond it (s) | per "
        "center (s) | exchange (s) | screening (s) | aggregation (s) | bytes out | bytes in | "
        "coordinator peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sims:
        r = s["steady"]
        lines.append(
            f"| {s['centers']} | {r['round_s']:.1f} | {r['centers_work_parallel_s']:.1f} | "
            f"{r['beyond_work_s']:.1f} | {r['beyond_work_s'] / s['centers']:.2f} | "
            f"{r['exchange_s']:.1f} | {r['screen_s']:.3f} | {r['aggregate_s']:.3f} | "
            f"{r['bytes_to_centers']:,} | {r['bytes_from_centers']:,} | "
            f"{s['coordinator_peak_rss'] / 2**20:.0f} |")
    lines += ["", f"Growth from {ns[0]} to {ns[-1]} centers (log-log slope):", ""]
    for name, value in result["growth"].items():
        lines.append(f"- {name}: {value['slope']:.2f} ({value['word']})"
                     if value["slope"] is not None else f"- {name}: n/a")
    mem = result["coordinator_memory"] or [{"model_bytes_fp32": 0}]
    lines += ["", f"Coordinator memory while N updates of the reference model "
                  f"({mem[0]['model_bytes_fp32'] / 2**20:.0f} MiB fp32) arrive and are screened and "
                  "averaged (FedAvg), tracemalloc, global model not counted:", "",
              "| path | centers | held once all arrived ÷ model | peak ÷ model | seconds |",
              "|---|---|---|---|---|"]
    for x in result["coordinator_memory"]:
        lines.append(f"| {x['path']} | {x['centers']} | {x['held_after_arrival_over_model']:.2f} | "
                     f"{x['peak_over_model']:.2f} | {x['seconds']:.1f} |")
    for note in result.get("notes", []):
        lines += ["", note]
    dep = result.get("deployment")
    if dep:
        peaks = list(dep["per_center_peak"].values())
        pss = sorted(p["pss"] for p in peaks)
        lines += ["", f"Deployment: {dep['centers']} SuperNodes with their workers on 127.0.0.1 "
                      f"(TLS, node authentication), {dep['rounds']} rounds, replies per round "
                      f"{dep['replies_per_round']}; {dep['joined']} centers seen. Memory of each "
                      "center's processes (PSS, peak over the run):", "",
                  f"- per center: median {pss[len(pss) // 2] / 2**20:.0f} MiB, max "
                  f"{pss[-1] / 2**20:.0f} MiB; all centers together (sum of peaks) "
                  f"{sum(pss) / 2**20:.0f} MiB",
                  f"- coordinator (SuperLink, ServerApp, `run federate`): "
                  f"{dep['coordinator_peak']['pss'] / 2**20:.0f} MiB PSS", "",
                  "| process | peak RSS (MiB) | peak PSS (MiB) |", "|---|---|---|"]
        for kind, v in sorted(dep["by_process_peak"].items()):
            lines.append(f"| {kind} | {v['rss'] / 2**20:.0f} | {v['pss'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--centers", type=int, nargs="+", default=[3, 10, 30, 115],
                    help="federation sizes to simulate")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per simulation (at least 3)")
    ap.add_argument("--memory-centers", type=int, nargs="*", default=None,
                    help="N of the reference-model memory measurement (default: --centers)")
    ap.add_argument("--deploy-centers", type=int, default=10,
                    help="SuperNodes of the deployment measurement (0: skip it)")
    ap.add_argument("--deploy-rounds", type=int, default=2)
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (the steady round is neither the first nor the last)")
    # Each invocation writes its runs into a folder of its own (never into an earlier one's).
    runs = WORK / "runs" / time.strftime("%Y%m%d-%H%M%S")
    runs.mkdir(parents=True)

    sims = []
    for n in args.centers:
        sim = simulate(n, args.rounds, runs)
        r = sim["steady"]
        print(f"{n} centers: steady round {r['round_s']:.1f} s ({r['beyond_work_s']:.1f} s beyond "
              f"the centers' work), screening {r['screen_s']:.3f} s, aggregation "
              f"{r['aggregate_s']:.3f} s, coordinator peak RSS "
              f"{sim['coordinator_peak_rss'] / 2**20:.0f} MiB", flush=True)
        sims.append(sim)

    memory, notes = [], []
    avail = psutil.virtual_memory().available
    for n in args.memory_centers if args.memory_centers is not None else args.centers:
        memory.append(coordinator_memory(n, spool_dir=runs / f"spool_{n}"))
        print(f"coordinator memory, {n} spooled updates: peak "
              f"{memory[-1]['peak_over_model']:.2f}× the model", flush=True)
    for n in args.memory_centers if args.memory_centers is not None else args.centers:
        need = (n + 3) * memory[0]["model_bytes_fp32"]
        if need > 0.6 * avail:
            notes.append(f"In memory with {n} centers is not measured: its {n} updates alone "
                         f"({n * memory[0]['model_bytes_fp32'] / 2**30:.1f} GiB) would not fit in "
                         f"60% of this machine's free memory ({avail / 2**30:.1f} GiB).")
            continue
        memory.append(coordinator_memory(n))
        print(f"coordinator memory, {n} updates in memory: peak "
              f"{memory[-1]['peak_over_model']:.2f}× the model", flush=True)

    dep = deploy(args.deploy_centers, args.deploy_rounds, runs) if args.deploy_centers else None
    ns = [s["centers"] for s in sims]
    spooled = [x for x in memory if x["path"].startswith("spooled")]

    def grow(values: list[float], xs: list[int] = ns) -> dict:
        s = slope([float(x) for x in xs], values)
        return {"slope": s, "word": growth_word(s)}

    growth = {
        "steady round time": grow([s["steady"]["round_s"] for s in sims]),
        "round time beyond the centers' work": grow([s["steady"]["beyond_work_s"] for s in sims]),
        "screening time": grow([s["steady"]["screen_s"] for s in sims]),
        "aggregation time": grow([s["steady"]["aggregate_s"] for s in sims]),
        "bytes per round": grow([s["steady"]["bytes_to_centers"] + s["steady"]["bytes_from_centers"]
                                 for s in sims]),
        "coordinator peak RSS (simulation, tiny model)": grow([s["coordinator_peak_rss"]
                                                               for s in sims]),
        "coordinator peak allocation, spooled (reference model)":
            grow([x["peak_bytes"] for x in spooled], [x["centers"] for x in spooled]),
    }
    result = {"benchmark": "federation_scale", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(),
              "setup": {"centers": ns, "rounds": args.rounds, "cases_per_center": 2,
                        "experiment": "phantoms_smoke", "overrides": SMOKE,
                        "threads_per_process": 1},
              "simulation": sims, "coordinator_memory": memory, "growth": growth,
              "deployment": dep, "notes": notes}
    write_results("federation_scale", result, render(result))
    plot(result, RESULTS / "federation_scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
