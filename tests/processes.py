"""Helpers for tests that start real Flower processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def free_port_block(n: int = 5) -> int:
    """A port p with p..p+n-1 free on 127.0.0.1 (the SuperLink and each SuperNode's API)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535 and all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no block of free ports")


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
