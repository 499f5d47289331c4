"""Data cards: what a center shares before training, with QC, and never PHI."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from medfound.data.card import data_card, format_card
from medfound.data.phantoms import make_phantoms
from medfound.errors import MedfoundError
from medfound.io.deid import deidentify

PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
                "AccessionNumber", "ReferringPhysicianName", "StudyInstanceUID",
                "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "OperatorsName")


@pytest.fixture(scope="module")
def centers(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card") / "phantoms"
    make_phantoms(root, centers=2, cases=3, seed=11, size="small", progress=False)
    return root


def _phi_values(center: Path) -> set[str]:
    values = set()
    for f in center.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for k in PHI_KEYWORDS:
            v = str(ds.get(k, "") or "").strip()
            if len(v) >= 4:  # shorter strings (a sex code, a year) match by chance
                values.add(v)
                values.update(p for p in v.split("^") if len(p) >= 4)
    return values


def test_card_summarises_the_center(centers: Path) -> None:
    center = centers / "center_0"
    card = data_card(center, progress=False)
    with (center / "annotations.csv").open() as f:
        rows = list(csv.DictReader(f))
    profile = json.loads((center / "center.json").read_text())
    ct = card["modalities"]["CT"]
    n_cases = sum(1 for p in center.iterdir() if p.is_dir())
    assert card["cases"] == n_cases and ct["series"] == n_cases and ct["cases"] == n_cases
    assert ct["units"] == "HU"
    assert len(card["vendors"]) == 1
    assert next(iter(card["vendors"])).startswith(profile["manufacturer"])
    lo, hi = ct["slice_thickness_mm"]
    assert lo == pytest.approx(profile["slice_thickness_mm"], abs=1e-3) == hi
    # Air outside and lungs pull the median far below water; bone and contrast above.
    assert ct["intensity"]["p01"] < -900 and ct["intensity"]["p99"] > 0
    assert card["annotations"]["nodules"] == len(rows)
    assert sum(card["annotations"]["size_histogram"]["counts"]) == len(rows)
    # The phantoms carry fake PHI: every series is flagged as not de-identified.
    assert card["qc"]["counts"].get("phi_present") == n_cases
    text = format_card(card)
    assert "center_0" in text and "phi_present" in text


def test_padding_outside_the_scan_circle_is_not_counted_as_tissue(centers: Path) -> None:
    # center_1 stores a PixelPaddingValue (-3024 HU) outside its reconstruction circle.
    hdr = pydicom.dcmread(next((centers / "center_1").rglob("*.dcm")), stop_before_pixels=True)
    assert "PixelPaddingValue" in hdr
    ct = data_card(centers / "center_1", progress=False)["modalities"]["CT"]
    assert 0.05 < ct["padding_fraction"] < 0.5
    assert ct["intensity"]["p01"] >= -1024


def test_card_holds_no_phi(centers: Path) -> None:
    for center in sorted(centers.glob("center_*")):
        card = data_card(center, progress=False)
        dumped = json.dumps(card) + format_card(card)
        phi = _phi_values(center)
        assert phi, "the phantoms should carry PHI to test against"
        leaked = sorted(v for v in phi if v in dumped)
        assert not leaked


def test_card_after_deid_has_no_phi_warning(centers: Path, tmp_path: Path) -> None:
    out = tmp_path / "center_0_deid"
    deidentify(centers / "center_0", out, key_file=tmp_path / "key", progress=False)
    shutil.copy(centers / "center_0" / "annotations.csv", out / "annotations.csv")
    card = data_card(out, progress=False)
    assert "phi_present" not in card["qc"]["counts"]
    assert card["modalities"]["CT"]["series"] == data_card(centers / "center_0",
                                                           progress=False)["modalities"]["CT"]["series"]


def test_card_reports_a_missing_slice(centers: Path, tmp_path: Path) -> None:
    center = tmp_path / "center_gap"
    shutil.copytree(centers / "center_1", center)
    case = sorted(p for p in center.iterdir() if p.is_dir())[0]
    files = sorted(case.rglob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True)
                                       .ImagePositionPatient[2]))
    files[len(files) // 2].unlink()
    card = data_card(center, progress=False)
    gaps = [w for w in card["qc"]["warnings"] if w["kind"] == "gaps_or_uneven_spacing"]
    assert len(gaps) == 1 and gaps[0]["case"] == 0
    assert str(tmp_path) not in json.dumps(card)  # paths are scrubbed
    # The case is still counted and summarised.
    assert card["modalities"]["CT"]["series"] == card["cases"]


def test_cli_card_json_and_bad_folder(centers: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "medfound", "center", "card",
                          str(centers / "center_1"), "--json"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["center"] == "center_1"
    res = subprocess.run([sys.executable, "-m", "medfound", "center", "card",
                          str(tmp_path / "nope")], capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert "nope" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def _case_files(center: Path) -> list[Path]:
    case = sorted(p for p in center.iterdir() if p.is_dir())[0]
    return sorted(case.rglob("*.dcm"))


def test_a_corrupt_file_whose_message_says_missing_does_not_abort_the_card(centers: Path,
                                                                           tmp_path: Path) -> None:
    center = tmp_path / "center_bad"
    shutil.copytree(centers / "center_0", center)
    victim = _case_files(center)[3]
    data = victim.read_bytes()
    ds = pydicom.dcmread(victim, stop_before_pixels=True)
    # A file name with "missing" in it, cut inside its pixel data: the reader's message
    # quotes the name; the card must classify the error by its kind, not its words.
    renamed = victim.with_name("SMITH_JOHN_MRN123456_missing_IM00056.dcm")
    victim.unlink()
    renamed.write_bytes(data[: len(data) - ds.Rows * ds.Columns])
    card = data_card(center, progress=False)
    kinds = [w["kind"] for w in card["qc"]["warnings"] if w["case"] == 0]
    assert "truncated" in kinds and "gaps_or_uneven_spacing" not in kinds
    assert card["cases"] == sum(1 for p in center.iterdir() if p.is_dir())
    dumped = json.dumps(card) + format_card(card)
    assert "SMITH" not in dumped and "MRN123456" not in dumped and ".dcm" not in dumped


def test_card_qc_holds_categories_not_reader_messages(centers: Path, tmp_path: Path) -> None:
    center = tmp_path / "center_cut"
    shutil.copytree(centers / "center_1", center)
    files = _case_files(center)
    data = files[0].read_bytes()
    ds = pydicom.dcmread(files[0])
    files[0].write_bytes(data[: len(data) - len(ds.PixelData) - 12])  # cut before its pixels
    card = data_card(center, progress=False)
    assert card["qc"]["counts"].get("unreadable_files") == 1
    for w in card["qc"]["warnings"]:
        assert set(w) == {"case", "modality", "kind", "detail"}
        assert w["kind"] != "phi_present" or w["detail"].startswith("not de-identified: ")
        if w["kind"] not in ("phi_present", "burned_in_risk"):
            assert w["detail"] == ""
    assert files[0].name not in json.dumps(card) + format_card(card)


def test_a_folder_of_centers_is_not_a_center(centers: Path) -> None:
    with pytest.raises(MedfoundError, match="not a center folder") as err:
        data_card(centers, progress=False)
    assert "center_0" in str(err.value) and "\n" not in str(err.value)
    res = subprocess.run([sys.executable, "-m", "medfound", "center", "card", str(centers)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "not a center folder" in res.stderr
    assert "Traceback" not in res.stderr
