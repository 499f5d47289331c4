"""Find the image series in a file or folder (the header pass over every file, grouped by
SeriesInstanceUID, each file's frames listed with their image plane and modality LUT) and read
one into a `Volume` (checks, geometry, units, then the decode pool)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from medfound.errors import MedfoundError
from medfound.io.dicom.attributes import (
    _MODALITY,
    _ORIENTATION,
    _PIXEL_SPACING,
    _POSITION,
    _ROWS,
    _SERIES_UID,
    _float,
    _floats,
    _get,
    _int,
    _item,
    _one_line,
    _quiet,
    _raw,
)
from medfound.io.dicom.decode import _check_readable, _decode_frames, _progress
from medfound.io.dicom.geometry import _geometry
from medfound.io.dicom.header import _TOO_LARGE_HINT, _NotDicom, _read_header
from medfound.io.dicom.records import (
    DicomReadError,
    MultipleSeriesError,
    SeriesInfo,
    _Frame,
    _Source,
)
from medfound.io.dicom.units import _LUT_HINT, _BadValue, _lut_value, _rescale, _units
from medfound.io.volume import Volume, voxel_budget

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

# Series-level header facts that later stages use (data card, QC); none of them identifies
# the patient.
_META_KEYWORDS = (
    "Manufacturer", "ManufacturerModelName", "SeriesDescription", "SeriesNumber",
    "StudyInstanceUID", "FrameOfReferenceUID", "BodyPartExamined", "SliceThickness",
    "SpacingBetweenSlices", "KVP", "ConvolutionKernel", "MagneticFieldStrength",
    "RepetitionTime", "EchoTime", "FrameTime", "PatientPosition", "ImageType",
)


def find_series(path: str | Path, *, progress: bool | None = None,
                max_voxels: int | None = None) -> list[SeriesInfo]:
    """Find the image series in a DICOM file or a folder (searched recursively).

    Only headers are read. Files that are not DICOM, and DICOM objects without pixel data
    (DICOMDIR, structured reports, RT plans, ...), are skipped in a folder; given on their own
    they are an error. A file that looks like part of a series but cannot be read (an image
    header cut before its pixel data, a damaged DICOM header, a file named .dcm that is not
    DICOM) is listed in the `unreadable` of its series (by SeriesInstanceUID, else every
    series in its folder), so that reading the series reports it. Declared image sizes are
    checked against `max_voxels` (see `medfound.io.volume.voxel_budget`) before any frame is
    listed. Series are returned ordered by SeriesNumber, then SeriesInstanceUID.
    Raises MedfoundError when the path is missing or unreadable, or holds no image.
    """
    budget = voxel_budget(max_voxels)
    root = Path(path)
    if not root.exists():
        raise MedfoundError("no such file or folder", path=root,
                            hint="check the path (and that the disk is mounted)")
    try:
        files = _walk(root)
    except OSError as err:
        raise MedfoundError(f"cannot list folder: {err.strerror or err}", path=err.filename
                            or root, hint="check the folder exists and you may read it") from err
    if root.is_dir() and not files:
        raise MedfoundError("folder is empty", path=root,
                            hint="point to the folder that holds the DICOM files")

    groups: dict[str, list[tuple[Dataset, _Source]]] = {}
    not_dicom: list[tuple[str, str]] = []
    no_pixels: list[tuple[str, str]] = []
    # (path, why, SeriesInstanceUID or None, sure): `sure` for a damaged file or an image
    # header cut before its pixels; not for an image-class object with no image attributes
    # at all (a header-only stub, as DICOMDIR test sets hold), counted only in its series.
    broken: list[tuple[str, str, str | None, bool]] = []
    with _quiet():
        for file in _progress(files, len(files), "reading headers", progress):
            try:
                ds, source = _read_header(file, budget)
            except _NotDicom as err:
                not_dicom.append((file, str(err)))
                if err.damaged:
                    broken.append((file, str(err), None, True))
                continue
            except OSError as err:
                # Even in a folder: skipping it could silently drop a slice of the series.
                raise MedfoundError(f"cannot read file: {err.strerror or err}", path=file,
                                    hint="check the file exists and you may read it") from err
            if source is None:
                what = _what_is(ds)
                no_pixels.append((file, what))
                if "truncated" in what:  # an image header without its pixels
                    broken.append((file, what, _raw(ds, _SERIES_UID, "text"), _ROWS in ds))
                continue
            groups.setdefault(_raw(ds, _SERIES_UID, "text") or "", []).append((ds, source))

    if not groups:
        raise _no_image_error(root, files, not_dicom, no_pixels)

    series = []
    for uid, members in groups.items():
        first = members[0][0]
        frames = [fr for ds, src in members for fr in _safe_frames_of(ds, src)]
        series.append(SeriesInfo(
            series_uid=uid, modality=str(_get(first, "Modality") or "OT"),
            description=str(_get(first, "SeriesDescription") or ""), count=len(members),
            frames=len(frames), files=[src.path for _, src in members],
            number=_int(_get(first, "SeriesNumber"), None) if "SeriesNumber" in first else None,
            header=first, root=str(root), _frames=frames))
    series.sort(key=lambda s: (s.number is None, s.number or 0, s.series_uid))
    _assign_unreadable(series, broken)
    return series


def _assign_unreadable(series: list[SeriesInfo],
                       broken: list[tuple[str, str, str | None, bool]]) -> None:
    """Give each unreadable file to the series it belongs to: the one with its
    SeriesInstanceUID, else every series with a file in its folder, else every series."""
    by_uid = {s.series_uid: s for s in series}
    folders = [{os.path.dirname(f) for f in s.files} for s in series]
    for path, why, uid, sure in broken:
        if uid in by_uid:
            owners = [by_uid[uid]]
        elif not sure:
            continue
        else:
            owners = [s for s, dirs in zip(series, folders, strict=True)
                      if os.path.dirname(path) in dirs] or series
        for s in owners:
            s.unreadable.append((path, why))


def _what_is(ds: Dataset) -> str:
    sop = ds.get("SOPClassUID") or (ds.file_meta.get("MediaStorageSOPClassUID")
                                    if hasattr(ds, "file_meta") else None)
    if sop == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (media directory)"
    name = getattr(UID(str(sop)), "name", "") if sop else ""
    name = "".join(c for c in str(name) if c.isprintable()).strip()[:64]  # a garbled UID
    if "Rows" in ds:
        return "an image whose file ends before its pixel data (truncated)"
    name = name or "DICOM"
    # "an RT Plan", "an MR image", "a CT image": the article follows the spoken letter.
    article = "an" if name[0] in "AEFHILMNORSX" and (name[:2].isupper() or name[0] in "AEIO") \
        else "a"
    if "Image Storage" in name:  # an image class with no pixels: most likely cut short
        return f"{article} {name} object without pixel data (truncated?)"
    return f"{article} {name} object"


def _no_image_error(root: Path, files: list[str], not_dicom, no_pixels) -> MedfoundError:
    if root.is_file():
        if not_dicom:
            return MedfoundError(not_dicom[0][1], path=root,
                                 hint="give a DICOM file or folder, a .nii/.nii.gz or a .mhd")
        what = no_pixels[0][1]
        if "truncated" in what:
            return MedfoundError("truncated file: it ends before its pixel data", path=root,
                                 hint="copy or export the file again; it was cut short")
        hint = ("pass the folder that holds it" if "DICOMDIR" in what
                else "give an image file or a folder of images")
        return MedfoundError(f"{what}, which has no pixel data", path=root, hint=hint)
    kinds = Counter(w for _, w in no_pixels)
    parts = [f"{len(files)} files, none is a DICOM image"]
    if not_dicom:
        parts.append(f"{len(not_dicom)} not DICOM")
    parts += [f"{n} × {w}" for w, n in kinds.most_common(3)]
    volumes = [f for f, _ in not_dicom if f.lower().endswith((".nii", ".nii.gz", ".mhd", ".mha"))]
    hint = (f"NIfTI and MetaImage files are read one at a time: pass e.g. {volumes[0]}"
            if volumes else "point to the folder that holds the image files")
    return MedfoundError("; ".join(parts), path=root, hint=hint)


def _walk(root: Path) -> list[str]:
    if root.is_file():
        return [str(root)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames.sort()
        out.extend(os.path.join(dirpath, n) for n in sorted(filenames))
    return out


def _raise(err: OSError) -> None:
    raise err


def _frames_of(ds: Dataset, src: _Source) -> list[_Frame]:
    """Every 2D image in one file, with its geometry and rescale (PS3.3 C.7.6.2, C.7.6.16)."""
    slope, intercept, rescaled = _rescale(ds, src)
    if "DoseGridScaling" in ds and _raw(ds, _MODALITY, "text") == "RTDOSE":
        scaling = _lut_value(ds, "DoseGridScaling", "DoseGridScaling")
        if scaling == 0:
            raise _BadValue("DoseGridScaling 0 makes every dose the same value")
        slope, intercept, rescaled = scaling or 1.0, 0.0, True
    position = _floats(_raw(ds, _POSITION, "numbers"), 3)
    orientation = _floats(_raw(ds, _ORIENTATION, "numbers"), 6)
    spacing = _floats(_raw(ds, _PIXEL_SPACING, "numbers"), 2)
    if spacing is None and "ImagerPixelSpacing" in ds:  # radiographs: spacing at the detector
        spacing = _floats(ds.get("ImagerPixelSpacing"), 2)
    spacing_t = None if spacing is None else (float(spacing[0]), float(spacing[1]))
    n = src.frames

    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    if per_frame is not None or shared is not None:  # enhanced multi-frame
        frames = []
        for f in range(n):
            own = per_frame[f] if per_frame is not None and f < len(per_frame) else None
            # A functional group sits in the frame's own item or, for all frames, in shared.
            plane = _item(own, "PlanePositionSequence") or _item(shared, "PlanePositionSequence")
            orient = (_item(own, "PlaneOrientationSequence")
                      or _item(shared, "PlaneOrientationSequence"))
            measures = (_item(own, "PixelMeasuresSequence")
                        or _item(shared, "PixelMeasuresSequence"))
            transform = (_item(own, "PixelValueTransformationSequence")
                         or _item(shared, "PixelValueTransformationSequence"))
            sp = _floats(measures.get("PixelSpacing") if measures else None, 2)
            f_slope, f_intercept, f_given = (_rescale(transform, src, slope, intercept)
                                             if transform else (slope, intercept, rescaled))
            frames.append(_Frame(
                src, f,
                _floats(plane.get("ImagePositionPatient"), 3) if plane else position,
                _floats(orient.get("ImageOrientationPatient"), 6) if orient else orientation,
                (float(sp[0]), float(sp[1])) if sp is not None else spacing_t,
                f_slope, f_intercept, f_given or rescaled))
        return frames

    offsets = _floats(ds.get("GridFrameOffsetVector"), n) if n > 1 else None
    detector = _item(ds, "DetectorInformationSequence")
    if detector is not None and position is None:  # NM: geometry sits with the detector
        position = _floats(detector.get("ImagePositionPatient"), 3)
        orientation = _floats(detector.get("ImageOrientationPatient"), 6)
    if n == 1 or position is None or orientation is None:
        positions = [position] * n if n == 1 else [None] * n
    else:
        normal = np.cross(orientation[:3], orientation[3:])
        if offsets is not None:
            if offsets[0] == 0:  # relative to ImagePositionPatient, along the normal
                positions = [position + o * normal for o in offsets]
            else:  # absolute z (PS3.3 C.8.8.3.2), only defined for axial orientation
                positions = [np.array([position[0], position[1], o]) for o in offsets]
        else:
            step = _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness"))
            positions = ([position + f * step * normal for f in range(n)] if step
                         else [None] * n)
    return [_Frame(src, f, positions[f], orientation if positions[f] is not None else None,
                   spacing_t, slope, intercept, rescaled) for f in range(n)]


def _safe_frames_of(ds: Dataset, src: _Source) -> list[_Frame]:
    try:
        with _quiet():
            return _frames_of(ds, src)
    except _BadValue as err:
        src.refuse(f"invalid modality LUT: {err}", "invalid_rescale", _LUT_HINT)
    except Exception as err:  # noqa: BLE001 - a corrupt header value; reported at read time
        src.refuse(f"bad image header: {_one_line(err)}")
    src.frames = 1
    return [_Frame(src, 0, None, None, None, 1.0, 0.0)]


def read_dicom(path: str | Path, series_uid: str | None = None, *, allow_gaps: bool = False,
               workers: int | None = None, progress: bool | None = None,
               max_voxels: int | None = None) -> Volume:
    """Read one image series from a DICOM file or folder; see `read_series` for the result.

    A folder with several series needs `series_uid`, else MultipleSeriesError lists them.
    """
    series = find_series(path, progress=progress, max_voxels=max_voxels)
    if series_uid is not None:
        chosen = [s for s in series if s.series_uid == series_uid]
        if not chosen:
            known = ", ".join(f"{s.series_uid} ({s.modality})" for s in series[:5])
            raise MedfoundError(f"no image series with SeriesInstanceUID {series_uid}; "
                                f"found {known}" + (", ..." if len(series) > 5 else ""),
                                path=path, hint="run `medfound inspect` on the folder to list "
                                "its series")
        series = chosen
    if len(series) > 1:
        raise MultipleSeriesError(path, series)
    return read_series(series[0], allow_gaps=allow_gaps, workers=workers, progress=progress,
                       max_voxels=max_voxels)


def read_series(series: SeriesInfo, *, allow_gaps: bool = False, workers: int | None = None,
                progress: bool | None = None, max_voxels: int | None = None) -> Volume:
    """Decode one series found by `find_series` into a `Volume`.

    The array is float32 (i, j, k) = (column, row, slice), Fortran-ordered (i varies fastest,
    as in the DICOM pixel data and in ITK), values after the modality LUT: HU for CT; for PET
    body-weight SUV when the header allows, else Bq/ml; Gy for RT dose; "raw" otherwise. Color
    images become their luminance (0.299 R + 0.587 G + 0.114 B). The affine maps (i, j, k, 1)
    to LPS mm. Anything a human should know (gantry tilt, oblique, nominal geometry, color,
    gaps read with allow_gaps) is in `Volume.warnings`, and its category (a fixed word, see
    DicomReadError.kind) at the same place in `Volume.meta["warning_kinds"]`.

    Raises DicomReadError (a MedfoundError) for missing slices or uneven spacing and for files
    of the series that cannot be read (unless allow_gaps: then a warning names them),
    duplicate positions, mixed sizes/orientations, degenerate geometry, invalid modality LUT
    values, a CT series only partly carrying them, truncated or undecodable pixel data, and a
    volume over `max_voxels` (see `medfound.io.volume.voxel_budget`), checked before
    anything is decoded. `workers` threads decode (default: CPU count).
    """
    if workers is not None and workers < 1:
        raise MedfoundError(f"workers must be at least 1, got {workers}",
                            hint="pass workers=N (CLI: --workers N) with N ≥ 1")
    workers = workers or os.cpu_count() or 1
    root = series.root or series.files[0]
    if not series._frames:
        raise MedfoundError("the series has no images", path=root)
    budget = voxel_budget(max_voxels)
    notes: list[tuple[str, str]] = []
    _check_unreadable(series, allow_gaps, notes)
    _check_readable(series._frames, root)
    _check_rescale(series, series._frames)
    first = series._frames[0].source
    voxels = len(series._frames) * first.rows * first.cols
    if voxels > budget:
        raise DicomReadError(
            f"{len(series._frames)} images of {first.cols}×{first.rows} pixels make "
            f"{voxels:,} voxels, over the limit of {budget:,}", path=root, kind="too_large",
            hint=_TOO_LARGE_HINT)
    try:
        with _quiet():
            geometry = _geometry(series, allow_gaps)
            units, factor, unit_notes, unit_meta = _units(series)
            meta = _meta(series, geometry.order)
    except MedfoundError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom converting a corrupt header value
        raise DicomReadError(f"bad header value: {_one_line(err)}", path=root,
                             hint="a header of the series is corrupt; fix or export it "
                             "again") from err
    order = geometry.order
    notes += geometry.warnings + unit_notes

    header = series.header
    modality_lut = (header is not None and "ModalityLUTSequence" in header
                    and "RescaleSlope" not in header)
    first = order[0].source
    photometrics = {f.source.photometric for f in order}
    if any(f.source.samples > 1 or f.source.photometric == "PALETTE COLOR" for f in order):
        notes.append(("color_converted", f"color image ({', '.join(sorted(photometrics))}) "
                      "converted to one grayscale channel: luminance 0.299 R + 0.587 G + "
                      "0.114 B"))
    if "MONOCHROME1" in photometrics:
        notes.append(("monochrome1",
                      "MONOCHROME1: low values display bright; values are kept as stored"))

    shape = (len(order), first.rows, first.cols)  # (k, j, i): C order of the (i, j, k) array
    try:
        buf = np.empty(shape, dtype=np.float32)
    except (MemoryError, ValueError) as err:
        gib = float(np.prod(shape, dtype=np.float64)) * 4 / 2**30
        raise DicomReadError(f"not enough memory for the {gib:.1f} GiB volume", path=root,
                             hint="free memory, read on a larger machine or lower "
                             "max_voxels", kind="too_large") from err

    notes += _decode_frames(order, factor, buf, header, modality_lut, workers, progress)

    return Volume(
        array=buf.transpose(2, 1, 0), affine=geometry.affine, modality=series.modality,
        units=units, series_uid=series.series_uid, path=str(root),
        meta={**meta, **unit_meta,
              "warning_kinds": [kind for kind, _ in notes]},
        warnings=[text for _, text in notes])


def _check_unreadable(series: SeriesInfo, allow_gaps: bool, notes: list[tuple[str, str]]
                      ) -> None:
    """Refuse a series some of whose files cannot be read (wherever they sit in it: an edge
    slice left out shows as no gap), or with allow_gaps note each one."""
    if not series.unreadable:
        return
    n = len(series.unreadable)
    shown = "; ".join(f"{os.path.basename(p)} ({why})" for p, why in series.unreadable[:3])
    message = f"{n} file(s) of the series cannot be read: {shown}" + (", ..." if n > 3 else "")
    if not allow_gaps:
        raise DicomReadError(
            message, path=series.unreadable[0][0], kind="unreadable_files",
            hint="copy or export them again, move them out if they are not part of the "
            "series, or pass allow_gaps=True (CLI: --allow-gaps) to read the series without "
            "them")
    notes.append(("unreadable_files", message + "; read without them (allow_gaps), so the "
                  "volume may lack slices at its ends"))


def _check_rescale(series: SeriesInfo, frames: list[_Frame]) -> None:
    """A CT series whose images do not all carry a modality LUT would mix HU with stored
    values (off by the intercept, often 1024): refuse it, naming a file without one."""
    if series.modality != "CT":
        return
    given = [f.rescaled for f in frames]
    if any(given) and not all(given):
        odd = next(f for f in frames if not f.rescaled)
        raise DicomReadError(
            f"no RescaleIntercept/RescaleSlope in this image while {sum(given)} other "
            "image(s) of the CT series have them: its values would be stored values, not HU",
            path=odd.source.path, kind="invalid_rescale",
            hint="fix or remove this file (or export the series again)")


def _meta(series: SeriesInfo, frames: list[_Frame]) -> dict[str, Any]:
    """JSON-ready series facts for later stages (no patient identifiers)."""
    ds = series.header if series.header is not None else Dataset()
    meta: dict[str, Any] = {}
    with _quiet():
        for keyword in _META_KEYWORDS:
            value = _get(ds, keyword)
            if value is None or value == "":
                continue
            if isinstance(value, MultiValue):
                meta[keyword] = [str(v) for v in value]
            elif isinstance(value, int | float):  # IS and DS values are int/float subclasses
                meta[keyword] = int(value) if isinstance(value, int) else float(value)
            else:
                meta[keyword] = str(value)
    src = frames[0].source
    sop = _get(ds, "SOPClassUID")
    meta.update(sop_class=str(getattr(UID(sop), "name", sop)) if sop else "",
                transfer_syntax=src.transfer_syntax.name, files=series.count,
                frames=len(frames), photometric=src.photometric)
    return meta
