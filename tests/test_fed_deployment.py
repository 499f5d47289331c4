"""Deployment mode with real Flower processes on 127.0.0.1: a SuperLink, three SuperNodes and
`flwr run`, over TLS with certificates scripts/make_certs.sh makes; plus the commands' errors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from medfound.cli import main
from processes import free_port_block, medfound_env, three_centers

REPO = Path(__file__).resolve().parents[1]
CENTERS = ("center_0", "center_1", "center_2")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return three_centers(tmp_path_factory.mktemp("deploy"))


@pytest.mark.long
@pytest.mark.skipif(shutil.which("openssl") is None, reason="scripts/make_certs.sh needs openssl")
def test_local_federation_over_tls_trains_a_round_and_stops_every_process(
        phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "FED"
    env = {**medfound_env(), "PORT": str(free_port_block())}
    res = subprocess.run([str(REPO / "scripts" / "local_federation.sh"), str(phantoms), str(out),
                          "fed.rounds=1", "trainer.progress=false", "data.num_patches_per_image=1",
                          "fed.eval_bootstraps=10", "network.sw_roi_size=[144,144,96]",
                          "fed.share_local_models=true"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # TLS: the SuperLink served HTTPS, with the certificate the script made.
    assert "running on https://127.0.0.1" in (out / "logs" / "superlink.log").read_text()
    assert (out / "certs" / "ca.crt").is_file()
    # Node authentication: the SuperLink admitted registered keys only, and every center used one.
    assert "registered centers only" in (out / "logs" / "superlink.log").read_text()
    assert res.stdout.count("as SuperNode") == len(CENTERS)
    for center in CENTERS:
        assert (out / "keys" / f"{center}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        assert (out / "keys" / f"{center}.key").stat().st_mode & 0o077 == 0

    # Same outputs as simulation mode: the round with all three centers, a model package.
    # (More rounds over real processes: tests/test_fed_robustness.py.)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1]
    for record in metrics["rounds"]:
        assert sorted(record["train"]["accepted"]) == list(CENTERS)
        assert sorted(record["evaluate"]["centers"]) == list(CENTERS)
    model = json.loads((out / "model" / "model.json").read_text())
    assert model["task"] == "lung_nodule_detection"
    assert (out / "server" / "state.pt").is_file()

    # Each center's own audit log, written by its SuperNode, lists what it sent: a train
    # reply, an evaluate reply and a cross-site one, whose sizes add up to what the
    # coordinator received. It is signed with the center's node key, and every message in it
    # is in the coordinator's receipts with the same hash, both ways, across the real wire.
    for center in CENTERS:
        log = out / "centers" / center / "audit" / f"{center}.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        sent_records = [r for r in records if r["direction"] == "sent"]
        assert sorted(r["kind"] for r in sent_records) == ["cross-site", "evaluate", "query",
                                                           "train"]
        sent = sum(r["bytes"] for r in sent_records)
        assert sent == (sum(r["bytes"][center]["sent"] for r in metrics["rounds"])
                        + metrics["cross_site"]["bytes"][center]["sent"])
        assert all(r["sig"] for r in records)
        assert main(["center", "audit", "--verify", str(log), "--public-key",
                     str(out / "keys" / f"{center}.pub")]) == 0
        assert main(["fed", "reconcile", "--center-log", str(log),
                     "--receipts", str(out / "receipts.jsonl")]) == 0
    # Cross-site validation ran over the real processes too: four models, three centers.
    assert (out / "cross_site.csv").read_text().splitlines()[0] == "model," + ",".join(CENTERS)
    assert sorted(metrics["cross_site"]["models"]) == ["global", *(f"local:{c}" for c in CENTERS)]

    # Nothing the script started is left running.
    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                 if any(str(out) in part for part in (p.info["cmdline"] or []))]
    assert leftovers == []


@pytest.mark.long
@pytest.mark.skipif(shutil.which("openssl") is None, reason="scripts/make_certs.sh needs openssl")
def test_secure_aggregation_over_real_supernodes_and_their_workers(phantoms: Path,
                                                                   tmp_path: Path) -> None:
    """SecAgg+ keeps per-center protocol state between its four steps; under a SuperNode that
    state lives in Flower's context, which the relay carries to the center's worker and back."""
    out = tmp_path / "FED"
    env = {**medfound_env(), "PORT": str(free_port_block())}
    res = subprocess.run([str(REPO / "scripts" / "local_federation.sh"), str(phantoms), str(out),
                          "fed.rounds=1", "fed.privacy.secagg=true", "fed.cross_site=false",
                          "trainer.progress=false", "data.num_patches_per_image=1",
                          "fed.eval_bootstraps=10", "network.sw_roi_size=[144,144,96]"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())["rounds"][0]["train"]
    assert record["accepted"] == list(CENTERS) and record["secagg"]["mean_update_norm"] > 0
    for center in CENTERS:
        assert "worker is not running" not in (out / "logs" / f"{center}.log").read_text()
        lines = (out / "centers" / center / "audit" / f"{center}.jsonl").read_text().splitlines()
        assert [r["kind"] for line in lines if (r := json.loads(line))["direction"] == "sent"] == [
            "query", "secagg-setup", "secagg-share_keys", "secagg-collect_masked_vectors",
            "secagg-unmask", "evaluate"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="scripts/make_certs.sh needs openssl")
def test_superlink_with_auth_admits_registered_centers_only(phantoms: Path, tmp_path: Path) -> None:
    """A registered center's SuperNode comes online; one with an unregistered key, and one
    with no key, are refused and exit. Real SuperLink and SuperNodes over TLS on 127.0.0.1."""
    env = medfound_env()
    port = free_port_block()
    subprocess.run([str(REPO / "scripts" / "make_certs.sh"), str(tmp_path / "certs")], check=True,
                   capture_output=True, env=env)
    ca = str(tmp_path / "certs" / "ca.crt")

    def medfound(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medfound", *args], capture_output=True,
                              text=True, env=env, timeout=120, **kw)

    for center in ("center_0", "center_1"):
        assert medfound("center", "keys", "--out", str(tmp_path / "keys"), "--center",
                        center).returncode == 0
    again = medfound("center", "keys", "--out", str(tmp_path / "keys"), "--center", "center_0")
    assert again.returncode != 0 and "already exists" in again.stderr

    procs = []

    def start(*args: str, log: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "medfound", *args], env=env,
                                stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    try:
        start("fed", "superlink", "--address", f"127.0.0.1:{port}", "--certs",
              str(tmp_path / "certs"), "--auth", log="superlink.log")
        for _ in range(150):
            if "Uvicorn running" in (tmp_path / "superlink.log").read_text():
                break
            time.sleep(0.2)
        reg = medfound("fed", "register", str(tmp_path / "keys" / "center_0.pub"), "--superlink",
                       f"127.0.0.1:{port}", "--root-certificates", ca)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        assert "as SuperNode" in reg.stdout

        def join(center: str, n: int, key: str | None) -> subprocess.Popen:
            args = ["center", "join", "--superlink", f"127.0.0.1:{port}", "--data",
                    str(phantoms / center), "--work", str(tmp_path / "work" / f"{center}{n}"),
                    "--root-certificates", ca, "--port", str(port + 2 + n)]
            return start(*args, *(["--auth-key", key] if key else []), log=f"join{n}.log")

        admitted = join("center_0", 0, str(tmp_path / "keys" / "center_0.key"))
        unregistered = join("center_1", 1, str(tmp_path / "keys" / "center_1.key"))
        keyless = join("center_2", 2, None)
        for proc in (unregistered, keyless):
            assert proc.wait(timeout=120) != 0
        logs = [(tmp_path / f"join{n}.log").read_text() for n in (1, 2)]
        assert all("Exit Code: 305" in log for log in logs)  # could not connect to the SuperLink
        assert "Failed to activate SuperNode" in logs[0]
        assert "must be registered" in logs[1]
        for _ in range(300):  # the admitted center's SuperNode logs its ID once it is online
            log0 = (tmp_path / "join0.log").read_text()
            if "SuperNode ID" in log0 or admitted.poll() is not None:
                break
            time.sleep(0.2)
        assert admitted.poll() is None  # still connected
        assert "SuperNode ID" in log0 and "Failed to activate" not in log0
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)


def test_center_join_and_superlink_refuse_bad_arguments_with_one_line(tmp_path: Path) -> None:
    def medfound(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medfound", *args], capture_output=True,
                              text=True, env=medfound_env(), timeout=120)

    res = medfound("center", "join", "--superlink", "127.0.0.1:9092", "--data", str(tmp_path),
                   "--insecure")
    assert res.returncode != 0 and "no datalist.json" in res.stderr
    (tmp_path / "datalist.json").write_text("{}")
    res = medfound("center", "join", "--superlink", "127.0.0.1:9092", "--data", str(tmp_path))
    assert res.returncode != 0 and "--root-certificates" in res.stderr
    res = medfound("fed", "superlink", "--certs", str(tmp_path))
    assert res.returncode != 0 and "lacks ca.crt" in res.stderr
    res = medfound("fed", "superlink")
    assert res.returncode != 0 and "make_certs.sh" in res.stderr


def test_deployment_run_needs_a_ca_or_insecure(phantoms: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "medfound", "run", "federate",
                          "fed.mode=deployment", f"data.root={phantoms}",
                          "experiment=phantoms_smoke", f"out_dir={tmp_path / 'FED'}"],
                         capture_output=True, text=True, env=medfound_env(), timeout=300)
    assert res.returncode != 0
    assert "root_certificates" in res.stderr and "Traceback" not in res.stderr

