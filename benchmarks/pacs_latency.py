"""Benchmark: `medfound serve` against a real Orthanc — latency, throughput and memory.

1. Latency, one full-size phantom CT (512×512, `medfound phantoms --size full`): Orthanc sends
   it to the node (C-STORE, its /modalities/{id}/store), the node answers with the SR, which is
   stored back in Orthanc. Split, from the node's own records (WORK/studies/*/state.json):
   receive (the whole study over DICOM, first to last instance), idle (the --idle-s wait that
   decides the study is complete), read (DICOM → volume), inference (preprocess, network,
   postprocess), write (findings.json, SR, overview), store (the SR's C-STORE to Orthanc), and
   the latency from the last instance received to the SR stored.
2. Throughput: K studies (the full-size CT, K−1 of them copies with new UIDs) sent by Orthanc
   at once (K store jobs), studies per hour from the first instance sent to the last SR stored.
3. Memory: the serve process's RSS (psutil, sampled every 0.1 s): after start-up (model loaded)
   and its peak over both runs.
4. Orthanc's TCP_NODELAY: Orthanc runs with TCP_NODELAY=1 in its environment (its DICOM stack
   keeps Nagle's algorithm on otherwise); one more study is sent with Orthanc restarted without
   it, and its receive time is set beside the others'.

    python benchmarks/pacs_latency.py [--studies 4] [--idle-s 2] [--threads 2] [--reps 3]

Needs Orthanc and its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb). The detector is
the tiny design with random weights at 1.4 mm spacing and a 128×128×64 window (as in
benchmarks/inference.py); speed does not depend on the weights. Data go to benchmarks/_data/
(not committed). Writes benchmarks/results/pacs.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pydicom
from pydicom.uid import generate_uid

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = HERE / "_data" / "pacs"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/orthanc.py: the same Orthanc the tests start

from read_series import machine, write_results  # noqa: E402

from orthanc import Orthanc  # noqa: E402
from processes import free_port_block  # noqa: E402

TINY_FULL = {"spacing_mm": [1.40625, 1.40625, 2.5], "patch_size": [64, 64, 32],
             "sw_roi_size": [128, 128, 64]}


def prepare(k: int) -> tuple[Path, list[Path]]:
    """The export and K full-size studies (the phantom and K−1 copies with new UIDs)."""
    from medfound.data.phantoms import make_phantoms

    exp = DATA / "exp"
    if not (exp / "model_card.json").exists():
        import torch

        from medfound.export.onnx import export_model_package
        from medfound.models.detection import DetectorConfig, build_network
        from medfound.train.package import save_model_package

        cfg = DetectorConfig.preset("tiny", score_thresh=0.02, **TINY_FULL)
        network = build_network(cfg, seed=0)
        with torch.no_grad():
            network.classification_head.cls_logits.bias.zero_()
        shutil.rmtree(DATA / "model", ignore_errors=True)
        package = save_model_package(DATA / "model", network, task="lung_nodule_detection",
                                     model_config=cfg.to_dict(),
                                     preprocessing={"spacing_mm": cfg.spacing_mm,
                                                    "hu_window": cfg.hu_window})
        export_model_package(package, exp, parity_patches=1, allow_unvalidated=True)
    source = DATA / "phantoms" / "center_0" / "case_000" / "ct"
    if not source.is_dir():
        make_phantoms(DATA / "phantoms", centers=1, cases=1, seed=3, size="full", progress=False)
    studies = [source]
    for n in range(1, k):
        copy = DATA / "copies" / f"study_{n}"
        if not copy.is_dir():
            tmp = copy.with_name(copy.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            study, series = generate_uid(), generate_uid()
            for f in sorted(source.glob("*.dcm")):
                ds = pydicom.dcmread(f)
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.PatientID = f"BENCH{n:03d}"
                ds.save_as(tmp / f.name, enforce_file_format=True)
            tmp.rename(copy)
        studies.append(copy)
    return exp, studies


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in [self.proc, *self.proc.children(recursive=True)])

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return
            time.sleep(0.1)


def wait_sr(orthanc: Orthanc, uid: str, timeout: float = 900) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc.series_of(uid, "SR"):
            return time.time()
        time.sleep(0.2)
    raise RuntimeError(f"no SR for {uid} within {timeout} s")


def rounds(work: Path) -> list[dict]:
    out = []
    for path in (work / "studies").glob("*/state.json"):
        state = json.loads(path.read_text())
        for r in state["rounds"]:
            out.append({**r, "last_received_t": state["last_received_t"],
                        "first_received_t": state["first_received_t"],
                        "queued_t": state.get("queued_t")})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=4, help="studies sent at once (throughput)")
    ap.add_argument("--idle-s", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3, help="latency runs (a fresh study UID each)")
    args = ap.parse_args()

    exp, studies = prepare(args.reps + args.studies + 1)  # the last: the Nagle comparison
    load = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews every figure
    files = {s: sorted(s.glob("*.dcm")) for s in studies}
    heads = {s: pydicom.dcmread(files[s][0], stop_before_pixels=True) for s in studies}
    uids = {s: str(heads[s].StudyInstanceUID) for s in studies}
    series = {s: str(heads[s].SeriesInstanceUID) for s in studies}
    run_dir = DATA / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    base = free_port_block(3)
    orthanc = Orthanc(run_dir / "orthanc", base, base + 1,
                      modalities={"medfound": ["MEDFOUND", "127.0.0.1", base + 2]}).start()
    serve = None
    try:
        ids = {s: orthanc.upload(files[s]) for s in studies}
        work = run_dir / "work"
        log = open(run_dir / "serve.log", "w")
        serve = subprocess.Popen(
            [sys.executable, "-m", "medfound", "serve", "--model", str(exp), "--work", str(work),
             "--port", str(base + 2), "--bind", "127.0.0.1",
             "--send-to", f"dimse:ORTHANC@127.0.0.1:{base + 1}", "--idle-s", str(args.idle_s),
             "--threshold", "0.5", "--threads", str(args.threads)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        from medfound.pacs.connection import PacsError, echo, parse_address

        while True:
            try:
                echo(parse_address(f"dimse:MEDFOUND@127.0.0.1:{base + 2}"), "BENCH")
                break
            except PacsError:
                time.sleep(0.3)
        sampler = RssSampler(serve.pid)
        time.sleep(1.0)
        rss_idle = sampler.rss()
        sampler.start()

        def stored_rounds() -> dict[str, dict]:
            return {x["series_read"]: x for x in rounds(work) if x.get("stored_t")}

        # 1. latency: one study at a time
        latency = []
        for s in studies[: args.reps]:
            t0 = time.time()
            orthanc.post("/modalities/medfound/store", {"Resources": [ids[s]], "Synchronous": True},
                         timeout=900)
            wait_sr(orthanc, uids[s])
            while series[s] not in stored_rounds():  # the node records it just after storing
                time.sleep(0.1)
            r = stored_rounds()[series[s]]
            t = r["timings_s"]
            latency.append({
                "instances": len(files[s]),
                "receive_s": r["last_received_t"] - r["first_received_t"],
                "idle_s": r["queued_t"] - r["last_received_t"],
                "read_s": t["read"], "inference_s": t["preprocess"] + t["network"] + t["postprocess"],
                "network_s": t["network"], "write_s": t["write"], "store_s": r["store_s"],
                "last_instance_to_sr_stored_s": r["stored_t"] - r["last_received_t"],
                "after_idle_s": r["stored_t"] - r["queued_t"],
                # listing the study's series and choosing one, the loop's bookkeeping
                "other_s": (r["stored_t"] - r["queued_t"]) - t["read"] - t["preprocess"]
                - t["network"] - t["postprocess"] - t["write"] - r["store_s"],
                "sent_to_sr_stored_s": r["stored_t"] - t0})
        # 2. throughput: K other studies sent at once (K Orthanc store jobs)
        batch = studies[args.reps:-1]
        t0 = time.time()
        jobs = [orthanc.post("/modalities/medfound/store",
                             {"Resources": [ids[s]], "Synchronous": False})["ID"] for s in batch]
        deadline = time.monotonic() + 1800
        while not all(series[s] in stored_rounds() for s in batch):
            if time.monotonic() > deadline:
                raise RuntimeError("the throughput run did not finish in 30 minutes")
            time.sleep(0.5)
        done = [stored_rounds()[series[s]] for s in batch]
        t1 = max(x["stored_t"] for x in done)
        states = [orthanc.get(f"/jobs/{job}")["State"] for job in jobs]
        throughput = {"studies": len(batch), "instances_each": len(files[batch[0]]),
                      "orthanc_jobs": states, "elapsed_s": t1 - t0,
                      "studies_per_hour": len(batch) / (t1 - t0) * 3600,
                      "mean_latency_last_instance_to_sr_s":
                          statistics.mean(x["stored_t"] - x["last_received_t"] for x in done),
                      "receive_all_s": max(x["last_received_t"] for x in done) - t0}
        sampler.stop.set()
        sampler.join()
        memory = {"rss_after_start_mb": rss_idle / 2**20, "rss_peak_mb": sampler.peak / 2**20}
        # 3. the same Orthanc without TCP_NODELAY=1 (its default): one more study's receive
        orthanc.stop()
        orthanc.tcp_nodelay = False
        orthanc.start()
        last = studies[-1]
        orthanc.post("/modalities/medfound/store", {"Resources": [ids[last]], "Synchronous": True},
                     timeout=900)
        wait_sr(orthanc, uids[last])
        while series[last] not in stored_rounds():
            time.sleep(0.1)
        r = stored_rounds()[series[last]]
        nagle = {"receive_s_without_tcp_nodelay": r["last_received_t"] - r["first_received_t"],
                 "receive_s_with_tcp_nodelay": statistics.median(x["receive_s"] for x in latency),
                 "instances": len(files[last])}
        nagle["ratio"] = nagle["receive_s_without_tcp_nodelay"] / nagle["receive_s_with_tcp_nodelay"]
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(30)
        orthanc.stop()

    med = {k: statistics.median(x[k] for x in latency) for k in latency[0]}
    result = {"benchmark": "pacs_latency", "machine": {**machine(), "load_average_1_5_15": load},
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "settings": {"idle_s": args.idle_s, "threads": args.threads, "reps": args.reps,
                           "detector": "tiny, random weights", **TINY_FULL},
              "latency_runs": latency, "latency_median": med, "throughput": throughput,
              "memory": memory, "orthanc_tcp_nodelay": nagle}
    write_results("pacs", result, markdown(result))
    return 0


def markdown(r: dict) -> str:
    m, t, mem, mach = r["latency_median"], r["throughput"], r["memory"], r["machine"]
    n = r["orthanc_tcp_nodelay"]
    rows = [("receive (first → last instance, Orthanc C-STORE)", m["receive_s"]),
            ("idle wait (--idle-s, study complete)", m["idle_s"]),
            ("read (DICOM → volume)", m["read_s"]),
            ("inference (preprocess + network + postprocess)", m["inference_s"]),
            ("  of which network", m["network_s"]),
            ("write (findings.json, SR, overview)", m["write_s"]),
            ("store (SR C-STORE to Orthanc)", m["store_s"]),
            ("other (listing and choosing the series, bookkeeping)", m["other_s"]),
            ("**last instance received → SR stored**", m["last_instance_to_sr_stored_s"]),
            ("  of which after the idle wait", m["after_idle_s"])]
    lines = [f"# medfound serve against Orthanc ({r['date']})", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores (load average "
             f"{mach.get('load_average_1_5_15', ['?'])[0]} at the start); threads {r['settings']['threads']}; --idle-s {r['settings']['idle_s']}; "
             f"tiny detector at {r['settings']['spacing_mm']} mm, window {r['settings']['sw_roi_size']}.",
             "", f"One full-size phantom CT ({r['latency_runs'][0]['instances']} instances, 512×512), "
             f"median of {len(r['latency_runs'])} runs:", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {v:.2f} |" for name, v in rows]
    lines += ["", f"Throughput: {t['studies']} studies sent at once by Orthanc ({t['studies']} store "
              f"jobs; all received after {t['receive_all_s']:.1f} s): {t['elapsed_s']:.1f} s "
              f"from the first send to the last SR stored, **{t['studies_per_hour']:.0f} studies/hour** "
              f"(mean last instance → SR stored {t['mean_latency_last_instance_to_sr_s']:.1f} s, "
              "inference runs one study at a time).", "",
              f"Memory (serve process RSS): {mem['rss_after_start_mb']:.0f} MB after start-up, "
              f"{mem['rss_peak_mb']:.0f} MB peak.", "",
              f"Orthanc runs with TCP_NODELAY=1 in its environment above. Without it (its default) "
              f"the same study took {n['receive_s_without_tcp_nodelay']:.1f} s to receive instead of "
              f"{n['receive_s_with_tcp_nodelay']:.1f} s ({n['ratio']:.1f}×): each instance waits for "
              "a delayed ACK.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
