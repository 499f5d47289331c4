"""De-identify DICOM files: PS3.15 Annex E basic profile and options, keyed UIDs, per-patient shifts.

`deidentify(IN, OUT)` copies every DICOM file under IN to the same relative path under OUT with
the Basic Application Level Confidentiality Profile applied (Table E.1-1 as data in
`deid_profile`) plus the options chosen by name (`deid_profile.OPTIONS`; by default Retain
Longitudinal Temporal Information with Modified Dates), at every depth of nested sequences:

- attributes the table lists are removed, emptied or replaced as it says, a selected option's
  action replacing the basic one; every private attribute is removed, and so are curves (50xx)
  and whole overlay planes (60xx: Overlay Data alone would leave a broken overlay behind) unless
  Clean Graphics keeps them;
- UIDs the table marks U become "2.25.<int>" UIDs built from HMAC-SHA256 under the center's
  secret key, so one input UID maps to one output UID everywhere (the slices of a series keep
  sharing one SeriesInstanceUID, an SR's or a SEG's references keep pointing at the
  de-identified images, in any run under the same key). SOP Class and Transfer Syntax UIDs are
  kept; Retain UIDs keeps every UID;
- PatientID and PatientName become a keyed pseudonym of the PatientID (the same patient gets the
  same pseudonym on every run under one key);
- Modified Dates (the default): every date, time and date-time the table lets the option clean,
  and every one it does not list, moves by one per-patient offset (keyed on the key and the
  PatientID): whole days in -MAX_SHIFT_DAYS..-1 plus seconds in 0..86399 earlier. A DT, and a
  date with its time (StudyDate with StudyTime, ContentDate with ContentTime, ...), move as one
  instant; a date without a time moves by the whole days, a time without a date by the seconds
  (modulo a day). Intervals within a patient survive. Attributes the option does not cover
  (GPS Time Stamp, the birth date) get their basic action. Full Dates keeps them;
  ``remove_dates`` (no date option) removes or empties them as the basic profile says, with a
  dummy (19000101, 000000) where the action allows D, so that a Type 1 date (an SR's
  ContentDate, the Date of an SR DATE item) stays valid;
- an action that asks a sequence for a dummy value (D, X/D, Z/D, X/Z/D) keeps its items with
  every value replaced by a dummy of its VR (UIDs remapped, standard UIDs kept), so a Type 1
  sequence stays valid and says nothing. An SR content tree (Content Sequence, whose action is
  D) is cleaned item by item instead: the table's actions inside each item (names and the free
  text of TEXT items replaced, dates shifted, UIDs remapped), strings the table does not list
  cleaned of the file's identifiers; codes, measurements, coordinates and references stay, and
  the file records the Clean Structured Content option (113104) for it. X/Z/U* keeps the
  sequence and cleans it inside. Z empties, X removes;
- C ("clean") replaces the file's own identifiers found in a string (patient name parts, IDs,
  accession number, birth date, institution, physicians, station) by "ANONYMIZED": descriptors
  keep what they say about the study. It is a list match, not an understanding of free text;
  the report says so;
- PatientIdentityRemoved, DeidentificationMethod, DeidentificationMethodCodeSequence (CID 7050:
  113100 and a code for each option applied) and LongitudinalTemporalInformationModified record
  what was done.

Pixel data is never touched, so images whose pixels may show text (burned-in annotation,
ultrasound, secondary capture) are listed in the report for a person to review.

Safety: IN is only read. OUT must be new or empty and may not contain IN or lie inside it; each
file is written to a short hidden temporary name in its folder and renamed, so an interrupted
run leaves whole files only (a killed process may leave a hidden *.partial file, never a half
file under a real name). Files that are not DICOM are skipped and counted, never copied, and
so are entries that are not regular files and links to files outside IN (never opened); a file
that cannot be read, de-identified or written is counted as failed with its reason, and the run
goes on with the rest. OUT/deid_report.json says what was done; the pseudonym map (original →
new) is written only where asked, outside OUT, for the center to keep.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
from tqdm import tqdm

from medfound import __version__
from medfound.errors import MedfoundError
from medfound.io.deid_profile import (
    BASIC_PROFILE_CODE,
    FULL_DATES,
    MODIFIED_DATES,
    OPTIONS_BY_NAME,
    STRUCTURED_CONTENT,
    TABLE_SOURCE,
    ProfileOption,
    action_for,
    select_options,
)

PROFILE_NAME = "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile"
REPORT_NAME = "deid_report.json"
KEY_BYTES = 32  # size of a new key
MIN_KEY_BYTES = 16  # shortest key accepted from a key file
MAX_SHIFT_DAYS = 365  # dates move back by 1..MAX_SHIFT_DAYS whole days
DAY_SECONDS = 86400

# What the profile's action codes resolve to (see the module docstring).
KEEP, REMOVE, EMPTY, REPLACE, NEW_UID, CLEAN_ITEMS, DUMMY_ITEMS, CLEAN = (
    "keep", "remove", "empty", "replace", "new_uid", "clean_items", "dummy_items", "clean")
SHIFT = "shift"

# Dummy values by VR for D: valid for the VR, and saying plainly that they are not data.
DUMMY_VALUES: dict[str, Any] = {
    "AE": "ANONYMOUS", "AS": "000D", "CS": "ANONYMIZED", "DA": "19000101",
    "DS": "0", "DT": "19000101000000", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED",
    "PN": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED", "TM": "000000",
    "UC": "ANONYMIZED", "UT": "ANONYMIZED", "UR": "", "OB": b"\0\0", "OW": b"\0\0", "UN": b"\0\0",
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "SV": 0, "UL": 0, "US": 0, "UV": 0,
}
SCRUBBED = "ANONYMIZED"
TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
MAX_LENGTH = {"AE": 16, "LO": 64, "SH": 16, "CS": 16}  # per value, where truncation may be needed

TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
PATIENT_ID, PATIENT_NAME = 0x00100020, 0x00100010
CONTENT_SEQUENCE = 0x0040A730
STANDARD_UID_ROOT = "1.2.840.10008."  # SOP classes, transfer syntaxes, coding schemes: kept
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
SECONDARY_CAPTURE_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # and .7.1-.7.4, its multi-frame kinds

# Whose values the C (clean) action removes from strings: the file's own identifiers.
IDENTIFIER_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate", "PatientAddress",
    "PatientTelephoneNumbers", "AccessionNumber", "StudyID", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord", "RequestingPhysician", "MilitaryRank", "BranchOfService")


@dataclass
class _Run:
    """What one `deidentify` call learns and counts as it goes through the files."""

    key: bytes
    options: tuple[ProfileOption, ...] = (MODIFIED_DATES,)
    uids: dict[str, str] = field(default_factory=dict)  # original → new, every U attribute
    patients: dict[str, str] = field(default_factory=dict)  # original PatientID → pseudonym
    studies: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)
    removed: Counter = field(default_factory=Counter)  # by attribute keyword
    emptied: Counter = field(default_factory=Counter)
    replaced: Counter = field(default_factory=Counter)
    cleaned: Counter = field(default_factory=Counter)  # C: identifiers taken out of a string
    private_removed: int = 0
    dates_shifted: int = 0
    dates_unreadable: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)  # by reason
    failed: list[dict] = field(default_factory=list)  # [{path, reason}], IN-relative
    burned_in: list[dict] = field(default_factory=list)  # [{path, reason}], OUT-relative
    files_with_warnings: int = 0
    structured_content: int = 0  # files whose SR content tree was cleaned item by item
    phi_paths: int = 0  # output paths that contain the file's own patient ID or name

    @property
    def dates(self) -> str:
        """"modified", "full" or "removed": what happens to dates and times."""
        if MODIFIED_DATES in self.options:
            return "modified"
        return "full" if FULL_DATES in self.options else "removed"

    def has(self, name: str) -> bool:
        return OPTIONS_BY_NAME[name] in self.options


@dataclass
class _File:
    """Per-file state: the patient's time shift, the identifiers that C takes out of strings."""

    days: int  # whole-day part of the shift (negative)
    seconds: int  # seconds part of the shift (negative, > -DAY_SECONDS)
    identifiers: tuple[str, ...] = ()
    structured: bool = False  # an SR content tree was cleaned item by item
    graphics_kept: bool = False  # overlay or curve planes kept under Clean Graphics

    @property
    def shift(self) -> timedelta:
        return timedelta(days=self.days, seconds=self.seconds)


# --- keyed derivations ------------------------------------------------------------------


def _keyed(key: bytes, domain: str, value: str) -> bytes:
    """HMAC-SHA256 of `value` under `key`, separated by `domain` so uses never collide."""
    return hmac.new(key, f"{domain}\0{value}".encode(), hashlib.sha256).digest()


def keyed_uid(uid: str, key: bytes) -> str:
    """The de-identified UID for `uid` under `key`: "2.25." + a 128-bit integer (≤ 44 chars).

    The integer is a UUID (RFC 9562 version 8, "custom") filled from the keyed hash, which is
    what the 2.25 arc requires. Use it to map other records of the center (e.g. the `seriesuid`
    column of an annotation CSV) to the UIDs `deidentify` wrote.
    """
    n = int.from_bytes(_keyed(key, "uid", uid.strip().rstrip("\0"))[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8
    n = (n & ~(0x3 << 62)) | (0x2 << 62)  # RFC variant
    return f"2.25.{n}"


def patient_pseudonym(patient_id: str, key: bytes) -> str:
    """The pseudonym written as PatientID and PatientName for `patient_id` under `key`."""
    return "ANON" + _keyed(key, "patient", patient_id.strip()).hex()[:16].upper()


def date_shift_days(patient_id: str, key: bytes) -> int:
    """Whole days (in -MAX_SHIFT_DAYS..-1) that all dates of `patient_id` move by under `key`."""
    h = int.from_bytes(_keyed(key, "date-shift", patient_id.strip())[:8], "big")
    return -(1 + h % MAX_SHIFT_DAYS)


def time_shift_seconds(patient_id: str, key: bytes) -> int:
    """Seconds (in -86399..0) that the times of `patient_id` move by, on top of the days."""
    h = int.from_bytes(_keyed(key, "time-shift", patient_id.strip())[:8], "big")
    return -(h % DAY_SECONDS)


def patient_shift(patient_id: str, key: bytes) -> timedelta:
    """The whole offset (days and seconds) that the instants of `patient_id` move by."""
    return timedelta(days=date_shift_days(patient_id, key),
                     seconds=time_shift_seconds(patient_id, key))


# --- one dataset ------------------------------------------------------------------------


def resolve_action(code: str, vr: str) -> str:
    """What medfound does for a basic-profile action `code` on an attribute of VR `vr`.

    Compound codes resolve to the choice that keeps any IOD valid (module docstring).
    """
    if code == "K":
        return KEEP
    if code == "C":
        return CLEAN
    if code == "X":
        return REMOVE
    if code in ("Z", "X/Z"):
        return EMPTY
    if code == "X/Z/U*":
        return CLEAN_ITEMS if vr == "SQ" else NEW_UID if vr == "UI" else EMPTY
    # U, D, Z/D, X/D, X/Z/D: a value has to stay.
    if vr == "SQ":
        return DUMMY_ITEMS
    if vr == "UI":
        return NEW_UID
    return REPLACE


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _map_values(value: Any, fn: Callable[[str], str]) -> Any:
    """Apply `fn` to each non-empty string of a single or multi-valued element value."""
    if value is None or value == "":
        return value
    if isinstance(value, (list, tuple, MultiValue)):
        return [fn(str(v)) if v not in (None, "") else "" for v in value]
    return fn(str(value))


def _new_uid(run: _Run, uid: str) -> str:
    uid = uid.strip().rstrip("\0")
    if uid not in run.uids:
        run.uids[uid] = keyed_uid(uid, run.key)
    return run.uids[uid]


def _parse_time(text: str) -> tuple[int, str] | None:
    """A TM value as (seconds since midnight, fraction digits), None when it is not a time."""
    text = text.strip().replace(":", "")  # ACR-NEMA "HH:MM:SS"
    main, _, frac = text.partition(".")
    if len(main) not in (2, 4, 6) or not main.isdigit() or (frac and not frac.isdigit()):
        return None
    hh, mm, ss = int(main[:2]), int(main[2:4] or 0), int(main[4:6] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        return None
    return hh * 3600 + mm * 60 + min(ss, 59), frac


def _format_time(seconds: int, frac: str) -> str:
    seconds %= DAY_SECONDS
    out = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    return out + (f".{frac}" if frac else "")


def _parse_date(text: str) -> date | None:
    text = text.strip()
    if len(text) == 10 and text[4] == text[7] == ".":  # ACR-NEMA "YYYY.MM.DD"
        text = text.replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _shift_da(value: str, f: _File) -> str | None:
    day = _parse_date(value)
    try:
        return None if day is None else (day + timedelta(days=f.days)).strftime("%Y%m%d")
    except OverflowError:
        return None


def _shift_tm(value: str, f: _File) -> str | None:
    parsed = _parse_time(value)
    return None if parsed is None else _format_time(parsed[0] + f.seconds, parsed[1])


def _shift_dt(value: str, f: _File) -> str | None:
    """A DT moved as an instant; one with only a date moves by the days; a year or month only
    cannot be shifted (None). The UTC offset suffix is kept."""
    text = value.strip()
    tz = ""
    m = re.search(r"[+-]\d{4}$", text)
    if m and m.start() >= 4:
        text, tz = text[:m.start()], m.group()
    main, _, frac = text.partition(".")
    if len(main) == 8:
        moved = _shift_da(main, f)
        return None if moved is None else moved + tz
    if len(main) not in (10, 12, 14) or not main.isdigit() or (frac and not frac.isdigit()):
        return None
    try:
        instant = datetime(int(main[:4]), int(main[4:6]), int(main[6:8]), int(main[8:10]),
                           int(main[10:12] or 0), min(int(main[12:14] or 0), 59))
        moved_dt = instant + f.shift
    except (ValueError, OverflowError):
        return None
    return moved_dt.strftime("%Y%m%d%H%M%S") + (f".{frac}" if frac else "") + tz


def _shift_pair(da: str, tm: str, f: _File) -> tuple[str, str] | None:
    """A date and its time moved together as one instant."""
    day, parsed = _parse_date(da), _parse_time(tm)
    if day is None or parsed is None:
        return None
    try:
        moved = datetime(day.year, day.month, day.day) + timedelta(seconds=parsed[0]) + f.shift
    except OverflowError:
        return None
    secs = moved.hour * 3600 + moved.minute * 60 + moved.second
    return moved.strftime("%Y%m%d"), _format_time(secs, parsed[1])


def _temporal_op(code: str | None, run: _Run) -> str:
    """What happens to a DA, DT or TM attribute whose effective action is `code`."""
    if code is None:  # not listed: shifted, kept or emptied as the date option says
        return {"modified": SHIFT, "full": KEEP, "removed": EMPTY}[run.dates]
    if code == "K":
        return KEEP
    if code == "C":
        return KEEP if run.dates == "full" else SHIFT
    if code == "X":
        return REMOVE
    if code in ("Z", "X/Z"):
        return EMPTY
    return REPLACE  # D, X/D, Z/D, X/Z/D: a dummy date is valid whatever the attribute's type


def _shift_element(ds: Dataset, tag: int, f: _File, run: _Run) -> None:
    elem = ds[tag]
    shift = {"DA": _shift_da, "TM": _shift_tm, "DT": _shift_dt}[elem.VR]

    def one(value: str) -> str:
        moved = shift(value, f)
        if moved is None:
            run.dates_unreadable += 1
            return ""
        run.dates_shifted += 1
        return moved

    elem.value = _map_values(elem.value, one)
    run.replaced[_name(tag)] += 1


def _time_partner(ds: Dataset, tag: int) -> int | None:
    """The TM attribute that goes with date `tag` in `ds` (StudyDate → StudyTime, ...)."""
    keyword = keyword_for_tag(tag)
    if not keyword.endswith("Date") or len(keyword) <= 4:
        return None
    partner = pydicom.datadict.tag_for_keyword(keyword[:-4] + "Time")
    if partner is None or partner not in ds or ds[partner].VR != "TM":
        return None
    return partner


def _clean_temporal(ds: Dataset, tag: int, code: str | None, run: _Run, f: _File,
                    done: set) -> None:
    """A DA, DT or TM attribute: shifted (with its time, for a date), kept, emptied or removed."""
    elem = ds[tag]
    name = _name(tag)
    op = _temporal_op(code, run)
    if op == KEEP or (op in (SHIFT, EMPTY) and elem.value in (None, "")):
        return
    if op == REMOVE:
        del ds[tag]
        run.removed[name] += 1
    elif op == EMPTY:
        elem.value = None
        run.emptied[name] += 1
    elif op == REPLACE:
        elem.value = DUMMY_VALUES[elem.VR]
        run.replaced[name] += 1
    else:
        partner = _time_partner(ds, tag) if elem.VR == "DA" else None
        if partner is not None and partner not in done and \
                _temporal_op(action_for(partner, run.options), run) == SHIFT and \
                isinstance(elem.value, str) and isinstance(ds[partner].value, str) and \
                ds[partner].value.strip():
            moved = _shift_pair(elem.value, ds[partner].value, f)
            done.add(partner)
            if moved is None:
                run.dates_unreadable += 1
                elem.value, ds[partner].value = "", ""
            else:
                run.dates_shifted += 2
                elem.value, ds[partner].value = moved
            run.replaced[name] += 1
            run.replaced[_name(partner)] += 1
            return
        _shift_element(ds, tag, f, run)


def _scrub_text(text: str, identifiers: tuple[str, ...]) -> str:
    for ident in identifiers:  # whole words only: "Lee" is taken out of "Lee^Ann", not "Sleep"
        text = re.sub(rf"(?<![^\W_]){re.escape(ident)}(?![^\W_])", SCRUBBED, text,
                      flags=re.IGNORECASE)
    return text


def _scrub(elem, f: _File, run: _Run) -> None:
    """C on a string: the file's identifiers replaced by SCRUBBED, the rest of the text kept."""
    if elem.value in (None, "") or elem.VR not in TEXT_VRS | {"CS"}:
        return
    limit = MAX_LENGTH.get(elem.VR)

    def one(text: str) -> str:
        out = _scrub_text(text, f.identifiers)
        return out[:limit] if limit else out

    new = _map_values(elem.value, one)
    if new != _map_values(elem.value, str):
        elem.value = new
        run.cleaned[_name(elem.tag)] += 1


def _dummy_value(vr: str, value: Any) -> Any:
    dummy = DUMMY_VALUES.get(vr)
    if dummy is None:
        return None  # other binary VRs (OF, OD, OL, OV): zero length
    if isinstance(value, (list, tuple, MultiValue)):
        return [dummy] * len(value)
    return dummy


def _dummy_item(item: Dataset, run: _Run) -> None:
    """Every value of `item` (at every depth) replaced by a dummy of its VR: the item keeps its
    shape, so a sequence that must have items stays valid, and says nothing. UIDs are remapped
    with the keyed hash (standard UIDs kept), so references still resolve."""
    for tag in list(item.keys()):
        if tag.is_private or tag.element == 0:
            del item[tag]
            run.private_removed += tag.is_private
            continue
        elem = item[tag]
        if elem.VR == "SQ":
            for sub in elem.value or []:
                _dummy_item(sub, run)
            continue
        if elem.value in (None, "", b"") or elem.VR == "AT":
            continue
        if elem.VR == "UI":
            if run.has("retain-uids"):
                continue
            elem.value = _map_values(elem.value, lambda u: u if u.startswith(
                STANDARD_UID_ROOT) else _new_uid(run, u))
        else:
            elem.value = _dummy_value(elem.VR, elem.value)
        run.replaced[_name(tag)] += 1


def _clean_dataset(ds: Dataset, run: _Run, f: _File, top: bool, scrub: bool = False) -> None:
    """Apply the profile and options to `ds` in place, recursing into the sequences that stay.

    scrub: also clean (C) the strings the table does not list, as inside an SR content tree.
    """
    done: set = set()  # dates and times already handled (a time moved with its date)
    dated_times = {}  # time tag → its date tag, so a pair moves once whichever comes first
    for tag in list(ds.keys()):
        if not tag.is_private and ds[tag].VR == "DA":
            partner = _time_partner(ds, tag)
            if partner is not None:
                dated_times[partner] = tag
    for tag in list(ds.keys()):
        if tag in done or tag not in ds:
            continue
        if tag.is_private:
            del ds[tag]
            run.private_removed += 1
            continue
        if tag.element == 0:  # group length: stale once the group changes, and retired
            del ds[tag]
            continue
        if top and tag in (PATIENT_ID, PATIENT_NAME):
            continue  # replaced by the pseudonym afterwards
        elem = ds[tag]
        vr = elem.VR
        code = action_for(tag, run.options)
        if tag.group & 0xFF00 in (0x5000, 0x6000):  # curves; overlay planes as a whole
            if not run.has("clean-graphics"):
                del ds[tag]
                run.removed[_name(tag)] += 1
            else:  # kept, text cleaned; the file is listed for a person to review
                f.graphics_kept = True
                if vr in TEXT_VRS:
                    _scrub(elem, f, run)
            continue
        if vr in TEMPORAL_VRS:
            date_tag = dated_times.get(tag)
            if date_tag is not None and date_tag not in done and date_tag in ds:
                done.add(date_tag)
                _clean_temporal(ds, date_tag, action_for(date_tag, run.options), run, f, done)
                if tag in done or tag not in ds:
                    continue  # moved with its date
            _clean_temporal(ds, tag, code, run, f, done)
            continue
        name = _name(tag)
        if code is None:
            op = CLEAN if scrub and vr in TEXT_VRS else KEEP
        elif tag == CONTENT_SEQUENCE and code == "D":
            op = CLEAN  # an SR content tree: cleaned item by item (module docstring)
            f.structured = True
        else:
            op = resolve_action(code, vr)
        if op == CLEAN and vr == "UI":
            op = KEEP if run.has("retain-uids") else NEW_UID
        if op in (KEEP, CLEAN_ITEMS, CLEAN) and vr == "SQ":
            for item in elem.value or []:
                _clean_dataset(item, run, f, top=False, scrub=scrub or op == CLEAN)
        elif op in (KEEP, CLEAN_ITEMS):
            pass
        elif op == CLEAN:
            _scrub(elem, f, run)
        elif op == REMOVE:
            del ds[tag]
            run.removed[name] += 1
        elif op == EMPTY:
            elem.value = Sequence() if vr == "SQ" else None
            run.emptied[name] += 1
        elif op == DUMMY_ITEMS:
            for item in elem.value or []:
                _dummy_item(item, run)
            run.replaced[name] += 1
        elif op == NEW_UID:
            elem.value = _map_values(elem.value, lambda uid: _new_uid(run, uid))
            run.replaced[name] += 1
        else:  # REPLACE
            elem.value = _dummy_value(vr, elem.value)
            run.replaced[name] += 1


def burned_in_reasons(ds: Dataset) -> list[str]:
    """Why the pixels of `ds` may show identifying text or features; empty when no reason."""
    if not any(tag in ds for tag in PIXEL_TAGS):
        return []
    reasons = []
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        reasons.append("BurnedInAnnotation is YES")
    if str(ds.get("RecognizableVisualFeatures", "")).strip().upper() == "YES":
        reasons.append("RecognizableVisualFeatures is YES")
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality == "US":
        reasons.append("ultrasound (modality US) usually shows text in the image")
    elif modality in ("OT", "SC"):
        reasons.append(f"modality {modality} (screen captures, scanned documents)")
    sop_class = str(ds.get("SOPClassUID", "")).strip()
    if sop_class == SECONDARY_CAPTURE_CLASS or sop_class.startswith(SECONDARY_CAPTURE_CLASS + "."):
        reasons.append("Secondary Capture SOP class")
    return reasons


def _identifiers(ds: Dataset) -> tuple[str, ...]:
    """The file's identifying strings that C takes out of text, longest first."""
    found = set()
    for keyword in IDENTIFIER_KEYWORDS:
        value = ds.get(keyword)
        values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        for v in values:
            text = str(v or "").strip()
            if not text:
                continue
            found.add(text)
            if pydicom.datadict.dictionary_VR(keyword) == "PN":  # each part of a person's name
                found.update(p for p in re.split(r"[\^=\s,]+", text) if len(p) >= 2)
    for item in ds.get("OtherPatientIDsSequence", None) or []:
        found.add(str(item.get("PatientID", "") or "").strip())
    return tuple(sorted((s for s in found if len(s) >= 2), key=lambda s: (-len(s), s)))


def _method_text(run: _Run) -> list[str]:
    """DeidentificationMethod: one LO value (≤ 64 characters) per thing done."""
    dates = {"modified": "dates and times shifted per patient (days and seconds)",
             "full": "dates and times kept", "removed": "dates and times removed"}[run.dates]
    lines = [f"medfound {__version__}: PS3.15 Table E.1-1 Basic Profile",
             "PatientID and PatientName replaced by keyed pseudonym", dates,
             "private attributes removed"]
    if not run.has("retain-uids"):
        lines.insert(1, "UIDs replaced by keyed hash (HMAC-SHA256)")
    return [line[:64] for line in lines]


def _deidentify_dataset(ds: Dataset, run: _Run) -> _File:
    """De-identify one file's dataset and its file meta in place."""
    patient = str(ds.get("PatientID", "") or "").strip() or str(
        ds.get("PatientName", "") or "").strip()
    f = _File(days=date_shift_days(patient, run.key), seconds=time_shift_seconds(patient, run.key),
              identifiers=_identifiers(ds))
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    series = str(ds.get("SeriesInstanceUID", "") or "").strip()
    old_meta = getattr(ds, "file_meta", None) or FileMetaDataset()

    _clean_dataset(ds, run, f, top=True)

    pseudonym = patient_pseudonym(patient, run.key)
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    run.replaced["PatientID"] += 1
    run.replaced["PatientName"] += 1
    if patient:
        run.patients[patient] = pseudonym
    if study:
        run.studies[study] = str(ds.get("StudyInstanceUID", "") or "")
    if series:
        run.series[series] = str(ds.get("SeriesInstanceUID", "") or "")
    run.structured_content += f.structured

    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = _method_text(run)
    applied = set(run.options) | ({STRUCTURED_CONTENT} if f.structured else set())
    codes = [BASIC_PROFILE_CODE] + [(opt.code, opt.meaning) for opt in
                                    sorted(applied, key=lambda o: o.code)]
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    ds.LongitudinalTemporalInformationModified = {
        "modified": "MODIFIED", "full": "UNMODIFIED", "removed": "REMOVED"}[run.dates]

    # A new file meta: only what the file format needs, nothing from the sending system (its AE
    # titles, private information), the instance UID matching the new SOPInstanceUID.
    instance = str(ds.get("SOPInstanceUID", "") or "")
    if not instance and str(old_meta.get("MediaStorageSOPInstanceUID", "") or "").strip():
        old = str(old_meta.MediaStorageSOPInstanceUID)
        instance = old if run.has("retain-uids") else _new_uid(run, old)
    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0  # dcmwrite fills in the real length
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = str(
        ds.get("SOPClassUID", "") or old_meta.get("MediaStorageSOPClassUID", "") or "")
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = old_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"MEDFOUND_{__version__}"[:16]
    if instance:
        run.replaced["MediaStorageSOPInstanceUID"] += 1
    ds.file_meta = meta
    ds.preamble = b"\0" * 128  # a preamble may carry anything, e.g. a TIFF header
    return f


# --- files and folders ------------------------------------------------------------------


def _check_paths(src: Path, dst: Path, key_file: Path | None, pseudonym_map: Path | None) -> None:
    """Refuse any layout in which a write could touch IN, or a secret could land in OUT."""
    if not src.exists():
        raise MedfoundError("input does not exist", path=src,
                            hint="give a DICOM file or a folder of DICOM files")
    if dst == src:
        raise MedfoundError("OUT is the same as IN", path=dst,
                            hint="IN is never written: choose an OUT folder outside IN")
    if src.is_dir() and dst.is_relative_to(src):
        raise MedfoundError("OUT is inside IN", path=dst,
                            hint="IN is never written: choose an OUT folder outside IN")
    if src.is_relative_to(dst):
        raise MedfoundError("IN is inside OUT", path=src,
                            hint="choose an OUT folder that does not contain IN")
    if dst.exists() and not dst.is_dir():
        raise MedfoundError("OUT exists and is not a folder", path=dst,
                            hint="choose a new or empty folder for OUT")
    if dst.is_dir() and any(dst.iterdir()):
        raise MedfoundError("OUT is not empty", path=dst,
                            hint="de-identified files go into a new or empty folder: remove "
                            "what is there or choose another OUT")
    for secret, what in ((pseudonym_map, "pseudonym map"), (key_file, "key file")):
        if secret is None:
            continue
        if secret.is_relative_to(dst):
            raise MedfoundError(f"the {what} would be inside OUT, which may leave the center",
                                path=secret, hint=f"keep the {what} outside OUT")
        in_src = secret == src or (src.is_dir() and secret.is_relative_to(src))
        if in_src and (what == "pseudonym map" or not secret.exists()):
            raise MedfoundError(f"the {what} would be written inside IN", path=secret,
                                hint=f"IN is never written: keep the {what} outside IN")
    if pseudonym_map is not None:
        if pseudonym_map.exists():
            raise MedfoundError("pseudonym map already exists", path=pseudonym_map,
                                hint="choose a new file name; the old map is not overwritten")
        if key_file is not None and pseudonym_map == key_file:
            raise MedfoundError("pseudonym map and key file are the same file",
                                path=pseudonym_map, hint="give them different names")


def load_key(key_file: str | Path) -> tuple[bytes, bool]:
    """The key in `key_file` (hex text), creating it with a new random key if it is missing.

    Returns (key, created). A new file holds KEY_BYTES random bytes as hex and has mode 0600.
    """
    path = Path(key_file)
    if path.exists():
        try:
            key = bytes.fromhex(path.read_text(encoding="ascii").strip())
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise MedfoundError(f"cannot read the key ({type(err).__name__})", path=path,
                                hint="a key file holds one line of hex digits; give another "
                                "path to create a new key") from None
        if len(key) < MIN_KEY_BYTES:
            raise MedfoundError(f"key is shorter than {MIN_KEY_BYTES} bytes", path=path,
                                hint="give another path to create a new key")
        return key, False
    key = secrets.token_bytes(KEY_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(key.hex() + "\n")
    except OSError as err:
        raise MedfoundError(f"cannot create the key file ({err.strerror})", path=path) from None
    return key, True


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short temporary name: the final name may already be as long as the file system allows.
    fd, tmp = tempfile.mkstemp(prefix=".medfound-", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _input_files(src: Path, unreadable: list[str], others: list[str], outside: list[str]
                 ) -> list[tuple[Path, str]]:
    """(file, relative path with "/") for IN, a file or a folder walked in sorted order.

    Folders that cannot be listed are added to `unreadable`, entries that are not regular files
    (pipes, sockets, devices, broken links; never opened, a pipe would block) to `others`, both
    IN-relative, so that nothing is passed over in silence; links to files outside IN go to
    `outside` and are not read. Links to folders are not followed.
    """
    if src.is_file():
        return [(src, src.name)]

    def on_error(err: OSError) -> None:
        where = Path(err.filename) if err.filename else src
        unreadable.append(where.relative_to(src).as_posix() if where.is_relative_to(src)
                          else where.name)

    files = []
    for folder, dirs, names in os.walk(src, onerror=on_error):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            rel = path.relative_to(src).as_posix()
            if path.is_symlink() and not path.resolve().is_relative_to(src):
                outside.append(rel)  # IN is what the user chose to release, not what it links to
            elif path.is_file():
                files.append((path, rel))
            else:
                others.append(rel)
    return files


def _is_truncated(ds: Dataset, path: Path, caught: list) -> bool:
    """Whether the file ends before its last element does: pydicom reads what is there."""
    if any("end of file" in str(w.message).lower() for w in caught):
        return True
    if not len(ds):
        return False
    last = ds.get_item(max(ds.keys()))
    if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF:
        return False
    return last.value_tell + last.length > path.stat().st_size


class _FileResult(NamedTuple):
    data: bytes | None  # the encoded de-identified file; None when skipped or failed
    skip_reason: str = ""
    failed: bool = False  # a DICOM file that could not be read or de-identified
    burned_in: tuple[str, ...] = ()  # reasons the pixels may show identifying text
    pydicom_warnings: int = 0
    identifiers: tuple[str, ...] = ()  # the original PatientID, accession, name parts


def _read_and_deidentify(path: Path, run: _Run) -> _FileResult:
    """Read one file and de-identify it in memory; errors skip the file (fail closed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            return _FileResult(None, "not a DICOM file (no DICM header)")
        except Exception as err:  # a broken file must not stop the run; the type names no PHI
            return _FileResult(None, f"unreadable DICOM ({type(err).__name__})", True)
        if _is_truncated(ds, path, caught):
            return _FileResult(None, "truncated DICOM file", True)
        if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS:
            return _FileResult(None, "DICOMDIR (rebuild it from OUT)")
        if "TransferSyntaxUID" not in ds.file_meta:
            return _FileResult(None, "no transfer syntax in the file meta")
        try:
            reasons = tuple(burned_in_reasons(ds))
            ids = [str(ds.get(kw, "") or "") for kw in ("PatientID", "AccessionNumber")]
            ids += str(ds.get("PatientName", "") or "").replace("^", " ").split()
            done = _deidentify_dataset(ds, run)
            if done.graphics_kept:
                reasons += ("overlay or curve graphics kept (Clean Graphics option)",)
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds)
        except Exception as err:  # a file is de-identified whole or not written at all
            return _FileResult(None, f"could not be de-identified ({type(err).__name__})", True)
    return _FileResult(buf.getvalue(), "", False, reasons, len(caught),
                       tuple(s.strip() for s in ids if len(s.strip()) >= 3))


def _key(key_path: Path | None) -> tuple[bytes, str, list[str]]:
    """(key, where it came from, warnings) for `deidentify`."""
    if key_path is None:
        return secrets.token_bytes(KEY_BYTES), "one-off random key", [
            "no key file: a one-off random key was used, so UIDs, pseudonyms and date shifts "
            "will differ on the next run; pass a key file to make them reproducible"]
    key, created = load_key(key_path)
    if not created and key_path.stat().st_mode & 0o077:
        return key, "key file", ["the key file can be read by other users: chmod 600 it"]
    return key, "new key file" if created else "key file", []


def _fail(run: _Run, rel: str, reason: str) -> None:
    run.failed.append({"path": rel, "reason": reason})
    run.skipped[reason] += 1


def _process(path: Path, rel: str, dst: Path, file_mode: int, run: _Run) -> None:
    """De-identify one input file into OUT, or record why it was skipped or failed; never
    raises, so one file cannot stop the others."""
    if rel == REPORT_NAME:
        run.skipped["name reserved for the report"] += 1
        return
    try:
        result = _read_and_deidentify(path, run)
    except Exception as err:  # e.g. the file went away between listing and reading
        _fail(run, rel, f"could not be read ({type(err).__name__})")
        return
    if result.data is None:
        if result.failed:
            _fail(run, rel, result.skip_reason)
        else:
            run.skipped[result.skip_reason] += 1
        return
    try:
        _atomic_write(dst / rel, result.data, file_mode)
    except OSError as err:
        _fail(run, rel, f"cannot write ({err.strerror or type(err).__name__})")
        return
    run.written += 1
    run.files_with_warnings += result.pydicom_warnings > 0
    run.phi_paths += any(s.lower() in rel.lower() for s in result.identifiers)
    if result.burned_in:
        run.burned_in.append({"path": rel, "reason": "; ".join(result.burned_in)})


def _warnings(run: _Run) -> list[str]:
    """What the person in charge of the release should know; counts only, no PHI."""
    out = []
    if run.burned_in:
        out.append(f"{len(run.burned_in)} images may show identifying text in their pixels "
                   "(burned_in_risk); pixels are not changed: review or mask them before they "
                   "leave the center")
    if run.phi_paths:
        out.append(f"{run.phi_paths} output paths contain a patient ID, name or accession "
                   "number taken from IN's file or folder names: rename them before OUT leaves "
                   "the center")
    if run.dates_unreadable:
        out.append(f"{run.dates_unreadable} date values were not full dates and were emptied")
    if run.files_with_warnings:
        out.append(f"{run.files_with_warnings} files had malformed values (pydicom warnings); "
                   "they were de-identified all the same")
    if run.structured_content:
        out.append(f"{run.structured_content} SR content trees were cleaned item by item (Clean "
                   "Structured Content): names, text items, dates and UIDs replaced, codes and "
                   "measurements kept")
    if any(opt.column in ("cleanDescOpt", "cleanStructContOpt", "cleanGraphOpt")
           for opt in run.options):
        out.append("clean options keep free text with this file's known identifiers (names, "
                   "IDs, dates of birth, institution) replaced; other identifying words may "
                   "remain: review the text before OUT leaves the center")
    if run.failed:
        out.append(f"{len(run.failed)} files FAILED and were not written (failed)")
    not_failed = sum(run.skipped.values()) - len(run.failed)
    if not_failed:
        out.append(f"{not_failed} files were skipped and not copied (skipped_reasons)")
    return out


def deidentify(in_path: str | Path, out_path: str | Path, key_file: str | Path | None = None,
               remove_dates: bool = False, pseudonym_map: str | Path | None = None,
               progress: bool = True, options: Iterable[str] | None = None) -> dict:
    """De-identify every DICOM file under `in_path` into `out_path`; return the report.

    in_path: a DICOM file or a folder (walked recursively); only ever read.
    out_path: a new or empty folder, not inside `in_path` and not containing it; each file
        goes to its relative path under IN. OUT/deid_report.json holds the report.
    key_file: the center's secret (hex text). Created with a new random key (mode 0600) when
        missing; refused inside OUT. None: a one-off random key, so UIDs, pseudonyms and date
        shifts differ on every run (the report warns).
    remove_dates: no date option: dates and times removed or emptied instead of shifted.
    pseudonym_map: where to write original PatientID / Study / Series UIDs → new (JSON, mode
        0600) for the center to keep; refused inside OUT or IN, and never overwritten.
    progress: show a tqdm progress bar on stderr.
    options: PS3.15 E.3 options by name (`deid_profile.OPTIONS`, e.g. "clean-descriptors",
        "retain-device-identity"); Retain Longitudinal Temporal Information with Modified Dates
        is added unless `remove_dates` or "retain-longitudinal-full-dates" is given.

    A file that cannot be read, de-identified or written does not stop the run: it is listed in
    the report's `failed` ([{path, reason}], IN-relative) and counted in `files_failed`.

    The report (also returned) holds counts (attributes by keyword; `uids_replaced` counts
    distinct UIDs), the key's fingerprint (first 8 hex digits of its SHA-256, never the key),
    `burned_in_risk` ([{path, reason}] with OUT-relative paths) and `warnings`; it contains no
    PHI beyond the relative paths it lists (`burned_in_risk`, `failed`). Raises `MedfoundError`
    for a refused layout, key file or option.
    """
    src = Path(in_path).expanduser().resolve()
    dst = Path(out_path).expanduser().resolve()
    key_path = None if key_file is None else Path(key_file).expanduser().resolve()
    map_path = None if pseudonym_map is None else Path(pseudonym_map).expanduser().resolve()
    chosen = select_options(options, remove_dates)
    _check_paths(src, dst, key_path, map_path)
    key, key_source, key_warnings = _key(key_path)

    unreadable_folders: list[str] = []
    not_files: list[str] = []
    outside: list[str] = []
    files = _input_files(src, unreadable_folders, not_files, outside)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedfoundError(f"cannot create OUT ({err.strerror})", path=dst) from None
    umask = os.umask(0)
    os.umask(umask)
    file_mode = 0o666 & ~umask
    run = _Run(key=key, options=chosen)
    for rel in unreadable_folders:
        _fail(run, rel, "folder could not be listed")
    if not_files:
        run.skipped["not a regular file (pipe, socket, device or broken link)"] = len(not_files)
    if outside:
        run.skipped["link to a file outside IN (not read)"] = len(outside)
    # pydicom logs malformed values verbatim (PHI into a log): they are counted instead.
    pydicom_log = logging.getLogger("pydicom")
    log_level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    try:
        for path, rel in tqdm(files, desc="de-identifying", unit="file", disable=not progress):
            _process(path, rel, dst, file_mode, run)
    finally:
        pydicom_log.setLevel(log_level)

    fingerprint = hashlib.sha256(key).hexdigest()[:8]
    if map_path is not None:
        mapping = {"key_fingerprint": fingerprint, "patients": dict(sorted(run.patients.items())),
                   "studies": dict(sorted(run.studies.items())),
                   "series": dict(sorted(run.series.items()))}
        try:
            _atomic_write(map_path, (json.dumps(mapping, indent=2) + "\n").encode(), 0o600)
        except OSError as err:
            raise MedfoundError(f"cannot write the pseudonym map ({err.strerror})",
                                path=map_path) from None

    report = {
        "profile": PROFILE_NAME,
        "medfound_version": __version__,
        "table": TABLE_SOURCE,
        "profile_options": [opt.name for opt in chosen],
        "options": {
            "remove_dates": remove_dates,
            "date_shift": {
                "removed": "none: dates and times removed",
                "full": "none: dates and times kept",
                "modified": f"per patient, whole days in -{MAX_SHIFT_DAYS}..-1 and seconds "
                            "in -86399..0"}[run.dates],
            "key_fingerprint": fingerprint,
            "key_source": key_source,
            "private_attributes": "removed",
            "pixel_data": "unchanged",
        },
        "files_seen": len(files),
        "files_written": run.written,
        "files_skipped": sum(run.skipped.values()),
        "files_failed": len(run.failed),
        "skipped_reasons": dict(sorted(run.skipped.items())),
        "failed": run.failed,
        "patients": len(run.patients),
        "studies": len(run.studies),
        "series": len(run.series),
        "attributes_removed": dict(sorted(run.removed.items())),
        "attributes_emptied": dict(sorted(run.emptied.items())),
        "attributes_replaced": dict(sorted(run.replaced.items())),
        "attributes_cleaned": dict(sorted(run.cleaned.items())),
        "structured_content_cleaned": run.structured_content,
        "private_tags_removed": run.private_removed,
        "uids_replaced": len(run.uids),
        "dates_shifted": run.dates_shifted,
        "burned_in_risk": run.burned_in,
        "warnings": key_warnings + _warnings(run),
    }
    try:
        _atomic_write(dst / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode(),
                      file_mode)
    except OSError as err:
        raise MedfoundError(f"cannot write the report ({err.strerror})",
                            path=dst / REPORT_NAME) from None
    return report
