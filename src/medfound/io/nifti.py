"""NIfTI (.nii, .nii.gz) → `Volume`, via nibabel, with the affine turned from RAS to LPS."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfound.errors import MedfoundError
from medfound.io.volume import Volume, over_budget, voxel_budget

# NIfTI world space is RAS+ (x to the patient's Right... increasing towards Left is -x);
# DICOM's is LPS+. The two differ by flipping x and y.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}


def file_id(path: str | Path) -> str:
    """The file name without .nii/.nii.gz/.mhd/.mha: a stable series id (LUNA16 names files
    by SeriesInstanceUID)."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mhd", ".mha"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def read_nifti(path: str | Path, *, max_voxels: int | None = None) -> Volume:
    """Read a NIfTI-1/2 file. Array float32 (i, j, k) as stored (scl_slope/inter applied);
    affine (i, j, k, 1) → LPS mm (nibabel's best affine: sform, else qform; units in mm).
    The header's size is checked against `max_voxels` (see `voxel_budget`) before reading."""
    import nibabel as nib

    path = Path(path)
    budget = voxel_budget(max_voxels)
    try:
        img = nib.load(str(path))
        hdr = img.header
        shape = img.shape
        voxels = int(np.prod(shape, dtype=np.float64))
        if voxels > budget:
            raise over_budget(voxels, budget, f"the header's image {tuple(shape)}", path)
        if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
            raise MedfoundError(
                f"{len(shape)}D image {tuple(shape)}: only one 3D volume can be read",
                path=path, hint="split it into 3D volumes (e.g. `fslsplit`) and read one")
        array = np.asarray(img.dataobj, dtype=np.float32)
    except MedfoundError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel/gzip/numpy errors all mean a bad file
        raise MedfoundError(f"cannot read NIfTI: {' '.join(str(err).split())}", path=path,
                            hint="the file may be truncated or not NIfTI; write it again") from err
    array = array.reshape(array.shape[:3] + (1,) * (3 - min(array.ndim, 3)))
    warnings = []
    space_units = hdr.get_xyzt_units()[0] if hasattr(hdr, "get_xyzt_units") else "mm"
    scale = _TO_MM.get(space_units, 1.0)
    affine = np.array(img.affine, dtype=np.float64)
    affine[:3, :4] *= scale  # spatial units to mm
    if space_units == "unknown":
        warnings.append("NIfTI spatial units unknown: taken as mm")
    codes = {"sform": int(hdr["sform_code"]), "qform": int(hdr["qform_code"])} \
        if "sform_code" in hdr else {}
    if codes and not any(codes.values()):
        warnings.append("NIfTI has neither sform nor qform: the affine is nominal "
                        "(voxel sizes only)")
    return Volume(array=array, affine=RAS_TO_LPS @ affine, modality="OT", units="raw",
                  series_uid=file_id(path), path=str(path),
                  meta={"format": "nifti", "description": _descrip(hdr), **codes},
                  warnings=warnings)


def _descrip(hdr) -> str:
    try:
        raw = hdr["descrip"]
        text = raw.item() if hasattr(raw, "item") else raw
        return text.decode("latin-1").strip("\x00 ") if isinstance(text, bytes) else str(text)
    except (KeyError, ValueError):
        return ""
