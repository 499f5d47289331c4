"""Cross-site validation at the end of a federation: which model works where.

After the last round the coordinator sends the global model to every center, which scores
it on its own validation split exactly as in a round (LUNA16 CPM). With
``fed.share_local_models=true`` (off by default, refused under differential privacy or secure
aggregation) it also sends each center's last local update — the weights that center trained
from the previous global model — to every other center: a center's individual update then
reaches the other centers, which the operator has to agree to. The result is a matrix, model
× evaluating center:

- ``FED/cross_site.csv``: one row per model (``global``, then ``local:<center>``), one column
  per evaluating center, the CPM in each cell; empty where a center cannot compute one (no
  validation nodules) or did not answer;
- ``FED/cross_site.png``: the same matrix as a heatmap;
- ``metrics.json["cross_site"]``: every metric of every cell, the centers that failed, the
  refused replies, and ``sent``: which models went to which center.

The diagonal of the local rows is how a center's model does at home; the rest of its row is
how it travels — the 15–20 point drop between hospitals that federated training addresses.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from medfound.fed.params import encode_arrays
from medfound.fed.protocol import ARRAYS, CONFIG, CROSS_SITE, METRICS, ROUND, center_of
from medfound.fed.screening import reason_text

__all__ = ["GLOBAL", "cross_site_evaluate", "local_name", "plot_cross_site", "read_cross_site",
           "write_cross_site"]

GLOBAL = "global"


def local_name(center: str) -> str:
    """The matrix row of a center's local model."""
    return f"local:{center}"


def cross_site_evaluate(grid: Grid, models: Mapping[str, Mapping[str, np.ndarray]],
                        instruction: Callable[[], ConfigRecord], rnd: int,
                        exchange: Callable[[list[Message]], list[Message]],
                        known: Mapping[int, str]) -> dict[str, Any]:
    """Send `models` to every connected center for evaluation; collect the matrix.

    One message per center carries all the models (``arrays:<model>`` records; a Flower
    deployment starts a process per message, so one message is much cheaper than one per
    model); the reply has one ``metrics:<model>`` record per model. `exchange` sends the
    messages and waits (the coordinator's, which counts the bytes).
    Returns ``{"round", "models": {model: {center: metrics}}, "failed": [{center, reason}],
    "sent": {center: [model]}}``.
    """
    config = instruction()
    config[ROUND] = rnd
    config[CROSS_SITE] = json.dumps(list(models))
    content = RecordDict({CONFIG: config, **{f"{ARRAYS}:{name}": encode_arrays(arrays, "float32")
                                             for name, arrays in models.items()}})
    messages = [Message(content=content, dst_node_id=node, message_type="evaluate")
                for node in sorted(grid.get_node_ids())]
    # What each center was sent, by the name bound to its node when the models left.
    sent = {known.get(m.metadata.dst_node_id, f"node-{m.metadata.dst_node_id}"): list(models)
            for m in messages}
    replies = exchange(messages)
    matrix: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    failed = []
    for reply in replies:
        center = center_of(reply, known)
        if reply.has_error():
            failed.append({"center": center, "reason": reason_text(reply.error.reason)})
            continue
        for name in models:
            key = f"{METRICS}:{name}"
            if key in reply.content.metric_records:
                matrix[name][center] = {k: float(v) for k, v in reply.content[key].items()
                                        if not isinstance(v, list)}
    return {"round": rnd, "models": {m: dict(sorted(c.items())) for m, c in matrix.items()},
            "failed": failed, "sent": dict(sorted(sent.items()))}


def write_cross_site(out: Path, result: Mapping[str, Any], centers: list[str]) -> tuple[Path, Path]:
    """FED/cross_site.csv (CPM per model and evaluating center) and FED/cross_site.png."""
    rows, names = _cpm_matrix(result, centers)
    path = out / "cross_site.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *centers])
        for name, row in zip(names, rows, strict=True):
            writer.writerow([name, *("" if np.isnan(v) else f"{v:.4f}" for v in row)])
    return path, plot_cross_site(np.array(rows, dtype=float).reshape(len(names), len(centers)),
                                 names, centers, out / "cross_site.png",
                                 title=f"cross-site CPM after round {result['round']}")


def plot_cross_site(matrix: np.ndarray, models: list[str], centers: list[str], path: Path,
                    title: str = "cross-site CPM") -> Path:
    """A heatmap of `matrix` (models × evaluating centers, NaN = no value) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(1.6 + 1.3 * len(centers), 1.2 + 0.55 * len(models)), dpi=120)
    ax = fig.add_subplot()
    shown = np.ma.masked_invalid(matrix)
    image = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_facecolor("#d0d0d0")  # cells without a value
    for (i, j), value in np.ndenumerate(matrix):
        text = "n/a" if np.isnan(value) else f"{value:.2f}"
        color = "black" if np.isnan(value) or value > 0.6 else "white"
        ax.text(j, i, text, ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(len(centers)), labels=centers)
    ax.set_yticks(range(len(models)), labels=models)
    ax.set_xlabel("evaluated at")
    ax.set_ylabel("model")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="CPM")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def read_cross_site(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(models, centers, CPM matrix with NaN for empty cells) from a cross_site.csv."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    centers = rows[0][1:]
    models = [r[0] for r in rows[1:]]
    matrix = np.array([[float(v) if v else np.nan for v in r[1:]] for r in rows[1:]], dtype=float)
    return models, centers, matrix.reshape(len(models), len(centers))


def _cpm_matrix(result: Mapping[str, Any], centers: list[str]) -> tuple[list[list[float]], list[str]]:
    names = list(result["models"])
    rows = [[float(result["models"][m].get(c, {}).get("cpm", np.nan)) for c in centers]
            for m in names]
    return rows, names
