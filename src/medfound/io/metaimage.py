"""MetaImage (.mhd + .raw, or .mha) → `Volume`, via SimpleITK.

ITK's physical space is DICOM's LPS, so origin, spacing and direction are used as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfound.errors import MedfoundError
from medfound.io.nifti import file_id
from medfound.io.volume import Volume, over_budget, voxel_budget

_MODALITY = {"MET_MOD_CT": ("CT", "HU"), "MET_MOD_MR": ("MR", "raw"),
             "MET_MOD_PET": ("PT", "raw"), "MET_MOD_NM": ("NM", "raw"),
             "MET_MOD_US": ("US", "raw")}
LUMA = np.array([0.299, 0.587, 0.114])


def read_metaimage(path: str | Path, *, max_voxels: int | None = None) -> Volume:
    """Read a 2D or 3D MetaImage. Array float32 (i, j, k) (SimpleITK's (k, j, i) transposed,
    no copy of the order); affine = direction · diag(spacing), origin; all LPS mm.
    The header's size is checked against `max_voxels` (see `voxel_budget`) before reading."""
    import SimpleITK as sitk

    path = Path(path)
    budget = voxel_budget(max_voxels)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = reader.GetSize()
        voxels = int(np.prod(size, dtype=np.float64)) * reader.GetNumberOfComponents()
        if voxels > budget:
            raise over_budget(voxels, budget, f"the header's image {tuple(size)}", path)
        img = reader.Execute()
    except RuntimeError as err:
        raise MedfoundError(f"cannot read MetaImage: {_itk_reason(err)}", path=path,
                            hint="keep the .raw/.zraw named by ElementDataFile next to the "
                            ".mhd, and check neither is truncated") from err
    dim = img.GetDimension()
    if dim not in (2, 3):
        raise MedfoundError(f"{dim}D image: only 2D and 3D MetaImages can be read", path=path,
                            hint="extract one 3D volume first")
    warnings = []
    # (k, j, i) view on ITK's buffer; the float32 copy is the only full-size allocation.
    view = sitk.GetArrayViewFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        warnings.append(f"{img.GetNumberOfComponentsPerPixel()}-component pixels converted "
                        "to one grayscale channel: luminance 0.299 R + 0.587 G + 0.114 B")
        view = view[..., :3] @ LUMA
    array = np.asarray(view, dtype=np.float32)
    if dim == 2:
        array = array[None]
    array = array.transpose(2, 1, 0)

    spacing = np.ones(3)
    spacing[:dim] = img.GetSpacing()
    direction = np.eye(3)
    direction[:dim, :dim] = np.array(img.GetDirection()).reshape(dim, dim)
    origin = np.zeros(3)
    origin[:dim] = img.GetOrigin()
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = origin

    keys = set(img.GetMetaDataKeys())
    modality, units = _MODALITY.get(img.GetMetaData("Modality").strip()
                                    if "Modality" in keys else "", ("OT", "raw"))
    return Volume(array=array, affine=affine, modality=modality, units=units,
                  series_uid=file_id(path), path=str(path),
                  meta={"format": "metaimage", "pixel_type": img.GetPixelIDTypeAsString()},
                  warnings=warnings)


def _itk_reason(err: Exception) -> str:
    # ITK messages span many lines (file, line, class); the last non-empty one says why.
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reason = next((ln for ln in reversed(lines) if "Description:" in ln), lines[-1] if lines
                  else "unknown error")
    return " ".join(reason.replace("Description:", "").split())
