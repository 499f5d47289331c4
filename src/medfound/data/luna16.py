"""LUNA16 download → a medfound detection datalist (the phantoms' format).

LUNA16 ships CT scans as MetaImage (`subsetN/<seriesuid>.mhd` + `.raw`, N = 0..9) and nodules
in `annotations.csv` (seriesuid, coordX, coordY, coordZ, diameter_mm). Its coordinates are ITK
world coordinates, i.e. LPS mm — the frame medfound uses everywhere — so boxes are copied as
they are: ``[x, y, z, d, d, d]`` (cccwhd, mm), label 0.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from medfound.errors import MedfoundError

__all__ = ["prepare_luna16"]

_SUBSET = re.compile(r"^subset(\d+)$")
_OPTIONAL_CSV = ("candidates.csv", "candidates_V2.csv", "annotations_excluded.csv")


def prepare_luna16(luna_dir: str | os.PathLike, out: str | os.PathLike, center: str = "luna16",
                   val_subsets: Sequence[int] = (8,), test_subsets: Sequence[int] = (9,)) -> Path:
    """Write OUT/<center>/datalist.json (+ a copy of annotations.csv and, when present,
    candidates.csv / annotations_excluded.csv) for the LUNA16 download in `luna_dir`.

    Split by subset folder, deterministic: `val_subsets` → "validation", `test_subsets` →
    "test", the rest → "training" (for cross-validation pass the fold's subset as val_subsets).
    Entries: image (absolute path of the .mhd), box (LPS mm cccwhd rows), label, seriesuid
    (the file name), subset. Scans without nodules get ``box: []``. Returns the datalist path;
    `medfound.data.detection.load_datalist(OUT, [center], split)` reads it.
    """
    luna_dir, out = Path(luna_dir), Path(out)
    if not luna_dir.is_dir():
        raise MedfoundError("no such LUNA16 folder", path=luna_dir,
                            hint="point at the folder holding subset0/ ... and annotations.csv")
    scans = sorted(luna_dir.rglob("*.mhd"))
    if not scans:
        raise MedfoundError("no .mhd scans found", path=luna_dir,
                            hint="unpack the subsetN.zip archives into this folder")
    ann_path = _find_csv(luna_dir, "annotations.csv")
    if ann_path is None:
        raise MedfoundError("no annotations.csv", path=luna_dir,
                            hint="copy LUNA16's annotations.csv into this folder")
    boxes = _read_annotations(ann_path)

    splits: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for mhd in scans:
        subset = next((int(m.group(1)) for p in mhd.parents if (m := _SUBSET.match(p.name))),
                      None)
        if subset is None:
            raise MedfoundError(f"scan {mhd.name} is not inside a subsetN folder", path=mhd,
                                hint="keep LUNA16's subset0 ... subset9 folders as unpacked")
        split = ("validation" if subset in val_subsets else
                 "test" if subset in test_subsets else "training")
        uid = mhd.stem
        rows = boxes.get(uid, [])
        splits[split].append({"image": str(mhd.resolve()), "box": rows, "label": [0] * len(rows),
                              "seriesuid": uid, "subset": subset})

    cdir = out / center
    cdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ann_path, cdir / "annotations.csv")
    for name in _OPTIONAL_CSV:
        if (src := _find_csv(luna_dir, name)) is not None:
            shutil.copyfile(src, cdir / name)
    path = cdir / "datalist.json"
    path.write_text(json.dumps(splits, indent=1))
    return path


def _find_csv(luna_dir: Path, name: str) -> Path | None:
    """`name` at the top of the download, else anywhere below it (e.g. evaluationScript/)."""
    if (luna_dir / name).is_file():
        return luna_dir / name
    return next(iter(sorted(luna_dir.rglob(name))), None)


def _read_annotations(path: Path) -> dict[str, list[list[float]]]:
    need = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise MedfoundError(f"annotations.csv lacks column(s) {', '.join(missing)}", path=path,
                                hint=f"LUNA16 columns are {','.join(need)}")
        boxes: dict[str, list[list[float]]] = {}
        for n, row in enumerate(reader, start=2):
            try:
                x, y, z, d = (float(row[c]) for c in need[1:])
            except (TypeError, ValueError):
                raise MedfoundError(f"line {n}: non-numeric coordinate or diameter", path=path,
                                    hint="fix or delete the line") from None
            boxes.setdefault(row["seriesuid"], []).append([x, y, z, d, d, d])
    return boxes
