"""DICOM Comprehensive 3D SR measurement reports (TID 1500) of nodule findings, via highdicom.

A PACS viewer shows a finding when the SR points at an image it has: each finding becomes a
planar ROI — a circle of the finding's diameter on the source slice nearest its centre, in that
slice's pixel coordinates — with its diameter (mm) and the detector's certainty (%) as
measurements. The SR joins the source study (same patient and study, a new series), lists every
source instance as evidence, and names the algorithm (model name, version, ONNX sha256).

Only headers are read here (no pixel data); highdicom is imported lazily so that reading studies
never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medfound.errors import MedfoundError

__all__ = ["read_source_headers", "write_nodule_sr"]

_NEEDED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
           "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def read_source_headers(files: Sequence[str | Path], series_uid: str | None = None) -> list[Dataset]:
    """Headers (no pixels) of the image instances of one series, in file order.

    Files that are not DICOM images of `series_uid` (when given) are skipped. Raises
    `MedfoundError` if none is left or one lacks the geometry an SR region needs.
    """
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # not DICOM: NIfTI/MetaImage studies have no instances to reference
            continue
        if series_uid and str(ds.get("SeriesInstanceUID", "")) != series_uid:
            continue
        if "ImagePositionPatient" in ds:
            headers.append(ds)
    if not headers:
        raise MedfoundError("no DICOM image instances to reference in the SR",
                            path=Path(files[0]).parent if files else None,
                            hint="a DICOM SR needs a DICOM source series (NIfTI/MetaImage studies get findings.json only)")
    for ds in headers:
        missing = [k for k in _NEEDED if k not in ds]
        if missing:
            raise MedfoundError(f"source instance lacks {', '.join(missing)}",
                                path=getattr(ds, "filename", None),
                                hint="the SR can only reference images with full plane geometry")
    return headers


def _slice_geometry(headers: Sequence[Dataset]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per instance: position (N, 3), row direction (N, 3), column direction (N, 3), spacing (N, 2)."""
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in headers])
    spacing = np.array([[float(v) for v in ds.PixelSpacing] for ds in headers])  # (row, column) mm
    return pos, iop[:, :3], iop[:, 3:], spacing


def _region_on_nearest_slice(centre: np.ndarray, radius_mm: float, pos, row_dir, col_dir, spacing
                             ) -> tuple[int, np.ndarray]:
    """Index of the slice whose plane is nearest `centre` (LPS mm) and the CIRCLE graphic data
    (centre and one perimeter point, (column, row) pixel coordinates, 0.5 = pixel centre... per
    DICOM: the top-left corner of the top-left pixel is (0, 0))."""
    normal = np.cross(row_dir, col_dir)
    distance = np.abs(np.einsum("nd,nd->n", centre[None] - pos, normal))
    n = int(np.argmin(distance))
    offset = centre - pos[n]
    column = float(offset @ row_dir[n]) / spacing[n, 1] + 0.5  # +0.5: pixel centre → SR pixel space
    row = float(offset @ col_dir[n]) / spacing[n, 0] + 0.5
    r = max(radius_mm / spacing[n, 1], 0.5)
    return n, np.array([[column, row], [column + r, row]], dtype=np.float32)


def _no_nodule_group(hd: Any, codes: Any, algorithm: Any, validated: bool) -> Any:
    """TID 1501 group for a study the detector found nothing in: "Nodule: Absent" from a
    validated model, "Nodule: Indeterminate" from one that is not (its silence proves nothing)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="no nodule found"),
        finding_type=codes.SCT.Nodule, algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=codes.SCT.Nodule, value=codes.SCT.Absent if validated else codes.SCT.Indeterminate)])


def write_nodule_sr(findings: Sequence[dict[str, Any]], source_headers: Sequence[Dataset],
                    out_path: str | Path, *, algorithm_name: str, algorithm_version: str,
                    model_sha256: str = "", series_number: int = 9901, validated: bool = False,
                    use_note: str = "research use only") -> Path:
    """Write a TID 1500 Comprehensive 3D SR of `findings` referencing `source_headers`.

    findings: dicts with ``center_lps_mm`` (x, y, z), ``diameter_mm`` and ``probability``
    (0–1), as `medfound.infer.study` writes them to findings.json. A study without findings
    gets an SR that says so, which a PACS shows as a result with no marks rather than as a
    missing result: "Nodule: Absent" only when `validated` (the export's validation passed),
    else "Nodule: Indeterminate". `use_note` ("research use only", and "NOT VALIDATED" when not
    validated) is carried in the algorithm's parameters and the series description.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    pos, row_dir, col_dir, spacing = _slice_geometry(source_headers)
    status = "validated" if validated else "not validated"
    algorithm = hd.sr.AlgorithmIdentification(
        name=algorithm_name, version=algorithm_version,
        parameters=[f"validation: {status}; {use_note}"]
        + ([f"onnx sha256 {model_sha256}"] if model_sha256 else []))
    groups = []
    for number, finding in enumerate(findings, start=1):
        centre = np.asarray(finding["center_lps_mm"], dtype=np.float64)
        n, graphic = _region_on_nearest_slice(centre, float(finding["diameter_mm"]) / 2,
                                              pos, row_dir, col_dir, spacing)
        src = source_headers[n]
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.CIRCLE, graphic_data=graphic,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=src.SOPClassUID,
                referenced_sop_instance_uid=src.SOPInstanceUID))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"nodule {number}"),
            referenced_region=region,
            finding_type=codes.SCT.Nodule,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Diameter, value=round(float(finding["diameter_mm"]), 2),
                                  unit=codes.UCUM.Millimeter, algorithm_id=algorithm),
                hd.sr.Measurement(name=codes.DCM.CertaintyOfFinding,
                                  value=round(100.0 * float(finding["probability"]), 2),
                                  unit=codes.UCUM.Percent, algorithm_id=algorithm),
            ]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=algorithm_name, manufacturer_name="medfound",
            model_name=f"{algorithm_name} {algorithm_version}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups or [_no_nodule_group(hd, codes, algorithm, validated)])
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(source_headers), content=report[0],
        series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medfound",
        series_description=f"{algorithm_name} CAD findings{'' if validated else ' NOT VALIDATED'}"[:64],
        is_complete=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    sr.save_as(tmp, enforce_file_format=True)
    tmp.replace(out_path)
    return out_path
