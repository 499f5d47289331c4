"""Writers never lose data: `infer`, `export` and training checkpoints never remove or replace
what the run did not write, refuse an output folder that overlaps an input, and meet a full or
read-only disk with one line and no half-written output that looks complete.

Full and read-only disks are real: small tmpfs mounts (root only; skipped elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from medfound.data.detection import load_datalist
from medfound.data.phantoms import make_phantoms
from medfound.errors import MedfoundError
from medfound.export.onnx import export_model_package
from medfound.infer.study import run_studies
from medfound.models.detection import DetectorConfig, build_network
from medfound.train.checkpoint import save_checkpoint
from medfound.train.package import save_model_package

torch.set_num_threads(1)

CFG = DetectorConfig.preset("tiny", spacing_mm=[2.8125, 2.8125, 3.0], patch_size=[32, 32, 16],
                            sw_roi_size=[64, 64, 32], score_thresh=0.02)


def medfound(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medfound", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str, read_only: bool = False):
    """A real tmpfs of `size` at `where` (read-only if asked); skips the test when this
    process may not mount (not root)."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'not root'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("safe_outputs")
    make_phantoms(root / "phantoms", centers=1, cases=1, seed=3, size="small", progress=False)
    network = build_network(CFG, seed=0)
    package = save_model_package(root / "model", network, task="lung_nodule_detection",
                                 model_config=CFG.to_dict(),
                                 preprocessing={"spacing_mm": CFG.spacing_mm, "hu_window": CFG.hu_window})
    export_model_package(package, root / "exp", parity_patches=1, allow_unvalidated=True)
    study = Path(load_datalist(root / "phantoms", None, "all")[0]["image"])
    return {"root": root, "exp": root / "exp", "package": package, "study": study}


def copy_with_series_uid(study: Path, dst: Path, uid: str) -> Path:
    """A copy of the series `study` whose SeriesInstanceUID is `uid` (in every file)."""
    dst.mkdir(parents=True)
    for f in sorted(study.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


# --- infer: never over its inputs, never over what is already there -----------------------


def test_an_out_folder_holding_the_study_is_refused_and_the_study_is_untouched(setup, tmp_path):
    uid = pydicom.dcmread(next(setup["study"].iterdir())).SeriesInstanceUID
    study = shutil.copytree(setup["study"], tmp_path / uid)  # the folder has the output's name
    before = tree(study)
    res = medfound("infer", "--model", str(setup["exp"]), str(study), "--out", str(tmp_path),
                   "--threads", "1", "--quiet")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "contains the input" in res.stderr and "Traceback" not in res.stderr
    assert tree(study) == before
    # --out inside the study, or the study itself, is refused the same way.
    for out in (study, study / "results"):
        with pytest.raises(MedfoundError, match="output folder"):
            run_studies(setup["exp"], [study], out, progress=False)
    assert tree(study) == before


def test_existing_folders_are_never_replaced_and_reserved_names_are_kept(setup, tmp_path):
    out = tmp_path / "out"
    uid = pydicom.dcmread(next(setup["study"].iterdir())).SeriesInstanceUID
    (out / uid).mkdir(parents=True)
    (out / uid / "notes.txt").write_text("a radiologist's notes")
    # A series named like the summary file, and one with an empty UID, both land safely.
    hostile = copy_with_series_uid(setup["study"], tmp_path / "in" / "a", "summary.json")
    summary = run_studies(setup["exp"], [setup["study"], hostile], out, threshold=0.9,
                          progress=False)
    assert summary["n_ok"] == 2 and summary["finished"] is True
    assert (out / uid / "notes.txt").read_text() == "a radiologist's notes"
    names = sorted(Path(r["out"]).name for r in summary["studies"])
    assert names == sorted([f"{uid}_2", "summary.json_2"])
    assert json.loads((out / "summary.json").read_text())["n_ok"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_second_run_into_the_same_out_is_refused_and_keeps_the_first(setup, tmp_path):
    out = tmp_path / "out"
    run_studies(setup["exp"], [setup["study"]], out, threshold=0.9, progress=False)
    before = tree(out)
    res = medfound("infer", "--model", str(setup["exp"]), str(setup["study"]), "--out", str(out),
                   "--quiet")
    assert res.returncode == 2 and "earlier run" in res.stderr and "Traceback" not in res.stderr
    assert tree(out) == before


def test_infer_reads_the_series_asked_for_in_a_folder_of_several(setup, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(setup["study"], both / "a")
    other = copy_with_series_uid(setup["study"], both / "b", "1.2.826.0.1.3680043.8.498.77")
    for f in other.iterdir():  # another series needs its own instance UIDs
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(f, enforce_file_format=True)
    res = medfound("infer", "--model", str(setup["exp"]), str(both), "--out", str(tmp_path / "o"),
                   "--quiet", "--threshold", "0.9")
    assert res.returncode == 1 and "--series" in res.stderr
    res = medfound("infer", "--model", str(setup["exp"]), str(both), "--out", str(tmp_path / "o2"),
                   "--quiet", "--threshold", "0.9", "--series", "1.2.826.0.1.3680043.8.498.77")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert summary["studies"][0]["series_uid"] == "1.2.826.0.1.3680043.8.498.77"


# --- full and read-only disks -------------------------------------------------------------


def _no_temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".partial" in p.name or p.name.endswith((".tmp", ".staged"))
            or p.name.startswith(".medfound-")]


def test_infer_on_a_full_disk_ends_in_one_line_and_leaves_nothing_half_written(setup, tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "48k") as disk:
        res = medfound("infer", "--model", str(setup["exp"]), str(setup["study"]),
                       "--out", str(disk / "out"), "--quiet", "--threshold", "0.02")
        assert res.returncode == 2, res.stdout + res.stderr
        err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "no space left" in err[0] and "Traceback" not in res.stderr
        assert _no_temporaries(disk) == []
        assert not any(p.name == "findings.json" for p in disk.rglob("*"))


def test_infer_export_and_training_into_a_read_only_folder_are_one_line(setup, tmp_path):
    phantoms = setup["root"] / "phantoms"
    with mounted_tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        for args in (["infer", "--model", str(setup["exp"]), str(setup["study"]), "--out",
                      str(ro / "o"), "--quiet"],
                     ["export", str(setup["package"]), "--out", str(ro / "exp"), "--allow-unvalidated"],
                     ["run", "train_detector", f"data.root={phantoms}", "data.train_centers=[center_0]",
                      "data.val_centers=[center_0]", f"out_dir={ro / 'run'}", "experiment=phantoms_smoke"]):
            res = medfound(*args)
            assert res.returncode == 2, (args, res.stderr)
            assert "read-only" in res.stderr and "Traceback" not in res.stderr, res.stderr
            errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, res.stderr


def test_export_on_a_full_disk_leaves_no_model_without_its_card(setup, tmp_path):
    size = (setup["exp"] / "model.onnx").stat().st_size
    with mounted_tmpfs(tmp_path / "disk", f"{size // 1024 + 8}k") as disk:
        res = medfound("export", str(setup["package"]), "--out", str(disk / "exp"), "--allow-unvalidated")
        assert res.returncode == 2, res.stdout + res.stderr
        assert "no space left" in res.stderr and "Traceback" not in res.stderr
        assert "--fixed-shape" not in res.stderr  # a full disk is not an exporter problem
        assert not (disk / "exp").exists() or sorted(p.name for p in (disk / "exp").iterdir()) == []
        assert _no_temporaries(disk) == []


def test_export_into_a_folder_that_holds_files_is_refused(setup, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"someone else's model")
    with pytest.raises(MedfoundError, match="not empty"):
        export_model_package(setup["package"], out, parity_patches=1, allow_unvalidated=True)
    assert (out / "model.onnx").read_bytes() == b"someone else's model"


def test_a_checkpoint_on_a_full_disk_is_one_error_and_no_temporary(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "64k") as disk:
        (disk / "ckpt").mkdir()
        save_checkpoint({"model": {"w": torch.zeros(4)}}, disk / "ckpt" / "best.pt")
        before = (disk / "ckpt" / "best.pt").read_bytes()
        with pytest.raises(MedfoundError, match="no space left"):
            save_checkpoint({"model": {"w": torch.from_numpy(np.zeros(100_000, np.float32))}},
                            disk / "ckpt" / "best.pt")
        assert sorted(p.name for p in (disk / "ckpt").iterdir()) == ["best.pt"]
        assert (disk / "ckpt" / "best.pt").read_bytes() == before  # the last good one stays


# --- `medfound run` mistakes --------------------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["run", "train_detector", "data.root=."], "needs out_dir"),
    (["run", "train_detector", "out_dir=RUN", "no_such.key=1"], "no_such.key"),
    (["run", "evaluate_detector", "model=M", "out_dir=E", "data.root=/no/such/folder"],
     "no such data folder"),
])
def test_run_mistakes_end_in_one_line_before_the_heavy_imports(args, expected, tmp_path):
    res = subprocess.run([sys.executable, "-m", "medfound", *args], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120, check=False)
    assert res.returncode == 2
    assert expected in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "RUN").exists()


def test_a_new_training_run_will_not_overwrite_an_earlier_one(tmp_path):
    run = tmp_path / "RUN"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"earlier run")
    res = medfound("run", "train_detector", f"data.root={tmp_path}", f"out_dir={run}",
                   f"seed={uuid.uuid4().int % 100}")
    assert res.returncode == 2 and "earlier run" in res.stderr and "resume=true" in res.stderr
    assert (run / "checkpoints" / "best.pt").read_bytes() == b"earlier run"
