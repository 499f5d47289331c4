"""`deid` over awkward file systems: every input file is either written or reported.

Long names (the temporary name must not be longer than the file's own), an output path the file
system refuses, a folder that cannot be listed: one file's failure never stops the others, the
report lists it, and the command line says how many failed and exits non-zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from medfound.io.deid import REPORT_NAME, deidentify
from test_deid import JANE, write_ct_slice

KEY_HEX = "77" * 32
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "center.key"
    path.write_text(KEY_HEX + "\n")
    path.chmod(0o600)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "medfound", "deid", *args, "--quiet"],
                          capture_output=True, text=True, env=env, timeout=120)


def test_file_names_of_254_characters_are_all_written(tmp_path, key_file):
    src = tmp_path / "in"
    names = [f"s{k:02d}.dcm" for k in range(20)]
    names[10:10] = [f"{c * 250}.dcm" for c in "klmn"]  # 254 characters, among the others
    for k, name in enumerate(names):
        write_ct_slice(src / name, JANE, 1, 1, k, "20230301")
    assert len(names) == 24 and max(len(n) for n in names) == 254

    report = deidentify(src, tmp_path / "out", key_file=key_file, progress=False)
    assert report["files_written"] == 24 and report["files_failed"] == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.dcm")) == sorted(names)
    assert pydicom.dcmread(tmp_path / "out" / names[10]).PatientIdentityRemoved == "YES"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".partial")]


def test_a_file_that_cannot_be_written_is_reported_and_the_rest_are_written(tmp_path, key_file):
    """The deepest file fits the path limit under IN but not under OUT, whose path is longer."""
    src = tmp_path / "in"
    for k in range(23):
        write_ct_slice(src / f"s{k:02d}.dcm", JANE, 1, 1, k, "20230301")
    depth = (PATH_MAX - len(str(src)) - 40) // 201
    deep = Path(*[f"{d:02d}" + "d" * 198 for d in range(depth)]) / "deep.dcm"
    assert len(str(src / deep)) < PATH_MAX
    write_ct_slice(src / deep, JANE, 1, 1, 23, "20230301")
    out = tmp_path / ("o" * 250) / ("p" * 250)
    assert len(str(out / deep)) > PATH_MAX

    done = _cli(str(src), str(out), "--key-file", str(key_file))
    assert done.returncode == 1, done.stderr
    assert "de-identified 23 files" in done.stdout and "1 failed" in done.stdout
    assert "1 files FAILED" in done.stderr
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["files_seen"] == 24 and report["files_written"] == 23
    assert report["files_failed"] == 1
    (failed,) = report["failed"]
    assert failed["path"] == deep.as_posix() and "too long" in failed["reason"].lower()
    assert len(list(out.glob("s*.dcm"))) == 23
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, key_file):
    if os.geteuid() == 0:
        pytest.skip("root lists every folder: permissions cannot make one unreadable")
    src = tmp_path / "in"
    write_ct_slice(src / "a" / "s0.dcm", JANE, 1, 1, 0, "20230301")
    write_ct_slice(src / "b" / "s1.dcm", JANE, 1, 1, 1, "20230301")
    (src / "b").chmod(0)
    try:
        report = deidentify(src, tmp_path / "out", key_file=key_file, progress=False)
    finally:
        (src / "b").chmod(0o755)
    assert report["files_written"] == 1 and report["files_failed"] == 1
    assert report["failed"] == [{"path": "b", "reason": "folder could not be listed"}]


def test_unknown_or_unsupported_option_is_refused_in_one_line(tmp_path, key_file):
    write_ct_slice(tmp_path / "in" / "s0.dcm", JANE, 1, 1, 0, "20230301")
    for option, message in (("clean-everything", "unknown de-identification option"),
                            ("clean-pixel-data", "not supported")):
        done = _cli(str(tmp_path / "in"), str(tmp_path / "out"), "--option", option)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
        assert not (tmp_path / "out").exists()


def test_cli_options_by_name_are_applied_and_recorded(tmp_path, key_file):
    write_ct_slice(tmp_path / "in" / "s0.dcm", JANE, 1, 1, 0, "20230301")
    done = _cli(str(tmp_path / "in"), str(tmp_path / "out"), "--key-file", str(key_file),
                "--option", "clean-descriptors", "--option", "retain-device-identity")
    assert done.returncode == 0, done.stderr
    ds = pydicom.dcmread(tmp_path / "out" / "s0.dcm")
    assert ds.StudyDescription == "CT CHEST ANONYMIZED FOLLOWUP"  # the name taken out
    assert ds.SeriesDescription == "AX LUNG 1.25"
    assert ds.StationName == "CTSCAN-ROOM7"  # device identity kept
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == [
        "113100", "113105", "113107", "113109"]
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["profile_options"] == ["clean-descriptors", "retain-longitudinal-modified-dates",
                                         "retain-device-identity"]


def test_pipes_and_links_are_reported_not_opened(tmp_path, key_file):
    """A named pipe would block the run forever if opened, a link may lead out of IN: both are
    counted as skipped, not read."""
    src = tmp_path / "in"
    write_ct_slice(src / "s0.dcm", JANE, 1, 1, 0, "20230301")
    os.mkfifo(src / "pipe.dcm")
    (src / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    write_ct_slice(tmp_path / "elsewhere" / "other.dcm", JANE, 2, 1, 0, "20230301")
    (src / "link.dcm").symlink_to(tmp_path / "elsewhere" / "other.dcm")
    (src / "inside.dcm").symlink_to(src / "s0.dcm")
    report = deidentify(src, tmp_path / "out", key_file=key_file, progress=False)
    assert report["files_written"] == 2 and report["files_skipped"] == 3
    assert report["skipped_reasons"] == {
        "link to a file outside IN (not read)": 2,  # one of them broken
        "not a regular file (pipe, socket, device or broken link)": 1}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.dcm")) == ["inside.dcm", "s0.dcm"]


def test_options_are_found_by_the_names_the_standard_uses():
    from medfound.io.deid_profile import select_options

    chosen = select_options(["Retain Longitudinal Temporal Information with Modified Dates",
                             "Clean Descriptors Option", "retain_device_identity"])
    assert [opt.code for opt in chosen] == ["113105", "113107", "113109"]
    assert [opt.code for opt in select_options(["Retain Longitudinal with Full Dates"])] == \
        ["113106"]
    assert [opt.code for opt in select_options([], remove_dates=True)] == []
