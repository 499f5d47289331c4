"""Helpers for tests that start real Flower processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def free_port_block(n: int = 5) -> int:
    """A port p with p..p+n-1 free on 127.0.0.1 (the SuperLink and each SuperNode's API).

    Drawn below the kernel's ephemeral range: a port from that range, free when checked, can
    be taken a moment later as the local end of any outgoing connection (another test worker's
    HTTP request), and the server started on it then fails with "Address already in use"."""
    low, _ = _ephemeral_range()
    draw = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = draw.randrange(10000, max(10001, low - n))
        if all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no block of free ports")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def medfound_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def three_centers(folder: Path) -> Path:
    """Three small phantom centers (3 cases each) under `folder`/phantoms."""
    from medfound.data.phantoms import make_phantoms

    return make_phantoms(folder / "phantoms", centers=3, cases=3, seed=5, size="small",
                         progress=False)



class Processes:
    """Real `medfound` processes of one test, each leading its own process group (stopping
    one stops what it started), its output in ``folder/<name>.log``; all stopped at the end."""

    def __init__(self, folder: Path):
        self.folder, self.procs, self.env = folder, {}, medfound_env()

    def start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "w") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "medfound", *args], env={**self.env, **(env or {})},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self.procs[name]

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait_for(self, condition: Callable[[], bool], seconds: float, what: str) -> None:
        """Until `condition()` holds; an AssertionError with every log's tail after `seconds`."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            if condition():
                return
            time.sleep(0.3)
        tails = "\n".join(f"--- {n}\n{self.log(n)[-2000:]}" for n in self.procs)
        raise AssertionError(f"timed out waiting for {what}\n{tails}")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        return proc.wait(timeout=30)

    def stop_all(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                    self.stop(name)

    def superlink(self, name: str, port: int, database: Path | None = None) -> None:
        """An insecure SuperLink on 127.0.0.1:`port` (its state in `database` when given)."""
        self.start(name, "fed", "superlink", "--address", f"127.0.0.1:{port}", "--insecure",
                   *(("--database", str(database)) if database is not None else ()))
        self.wait_for(lambda: "Uvicorn running" in self.log(name), 120, f"SuperLink {name}")
