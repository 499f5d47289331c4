"""`medfound center prepare`: a center's own messy DICOM folder → a de-identified center folder
with its annotations on the new UIDs, a patient-level split, center.json and the data card.

RAW is made from phantoms (real DICOM with fake PHI) and scrambled as exports are: nested
folders named after patients, two series of one study in one folder, one patient's CT and MR
in one flat dump with meaningless file names, a non-DICOM file, the CSV on the original UIDs.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medfound.data import prepare as prep
from medfound.data.card import data_card
from medfound.data.phantoms import make_phantoms
from medfound.errors import MedfoundError
from medfound.io.deid import keyed_uid, load_key
from medfound.io.reader import find_series, read_volume

KEY_HEX = "5a" * 32
PHI_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientAddress",
                "PatientBirthDate", "AccessionNumber", "InstitutionName", "InstitutionAddress",
                "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "StudyID",
                "StationName", "DeviceSerialNumber", "StudyInstanceUID", "SeriesInstanceUID",
                "SOPInstanceUID")


def _copy_series_as_new(src: Path, dst: Path, prefix: str) -> str:
    """A second reconstruction of the same study: the CT's files with a new series UID."""
    uid = generate_uid()
    for n, f in enumerate(sorted(src.iterdir())):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 3
        ds.SeriesDescription = "Lung soft recon"
        ds.save_as(dst / f"{prefix}{n:04d}")
    return uid


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict:
    """RAW (messy), the key file and the PHI strings the phantoms carry."""
    base = tmp_path_factory.mktemp("prepare")
    ph = make_phantoms(base / "ph", centers=1, cases=3, seed=4, modalities="ct,mr",
                       size="small", progress=False)
    center = ph / "center_0"
    raw = base / "RAW"
    phi: set[str] = set()
    pid = {}
    for case in sorted(center.glob("case_*")):
        hdr = pydicom.dcmread(next((case / "ct").iterdir()), stop_before_pixels=True)
        pid[case.name] = str(hdr.PatientID)
        for sub in ("ct", "mr"):
            for f in (case / sub).iterdir():
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                for kw in PHI_KEYWORDS:
                    v = str(ds.get(kw, "") or "").strip()
                    phi.update(p for p in [v, *v.split("^")] if len(p) >= 5)
                phi.update(str(e.value) for e in ds.iterall()
                           if e.tag.is_private and isinstance(e.value, str) and len(e.value) >= 5)
                break
    # Short numbers (a serial number, a study ID) occur by chance among the digits of UIDs.
    phi = {p for p in phi if not (p.isdigit() and len(p) < 8)}
    # case_000: both CT series of its study in one folder named after the patient, the MR
    # study nested deeper.
    p0 = raw / "export" / f"{pid['case_000']}_SMITH"
    (p0 / "study_a").mkdir(parents=True)
    for f in (center / "case_000" / "ct").iterdir():
        shutil.copy(f, p0 / "study_a" / f"orig_{f.name}")
    second = _copy_series_as_new(center / "case_000" / "ct", p0 / "study_a", "soft_")
    shutil.copytree(center / "case_000" / "mr", p0 / "study_b" / "x" / "y")
    # case_001: CT and MR flattened into one folder, files renamed and mixed.
    dump = raw / "dump"
    dump.mkdir()
    files = sorted((center / "case_001").rglob("*.dcm"))
    rng = np.random.default_rng(0)
    for n, i in enumerate(rng.permutation(len(files))):
        shutil.copy(files[i], dump / f"{n:05d}")
    # case_002: as exported, deep.
    shutil.copytree(center / "case_002", raw / "a" / "b" / "c" / "case_002")
    (raw / "README.txt").write_text("exported from the PACS by the radiology IT team\n")
    (raw / "export" / "report.pdf").write_bytes(b"%PDF-1.4 not a DICOM file\n" * 10)
    shutil.copy(center / "annotations.csv", raw / "annotations.csv")
    key = base / "center.key"
    key.write_text(KEY_HEX + "\n")
    key.chmod(0o600)
    return {"raw": raw, "key": key, "phi": phi, "phantoms": center, "second": second,
            "base": base, "pid": pid}


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    out = raw["base"] / "OUT"
    summary = prep.prepare_center(raw["raw"], out, raw["key"], annotations=raw["raw"] /
                                  "annotations.csv", center="site_a", progress=False)
    return {"out": out, "cdir": out / "site_a", "summary": summary}


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_every_series_is_found_deidentified_and_laid_out_per_patient(raw, prepared) -> None:
    s, cdir = prepared["summary"], prepared["cdir"]
    assert s["patients"] == 3 and s["series"] == 7 and s["series_new"] == 7  # 4 CT + 3 MR
    assert s["excluded"] == []
    cases = sorted(p.name for p in cdir.iterdir() if p.is_dir())
    assert len(cases) == 3 and all(c.startswith("ANON") for c in cases)
    for case in cases:
        series = sorted(p.name for p in (cdir / case).iterdir())
        assert {n.split("_")[0] for n in series} == {"ct", "mr"}
    # The second CT series of case_000 went to its patient, under the keyed UID.
    key, _ = load_key(raw["key"])
    new = keyed_uid(raw["second"], key)
    folder = next(cdir.glob(f"*/ct_{new}"))
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    assert ds.SeriesInstanceUID == new and ds.PatientIdentityRemoved == "YES"
    assert len(list(folder.iterdir())) == len(list((raw["phantoms"] / "case_000/ct").iterdir()))
    assert not [p for p in cdir.rglob("*") if p.name.startswith(".")]  # no staging left


def test_annotations_follow_the_new_uids_and_still_hit_their_nodules(raw, prepared) -> None:
    cdir = prepared["cdir"]
    key, _ = load_key(raw["key"])
    original = _rows(raw["raw"] / "annotations.csv")
    new = _rows(cdir / "annotations.csv")
    assert len(new) == len(original) == prepared["summary"]["annotations"] > 0
    assert list(new[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm",
                            "nodule_type", "location"]
    for o, n in zip(original, new, strict=True):
        assert n["seriesuid"] == keyed_uid(o["seriesuid"], key)
        assert [float(n[c]) for c in ("coordX", "coordY", "coordZ", "diameter_mm")] == \
            [float(o[c]) for c in ("coordX", "coordY", "coordZ", "diameter_mm")]
    # The largest solid nodule: bright in the de-identified volume at the annotated centre,
    # which reads exactly as the original series.
    row = max((r for r in new if r["nodule_type"] == "solid"), key=lambda r: float(r["diameter_mm"]))
    folder = next(cdir.glob(f"*/ct_{row['seriesuid']}"))
    vol = read_volume(folder)
    orig_uid = next(o["seriesuid"] for o in original if keyed_uid(o["seriesuid"], key)
                    == row["seriesuid"])
    case = next(c for c in raw["phantoms"].glob("case_*")
                if find_series(c / "ct")[0].series_uid == orig_uid)
    before = read_volume(case / "ct")
    np.testing.assert_array_equal(vol.affine, before.affine)
    np.testing.assert_array_equal(vol.array, before.array)
    xyz = np.array([float(row[c]) for c in ("coordX", "coordY", "coordZ")])
    ijk = np.rint(np.linalg.solve(vol.affine[:3, :3], xyz - vol.affine[:3, 3])).astype(int)
    assert vol.array[tuple(ijk)] > -300, "the annotated centre is not in a solid nodule"
    # The datalist carries the same boxes.
    datalist = json.loads((cdir / "datalist.json").read_text())
    entry = next(e for v in datalist.values() for e in v if e["seriesuid"] == row["seriesuid"])
    assert [xyz.tolist() + [float(row["diameter_mm"])] * 3] == \
        [b for b in entry["box"] if b[:3] == xyz.tolist()]


def test_split_is_by_patient_and_the_result_loads_for_training(raw, prepared) -> None:
    from medfound.data.detection import eval_transforms, load_datalist
    from medfound.train.detection import training_items

    cdir = prepared["cdir"]
    datalist = json.loads((cdir / "datalist.json").read_text())
    cases = {k: {e["case"] for e in v} for k, v in datalist.items()}
    assert cases["training"] and cases["validation"]
    assert not cases["training"] & cases["validation"]
    # case_000's two CT series (one patient) are in one split together.
    key, _ = load_key(raw["key"])
    new = keyed_uid(raw["second"], key)
    split_of = {e["seriesuid"]: k for k, v in datalist.items() for e in v}
    owner = next(e["case"] for v in datalist.values() for e in v if e["seriesuid"] == new)
    assert {split_of[e["seriesuid"]] for v in datalist.values() for e in v
            if e["case"] == owner} == {split_of[new]}
    assert sum(map(len, datalist.values())) == 4  # the CT series; MR rides on its patient's entry
    assert sum("mr" in e for v in datalist.values() for e in v) == 3

    data = {"root": str(prepared["out"]), "train_centers": ["site_a"], "val_centers": ["site_a"]}
    items = training_items(data)
    assert {it["case"] for it in items} == cases["training"]
    val = load_datalist(prepared["out"], ["site_a"], "validation")
    item = next(it for it in items + val if it["box"])
    out = eval_transforms({"spacing_mm": [2.8125, 2.8125, 3.0]})(item)
    assert out["box"].shape == (len(item["box"]), 6)

    card = json.loads((cdir / "card.json").read_text())
    assert card == data_card(cdir, progress=False)
    assert card["cases"] == 3 and card["series"] == 7
    assert card["annotations"]["nodules"] == prepared["summary"]["annotations"]
    assert "phi_present" not in card["qc"]["counts"]
    center = json.loads((cdir / "center.json").read_text())
    assert center["center"] == "site_a" and center["cases"] == 3
    assert center["modalities"] == ["ct", "mr"] and center["manufacturer"]


def test_no_phi_anywhere_in_out(raw, prepared) -> None:
    assert len(raw["phi"]) > 20
    needles = [s.encode() for s in raw["phi"]]
    hits = []
    for f in prepared["out"].rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [(f.name, n.decode()) for n in needles if n in data]
        hits += [(str(f), s) for s in raw["phi"] if s in str(f.relative_to(prepared["out"]))]
    assert hits == []


def test_a_rerun_does_nothing_new(raw, prepared) -> None:
    before = {p: p.stat().st_mtime_ns for p in prepared["out"].rglob("*")}
    s = prep.prepare_center(raw["raw"], prepared["out"], raw["key"],
                            annotations=raw["raw"] / "annotations.csv", center="site_a",
                            progress=False)
    assert s["series_new"] == 0 and s["series_skipped"] == 7 and not s["changed"]
    assert {p: p.stat().st_mtime_ns for p in prepared["out"].rglob("*")} == before


def test_an_interrupted_run_leaves_no_datalist_and_resumes(raw, tmp_path, monkeypatch) -> None:
    out = tmp_path / "OUT"
    real = prep._deidentify_series
    calls = []

    def faulty(series, key_path, work):
        calls.append(series.uid)
        result = real(series, key_path, work)
        if len(calls) == 3:
            raise RuntimeError("power cut")  # mid-series, after its files were written
        return result

    (out / "other_center").mkdir(parents=True)
    (out / "other_center" / "datalist.json").write_text("{}")
    monkeypatch.setattr(prep, "_deidentify_series", faulty)
    with pytest.raises(RuntimeError, match="power cut"):
        prep.prepare_center(raw["raw"], out, raw["key"], annotations=raw["raw"] /
                            "annotations.csv", center="c", progress=False)
    cdir = out / "c"
    assert not (cdir / "datalist.json").exists()
    assert not [p for p in cdir.iterdir() if p.name.startswith(".")]  # the staged series went
    state = json.loads((cdir / prep.STATE).read_text())
    assert len(state["series"]) == 2 and not state["complete"]
    done = {p: p.stat().st_mtime_ns for uid in state["series"]
            for p in (cdir / state["series"][uid]["folder"]).iterdir()}
    monkeypatch.setattr(prep, "_deidentify_series", real)
    s = prep.prepare_center(raw["raw"], out, raw["key"], annotations=raw["raw"] /
                            "annotations.csv", center="c", progress=False)
    assert s["series_new"] == 5 and s["series_skipped"] == 2
    assert {p: p.stat().st_mtime_ns for p in done} == done  # the done series were not redone
    assert (cdir / "datalist.json").is_file()
    assert (out / "other_center" / "datalist.json").read_text() == "{}"
    # A patient gone from RAW since (archived): its prepared series and annotations stay.
    fewer = tmp_path / "RAW_fewer"
    shutil.copytree(raw["raw"], fewer, ignore=shutil.ignore_patterns("dump"))
    before = (cdir / "datalist.json").read_bytes()
    s = prep.prepare_center(fewer, out, raw["key"], annotations=raw["raw"] / "annotations.csv",
                            center="c", progress=False)
    assert not s["changed"] and s["series"] == 7 and (cdir / "datalist.json").read_bytes() == before
    # An output changed by hand is not replaced: the rerun refuses and leaves it.
    (cdir / "center.json").write_text('{"edited": true}\n')
    with pytest.raises(MedfoundError, match="center.json was not written by"):
        prep.prepare_center(raw["raw"], out, raw["key"], center="c", split="validation=0.5",
                            progress=False)
    assert (cdir / "center.json").read_text() == '{"edited": true}\n'


def test_an_annotation_row_matching_no_series_is_refused_by_line(raw, tmp_path) -> None:
    csv_path = tmp_path / "ann.csv"
    text = (raw["raw"] / "annotations.csv").read_text()
    csv_path.write_text(text + "1.2.3.4.5.999,10,20,-100,6.0,solid,isolated\n")
    n_line = len(text.splitlines()) + 1
    res = subprocess.run([sys.executable, "-m", "medfound", "center", "prepare", str(raw["raw"]),
                          str(tmp_path / "OUT"), "--key-file", str(raw["key"]), "--annotations",
                          str(csv_path), "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(csv_path) in lines[0] and f"line {n_line}" in lines[0]
    assert "match no series" in lines[0]
    assert not (tmp_path / "OUT").exists() or not any((tmp_path / "OUT").rglob("*.dcm"))


def test_out_overlapping_raw_and_foreign_folders_are_refused(raw, tmp_path) -> None:
    for out in (raw["raw"], raw["raw"] / "inside", raw["raw"].parent):
        with pytest.raises(MedfoundError, match="output folder"):
            prep.prepare_center(raw["raw"], out, raw["key"], progress=False)
    foreign = tmp_path / "OUT" / "site"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MedfoundError, match="not written by"):
        prep.prepare_center(raw["raw"], tmp_path / "OUT", raw["key"], center="site",
                            progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(MedfoundError, match="key file would be inside OUT"):
        prep.prepare_center(raw["raw"], tmp_path / "OUT2", tmp_path / "OUT2" / "k.key",
                            progress=False)


def test_split_fractions_are_parsed_and_refused_clearly() -> None:
    assert prep.parse_split(["validation=0.2,test=0.1"]) == {"validation": 0.2, "test": 0.1}
    for bad in ("valid=0.2", "validation=1.5", "validation=x", "validation=0.6,test=0.5"):
        with pytest.raises(MedfoundError, match="--split"):
            prep.parse_split(bad)
    split = prep._split_patients([f"p{i}" for i in range(10)], {"validation": 0.2}, seed=1)
    assert sorted(split.values()).count("validation") == 2
    assert split == prep._split_patients([f"p{i}" for i in range(10)], {"validation": 0.2}, 1)


def test_a_series_the_reader_refuses_is_left_out_and_said_why(raw, tmp_path) -> None:
    src = tmp_path / "RAW"
    shutil.copytree(raw["phantoms"] / "case_001" / "ct", src / "one")
    shutil.copytree(raw["phantoms"] / "case_002" / "ct", src / "two")
    broken = sorted((src / "two").iterdir())[10]
    broken.write_bytes(broken.read_bytes()[:2000])  # cut inside its pixel data
    bad_uid = find_series(raw["phantoms"] / "case_002" / "ct")[0].series_uid
    rows = _rows(raw["phantoms"] / "annotations.csv")
    keep = {find_series(src / "one")[0].series_uid, bad_uid}
    with (tmp_path / "ann.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["seriesuid"] in keep)
    s = prep.prepare_center(src, tmp_path / "OUT", raw["key"], annotations=tmp_path / "ann.csv",
                            progress=False)
    key, _ = load_key(raw["key"])
    assert [(e["series"], e["reason"]) for e in s["excluded"]] == [
        (keyed_uid(bad_uid, key), "truncated")]
    assert s["series"] == 1
    assert any("belong to series left out" in w for w in s["warnings"])
    new = _rows(tmp_path / "OUT" / "RAW" / "annotations.csv")
    assert {r["seriesuid"] for r in new} == {keyed_uid(next(iter(keep - {bad_uid})), key)}
    assert not list((tmp_path / "OUT").rglob(f"*{keyed_uid(bad_uid, key)}*"))


@pytest.mark.long
def test_the_prepared_center_trains_and_evaluates(prepared, tmp_path) -> None:
    """The README's path: train_detector on the prepared center, then evaluate_detector."""
    run, ev = tmp_path / "RUN", tmp_path / "EVAL"
    fast = ["experiment=phantoms_smoke", "trainer.progress=false", "data.num_patches_per_image=1",
            "trainer.epochs=1"]
    root = f"data.root={prepared['out']}"
    res = subprocess.run([sys.executable, "-m", "medfound", "run", "train_detector", root,
                          "data.train_centers=[site_a]", "data.val_centers=[site_a]",
                          f"out_dir={run}", *fast], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["provenance"]["train_centers"] == ["site_a"]
    res = subprocess.run([sys.executable, "-m", "medfound", "run", "evaluate_detector",
                          f"model={run / 'model'}", root, "data.centers=[site_a]",
                          f"out_dir={ev}"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n_scans"] == 1  # the validation patient's CT: site_a was trained on
