"""A PACS address and the four things medfound asks of a PACS: find, fetch, store, echo.

An address is one string a user can type:

- ``dicomweb:http://HOST:PORT/PATH`` — DICOMweb (PS3.18): QIDO-RS to find studies, WADO-RS to
  fetch their instances, STOW-RS to store results (dicomweb-client); ``http://USER:PASSWORD@…``
  sends HTTP basic authentication;
- ``dimse:AET@HOST:PORT`` — DICOM networking (PS3.7): C-FIND (study root) to find studies,
  C-GET to fetch them over the same association, C-STORE to store results, C-ECHO (pynetdicom).

Every failure to reach or use the PACS is a `PacsError` naming the address, so that a caller that
retries (medfound serve) can tell it from a bug.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydicom
from pydicom.dataset import Dataset

from medfound.errors import MedfoundError

__all__ = ["DEFAULT_AE_TITLE", "PacsAddress", "PacsError", "check_ae_title", "echo", "find_studies",
           "no_delay",
           "parse_address", "parse_query", "retrieve_study", "store_files"]

DEFAULT_AE_TITLE = "MEDFOUND"
_AET = re.compile(r"^[ -~]{1,16}$")  # PS3.5 AE: 16 printable ASCII characters, no backslash
TIMEOUT_S = 30.0


class PacsError(MedfoundError):
    """The PACS cannot be reached, refused the association, or answered with a failure."""


@dataclass(frozen=True)
class PacsAddress:
    """``kind`` "dicomweb" (``url``) or "dimse" (``ae_title``, ``host``, ``port``)."""

    kind: str
    url: str = ""
    ae_title: str = ""
    host: str = ""
    port: int = 0
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:  # never prints a password
        if self.kind == "dicomweb":
            return f"dicomweb:{self.url}"
        return f"dimse:{self.ae_title}@{self.host}:{self.port}"


def check_ae_title(aet: str, what: str) -> str:
    if not _AET.match(aet) or "\\" in aet or not aet.strip():
        raise MedfoundError(f"{what} {aet!r} is not a DICOM AE title",
                            hint="1 to 16 printable ASCII characters, no backslash")
    return aet


def parse_address(text: str, what: str = "--from") -> PacsAddress:
    """`text` as a PacsAddress; a clear error names the option and shows both forms."""
    forms = "dicomweb:http://HOST:PORT/PATH or dimse:AET@HOST:PORT"
    kind, sep, rest = str(text).partition(":")
    if kind == "dicomweb" and sep:
        parts = urlsplit(rest)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MedfoundError(f"{what} {text!r}: a DICOMweb address is an http(s) URL", hint=forms)
        try:
            port = parts.port
        except ValueError:
            raise MedfoundError(f"{what} {text!r}: the port is not a number", hint=forms) from None
        netloc = parts.hostname + (f":{port}" if port else "")
        url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        return PacsAddress("dicomweb", url=url, username=parts.username, password=parts.password)
    if kind == "dimse" and sep:
        aet, at, hostport = rest.rpartition("@")
        host, colon, port = hostport.rpartition(":")
        if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise MedfoundError(f"{what} {text!r}: a DIMSE address is AET@HOST:PORT", hint=forms)
        return PacsAddress("dimse", ae_title=check_ae_title(aet, f"{what} AE title"),
                           host=host.strip("[]"), port=int(port))
    raise MedfoundError(f"{what} {text!r} is not a PACS address", hint=forms)


def parse_query(pairs: Sequence[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` study-level matching keys (DICOM keywords: PatientID, StudyDate
    (20240101-20240131), ModalitiesInStudy, AccessionNumber, …) as a dict."""
    from pydicom.datadict import tag_for_keyword

    query: dict[str, str] = {}
    for pair in pairs or ():
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise MedfoundError(f"--query {pair!r} is not KEY=VALUE", hint="e.g. --query PatientID=P001")
        if tag_for_keyword(key) is None:
            raise MedfoundError(f"--query {key!r} is not a DICOM keyword",
                                hint="e.g. PatientID, StudyDate, ModalitiesInStudy, AccessionNumber")
        query[key] = value.strip()
    return query


# --- DICOMweb -----------------------------------------------------------------------------


def _web_client(address: PacsAddress):
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if address.username is not None:
        session.auth = (address.username, address.password or "")
    return DICOMwebClient(address.url, session=session, timeout=TIMEOUT_S)


def _web_error(address: PacsAddress, err: Exception, doing: str) -> PacsError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return PacsError(f"{doing} failed ({type(err).__name__}: {first})", path=str(address),
                     hint="check the address, that the PACS is up and that it allows this node")


def _uid_of(item: dict[str, Any], tag: str) -> str | None:
    value = (item.get(tag) or {}).get("Value") or []
    return str(value[0]) if value else None


# --- DIMSE --------------------------------------------------------------------------------


def no_delay(event) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY on the association's socket. pynetdicom leaves Nagle's
    algorithm on, and each small DIMSE response then waits for the peer's delayed ACK (about
    40 ms): a C-GET or C-STORE of a 100-slice series took 5 s instead of a fraction of one."""
    import socket

    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(ae, address: PacsAddress, evt_handlers=(), **kwargs):
    from pynetdicom import evt

    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.maximum_pdu_size = 0  # the PACS may send PDUs of any size (C-GET: fewer, larger reads)
    handlers = [(evt.EVT_CONN_OPEN, no_delay), *evt_handlers]
    try:
        assoc = ae.associate(address.host, address.port, ae_title=address.ae_title,
                             evt_handlers=handlers, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise PacsError(f"cannot associate ({err})", path=str(address),
                        hint="check the address and that the PACS is up") from None
    if not assoc.is_established:
        why = ("rejected the association" if assoc.is_rejected else
               "aborted the association" if assoc.is_aborted else "did not answer")
        raise PacsError(f"the PACS {why}", path=str(address),
                        hint="check that the PACS is up and knows this node's AE title")
    return assoc


def _status_ok(status: Dataset | None) -> int | None:
    """The DIMSE status code, or None when there was no response (association lost)."""
    return None if status is None or "Status" not in status else int(status.Status)


def echo(address: PacsAddress, ae_title: str = DEFAULT_AE_TITLE) -> None:
    """C-ECHO (DIMSE) or a QIDO-RS probe (DICOMweb); PacsError if the PACS does not answer."""
    if address.kind == "dicomweb":
        try:
            _web_client(address).search_for_studies(limit=1)
        except Exception as err:  # requests/HTTP errors of every kind
            raise _web_error(address, err, "QIDO-RS probe") from None
        return
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=check_ae_title(ae_title, "--ae-title"))
    ae.add_requested_context(Verification)
    assoc = _associate(ae, address)
    try:
        code = _status_ok(assoc.send_c_echo())
    finally:
        assoc.release()
    if code != 0:
        raise PacsError(f"C-ECHO answered status {code}", path=str(address))


def find_studies(address: PacsAddress, query: dict[str, str], ae_title: str = DEFAULT_AE_TITLE
                 ) -> list[str]:
    """StudyInstanceUIDs of the studies matching `query` (study level), in the PACS's order."""
    if address.kind == "dicomweb":
        try:
            found = _web_client(address).search_for_studies(search_filters=dict(query),
                                                            get_remaining=True)
        except Exception as err:
            raise _web_error(address, err, "QIDO-RS study search") from None
        return [u for u in (_uid_of(item, "0020000D") for item in found) if u]
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Find

    ae = AE(ae_title=check_ae_title(ae_title, "--ae-title"))
    ae.add_requested_context(Find)
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    for key, value in query.items():
        setattr(ds, key, value)
    assoc = _associate(ae, address)
    uids: list[str] = []
    try:
        for status, identifier in assoc.send_c_find(ds, Find):
            code = _status_ok(status)
            if code is None:
                raise PacsError("C-FIND got no answer (association lost)", path=str(address))
            if code in (0xFF00, 0xFF01) and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", "") or "")
                if uid:
                    uids.append(uid)
            elif code != 0:
                raise PacsError(f"C-FIND answered status 0x{code:04X}", path=str(address),
                                hint="check the query keys and that the PACS allows C-FIND from "
                                     "this AE title")
    finally:
        assoc.release()
    return list(dict.fromkeys(uids))


# Storage classes a C-GET asks to receive (an association holds at most 128 contexts).
_GET_CLASSES = (
    "CTImageStorage", "EnhancedCTImageStorage", "MRImageStorage", "EnhancedMRImageStorage",
    "PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage",
    "UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage",
    "SecondaryCaptureImageStorage", "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "DigitalXRayImageStorageForPresentation", "ComputedRadiographyImageStorage",
    "DigitalMammographyXRayImageStorageForPresentation", "NuclearMedicineImageStorage",
    "XRayAngiographicImageStorage", "RTImageStorage", "RTStructureSetStorage",
    "Comprehensive3DSRStorage", "ComprehensiveSRStorage", "EnhancedSRStorage",
    "BasicTextSRStorage", "KeyObjectSelectionDocumentStorage", "SegmentationStorage",
    "GrayscaleSoftcopyPresentationStateStorage", "EncapsulatedPDFStorage",
)


def retrieve_study(address: PacsAddress, study_uid: str, on_instance: Callable[[bytes], None],
                   ae_title: str = DEFAULT_AE_TITLE) -> int:
    """Fetch every instance of study `study_uid`, calling `on_instance` with each one's bytes
    (a DICOM file: preamble, file meta, data set). Returns the count; PacsError when the PACS
    fails the retrieval (instances received before the failure were passed on already)."""
    if address.kind == "dicomweb":
        n = 0
        try:
            for ds in _web_client(address).iter_study(study_uid):
                on_instance(dataset_bytes(ds))
                n += 1
        except MedfoundError:
            raise
        except Exception as err:
            raise _web_error(address, err, f"WADO-RS retrieval of study {study_uid}") from None
        return n
    from pynetdicom import AE, build_role, evt, sop_class
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Get

    ae = AE(ae_title=check_ae_title(ae_title, "--ae-title"))
    ae.add_requested_context(Get)
    roles = []
    for name in _GET_CLASSES:
        uid = getattr(sop_class, name)
        ae.add_requested_context(uid)
        roles.append(build_role(uid, scp_role=True))
    received = [0]
    failure: list[BaseException] = []

    def handle_store(event) -> int:
        try:
            on_instance(event.encoded_dataset(include_meta=True))
        except BaseException as err:  # a full disk: refuse the instance, stop after the GET
            failure.append(err)
            return 0xA700
        received[0] += 1
        return 0x0000

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    assoc = _associate(ae, address, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    last = None
    try:
        for status, _ in assoc.send_c_get(ds, Get):
            last = _status_ok(status)
            if last is None:
                raise PacsError(f"C-GET of study {study_uid} got no answer (association lost)",
                                path=str(address))
    finally:
        assoc.release()
    if failure:
        raise failure[0]
    if last not in (0x0000, 0xB000):  # B000: some sub-operations failed (reported by count)
        raise PacsError(f"C-GET of study {study_uid} answered status 0x{last or 0:04X}",
                        path=str(address),
                        hint="check that the PACS allows C-GET from this AE title")
    return received[0]


def dataset_bytes(ds: Dataset) -> bytes:
    """`ds` as the bytes of a DICOM file (preamble, file meta, data set)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def store_files(address: PacsAddress, files: Iterable[str | Path],
                ae_title: str = DEFAULT_AE_TITLE) -> int:
    """Store DICOM files (results) in the PACS: STOW-RS or C-STORE. Returns the count stored;
    PacsError when the PACS is down or refuses any of them (nothing is assumed stored then)."""
    datasets = [pydicom.dcmread(str(f)) for f in files]
    if not datasets:
        return 0
    if address.kind == "dicomweb":
        try:
            response = _web_client(address).store_instances(datasets)
        except Exception as err:
            raise _web_error(address, err, "STOW-RS") from None
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            raise PacsError(f"STOW-RS refused {len(failed)} instance(s)", path=str(address),
                            hint="the PACS's log says why")
        return len(datasets)
    from pynetdicom import AE

    ae = AE(ae_title=check_ae_title(ae_title, "--ae-title"))
    for context in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                           for ds in datasets}):
        ae.add_requested_context(*context)
    assoc = _associate(ae, address)
    try:
        for ds in datasets:
            code = _status_ok(assoc.send_c_store(ds))
            if code is None:
                raise PacsError("C-STORE got no answer (association lost)", path=str(address))
            if code != 0 and not 0xB000 <= code <= 0xBFFF:  # Bxxx: stored with a warning
                raise PacsError(f"C-STORE of {ds.SOPInstanceUID} answered status 0x{code:04X}",
                                path=str(address), hint="the PACS's log says why")
    finally:
        if assoc.is_established:
            assoc.release()
    return len(datasets)
