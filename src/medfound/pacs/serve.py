"""`medfound serve`: a center's inference node between its PACS and the torch-free core.

    PACS ──C-STORE / STOW-RS──▶ node: instance fsync'd in WORK, then acknowledged
                                  │ no new instance for idle_s: the study is complete
                                  ▼
                 choose the series the model card accepts (medfound.pacs.select; the others
                 are logged with their reason) → medfound.infer (read, preprocess, network,
                 postprocess, write: findings.json, the DICOM SR — or SEG for a segmenter)
                                  │
    PACS ◀──C-STORE / STOW-RS── the SR (SEG) in the same study, a new series referencing the
                                source images; a PACS that is down or refuses is retried with
                                backoff, the result kept in WORK until stored

One process: pynetdicom's association server (C-STORE and C-ECHO SCP) and, with a STOW port, an
HTTP endpoint (``POST …/studies``: STOW-RS; ``GET /status``: the queue as JSON) on threads that
only write instances; the node's loop (this thread) moves studies along, runs one inference at a
time and stores results. Every state change is in WORK (medfound.pacs.queue), so a node killed
with ``kill -9`` and started again on the same WORK resumes every unfinished study.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from medfound.errors import MedfoundError
from medfound.pacs.connection import (
    DEFAULT_AE_TITLE,
    PacsAddress,
    PacsError,
    check_ae_title,
    no_delay,
    store_files,
)
from medfound.pacs.queue import OUT_OF_RESOURCES, SUCCESS, WorkQueue, now_iso, read_status

__all__ = ["MAX_BODY", "Node", "multipart_parts", "serve"]

MAX_BODY = 2 << 30  # bytes of one STOW-RS request (held in memory while its parts are kept)


class Node:
    """One inference node: its work queue, its loaded model and where results go."""

    def __init__(self, model: str | Path, work: str | Path, send_to: PacsAddress, *,
                 ae_title: str = DEFAULT_AE_TITLE, idle_s: float = 30.0,
                 max_study_s: float = 3600.0, threshold: float = 0.5, max_findings: int = 20,
                 engine: str = "auto", precision: str = "auto", threads: int | None = None,
                 retry_s: float = 2.0, retry_max_s: float = 300.0,
                 log: Callable[[str], None] = print):
        from medfound.infer.study import open_model

        self.ae_title = check_ae_title(ae_title, "--ae-title")
        self.send_to = send_to
        self.threshold, self.max_findings = float(threshold), int(max_findings)
        self.retry_s, self.retry_max_s = float(retry_s), float(retry_max_s)
        self.log = log
        self.queue = WorkQueue(work, idle_s=idle_s, max_study_s=max_study_s, log=log)
        try:
            self.net, self.model = open_model(model, threads=threads, engine=engine,
                                              precision=precision)
        except BaseException:
            self.queue.close()
            raise
        self.stop = threading.Event()

    # --- one study ------------------------------------------------------------------------

    def process(self, key: str) -> None:
        """Read a complete study, choose its series, run the model, keep the results to store."""
        from medfound.infer.study import infer_one_study
        from medfound.io.dicom import find_series
        from medfound.pacs.select import choose_series

        q = self.queue
        folder = q.folder(key)
        state = q.studies[key]
        n = state["round"]
        t0 = time.time()
        record: dict[str, Any] = {"started": now_iso(t0), "started_t": t0,
                                  "model_sha256": self.model["sha256"],
                                  "engine": self.model["engine"],
                                  "precision": self.model["precision"]}
        try:
            series = find_series(folder / "instances", progress=False)
        except MedfoundError as err:
            q.decide(key, "failed", f"no image series to read ({err})")
            q.finish_round(key, {**record, "status": "no_series", "finished": now_iso(),
                                 "error": "no image series"}, None)
            return
        choice = choose_series(series, self.net.card)
        for s in choice.skipped:
            q.decide(key, "series skipped", f"{s['modality']} series {s['series_uid']} "
                     f"({s['count']} instance(s), '{s['description']}'): {s['reason']}")
        if choice.series is None:
            q.finish_round(key, {**record, "status": "no_series", "finished": now_iso(),
                                 "error": "no series the model accepts"}, None)
            return
        uid = choice.series.series_uid
        q.decide(key, "reading", f"series {uid} ({choice.series.count} instance(s), "
                 f"'{choice.series.description}')")
        out = folder / "results" / f"round_{n}"
        if out.exists():  # a run of this round that was stopped: this node's own leftovers
            shutil.rmtree(out)
        out.mkdir(parents=True)
        try:
            rec = infer_one_study(self.net, folder / "instances", out, self.model, self.threshold,
                                  self.max_findings, True, set(), uid)
        except MedfoundError as err:
            q.decide(key, "failed", str(err))
            q.finish_round(key, {**record, "status": "failed", "finished": now_iso(),
                                 "error": str(err)[:300]}, None)
            return
        except Exception as err:  # a library failure on one study must not stop the node
            first = (str(err).strip().splitlines() or [""])[0][:200]
            q.decide(key, "failed", f"cannot be processed ({type(err).__name__}: {first})")
            q.finish_round(key, {**record, "status": "failed", "finished": now_iso(),
                                 "error": type(err).__name__}, None)
            return
        files = [str(Path(rec["out"]) / rec["outputs"][k]) for k in ("sr", "seg")
                 if k in rec["outputs"]]
        result_series = [_series_uid(f) for f in files]
        q.finish_round(key, {**record, "status": "inferred", "finished": now_iso(),
                             "finished_t": time.time(), "series_read": uid,
                             "findings": rec.get("n_findings", rec.get("n_regions")),
                             "timings_s": rec["timings_s"], "result_series": result_series,
                             "results": rec["out"]}, files)

    def store(self, key: str, pending: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            store_files(self.send_to, pending["files"], self.ae_title)
        except (PacsError, OSError) as err:
            self.queue.store_failed(key, pending, str(err), self.retry_s, self.retry_max_s)
            return
        except Exception as err:  # e.g. a result file that no longer parses: keep trying, say why
            self.queue.store_failed(key, pending, f"{type(err).__name__}: {err}", self.retry_s,
                                    self.retry_max_s)
            return
        self.queue.stored(key, pending, time.perf_counter() - t0)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Move studies along until `stop` is set: complete, infer, store (retries when due)."""
        self.queue.resume()
        while not self.stop.is_set():
            self.queue.promote()
            for key, pending in self.queue.due_results():
                self.store(key, pending)
            key = self.queue.next_queued()
            if key is not None:
                self.process(key)
                continue
            self.stop.wait(0.2)


def _series_uid(path: str) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


# --- the network side -----------------------------------------------------------------------


def _scp(node: Node, bind: str, port: int, accept_from: list[str] | None = None):
    """pynetdicom's association server: C-STORE of every storage class in any transfer syntax
    pynetdicom knows, and C-ECHO; with `accept_from`, only from those calling AE titles."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = 16
    ae.maximum_pdu_size = 0  # no limit on the PDUs a sender may use: fewer, larger reads
    if accept_from:
        ae.require_calling_aet = [check_ae_title(a, "--accept-from") for a in accept_from]
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)

    def handle_store(event) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:
            return 0xC210  # cannot understand
        source = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        try:
            return node.queue.receive(data, source).status
        except Exception as err:  # a full disk: the sender keeps the instance and retries
            node.log(f"cannot keep an instance from {source}: {err}")
            return OUT_OF_RESOURCES

    try:
        return ae.start_server((bind, int(port)), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, handle_store),
                                             (evt.EVT_CONN_OPEN, no_delay)])
    except OSError as err:
        raise MedfoundError(f"cannot listen on {bind}:{port} ({err.strerror or err})",
                            hint="choose a free --port") from None


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a multipart/related body (PS3.18 STOW-RS request), each part's bytes."""
    boundary = None
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not content_type.lower().startswith("multipart/related") or not boundary:
        raise ValueError("not multipart/related with a boundary")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in (b"\r\n" + body).split(b"\r\n" + delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part without headers")
        parts.append(content)
    return parts


def _http(node: Node, bind: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # the node logs its decisions itself
            return

        def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.rstrip("/") in ("/status", ""):
                self._send(200, read_status(node.queue.work))
            else:
                self._send(404, {"error": "GET /status, or POST …/studies (STOW-RS)"})

        def do_POST(self) -> None:  # noqa: N802
            if "/studies" not in self.path.split("?")[0]:
                self._send(404, {"error": "STOW-RS is POST …/studies[/{StudyInstanceUID}]"})
                return
            try:
                body = self._body()
                parts = multipart_parts(body, self.headers.get("Content-Type", ""))
            except ValueError as err:
                node.log(f"refused a STOW-RS request from {self.client_address[0]}: {err}")
                self._send(400, {"error": f"not a STOW-RS request ({err})"})
                return
            source = f"STOW-RS from {self.client_address[0]}"
            ok, failed = [], []
            for part in parts:
                try:
                    result = node.queue.receive(part, source)
                except Exception as err:
                    node.log(f"cannot keep an instance ({source}): {err}")
                    result = None
                item = {}
                if result is not None and result.sop is not None:
                    item = {"00081150": {"vr": "UI", "Value": [result.sop[0]]},
                            "00081155": {"vr": "UI", "Value": [result.sop[1]]}}
                if result is not None and result.status == SUCCESS:
                    ok.append(item)
                else:
                    item["00081197"] = {"vr": "US", "Value": [
                        result.status if result is not None else OUT_OF_RESOURCES]}
                    failed.append(item)
            # PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored.
            code = 200 if not failed else 202 if ok else 409
            response: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": ok}}
            if failed:
                response["00081198"] = {"vr": "SQ", "Value": failed}
            self._send(code, response, "application/dicom+json")

        def _body(self) -> bytes:
            """The request body, by Content-Length or chunked; at most MAX_BODY bytes."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks, total = [], 0
                while True:
                    line = self.rfile.readline(100).split(b";")[0].strip()
                    try:
                        size = int(line, 16)
                    except ValueError:
                        raise ValueError("a bad chunk size") from None
                    if size == 0:
                        self.rfile.readline(100)
                        return b"".join(chunks)
                    total += size
                    if total > MAX_BODY:
                        raise ValueError(f"a body over {MAX_BODY} bytes")
                    chunk = self.rfile.read(size)
                    if len(chunk) < size:
                        raise ValueError("the request body was cut short")
                    chunks.append(chunk)
                    self.rfile.readline(100)
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise ValueError("no Content-Length and not chunked") from None
            if not 0 <= length <= MAX_BODY:
                raise ValueError(f"a body of {length} bytes (at most {MAX_BODY})")
            body = self.rfile.read(length)
            if len(body) < length:
                raise ValueError("the request body was cut short")
            return body

    try:
        server = ThreadingHTTPServer((bind, int(port)), Handler)
    except OSError as err:
        raise MedfoundError(f"cannot listen on {bind}:{port} for STOW-RS ({err.strerror or err})",
                            hint="choose a free --stow-port") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="stow-rs", daemon=True).start()
    return server


def serve(model: str | Path, work: str | Path, send_to: PacsAddress, *, port: int,
          bind: str = "0.0.0.0", stow_port: int | None = None, ae_title: str = DEFAULT_AE_TITLE,
          idle_s: float = 30.0, max_study_s: float = 3600.0, threshold: float = 0.5,
          max_findings: int = 20, engine: str = "auto", precision: str = "auto",
          threads: int | None = None, retry_s: float = 2.0, retry_max_s: float = 300.0,
          accept_from: list[str] | None = None, log: Callable[[str], None] | None = None) -> int:
    """Run the node until SIGTERM or SIGINT (see the module docstring). Returns 0. `log`
    gets each line of the node's log (default: stdout, flushed); `accept_from`: the calling AE
    titles allowed to associate (default: any)."""
    log = log or (lambda line: print(line, flush=True))
    node = Node(model, work, send_to, ae_title=ae_title, idle_s=idle_s, max_study_s=max_study_s,
                threshold=threshold, max_findings=max_findings, engine=engine,
                precision=precision, threads=threads, retry_s=retry_s, retry_max_s=retry_max_s,
                log=log)
    scp = http = None
    try:
        scp = _scp(node, bind, port, accept_from)
        http = _http(node, bind, stow_port) if stow_port else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: node.stop.set())
        m = node.model
        log(f"medfound serve: {node.ae_title} on {bind}:{port} (C-STORE, C-ECHO)"
            + (f", STOW-RS on http://{bind}:{stow_port}/studies and /status" if http else "")
            + f"; results to {send_to}; work {node.queue.work}; model {m['name']} "
            f"sha256 {m['sha256'][:12]}… on {m['engine']} {m['precision']}; a study is complete "
            f"after {idle_s:g} s without a new instance")
        node.run()
    finally:
        if http is not None:
            http.shutdown()
        if scp is not None:
            scp.shutdown()
        node.queue.close()
    return 0
