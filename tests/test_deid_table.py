"""The whole of Table E.1-1, row by row, under the default profile and under each option.

One DICOM file holds every attribute the table lists (a value of its VR; a sequence holds one
item with a code, a text and a UID), plus the repeating-group rows (curves, overlays) and a
private block. It is de-identified through `deidentify`, and every row's outcome is checked
against what the table's column says for the options chosen (the option's action where it has
one, K before C, else the basic action), not a sample.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medfound.io.deid import (
    DUMMY_VALUES,
    _deidentify_dataset,
    _Run,
    date_shift_days,
    deidentify,
    keyed_uid,
    patient_shift,
    time_shift_seconds,
)
from medfound.io.deid_profile import OPTIONS_BY_NAME, ROWS, TABLE_E1_1, select_options

KEY = bytes.fromhex("4c" * 32)
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
PATIENT = "Smith^John"
CONTENT_SEQUENCE = 0x0040A730
TOP_PSEUDONYM = (0x00100010, 0x00100020)  # PatientName, PatientID: the keyed pseudonym
FILE_ROWS = {tag: row for tag, row in ROWS.items() if tag >> 16 not in (0x0000, 0x0002)}
DATE_COLUMNS = ("rtnLongFullDatesOpt", "rtnLongModifDatesOpt")


def vr_of(tag: int) -> str:
    return dictionary_VR(tag).split(" or ")[0]


def value_for(vr: str, n: int):
    """A valid value of `vr`; text values hold the patient's surname, which C must take out."""
    text = {"AE": f"AE{n}", "AS": "045Y", "CS": "CSVALUE", "DA": "20200115", "DS": "12.5",
            "DT": "20200115083000.250000", "IS": "7", "LO": f"Smith lo {n}",
            "LT": f"Smith lt {n}", "PN": PATIENT, "SH": f"Smith {n}", "ST": f"Smith st {n}",
            "TM": "083000", "UC": f"Smith uc {n}", "UT": f"Smith ut {n}",
            "UR": "http://smith.example/x", "UI": f"1.2.826.0.1.3680043.10.999.{n}"}
    if vr in text:
        return text[vr]
    if vr in ("FL", "FD"):
        return 1.5
    if vr in ("SL", "SS", "SV", "UL", "US", "UV"):
        return 5
    return b"\x01\x02"  # OB, OW, UN, ...


def item_for(n: int) -> Dataset:
    item = Dataset()
    item.CodeValue = "ITEM1"
    item.CodingSchemeDesignator = "99LOCAL"
    item.CodeMeaning = "Smith item"
    item.ReferencedSOPClassUID = CT_CLASS
    item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.10.998.{n}"
    return item


def table_file(path: Path) -> Dataset:
    ds = Dataset()
    for n, tag in enumerate(sorted(FILE_ROWS)):
        vr = vr_of(tag)
        value = Sequence([item_for(n)]) if vr == "SQ" else value_for(vr, n)
        ds.add_new(tag, vr, value)
    ds.PatientName, ds.PatientID = PATIENT, "MRN-4711"
    ds.SOPClassUID = CT_CLASS
    ds.add_new(0x60000010, "US", 2)  # Overlay Rows: the rest of an overlay plane
    ds.add_new(0x60003000, "OB", b"\x01\x02")  # Overlay Data
    ds.add_new(0x60004000, "LT", "Smith overlay")  # Overlay Comments
    ds.add_new(0x50000005, "US", 1)  # a curve (retired)
    ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x10, "LO", "Smith private")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def effective(tag: int, columns: set[str]) -> str:
    """The table's action for `tag` under the option columns chosen."""
    basic, by_option = ROWS[tag]
    codes = {by_option[c] for c in columns if c in by_option}
    return "K" if "K" in codes else "C" if "C" in codes else basic


def _scrubbed(before: str, after: str) -> bool:
    """C: the surname is gone, text without it is unchanged."""
    if "smith" not in before.lower():
        return after == before
    return "smith" not in after.lower() and "ANONYMIZED" in after


def check_item(code: str, item: Dataset, n: int, retain_uids: bool) -> None:
    uid = f"1.2.826.0.1.3680043.10.998.{n}"
    new_uid = uid if retain_uids else keyed_uid(uid, KEY)
    assert item.ReferencedSOPClassUID == CT_CLASS
    if code in ("D", "X/D", "Z/D", "X/Z/D"):  # a dummy item of the same shape
        assert item.CodeValue == item.CodeMeaning == item.CodingSchemeDesignator == "ANONYMIZED"
        assert item.ReferencedSOPInstanceUID == new_uid
        return
    assert item.CodeValue == "ITEM1" and item.ReferencedSOPInstanceUID == new_uid
    if code == "C":
        assert _scrubbed("Smith item", item.CodeMeaning), item.CodeMeaning
    else:
        assert item.CodeMeaning == "Smith item"


def check_temporal(code: str, vr: str, before: str, after, dates: str) -> None:
    shift = patient_shift("MRN-4711", KEY)
    if code == "K" or (code == "C" and dates == "full"):
        assert after == before
    elif code == "C":
        if vr == "DA":
            moved = datetime.strptime(after, "%Y%m%d") - datetime.strptime(before, "%Y%m%d")
            assert moved.days in (date_shift_days("MRN-4711", KEY),
                                  date_shift_days("MRN-4711", KEY) - 1)  # with its time
        elif vr == "TM":
            secs = (8 * 3600 + 30 * 60 + time_shift_seconds("MRN-4711", KEY)) % 86400
            assert after == f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}"
        else:
            expected = datetime(2020, 1, 15, 8, 30) + shift
            assert after == expected.strftime("%Y%m%d%H%M%S") + ".250000"
    elif code in ("Z", "X/Z"):
        assert after in ("", None)
    else:  # D, X/D, Z/D, X/Z/D
        assert after == DUMMY_VALUES[vr]


def check_row(tag: int, code: str, before: Dataset, after: Dataset, dates: str,
              retain_uids: bool, n: int) -> None:
    vr = vr_of(tag)
    if tag in TOP_PSEUDONYM:
        assert str(after[tag].value).startswith("ANON")
        return
    if code == "X":
        assert tag not in after
        return
    assert tag in after, "removed though the table keeps it"
    value, original = after[tag].value, before[tag].value
    if vr in ("DA", "DT", "TM"):
        check_temporal(code, vr, original, value, dates)
    elif vr == "SQ":
        if code in ("Z", "X/Z"):
            assert len(value) == 0
        else:
            (item,) = value
            check_item("C" if tag == CONTENT_SEQUENCE and code == "D" else code, item, n,
                       retain_uids)
    elif code == "K":
        assert value == original
    elif code in ("Z", "X/Z"):
        assert value in ("", None, b"")
    elif vr == "UI":
        assert value == keyed_uid(original, KEY)
    elif code == "C":
        assert _scrubbed(str(original), str(value)), value
    elif vr in ("OB", "OW", "UN"):
        assert value == b"\0\0"
    else:  # D, X/D, Z/D, X/Z/D, U on a non-UID
        assert value == DUMMY_VALUES[vr], value


CASES = {
    "default": ((), False),
    "remove-dates": ((), True),
    **{name: ((name,), False) for name, opt in OPTIONS_BY_NAME.items()
       if not opt.unsupported and opt.name != "retain-longitudinal-modified-dates"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_row_of_table_e1_1_is_applied_as_the_table_says(tmp_path, case):
    names, remove_dates = CASES[case]
    options = select_options(names, remove_dates)
    columns = {opt.column for opt in options}
    dates = "modified" if "rtnLongModifDatesOpt" in columns else \
        "full" if "rtnLongFullDatesOpt" in columns else "removed"
    key_file = tmp_path / "k.key"
    key_file.write_text(KEY.hex())
    before = table_file(tmp_path / "in" / "all.dcm")
    report = deidentify(tmp_path / "in", tmp_path / "out", key_file=key_file, progress=False,
                        options=names, remove_dates=remove_dates)
    assert report["files_written"] == 1, report
    after = pydicom.dcmread(tmp_path / "out" / "all.dcm")
    retain_uids = "rtnUIDsOpt" in columns

    checked = 0
    for n, tag in enumerate(sorted(FILE_ROWS)):
        code = effective(tag, columns)
        try:
            check_row(tag, code, before, after, dates, retain_uids, n)
        except AssertionError as err:
            raise AssertionError(f"{keyword_for_tag(tag)} ({tag:08X}) {code}: {err}") from None
        checked += 1
    assert checked == len(FILE_ROWS) > len(TABLE_E1_1) - 5  # every row but groups 0000/0002

    # (0002,0003) Media Storage SOP Instance UID: U, and the same as the new SOP Instance UID
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    assert (after.SOPInstanceUID == before.SOPInstanceUID) == retain_uids
    # private attributes; curves and overlays unless Clean Graphics keeps them
    assert not any(e.tag.is_private for e in after)
    graphics = [t for t in (0x60000010, 0x60003000, 0x60004000, 0x50000005) if t in after]
    if case == "clean-graphics":
        assert len(graphics) == 4 and after[0x60003000].value == b"\x01\x02"
        assert "smith" not in after[0x60004000].value.lower()
        assert "Clean Graphics" in report["burned_in_risk"][0]["reason"]
    else:
        assert graphics == []
    # the record: 113100, each option applied, 113104 for the cleaned content tree
    codes = [c.CodeValue for c in after.DeidentificationMethodCodeSequence]
    assert codes == sorted({"113100", "113104"} | {opt.code for opt in options})
    assert all(c.CodingSchemeDesignator == "DCM" for c in after.DeidentificationMethodCodeSequence)
    assert after.PatientIdentityRemoved == "YES" and after.DeidentificationMethod
    assert after.LongitudinalTemporalInformationModified == {
        "modified": "MODIFIED", "full": "UNMODIFIED", "removed": "REMOVED"}[dates]
    assert report["profile_options"] == [opt.name for opt in options]


def test_command_group_rows_are_applied():
    """(0000,1000) Affected SOP Instance UID: X; (0000,1001) Requested SOP Instance UID: U."""
    ds = Dataset()
    ds.add_new(0x00001000, "UI", "1.2.3.4")
    ds.add_new(0x00001001, "UI", "1.2.3.5")
    ds.PatientID = "MRN-4711"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _deidentify_dataset(ds, _Run(key=KEY, options=select_options(())))
    assert 0x00001000 not in ds and ds[0x00001001].value == keyed_uid("1.2.3.5", KEY)


def test_rows_the_2024_table_added_are_listed():
    for tag, code in {0x00120022: "X", 0x00120023: "X", 0x00120032: "X", 0x00120041: "X",
                      0x00120043: "X", 0x00120055: "X", 0x00120073: "X", 0x3006004D: "X",
                      0x3006004E: "X", 0x3006002D: "X", 0x3006002E: "X",
                      0x00160077: "X"}.items():
        assert TABLE_E1_1[tag][0] == code, keyword_for_tag(tag)
    # ROI DateTime is removed by the basic profile, shifted only under Modified Dates
    assert TABLE_E1_1[0x3006002D][1] == {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}
    assert TABLE_E1_1[0x00160077][1] == {}  # GPS Time Stamp: no option keeps it
    assert len(TABLE_E1_1) == 617 and all(re.fullmatch(r"[A-Z/*]+", r[0]) for r in ROWS.values())
