"""Simulation mode: the whole federation on one machine with Flower's simulation engine.

One virtual SuperNode per center of ``fed.centers``; node i runs the same ClientApp a real
center runs, with a `Site` whose data folder is ``data.root/<center>`` (the only data that
node reads), work folder ``FED/centers/<center>`` and audit log ``FED/audit/<center>.jsonl``.
The ServerApp (the coordinator) runs in this process, the ClientApps in Ray actors
(``fed.simulation.cpus_per_center`` CPUs each, ``fed.simulation.cpus`` in all).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medfound.errors import MedfoundError
from medfound.fed.client_app import Site, make_client_app
from medfound.fed.server_app import make_server_app
from medfound.fed.settings import FedSettings

__all__ = ["run_simulation", "simulation_sites"]


def simulation_sites(cfg: Mapping[str, Any], settings: FedSettings) -> list[Site]:
    """One Site per center, checked to exist under data.root (one clear error if not)."""
    from medfound.data.detection import DATALIST

    root = Path(cfg["data"]["root"]).resolve()
    out = Path(cfg["out_dir"]).resolve()
    if not root.is_dir():
        raise MedfoundError("no such data folder", path=root,
                            hint="point data.root at the folder holding the center folders")
    from medfound.train.detection import check_world_split

    check_world_split(root, list(settings.centers), "fed.centers")  # a test center never trains
    present = sorted(p.name for p in root.iterdir() if (p / DATALIST).is_file())
    sites = []
    for center in settings.centers:
        if center not in present:
            raise MedfoundError(f"fed.centers names {center!r}, which has no {DATALIST}",
                                path=root, hint=f"centers present: {', '.join(present) or 'none'}")
        sites.append(Site(center=center, data_dir=root / center, work_dir=out / "centers" / center,
                          audit_file=out / "audit" / f"{center}.jsonl",
                          keep_payloads=settings.audit_payloads))
    return sites


def run_simulation(cfg: Mapping[str, Any], config_yaml: str = "") -> None:
    """Run the federation of the resolved recipe config `cfg` in simulation mode."""
    from flwr.simulation import run_simulation as flower_run_simulation

    settings = FedSettings.from_config(cfg)
    sites = simulation_sites(cfg, settings)
    sim = settings.simulation
    cpus = sim.get("cpus") or os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": float(sim.get("cpus_per_center") or 1),
                             "num_gpus": float(sim.get("gpus_per_center") or 0.0)},
        "init_args": {"num_cpus": int(cpus), "include_dashboard": False,
                      "logging_level": "ERROR", "log_to_driver": True},
    }
    # Flower warns that its Python simulation entry point will move to `flwr run`; the
    # engine it starts is the same, so keep the warning out of the user's way (and Ray's
    # tip about a future default it does not apply here).
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray",
                            category=FutureWarning)
    with _quiet_deprecation():
        flower_run_simulation(server_app=make_server_app(cfg, config_yaml),
                              client_app=make_client_app(sites), num_supernodes=len(sites),
                              backend_config=backend)


@contextlib.contextmanager
def _quiet_deprecation():
    logger = logging.getLogger("flwr")

    def drop(record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()

    # Flower prints through its own handler; a Hydra app's root handler would print each
    # line a second time (and Flower's DEBUG lines with it).
    propagate, logger.propagate = logger.propagate, False
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
        logger.propagate = propagate
