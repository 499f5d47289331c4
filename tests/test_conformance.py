"""Every DICOM object medfound writes passes dicom3tools' IOD validator (`dciodvfy`) with no error.

Checked: the phantoms' CT, MR, PET and ultrasound (the five scanner profiles, so explicit VR,
implicit VR and RLE files), the nodule DICOM SR (with findings and without) and DICOM SEG (with a
nodule and empty) on phantom CT headers, and a de-identified copy of each (`medfound.io.deid`).
dcmtk's `dsrdump` also parses each SR's content tree.

The validators are Debian packages (dicom3tools, dcmtk) that `.ci/run` installs: where one is
missing these tests skip, except under CI (CI=true or MEDFOUND_REQUIRE_VALIDATORS=1), where
they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfound.data.phantoms import MODALITIES, make_phantoms
from medfound.io.deid import deidentify
from medfound.io.seg import write_nodule_seg
from medfound.io.sr import read_source_headers, write_nodule_sr

CENTERS = 5  # one of each scanner profile: explicit VR, implicit VR, RLE, ordered and hashed names
REPORTS = ("sr", "sr_empty", "seg", "seg_empty")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    required = os.environ.get("MEDFOUND_REQUIRE_VALIDATORS") == "1" or os.environ.get("CI") == "true"
    message = f"{name} is not installed (Debian: apt-get install dicom3tools dcmtk)"
    if required:
        pytest.fail(message + "; CI requires it (.ci/run installs it)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def dciodvfy() -> str:
    """Requested before the files are made, so a missing validator skips without making them."""
    return _tool("dciodvfy")


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error - ..." lines dciodvfy prints for `path` (it reports on stderr)."""
    result = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                            timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line.strip() for line in lines if "Error" in line]
    if result.returncode != 0 and not errors:  # a crash or an unreadable file is an error too
        errors.append(f"dciodvfy exited {result.returncode}: {lines[-1:] or 'no output'}")
    return errors


def _assert_valid(paths: list[Path]) -> None:
    assert paths
    found = {str(p): errors for p in paths if (errors := dciodvfy_errors(p))}
    assert not found, "dciodvfy errors:\n" + "\n".join(
        f"{p}:\n  " + "\n  ".join(e) for p, e in found.items())


def _first_and_last(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.dcm"))
    return [files[0], files[-1]] if len(files) > 1 else files


def _reports(ct: Path, out: Path) -> dict[str, Path]:
    """An SR and a SEG of one hand-made nodule on the CT's middle slice, and both without any."""
    headers = read_source_headers(sorted(ct.glob("*.dcm")))
    headers.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    mid = len(headers) // 2
    ds = headers[mid]
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    spacing = [float(v) for v in ds.PixelSpacing]
    row, col = int(ds.Rows) // 2, int(ds.Columns) // 3
    centre = (np.array([float(v) for v in ds.ImagePositionPatient])
              + col * spacing[1] * iop[:3] + row * spacing[0] * iop[3:])
    finding = {"center_lps_mm": centre.tolist(), "diameter_mm": 8.0, "probability": 0.87}
    kw = dict(algorithm_name="medfound-smoke", algorithm_version="0.1", model_sha256="ab" * 32)
    frames = np.zeros((len(headers), int(ds.Rows), int(ds.Columns)), dtype=np.uint8)
    frames[mid, row - 2:row + 3, col - 2:col + 3] = 1
    out.mkdir(parents=True, exist_ok=True)
    return {
        "sr": write_nodule_sr([finding], headers, out / "sr.dcm", **kw),
        "sr_empty": write_nodule_sr([], headers, out / "sr_empty.dcm", **kw),
        "seg": write_nodule_seg(frames, headers, out / "seg.dcm", **kw),
        "seg_empty": write_nodule_seg(np.zeros_like(frames), headers, out / "seg_empty.dcm", **kw),
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, list[Path]]:
    """Kind ("ct", "mr", "pet", "us", "sr", ...) → the files medfound wrote of that kind."""
    root = tmp_path_factory.mktemp("conformance")
    phantoms = make_phantoms(root / "phantoms", centers=CENTERS, cases=1, seed=3,
                             modalities=MODALITIES, size="small", progress=False)
    files: dict[str, list[Path]] = {m: [] for m in (*MODALITIES, *REPORTS)}
    for c in range(CENTERS):
        case = phantoms / f"center_{c}" / "case_000"
        for m in MODALITIES:
            files[m] += _first_and_last(case / m)
        if c in (0, 1, 4):  # uint16 explicit VR, int16 implicit VR with hashed names, RLE
            for kind, path in _reports(case / "ct", root / "reports" / f"center_{c}").items():
                files[kind].append(path)
    return files


@pytest.fixture(scope="module")
def deidentified(written, tmp_path_factory) -> dict[str, list[Path]]:
    """The same files de-identified with the public API (one run, one key)."""
    root = tmp_path_factory.mktemp("deid")
    src = root / "in"
    for kind, paths in written.items():
        for n, path in enumerate(paths):
            (src / kind / str(n)).mkdir(parents=True)
            shutil.copy(path, src / kind / str(n) / path.name)
    key = root / "center.key"
    deidentify(src, root / "out", key_file=key, progress=False)
    return {kind: sorted((root / "out" / kind).rglob("*.dcm")) for kind in written}


@pytest.mark.parametrize("modality", MODALITIES)
def test_phantom_images_pass_the_iod_validator(dciodvfy, written, modality) -> None:
    _assert_valid(written[modality])


@pytest.mark.parametrize("kind", REPORTS)
def test_sr_and_seg_pass_the_iod_validator(dciodvfy, written, kind) -> None:
    _assert_valid(written[kind])


@pytest.fixture(scope="module")
def dsrdump() -> str:
    return _tool("dsrdump")


def test_sr_content_tree_parses_in_dcmtk(dsrdump, written, deidentified) -> None:
    """The findings are there, in a tree dcmtk accepts, also after de-identification."""
    for path in [*written["sr"], *written["sr_empty"], *deidentified["sr"], *deidentified["sr_empty"]]:
        result = subprocess.run([dsrdump, "-v", str(path)], capture_output=True,
                                text=True, timeout=60)
        problems = [line for line in result.stderr.splitlines() if line[:2] in ("E:", "W:", "F:")]
        assert result.returncode == 0 and not problems, (path, result.stderr)
        assert "(27925004,SCT,\"Nodule\")" in result.stdout  # finding type (TID 1501/1410)
        assert "(39607008,SCT,\"Lung\")" in result.stdout  # finding site
        if path.name == "sr.dcm":
            assert "Image Region" in result.stdout and "(mm,UCUM" in result.stdout


@pytest.mark.parametrize("kind", (*MODALITIES, *REPORTS))
def test_deidentified_copies_pass_the_iod_validator(dciodvfy, deidentified, written, kind) -> None:
    paths = deidentified[kind]
    assert len(paths) == len(written[kind])  # every file was de-identified, none skipped
    _assert_valid(paths)


def test_sr_and_seg_of_a_deidentified_study_pass_the_iod_validator(dciodvfy, deidentified,
                                                                  tmp_path) -> None:
    """Reports on a study that was de-identified first carry its emptied patient module."""
    series = tmp_path / "ct"
    series.mkdir()
    for path in deidentified["ct"][:2]:  # center_0's first and last slice
        shutil.copy(path, series / path.name)
    with warnings.catch_warnings():  # highdicom may warn about a one-component pseudonym name
        warnings.simplefilter("ignore", UserWarning)
        reports = _reports(series, tmp_path / "reports")
    _assert_valid(list(reports.values()))


def _codes(ds: pydicom.Dataset):
    for elem in ds.iterall():
        if elem.VR == "SQ":
            for item in elem.value:
                if "CodingSchemeDesignator" in item:
                    yield item.CodeValue if "CodeValue" in item else "", item.CodingSchemeDesignator


def test_no_code_uses_the_retired_srt_designator(written) -> None:
    """SNOMED codes are SCT (SNOMED CT concept ids); SRT (SNOMED-RT ids) is retired (PS3.16 8)."""
    seen = set()
    for kind, paths in written.items():
        for path in paths:
            for value, scheme in _codes(pydicom.dcmread(path, stop_before_pixels=True)):
                seen.add((kind, value, scheme))
    assert not [s for s in seen if s[2] == "SRT"], sorted(seen)
    assert ("pet", "77004003", "SCT") in seen and ("pet", "35321007", "SCT") in seen
    assert ("seg", "27925004", "SCT") in seen  # Nodule
