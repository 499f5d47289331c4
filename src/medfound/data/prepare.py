"""A center's own DICOM studies → a de-identified center folder that trains (`center prepare`).

`prepare_center(RAW, OUT, key_file, annotations=CSV, center=NAME)` writes:

    OUT/NAME/
      <patient pseudonym>/              one folder per patient (the PatientID `deid` writes)
        ct_<series uid>/IM00001.dcm ... one folder per series, de-identified, UIDs keyed
        mr_<series uid>/...             every image series of every study of the patient
      annotations.csv                   the CSV's rows on the new SeriesInstanceUIDs (LUNA16
                                        columns, LPS mm; nodule_type, location kept if given)
      center.json                       scanner profile from the de-identified headers (no PHI)
      card.json                         the data card (`medfound center card --json`)
      datalist.json                     one entry per CT series, split by patient; written last
      prepare.json                      what was done, for a rerun (new UIDs only, no PHI)

Steps: `find_series` lists every image series under RAW (any nesting, several series per
study, several studies per patient; files that are not DICOM are left alone); each new series is
read once as the data card reads it (QC: a series the reader refuses, e.g. with gaps or
unreadable slices, is left out and said why, since training would stop on it; its warnings are
counted); each file is de-identified by `medfound.io.deid.deidentify` under the center's key
file (the same profile, keyed UIDs, pseudonyms and date shifts as `medfound deid`), one call a
file, so any series can be done alone wherever its files lie; the annotations are moved to the
keyed UIDs (`deid.keyed_uid`: the geometry is unchanged, so are the coordinates); a row that
matches no series under RAW, or whose centre lies outside its series, is refused with its line.

Safety: RAW is only read and OUT may not overlap it; NAME must be new, empty or an earlier
`center prepare` of the same key. Each series is staged in a hidden folder and renamed into
place, recorded in prepare.json just before; a rerun skips every recorded series whose folder is
there, and every series left out before unless its number of files changed. datalist.json, the mark of a complete folder, is removed (when this command wrote it) at
the start of any run that changes something and written last, so an interrupted run leaves no
datalist.json. Nothing this command did not write is removed or replaced: an output file whose
content is not what prepare.json recorded is refused, not overwritten, and an unchanged output
is not rewritten (a rerun with nothing new changes no file).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from tqdm.auto import tqdm

from medfound.errors import MedfoundError
from medfound.io.deid import (
    PROFILE_NAME,
    REPORT_NAME,
    deidentify,
    keyed_uid,
    load_key,
    patient_pseudonym,
)
from medfound.io.dicom import SeriesInfo, find_series, read_series
from medfound.outputs import atomic_write, check_output_folder, publish_dir, staged_dir

__all__ = ["ANNOTATION_COLUMNS", "KEPT_COLUMNS", "OUTPUTS", "STATE", "parse_split", "prepare_center"]

STATE = "prepare.json"
ANNOTATIONS, CENTER_JSON, CARD, DATALIST = ("annotations.csv", "center.json", "card.json",
                                           "datalist.json")
OUTPUTS = (ANNOTATIONS, CENTER_JSON, CARD, DATALIST)
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
# Further columns carried over: fixed vocabularies. Free-text columns are dropped (they may
# name a patient).
KEPT_COLUMNS = ("nodule_type", "location")
SPLIT_NAMES = ("validation", "test")
# DICOM Modality → the datalist key medfound's pretraining reads (medfound.data.pretrain).
_MODALITY_KEYS = {"CT": "ct", "MR": "mr", "PT": "pet", "US": "us"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class _Series:
    """One image series found under RAW, with the names it gets in OUT."""

    info: SeriesInfo
    uid: str  # the de-identified SeriesInstanceUID
    patient: str  # the de-identified PatientID (the case folder)
    folder: str  # NAME-relative folder: <patient>/<modality>_<uid>
    modality: str


# --- arguments --------------------------------------------------------------------------


def parse_split(values: Iterable[str] | str | None) -> dict[str, float]:
    """{"validation": f, "test": f} from "validation=0.2", "validation=0.2,test=0.1" or a list
    of such; the rest of the patients train. None: validation=0.2."""
    if values is None:
        return {"validation": 0.2}
    if isinstance(values, str):
        values = [values]
    out: dict[str, float] = {}
    for part in (p.strip() for v in values for p in str(v).split(",")):
        name, eq, value = part.partition("=")
        try:
            frac = float(value) if eq else math.nan
        except ValueError:
            frac = math.nan
        if name.strip() not in SPLIT_NAMES or not 0.0 <= frac < 1.0:
            raise MedfoundError(f"--split {part!r}: expected validation=F or test=F with F in "
                                "[0, 1)", hint="e.g. --split validation=0.2 (the rest trains)")
        out[name.strip()] = frac
    if sum(out.values()) >= 1.0:
        raise MedfoundError(f"--split {','.join(f'{k}={v:g}' for k, v in out.items())} leaves no "
                            "patient to train on", hint="keep the fractions' sum below 1")
    return out


def _split_patients(patients: Iterable[str], fractions: Mapping[str, float], seed: int
                    ) -> dict[str, str]:
    """patient → "training" / "validation" / "test": patients in an order keyed on the seed,
    the first round(f × n) to validation, the next to test; at least one patient trains, and
    with two or more patients a fraction above 0 gets at least one."""
    order = sorted(set(patients), key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).digest())
    n = len(order)
    counts = {}
    for name in SPLIT_NAMES:
        f = float(fractions.get(name, 0.0))
        counts[name] = max(int(round(f * n)), 1 if f > 0 and n >= 2 else 0)
    while sum(counts.values()) > max(n - 1, 0):
        big = max(SPLIT_NAMES, key=lambda k: counts[k])
        counts[big] -= 1
    out, i = {}, 0
    for name in SPLIT_NAMES:
        for p in order[i:i + counts[name]]:
            out[p] = name
        i += counts[name]
    for p in order[i:]:
        out[p] = "training"
    return out


# --- files ------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


class _Outputs:
    """The center folder's files, written only where this command wrote them before."""

    def __init__(self, cdir: Path, state: dict):
        self.cdir, self.state = cdir, state

    def ours(self, name: str) -> bool:
        """Whether NAME/`name` is absent or holds what this command last wrote (or was about
        to write, for a run stopped between the record and the write)."""
        path = self.cdir / name
        if not path.exists():
            return True
        try:
            return _sha(path.read_bytes()) in self.state["outputs"].get(name, [])
        except OSError:
            return False

    def check(self) -> None:
        for name in (*OUTPUTS, *[n for n in self.state.get("outputs", {}) if n not in OUTPUTS]):
            if not self.ours(name):
                raise MedfoundError(f"{name} was not written by `medfound center prepare` (or was "
                                    "changed since); not replaced", path=self.cdir / name,
                                    hint="move it out of the center folder and run again")

    def same(self, name: str, data: bytes) -> bool:
        path = self.cdir / name
        try:
            return path.is_file() and path.read_bytes() == data
        except OSError:
            return False

    def write(self, name: str, data: bytes, save_state) -> bool:
        """Write NAME/`name` unless it holds `data` already; returns whether it wrote."""
        if self.same(name, data):
            return False
        if not self.ours(name):  # appeared during the run
            self.check()
        shas = self.state["outputs"].get(name, [])
        self.state["outputs"][name] = [*shas[-1:], _sha(data)]
        save_state()
        atomic_write(self.cdir / name, data)
        return True

    def remove(self, name: str) -> None:
        path = self.cdir / name
        if path.exists() and self.ours(name):
            path.unlink()


def _load_state(cdir: Path, fingerprint: str) -> dict:
    fresh = {"prepared_by": "medfound center prepare", "key_fingerprint": fingerprint,
             "profile": PROFILE_NAME, "complete": False, "series": {}, "excluded": {},
             "outputs": {}}
    path = cdir / STATE
    if not path.exists():
        if cdir.exists() and (not cdir.is_dir() or any(cdir.iterdir())):
            raise MedfoundError("exists and was not written by `medfound center prepare` (no "
                                f"{STATE}); nothing in it is replaced", path=cdir,
                                hint="choose another --center name or another OUT")
        return fresh
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("series"), dict):
            raise ValueError("not a prepare record")
    except (OSError, ValueError) as err:
        raise MedfoundError(f"cannot read the record of an earlier run ({err})", path=path,
                            hint="move the center folder away and prepare it again") from None
    if state.get("key_fingerprint") != fingerprint:
        raise MedfoundError(f"prepared with another key (fingerprint {state.get('key_fingerprint')}"
                            f", this key {fingerprint}): its UIDs and pseudonyms would not match",
                            path=cdir, hint="pass the key file of the first run, or another OUT")
    for key, value in fresh.items():
        state.setdefault(key, value)
    return state


# --- annotations ------------------------------------------------------------------------


@dataclass
class _Row:
    line: int
    uid: str  # as in the CSV
    xyz: tuple[float, float, float]
    diameter: float
    extra: dict[str, str]


def _read_annotations(path: Path) -> tuple[list[_Row], list[str]]:
    """The CSV's rows and the kept extra columns present; one-line errors for bad columns or
    values."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = fields
            missing = [c for c in ANNOTATION_COLUMNS if c not in fields]
            if missing:
                raise MedfoundError(f"no column(s) {', '.join(missing)}", path=path,
                                    hint="use LUNA16 columns " + ",".join(ANNOTATION_COLUMNS)
                                    + " (LPS mm)")
            extra = [c for c in KEPT_COLUMNS if c in fields]
            rows, bad = [], []
            for n, row in enumerate(reader, start=2):
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue  # a blank line
                try:
                    x, y, z, d = (float(row[c]) for c in ANNOTATION_COLUMNS[1:])
                    if not all(map(math.isfinite, (x, y, z, d))) or d <= 0:
                        raise ValueError
                except (TypeError, ValueError):
                    bad.append(n)
                    continue
                rows.append(_Row(n, str(row["seriesuid"] or "").strip(), (x, y, z), d,
                                 {c: str(row.get(c) or "").strip() for c in extra}))
    except (OSError, UnicodeDecodeError) as err:
        raise MedfoundError(f"cannot read the annotations ({err})", path=path,
                            hint="give a LUNA16-style CSV file") from None
    if bad:
        raise MedfoundError(f"{len(bad)} row(s) without finite coordinates and a diameter > 0: "
                            f"line {_lines(bad)}", path=path, hint="fix or delete those lines")
    return rows, extra


def _lines(lines: list[int], most: int = 12) -> str:
    shown = ", ".join(map(str, lines[:most]))
    return shown + (f" and {len(lines) - most} more" if len(lines) > most else "")


def _inside(xyz: tuple[float, float, float], affine: list, shape: list) -> bool:
    a = np.asarray(affine, dtype=np.float64)
    ijk = np.linalg.solve(a[:3, :3], np.asarray(xyz, dtype=np.float64) - a[:3, 3])
    return bool(np.all(ijk >= -0.5) and np.all(ijk <= np.asarray(shape) - 0.5))


# --- series -----------------------------------------------------------------------------


def _safe(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())[:16] or "ot"


def _series_of(infos: list[SeriesInfo], key: bytes) -> tuple[list[_Series], list[str]]:
    """Every series found, with its new names; notes for series that cannot be named."""
    out, notes = [], []
    for info in infos:
        hdr = info.header
        patient = str(hdr.get("PatientID", "") or "").strip() if hdr is not None else ""
        if not patient and hdr is not None:
            patient = str(hdr.get("PatientName", "") or "").strip()
        if not info.series_uid:
            notes.append(f"a {info.modality} series of {info.count} files has no "
                         "SeriesInstanceUID: left out")
            continue
        uid = keyed_uid(info.series_uid, key)
        pseudonym = patient_pseudonym(patient, key)
        modality = str(info.modality or "OT").strip().upper()
        out.append(_Series(info, uid, pseudonym, f"{pseudonym}/{_safe(modality)}_{uid}",
                           modality))
    if any(not (s.info.header is not None and (str(s.info.header.get("PatientID", "") or "")
                                               .strip())) for s in out):
        notes.append("some series have no PatientID: they are grouped by PatientName, or as one "
                     "patient when that is empty too")
    return out, notes


def _qc(series: _Series) -> dict:
    """Read the series as training will (no gaps allowed): its geometry and warnings, or why
    it cannot be read."""
    from medfound.data.card import _error_kind, _warning_kinds

    try:
        vol = read_series(series.info, allow_gaps=False, progress=False)
    except MedfoundError as err:
        return {"error": _error_kind(err)}
    return {"affine": np.asarray(vol.affine, dtype=float).round(6).tolist(),
            "shape": [int(n) for n in vol.shape], "qc": sorted(set(_warning_kinds(vol)))}


def _deidentify_files(series: _Series, key_path: Path, work: Path) -> dict:
    """De-identify each file of `series` into `work` as IM00001.dcm ... through `deidentify`
    (one call a file: the files of a series may share folders with other series). Returns the
    summary of the calls; raises MedfoundError when a file is not written."""
    tmp = work / ".deid"
    burned, warnings, options = 0, set(), None
    for n, file in enumerate(sorted(series.info.files), start=1):
        report = deidentify(file, tmp, key_file=key_path, progress=False)
        options = report["profile_options"]
        written = tmp / Path(file).name
        if report["files_written"] != 1 or not written.is_file():
            reasons = [f["reason"] for f in report["failed"]] or list(report["skipped_reasons"])
            raise MedfoundError(f"could not be de-identified ({'; '.join(reasons) or 'skipped'})",
                                path=file, hint="fix or remove the file; its series is left out")
        os.replace(written, work / f"IM{n:05d}.dcm")
        (tmp / REPORT_NAME).unlink(missing_ok=True)
        burned += bool(report["burned_in_risk"])
        warnings.update(w for w in report["warnings"] if w.startswith("the key file"))
    shutil.rmtree(tmp, ignore_errors=True)
    return {"burned_in": burned, "warnings": sorted(warnings), "options": options or []}


def _check_written(series: _Series, work: Path) -> dict:
    """The de-identified header of the first file: it must carry the keyed UID and the
    pseudonym; returns the PHI-free facts center.json and the datalist need."""
    first = work / "IM00001.dcm"
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    if str(ds.get("SeriesInstanceUID", "")) != series.uid or str(ds.get("PatientID", "")) \
            != series.patient or str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        raise MedfoundError("the de-identified series does not carry the keyed UID and "
                            "pseudonym deid promises", path=series.info.files[0],
                            hint="report this: the de-identification profile changed")

    def value(keyword: str) -> Any:
        v = ds.get(keyword)
        if v is None or v == "":
            return None
        if isinstance(v, MultiValue):
            return [float(x) for x in v]
        return float(v) if keyword in ("SliceThickness", "KVP") else str(v).strip()

    return {"study": str(ds.get("StudyInstanceUID", "")), "manufacturer": value("Manufacturer"),
            "model": value("ManufacturerModelName"), "kernel": value("ConvolutionKernel"),
            "kvp": value("KVP"), "slice_thickness_mm": value("SliceThickness"),
            "pixel_spacing_mm": value("PixelSpacing"),
            "matrix": [int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)],
            "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", ""))}


# --- the center's files -----------------------------------------------------------------


def _annotation_csv(rows: list[tuple[str, _Row]], extra: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*ANNOTATION_COLUMNS, *extra])
    for uid, r in rows:
        w.writerow([uid, *(f"{v:.6g}" if abs(v) < 1e5 else repr(v) for v in r.xyz),
                    f"{r.diameter:.6g}", *(r.extra.get(c, "") for c in extra)])
    return buf.getvalue().encode()


def _datalist(state: dict, rows: list[tuple[str, _Row]], extra: list[str],
              split: Mapping[str, float], seed: int) -> dict:
    by_uid: dict[str, list[_Row]] = {}
    for uid, r in rows:
        by_uid.setdefault(uid, []).append(r)
    records = sorted(state["series"].items(), key=lambda kv: kv[1]["folder"])
    ct = [(uid, rec) for uid, rec in records if rec["modality"] == "CT"]
    assign = _split_patients((rec["case"] for _, rec in ct), split, seed)
    others: dict[str, dict[str, str]] = {}
    for _, rec in records:
        key = _MODALITY_KEYS.get(rec["modality"])
        if key and key != "ct":
            others.setdefault(rec["case"], {}).setdefault(key, rec["folder"])
    out: dict[str, list] = {"training": [], "validation": [], "test": []}
    first_of_case: set[str] = set()
    for uid, rec in ct:
        nodules = by_uid.get(uid, [])
        entry: dict[str, Any] = {
            "image": rec["folder"],
            "box": [[*r.xyz, r.diameter, r.diameter, r.diameter] for r in nodules],
            "label": [0] * len(nodules), "seriesuid": uid, "case": rec["case"],
            "study": rec["study"], "ct": rec["folder"]}
        if "nodule_type" in extra:
            entry["nodule_type"] = [r.extra["nodule_type"] for r in nodules]
        if "location" in extra:
            entry["nodule_location"] = [r.extra["location"] for r in nodules]
        if rec["case"] not in first_of_case:  # the patient's other modalities, once
            entry.update(others.get(rec["case"], {}))
            first_of_case.add(rec["case"])
        out[assign[rec["case"]]].append(entry)
    if not out["test"]:
        del out["test"]
    return out


def _center_json(name: str, state: dict) -> dict:
    records = list(state["series"].values())
    ct = [r for r in records if r["modality"] == "CT"] or records

    def common(key: str) -> Any:
        values = [json.dumps(r.get(key)) for r in ct if r.get(key) is not None]
        return json.loads(Counter(values).most_common(1)[0][0]) if values else None

    thick = sorted(r["slice_thickness_mm"] for r in ct if r.get("slice_thickness_mm"))
    return {
        "center": name, "cases": len({r["case"] for r in records}),
        "studies": len({r["study"] for r in records}), "series": len(records),
        "modalities": sorted({_MODALITY_KEYS.get(r["modality"], r["modality"].lower())
                              for r in records}),
        "prepared_by": "medfound center prepare",
        "manufacturer": common("manufacturer"), "model": common("model"),
        "kernel": common("kernel"), "kvp": common("kvp"),
        "slice_thickness_mm": common("slice_thickness_mm"),
        "slice_thickness_range_mm": [thick[0], thick[-1]] if thick else None,
        "pixel_spacing_mm": common("pixel_spacing_mm"), "matrix": common("matrix"),
        "transfer_syntax": common("transfer_syntax"),
        "deidentification": {"profile": state["profile"],
                             "options": state.get("profile_options", []),
                             "key_fingerprint": state["key_fingerprint"]},
    }


# --- the command ------------------------------------------------------------------------


def prepare_center(raw: str | Path, out: str | Path, key_file: str | Path,
                   annotations: str | Path | None = None, center: str | None = None,
                   split: Mapping[str, float] | Iterable[str] | str | None = None, seed: int = 0,
                   progress: bool = True) -> dict:
    """De-identify the DICOM series under `raw` into OUT/`center`/ with annotations, center.json,
    the data card and a patient-level split datalist (module docstring); return a summary.

    key_file: the center's secret (as `medfound deid --key-file`; created when missing, kept
        outside OUT). annotations: a LUNA16 CSV on RAW's SeriesInstanceUIDs (LPS mm); without
        it an earlier run's annotations.csv is kept. center: the folder name (default: RAW's).
    split: {"validation": 0.2, "test": 0.1} or "validation=0.2" (`parse_split`); seed: the
        split's seed. Raises MedfoundError for a refused layout, key or annotation row.
    """
    raw_p, out_p = Path(raw).expanduser(), Path(out).expanduser()
    if not raw_p.is_dir():
        raise MedfoundError("not a folder", path=raw_p, hint="give the folder holding the DICOM files")
    raw_r = raw_p.resolve()
    out_r = check_output_folder(out_p, [raw_r], what="new OUT")
    name = center or raw_r.name
    if not _NAME.match(name):
        raise MedfoundError(f"center name {name!r} is not a plain folder name",
                            hint="pass --center with letters, digits, '.', '_' or '-'")
    key_path = Path(key_file).expanduser().resolve()
    if key_path.is_relative_to(out_r):
        raise MedfoundError("the key file would be inside OUT, which may leave the center",
                            path=key_path, hint="keep the key file outside OUT")
    ann_path = None if annotations is None else Path(annotations).expanduser()
    if ann_path is not None and not ann_path.is_file():
        raise MedfoundError("no such annotations file", path=ann_path,
                            hint="give the LUNA16-style CSV (seriesuid,coordX,coordY,coordZ,"
                            "diameter_mm)")
    fractions = split if isinstance(split, Mapping) else parse_split(split)
    if key_path.exists() or not key_path.is_relative_to(raw_r):
        key, _ = load_key(key_path)
    else:
        raise MedfoundError("the key file would be written inside RAW", path=key_path,
                            hint="RAW is only read: keep the key file outside it")
    fingerprint = hashlib.sha256(key).hexdigest()[:8]

    cdir = out_r / name
    state = _load_state(cdir, fingerprint)
    outputs = _Outputs(cdir, state)
    outputs.check()

    # Find every series (headers only), and match the annotations before any work.
    series, notes = _series_of(find_series(raw_r, progress=progress), key)
    by_orig = {s.info.series_uid: s for s in series}
    rows: list[_Row] = []
    extra: list[str] = []
    from_out = False
    if ann_path is not None:
        rows, extra = _read_annotations(ann_path)
        # A series prepared by an earlier run and gone from RAW since still matches.
        unmatched = [r.line for r in rows if r.uid not in by_orig
                     and keyed_uid(r.uid, key) not in state["series"]]
        if unmatched:
            raise MedfoundError(f"{len(unmatched)} annotation row(s) match no series under "
                                f"{raw_p}: line {_lines(unmatched)}", path=ann_path,
                                hint="fix their seriesuid (RAW's SeriesInstanceUID) or delete "
                                "those lines")
    elif (cdir / ANNOTATIONS).is_file():  # an earlier run's, on the new UIDs
        rows, extra = _read_annotations(cdir / ANNOTATIONS)
        from_out = True
    elif (raw_r / ANNOTATIONS).is_file():
        notes.append(f"{raw_p / ANNOTATIONS} was not used: pass it with --annotations")

    def save_state() -> None:
        data = _json_bytes(state)
        if not outputs.same(STATE, data):
            atomic_write(cdir / STATE, data)

    def done(s: _Series) -> bool:
        rec = state["series"].get(s.uid)
        return rec is not None and (cdir / rec["folder"]).is_dir()

    def excluded(s: _Series) -> bool:
        rec = state["excluded"].get(s.uid)
        return rec is not None and rec.get("files") == s.info.count

    pending = [s for s in series if not done(s) and not excluded(s)]
    changed_in_raw = [s for s in series if done(s) and state["series"][s.uid]["files"]
                      != s.info.count]
    if changed_in_raw:
        notes.append(f"{len(changed_in_raw)} prepared series have another number of files in "
                     "RAW now; they are not redone (move their folders away to redo them)")

    cdir.mkdir(parents=True, exist_ok=True)
    invalidated = False

    def invalidate() -> None:
        nonlocal invalidated
        if not invalidated:
            outputs.remove(DATALIST)
            state["complete"] = False
            save_state()
            invalidated = True

    if pending:
        invalidate()
    # QC: read every new series once, as training will.
    checked: dict[str, dict] = {}
    for s in tqdm(pending, desc="checking series", unit="series", disable=not progress):
        checked[s.uid] = _qc(s)
    newly_excluded = {}
    for s in pending:
        if "error" in checked[s.uid]:
            newly_excluded[s.uid] = {"modality": s.modality, "files": s.info.count,
                                     "reason": checked[s.uid]["error"]}

    def geometry(uid: str) -> dict | None:
        rec = state["series"].get(uid) or checked.get(uid)
        return None if rec is None or "affine" not in rec else rec

    # Annotations onto the new UIDs; rows outside their series are refused.
    mapped: list[tuple[str, _Row]] = []
    dropped: list[int] = []
    outside: list[int] = []
    for r in rows:
        s = by_orig.get(r.uid)
        uid = r.uid if from_out else s.uid if s else keyed_uid(r.uid, key)
        geo = None if uid is None else geometry(uid)
        if geo is None:
            dropped.append(r.line)  # its series is left out (QC) or, for OUT's CSV, gone
        elif not _inside(r.xyz, geo["affine"], geo["shape"]):
            outside.append(r.line)
        else:
            mapped.append((uid, r))
    if outside:
        raise MedfoundError(f"{len(outside)} annotation row(s) are centred outside their "
                            f"series: line {_lines(outside)}",
                            path=cdir / ANNOTATIONS if from_out else ann_path,
                            hint="coordinates must be DICOM patient coordinates (LPS mm), as "
                            "LUNA16 uses; fix or delete those lines")
    if dropped:
        notes.append(f"{len(dropped)} annotation row(s) belong to series left out: line "
                     f"{_lines(dropped)}")

    # De-identify the new series, one staged folder each.
    burned, deid_warnings, new_done = 0, set(), 0
    state["excluded"].update(newly_excluded)
    for s in tqdm([s for s in pending if s.uid not in newly_excluded], desc="de-identifying",
                  unit="series", disable=not progress):
        final = cdir / s.folder
        if os.path.lexists(final) and s.uid not in state["series"]:
            raise MedfoundError("exists and was not written by `medfound center prepare`; not "
                                "replaced", path=final, hint="move it away and run again")
        with staged_dir(cdir) as work:
            try:
                result = _deidentify_series(s, key_path, work)
            except MedfoundError as err:
                state["excluded"][s.uid] = {"modality": s.modality, "files": s.info.count,
                                            "reason": "deid_failed"}
                notes.append(f"a {s.modality} series was left out: {err}")
                shutil.rmtree(work, ignore_errors=True)
                continue
            facts = _check_written(s, work)
            burned += result["burned_in"]
            deid_warnings.update(result["warnings"])
            state["profile_options"] = result["options"]
            state["series"][s.uid] = {
                "folder": s.folder, "case": s.patient, "modality": s.modality,
                "files": s.info.count, **facts, "affine": checked[s.uid]["affine"],
                "shape": checked[s.uid]["shape"], "qc": checked[s.uid]["qc"]}
            state["excluded"].pop(s.uid, None)
            save_state()  # recorded before it appears: a folder in place is complete
            (cdir / s.patient).mkdir(exist_ok=True)
            publish_dir(work, final)
        new_done += 1
    save_state()

    if not state["series"]:
        raise MedfoundError("no series could be prepared: every one was left out", path=raw_p,
                            hint="see the reasons above; `medfound inspect` reads one series")
    mapped = [(uid, r) for uid, r in mapped if uid in state["series"]]
    datalist = _datalist(state, mapped, extra, fractions, seed)
    files = {ANNOTATIONS: _annotation_csv(mapped, extra) if (rows or from_out) else None,
             CENTER_JSON: _json_bytes(_center_json(name, state)),
             DATALIST: _json_bytes(datalist)}
    card_stale = new_done > 0 or not (cdir / CARD).is_file() or any(
        data is not None and not outputs.same(n, data) for n, data in files.items()
        if n != DATALIST)
    if card_stale or not outputs.same(DATALIST, files[DATALIST]):
        invalidate()
    if files[ANNOTATIONS] is not None:
        outputs.write(ANNOTATIONS, files[ANNOTATIONS], save_state)
    outputs.write(CENTER_JSON, files[CENTER_JSON], save_state)
    card = None
    if card_stale:
        from medfound.data.card import data_card

        card = data_card(cdir, progress=False)
        outputs.write(CARD, _json_bytes(card), save_state)
    outputs.write(DATALIST, files[DATALIST], save_state)  # last: the folder is complete
    state["complete"] = True
    save_state()

    n_split = {k: len(v) for k, v in datalist.items()}
    cases = {k: len({e["case"] for e in v}) for k, v in datalist.items()}
    no_ct = {r["case"] for r in state["series"].values()} - {
        e["case"] for v in datalist.values() for e in v}
    if no_ct:
        notes.append(f"{len(no_ct)} patient(s) have no CT series and are not in the datalist")
    if burned:
        notes.append(f"{burned} images may show identifying text in their pixels (ultrasound, "
                     "secondary capture, BurnedInAnnotation): pixels are not changed, review "
                     "them before the folder leaves the center")
    return {
        "center": str(cdir), "patients": len({r["case"] for r in state["series"].values()}),
        "series": len(state["series"]), "series_new": new_done,
        "series_skipped": len(series) - len(pending),
        "excluded": [{"series": uid, **rec} for uid, rec in sorted(state["excluded"].items())],
        "annotations": len(mapped), "datalist": n_split, "datalist_patients": cases,
        "changed": invalidated, "key_fingerprint": fingerprint, "card": card,
        "warnings": sorted(deid_warnings) + notes,
    }


def _deidentify_series(series: _Series, key_path: Path, work: Path) -> dict:
    """De-identify one series into the staged folder `work` (a seam for tests to fault)."""
    return _deidentify_files(series, key_path, work)

