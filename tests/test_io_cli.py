"""`medfound inspect`, run as a user runs it: a real subprocess, its exit code and its output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_factory import ramp, write_series

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def inspect(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medfound", "inspect", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def shipped(name: str) -> Path:
    path = TEST_FILES / name
    if not path.exists():
        pytest.skip(f"{name} is not in this pydicom install")
    return path


def test_inspect_json_prints_geometry_and_values_and_nothing_on_stderr(tmp_path):
    stored = ramp((5, 4, 6))
    write_series(tmp_path, stored, origin=(-40, -60, 100))
    res = inspect(tmp_path, "--json", "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # no progress bar, no warnings for a clean series
    out = json.loads(res.stdout)
    assert out["shape"] == [5, 4, 6] and out["modality"] == "CT" and out["units"] == "HU"
    assert out["spacing_mm"] == pytest.approx([0.7, 0.8, 2.5])
    assert out["affine_lps"][2] == pytest.approx([0, 0, 2.5, 100])
    assert out["stats"]["min"] == float(stored.min()) - 1024


def test_inspect_lists_several_series_exits_3_and_reads_the_one_chosen(tmp_path):
    write_series(tmp_path / "a", ramp((4, 4, 3)), series_uid="1.2.3.1", description="lung")
    write_series(tmp_path / "b", ramp((4, 4, 2)), series_uid="1.2.3.2", description="bone")
    res = inspect(tmp_path)
    assert res.returncode == 3
    assert "2 series" in res.stdout and "1.2.3.1" in res.stdout and "bone" in res.stdout
    res = inspect(tmp_path, "--json")
    assert res.returncode == 3
    listed = json.loads(res.stdout)["series"]
    assert {s["series_uid"]: s["count"] for s in listed} == {"1.2.3.1": 3, "1.2.3.2": 2}
    res = inspect(tmp_path, "--series", "1.2.3.2", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["shape"] == [4, 4, 2]


def test_inspect_reads_nifti(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5), np.float32), np.diag([2, 2, 3, 1])),
             tmp_path / "x.nii.gz")
    res = inspect(tmp_path / "x.nii.gz", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["affine_lps"][0][0] == -2  # RAS → LPS


def test_allow_gaps_reads_a_series_with_a_missing_slice_and_warns(tmp_path):
    write_series(tmp_path, ramp((4, 4, 6)), skip=(3,))
    res = inspect(tmp_path)
    assert res.returncode == 2 and "--allow-gaps" in res.stderr
    res = inspect(tmp_path, "--allow-gaps")
    assert res.returncode == 0
    assert res.stderr.startswith("warning: 1 slice(s) missing")


def _broken_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "empty").mkdir()
    write_series(tmp / "gap", ramp((4, 4, 5)), skip=(2,))
    write_series(tmp / "dup", ramp((4, 4, 3)), positions=[(0, 0, 0), (0, 0, 2), (0, 0, 2)])
    (cut,) = write_series(tmp / "cut", ramp((8, 8, 1)))
    cut.write_bytes(cut.read_bytes()[:-50])
    return {
        "missing path": (tmp / "nope", "no such file or folder"),
        "empty folder": (tmp / "empty", "folder is empty"),
        "not DICOM": (shipped("README.txt"), "not a DICOM file"),
        "structured report": (shipped("test-SR.dcm"), "no pixel data"),
        "RT plan": (shipped("rtplan.dcm"), "no pixel data"),
        "truncated": (cut, "truncated file"),
        "missing slice": (tmp / "gap", "slice(s) missing"),
        "duplicate": (tmp / "dup", "duplicate slice positions"),
        "undecodable": (shipped("JPEG-lossy.dcm"), "cannot decode pixel data"),
    }


def test_bad_input_ends_in_one_line_on_stderr_never_a_traceback(tmp_path):
    for case, (path, message) in _broken_inputs(tmp_path).items():
        res = inspect(path)
        assert res.returncode == 2, case
        assert "Traceback" not in res.stderr, case
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, (case, res.stderr)
        assert lines[0].startswith(f"error: {path}"), case  # names the file or folder
        assert message in lines[0], case


def test_bad_workers_value_is_a_clear_error(tmp_path):
    write_series(tmp_path, ramp((4, 4, 2)))
    res = inspect(tmp_path, "--workers", "0")
    assert res.returncode == 2 and "workers must be at least 1" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_folder_of_only_non_image_objects_says_so(tmp_path):
    for name in ("test-SR.dcm", "rtplan.dcm"):
        shutil.copy(shipped(name), tmp_path / name)
    res = inspect(tmp_path)
    assert res.returncode == 2 and "none is a DICOM image" in res.stderr


def test_max_voxels_refuses_a_study_over_the_budget_in_one_line(tmp_path):
    write_series(tmp_path, ramp((5, 4, 6)), origin=(-40, -60, 100))
    assert inspect(tmp_path, "--max-voxels", "120").returncode == 0  # 5 × 4 × 6 voxels
    res = inspect(tmp_path, "--max-voxels", "100")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "100" in res.stderr, res.stderr
    res = inspect(tmp_path, "--max-voxels", "-3")
    assert res.returncode == 2 and "positive whole number" in res.stderr and "Traceback" not in res.stderr
