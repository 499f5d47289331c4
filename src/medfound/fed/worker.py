"""A center's worker: one long-lived process that runs medfound's ClientApp for every message.

Flower's SuperNode starts a fresh ``flwr-clientapp`` process for every message it receives.
Running medfound's ClientApp there costs each round a fixed price before training starts:
importing torch, MONAI and MLflow, and reading and preparing the center's studies again
(the dataset caches live in the process). On two cores that was about 25 s a round against
35-40 s of local training (benchmarks/federation.py).

So `medfound center join` starts two processes (`run_center`):

- this worker, which imports everything once and then serves messages one at a time on a
  Unix socket in a private (0700) temporary folder; its dataset caches survive between rounds;
- Flower's SuperNode, whose node config names that socket (``worker-socket``).

The ClientApp Flower loads in each ``flwr-clientapp`` process is `client_app` below. It imports
Flower and the standard library only, sends the message and its context to the worker, and
returns the worker's reply unchanged: the reply was audited (medfound.fed.client_app's audit
mod) in the worker, exactly as it leaves. Without ``worker-socket`` in the node config (a
SuperNode started by hand, `medfound center join --no-worker`), or when the worker is gone, it
runs medfound's ClientApp in its own process, as Flower would.

Wire format on the socket, both ways: frames of an 8-byte big-endian length and that many bytes.
Request: the Message, then the Context (Flower's protobufs). Reply: the reply Message, then the
context's state (a RecordDict), which the relay hands back to Flower.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

__all__ = ["SOCKET_KEY", "RelayClientApp", "client_app", "serve"]

SOCKET_KEY = "worker-socket"  # node config key: the worker's socket path
_HEADER = struct.Struct("!Q")


class RelayClientApp(ClientApp):
    """The ClientApp a SuperNode loads: relays each message to the center's worker."""

    def __call__(self, message: Message, context: Context) -> Message:
        path = context.node_config.get(SOCKET_KEY)
        if path:
            try:
                return relay(str(path), message, context)
            except (FileNotFoundError, ConnectionRefusedError):
                print("medfound: the center's worker is not running; this message runs in its "
                      "own process", file=sys.stderr, flush=True)
        from medfound.fed.client_app import make_client_app

        return make_client_app(None)(message, context)


client_app = RelayClientApp()


def relay(path: str, message: Message, context: Context) -> Message:
    """Send `message` and `context` to the worker at `path`; its reply (context.state updated)."""
    from flwr.common.serde import (
        context_to_proto,
        message_from_proto,
        message_to_proto,
        recorddict_from_proto,
    )
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        _send(sock, message_to_proto(message).SerializeToString(),
              context_to_proto(context).SerializeToString())
        reply = message_from_proto(ProtoMessage.FromString(_receive(sock)))
        context.state = recorddict_from_proto(ProtoRecordDict.FromString(_receive(sock)))
    return reply


def serve(path: Path, parent_pid: int | None = None) -> None:
    """Serve medfound's ClientApp on the Unix socket `path`, one message at a time, until killed
    (or until `parent_pid` is gone)."""
    from flwr.common.serde import (
        context_from_proto,
        message_from_proto,
        message_to_proto,
        recorddict_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

    from medfound.fed.client_app import make_client_app

    _preload()
    app = make_client_app(None)
    if parent_pid is not None:
        _exit_with(parent_pid, path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        os.chmod(path, 0o600)
        server.listen()
        print(f"medfound worker: ready on {path}", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    conn.settimeout(60)  # the request is local: it arrives at once or never
                    message = message_from_proto(ProtoMessage.FromString(_receive(conn)))
                    context = context_from_proto(ProtoContext.FromString(_receive(conn)))
                    conn.settimeout(None)
                except (OSError, ConnectionError) as exc:
                    print(f"medfound worker: dropped a request: {exc}", file=sys.stderr, flush=True)
                    continue
                started = time.perf_counter()
                try:
                    reply = app(message=message, context=context)
                except Exception as exc:  # noqa: BLE001 — the app's own handler missed it
                    traceback.print_exc()
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                          reason=type(exc).__name__), reply_to=message)
                print(f"medfound worker: {message.metadata.message_type} message done in "
                      f"{time.perf_counter() - started:.1f} s", flush=True)
                try:
                    _send(conn, message_to_proto(reply).SerializeToString(),
                          recorddict_to_proto(context.state).SerializeToString())
                except OSError as exc:  # the relay process is gone (its SuperNode stopped)
                    print(f"medfound worker: could not deliver a reply: {exc}", file=sys.stderr,
                          flush=True)
                del message, context, reply
                release_memory()


def release_memory() -> None:
    """Between messages: collect what the message left (its model, optimizer, batches) and
    hand the freed heap back to the system (glibc's malloc keeps it otherwise), so that a
    center waiting for its next round holds its imports and caches, not its last round's
    peak (benchmarks/federation_scale.py)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _preload() -> None:
    """Import what every message needs now, not during the first round."""
    import mlflow  # noqa: F401

    import medfound.data.detection  # noqa: F401  (MONAI)
    import medfound.train.loop  # noqa: F401
    import medfound.train.tracking  # noqa: F401


def _exit_with(parent_pid: int, path: Path) -> None:
    """Exit when `parent_pid` (`medfound center join`) is gone, even if it was SIGKILLed;
    first remove the socket `path` and its folder, which the parent can no longer do."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # only if empty: the folder `center join` made for it
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-monitor").start()


def _send(sock: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        sock.sendall(_HEADER.pack(len(frame)) + frame)


def _receive(sock: socket.socket) -> bytes:
    size = _HEADER.unpack(_exactly(sock, _HEADER.size))[0]
    return _exactly(sock, size)


def _exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError("the center's worker closed the connection before it replied "
                                  "(see the center's log)")
        got += n
    return bytes(buf)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medfound.fed.worker",
                                 description="A center's long-lived ClientApp worker (started by "
                                             "`medfound center join`).")
    ap.add_argument("--socket", required=True, type=Path, help="Unix socket path to serve on")
    ap.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = ap.parse_args(argv)
    serve(args.socket, args.parent_pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
