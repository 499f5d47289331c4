"""`Volume`: the in-memory image every stage after io/ works on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfound.errors import MedfoundError

# The most voxels a reader or the preprocessing may allocate for one image (float32: 4 bytes
# each, so 2 GiB). A header is checked against it before anything is decoded or resampled;
# `max_voxels=` on read_volume / read_series / preprocess, or the environment variable
# MEDFOUND_MAX_VOXELS, sets another limit.
MAX_VOXELS = 1024**3 // 2
MAX_VOXELS_ENV = "MEDFOUND_MAX_VOXELS"


def voxel_budget(max_voxels: int | None = None) -> int:
    """The voxel limit in force: `max_voxels` if given, else MEDFOUND_MAX_VOXELS, else
    MAX_VOXELS. A limit that is not a positive whole number is a MedfoundError."""
    if max_voxels is None:
        text = os.environ.get(MAX_VOXELS_ENV, "").strip()
        if not text:
            return int(MAX_VOXELS)
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (np.isfinite(value) and value >= 1 and value == int(value)):
            raise MedfoundError(f"{MAX_VOXELS_ENV}={text!r} is not a positive whole number",
                                hint=f"set e.g. {MAX_VOXELS_ENV}={MAX_VOXELS}, or unset it")
        return int(value)
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, int | np.integer) \
            or max_voxels < 1:
        raise MedfoundError(f"max_voxels must be a positive whole number, got {max_voxels!r}",
                            hint=f"e.g. max_voxels={MAX_VOXELS}")
    return int(max_voxels)


def over_budget(voxels: int, limit: int, what: str, path: Any = None) -> MedfoundError:
    """The one-line error for an image larger than the voxel limit."""
    return MedfoundError(
        f"{what} is {voxels:,} voxels, over the limit of {limit:,} "
        f"({limit * 4 / 2**30:.2g} GiB as float32)", path=path,
        hint=f"if the header is right and the machine has the memory, raise the limit "
        f"(max_voxels=, or {MAX_VOXELS_ENV})")


@dataclass
class Volume:
    """One image series as a 3D array with its geometry.

    array:    float32, indexed (i, j, k) = (column, row, slice), as ITK and MONAI index
              images. Values are after the modality LUT: HU for CT, SUV or Bq/ml for PET
              (see `units`). A 2D image is a volume with one slice; an ultrasound cine keeps
              its frames along k.
    affine:   4×4 float64 mapping (i, j, k, 1) to DICOM patient coordinates (LPS) in mm.
    modality: DICOM Modality code ("CT", "MR", "PT", "US", ...).
    units:    what the values are ("HU", "SUV", "Bq/ml", "raw", ...).
    series_uid: SeriesInstanceUID, or a stable id derived from the file for NIfTI/MetaImage.
    path:     where it was read from.
    meta:     header facts later stages need (manufacturer, thickness, description, ...);
              never pixel data.
    warnings: things a reader noticed that a human should know (gantry tilt, oblique, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = "OT"
    units: str = "raw"
    series_uid: str = ""
    path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim != 3:
            raise ValueError(f"array must be 3D (i, j, k), got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (norms of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3×3 unit direction cosines of i, j, k in LPS (columns)."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices → (N, 3) LPS mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm → (N, 3) fractional voxel indices."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        return (xyz - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T

    def summary(self) -> dict[str, Any]:
        """The JSON record `medfound inspect --json` prints."""
        a = self.array
        return {
            "path": self.path,
            "modality": self.modality,
            "series_uid": self.series_uid,
            "shape": list(self.shape),
            "spacing_mm": [round(s, 6) for s in self.spacing],
            "affine_lps": [[float(round(v, 6)) for v in row] for row in self.affine],
            "units": self.units,
            "stats": {
                "min": float(a.min()) if a.size else None,
                "max": float(a.max()) if a.size else None,
                "mean": float(a.mean(dtype=np.float64)) if a.size else None,
            },
        }


# --- geometry shared by training (data/) and deployment (infer/): numpy only -------------------

# The canonical axes every model sees: i → +x (Left), j → +y (Posterior), k → +z (Superior).
CANONICAL = "LPS"


def canonical_axes(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip the last three axes of `array` so that i → +x (L), j → +y (P),
    k → +z (S) in LPS; returns (array, affine) with every voxel at its old world position.

    Lossless (no interpolation). `array` is (i, j, k) or (C, i, j, k); `affine` maps (i, j, k)
    to LPS mm. Already-canonical input is returned as is (no copy).
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(affine)
    if (ornt == [[0, 1], [1, 1], [2, 1]]).all():
        return array, affine
    shape = array.shape[-3:]
    if array.ndim == 3:
        out = apply_orientation(array, ornt)
    else:
        out = np.stack([apply_orientation(c, ornt) for c in array])
    return np.ascontiguousarray(out), affine @ inv_ornt_aff(ornt, shape)


def voxel_boxes_to_world(boxes_xyzxyz: Any, affine: Any) -> tuple[np.ndarray, np.ndarray]:
    """Voxel boxes (N, 6) xyzxyz in MONAI's convention (voxel n covers [n, n + 1)), as the
    detector outputs them, of an image with (i, j, k) → LPS `affine` → (N, 3) box centres in
    LPS mm and (N, 3) box sizes in mm along i, j, k."""
    b = np.asarray(boxes_xyzxyz, dtype=np.float64).reshape(-1, 6)
    a = np.asarray(affine, dtype=np.float64)
    centre_ijk = 0.5 * (b[:, :3] + b[:, 3:]) - 0.5
    centres = centre_ijk @ a[:3, :3].T + a[:3, 3]
    sizes_mm = (b[:, 3:] - b[:, :3]) * np.linalg.norm(a[:3, :3], axis=0)
    return centres, sizes_mm
