"""`read_volume`: the one way to read a study — DICOM file or folder, NIfTI or MetaImage."""

from __future__ import annotations

from pathlib import Path

from medfound.errors import MedfoundError
from medfound.io.dicom import MultipleSeriesError, SeriesInfo, find_series, read_dicom, read_series
from medfound.io.metaimage import read_metaimage
from medfound.io.nifti import file_id, read_nifti
from medfound.io.volume import Volume

__all__ = ["MultipleSeriesError", "SeriesInfo", "find_series", "read_series", "read_volume"]


def read_volume(path: str | Path, series_uid: str | None = None, allow_gaps: bool = False,
                workers: int | None = None, progress: bool | None = None,
                max_voxels: int | None = None) -> Volume:
    """Read one image volume, choosing the reader by what `path` is.

    - a folder, or any other file: DICOM (a folder is searched recursively; with several
      series `series_uid` picks one, else MultipleSeriesError lists them);
    - .nii / .nii.gz: NIfTI (RAS affine turned to LPS);
    - .mhd / .mha: MetaImage (already LPS).

    Returns a `Volume`: float32 array indexed (i, j, k) = (column, row, slice), affine to LPS
    mm, values after the modality LUT. `allow_gaps` reads DICOM series with missing slices,
    uneven spacing or unreadable files (with a warning naming them) instead of failing;
    `workers` decoding threads (default: CPU count); `progress` shows a bar (default: only on
    a terminal, for long series). `max_voxels` bounds the image a header may declare, checked
    before anything is decoded (default: MEDFOUND_MAX_VOXELS, else
    `medfound.io.volume.MAX_VOXELS`). Every user-caused failure is a one-line `MedfoundError`.
    """
    p = Path(path)
    if not p.exists():
        raise MedfoundError("no such file or folder", path=p,
                            hint="check the path (and that the disk is mounted)")
    name = p.name.lower()
    if p.is_file() and name.endswith((".nii", ".nii.gz", ".mhd", ".mha")):
        if series_uid is not None and series_uid != file_id(p):
            raise MedfoundError(f"series_uid {series_uid} given for a single-volume file",
                                path=p, hint="choose series only in DICOM folders")
        return (read_nifti(p, max_voxels=max_voxels) if name.endswith((".nii", ".nii.gz"))
                else read_metaimage(p, max_voxels=max_voxels))
    return read_dicom(p, series_uid, allow_gaps=allow_gaps, workers=workers, progress=progress,
                      max_voxels=max_voxels)
