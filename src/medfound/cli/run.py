"""`medfound run RECIPE key=value ...`: a Hydra recipe from recipes/, after the preflight checks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfound.errors import MedfoundError


def recipes_dir() -> Path:
    """recipes/ of the checkout medfound runs from (MEDFOUND_RECIPES overrides)."""
    import os

    env = os.environ.get("MEDFOUND_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "recipes"


def cmd_run(args) -> int:
    import subprocess

    folder = recipes_dir()
    recipe = folder / f"{args.recipe}.py"
    if not recipe.is_file():
        known = sorted(p.stem for p in folder.glob("*.py")) if folder.is_dir() else []
        raise MedfoundError(
            f"no recipe named '{args.recipe}'", path=folder,
            hint=("recipes here: " + ", ".join(known)) if known else
            "run from a medfound checkout (pip install -e .) or set MEDFOUND_RECIPES")
    from medfound.preflight import check_recipe

    check_recipe(recipe, args.overrides)  # the common mistakes, before torch is imported
    # A recipe is a Hydra app: it parses key=value overrides, -m sweeps and --cfg itself.
    return subprocess.call([sys.executable, str(recipe), *args.overrides])


def add_run(sub) -> None:
    """`medfound run RECIPE key=value ...`."""
    s = sub.add_parser(
        "run", help="run a Hydra recipe: medfound run RECIPE key=value ...",
        description="Run a recipe from recipes/ (a Hydra app over configs/) with key=value "
        "overrides, e.g. `medfound run train_detector data.root=DIR experiment=phantoms_smoke "
        "out_dir=RUN`. Hydra's own flags work too: -m for sweeps, --cfg job to print the "
        "composed config, --help for the recipe's config groups.")
    s.add_argument("recipe", help="recipe name, e.g. train_detector, evaluate_detector")
    s.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides key=value")
    s.set_defaults(func=cmd_run)
