"""Label maps out of the network's grid: onto a study's own grid, into DICOM SEG and NIfTI.

A segmenter labels voxels of its input grid (canonical axes, the model's spacing). A viewer
wants them on the study's grid:

- `labels_on_grid` samples a label map at the voxel centres of another grid (nearest
  neighbour, 0 outside), one slice at a time;
- `labels_on_source_slices` does the same for each DICOM slice's pixel grid, so the frames of
  a DICOM Segmentation line up with the source instances one to one;
- `write_nodule_seg` writes those frames as a binary DICOM Segmentation (highdicom) in the
  source study (same patient and study, a new series) referencing each source instance, with
  the algorithm (model name, version, ONNX sha256) in the segment description; a PACS shows it
  over the series;
- `write_labels_nifti` writes a label map with its geometry (NIfTI is RAS; medfound is LPS);
- `nodule_components` lists the connected components (26-neighbourhood, SimpleITK) of a binary
  map with their volume, centre and equivalent-sphere diameter.

numpy and SimpleITK (highdicom and nibabel are imported when writing), so medfound.infer uses
it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["labels_on_grid", "labels_on_source_slices", "nodule_components", "write_labels_nifti",
           "write_nodule_seg"]

_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _sample(labels: np.ndarray, affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """`labels` (i, j, k) with `affine` at (n, 3) LPS points, nearest voxel; 0 outside."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    ijk = np.rint(points_mm @ inverse[:3, :3].T + inverse[:3, 3]).astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(labels.shape)), axis=1)
    out = np.zeros(len(points_mm), dtype=labels.dtype)
    i, j, k = ijk[inside].T
    out[inside] = labels[i, j, k]
    return out


def labels_on_grid(labels: np.ndarray, affine: np.ndarray, shape: Sequence[int],
                   target_affine: np.ndarray) -> np.ndarray:
    """`labels` (with `affine`) at the voxel centres of a grid of `shape` and `target_affine`."""
    target_affine = np.asarray(target_affine, dtype=np.float64)
    ni, nj, nk = (int(s) for s in shape)
    ii, jj = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    plane = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(np.float64)
    out = np.zeros((ni, nj, nk), dtype=labels.dtype)
    for k in range(nk):
        points = plane @ target_affine[:3, :2].T + k * target_affine[:3, 2] + target_affine[:3, 3]
        out[:, :, k] = _sample(labels, affine, points).reshape(ni, nj)
    return out


def labels_on_source_slices(labels: np.ndarray, affine: np.ndarray,
                            headers: Sequence[Dataset]) -> np.ndarray:
    """(n_slices, rows, columns) labels on each DICOM slice's pixel grid, in `headers` order.

    Pixel (r, c) of a slice sits at ImagePositionPatient + c·Δc·row direction + r·Δr·column
    direction (ImageOrientationPatient's two triplets; PixelSpacing = (Δr, Δc))."""
    frames = []
    for ds in headers:
        pos = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        d_row, d_col = (float(v) for v in ds.PixelSpacing)
        rows, cols = int(ds.Rows), int(ds.Columns)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        points = (pos + np.outer(c.ravel() * d_col, iop[:3]) + np.outer(r.ravel() * d_row, iop[3:]))
        frames.append(_sample(labels, affine, points).reshape(rows, cols))
    return np.stack(frames)


def nodule_components(mask: np.ndarray, affine: np.ndarray) -> list[dict[str, Any]]:
    """Connected components (26-neighbourhood) of a binary map, largest first: ``voxels``,
    ``volume_mm3``, ``center_lps_mm`` (centroid), ``diameter_mm`` (of the sphere of that volume)."""
    import SimpleITK as sitk

    affine = np.asarray(affine, dtype=np.float64)
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    image = sitk.GetImageFromArray((np.asarray(mask) > 0).astype(np.uint8))  # axes as given
    labels = sitk.GetArrayFromImage(sitk.RelabelComponent(  # 1 = the largest, 2 = next, ...
        sitk.ConnectedComponent(image, True), sortByObjectSize=True))  # True: 26-neighbourhood
    out = []
    for label in range(1, int(labels.max()) + 1):
        voxels = np.argwhere(labels == label)
        centre = voxels.mean(axis=0) @ affine[:3, :3].T + affine[:3, 3]
        volume = len(voxels) * voxel_mm3
        out.append({"id": label, "voxels": int(len(voxels)), "volume_mm3": round(volume, 1),
                    "center_lps_mm": [round(float(v), 2) for v in centre],
                    "diameter_mm": round(float(2 * (3 * volume / (4 * np.pi)) ** (1 / 3)), 2)})
    return out


def write_labels_nifti(labels: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """A uint8 NIfTI of `labels` (i, j, k) with its LPS `affine` (stored as RAS, sform and qform)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), _RAS_FROM_LPS @ np.asarray(affine))
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return Path(path)


def write_nodule_seg(frames: np.ndarray, source_headers: Sequence[Dataset], out_path: str | Path, *,
                     algorithm_name: str, algorithm_version: str, model_sha256: str = "",
                     series_number: int = 9902) -> Path:
    """A binary DICOM Segmentation of `frames` ((n, rows, columns), one per source instance in
    `source_headers` order; > 0 = nodule) with one segment, "Nodule". Frames without nodule are
    left out (a study without any keeps one empty frame, so the result still says "looked, none")."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medfound import __version__

    frames = (np.asarray(frames) > 0).astype(np.uint8)
    if frames.shape[0] != len(source_headers):
        raise ValueError(f"{frames.shape[0]} frames for {len(source_headers)} source instances")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version or "0",
        family=codes.DCM.ArtificialIntelligence,
        parameters={"onnx sha256": model_sha256} if model_sha256 else None)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    sources, further = list(source_headers), None
    if not frames.any():  # one empty frame says "looked, none"; every instance is still referenced
        sources, further, frames = sources[:1], sources[1:], frames[:1]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, further_source_images=further or None,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(),
        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medfound", manufacturer_model_name=algorithm_name,
        software_versions=f"medfound {__version__}", device_serial_number="0",
        series_description="medfound nodule segmentation",
        omit_empty_frames=bool(frames.any()))
    out_path = Path(out_path)
    seg.save_as(str(out_path))
    return out_path
