#!/usr/bin/env python3
"""Print the LUNA16 metrics of several evaluate_detector outputs side by side.

    python scripts/compare_cpm.py NAME=EVAL_DIR [NAME=EVAL_DIR ...]

Each EVAL_DIR is the out_dir of `medfound run evaluate_detector` (its metrics.json). `make demo`
uses it to print federated vs pooled vs local on the same validation studies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv) or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 2
    rows = []
    for arg in argv:
        name, folder = arg.split("=", 1)
        path = Path(folder) / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"error: {path}: {err} (run evaluate_detector with out_dir={folder})",
                  file=sys.stderr)
            return 1
        cpm, ci = metrics.get("cpm"), metrics.get("cpm_ci95") or [None, None]
        rows.append((name, cpm, ci, metrics.get("n_scans"), metrics.get("n_nodules")))

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  {'CPM':>6}  {'95% CI':>15}  scans  nodules")
    for name, cpm, ci, scans, nodules in rows:
        print(f"{name:<{width}}  {f(cpm):>6}  {f(ci[0]):>6} – {f(ci[1]):<6}  {scans:>5}  {nodules:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
