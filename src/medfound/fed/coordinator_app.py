"""The ServerApp a SuperLink runs in deployment mode (FED/app/pyproject.toml names it).

It reads the resolved recipe config from the run config (medfound.fed.deployment.write_app)
and runs the same coordinator as simulation mode (medfound.fed.server_app.run_coordinator).
It lives apart from medfound.fed.deployment so that the processes that only supervise a
center (`medfound center join`) never import Flower's server side or torch.
"""

from __future__ import annotations

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfound.errors import MedfoundError
from medfound.fed.deployment import RUN_CONFIG_KEY
from medfound.fed.server_app import run_coordinator

__all__ = ["server_app"]

server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    text = context.run_config.get(RUN_CONFIG_KEY)
    if not text:
        raise MedfoundError(f"the run config has no {RUN_CONFIG_KEY!r}",
                            hint="submit the run with `medfound run federate fed.mode=deployment`")
    run_coordinator(grid, yaml.safe_load(str(text)), str(text))
