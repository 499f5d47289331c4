"""De-identify DICOM files: PS3.15 Annex E basic profile, keyed UIDs, per-patient date shifts.

`deidentify(IN, OUT)` copies every DICOM file under IN to the same relative path under OUT with
the Basic Application Level Confidentiality Profile applied (table in `deid_profile`), at every
depth of nested sequences:

- attributes the profile lists are removed, emptied or replaced; every private attribute is
  removed, and so are curves (50xx) and whole overlay planes (60xx: Overlay Data alone would
  leave a broken overlay behind);
- UIDs the profile marks U become "2.25.<int>" UIDs built from HMAC-SHA256 under the center's
  secret key, so one input UID maps to one output UID everywhere (the slices of a series keep
  sharing one SeriesInstanceUID, references keep pointing at the right instance) and every run
  under the same key gives the same UIDs. SOP Class and Transfer Syntax UIDs are kept;
- PatientID and PatientName become a keyed pseudonym of the PatientID (the same patient gets the
  same pseudonym on every run under one key);
- dates follow the Retain Longitudinal Temporal Information with Modified Dates option: every DA
  and DT value is moved by a whole number of days, the same for all files of a patient (keyed on
  the key and the PatientID, within -365..-1 days), so intervals within a patient survive; times
  of day are kept. With ``remove_dates`` every DA, DT and TM is emptied instead (or removed where
  the profile removes it). The patient's birth date is emptied either way;
- PatientIdentityRemoved, DeidentificationMethod, DeidentificationMethodCodeSequence and
  LongitudinalTemporalInformationModified record what was done.

Pixel data is never touched, so images whose pixels may show text (burned-in annotation,
ultrasound, secondary capture) are listed in the report for a person to review.

Compound action codes cannot be settled without knowing which module of which IOD an attribute
sits in, so they resolve to the choice that is valid whatever its type: X/Z → empty; Z/D, X/D,
X/Z/D (and D, C) → a dummy value; a sequence that needs a dummy → emptied, since a generic dummy
item cannot be built and its items may hold free text; X/Z/U* → the sequence is kept and cleaned
inside, its UIDs replaced, so references survive.

Safety: IN is only read. OUT must be new or empty and may not contain IN or lie inside it; each
file is written to a hidden temporary name and renamed, so an interrupted run leaves whole files
only (a killed process may leave a hidden *.partial file, never a half file under a real name).
Files that are not DICOM (or that fail to de-identify) are skipped and counted, never copied.
OUT/deid_report.json says what was done and holds no PHI; the pseudonym map (original → new) is
written only where asked, outside OUT, for the center to keep.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
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
from medfound.io.deid_profile import action_for

PROFILE_NAME = "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile"
REPORT_NAME = "deid_report.json"
KEY_BYTES = 32  # size of a new key
MIN_KEY_BYTES = 16  # shortest key accepted from a key file
MAX_SHIFT_DAYS = 365  # dates move back by 1..MAX_SHIFT_DAYS whole days

# What the profile's action codes resolve to (see the module docstring).
KEEP, REMOVE, EMPTY, REPLACE, NEW_UID, CLEAN_ITEMS = (
    "keep", "remove", "empty", "replace", "new_uid", "clean_items")

# Dummy values by VR for D: valid for the VR, and saying plainly that they are not data.
DUMMY_VALUES: dict[str, Any] = {
    "AE": "ANONYMOUS", "AS": "000D", "CS": "ANONYMIZED", "DA": "19000101",
    "DS": "0", "DT": "19000101000000", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED",
    "PN": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED", "TM": "000000",
    "UC": "ANONYMIZED", "UT": "ANONYMIZED",
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "SV": 0, "UL": 0, "US": 0, "UV": 0,
}

TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
PATIENT_ID, PATIENT_NAME = 0x00100020, 0x00100010
BIRTH_TAGS = frozenset({0x00100030, 0x00100032})  # never shifted: emptied/removed as the profile says
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
SECONDARY_CAPTURE_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # and .7.1-.7.4, its multi-frame kinds

# DeidentificationMethodCodeSequence codes (CID 7050).
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES_CODE = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")


@dataclass
class _Run:
    """What one `deidentify` call learns and counts as it goes through the files."""

    key: bytes
    remove_dates: bool
    uids: dict[str, str] = field(default_factory=dict)  # original → new, every U attribute
    patients: dict[str, str] = field(default_factory=dict)  # original PatientID → pseudonym
    studies: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)
    removed: Counter = field(default_factory=Counter)  # by attribute keyword
    emptied: Counter = field(default_factory=Counter)
    replaced: Counter = field(default_factory=Counter)
    private_removed: int = 0
    dates_shifted: int = 0
    dates_unreadable: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)  # by reason
    burned_in: list[dict] = field(default_factory=list)  # [{path, reason}], OUT-relative
    files_with_warnings: int = 0
    phi_paths: int = 0  # output paths that contain the file's own patient ID or name


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


# --- one dataset ------------------------------------------------------------------------


def resolve_action(code: str, vr: str) -> str:
    """What medfound does for a profile action `code` on an attribute of value representation `vr`.

    Compound codes resolve to the choice that keeps any IOD valid (module docstring).
    """
    if code == "K":
        return KEEP
    if code == "X":
        return REMOVE
    if code in ("Z", "X/Z"):
        return EMPTY
    if code == "X/Z/U*":
        return CLEAN_ITEMS if vr == "SQ" else NEW_UID if vr == "UI" else EMPTY
    # U, D, C, Z/D, X/D, X/Z/D: a value has to stay.
    if vr == "SQ":
        return EMPTY
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


def _shift_date(value: str, vr: str, days: int, run: _Run) -> str:
    """`value` (DA "YYYYMMDD", or DT whose first 8 characters are a date) moved by `days`.

    A value that is not a full date (a DT with only a year, a malformed DA) cannot be shifted
    and is emptied.
    """
    text = value.strip()
    if vr == "DA" and len(text) == 10 and text[4] == text[7] == ".":  # ACR-NEMA "YYYY.MM.DD"
        text = text.replace(".", "")
    head, rest = text[:8], text[8:]
    if vr == "DA" and rest:
        head = ""
    try:
        if len(head) != 8 or not head.isdigit():
            raise ValueError(value)
        moved = date(int(head[:4]), int(head[4:6]), int(head[6:])) + timedelta(days=days)
    except (ValueError, OverflowError):
        run.dates_unreadable += 1
        return ""
    run.dates_shifted += 1
    return moved.strftime("%Y%m%d") + rest


def _clean_temporal(ds: Dataset, tag: int, code: str | None, run: _Run, days: int) -> None:
    """A DA, DT or TM attribute: shifted, or emptied / removed when dates are removed."""
    elem = ds[tag]
    name = _name(tag)
    if run.remove_dates:
        if code is not None and resolve_action(code, elem.VR) == REMOVE:
            del ds[tag]
            run.removed[name] += 1
        elif elem.value not in (None, ""):
            elem.value = None
            run.emptied[name] += 1
        return
    if elem.VR == "TM" or elem.value in (None, ""):
        return  # whole-day shifts leave the time of day as it is
    elem.value = _map_values(elem.value, lambda v: _shift_date(v, elem.VR, days, run))
    run.replaced[name] += 1


def _clean_dataset(ds: Dataset, run: _Run, days: int, top: bool) -> None:
    """Apply the profile to `ds` in place, recursing into the items of sequences that stay."""
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
            run.private_removed += 1
            continue
        if tag.element == 0:  # group length: stale once the group changes, and retired
            del ds[tag]
            continue
        if top and tag in (PATIENT_ID, PATIENT_NAME):
            continue  # replaced by the pseudonym afterwards
        if tag.group & 0xFF00 in (0x5000, 0x6000):  # curves; overlay planes as a whole
            del ds[tag]
            run.removed[_name(tag)] += 1
            continue
        elem = ds[tag]
        vr = elem.VR
        code = action_for(tag)
        if vr in TEMPORAL_VRS and tag not in BIRTH_TAGS:
            _clean_temporal(ds, tag, code, run, days)
            continue
        op = KEEP if code is None else resolve_action(code, vr)
        name = _name(tag)
        if op in (KEEP, CLEAN_ITEMS):
            if vr == "SQ":
                for item in elem.value or []:
                    _clean_dataset(item, run, days, top=False)
        elif op == REMOVE:
            del ds[tag]
            run.removed[name] += 1
        elif op == EMPTY:
            elem.value = Sequence() if vr == "SQ" else None
            run.emptied[name] += 1
        elif op == NEW_UID:
            elem.value = _map_values(elem.value, lambda uid: _new_uid(run, uid))
            run.replaced[name] += 1
        else:  # REPLACE
            elem.value = DUMMY_VALUES.get(vr)  # binary VRs: zero length, the only safe dummy
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


def _deidentify_dataset(ds: Dataset, run: _Run) -> None:
    """De-identify one file's dataset and its file meta in place."""
    patient = str(ds.get("PatientID", "") or "").strip() or str(
        ds.get("PatientName", "") or "").strip()
    days = date_shift_days(patient, run.key)
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    series = str(ds.get("SeriesInstanceUID", "") or "").strip()
    old_meta = getattr(ds, "file_meta", None) or FileMetaDataset()

    _clean_dataset(ds, run, days, top=True)

    pseudonym = patient_pseudonym(patient, run.key)
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    run.replaced["PatientID"] += 1
    run.replaced["PatientName"] += 1
    if patient:
        run.patients[patient] = pseudonym
    if study:
        run.studies[study] = _new_uid(run, study)
    if series:
        run.series[series] = _new_uid(run, series)

    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [
        f"medfound {__version__}: PS3.15 E.1 Basic Profile",
        "UIDs replaced by keyed hash (HMAC-SHA256)",
        "PatientID and PatientName replaced by keyed pseudonym",
        "dates and times removed" if run.remove_dates else "dates shifted per patient by whole days",
        "private attributes removed",
    ]
    codes = [BASIC_PROFILE_CODE] + ([] if run.remove_dates else [MODIFIED_DATES_CODE])
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    ds.LongitudinalTemporalInformationModified = "REMOVED" if run.remove_dates else "MODIFIED"

    # A new file meta: only what the file format needs, nothing from the sending system (its AE
    # titles, private information), the instance UID matching the new SOPInstanceUID.
    instance = str(ds.get("SOPInstanceUID", "") or "")
    if not instance and str(old_meta.get("MediaStorageSOPInstanceUID", "") or "").strip():
        instance = _new_uid(run, str(old_meta.MediaStorageSOPInstanceUID))
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
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


def _input_files(src: Path) -> list[tuple[Path, str]]:
    """(file, relative path with "/") for IN, a file or a folder walked in sorted order."""
    if src.is_file():
        return [(src, src.name)]
    files = []
    for folder, dirs, names in os.walk(src):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file():
                files.append((path, path.relative_to(src).as_posix()))
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
    data: bytes | None  # the encoded de-identified file; None when skipped
    skip_reason: str = ""
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
            return _FileResult(None, f"unreadable DICOM ({type(err).__name__})")
        if _is_truncated(ds, path, caught):
            return _FileResult(None, "truncated DICOM file")
        if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS:
            return _FileResult(None, "DICOMDIR (rebuild it from OUT)")
        if "TransferSyntaxUID" not in ds.file_meta:
            return _FileResult(None, "no transfer syntax in the file meta")
        try:
            reasons = tuple(burned_in_reasons(ds))
            ids = [str(ds.get(kw, "") or "") for kw in ("PatientID", "AccessionNumber")]
            ids += str(ds.get("PatientName", "") or "").replace("^", " ").split()
            _deidentify_dataset(ds, run)
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds)
        except Exception as err:  # a file is de-identified whole or not written at all
            return _FileResult(None, f"could not be de-identified ({type(err).__name__})")
    return _FileResult(buf.getvalue(), "", reasons, len(caught),
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


def _process(path: Path, rel: str, dst: Path, file_mode: int, run: _Run) -> None:
    """De-identify one input file into OUT, or count why it was skipped."""
    if rel == REPORT_NAME:
        run.skipped["name reserved for the report"] += 1
        return
    result = _read_and_deidentify(path, run)
    if result.data is None:
        run.skipped[result.skip_reason] += 1
        return
    try:
        _atomic_write(dst / rel, result.data, file_mode)
    except OSError as err:
        raise MedfoundError(f"cannot write ({err.strerror})", path=dst / rel,
                            hint="check free space and permissions of OUT") from None
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
    if run.skipped:
        out.append(f"{sum(run.skipped.values())} files were skipped and not copied "
                   "(skipped_reasons)")
    return out


def deidentify(in_path: str | Path, out_path: str | Path, key_file: str | Path | None = None,
               remove_dates: bool = False, pseudonym_map: str | Path | None = None,
               progress: bool = True) -> dict:
    """De-identify every DICOM file under `in_path` into `out_path`; return the report.

    in_path: a DICOM file or a folder (walked recursively); only ever read.
    out_path: a new or empty folder, not inside `in_path` and not containing it; each file
        goes to its relative path under IN. OUT/deid_report.json holds the report.
    key_file: the center's secret (hex text). Created with a new random key (mode 0600) when
        missing; refused inside OUT. None: a one-off random key, so UIDs, pseudonyms and date
        shifts differ on every run (the report warns).
    remove_dates: empty all dates and times instead of shifting them per patient.
    pseudonym_map: where to write original PatientID / Study / Series UIDs → new (JSON, mode
        0600) for the center to keep; refused inside OUT or IN, and never overwritten.
    progress: show a tqdm progress bar on stderr.

    The report (also returned) holds counts (attributes by keyword; `uids_replaced` counts
    distinct UIDs), the key's fingerprint (first 8 hex digits of its SHA-256, never the key),
    `burned_in_risk` ([{path, reason}] with OUT-relative paths) and `warnings`; it contains no
    PHI. Raises `MedfoundError` for a refused layout or key file.
    """
    src = Path(in_path).expanduser().resolve()
    dst = Path(out_path).expanduser().resolve()
    key_path = None if key_file is None else Path(key_file).expanduser().resolve()
    map_path = None if pseudonym_map is None else Path(pseudonym_map).expanduser().resolve()
    _check_paths(src, dst, key_path, map_path)
    key, key_source, key_warnings = _key(key_path)

    files = _input_files(src)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedfoundError(f"cannot create OUT ({err.strerror})", path=dst) from None
    umask = os.umask(0)
    os.umask(umask)
    file_mode = 0o666 & ~umask
    run = _Run(key=key, remove_dates=remove_dates)
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
        "options": {
            "remove_dates": remove_dates,
            "date_shift": "none: dates and times removed" if remove_dates else
            f"per patient, whole days in -{MAX_SHIFT_DAYS}..-1",
            "key_fingerprint": fingerprint,
            "key_source": key_source,
            "private_attributes": "removed",
            "pixel_data": "unchanged",
        },
        "files_seen": len(files),
        "files_written": run.written,
        "files_skipped": sum(run.skipped.values()),
        "skipped_reasons": dict(sorted(run.skipped.items())),
        "patients": len(run.patients),
        "studies": len(run.studies),
        "series": len(run.series),
        "attributes_removed": dict(sorted(run.removed.items())),
        "attributes_emptied": dict(sorted(run.emptied.items())),
        "attributes_replaced": dict(sorted(run.replaced.items())),
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
