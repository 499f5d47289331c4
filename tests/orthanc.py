"""A real Orthanc PACS for tests: started on free 127.0.0.1 ports with a generated configuration.

Debian's packages `orthanc` and `orthanc-dicomweb` provide the server and its DICOMweb plugin
(.ci/run installs them). Where they are missing, `require_orthanc()` skips the test with the
reason, unless MEDFOUND_REQUIRE_ORTHANC=1 (CI) says they must be there: then it fails.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                "/usr/lib/*/orthanc/libOrthancDicomWeb.so*")


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None)


def dicomweb_plugin() -> str | None:
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def require_orthanc() -> tuple[str, str]:
    """(Orthanc binary, DICOMweb plugin) or skip/fail with the reason."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary and plugin:
        return binary, plugin
    missing = " and ".join(n for n, v in (("orthanc", binary), ("orthanc-dicomweb", plugin)) if not v)
    reason = (f"Orthanc is not installed ({missing} missing): "
              "apt-get install -y orthanc orthanc-dicomweb")
    if os.environ.get("MEDFOUND_REQUIRE_ORTHANC") == "1":
        pytest.fail(f"MEDFOUND_REQUIRE_ORTHANC=1 but {reason}")
    pytest.skip(reason)


class Orthanc:
    """One Orthanc process: storage, index and log in `folder`; `start()`, `stop()`, REST."""

    def __init__(self, folder: Path, http_port: int, dicom_port: int, *, aet: str = "ORTHANC",
                 modalities: dict[str, list[Any]] | None = None,
                 dicomweb_servers: dict[str, list[str]] | None = None, tcp_nodelay: bool = True):
        self.binary, plugin = require_orthanc()
        # Orthanc's DICOM stack (DCMTK) disables Nagle's algorithm only with TCP_NODELAY=1 in its
        # environment; without it every instance it sends waits ~40 ms for a delayed ACK.
        self.tcp_nodelay = tcp_nodelay
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port, self.aet = http_port, dicom_port, aet
        self.url = f"http://127.0.0.1:{http_port}"
        self.config = self.folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "medfound-test", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"), "StorageCompression": False,
            "HttpServerEnabled": True, "HttpPort": http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpThreadsCount": 8,
            "DicomServerEnabled": True, "DicomAet": aet, "DicomPort": dicom_port,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
            "DicomScuTimeout": 20, "DicomModalities": modalities or {},
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "Servers": dicomweb_servers or {}},
            "ConcurrentJobs": 2, "SaveJobs": False, "StableAge": 3600,
        }, indent=2))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Orthanc:
        log = open(self.folder / "orthanc.log", "ab")
        env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        if self.tcp_nodelay:
            env["TCP_NODELAY"] = "1"
        self.proc = subprocess.Popen([self.binary, str(self.config)], stdout=log, env=env,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: "
                                   + (self.folder / "orthanc.log").read_text()[-2000:])
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not answer /system in time")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    # --- REST --------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        r = requests.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any = None, data: bytes | None = None,
             timeout: float = 120) -> Any:
        if data is not None:
            r = requests.post(self.url + path, data=data, timeout=timeout,
                              headers={"Content-Type": "application/dicom"})
        else:
            r = requests.post(self.url + path, json=body, timeout=timeout)
        r.raise_for_status()
        return r.json() if r.content else None

    def upload(self, files: list[Path]) -> str:
        """Upload DICOM files; the Orthanc ID of their study (one study)."""
        studies = {self.post("/instances", data=Path(f).read_bytes())["ParentStudy"] for f in files}
        assert len(studies) == 1, studies
        return studies.pop()

    def study_id(self, study_uid: str) -> str | None:
        found = self.post("/tools/lookup", data=study_uid.encode())
        return next((f["ID"] for f in found if f["Type"] == "Study"), None)

    def series_of(self, study_uid: str, modality: str | None = None) -> list[dict[str, Any]]:
        sid = self.study_id(study_uid)
        if sid is None:
            return []
        series = self.get(f"/studies/{sid}/series")
        return [s for s in series
                if modality is None or s["MainDicomTags"].get("Modality") == modality]

    def instance_bytes(self, instance_id: str) -> bytes:
        r = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        r.raise_for_status()
        return r.content
