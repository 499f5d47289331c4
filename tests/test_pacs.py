"""A center's inference node against a real PACS: Orthanc sends studies, medfound serve sends
the SR back; `center pull` fetches studies; kills and a PACS that goes down lose nothing.

Orthanc (Debian's `orthanc` and `orthanc-dicomweb`) runs on free 127.0.0.1 ports with a
generated configuration (tests/orthanc.py); without it these tests skip, unless
MEDFOUND_REQUIRE_ORTHANC=1. `medfound serve` and `center pull` run as processes with torch and
MONAI blocked, as on an inference box. The model is an exported tiny detector with random
weights and a zero prior bias: every study gets findings (scores near 0.5).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests

from conftest import BLOCK_TORCH, export_tiny_detector
from orthanc import Orthanc, require_orthanc
from processes import free_port_block, medfound_env

THRESHOLD = "0.3"
CLI = BLOCK_TORCH + "import sys\nfrom medfound.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def medfound(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                          timeout=timeout, env=medfound_env())


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The exported tiny detector and four small phantom CT studies (one per test that sends)."""
    import torch

    from medfound.data.phantoms import make_phantoms
    from medfound.models.detection import DetectorConfig

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pacs")
    phantoms = make_phantoms(root / "phantoms", centers=1, cases=4, seed=11, size="small",
                             progress=False)
    cfg = DetectorConfig.preset("tiny", spacing_mm=[2.8125, 2.8125, 3.0], patch_size=[32, 32, 16],
                                sw_roi_size=[64, 64, 32], score_thresh=0.02)
    export_tiny_detector(root, cfg)
    seg = _export_segmenter(root / "seg")
    studies = sorted(Path(phantoms / "center_0").glob("case_*/ct"))
    return {"root": root, "exp": root / "exp", "seg_exp": seg, "studies": studies,
            "card": json.loads((root / "exp" / "model_card.json").read_text())}


def _export_segmenter(root: Path) -> Path:
    """A tiny segmenter whose head labels every voxel 'nodule' (zero weights, bias favouring
    class 1), exported: enough to carry a DICOM SEG through the node."""
    import torch

    from medfound.export.onnx import export_model_package
    from medfound.models.segmentation import SegmenterConfig, build_segmenter
    from medfound.train.package import save_model_package

    cfg = SegmenterConfig.preset("tiny", spacing_mm=[2.8125, 2.8125, 3.0], patch_size=[32, 32, 16],
                                 sw_roi_size=[64, 64, 32])
    net = build_segmenter(cfg, seed=0)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 1.0]))
    package = save_model_package(root / "model", net, task="nodule_segmentation",
                                 model_config=cfg.to_dict(),
                                 preprocessing={"spacing_mm": cfg.spacing_mm, "hu_window": cfg.hu_window,
                                                "modality": "CT"})  # as train_segmenter records
    export_model_package(package, root / "exp", parity_patches=1, allow_unvalidated=True)
    return root / "exp"


def _files(study: Path) -> list[Path]:
    return sorted(study.glob("*.dcm"))


def _uid(study: Path, keyword: str = "StudyInstanceUID") -> str:
    return str(pydicom.dcmread(_files(study)[0], stop_before_pixels=True).get(keyword))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, setup):
    """One Orthanc for the module, knowing medfound serve as modality 'medfound' (DIMSE) and
    DICOMweb server 'medfound' (STOW-RS) on ports chosen here."""
    require_orthanc()
    base = free_port_block(4)
    ports = {"http": base, "dicom": base + 1, "serve": base + 2, "stow": base + 3}
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), ports["http"], ports["dicom"],
                      modalities={"medfound": ["MEDFOUND", "127.0.0.1", ports["serve"]]},
                      dicomweb_servers={"medfound": [f"http://127.0.0.1:{ports['stow']}/"]})
    orthanc.start()
    try:
        yield {"orthanc": orthanc, "ports": ports}
    finally:
        orthanc.stop()


class Serve:
    """`medfound serve` as a process (torch blocked); stop() ends it, kill() is kill -9."""

    def __init__(self, setup: dict, work: Path, port: int, send_to: str, *extra: str,
                 idle_s: float = 1.5, model: Path | None = None):
        self.work, self.port = work, port
        self.log = work.parent / f"{work.name}.log"
        self.args = ["serve", "--model", str(model or setup["exp"]), "--work", str(work),
                     "--port", str(port), "--bind", "127.0.0.1", "--send-to", send_to,
                     "--idle-s", str(idle_s), "--threshold", THRESHOLD, "--max-findings", "5",
                     "--threads", "1", "--retry-s", "0.5", "--retry-max-s", "2", *extra]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Serve:
        from medfound.pacs.connection import PacsError, echo, parse_address

        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", CLI, *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, env=medfound_env(),
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while True:  # C-ECHO until it answers: the node is up
            assert self.proc.poll() is None, self.log.read_text()
            try:
                echo(parse_address(f"dimse:MEDFOUND@127.0.0.1:{self.port}"), "TESTSCU")
                return self
            except PacsError:
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.3)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def status(self) -> dict:
        proc = medfound("serve", "status", "--work", str(self.work), "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def usage(self) -> list[dict]:
        path = self.work / "usage.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def decisions(self) -> list[dict]:
        return [json.loads(line) for line in (self.work / "decisions.jsonl").read_text().splitlines()]


@pytest.fixture
def serve_procs():
    started: list[Serve] = []
    yield started
    for s in started:
        if isinstance(s, Serve):
            s.kill(signal.SIGTERM)
        elif s.is_established:  # a test's own association
            s.abort()


def _wait_for_sr(orthanc: Orthanc, study_uid: str, timeout: float = 90.0,
                 node: Serve | None = None) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        series = orthanc.series_of(study_uid, "SR")
        if series:
            return series
        time.sleep(0.5)
    raise AssertionError("no SR arrived in Orthanc" + (f":\n{node.log.read_text()}" if node else ""))


def _sr_checks(orthanc: Orthanc, sr_series: dict, study: Path, node: Serve) -> pydicom.Dataset:
    """The SR in Orthanc: same study, a new series, every source instance as evidence, one
    TID 1501 planar ROI group per finding of the node's findings.json, readable by highdicom."""
    import highdicom as hd

    sr = pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_bytes(sr_series["Instances"][0])))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in _files(study)]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.PatientID == sources[0].PatientID
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSOPSequence} == \
        {ds.SOPInstanceUID for ds in sources}
    findings_files = list(node.work.glob("studies/*/results/round_*/*/findings.json"))
    findings = next(json.loads(f.read_text()) for f in findings_files
                    if json.loads(f.read_text())["series_uid"] == sources[0].SeriesInstanceUID)
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()
    assert len(groups) == len(findings["findings"]) > 0
    for group, finding in zip(groups, findings["findings"], strict=True):
        measured = {m.name.meaning: m.value for m in group.get_measurements()}
        assert measured["Diameter"] == pytest.approx(finding["diameter_mm"], abs=0.01)
    return sr


def test_orthanc_sends_a_study_by_c_store_and_the_sr_comes_back_in_the_same_study(
        setup, pacs, tmp_path, serve_procs):
    orthanc, ports = pacs["orthanc"], pacs["ports"]
    node = Serve(setup, tmp_path / "work", ports["serve"],
                 f"dimse:ORTHANC@127.0.0.1:{ports['dicom']}").start()  # C-ECHO answered
    serve_procs.append(node)
    study = setup["studies"][0]
    orthanc_id = orthanc.upload(_files(study))
    job = orthanc.post("/modalities/medfound/store", {"Resources": [orthanc_id], "Synchronous": True})
    assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == len(_files(study))
    sr_series = _wait_for_sr(orthanc, _uid(study), node=node)
    assert len(sr_series) == 1
    _sr_checks(orthanc, sr_series[0], study, node)
    # status: the study is done; usage: one record, hashed, with the model and its times
    status = node.status()
    assert status["node_running"] and status["counts"]["done"] == 1
    assert status["studies"][0]["instances"] == len(_files(study))
    text = medfound("serve", "status", "--work", str(node.work))
    assert text.returncode == 0 and "1 done" in text.stdout
    usage = node.usage()
    assert len(usage) == 1
    u = usage[0]
    assert u["status"] == "stored" and u["instances"] == len(_files(study))
    assert len(u["study"]) == 32 and _uid(study) not in json.dumps(usage)
    assert u["model_sha256"] == setup["card"]["onnx"]["sha256"] and u["engine"] == "onnxruntime"
    assert u["received_first"] <= u["received_last"] <= u["started"] <= u["stored"]


def test_the_same_over_dicomweb_stow_rs_both_ways(setup, pacs, tmp_path, serve_procs):
    orthanc, ports = pacs["orthanc"], pacs["ports"]
    node = Serve(setup, tmp_path / "work", ports["serve"],
                 f"dicomweb:{orthanc.url}/dicom-web", "--stow-port", str(ports["stow"])).start()
    serve_procs.append(node)
    study = setup["studies"][1]
    orthanc_id = orthanc.upload(_files(study))
    orthanc.post("/dicom-web/servers/medfound/stow", {"Resources": [orthanc_id], "Synchronous": True})
    sr_series = _wait_for_sr(orthanc, _uid(study), node=node)
    _sr_checks(orthanc, sr_series[0], study, node)
    assert any(d["detail"].startswith("first instance from STOW-RS") for d in node.decisions())
    status = requests.get(f"http://127.0.0.1:{ports['stow']}/status", timeout=10).json()
    assert status["counts"]["done"] == 1
    bad = requests.post(f"http://127.0.0.1:{ports['stow']}/studies", data=b"not multipart",
                        headers={"Content-Type": "application/dicom"}, timeout=10)
    assert bad.status_code == 400


def test_a_segmenter_node_stores_a_dicom_seg_over_the_source_series(setup, pacs, tmp_path,
                                                                    serve_procs):
    import highdicom as hd

    orthanc, ports = pacs["orthanc"], pacs["ports"]
    node = Serve(setup, tmp_path / "work", ports["serve"],
                 f"dimse:ORTHANC@127.0.0.1:{ports['dicom']}", model=setup["seg_exp"]).start()
    serve_procs.append(node)
    study = setup["studies"][1]  # sent before over DICOMweb: the node here has not seen it
    orthanc_id = orthanc.study_id(_uid(study)) or orthanc.upload(_files(study))
    orthanc.post("/modalities/medfound/store", {"Resources": [orthanc_id], "Synchronous": True})
    deadline = time.monotonic() + 90
    while not orthanc.series_of(_uid(study), "SEG"):
        assert time.monotonic() < deadline, node.log.read_text()
        time.sleep(0.5)
    (series,) = orthanc.series_of(_uid(study), "SEG")
    ds = pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_bytes(series["Instances"][0])))
    seg = hd.seg.Segmentation.from_dataset(ds)
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in _files(study)}
    assert ds.StudyInstanceUID == _uid(study) and seg.number_of_segments == 1
    (ref,) = ds.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == _uid(study, "SeriesInstanceUID")
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == sources
    assert node.usage()[0]["status"] == "stored"


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_center_pull_by_uid_and_by_query(setup, pacs, tmp_path, kind):
    orthanc, ports = pacs["orthanc"], pacs["ports"]
    one, two = setup["studies"][2], setup["studies"][3]
    for study in (one, two):
        if orthanc.study_id(_uid(study)) is None:
            orthanc.upload(_files(study))
    url = (f"dimse:ORTHANC@127.0.0.1:{ports['dicom']}" if kind == "dimse"
           else f"dicomweb:{orthanc.url}/dicom-web")
    raw = tmp_path / "raw"
    proc = medfound("center", "pull", "--from", url, "--out", str(raw), "--study", _uid(one))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = sorted(raw.rglob("*.dcm"))
    assert {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in got} == \
        {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in _files(one)}
    assert all(f.parent.parent.name == _uid(one) for f in got)
    assert not list(raw.rglob(".medfound-*"))  # no temporaries left
    # a rerun writes nothing; a file someone changed is left alone and reported
    got[0].write_bytes(got[0].read_bytes() + b"\0\0")
    changed = got[0].read_bytes()
    again = medfound("center", "pull", "--from", url, "--out", str(raw), "--study", _uid(one))
    assert again.returncode == 1
    assert f"0 file(s) written, {len(got) - 1} already there, 1 conflict(s)" in again.stdout
    assert str(got[0]) in again.stderr and got[0].read_bytes() == changed
    # by query: the other study's patient
    patient = _uid(two, "PatientID")
    byq = medfound("center", "pull", "--from", url, "--out", str(tmp_path / "q"),
                   "--query", f"PatientID={patient}")
    assert byq.returncode == 0, byq.stdout + byq.stderr
    pulled = sorted((tmp_path / "q").rglob("*.dcm"))
    assert len(pulled) == len(_files(two))
    assert {pydicom.dcmread(f, stop_before_pixels=True).PatientID for f in pulled} == {patient}
    none = medfound("center", "pull", "--from", url, "--out", str(tmp_path / "none"),
                    "--query", "PatientID=NOBODY")
    assert none.returncode == 0 and "no study matched" in none.stderr
    bad = medfound("center", "pull", "--from", "dimse:ORTHANC@127.0.0.1", "--out", str(raw),
                   "--study", "1.2.3")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "AET@HOST:PORT" in bad.stderr


def test_serve_killed_mid_study_and_mid_inference_resumes_and_the_result_arrives_once(
        setup, pacs, tmp_path, serve_procs):
    orthanc, ports = pacs["orthanc"], pacs["ports"]
    study = setup["studies"][2]
    uid = _uid(study)
    orthanc_id = orthanc.study_id(uid) or orthanc.upload(_files(study))
    assert not orthanc.series_of(uid, "SR")
    instances = sorted(i["ID"] for i in orthanc.get(f"/studies/{orthanc_id}/instances"))
    args = (setup, tmp_path / "work", ports["serve"], f"dimse:ORTHANC@127.0.0.1:{ports['dicom']}")
    node = Serve(*args, idle_s=5.0).start()
    serve_procs.append(node)
    half = instances[: len(instances) // 2]
    orthanc.post("/modalities/medfound/store", {"Resources": half, "Synchronous": True})
    node.kill()  # kill -9 mid-study: half of it received and acknowledged
    kept = list(node.work.glob("studies/*/instances/*.dcm"))
    assert len(kept) == len(half)  # everything acknowledged is on disk
    node = Serve(*args, idle_s=5.0).start()
    serve_procs.append(node)
    job = orthanc.post("/modalities/medfound/store", {"Resources": [orthanc_id], "Synchronous": True})
    assert job["FailedInstancesCount"] == 0
    # and kill -9 again while the model runs on it
    (state_file,) = node.work.glob("studies/*/state.json")
    deadline = time.monotonic() + 60
    while json.loads(state_file.read_text())["status"] != "running":
        assert time.monotonic() < deadline, node.log.read_text()
        time.sleep(0.05)
    node.kill()
    assert not orthanc.series_of(uid, "SR")
    node = Serve(*args, idle_s=5.0).start()
    serve_procs.append(node)
    sr_series = _wait_for_sr(orthanc, uid, node=node)
    time.sleep(3)  # nothing more comes
    sr_series = orthanc.series_of(uid, "SR")
    assert len(sr_series) == 1 and len(sr_series[0]["Instances"]) == 1
    _sr_checks(orthanc, sr_series[0], study, node)  # read with every instance, not half
    decided = [d["decision"] for d in node.decisions()]
    assert "resumed" in decided and decided.count("duplicate") == len(half)
    assert any(d["detail"] == "inference was interrupted by a stop; it runs again"
               for d in node.decisions())
    assert len(node.usage()) == 1 and node.usage()[0]["instances"] == len(instances)


def test_a_pacs_down_while_a_result_waits_gets_it_once_it_is_back(setup, tmp_path, serve_procs):
    require_orthanc()
    base = free_port_block(3)
    orthanc = Orthanc(tmp_path / "orthanc", base, base + 1,
                      modalities={"medfound": ["MEDFOUND", "127.0.0.1", base + 2]}).start()
    try:
        node = Serve(setup, tmp_path / "work", base + 2, f"dimse:ORTHANC@127.0.0.1:{base + 1}",
                     idle_s=2.0).start()
        serve_procs.append(node)
        study = setup["studies"][3]
        orthanc_id = orthanc.upload(_files(study))
        orthanc.post("/modalities/medfound/store", {"Resources": [orthanc_id], "Synchronous": True})
        orthanc.stop()  # before the study is complete: its result finds the PACS down
        deadline = time.monotonic() + 90
        while True:
            st = node.status()["studies"]
            if st and st[0]["store_attempts"] >= 2:
                break
            assert time.monotonic() < deadline, node.log.read_text()
            time.sleep(0.5)
        assert st[0]["status"] == "storing" and st[0]["waiting_results"] == 1
        assert "cannot associate" in st[0]["last_store_error"] or "PACS" in st[0]["last_store_error"]
        assert node.usage() == []  # not stored yet: no usage record
        orthanc.start()
        sr_series = _wait_for_sr(orthanc, _uid(study), node=node)
        assert len(sr_series) == 1
        deadline = time.monotonic() + 30
        while node.status()["counts"]["done"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        usage = node.usage()
        assert len(usage) == 1 and usage[0]["status"] == "stored" and usage[0]["store_attempts"] >= 3
    finally:
        orthanc.stop()


def test_hostile_inputs_each_get_a_logged_decision(setup, tmp_path, serve_procs):
    """Sent by a C-STORE SCU of the test's own (no PACS needed; results go nowhere, retried):
    duplicates, a truncated instance, a non-image object, series the model does not read, and
    a study that never stops receiving."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import BasicTextSRStorage, CTImageStorage, MRImageStorage

    port = free_port_block(2)
    node = Serve(setup, tmp_path / "work", port, f"dimse:NOBODY@127.0.0.1:{port + 1}",
                 "--max-study-s", "5", "--accept-from", "TESTSCU", idle_s=2.5).start()
    serve_procs.append(node)
    files = _files(setup["studies"][0])
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    refused = stranger.associate("127.0.0.1", port, ae_title="MEDFOUND")
    assert refused.is_rejected  # --accept-from: only TESTSCU may send
    ae = AE(ae_title="TESTSCU")
    for cls in (CTImageStorage, MRImageStorage, BasicTextSRStorage):
        ae.add_requested_context(cls, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDFOUND")
    assert assoc.is_established
    serve_procs.append(assoc)  # released (aborted) at the end if a check fails first

    def send(ds) -> int:
        return int(assoc.send_c_store(ds).Status)

    first = pydicom.dcmread(files[0])
    assert send(first) == 0
    assert send(first) == 0  # identical duplicate
    changed = pydicom.dcmread(files[0])
    changed.PixelData = bytes(len(changed.PixelData))
    assert send(changed) == 0  # same SOP Instance UID, other content
    cut = pydicom.dcmread(files[1])
    cut.PixelData = cut.PixelData[:1000]
    assert send(cut) == 0xA900  # truncated: refused
    sr = pydicom.Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = BasicTextSRStorage, generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID = first.StudyInstanceUID, generate_uid()
    sr.Modality, sr.PatientID = "SR", first.PatientID
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert send(sr) == 0
    localizer = pydicom.dcmread(files[2])
    localizer.SeriesInstanceUID, localizer.SOPInstanceUID = generate_uid(), generate_uid()
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert send(localizer) == 0
    mr_series = generate_uid()
    for f in files[:20]:
        ds = pydicom.dcmread(f)
        ds.SOPClassUID, ds.Modality = MRImageStorage, "MR"
        ds.SeriesInstanceUID, ds.SOPInstanceUID = mr_series, generate_uid()
        assert send(ds) == 0
    # a second study that never stops receiving: one instance a second
    trickle = generate_uid()
    for f in files[3:10]:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SOPInstanceUID = trickle, generate_uid()
        assert send(ds) == 0
        time.sleep(1.0)
    assoc.release()
    deadline = time.monotonic() + 30
    while True:  # both studies ended, none receiving again
        counts = node.status()["counts"]
        if counts["failed"] == 2 and not counts["receiving"] + counts["queued"] + counts["running"]:
            break
        assert time.monotonic() < deadline, node.log.read_text()
        time.sleep(0.5)
    details = "\n".join(f"{d['decision']}: {d['detail']}" for d in node.decisions())
    assert "duplicate: instance " + first.SOPInstanceUID + " again, identical: ignored" in details
    assert "again with different content: the first is kept" in details
    assert "rejected: truncated instance " + cut.SOPInstanceUID in details
    assert "kept, not read: non-image object (Basic Text SR Storage)" in details
    assert "a localizer (ImageType LOCALIZER)" in details
    assert f"MR series {mr_series} (20 instance(s)" in details and "modality MR; the model reads CT" in details
    assert "1 slice(s); the model needs at least 16" in details  # the CT series left: one slice
    assert "closed: still receiving after" in details  # the trickling study
    assert "store failed" not in details  # nothing was read, so nothing to store
    kept = node.work / "studies"
    assert len(list(kept.glob("*/instances/*.dcm"))) == 1 + 1 + 20 + 7
    assert len(list(kept.glob("*/rejected/*.dcm"))) == 2  # the cut one and the other content
    assert pydicom.dcmread(next(kept.glob(f"*/instances/{first.SOPInstanceUID}.dcm"))).PixelData \
        == first.PixelData  # the first kept
    # the trickling study was closed, then reopened by the instances that came after: a round
    # each, and a usage record each (one-slice series: nothing the model reads)
    assert "reopened: a new image instance after the study was failed: round 2" in details
    usage = node.usage()
    assert [u["status"] for u in usage] == ["no_series"] * 3
    assert sorted(u["round"] for u in usage) == [1, 1, 2]


def test_bad_arguments_are_one_line_errors(tmp_path):
    from medfound.errors import MedfoundError
    from medfound.pacs.connection import parse_address, parse_query

    assert parse_address("dimse:PACS@10.0.0.5:104").port == 104
    assert str(parse_address("dicomweb:http://u:secret@pacs:8042/dicom-web/")) == \
        "dicomweb:http://pacs:8042/dicom-web"  # no password in what is printed
    for bad in ("pacs:104", "dimse:PACS@host", "dimse:@host:104", "dimse:A\\B@host:104",
                "dimse:WAY_TOO_LONG_AE_TITLE@host:104", "dicomweb:ftp://pacs/x", "dimse:P@h:99999"):
        with pytest.raises(MedfoundError):
            parse_address(bad)
    with pytest.raises(MedfoundError, match="not a DICOM keyword"):
        parse_query(["PatientNmae=X"])
    cases = [(["serve", "--port", "11112"], "needs --model, --send-to, --work"),
             (["serve", "status"], "needs --work"),
             (["serve", "status", "--work", str(tmp_path)], "not a medfound serve work folder"),
             (["center", "pull", "--from", "dimse:P@127.0.0.1:9", "--out", str(tmp_path / "r")],
              "nothing to pull")]
    for args, message in cases:
        proc = medfound(*args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    # A --work folder that holds someone else's files is refused before anything is written.
    from medfound.pacs.queue import WorkQueue

    theirs = tmp_path / "theirs"
    (theirs / "studies" / "x" / "results" / "round_1").mkdir(parents=True)
    (theirs / "notes.txt").write_text("not medfound's")
    with pytest.raises(MedfoundError, match="not a medfound serve work folder"):
        WorkQueue(theirs)
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt", "studies"]
    WorkQueue(tmp_path / "new").close()  # a new folder becomes a node's
    WorkQueue(tmp_path / "new").close()  # and is one on the next start
