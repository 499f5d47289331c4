"""`medfound center join` against a SuperLink it cannot work with, fast: the TLS probe against
real TLS and plain TCP servers on 127.0.0.1, and a join whose SuperLink never answers.
(Real SuperLink restarts: tests/test_fed_hostile_center_deployment.py.)"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest

from medfound.errors import MedfoundError
from medfound.fed.deployment import check_transport, probe_transport


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@contextlib.contextmanager
def server(tls_files: tuple[Path, Path] | None):
    """A server on 127.0.0.1 that answers like an HTTP server, over TLS when given its files."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    context = None
    if tls_files is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*map(str, tls_files))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError):
                conn.settimeout(5)
                if context is not None:
                    conn = context.wrap_socket(conn, server_side=True)
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        listener.close()
        thread.join(timeout=5)


def test_the_probe_tells_a_tls_superlink_from_a_plain_one_and_from_nothing(tmp_path: Path) -> None:
    with server(_self_signed(tmp_path)) as tls_address:
        assert probe_transport(tls_address) == "tls"
        check_transport(tls_address, insecure=False)  # they agree: nothing to say
        with pytest.raises(MedfoundError, match="serves TLS, and this center joins with "
                                                "--insecure") as err:
            check_transport(tls_address, insecure=True)
        assert "--root-certificates" in str(err.value) and "\n" not in str(err.value)
    with server(None) as plain_address:
        assert probe_transport(plain_address) == "plain"
        check_transport(plain_address, insecure=True)
        with pytest.raises(MedfoundError, match="does not serve TLS"):
            check_transport(plain_address, insecure=False)
    # Nothing listening (the SuperLink is not up yet): no verdict, the join goes on and retries.
    assert probe_transport(plain_address) is None
    check_transport(plain_address, insecure=True)
    check_transport(plain_address, insecure=False)


@pytest.mark.slow
def test_a_join_whose_superlink_never_answers_gives_up_non_zero_with_one_line(
        tmp_path: Path) -> None:
    """Flower's SuperNode retries forever; `center join` (here without its worker) stops after
    its wait budget with exit status 75 and says why."""
    import subprocess
    import sys

    from processes import free_port_block, medfound_env

    port = free_port_block(3)
    (tmp_path / "c0").mkdir()
    (tmp_path / "c0" / "datalist.json").write_text('{"training": []}')
    res = subprocess.run([sys.executable, "-m", "medfound", "center", "join", "--superlink",
                          f"127.0.0.1:{port}", "--data", str(tmp_path / "c0"), "--work",
                          str(tmp_path / "work"), "--insecure", "--no-worker", "--port",
                          str(port + 2)], env={**medfound_env(), "MEDFOUND_JOIN_MAX_WAIT_S": "3"},
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 75, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"error: gave up joining: the SuperLink at 127.0.0.1:{port} has been out of reach")
    assert "Traceback" not in res.stderr
