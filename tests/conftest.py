"""Fixtures shared by several test files."""

from __future__ import annotations

import csv
import faulthandler
import os
from pathlib import Path

import numpy as np
import pytest

# Prepended to a `python -c` script: from then on, importing torch or MONAI fails, as in an
# environment that has only numpy and onnxruntime (what medfound.infer promises to need).
BLOCK_TORCH = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "monai"):
            raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, _Blocked())
"""


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """With MEDFOUND_FAULT_LOG_DIR set, each test process writes the Python stack of every
    thread to DIR/faulthandler-PID.log on a fatal signal (a pytest-xdist worker's stderr, where
    pytest's own faulthandler writes, is lost when the worker dies)."""
    folder = os.environ.get("MEDFOUND_FAULT_LOG_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        config._medfound_fault_log = open(Path(folder) / f"faulthandler-{os.getpid()}.log", "w")  # noqa: SIM115
        faulthandler.enable(file=config._medfound_fault_log, all_threads=True)


def _write_scan(path: Path, centres_mm, direction, origin, spacing=(1.5, 1.5, 2.0),
                size=(40, 40, 24), radius_mm=4.0) -> None:
    """A -1000 HU box with +100 HU spheres at `centres_mm` (LPS), written by SimpleITK."""
    import SimpleITK as sitk

    img = sitk.Image(list(size), sitk.sitkInt16)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    affine = np.asarray(direction, dtype=float).reshape(3, 3) * spacing
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1)
    xyz = ijk @ affine.T + origin
    arr = np.full(size, -1000, dtype=np.int16)
    for c in centres_mm:
        arr[np.linalg.norm(xyz - c, axis=-1) <= radius_mm] = 100
    out = sitk.GetImageFromArray(arr.transpose(2, 1, 0).copy())
    out.CopyInformation(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(path))


def export_tiny_detector(root: Path, cfg) -> tuple:
    """(network, export folder): the tiny detector `cfg` with random weights and a zero prior
    bias (scores near 0.5, so every study has findings), packaged and exported (ONNX, marked
    not validated) under `root`."""
    import torch

    from medfound.export.onnx import export_model_package
    from medfound.models.detection import build_network
    from medfound.train.package import save_model_package

    network = build_network(cfg, seed=0)
    with torch.no_grad():
        network.classification_head.cls_logits.bias.zero_()
    package = save_model_package(root / "model", network, task="lung_nodule_detection",
                                 model_config=cfg.to_dict(),
                                 preprocessing={"spacing_mm": cfg.spacing_mm, "hu_window": cfg.hu_window})
    export_model_package(package, root / "exp", parity_patches=1, allow_unvalidated=True)
    return network, root / "exp"


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("luna16")
    eye = np.eye(3)
    flipped = np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1]])  # i → R, k → I: not canonical
    scans = {"subset0/1.3.6.1.4.1.14519.5.2.1.6279.6001.100": (eye, [-30.0, -30, -20],
                                                                [[0.0, 0, 0], [12.0, -10, 8]]),
             "subset0/1.3.6.1.4.1.14519.5.2.1.6279.6001.200": (flipped, [30.0, -30, 20], []),
             "subset8/1.3.6.1.4.1.14519.5.2.1.6279.6001.300": (flipped, [30.0, -30, 20],
                                                                [[5.0, 3.0, -4.0]])}
    with open(d / "annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        for name, (direction, origin, centres) in scans.items():
            _write_scan(d / f"{name}.mhd", centres, direction, origin)
            w.writerows([[Path(name).name, *c, 8.0] for c in centres])
    (d / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n")
    return d


# The longest test files first: `make test` runs two pytest workers, one file each at a time,
# so a long file started last would leave one worker idle while it finishes.
_LONG_FILES = ("test_fed_deployment.py", "test_fed_robustness.py", "test_notebooks.py",
               "test_fed_simulation.py", "test_fed_pretrain.py", "test_export.py", "test_recipes.py",
               "test_foundation.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return _LONG_FILES.index(name) if name in _LONG_FILES else len(_LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file and among the rest stays
