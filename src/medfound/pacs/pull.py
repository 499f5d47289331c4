"""`medfound center pull`: studies from a PACS into a folder that `center prepare` reads.

Studies are chosen by StudyInstanceUID (``--study``), by a study-level query (``--query
PatientID=…``, QIDO-RS or C-FIND), or both. Each instance lands at
``RAW/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (a UID that is not a valid
UID is replaced by its sha256 in the name), written through a temporary file that is linked into
place, so a file there is whole and a rerun of an interrupted pull writes only what is missing.
An existing file is never replaced: one that holds the same bytes counts as already there, one
that holds something else is left alone and reported as a conflict.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom

from medfound.errors import MedfoundError
from medfound.outputs import DiskError, writable_folder, write_once
from medfound.pacs.connection import (
    DEFAULT_AE_TITLE,
    PacsAddress,
    find_studies,
    retrieve_study,
)

__all__ = ["instance_path", "pull_studies", "safe_uid"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_uid(uid: Any) -> str:
    """`uid` if it is a valid DICOM UID (digits and dots, at most 64), else a name made from
    its sha256: a hostile UID cannot make a path leave its folder or collide with a real one."""
    text = str(uid or "")
    if _UID.match(text) and len(text) <= 64:
        return text
    return "x" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def instance_path(root: Path, header: pydicom.Dataset) -> Path:
    """Where an instance goes under `root`: study / series / SOP instance UID."""
    return (root / safe_uid(header.get("StudyInstanceUID")) /
            safe_uid(header.get("SeriesInstanceUID")) /
            f"{safe_uid(header.get('SOPInstanceUID'))}.dcm")


def pull_studies(address: PacsAddress, out: str | Path, *, studies: Sequence[str] = (),
                 query: dict[str, str] | None = None, ae_title: str = DEFAULT_AE_TITLE,
                 report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Fetch the studies named in `studies` and those matching `query` into `out`.

    Returns counts: ``studies`` (one record per study: uid, instances, written, unchanged,
    conflicts, failed, error), and their totals. `report` is called with each study's record.
    Raises MedfoundError when neither studies nor query is given or the query fails; a study
    whose retrieval fails is recorded with its error and the others go on.
    """
    if not studies and not query:
        raise MedfoundError("nothing to pull", hint="name studies with --study UID or match them "
                                                    "with --query KEY=VALUE")
    out = writable_folder(out, "--out folder")
    wanted = list(dict.fromkeys(str(s) for s in studies))
    if query:
        wanted += [u for u in find_studies(address, query, ae_title) if u not in wanted]
    totals = {"written": 0, "unchanged": 0, "conflicts": 0, "failed": 0}
    records = []
    for uid in wanted:
        rec: dict[str, Any] = {"study_uid": uid, "instances": 0, **dict.fromkeys(totals, 0),
                               "conflict_files": []}

        def keep(data: bytes, rec: dict[str, Any] = rec, uid: str = uid) -> None:
            rec["instances"] += 1
            try:
                header = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
            except Exception:  # the PACS sent something that is not DICOM
                rec["failed"] += 1
                return
            if str(header.get("StudyInstanceUID", "")) != uid:
                rec["failed"] += 1  # not of the study asked for: not written
                return
            path = instance_path(out, header)
            path.parent.mkdir(parents=True, exist_ok=True)
            result = write_once(path, data)
            key = {"written": "written", "same": "unchanged", "different": "conflicts"}[result]
            rec[key] += 1
            if result == "different":
                rec["conflict_files"].append(str(path))

        try:
            retrieve_study(address, uid, keep, ae_title)
            if rec["instances"] == 0:
                rec["error"] = "the PACS returned no instance of this study"
        except DiskError:
            raise  # a full or read-only disk: every later study would fail too
        except MedfoundError as err:
            rec["error"] = str(err)
        for k in totals:
            totals[k] += rec[k]
        records.append(rec)
        if report is not None:
            report(rec)
    return {"out": str(out), "from": str(address), "studies": records, "n_studies": len(records),
            "n_failed_studies": sum(1 for r in records if "error" in r), **totals}
