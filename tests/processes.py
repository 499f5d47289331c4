"""Helpers for tests that start real Flower processes on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sys
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
