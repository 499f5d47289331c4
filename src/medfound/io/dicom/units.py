"""Pixel values and their units: the modality LUT (RescaleSlope and RescaleIntercept, per
frame in a multi-frame object), the units it gives by modality (HU, Gy, Bq/ml, counts) and
PET body-weight SUV from the radiopharmaceutical, weight and decay correction."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from medfound.io.dicom.attributes import _INTERCEPT, _SLOPE, _float, _item
from medfound.io.dicom.records import SeriesInfo, _Source


class _BadValue(ValueError):
    """A modality LUT value that cannot be used: its message names the attribute."""


_LUT_HINT = ("fix or remove this file: its values cannot be turned into the modality's units "
             "(HU for CT) without a valid RescaleSlope and RescaleIntercept")


def _lut_value(ds: Dataset | None, key: int | str, name: str) -> float | None:
    """One modality LUT number (RescaleSlope, RescaleIntercept, DoseGridScaling): None when
    absent or empty; _BadValue when it is not one finite number."""
    elem = None if ds is None else ds.get_item(key)
    value = None if elem is None else elem.value
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, bytes):
        text = value.decode("latin-1")
    elif isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip(" \x00")
    if not text:
        return None
    shown = repr(text[:24] + ("..." if len(text) > 24 else ""))
    try:
        number = float(text)
    except ValueError:
        raise _BadValue(f"{name} {shown} is not a number") from None
    if not np.isfinite(number):
        raise _BadValue(f"{name} {shown} is not a finite number")
    return number


def _rescale(ds: Dataset | None, src: _Source, slope: float | None = None,
             intercept: float | None = None) -> tuple[float, float, bool]:
    """(slope, intercept, given) of a header or functional group item, `slope`/`intercept`
    where it gives none; _BadValue for a slope of 0 or values past float32's range."""
    s = _lut_value(ds, _SLOPE, "RescaleSlope")
    i = _lut_value(ds, _INTERCEPT, "RescaleIntercept")
    given = s is not None or i is not None
    s = s if s is not None else (slope if slope is not None else 1.0)
    i = i if i is not None else (intercept if intercept is not None else 0.0)
    if s == 0:
        raise _BadValue("RescaleSlope 0 makes every pixel the same value")
    if abs(s) * 2.0 ** min(src.bits_stored, 64) + abs(i) > 1e38:
        raise _BadValue(f"RescaleSlope {s:g} and RescaleIntercept {i:g} take the values "
                        "past the range of float32")
    return s, i, given


def _parse_time(tm: Any) -> float | None:
    """DICOM TM ("HHMMSS.FFFFFF", colons tolerated) → seconds since midnight."""
    text = str(tm or "").strip().replace(":", "")
    if len(text) < 2 or not text[:2].isdigit():
        return None
    try:
        return int(text[0:2]) * 3600 + int(text[2:4] or 0) * 60 + float(text[4:] or 0)
    except ValueError:
        return None


def _parse_datetime(date: Any, tm: Any) -> datetime | None:
    """DICOM DA + TM (or one DT in `date`, `tm` None) → naive datetime; None if unparsable."""
    text = str(date or "").strip()
    if tm is None:  # DT: YYYYMMDDHHMMSS.FFFFFF, optionally with a &ZZXX UTC offset
        text, tm = text[:8], text[8:].split("+")[0].split("-")[0]
    if len(text) != 8 or not text.isdigit():
        return None
    seconds = _parse_time(tm)
    if seconds is None:
        return None
    try:
        return datetime.strptime(text, "%Y%m%d") + timedelta(seconds=seconds)
    except ValueError:
        return None


def _suv_factor(ds: Dataset) -> tuple[float | None, str, dict[str, Any]]:
    """Body-weight SUV = Bq/ml × weight (g) / injected dose decayed to the image's time (Bq).

    Assumes 1 g/ml tissue. Returns (factor or None, why not, facts for Volume.meta).
    """
    info = _item(ds, "RadiopharmaceuticalInformationSequence")
    if info is None:
        return None, "no RadiopharmaceuticalInformationSequence", {}
    dose = _float(info.get("RadionuclideTotalDose"))
    half_life = _float(info.get("RadionuclideHalfLife"))
    weight = _float(ds.get("PatientWeight"))
    decay = str(ds.get("DecayCorrection") or "").upper()
    # (The word "missing" is kept out of these notes: QC reads it as missing slices.)
    missing = [name for name, v in (("RadionuclideTotalDose", dose),
                                    ("RadionuclideHalfLife", half_life),
                                    ("PatientWeight", weight)) if not v or v <= 0]
    if missing:
        return None, f"{', '.join(missing)} absent or zero", {}
    facts: dict[str, Any] = {"injected_dose_bq": dose, "half_life_s": half_life,
                             "weight_kg": weight, "decay_correction": decay}
    if decay == "ADMIN":  # already decay-corrected to the injection time
        elapsed = 0.0
    elif decay == "START":
        injected = (_parse_datetime(info.get("RadiopharmaceuticalStartDateTime"), None)
                    or _parse_datetime(ds.get("SeriesDate") or ds.get("AcquisitionDate"),
                                       info.get("RadiopharmaceuticalStartTime")))
        started = (_parse_datetime(ds.get("SeriesDate"), ds.get("SeriesTime"))
                   or _parse_datetime(ds.get("AcquisitionDate"), ds.get("AcquisitionTime")))
        if injected is None or started is None:
            return None, "injection or series start time not given", {}
        elapsed = (started - injected).total_seconds()
        if elapsed < 0 and "RadiopharmaceuticalStartDateTime" not in info:
            elapsed += 86400  # injected before midnight, scanned after it
        if not 0 <= elapsed < 86400:
            return None, f"implausible time from injection to scan ({elapsed:.0f} s)", {}
    else:
        return None, f"DecayCorrection '{decay}' (need START or ADMIN)", {}
    decayed = dose * 2.0 ** (-elapsed / half_life)
    factor = weight * 1000.0 / decayed if decayed > 0 else float("inf")
    if not np.isfinite(factor):
        return None, (f"the dose decays to nothing in {elapsed:.0f} s with a half-life of "
                      f"{half_life:g} s"), {}
    facts.update(decay_time_s=elapsed, suv_factor=factor)
    return factor, "", facts


def _units(series: SeriesInfo) -> tuple[str, float, list[tuple[str, str]], dict[str, Any]]:
    """What the values are after the modality LUT, and a factor that turns them into it."""
    ds = series.header if series.header is not None else Dataset()
    modality = series.modality
    if modality == "CT":
        return "HU", 1.0, [], {}
    if modality == "RTDOSE":
        units = str(ds.get("DoseUnits") or "").upper()
        return {"GY": "Gy", "RELATIVE": "relative"}.get(units, units or "raw"), 1.0, [], {}
    if modality == "PT":
        units = str(ds.get("Units") or "").upper()
        if units == "BQML":
            factor, why, facts = _suv_factor(ds)
            if factor is not None:
                return "SUV", factor, [], {"suv": facts}
            return "Bq/ml", 1.0, [("suv_not_computed",
                                   f"SUV not computed ({why}); values are Bq/ml")], {}
        known = {"GML": "SUV", "CNTS": "counts", "": "raw"}
        return known.get(units, units), 1.0, [], {}
    if modality == "NM":
        return "counts", 1.0, [], {}
    return "raw", 1.0, [], {}
