"""A study's findings scored against its annotated nodules: `medfound infer --annotations`.

The annotations are a LUNA16 table (``seriesuid,coordX,coordY,coordZ,diameter_mm``, LPS mm);
further columns (the phantoms' ``nodule_type`` and ``location``) are kept and shown. A study's
nodules are the rows whose ``seriesuid`` is the study's SeriesInstanceUID (for a NIfTI/MetaImage
file, its name without the extension, as LUNA16 names its files).

A finding hits a nodule by LUNA16's rule, the one the FROC uses (`medfound.metrics.froc._hits`):
its centre lies strictly closer than the nodule's radius to the nodule's centre. A nodule is
found when a finding hits it, and its probability is the highest among those findings; its
distance is from its centre to the nearest finding, hit or not. A finding that hits no nodule
is a false positive; one that hits several matches the nearest.

Numpy only, like the rest of the inference core.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfound.errors import MedfoundError
from medfound.metrics.froc import _hits

__all__ = ["CRITERION", "REQUIRED_COLUMNS", "format_reference", "read_annotations", "score_findings",
           "unmatched_annotations"]

REQUIRED_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
_HINT = "LUNA16 columns: seriesuid,coordX,coordY,coordZ,diameter_mm (LPS mm); more columns may follow"
CRITERION = "LUNA16: a finding hits a nodule when its centre lies within the nodule's radius"


def read_annotations(path: str | Path) -> list[dict[str, Any]]:
    """The nodules of a LUNA16 annotations CSV, in file order.

    Each: ``row`` (1 = the first row after the header), ``seriesuid``, ``center_lps_mm``,
    ``diameter_mm`` and ``extra`` (the other columns' values, by column name). A missing
    column, an empty or non-numeric value, a diameter that is not > 0 or a row with more
    fields than the header is a MedfoundError naming the file, the row and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise MedfoundError("annotations file not found", path, hint=_HINT)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = list(reader)
    except UnicodeDecodeError:
        raise MedfoundError("annotations are not a UTF-8 text CSV", path, hint=_HINT) from None
    except csv.Error as err:
        raise MedfoundError(f"annotations are not a readable CSV ({err})", path, hint=_HINT) from None
    if not header:
        raise MedfoundError("annotations file is empty (no header row)", path, hint=_HINT)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise MedfoundError(f"annotations lack column(s) {', '.join(missing)} "
                            f"(header: {','.join(header)})", path, hint=_HINT)
    dup = next((h for h in header if h and header.count(h) > 1), None)
    if dup is not None:
        raise MedfoundError(f"annotations name column {dup} twice", path, hint=_HINT)
    at = {c: header.index(c) for c in header if c}
    nodules = []
    for n, fields in enumerate(rows, start=1):
        if not any(v.strip() for v in fields):
            continue  # a blank line
        where = f"annotations row {n} (line {n + 1})"
        if len(fields) > len(header):
            raise MedfoundError(f"{where} has {len(fields)} fields; the header names "
                                f"{len(header)} columns", path, hint=_HINT)
        values = {c: (fields[i].strip() if i < len(fields) else "") for c, i in at.items()}
        if not values["seriesuid"]:
            raise MedfoundError(f"{where}, column seriesuid: empty", path, hint=_HINT)
        numbers = {}
        for c in REQUIRED_COLUMNS[1:]:
            try:
                numbers[c] = float(values[c])
            except ValueError:
                numbers[c] = math.nan
            if not math.isfinite(numbers[c]):
                raise MedfoundError(f"{where}, column {c}: {values[c]!r} is not a finite number",
                                    path, hint=_HINT)
        if numbers["diameter_mm"] <= 0:
            raise MedfoundError(f"{where}, column diameter_mm: {values['diameter_mm']} is not a "
                                "diameter (must be > 0 mm)", path, hint=_HINT)
        nodules.append({"row": n, "seriesuid": values["seriesuid"],
                        "center_lps_mm": [numbers["coordX"], numbers["coordY"], numbers["coordZ"]],
                        "diameter_mm": numbers["diameter_mm"],
                        "extra": {c: v for c, v in values.items() if c not in REQUIRED_COLUMNS}})
    return nodules


def score_findings(findings: Sequence[dict[str, Any]], nodules: Sequence[dict[str, Any]]
                   ) -> dict[str, Any]:
    """One study's findings (``id``, ``center_lps_mm``, ``probability``, ``diameter_mm``)
    against its `nodules` (from `read_annotations`).

    Returns ``nodules`` (each: ``id`` 1…n, ``row``, centre, diameter, the extra columns,
    ``found``, ``probability`` of its best hit or None, ``distance_mm`` to the nearest finding or
    None without findings, ``nearest_finding`` id), ``matches`` (per finding, in order: the id
    of the nodule it hits, nearest first, or None), ``false_positives`` (the findings that hit
    no nodule) and the counts ``n_nodules``, ``n_found``, ``n_false_positives``.
    """
    f_xyz = np.asarray([f["center_lps_mm"] for f in findings], dtype=np.float64).reshape(-1, 3)
    n_xyz = np.asarray([n["center_lps_mm"] for n in nodules], dtype=np.float64).reshape(-1, 3)
    diam = np.asarray([n["diameter_mm"] for n in nodules], dtype=np.float64)
    prob = np.asarray([f.get("probability", math.nan) for f in findings], dtype=np.float64)
    hits = _hits(f_xyz, n_xyz, diam)  # (findings, nodules)
    dist = np.linalg.norm(f_xyz[:, None, :] - n_xyz[None, :, :], axis=2)
    out_nodules = []
    for j, nod in enumerate(nodules):
        found = bool(hits[:, j].any())
        nearest = int(np.argmin(dist[:, j])) if len(findings) else None
        out_nodules.append({
            "id": j + 1, "row": nod["row"],
            "center_lps_mm": [round(v, 2) for v in nod["center_lps_mm"]],
            "diameter_mm": nod["diameter_mm"], **nod.get("extra", {}),
            "found": found,
            "probability": round(float(np.max(prob[hits[:, j]])), 4) if found else None,
            "distance_mm": None if nearest is None else round(float(dist[nearest, j]), 2),
            "nearest_finding": None if nearest is None else findings[nearest]["id"]})
    matches: list[int | None] = []
    for i in range(len(findings)):
        hit = np.flatnonzero(hits[i])
        matches.append(int(hit[np.argmin(dist[i, hit])]) + 1 if len(hit) else None)
    fps = [{"id": f["id"], "center_lps_mm": f["center_lps_mm"],
            "probability": f.get("probability"), "diameter_mm": f.get("diameter_mm")}
           for f, m in zip(findings, matches, strict=True) if m is None]
    return {"criterion": CRITERION, "nodules": out_nodules, "matches": matches,
            "false_positives": fps, "n_nodules": len(nodules),
            "n_found": sum(n["found"] for n in out_nodules), "n_false_positives": len(fps)}


def unmatched_annotations(nodules: Sequence[dict[str, Any]], series_uids: set[str]
                          ) -> dict[str, list[int]]:
    """The annotation rows of series not in `series_uids`: {seriesuid: [row, …]}."""
    out: dict[str, list[int]] = {}
    for nod in nodules:
        if nod["seriesuid"] not in series_uids:
            out.setdefault(nod["seriesuid"], []).append(nod["row"])
    return out


def _xyz(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in v) + ")"


def _columns(head: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    return [indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in (head, *rows)]


def format_reference(reference: dict[str, Any], threshold: float | None = None) -> str:
    """The found / missed table of one study's `reference` section (as in findings.json), its
    false positives and the tally line."""
    nodules = reference["nodules"]
    shown = [k for k in ("nodule_type", "type", "location") if any(k in n for n in nodules)]
    lines = []
    if nodules:
        head = ["nodule", "centre LPS mm", "diameter", *[k.replace("nodule_", "") for k in shown],
                "found?", "probability", "distance"]
        rows = [[f"#{n['id']}", _xyz(n["center_lps_mm"]), f"{n['diameter_mm']:.1f} mm",
                 *[str(n.get(k) or "—") for k in shown], "yes" if n["found"] else "no",
                 "—" if n["probability"] is None else f"{n['probability']:.3f}",
                 "—" if n["distance_mm"] is None else f"{n['distance_mm']:.1f} mm"]
                for n in nodules]
        lines += _columns(head, rows)
    else:
        lines.append("  no annotated nodule for this series")
    fps = reference["false_positives"]
    at = "" if threshold is None else f" at p ≥ {threshold:g}"
    if fps:
        lines.append(f"  findings{at} within no nodule's radius (false positives):")
        lines += _columns(["finding", "centre LPS mm", "probability", "diameter"],
                          [[f"#{f['id']}", _xyz(f["center_lps_mm"]),
                            "—" if f["probability"] is None else f"{f['probability']:.3f}",
                            "—" if f["diameter_mm"] is None else f"{f['diameter_mm']:.1f} mm"]
                           for f in fps], indent="    ")
    n, k, m = reference["n_nodules"], reference["n_found"], reference["n_false_positives"]
    lines.append(f"  {k} of {n} nodule{'' if n == 1 else 's'} found, {m} false "
                 f"positive{'' if m == 1 else 's'}{at}")
    return "\n".join(lines)
