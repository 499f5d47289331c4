"""DICOM PS3.15 Annex E, Table E.1-1: the Basic Application Level Confidentiality Profile and its options.

The table as data, generated (block between the BEGIN/END markers) by
``scripts/make_deid_profile.py`` from ``standard/confidentiality_profile_attributes.json`` of
innolitics/dicom-standard, commit 8670abdd9ad16c61af5146ef857899699bdd9c5f, which holds Table
E.1-1 of DICOM PS3.15 2024b: for each attribute, the action of the "Basic Prof." column and of
each option column. `TABLE_SOURCE` names the source. `medfound.io.deid` applies it;
`action_for` is the one lookup.

Action codes (Table E.1-1a):

- ``D``  replace with a non-zero-length dummy value consistent with the VR
- ``Z``  replace with a zero-length value
- ``X``  remove
- ``K``  keep (sequences are still cleaned inside)
- ``C``  clean: replace with values of similar meaning known not to identify the patient
- ``U``  replace the UID with one that is internally consistent within the set of instances
- ``Z/D``    Z unless D is required to keep the IOD conformant (Type 2 vs Type 1)
- ``X/Z``    X unless Z is required (Type 3 vs Type 2)
- ``X/D``    X unless D is required (Type 3 vs Type 1)
- ``X/Z/D``  X unless Z or D is required
- ``X/Z/U*`` X unless Z, or U on the UIDs the sequence contains, is required

Options (PS3.15 E.3, codes of CID 7050) are selected by name (`OPTIONS`); where a selected
option's column has an action for an attribute, that action replaces the basic one (K before
C when two selected options disagree). Clean Pixel Data, Clean Recognizable Visual Features and
Retain Safe Private need changes to pixels or a list of safe private attributes that medfound
does not have, so they are refused by name rather than claimed.

Rows that are not single tags: every private attribute (odd group, `PRIVATE_ROW`), Curve Data
(50xx,xxxx), Overlay Data (60xx,3000) and Overlay Comments (60xx,4000) (`REPEATING_ROWS`).

`EARLIER_EDITION_ROWS` are rows that earlier editions listed and 2024b no longer does, kept so
that older files are cleaned too; `MEDFOUND_ADDITIONS` are actions medfound takes beyond the
table on attributes that may identify the patient but that Table E.1-1 does not name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from medfound.errors import MedfoundError

# Every action code the table uses.
ACTION_CODES = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})


@dataclass(frozen=True)
class ProfileOption:
    """One option of PS3.15 E.3: its name here, its column of Table E.1-1, its CID 7050 code."""

    name: str
    column: str
    code: str
    meaning: str
    unsupported: str = ""  # why medfound refuses it; empty when it is applied


OPTIONS: tuple[ProfileOption, ...] = (
    ProfileOption("clean-pixel-data", "", "113101", "Clean Pixel Data Option",
                  "medfound never changes pixel data; images that may show text are listed "
                  "in burned_in_risk for review"),
    ProfileOption("clean-recognizable-visual-features", "", "113102",
                  "Clean Recognizable Visual Features Option",
                  "medfound never changes pixel data"),
    ProfileOption("clean-graphics", "cleanGraphOpt", "113103", "Clean Graphics Option"),
    ProfileOption("clean-structured-content", "cleanStructContOpt", "113104",
                  "Clean Structured Content Option"),
    ProfileOption("clean-descriptors", "cleanDescOpt", "113105", "Clean Descriptors Option"),
    ProfileOption("retain-longitudinal-full-dates", "rtnLongFullDatesOpt", "113106",
                  "Retain Longitudinal Temporal Information Full Dates Option"),
    ProfileOption("retain-longitudinal-modified-dates", "rtnLongModifDatesOpt", "113107",
                  "Retain Longitudinal Temporal Information Modified Dates Option"),
    ProfileOption("retain-patient-characteristics", "rtnPatCharsOpt", "113108",
                  "Retain Patient Characteristics Option"),
    ProfileOption("retain-device-identity", "rtnDevIdOpt", "113109",
                  "Retain Device Identity Option"),
    ProfileOption("retain-uids", "rtnUIDsOpt", "113110", "Retain UIDs Option"),
    ProfileOption("retain-safe-private", "rtnSafePrivOpt", "113111", "Retain Safe Private Option",
                  "medfound has no list of safe private attributes; every private attribute "
                  "is removed"),
    ProfileOption("retain-institution-identity", "rtnInstIdOpt", "113112",
                  "Retain Institution Identity Option"),
)
OPTIONS_BY_NAME = {opt.name: opt for opt in OPTIONS}
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES = OPTIONS_BY_NAME["retain-longitudinal-modified-dates"]
FULL_DATES = OPTIONS_BY_NAME["retain-longitudinal-full-dates"]
STRUCTURED_CONTENT = OPTIONS_BY_NAME["clean-structured-content"]


def _words(text: str) -> str:
    """An option's name reduced to its words: "Retain Longitudinal Temporal Information with
    Modified Dates", its CID 7050 meaning and "retain-longitudinal-modified-dates" agree."""
    words = re.findall(r"[a-z]+", text.lower())
    return " ".join(w for w in words if w not in ("with", "option", "temporal", "information"))


def select_options(names, remove_dates: bool = False) -> tuple[ProfileOption, ...]:
    """The options named in `names` (CLI names, or the meanings of CID 7050), in `OPTIONS` order.

    Dates follow Retain Longitudinal Temporal Information with Modified Dates unless
    `remove_dates` is set or the Full Dates option is named. Raises `MedfoundError` for an
    unknown or unsupported name and for a contradiction (both date options, or a date option
    with `remove_dates`).
    """
    chosen = set()
    by_words = {_words(text): opt for opt in OPTIONS for text in (opt.name, opt.meaning)}
    for raw in names or ():
        opt = by_words.get(_words(str(raw)))
        if opt is None:
            raise MedfoundError(f"unknown de-identification option {raw!r}",
                                hint="choose from " + ", ".join(
                                    o.name for o in OPTIONS if not o.unsupported))
        if opt.unsupported:
            raise MedfoundError(f"option {opt.name!r} is not supported: {opt.unsupported}")
        chosen.add(opt)
    if FULL_DATES in chosen and MODIFIED_DATES in chosen:
        raise MedfoundError("the full-dates and modified-dates options exclude each other",
                            hint="choose one of them")
    if remove_dates and chosen & {FULL_DATES, MODIFIED_DATES}:
        raise MedfoundError("--remove-dates contradicts the retain-longitudinal options",
                            hint="drop --remove-dates or the date option")
    if not remove_dates and FULL_DATES not in chosen:
        chosen.add(MODIFIED_DATES)
    return tuple(opt for opt in OPTIONS if opt in chosen)


# BEGIN GENERATED TABLE E.1-1
# Generated by scripts/make_deid_profile.py from innolitics/dicom-standard 8670abdd9ad16c61af5146ef857899699bdd9c5f standard/confidentiality_profile_attributes.json (DICOM PS3.15 2024b, Table E.1-1); do not edit by hand.
TABLE_SOURCE = 'innolitics/dicom-standard 8670abdd9ad16c61af5146ef857899699bdd9c5f standard/confidentiality_profile_attributes.json (DICOM PS3.15 2024b, Table E.1-1)'

# tag → (Basic Profile action, {option column: action}).
TABLE_E1_1: dict[int, tuple[str, dict[str, str]]] = {
    0x00001000: ("X", {"rtnUIDsOpt": "K"}),  # (0000,1000) Affected SOP Instance UID
    0x00001001: ("U", {"rtnUIDsOpt": "K"}),  # (0000,1001) Requested SOP Instance UID
    0x00020003: ("U", {"rtnUIDsOpt": "K"}),  # (0002,0003) Media Storage SOP Instance UID
    0x00041511: ("U", {"rtnUIDsOpt": "K"}),  # (0004,1511) Referenced SOP Instance UID in File
    0x00080012: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0012) Instance Creation Date
    0x00080013: ("X/Z/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0013) Instance Creation Time
    0x00080014: ("U", {"rtnUIDsOpt": "K"}),  # (0008,0014) Instance Creator UID
    0x00080015: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0015) Instance Coercion DateTime
    0x00080017: ("U", {"rtnUIDsOpt": "K"}),  # (0008,0017) Acquisition UID
    0x00080018: ("U", {"rtnUIDsOpt": "K"}),  # (0008,0018) SOP Instance UID
    0x00080019: ("U", {"rtnUIDsOpt": "K"}),  # (0008,0019) Pyramid UID
    0x00080020: ("Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0020) Study Date
    0x00080021: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0021) Series Date
    0x00080022: ("X/Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0022) Acquisition Date
    0x00080023: ("Z/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0023) Content Date
    0x00080024: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0024) Overlay Date
    0x00080025: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0025) Curve Date
    0x0008002A: ("X/Z/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,002A) Acquisition DateTime
    0x00080030: ("Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0030) Study Time
    0x00080031: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0031) Series Time
    0x00080032: ("X/Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0032) Acquisition Time
    0x00080033: ("Z/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0033) Content Time
    0x00080034: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0034) Overlay Time
    0x00080035: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0035) Curve Time
    0x00080050: ("Z", {}),  # (0008,0050) Accession Number
    0x00080054: ("X", {"rtnDevIdOpt": "C"}),  # (0008,0054) Retrieve AE Title
    0x00080055: ("X", {"rtnDevIdOpt": "C"}),  # (0008,0055) Station AE Title
    0x00080058: ("U", {"rtnUIDsOpt": "K"}),  # (0008,0058) Failed SOP Instance UID List
    0x00080080: ("X/Z/D", {"rtnInstIdOpt": "K"}),  # (0008,0080) Institution Name
    0x00080081: ("X", {"rtnInstIdOpt": "K"}),  # (0008,0081) Institution Address
    0x00080082: ("X/Z/D", {"rtnInstIdOpt": "K"}),  # (0008,0082) Institution Code Sequence
    0x00080090: ("Z", {}),  # (0008,0090) Referring Physician's Name
    0x00080092: ("X", {}),  # (0008,0092) Referring Physician's Address
    0x00080094: ("X", {}),  # (0008,0094) Referring Physician's Telephone Numbers
    0x00080096: ("X", {}),  # (0008,0096) Referring Physician Identification Sequence
    0x0008009C: ("Z", {}),  # (0008,009C) Consulting Physician's Name
    0x0008009D: ("X", {}),  # (0008,009D) Consulting Physician Identification Sequence
    0x00080106: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0106) Context Group Version
    0x00080107: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0107) Context Group Local Version
    0x00080201: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0008,0201) Timezone Offset From UTC
    0x00081000: ("X", {"rtnDevIdOpt": "C"}),  # (0008,1000) Network ID
    0x00081010: ("X/Z/D", {"rtnDevIdOpt": "K"}),  # (0008,1010) Station Name
    0x00081030: ("X", {"cleanDescOpt": "C"}),  # (0008,1030) Study Description
    0x0008103E: ("X", {"cleanDescOpt": "C"}),  # (0008,103E) Series Description
    0x00081040: ("X", {"rtnInstIdOpt": "K"}),  # (0008,1040) Institutional Department Name
    0x00081041: ("X", {"rtnInstIdOpt": "K"}),  # (0008,1041) Institutional Department Type Code Sequence
    0x00081048: ("X", {}),  # (0008,1048) Physician(s) of Record
    0x00081049: ("X", {}),  # (0008,1049) Physician(s) of Record Identification Sequence
    0x00081050: ("X", {}),  # (0008,1050) Performing Physician's Name
    0x00081052: ("X", {}),  # (0008,1052) Performing Physician Identification Sequence
    0x00081060: ("X", {}),  # (0008,1060) Name of Physician(s) Reading Study
    0x00081062: ("X", {}),  # (0008,1062) Physician(s) Reading Study Identification Sequence
    0x00081070: ("X/Z/D", {}),  # (0008,1070) Operators' Name
    0x00081072: ("X/D", {}),  # (0008,1072) Operator Identification Sequence
    0x00081080: ("X", {"cleanDescOpt": "C"}),  # (0008,1080) Admitting Diagnoses Description
    0x00081084: ("X", {"cleanDescOpt": "C"}),  # (0008,1084) Admitting Diagnoses Code Sequence
    0x00081088: ("X", {"cleanDescOpt": "C"}),  # (0008,1088) Pyramid Description
    0x00081110: ("X/Z", {"rtnUIDsOpt": "K"}),  # (0008,1110) Referenced Study Sequence
    0x00081111: ("X/Z/D", {"rtnUIDsOpt": "K"}),  # (0008,1111) Referenced Performed Procedure Step Sequence
    0x00081120: ("X", {"rtnUIDsOpt": "K"}),  # (0008,1120) Referenced Patient Sequence
    0x00081140: ("X/Z/U*", {"rtnUIDsOpt": "K"}),  # (0008,1140) Referenced Image Sequence
    0x00081155: ("U", {"rtnUIDsOpt": "K"}),  # (0008,1155) Referenced SOP Instance UID
    0x00081195: ("U", {"rtnUIDsOpt": "K"}),  # (0008,1195) Transaction UID
    0x00082111: ("X", {"cleanDescOpt": "C"}),  # (0008,2111) Derivation Description
    0x00082112: ("X/Z/U*", {"rtnUIDsOpt": "K"}),  # (0008,2112) Source Image Sequence
    0x00083010: ("U", {"rtnUIDsOpt": "K"}),  # (0008,3010) Irradiation Event UID
    0x00084000: ("X", {"cleanDescOpt": "C"}),  # (0008,4000) Identifying Comments
    0x00100010: ("Z", {}),  # (0010,0010) Patient's Name
    0x00100020: ("Z/D", {}),  # (0010,0020) Patient ID
    0x00100021: ("X", {}),  # (0010,0021) Issuer of Patient ID
    0x00100030: ("Z", {}),  # (0010,0030) Patient's Birth Date
    0x00100032: ("X", {}),  # (0010,0032) Patient's Birth Time
    0x00100040: ("Z", {"rtnPatCharsOpt": "K"}),  # (0010,0040) Patient's Sex
    0x00100050: ("X", {}),  # (0010,0050) Patient's Insurance Plan Code Sequence
    0x00100101: ("X", {}),  # (0010,0101) Patient's Primary Language Code Sequence
    0x00100102: ("X", {}),  # (0010,0102) Patient's Primary Language Modifier Code Sequence
    0x00101000: ("X", {}),  # (0010,1000) Other Patient IDs
    0x00101001: ("X", {}),  # (0010,1001) Other Patient Names
    0x00101002: ("X", {}),  # (0010,1002) Other Patient IDs Sequence
    0x00101005: ("X", {}),  # (0010,1005) Patient's Birth Name
    0x00101010: ("X", {"rtnPatCharsOpt": "K"}),  # (0010,1010) Patient's Age
    0x00101020: ("X", {"rtnPatCharsOpt": "K"}),  # (0010,1020) Patient's Size
    0x00101030: ("X", {"rtnPatCharsOpt": "K"}),  # (0010,1030) Patient's Weight
    0x00101040: ("X", {}),  # (0010,1040) Patient's Address
    0x00101050: ("X", {}),  # (0010,1050) Insurance Plan Identification
    0x00101060: ("X", {}),  # (0010,1060) Patient's Mother's Birth Name
    0x00101080: ("X", {}),  # (0010,1080) Military Rank
    0x00101081: ("X", {}),  # (0010,1081) Branch of Service
    0x00101090: ("X", {}),  # (0010,1090) Medical Record Locator
    0x00101100: ("X", {}),  # (0010,1100) Referenced Patient Photo Sequence
    0x00102000: ("X", {"cleanDescOpt": "C"}),  # (0010,2000) Medical Alerts
    0x00102110: ("X", {"rtnPatCharsOpt": "C", "cleanDescOpt": "C"}),  # (0010,2110) Allergies
    0x00102150: ("X", {}),  # (0010,2150) Country of Residence
    0x00102152: ("X", {}),  # (0010,2152) Region of Residence
    0x00102154: ("X", {}),  # (0010,2154) Patient's Telephone Numbers
    0x00102155: ("X", {}),  # (0010,2155) Patient's Telecom Information
    0x00102160: ("X", {"rtnPatCharsOpt": "K"}),  # (0010,2160) Ethnic Group
    0x00102180: ("X", {"cleanDescOpt": "C"}),  # (0010,2180) Occupation
    0x001021A0: ("X", {"rtnPatCharsOpt": "K"}),  # (0010,21A0) Smoking Status
    0x001021B0: ("X", {"cleanDescOpt": "C"}),  # (0010,21B0) Additional Patient History
    0x001021C0: ("X", {"rtnPatCharsOpt": "K"}),  # (0010,21C0) Pregnancy Status
    0x001021D0: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0010,21D0) Last Menstrual Date
    0x001021F0: ("X", {}),  # (0010,21F0) Patient's Religious Preference
    0x00102203: ("X/Z", {"rtnPatCharsOpt": "K"}),  # (0010,2203) Patient's Sex Neutered
    0x00102297: ("X", {}),  # (0010,2297) Responsible Person
    0x00102299: ("X", {}),  # (0010,2299) Responsible Organization
    0x00104000: ("X", {"cleanDescOpt": "C"}),  # (0010,4000) Patient Comments
    0x00120010: ("D", {}),  # (0012,0010) Clinical Trial Sponsor Name
    0x00120020: ("D", {}),  # (0012,0020) Clinical Trial Protocol ID
    0x00120021: ("Z", {}),  # (0012,0021) Clinical Trial Protocol Name
    0x00120022: ("X", {}),  # (0012,0022) Issuer of Clinical Trial Protocol ID
    0x00120023: ("X", {}),  # (0012,0023) Other Clinical Trial Protocol IDs Sequence
    0x00120030: ("Z", {"rtnInstIdOpt": "K"}),  # (0012,0030) Clinical Trial Site ID
    0x00120031: ("Z", {"rtnInstIdOpt": "K"}),  # (0012,0031) Clinical Trial Site Name
    0x00120032: ("X", {}),  # (0012,0032) Issuer of Clinical Trial Site ID
    0x00120040: ("D", {}),  # (0012,0040) Clinical Trial Subject ID
    0x00120041: ("X", {}),  # (0012,0041) Issuer of Clinical Trial Subject ID
    0x00120042: ("D", {}),  # (0012,0042) Clinical Trial Subject Reading ID
    0x00120043: ("X", {}),  # (0012,0043) Issuer of Clinical Trial Subject Reading ID
    0x00120050: ("Z", {}),  # (0012,0050) Clinical Trial Time Point ID
    0x00120051: ("X", {"cleanDescOpt": "C"}),  # (0012,0051) Clinical Trial Time Point Description
    0x00120055: ("X", {}),  # (0012,0055) Issuer of Clinical Trial Time Point ID
    0x00120060: ("Z", {"rtnInstIdOpt": "K"}),  # (0012,0060) Clinical Trial Coordinating Center Name
    0x00120071: ("X", {}),  # (0012,0071) Clinical Trial Series ID
    0x00120072: ("X", {"cleanDescOpt": "C"}),  # (0012,0072) Clinical Trial Series Description
    0x00120073: ("X", {}),  # (0012,0073) Issuer of Clinical Trial Series ID
    0x00120081: ("D", {"rtnInstIdOpt": "K"}),  # (0012,0081) Clinical Trial Protocol Ethics Committee Name
    0x00120082: ("X", {}),  # (0012,0082) Clinical Trial Protocol Ethics Committee Approval Number
    0x00120086: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0012,0086) Ethics Committee Approval Effectiveness Start Date
    0x00120087: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0012,0087) Ethics Committee Approval Effectiveness End Date
    0x0014407C: ("X", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0014,407C) Calibration Time
    0x0014407E: ("X", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0014,407E) Calibration Date
    0x0016002B: ("X", {"cleanDescOpt": "C"}),  # (0016,002B) Maker Note
    0x0016004B: ("X", {"cleanDescOpt": "C"}),  # (0016,004B) Device Setting Description
    0x0016004D: ("X", {}),  # (0016,004D) Camera Owner Name
    0x0016004E: ("X", {"rtnDevIdOpt": "K"}),  # (0016,004E) Lens Specification
    0x0016004F: ("X", {"rtnDevIdOpt": "K"}),  # (0016,004F) Lens Make
    0x00160050: ("X", {"rtnDevIdOpt": "K"}),  # (0016,0050) Lens Model
    0x00160051: ("X", {"rtnDevIdOpt": "K"}),  # (0016,0051) Lens Serial Number
    0x00160070: ("X", {}),  # (0016,0070) GPS Version ID
    0x00160071: ("X", {}),  # (0016,0071) GPS Latitude Ref
    0x00160072: ("X", {}),  # (0016,0072) GPS Latitude
    0x00160073: ("X", {}),  # (0016,0073) GPS Longitude Ref
    0x00160074: ("X", {}),  # (0016,0074) GPS Longitude
    0x00160075: ("X", {}),  # (0016,0075) GPS Altitude Ref
    0x00160076: ("X", {}),  # (0016,0076) GPS Altitude
    0x00160077: ("X", {}),  # (0016,0077) GPS Time Stamp
    0x00160078: ("X", {}),  # (0016,0078) GPS Satellites
    0x00160079: ("X", {}),  # (0016,0079) GPS Status
    0x0016007A: ("X", {}),  # (0016,007A) GPS Measure Mode
    0x0016007B: ("X", {}),  # (0016,007B) GPS DOP
    0x0016007C: ("X", {}),  # (0016,007C) GPS Speed Ref
    0x0016007D: ("X", {}),  # (0016,007D) GPS Speed
    0x0016007E: ("X", {}),  # (0016,007E) GPS Track Ref
    0x0016007F: ("X", {}),  # (0016,007F) GPS Track
    0x00160080: ("X", {}),  # (0016,0080) GPS Img Direction Ref
    0x00160081: ("X", {}),  # (0016,0081) GPS Img Direction
    0x00160082: ("X", {}),  # (0016,0082) GPS Map Datum
    0x00160083: ("X", {}),  # (0016,0083) GPS Dest Latitude Ref
    0x00160084: ("X", {}),  # (0016,0084) GPS Dest Latitude
    0x00160085: ("X", {}),  # (0016,0085) GPS Dest Longitude Ref
    0x00160086: ("X", {}),  # (0016,0086) GPS Dest Longitude
    0x00160087: ("X", {}),  # (0016,0087) GPS Dest Bearing Ref
    0x00160088: ("X", {}),  # (0016,0088) GPS Dest Bearing
    0x00160089: ("X", {}),  # (0016,0089) GPS Dest Distance Ref
    0x0016008A: ("X", {}),  # (0016,008A) GPS Dest Distance
    0x0016008B: ("X", {}),  # (0016,008B) GPS Processing Method
    0x0016008C: ("X", {}),  # (0016,008C) GPS Area Information
    0x0016008D: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0016,008D) GPS Date Stamp
    0x0016008E: ("X", {}),  # (0016,008E) GPS Differential
    0x00180010: ("Z/D", {"cleanDescOpt": "C"}),  # (0018,0010) Contrast/Bolus Agent
    0x00180027: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,0027) Intervention Drug Stop Time
    0x00180035: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,0035) Intervention Drug Start Time
    0x00181000: ("X/Z/D", {"rtnDevIdOpt": "K"}),  # (0018,1000) Device Serial Number
    0x00181002: ("U", {"rtnUIDsOpt": "K", "rtnDevIdOpt": "K"}),  # (0018,1002) Device UID
    0x00181004: ("X", {"rtnDevIdOpt": "K"}),  # (0018,1004) Plate ID
    0x00181005: ("X", {"rtnDevIdOpt": "K"}),  # (0018,1005) Generator ID
    0x00181007: ("X", {"rtnDevIdOpt": "K"}),  # (0018,1007) Cassette ID
    0x00181008: ("X", {"rtnDevIdOpt": "K"}),  # (0018,1008) Gantry ID
    0x00181009: ("X", {"rtnDevIdOpt": "K"}),  # (0018,1009) Unique Device Identifier
    0x0018100A: ("X", {"rtnDevIdOpt": "K"}),  # (0018,100A) UDI Sequence
    0x0018100B: ("U", {"rtnUIDsOpt": "K", "rtnDevIdOpt": "K"}),  # (0018,100B) Manufacturer's Device Class UID
    0x00181012: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1012) Date of Secondary Capture
    0x00181014: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1014) Time of Secondary Capture
    0x00181030: ("X/D", {"cleanDescOpt": "C"}),  # (0018,1030) Protocol Name
    0x00181042: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1042) Contrast/Bolus Start Time
    0x00181043: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1043) Contrast/Bolus Stop Time
    0x00181072: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1072) Radiopharmaceutical Start Time
    0x00181073: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1073) Radiopharmaceutical Stop Time
    0x00181078: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1078) Radiopharmaceutical Start DateTime
    0x00181079: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1079) Radiopharmaceutical Stop DateTime
    0x001811BB: ("D", {"cleanDescOpt": "C"}),  # (0018,11BB) Acquisition Field Of View Label
    0x00181200: ("X", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1200) Date of Last Calibration
    0x00181201: ("X", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1201) Time of Last Calibration
    0x00181202: ("X", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1202) DateTime of Last Calibration
    0x00181203: ("Z", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1203) Calibration DateTime
    0x00181204: ("X", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1204) Date of Manufacture
    0x00181205: ("X", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,1205) Date of Installation
    0x00181400: ("X/D", {"cleanDescOpt": "C"}),  # (0018,1400) Acquisition Device Processing Description
    0x00182042: ("U", {"rtnUIDsOpt": "K"}),  # (0018,2042) Target UID
    0x00184000: ("X", {"cleanDescOpt": "C"}),  # (0018,4000) Acquisition Comments
    0x00185011: ("X", {"rtnDevIdOpt": "K"}),  # (0018,5011) Transducer Identification Sequence
    0x0018700A: ("X/D", {"rtnDevIdOpt": "K"}),  # (0018,700A) Detector ID
    0x0018700C: ("X/D", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,700C) Date of Last Detector Calibration
    0x0018700E: ("X/D", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,700E) Time of Last Detector Calibration
    0x00189074: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,9074) Frame Acquisition DateTime
    0x00189151: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,9151) Frame Reference DateTime
    0x00189185: ("X", {"cleanDescOpt": "C"}),  # (0018,9185) Respiratory Motion Compensation Technique Description
    0x00189367: ("D", {"rtnDevIdOpt": "K"}),  # (0018,9367) X-Ray Source ID
    0x00189369: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,9369) Source Start DateTime
    0x0018936A: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,936A) Source End DateTime
    0x00189371: ("D", {"rtnDevIdOpt": "K"}),  # (0018,9371) X-Ray Detector ID
    0x00189373: ("X", {"rtnDevIdOpt": "K"}),  # (0018,9373) X-Ray Detector Label
    0x0018937B: ("X", {"cleanDescOpt": "C"}),  # (0018,937B) Multi-energy Acquisition Description
    0x0018937F: ("X", {"cleanDescOpt": "C"}),  # (0018,937F) Decomposition Description
    0x00189424: ("X", {"cleanDescOpt": "C"}),  # (0018,9424) Acquisition Protocol Description
    0x00189516: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,9516) Start Acquisition DateTime
    0x00189517: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,9517) End Acquisition DateTime
    0x00189623: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,9623) Functional Sync Pulse
    0x00189701: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,9701) Decay Correction DateTime
    0x00189804: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,9804) Exclusion Start DateTime
    0x00189919: ("Z/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,9919) Instruction Performed DateTime
    0x00189937: ("X", {"cleanDescOpt": "C"}),  # (0018,9937) Requested Series Description
    0x0018A002: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0018,A002) Contribution DateTime
    0x0018A003: ("X", {"cleanDescOpt": "C"}),  # (0018,A003) Contribution Description
    0x0020000D: ("U", {"rtnUIDsOpt": "K"}),  # (0020,000D) Study Instance UID
    0x0020000E: ("U", {"rtnUIDsOpt": "K"}),  # (0020,000E) Series Instance UID
    0x00200010: ("Z", {}),  # (0020,0010) Study ID
    0x00200027: ("X", {"cleanDescOpt": "C"}),  # (0020,0027) Pyramid Label
    0x00200052: ("U", {"rtnUIDsOpt": "K"}),  # (0020,0052) Frame of Reference UID
    0x00200200: ("U", {"rtnUIDsOpt": "K"}),  # (0020,0200) Synchronization Frame of Reference UID
    0x00203401: ("X", {"rtnDevIdOpt": "K"}),  # (0020,3401) Modifying Device ID
    0x00203403: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0020,3403) Modified Image Date
    0x00203405: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0020,3405) Modified Image Time
    0x00203406: ("X", {}),  # (0020,3406) Modified Image Description
    0x00204000: ("X", {"cleanDescOpt": "C"}),  # (0020,4000) Image Comments
    0x00209158: ("X", {"cleanDescOpt": "C"}),  # (0020,9158) Frame Comments
    0x00209161: ("U", {"rtnUIDsOpt": "K"}),  # (0020,9161) Concatenation UID
    0x00209164: ("U", {"rtnUIDsOpt": "K"}),  # (0020,9164) Dimension Organization UID
    0x00281199: ("U", {"rtnUIDsOpt": "K"}),  # (0028,1199) Palette Color Lookup Table UID
    0x00281214: ("U", {"rtnUIDsOpt": "K"}),  # (0028,1214) Large Palette Color Lookup Table UID
    0x00284000: ("X", {}),  # (0028,4000) Image Presentation Comments
    0x00320012: ("X", {}),  # (0032,0012) Study ID Issuer
    0x00320032: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,0032) Study Verified Date
    0x00320033: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,0033) Study Verified Time
    0x00320034: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,0034) Study Read Date
    0x00320035: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,0035) Study Read Time
    0x00321000: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,1000) Scheduled Study Start Date
    0x00321001: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,1001) Scheduled Study Start Time
    0x00321010: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,1010) Scheduled Study Stop Date
    0x00321011: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,1011) Scheduled Study Stop Time
    0x00321020: ("X", {"rtnDevIdOpt": "K"}),  # (0032,1020) Scheduled Study Location
    0x00321021: ("X", {"rtnDevIdOpt": "C"}),  # (0032,1021) Scheduled Study Location AE Title
    0x00321030: ("X", {"cleanDescOpt": "C"}),  # (0032,1030) Reason for Study
    0x00321032: ("X", {}),  # (0032,1032) Requesting Physician
    0x00321033: ("X", {}),  # (0032,1033) Requesting Service
    0x00321040: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,1040) Study Arrival Date
    0x00321041: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,1041) Study Arrival Time
    0x00321050: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,1050) Study Completion Date
    0x00321051: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0032,1051) Study Completion Time
    0x00321060: ("X/Z", {"cleanDescOpt": "C"}),  # (0032,1060) Requested Procedure Description
    0x00321066: ("X", {"cleanDescOpt": "C"}),  # (0032,1066) Reason for Visit
    0x00321067: ("X", {"cleanDescOpt": "C"}),  # (0032,1067) Reason for Visit Code Sequence
    0x00321070: ("X", {"cleanDescOpt": "C"}),  # (0032,1070) Requested Contrast Agent
    0x00324000: ("X", {"cleanDescOpt": "C"}),  # (0032,4000) Study Comments
    0x00340001: ("D", {}),  # (0034,0001) Flow Identifier Sequence
    0x00340002: ("D", {}),  # (0034,0002) Flow Identifier
    0x00340005: ("D", {}),  # (0034,0005) Source Identifier
    0x00340007: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0034,0007) Frame Origin Timestamp
    0x00380004: ("X", {}),  # (0038,0004) Referenced Patient Alias Sequence
    0x00380010: ("X", {}),  # (0038,0010) Admission ID
    0x00380011: ("X", {}),  # (0038,0011) Issuer of Admission ID
    0x00380014: ("X", {}),  # (0038,0014) Issuer of Admission ID Sequence
    0x0038001A: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0038,001A) Scheduled Admission Date
    0x0038001B: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0038,001B) Scheduled Admission Time
    0x0038001C: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0038,001C) Scheduled Discharge Date
    0x0038001D: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0038,001D) Scheduled Discharge Time
    0x0038001E: ("X", {}),  # (0038,001E) Scheduled Patient Institution Residence
    0x00380020: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0038,0020) Admitting Date
    0x00380021: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0038,0021) Admitting Time
    0x00380030: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0038,0030) Discharge Date
    0x00380032: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0038,0032) Discharge Time
    0x00380040: ("X", {"cleanDescOpt": "C"}),  # (0038,0040) Discharge Diagnosis Description
    0x00380050: ("X", {"rtnPatCharsOpt": "C"}),  # (0038,0050) Special Needs
    0x00380060: ("X", {}),  # (0038,0060) Service Episode ID
    0x00380061: ("X", {}),  # (0038,0061) Issuer of Service Episode ID
    0x00380062: ("X", {"cleanDescOpt": "C"}),  # (0038,0062) Service Episode Description
    0x00380064: ("X", {}),  # (0038,0064) Issuer of Service Episode ID Sequence
    0x00380300: ("X", {}),  # (0038,0300) Current Patient Location
    0x00380400: ("X", {}),  # (0038,0400) Patient's Institution Residence
    0x00380500: ("X", {"rtnPatCharsOpt": "C", "cleanDescOpt": "C"}),  # (0038,0500) Patient State
    0x00384000: ("X", {"cleanDescOpt": "C"}),  # (0038,4000) Visit Comments
    0x003A0310: ("U", {"rtnUIDsOpt": "K"}),  # (003A,0310) Multiplex Group UID
    0x003A0314: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (003A,0314) Impedance Measurement DateTime
    0x003A0329: ("X", {"cleanDescOpt": "C"}),  # (003A,0329) Waveform Filter Description
    0x003A032B: ("X", {"cleanDescOpt": "C"}),  # (003A,032B) Filter Lookup Table Description
    0x00400001: ("X", {"rtnDevIdOpt": "C"}),  # (0040,0001) Scheduled Station AE Title
    0x00400002: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,0002) Scheduled Procedure Step Start Date
    0x00400003: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,0003) Scheduled Procedure Step Start Time
    0x00400004: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,0004) Scheduled Procedure Step End Date
    0x00400005: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,0005) Scheduled Procedure Step End Time
    0x00400006: ("X", {}),  # (0040,0006) Scheduled Performing Physician's Name
    0x00400007: ("X", {"cleanDescOpt": "C"}),  # (0040,0007) Scheduled Procedure Step Description
    0x00400009: ("X", {}),  # (0040,0009) Scheduled Procedure Step ID
    0x0040000B: ("X", {}),  # (0040,000B) Scheduled Performing Physician Identification Sequence
    0x00400010: ("X", {"rtnDevIdOpt": "K"}),  # (0040,0010) Scheduled Station Name
    0x00400011: ("X", {"rtnDevIdOpt": "K"}),  # (0040,0011) Scheduled Procedure Step Location
    0x00400012: ("X", {"rtnPatCharsOpt": "C"}),  # (0040,0012) Pre-Medication
    0x00400241: ("X", {"rtnDevIdOpt": "C"}),  # (0040,0241) Performed Station AE Title
    0x00400242: ("X", {"rtnDevIdOpt": "K"}),  # (0040,0242) Performed Station Name
    0x00400243: ("X", {}),  # (0040,0243) Performed Location
    0x00400244: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,0244) Performed Procedure Step Start Date
    0x00400245: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,0245) Performed Procedure Step Start Time
    0x00400250: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,0250) Performed Procedure Step End Date
    0x00400251: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,0251) Performed Procedure Step End Time
    0x00400253: ("X", {}),  # (0040,0253) Performed Procedure Step ID
    0x00400254: ("X", {"cleanDescOpt": "C"}),  # (0040,0254) Performed Procedure Step Description
    0x00400275: ("X", {"cleanDescOpt": "C"}),  # (0040,0275) Request Attributes Sequence
    0x00400280: ("X", {"cleanDescOpt": "C"}),  # (0040,0280) Comments on the Performed Procedure Step
    0x00400310: ("X", {"cleanDescOpt": "C"}),  # (0040,0310) Comments on Radiation Dose
    0x0040050A: ("X", {}),  # (0040,050A) Specimen Accession Number
    0x00400512: ("D", {}),  # (0040,0512) Container Identifier
    0x00400513: ("Z", {}),  # (0040,0513) Issuer of the Container Identifier Sequence
    0x0040051A: ("X", {"cleanDescOpt": "C"}),  # (0040,051A) Container Description
    0x00400551: ("D", {}),  # (0040,0551) Specimen Identifier
    0x00400554: ("U", {"rtnUIDsOpt": "K"}),  # (0040,0554) Specimen UID
    0x00400555: ("X/Z", {"cleanStructContOpt": "C"}),  # (0040,0555) Acquisition Context Sequence
    0x00400562: ("Z", {}),  # (0040,0562) Issuer of the Specimen Identifier Sequence
    0x00400600: ("X", {"cleanDescOpt": "C"}),  # (0040,0600) Specimen Short Description
    0x00400602: ("X", {"cleanDescOpt": "C"}),  # (0040,0602) Specimen Detailed Description
    0x00400610: ("Z", {"cleanStructContOpt": "C"}),  # (0040,0610) Specimen Preparation Sequence
    0x004006FA: ("X", {}),  # (0040,06FA) Slide Identifier
    0x00401001: ("X", {}),  # (0040,1001) Requested Procedure ID
    0x00401002: ("X", {"cleanDescOpt": "C"}),  # (0040,1002) Reason for the Requested Procedure
    0x00401004: ("X", {}),  # (0040,1004) Patient Transport Arrangements
    0x00401005: ("X", {}),  # (0040,1005) Requested Procedure Location
    0x0040100A: ("X", {"cleanDescOpt": "C"}),  # (0040,100A) Reason for Requested Procedure Code Sequence
    0x00401010: ("X", {}),  # (0040,1010) Names of Intended Recipients of Results
    0x00401011: ("X", {}),  # (0040,1011) Intended Recipients of Results Identification Sequence
    0x00401101: ("D", {}),  # (0040,1101) Person Identification Code Sequence
    0x00401102: ("X", {}),  # (0040,1102) Person's Address
    0x00401103: ("X", {}),  # (0040,1103) Person's Telephone Numbers
    0x00401104: ("X", {}),  # (0040,1104) Person's Telecom Information
    0x00401400: ("X", {"cleanDescOpt": "C"}),  # (0040,1400) Requested Procedure Comments
    0x00402001: ("X", {"cleanDescOpt": "C"}),  # (0040,2001) Reason for the Imaging Service Request
    0x00402004: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,2004) Issue Date of Imaging Service Request
    0x00402005: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,2005) Issue Time of Imaging Service Request
    0x00402008: ("X", {}),  # (0040,2008) Order Entered By
    0x00402009: ("X", {}),  # (0040,2009) Order Enterer's Location
    0x00402010: ("X", {}),  # (0040,2010) Order Callback Phone Number
    0x00402011: ("X", {}),  # (0040,2011) Order Callback Telecom Information
    0x00402016: ("Z", {}),  # (0040,2016) Placer Order Number / Imaging Service Request
    0x00402017: ("Z", {}),  # (0040,2017) Filler Order Number / Imaging Service Request
    0x00402400: ("X", {"cleanDescOpt": "C"}),  # (0040,2400) Imaging Service Request Comments
    0x00403001: ("X", {}),  # (0040,3001) Confidentiality Constraint on Patient Data Description
    0x00404005: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,4005) Scheduled Procedure Step Start DateTime
    0x00404008: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,4008) Scheduled Procedure Step Expiration DateTime
    0x00404010: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,4010) Scheduled Procedure Step Modification DateTime
    0x00404011: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,4011) Expected Completion DateTime
    0x00404023: ("U", {"rtnUIDsOpt": "K"}),  # (0040,4023) Referenced General Purpose Scheduled Procedure Step Transaction UID
    0x00404025: ("X", {"rtnDevIdOpt": "K"}),  # (0040,4025) Scheduled Station Name Code Sequence
    0x00404027: ("X", {"rtnDevIdOpt": "K"}),  # (0040,4027) Scheduled Station Geographic Location Code Sequence
    0x00404028: ("X", {"rtnDevIdOpt": "K"}),  # (0040,4028) Performed Station Name Code Sequence
    0x00404030: ("X", {"rtnDevIdOpt": "K"}),  # (0040,4030) Performed Station Geographic Location Code Sequence
    0x00404034: ("X", {}),  # (0040,4034) Scheduled Human Performers Sequence
    0x00404035: ("X", {}),  # (0040,4035) Actual Human Performers Sequence
    0x00404036: ("X", {}),  # (0040,4036) Human Performer's Organization
    0x00404037: ("X", {}),  # (0040,4037) Human Performer's Name
    0x00404050: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,4050) Performed Procedure Step Start DateTime
    0x00404051: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,4051) Performed Procedure Step End DateTime
    0x00404052: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,4052) Procedure Step Cancellation DateTime
    0x0040A023: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A023) Findings Group Recording Date (Trial)
    0x0040A024: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A024) Findings Group Recording Time (Trial)
    0x0040A027: ("D", {}),  # (0040,A027) Verifying Organization
    0x0040A030: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A030) Verification DateTime
    0x0040A032: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A032) Observation DateTime
    0x0040A033: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A033) Observation Start DateTime
    0x0040A073: ("D", {}),  # (0040,A073) Verifying Observer Sequence
    0x0040A075: ("D", {}),  # (0040,A075) Verifying Observer Name
    0x0040A078: ("X", {}),  # (0040,A078) Author Observer Sequence
    0x0040A07A: ("X", {}),  # (0040,A07A) Participant Sequence
    0x0040A07C: ("X", {}),  # (0040,A07C) Custodial Organization Sequence
    0x0040A082: ("Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A082) Participation DateTime
    0x0040A088: ("Z", {}),  # (0040,A088) Verifying Observer Identification Code Sequence
    0x0040A110: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A110) Date of Document or Verbal Transaction (Trial)
    0x0040A112: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A112) Time of Document Creation or Verbal Transaction (Trial)
    0x0040A120: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A120) DateTime
    0x0040A121: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A121) Date
    0x0040A122: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A122) Time
    0x0040A123: ("D", {}),  # (0040,A123) Person Name
    0x0040A124: ("U", {}),  # (0040,A124) UID
    0x0040A13A: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A13A) Referenced DateTime
    0x0040A171: ("U", {"rtnUIDsOpt": "K"}),  # (0040,A171) Observation UID
    0x0040A172: ("U", {"rtnUIDsOpt": "K"}),  # (0040,A172) Referenced Observation UID (Trial)
    0x0040A192: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A192) Observation Date (Trial)
    0x0040A193: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,A193) Observation Time (Trial)
    0x0040A307: ("X", {}),  # (0040,A307) Current Observer (Trial)
    0x0040A352: ("X", {}),  # (0040,A352) Verbal Source (Trial)
    0x0040A353: ("X", {}),  # (0040,A353) Address (Trial)
    0x0040A354: ("X", {}),  # (0040,A354) Telephone Number (Trial)
    0x0040A358: ("X", {}),  # (0040,A358) Verbal Source Identifier Code Sequence (Trial)
    0x0040A402: ("U", {"rtnUIDsOpt": "K"}),  # (0040,A402) Observation Subject UID (Trial)
    0x0040A730: ("D", {"cleanStructContOpt": "C"}),  # (0040,A730) Content Sequence
    0x0040DB06: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,DB06) Template Version
    0x0040DB07: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,DB07) Template Local Version
    0x0040DB0C: ("U", {"rtnUIDsOpt": "K"}),  # (0040,DB0C) Template Extension Organization UID
    0x0040DB0D: ("U", {"rtnUIDsOpt": "K"}),  # (0040,DB0D) Template Extension Creator UID
    0x0040E004: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0040,E004) HL7 Document Effective Time
    0x00420011: ("D", {}),  # (0042,0011) Encapsulated Document
    0x00440004: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0044,0004) Approval Status DateTime
    0x0044000B: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0044,000B) Product Expiration DateTime
    0x00440010: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0044,0010) Substance Administration DateTime
    0x00440104: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0044,0104) Assertion DateTime
    0x00440105: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0044,0105) Assertion Expiration DateTime
    0x0050001B: ("X", {}),  # (0050,001B) Container Component ID
    0x00500020: ("X", {"rtnDevIdOpt": "K"}),  # (0050,0020) Device Description
    0x00500021: ("X", {"cleanDescOpt": "C"}),  # (0050,0021) Long Device Description
    0x00620021: ("U", {"rtnUIDsOpt": "K"}),  # (0062,0021) Tracking UID
    0x00640003: ("U", {"rtnUIDsOpt": "K"}),  # (0064,0003) Source Frame of Reference UID
    0x00686226: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0068,6226) Effective DateTime
    0x00686270: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0068,6270) Information Issue DateTime
    0x006A0003: ("D", {"rtnUIDsOpt": "K"}),  # (006A,0003) Annotation Group UID
    0x006A0005: ("D", {"cleanDescOpt": "C"}),  # (006A,0005) Annotation Group Label
    0x006A0006: ("X", {"cleanDescOpt": "C"}),  # (006A,0006) Annotation Group Description
    0x00700001: ("D", {"cleanGraphOpt": "C"}),  # (0070,0001) Graphic Annotation Sequence
    0x00700082: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0070,0082) Presentation Creation Date
    0x00700083: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0070,0083) Presentation Creation Time
    0x00700084: ("Z/D", {}),  # (0070,0084) Content Creator's Name
    0x00700086: ("X", {}),  # (0070,0086) Content Creator's Identification Code Sequence
    0x0070031A: ("U", {"rtnUIDsOpt": "K"}),  # (0070,031A) Fiducial UID
    0x00701101: ("U", {"rtnUIDsOpt": "K"}),  # (0070,1101) Presentation Display Collection UID
    0x00701102: ("U", {"rtnUIDsOpt": "K"}),  # (0070,1102) Presentation Sequence Collection UID
    0x0072000A: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0072,000A) Hanging Protocol Creation DateTime
    0x0072005E: ("D", {"rtnDevIdOpt": "C"}),  # (0072,005E) Selector AE Value
    0x0072005F: ("D", {"rtnPatCharsOpt": "K"}),  # (0072,005F) Selector AS Value
    0x00720061: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0072,0061) Selector DA Value
    0x00720063: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0072,0063) Selector DT Value
    0x00720065: ("D", {}),  # (0072,0065) Selector OB Value
    0x00720066: ("D", {"cleanDescOpt": "C"}),  # (0072,0066) Selector LO Value
    0x00720068: ("D", {"cleanDescOpt": "C"}),  # (0072,0068) Selector LT Value
    0x0072006A: ("D", {}),  # (0072,006A) Selector PN Value
    0x0072006B: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0072,006B) Selector TM Value
    0x0072006C: ("D", {"cleanDescOpt": "C"}),  # (0072,006C) Selector SH Value
    0x0072006D: ("D", {}),  # (0072,006D) Selector UN Value
    0x0072006E: ("D", {"cleanDescOpt": "C"}),  # (0072,006E) Selector ST Value
    0x00720070: ("D", {"cleanDescOpt": "C"}),  # (0072,0070) Selector UT Value
    0x00720071: ("D", {}),  # (0072,0071) Selector UR Value
    0x00741234: ("X", {"rtnDevIdOpt": "C"}),  # (0074,1234) Receiving AE
    0x00741236: ("X", {"rtnDevIdOpt": "C"}),  # (0074,1236) Requesting AE
    0x00880140: ("U", {"rtnUIDsOpt": "K"}),  # (0088,0140) Storage Media File-set UID
    0x00880200: ("X", {}),  # (0088,0200) Icon Image Sequence
    0x00880904: ("X", {}),  # (0088,0904) Topic Title
    0x00880906: ("X", {}),  # (0088,0906) Topic Subject
    0x00880910: ("X", {}),  # (0088,0910) Topic Author
    0x00880912: ("X", {}),  # (0088,0912) Topic Keywords
    0x01000420: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0100,0420) SOP Authorization DateTime
    0x04000100: ("U", {}),  # (0400,0100) Digital Signature UID
    0x04000105: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0400,0105) Digital Signature DateTime
    0x04000115: ("D", {}),  # (0400,0115) Certificate of Signer
    0x04000310: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0400,0310) Certified Timestamp
    0x04000402: ("X", {}),  # (0400,0402) Referenced Digital Signature Sequence
    0x04000403: ("X", {}),  # (0400,0403) Referenced SOP Instance MAC Sequence
    0x04000404: ("X", {}),  # (0400,0404) MAC
    0x04000550: ("X", {}),  # (0400,0550) Modified Attributes Sequence
    0x04000551: ("X", {}),  # (0400,0551) Nonconforming Modified Attributes Sequence
    0x04000552: ("X", {}),  # (0400,0552) Nonconforming Data Element Value
    0x04000561: ("X", {}),  # (0400,0561) Original Attributes Sequence
    0x04000562: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (0400,0562) Attribute Modification DateTime
    0x04000563: ("D", {"rtnDevIdOpt": "K"}),  # (0400,0563) Modifying System
    0x04000564: ("Z", {"rtnInstIdOpt": "K"}),  # (0400,0564) Source of Previous Values
    0x04000565: ("D", {"cleanDescOpt": "C"}),  # (0400,0565) Reason for the Attribute Modification
    0x04000600: ("X", {}),  # (0400,0600) Instance Origin Status
    0x20300020: ("X", {}),  # (2030,0020) Text String
    0x21000040: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (2100,0040) Creation Date
    0x21000050: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (2100,0050) Creation Time
    0x21000070: ("X", {"rtnDevIdOpt": "C"}),  # (2100,0070) Originator
    0x21000140: ("D", {"rtnDevIdOpt": "C"}),  # (2100,0140) Destination AE
    0x22000002: ("X/Z", {"cleanDescOpt": "C"}),  # (2200,0002) Label Text
    0x22000005: ("X/Z", {}),  # (2200,0005) Barcode Value
    0x30020121: ("X", {"cleanDescOpt": "C"}),  # (3002,0121) Position Acquisition Template Name
    0x30020123: ("X", {"cleanDescOpt": "C"}),  # (3002,0123) Position Acquisition Template Description
    0x30060002: ("D", {"cleanDescOpt": "C"}),  # (3006,0002) Structure Set Label
    0x30060004: ("X", {"cleanDescOpt": "C"}),  # (3006,0004) Structure Set Name
    0x30060006: ("X", {"cleanDescOpt": "C"}),  # (3006,0006) Structure Set Description
    0x30060008: ("Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3006,0008) Structure Set Date
    0x30060009: ("Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3006,0009) Structure Set Time
    0x30060024: ("U", {"rtnUIDsOpt": "K"}),  # (3006,0024) Referenced Frame of Reference UID
    0x30060026: ("Z", {"cleanDescOpt": "C"}),  # (3006,0026) ROI Name
    0x30060028: ("X", {"cleanDescOpt": "C"}),  # (3006,0028) ROI Description
    0x3006002D: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3006,002D) ROI DateTime
    0x3006002E: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3006,002E) ROI Observation DateTime
    0x30060038: ("X", {"cleanDescOpt": "C"}),  # (3006,0038) ROI Generation Description
    0x3006004D: ("X", {}),  # (3006,004D) ROI Creator Sequence
    0x3006004E: ("X", {}),  # (3006,004E) ROI Interpreter Sequence
    0x30060085: ("X", {"cleanDescOpt": "C"}),  # (3006,0085) ROI Observation Label
    0x30060088: ("X", {"cleanDescOpt": "C"}),  # (3006,0088) ROI Observation Description
    0x300600A6: ("Z", {}),  # (3006,00A6) ROI Interpreter
    0x300600C2: ("U", {"rtnUIDsOpt": "K"}),  # (3006,00C2) Related Frame of Reference UID
    0x30080024: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3008,0024) Treatment Control Point Date
    0x30080025: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3008,0025) Treatment Control Point Time
    0x30080054: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3008,0054) First Treatment Date
    0x30080056: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3008,0056) Most Recent Treatment Date
    0x30080105: ("X/Z", {"rtnDevIdOpt": "K"}),  # (3008,0105) Source Serial Number
    0x30080162: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3008,0162) Safe Position Exit Date
    0x30080164: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3008,0164) Safe Position Exit Time
    0x30080166: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3008,0166) Safe Position Return Date
    0x30080168: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3008,0168) Safe Position Return Time
    0x30080250: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3008,0250) Treatment Date
    0x30080251: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3008,0251) Treatment Time
    0x300A0002: ("D", {"cleanDescOpt": "C"}),  # (300A,0002) RT Plan Label
    0x300A0003: ("X", {"cleanDescOpt": "C"}),  # (300A,0003) RT Plan Name
    0x300A0004: ("X", {"cleanDescOpt": "C"}),  # (300A,0004) RT Plan Description
    0x300A0006: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300A,0006) RT Plan Date
    0x300A0007: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300A,0007) RT Plan Time
    0x300A000B: ("X", {"cleanDescOpt": "C"}),  # (300A,000B) Treatment Sites
    0x300A000E: ("X", {"cleanDescOpt": "C"}),  # (300A,000E) Prescription Description
    0x300A0013: ("U", {"rtnUIDsOpt": "K"}),  # (300A,0013) Dose Reference UID
    0x300A0016: ("X", {"cleanDescOpt": "C"}),  # (300A,0016) Dose Reference Description
    0x300A0072: ("X", {"cleanDescOpt": "C"}),  # (300A,0072) Fraction Group Description
    0x300A0083: ("U", {"rtnUIDsOpt": "K"}),  # (300A,0083) Referenced Dose Reference UID
    0x300A00B2: ("X/Z", {"rtnDevIdOpt": "K"}),  # (300A,00B2) Treatment Machine Name
    0x300A00C3: ("X", {"cleanDescOpt": "C"}),  # (300A,00C3) Beam Description
    0x300A00DD: ("X", {"cleanDescOpt": "C"}),  # (300A,00DD) Bolus Description
    0x300A0196: ("X", {"cleanDescOpt": "C"}),  # (300A,0196) Fixation Device Description
    0x300A01A6: ("X", {"cleanDescOpt": "C"}),  # (300A,01A6) Shielding Device Description
    0x300A01B2: ("X", {"cleanDescOpt": "C"}),  # (300A,01B2) Setup Technique Description
    0x300A0216: ("X", {"rtnDevIdOpt": "K"}),  # (300A,0216) Source Manufacturer
    0x300A022C: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300A,022C) Source Strength Reference Date
    0x300A022E: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300A,022E) Source Strength Reference Time
    0x300A02EB: ("X", {"cleanDescOpt": "C"}),  # (300A,02EB) Compensator Description
    0x300A0608: ("D", {"cleanDescOpt": "C"}),  # (300A,0608) Treatment Position Group Label
    0x300A0609: ("U", {"rtnUIDsOpt": "K"}),  # (300A,0609) Treatment Position Group UID
    0x300A0611: ("Z", {}),  # (300A,0611) RT Accessory Holder Slot ID
    0x300A0615: ("Z", {}),  # (300A,0615) RT Accessory Device Slot ID
    0x300A0619: ("D", {"cleanDescOpt": "C"}),  # (300A,0619) Radiation Dose Identification Label
    0x300A0623: ("D", {"cleanDescOpt": "C"}),  # (300A,0623) Radiation Dose In-Vivo Measurement Label
    0x300A062A: ("D", {"cleanDescOpt": "C"}),  # (300A,062A) RT Tolerance Set Label
    0x300A0650: ("U", {"rtnUIDsOpt": "K"}),  # (300A,0650) Patient Setup UID
    0x300A0676: ("X", {"cleanDescOpt": "C"}),  # (300A,0676) Equipment Frame of Reference Description
    0x300A067C: ("D", {"cleanDescOpt": "C"}),  # (300A,067C) Radiation Generation Mode Label
    0x300A067D: ("Z", {"cleanDescOpt": "C"}),  # (300A,067D) Radiation Generation Mode Description
    0x300A0700: ("U", {"rtnUIDsOpt": "K"}),  # (300A,0700) Treatment Session UID
    0x300A0734: ("D", {"cleanDescOpt": "C"}),  # (300A,0734) Treatment Tolerance Violation Description
    0x300A0736: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300A,0736) Treatment Tolerance Violation DateTime
    0x300A073A: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300A,073A) Recorded RT Control Point DateTime
    0x300A0741: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300A,0741) Interlock DateTime
    0x300A0742: ("D", {"cleanDescOpt": "C"}),  # (300A,0742) Interlock Description
    0x300A0760: ("D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300A,0760) Override DateTime
    0x300A0783: ("D", {"cleanDescOpt": "C"}),  # (300A,0783) Interlock Origin Description
    0x300A0785: ("U", {"rtnUIDsOpt": "K"}),  # (300A,0785) Referenced Treatment Position Group UID
    0x300A078E: ("X", {"cleanDescOpt": "C"}),  # (300A,078E) Patient Treatment Preparation Procedure Parameter Description
    0x300A0792: ("X", {"cleanDescOpt": "C"}),  # (300A,0792) Patient Treatment Preparation Method Description
    0x300A0794: ("X", {"cleanDescOpt": "C"}),  # (300A,0794) Patient Setup Photo Description
    0x300A079A: ("X", {"cleanDescOpt": "C"}),  # (300A,079A) Displacement Reference Label
    0x300C0113: ("X", {"cleanDescOpt": "C"}),  # (300C,0113) Reason for Omission Description
    0x300C0127: ("D", {"rtnDevIdOpt": "K", "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300C,0127) Beam Hold Transition DateTime
    0x300E0004: ("Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300E,0004) Review Date
    0x300E0005: ("Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (300E,0005) Review Time
    0x300E0008: ("X/Z", {}),  # (300E,0008) Reviewer Name
    0x30100006: ("U", {"rtnUIDsOpt": "K"}),  # (3010,0006) Conceptual Volume UID
    0x3010000B: ("U", {"rtnUIDsOpt": "K"}),  # (3010,000B) Referenced Conceptual Volume UID
    0x3010000F: ("Z", {"cleanDescOpt": "C"}),  # (3010,000F) Conceptual Volume Combination Description
    0x30100013: ("U", {"rtnUIDsOpt": "K"}),  # (3010,0013) Constituent Conceptual Volume UID
    0x30100015: ("U", {"rtnUIDsOpt": "K"}),  # (3010,0015) Source Conceptual Volume UID
    0x30100017: ("Z", {"cleanDescOpt": "C"}),  # (3010,0017) Conceptual Volume Description
    0x3010001B: ("Z", {}),  # (3010,001B) Device Alternate Identifier
    0x3010002D: ("D", {"rtnDevIdOpt": "K"}),  # (3010,002D) Device Label
    0x30100031: ("U", {"rtnUIDsOpt": "K"}),  # (3010,0031) Referenced Fiducials UID
    0x30100033: ("D", {"cleanDescOpt": "C"}),  # (3010,0033) User Content Label
    0x30100034: ("D", {"cleanDescOpt": "C"}),  # (3010,0034) User Content Long Label
    0x30100035: ("D", {"cleanDescOpt": "C"}),  # (3010,0035) Entity Label
    0x30100036: ("X", {"cleanDescOpt": "C"}),  # (3010,0036) Entity Name
    0x30100037: ("X", {"cleanDescOpt": "C"}),  # (3010,0037) Entity Description
    0x30100038: ("D", {"cleanDescOpt": "C"}),  # (3010,0038) Entity Long Label
    0x3010003B: ("U", {"rtnUIDsOpt": "K"}),  # (3010,003B) RT Treatment Phase UID
    0x30100043: ("Z", {"rtnDevIdOpt": "K"}),  # (3010,0043) Manufacturer's Device Identifier
    0x3010004C: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3010,004C) Intended Phase Start Date
    0x3010004D: ("X/D", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3010,004D) Intended Phase End Date
    0x30100054: ("D", {"cleanDescOpt": "C"}),  # (3010,0054) RT Prescription Label
    0x30100056: ("X/D", {"cleanDescOpt": "C"}),  # (3010,0056) RT Treatment Approach Label
    0x3010005A: ("Z", {"cleanDescOpt": "C"}),  # (3010,005A) RT Physician Intent Narrative
    0x3010005C: ("Z", {"cleanDescOpt": "C"}),  # (3010,005C) Reason for Superseding
    0x30100061: ("X", {"cleanDescOpt": "C"}),  # (3010,0061) Prior Treatment Dose Description
    0x3010006E: ("U", {"rtnUIDsOpt": "K"}),  # (3010,006E) Dosimetric Objective UID
    0x3010006F: ("U", {"rtnUIDsOpt": "K"}),  # (3010,006F) Referenced Dosimetric Objective UID
    0x30100077: ("X/D", {"cleanDescOpt": "C"}),  # (3010,0077) Treatment Site
    0x3010007A: ("Z", {"cleanDescOpt": "C"}),  # (3010,007A) Treatment Technique Notes
    0x3010007B: ("Z", {"cleanDescOpt": "C"}),  # (3010,007B) Prescription Notes
    0x3010007F: ("Z", {"cleanDescOpt": "C"}),  # (3010,007F) Fractionation Notes
    0x30100081: ("Z", {"cleanDescOpt": "C"}),  # (3010,0081) Prescription Notes Sequence
    0x30100085: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (3010,0085) Intended Fraction Start Time
    0x40000010: ("X", {}),  # (4000,0010) Arbitrary
    0x40004000: ("X", {}),  # (4000,4000) Text Comments
    0x40080040: ("X", {}),  # (4008,0040) Results ID
    0x40080042: ("X", {}),  # (4008,0042) Results ID Issuer
    0x40080100: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (4008,0100) Interpretation Recorded Date
    0x40080101: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (4008,0101) Interpretation Recorded Time
    0x40080102: ("X", {}),  # (4008,0102) Interpretation Recorder
    0x40080108: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (4008,0108) Interpretation Transcription Date
    0x40080109: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (4008,0109) Interpretation Transcription Time
    0x4008010A: ("X", {}),  # (4008,010A) Interpretation Transcriber
    0x4008010B: ("X", {"cleanDescOpt": "C"}),  # (4008,010B) Interpretation Text
    0x4008010C: ("X", {}),  # (4008,010C) Interpretation Author
    0x40080111: ("X", {}),  # (4008,0111) Interpretation Approver Sequence
    0x40080112: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (4008,0112) Interpretation Approval Date
    0x40080113: ("X", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),  # (4008,0113) Interpretation Approval Time
    0x40080114: ("X", {}),  # (4008,0114) Physician Approving Interpretation
    0x40080115: ("X", {"cleanDescOpt": "C"}),  # (4008,0115) Interpretation Diagnosis Description
    0x40080118: ("X", {}),  # (4008,0118) Results Distribution List Sequence
    0x40080119: ("X", {}),  # (4008,0119) Distribution Name
    0x4008011A: ("X", {}),  # (4008,011A) Distribution Address
    0x40080200: ("X", {}),  # (4008,0200) Interpretation ID
    0x40080202: ("X", {}),  # (4008,0202) Interpretation ID Issuer
    0x40080300: ("X", {"cleanDescOpt": "C"}),  # (4008,0300) Impressions
    0x40084000: ("X", {"cleanDescOpt": "C"}),  # (4008,4000) Results Comments
    0xFFFAFFFA: ("X", {}),  # (FFFA,FFFA) Digital Signatures Sequence
    0xFFFCFFFC: ("X", {}),  # (FFFC,FFFC) Data Set Trailing Padding
}

# (mask, value, Basic Profile action, {option column: action}, name)
REPEATING_ROWS: tuple[tuple[int, int, str, dict[str, str], str], ...] = (
    (0xFF000000, 0x50000000, "X", {"cleanGraphOpt": "C"}, "Curve Data"),
    (0xFF00FFFF, 0x60003000, "X", {"cleanGraphOpt": "C"}, "Overlay Data"),
    (0xFF00FFFF, 0x60004000, "X", {"cleanGraphOpt": "C"}, "Overlay Comments"),
)

# Every private attribute (odd group).
PRIVATE_ROW: tuple[str, dict[str, str]] = ("X", {"rtnSafePrivOpt": "C"})
# END GENERATED TABLE E.1-1


# Rows of earlier editions of Table E.1-1 that 2024b no longer lists.
EARLIER_EDITION_ROWS: dict[int, tuple[str, dict[str, str]]] = {
    0x0008010D: ("U", {}),  # (0008,010D) Context Group Extension Creator UID
    0x00089123: ("U", {}),  # (0008,9123) Creator-Version UID
    0x00203404: ("X", {}),  # (0020,3404) Modifying Device ID (retired)
}

# Actions beyond Table E.1-1 (medfound's choice): dates of birth or death in another calendar,
# the issuer qualifiers that travel with other patient identifiers, and the free text of an SR
# TEXT content item (a dummy keeps the item valid).
MEDFOUND_ADDITIONS: dict[int, tuple[str, dict[str, str]]] = {
    0x00100024: ("X", {}),  # (0010,0024) Issuer of Patient ID Qualifiers Sequence
    0x00100033: ("X", {}),  # (0010,0033) Patient's Birth Date in Alternative Calendar
    0x00100034: ("X", {}),  # (0010,0034) Patient's Death Date in Alternative Calendar
    0x0040A160: ("D", {"cleanStructContOpt": "C"}),  # (0040,A160) Text Value
}

# Every single-tag row medfound applies: tag → (basic action, {option column: action}).
ROWS: dict[int, tuple[str, dict[str, str]]] = {
    **EARLIER_EDITION_ROWS, **MEDFOUND_ADDITIONS, **TABLE_E1_1}
# The "Basic Prof." column alone, by tag.
BASIC_PROFILE: dict[int, str] = {tag: row[0] for tag, row in sorted(ROWS.items())}


def row_for(tag: int) -> tuple[str, dict[str, str]] | None:
    """(basic action, {option column: action}) for a public `tag`; None where nothing is listed."""
    row = ROWS.get(tag)
    if row is not None:
        return row
    for mask, value, action, options, _name in REPEATING_ROWS:
        if tag & mask == value:
            return action, options
    return None


def action_for(tag: int, options: tuple[ProfileOption, ...] = ()) -> str | None:
    """The action for a public `tag` under the basic profile and `options`; None where the table
    says nothing (the attribute is kept).

    Private tags (odd groups) are not looked up here: `PRIVATE_ROW` covers all of them.
    """
    row = row_for(tag)
    if row is None:
        return None
    basic, by_option = row
    codes = {by_option[opt.column] for opt in options if opt.column in by_option}
    if "K" in codes:
        return "K"
    if "C" in codes:
        return "C"
    return basic
