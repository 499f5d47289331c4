"""The checks `medfound run RECIPE key=value ...` makes before it starts the recipe.

A recipe imports torch, MONAI and MLflow before Hydra parses its overrides, so a typo would
take seconds and end in Hydra's traceback. Composing the recipe's config here with Hydra's
compose API (no torch) lets the common mistakes end in one line at once: an unknown key or
group, a value the config requires and the command left out (`out_dir=???`), an output folder
that cannot be written, a data folder that does not exist, and an output folder that already
holds another run (which a new run would overwrite: refused unless `resume=true`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from medfound.errors import MedfoundError

__all__ = ["check_recipe"]

# Overrides that are Hydra's own business (sweeps, --cfg, --help, hydra.* settings): no check.
_HYDRA_FLAGS = re.compile(r"^(-|hydra[./])")
# Folders a training recipe writes into out_dir; finding one means out_dir holds a run.
_RUN_MARKERS = ("checkpoints", "model", "encoder", "server")


def _config_name(recipe: Path) -> str:
    found = re.search(r"config_name\s*=\s*[\"']([^\"']+)[\"']", recipe.read_text())
    return found.group(1) if found else recipe.stem


def check_recipe(recipe: Path, overrides: Sequence[str]) -> None:
    """Compose `recipe`'s config with `overrides` and raise a one-line `MedfoundError` for a
    mistake the run would otherwise report late or as a traceback."""
    if any(_HYDRA_FLAGS.match(o) for o in overrides):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    configs = recipe.resolve().parent.parent / "configs"
    if not configs.is_dir():
        return  # a recipe outside a checkout: Hydra reports on its own
    try:
        with initialize_config_dir(str(configs), version_base=None):
            cfg = compose(_config_name(recipe), overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MedfoundError(f"{recipe.stem}: {first}",
                            hint=f"print the valid keys with: medfound run {recipe.stem} --cfg job") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise MedfoundError(f"{recipe.stem} needs {', '.join(missing)}",
                            hint="add " + " ".join(f"{k}=VALUE" for k in missing))
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise MedfoundError(f"{recipe.stem}: {first}", hint="check the ${...} values you set") from None
    data = values.get("data") if isinstance(values.get("data"), dict) else {}
    root = data.get("root")
    if isinstance(root, str) and root and not Path(root).exists():
        raise MedfoundError("no such data folder", path=root, hint="check data.root=")
    out = values.get("out_dir")
    if isinstance(out, str) and out:
        out_dir = Path(out)
        if "resume" in values and not values["resume"] and out_dir.is_dir():
            held = [m for m in _RUN_MARKERS if (out_dir / m).exists()]
            if held:
                raise MedfoundError(f"out_dir holds an earlier run ({', '.join(held)}/)", path=out_dir,
                                    hint="resume=true continues it; or choose a new out_dir "
                                         "(a new run never overwrites another)")
        from medfound.outputs import writable_folder

        writable_folder(out_dir, "out_dir")
