"""Data card: what a center may share with a federation before any training.

A card summarises a center's folder (one subfolder per case) without PHI: modalities, case and
series counts, vendors, spacing and thickness ranges, intensity statistics after the modality
LUT, annotation counts with a nodule-size histogram, and QC warnings. It names no patient, no
date, no institution, no UID and no file path: cases are referred to by their position in
sorted order ("case 3"), since real folder names are often patient names or accession numbers,
and a QC warning is a category (a fixed word, with the PHI attribute names it found), never a
reader message, which can quote file names and header values.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medfound import __version__
from medfound.errors import MedfoundError
from medfound.io.dicom import find_series, read_series

# What marks a folder as a center's (beside its case folders).
_CENTER_MARKERS = ("annotations.csv", "center.json")

# LUNA16-style nodule size bins (mm); the last bin is closed.
SIZE_BINS_MM = (3.0, 4.0, 6.0, 8.0, 10.0, 20.0, 30.0)
# Voxels sampled per series for intensity statistics (a strided subsample, deterministic).
_SAMPLES_PER_SERIES = 200_000
# Header attributes that identify a patient; any non-empty one, without PatientIdentityRemoved,
# means the data has not been de-identified.
_PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs",
                 "PatientAddress", "AccessionNumber", "InstitutionName",
                 "ReferringPhysicianName")
_BURNED_IN_MODALITIES = {"US", "OT", "SC", "XC", "ES"}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# The reader's categories (DicomReadError.kind, Volume.meta["warning_kinds"]) a card shows;
# any other is counted as "other" (an error) or "reader_note" (a warning).
_QC_KINDS = {
    "gantry_tilt", "oblique", "gaps_or_uneven_spacing", "duplicate_positions",
    "mixed_geometry", "nominal_geometry", "color_converted", "orientation_not_orthonormal",
    "suv_not_computed", "monochrome1", "decoder_warning", "unreadable_files", "truncated",
    "too_large", "bad_header", "invalid_rescale", "invalid_geometry", "undecodable",
    "unsupported_codec",
}


def _error_kind(err: MedfoundError) -> str:
    kind = getattr(err, "kind", None)
    return kind if kind in _QC_KINDS else "unreadable"


def _warning_kinds(vol) -> list[str]:
    kinds = vol.meta.get("warning_kinds") or []
    kinds = list(kinds) + ["reader_note"] * (len(vol.warnings) - len(kinds))
    return [k if k in _QC_KINDS else "reader_note" for k in kinds[:len(vol.warnings)]]


def _range(values: list[float]) -> list[float] | None:
    return [round(float(min(values)), 4), round(float(max(values)), 4)] if values else None


def _case_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_not_a_folder_of_centers(root: Path, cases: list[Path]) -> None:
    """A folder whose subfolders are centers (each with its own annotations.csv or
    center.json) is not a center: its "cases" would be whole centers."""
    if any((root / m).exists() for m in _CENTER_MARKERS):
        return
    centers = [c for c in cases if any((c / m).is_file() for m in _CENTER_MARKERS)]
    if centers:
        raise MedfoundError(
            f"not a center folder: {len(centers)} of its {len(cases)} subfolders are centers "
            f"(they hold {' / '.join(_CENTER_MARKERS)}), not cases", path=root,
            hint=f"run `medfound center card` on one center, e.g. {centers[0]}")


def _read_annotations(root: Path) -> list[float] | None:
    path = root / "annotations.csv"
    if not path.exists():
        return None
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "diameter_mm" not in reader.fieldnames:
            raise MedfoundError("annotations.csv has no diameter_mm column", path=path,
                                hint="use LUNA16 columns seriesuid,coordX,coordY,coordZ,diameter_mm")
        return [float(row["diameter_mm"]) for row in reader]


def _get(header, keyword: str):
    """header.get(keyword) as text-ready value, None where pydicom cannot convert it."""
    try:
        return header.get(keyword)
    except Exception:  # noqa: BLE001 - a corrupt header value counts as absent
        return None


def _phi_present(header) -> list[str]:
    if header is None or str(_get(header, "PatientIdentityRemoved") or "").upper() == "YES":
        return []
    return [k for k in _PHI_KEYWORDS if str(_get(header, k) or "").strip()]


def _burned_in_reason(header, modality: str) -> str | None:
    if header is None:
        return None
    if str(_get(header, "BurnedInAnnotation") or "").upper() == "YES":
        return "BurnedInAnnotation=YES"
    if modality in _BURNED_IN_MODALITIES:
        return f"modality {modality}"
    if str(_get(header, "SOPClassUID") or "").startswith(_SECONDARY_CAPTURE):
        return "secondary capture"
    return None


def _padding_value(header) -> float | None:
    """PixelPaddingValue after the modality LUT, as the reader's values carry it."""
    if header is None or _get(header, "PixelPaddingValue") is None:
        return None
    pad = _get(header, "PixelPaddingValue")
    pad = pad[0] if isinstance(pad, list | tuple) else pad
    try:
        slope = float(_get(header, "RescaleSlope") or 1)
        return float(pad) * slope + float(_get(header, "RescaleIntercept") or 0)
    except (TypeError, ValueError):
        return None


def data_card(center_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Summarise a center's folder (one subfolder per case) into a PHI-free card.

    Intensities are after the modality LUT (HU for CT). Spacing is in mm: in-plane pixel
    spacing, the slice step from positions, and the SliceThickness header. QC warnings come
    from the reader (gaps, tilt, oblique, ...) and from headers (PHI present, burned-in text).
    """
    root = Path(center_dir)
    if not root.is_dir():
        raise MedfoundError("not a folder", path=root,
                            hint="give a center folder holding one subfolder per case")
    cases = _case_dirs(root)
    if not cases:
        raise MedfoundError("no case folders", path=root,
                            hint="a center folder holds one subfolder per case")
    _check_not_a_folder_of_centers(root, cases)

    per_mod: dict[str, dict[str, Any]] = defaultdict(lambda: {
        "series": 0, "cases": set(), "images": 0, "pixel_spacing_mm": [], "slice_spacing_mm": [],
        "slice_thickness_mm": [], "slices": [], "units": Counter(), "samples": [],
        "padding": []})
    vendors: Counter = Counter()
    qc: list[dict[str, Any]] = []
    qc_counts: Counter = Counter()

    def warn(case_no: int, modality: str, kind: str, detail: str = "") -> None:
        # `detail` is medfound's own wording (attribute names, fixed reasons), never the
        # center's text.
        qc.append({"case": case_no, "modality": modality, "kind": kind, "detail": detail})
        qc_counts[kind] += 1

    for case_no, case in enumerate(tqdm(cases, desc="data card", unit="case",
                                        disable=not progress)):
        try:
            series_list = find_series(case, progress=False)
        except MedfoundError as err:
            warn(case_no, "", _error_kind(err))
            continue
        for info in series_list:
            mod = _modality(info.modality)
            stats = per_mod[mod]
            stats["series"] += 1
            stats["cases"].add(case_no)
            stats["images"] += info.frames
            hdr = info.header
            if hdr is not None:
                vendor = " ".join(str(_get(hdr, k) or "").strip()
                                  for k in ("Manufacturer", "ManufacturerModelName")).strip()
                # Device names only (LO values, ≤ 64 characters each), printable.
                vendor = "".join(c for c in vendor if c.isprintable())[:129]
                vendors[vendor or "unknown"] += 1
                thickness = _get(hdr, "SliceThickness")
                try:
                    if thickness not in (None, "") and np.isfinite(float(thickness)):
                        stats["slice_thickness_mm"].append(float(thickness))
                except (TypeError, ValueError):
                    pass
            phi = _phi_present(hdr)
            if phi:
                warn(case_no, mod, "phi_present", "not de-identified: " + ", ".join(phi))
            reason = _burned_in_reason(hdr, mod)
            if reason:
                warn(case_no, mod, "burned_in_risk", reason)
            reported = set()
            try:
                vol = read_series(info, allow_gaps=False, progress=False)
            except MedfoundError as err:
                kind = _error_kind(err)
                warn(case_no, mod, kind)
                if kind not in ("gaps_or_uneven_spacing", "unreadable_files"):
                    continue
                reported.add(kind)
                try:  # summarised as read with its gaps, the files that cannot be left out
                    vol = read_series(info, allow_gaps=True, progress=False)
                except MedfoundError as again:
                    if _error_kind(again) not in reported:
                        warn(case_no, mod, _error_kind(again))
                    continue
            for kind in _warning_kinds(vol):
                if kind not in reported:  # already reported from the error
                    warn(case_no, mod, kind)
            sp = vol.spacing
            stats["pixel_spacing_mm"] += [sp[0], sp[1]]
            if vol.shape[2] > 1:
                stats["slice_spacing_mm"].append(sp[2])
            stats["slices"].append(vol.shape[2])
            stats["units"][vol.units] += 1
            flat = vol.array.reshape(-1, order="A")
            step = max(1, flat.size // _SAMPLES_PER_SERIES)
            sample = np.asarray(flat[::step], dtype=np.float32)
            padded = _padding_value(hdr)
            if padded is not None:
                # Outside the reconstruction circle: not tissue, so not part of the statistics.
                keep = sample != np.float32(padded)
                stats["padding"].append(1.0 - keep.mean())
                sample = sample[keep]
            stats["samples"].append(sample)

    modalities = {}
    for mod, s in sorted(per_mod.items()):
        samples = np.concatenate(s["samples"]) if s["samples"] else np.zeros(0, np.float32)
        intensity = None
        if samples.size:
            p = np.percentile(samples, [1, 50, 99])
            intensity = {"mean": round(float(samples.mean()), 3),
                         "std": round(float(samples.std()), 3),
                         "p01": round(float(p[0]), 3), "p50": round(float(p[1]), 3),
                         "p99": round(float(p[2]), 3)}
        modalities[mod] = {
            "series": s["series"], "cases": len(s["cases"]), "images": s["images"],
            "units": s["units"].most_common(1)[0][0] if s["units"] else None,
            "pixel_spacing_mm": _range(s["pixel_spacing_mm"]),
            "slice_spacing_mm": _range(s["slice_spacing_mm"]),
            "slice_thickness_mm": _range(s["slice_thickness_mm"]),
            "slices": [int(min(s["slices"])), int(max(s["slices"]))] if s["slices"] else None,
            "intensity": intensity,
            "padding_fraction": (round(float(np.mean(s["padding"])), 4) if s["padding"]
                                 else None),
        }

    diameters = _read_annotations(root)
    annotations = None
    if diameters is not None:
        d = np.asarray(diameters, dtype=float)
        counts, _ = np.histogram(np.clip(d, SIZE_BINS_MM[0], SIZE_BINS_MM[-1]), bins=SIZE_BINS_MM)
        annotations = {
            "nodules": int(d.size),
            "diameter_mm": ({"min": round(float(d.min()), 2), "median": round(float(np.median(d)), 2),
                             "max": round(float(d.max()), 2)} if d.size else None),
            "size_histogram": {"bins_mm": list(SIZE_BINS_MM), "counts": [int(c) for c in counts]},
        }

    return {
        "card_version": 1,
        "medfound_version": __version__,
        "center": root.name,
        "cases": len(cases),
        "series": sum(m["series"] for m in modalities.values()),
        "modalities": modalities,
        "vendors": dict(vendors.most_common()),
        "annotations": annotations,
        "qc": {"counts": dict(qc_counts), "warnings": qc},
    }


_MODALITIES = {"CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "OT", "SC", "XC",
               "ES", "RTDOSE", "SEG", "OP", "IO", "PX", "GM", "SM", "BI", "OPT", "IVOCT", "IVUS"}


def _modality(value: str) -> str:
    """The DICOM Modality code, or "other": a card carries no free text from a header."""
    code = str(value or "OT").strip().upper()
    return code if code in _MODALITIES else "other"


def format_card(card: dict[str, Any]) -> str:
    """The card as text for a terminal."""
    lines = [f"Data card — {card['center']}  (medfound {card['medfound_version']})",
             f"  cases {card['cases']}, series {card['series']}"]
    for mod, m in card["modalities"].items():
        lines.append(f"  {mod}: {m['series']} series in {m['cases']} cases, {m['images']} images,"
                     f" units {m['units']}")
        lines.append(f"      pixel spacing {m['pixel_spacing_mm']} mm, slice spacing "
                     f"{m['slice_spacing_mm']} mm, thickness {m['slice_thickness_mm']} mm, "
                     f"slices {m['slices']}")
        if m["intensity"]:
            i = m["intensity"]
            lines.append(f"      intensity mean {i['mean']:.1f} ± {i['std']:.1f}, "
                         f"p01/p50/p99 {i['p01']:.1f}/{i['p50']:.1f}/{i['p99']:.1f}")
    lines.append("  vendors: " + ", ".join(f"{v} ×{n}" for v, n in card["vendors"].items()))
    a = card["annotations"]
    if a:
        lines.append(f"  nodules: {a['nodules']}"
                     + (f", diameter {a['diameter_mm']['min']}–{a['diameter_mm']['max']} mm "
                        f"(median {a['diameter_mm']['median']})" if a["diameter_mm"] else ""))
        bins = a["size_histogram"]["bins_mm"]
        lines.append("      sizes " + "  ".join(
            f"{lo:g}–{hi:g}:{c}" for lo, hi, c in zip(bins[:-1], bins[1:],
                                                     a["size_histogram"]["counts"], strict=True)))
    else:
        lines.append("  nodules: no annotations.csv")
    q = card["qc"]
    if q["warnings"]:
        lines.append("  QC: " + ", ".join(f"{k} ×{n}" for k, n in q["counts"].items()))
        grouped: dict[tuple[str, str, str], list[int]] = defaultdict(list)
        for w in q["warnings"]:
            grouped[(w["kind"], w["modality"], w["detail"])].append(w["case"])
        for n, ((kind, mod, detail), cases) in enumerate(grouped.items()):
            if n == 10:
                lines.append(f"      ... {len(grouped) - 10} more (see --json)")
                break
            which = ", ".join(str(c) for c in cases[:12]) + (" ..." if len(cases) > 12 else "")
            lines.append(f"      {kind} {mod} (case {which})" + (f": {detail}" if detail else ""))
    else:
        lines.append("  QC: no warnings")
    return "\n".join(lines)
