"""Deployment mode: a real Flower federation across machines (or processes on 127.0.0.1).

Three roles, three commands, each a thin wrapper around Flower's own executables:

- the coordinator runs a SuperLink (`medfound fed superlink`, i.e. ``flower-superlink``): on
  one HTTP(S) port (9092 here) it accepts SuperNodes and submitted runs, and runs the ServerApp;
- each center runs a SuperNode (`medfound center join`, i.e. ``flower-supernode``) whose node
  config names its data folder: the ClientApp (medfound.fed.client_app) reads only that folder
  and writes the center's audit log there, on the center's machine. Beside the SuperNode,
  `run_center` keeps a long-lived worker process (medfound.fed.worker) that runs the ClientApp
  for every message, so rounds do not pay for imports and data preparation again;
- the researcher submits the run (`medfound run federate fed.mode=deployment ...`):
  `run_deployment` writes a one-file Flower App (FED/app/pyproject.toml, whose run config
  carries the resolved recipe config) and hands it to ``flwr run`` against the same SuperLink,
  then waits for the run to end.

TLS is on unless `insecure` is asked for: the SuperLink serves with a certificate signed by a
CA whose certificate every SuperNode and the researcher hold (scripts/make_certs.sh makes
both for a local trial).

Node authentication (only registered centers may join), Flower's CLI-managed mode:
1. each center makes a key pair (`medfound center keys`, ECDSA P-384 in OpenSSH format) and
   gives the coordinator its public key — the private key never leaves the center;
2. the coordinator runs the SuperLink with ``--auth`` (``--enable-supernode-auth``) and
   registers each public key (`medfound fed register`, i.e. ``flwr supernode register``);
3. the center joins with ``--auth-key`` (``--auth-supernode-private-key``). A SuperNode whose
   key is not registered, or that has none, is refused and exits (Flower exit code 305).

Restarts: with ``--database PATH`` the SuperLink keeps its state (registered keys, nodes,
runs) in that file and a restarted SuperLink still knows every center; without it (Flower's
default, memory only) a restart forgets them. The default stays Flower's because Flower 1.42's
SQLite state can answer "database is locked" under load (its busy timeout is 5 s), which fails
the round in progress: three centers training on two cores are enough.
`medfound center join` supervises its SuperNode (`run_center`): Flower's SuperNode retries a
lost connection with backoff by itself; a SuperNode that the SuperLink no longer knows (Flower then exits with
status 0) is started again with backoff; when the SuperLink has been out of reach for longer
than the join's wait budget (`JOIN_MAX_WAIT_S`, default an hour) the join gives up and exits
non-zero with one line saying so. Before it starts and while the connection fails it probes
the SuperLink's port: a TLS SuperLink joined with ``--insecure`` (or a plain one joined with
TLS), where Flower would retry forever, ends the join with a line saying which.

The apps Flower loads by name (`write_app`) are medfound.fed.coordinator_app:server_app and
medfound.fed.worker:client_app, the same functions simulation mode runs; only where their
settings come from differs (run config and node config instead of Python objects). Paths in
the recipe config (out_dir) are the coordinator's. This module imports neither Flower nor
torch: `medfound center join` runs it to supervise the center's processes, and stays small.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfound import __version__
from medfound.errors import MedfoundError
from medfound.fed.settings import FedSettings, parse_host_port

__all__ = ["SuperLinkUnreachable", "check_transport", "join_command",
           "make_center_keys", "probe_transport", "register_centers", "run_center",
           "run_deployment", "superlink_command", "write_app"]

JOIN_MAX_WAIT_S = 3600.0  # how long `center join` waits for a SuperLink that is out of reach
JOIN_MAX_WAIT_ENV = "MEDFOUND_JOIN_MAX_WAIT_S"  # overrides it (seconds)
RUN_CONFIG_KEY = "medfound-config"  # the resolved recipe config, YAML text
CONNECTION = "medfound"  # the SuperLink connection's name in FED/.flwr/config.toml
DEFAULT_SUPERLINK = "127.0.0.1:9092"  # Flower >= 1.41 serves every SuperLink API on one port

# --- the researcher's side ------------------------------------------------------------------


def write_app(app_dir: Path, config_yaml: str) -> Path:
    """Write the Flower App that `flwr run` ships to the SuperLink: a pyproject.toml naming
    medfound's ServerApp and ClientApp (installed at every site, so the bundle holds no code)
    with the resolved recipe config as its run config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        "# Written by `medfound run federate fed.mode=deployment`: the Flower App it submits.\n"
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        'name = "medfound-federation"\n'
        f'version = "{_pep440(__version__)}"\n'
        'description = "medfound federated detector training (coordinator and centers)"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "medfound"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "medfound.fed.coordinator_app:server_app"\n'
        'clientapp = "medfound.fed.worker:client_app"\n\n'
        "[tool.flwr.app.config]\n"
        f"{RUN_CONFIG_KEY} = {_toml_string(config_yaml)}\n")
    return app_dir


def write_connection(flwr_home: Path, address: str, root_certificates: str | None,
                     insecure: bool) -> Path:
    """$FLWR_HOME/config.toml with one SuperLink connection, CONNECTION, for `flwr run`."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {_toml_string(address)}"]
    if insecure:
        lines.append("insecure = true")
    elif root_certificates:
        lines.append(f"root-certificates = {_toml_string(str(Path(root_certificates).resolve()))}")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_deployment(cfg: Mapping[str, Any], config_yaml: str) -> None:
    """Submit the federation to the SuperLink of ``fed.deployment`` and wait for it to end.

    The coordinator writes FED/ (out_dir) on its own machine; on 127.0.0.1 that is this one.
    """
    settings = FedSettings.from_config(cfg)
    dep = settings.deployment  # superlink and insecure checked there
    out = Path(cfg["out_dir"]).resolve()
    superlink, insecure, ca = dep["superlink"], dep.get("insecure", False), dep.get("root_certificates")
    if not insecure and not ca:
        raise MedfoundError("fed.mode=deployment uses TLS: fed.deployment.root_certificates is not set",
                            hint="point it at the CA certificate the SuperLink's certificate is "
                                 "signed with (scripts/make_certs.sh makes one), or set "
                                 "fed.deployment.insecure=true for a trial without TLS")
    if ca and not Path(ca).is_file():
        raise MedfoundError("no such CA certificate", path=ca,
                            hint="fed.deployment.root_certificates must be a PEM file")
    app = write_app(out / "app", config_yaml)
    flwr_home = out / ".flwr"
    write_connection(flwr_home, superlink, ca, insecure)
    env = _flower_env(FLWR_HOME=str(flwr_home))
    flwr = _executable("flwr")
    cmd = [flwr, "run", str(app), CONNECTION, "--stream"]
    print(f"submitting the federation to the SuperLink at {superlink} "
          f"({'insecure' if insecure else 'TLS'})", flush=True)
    started = time.time()
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        raise MedfoundError(f"`flwr run` exited with status {proc.returncode}",
                            hint=f"is a SuperLink listening on {superlink}? "
                                 "See the SuperLink's log for the ServerApp's error")
    package = out / ("encoder" if settings.task == "pretrain" else "model")  # what the ServerApp writes
    if not (package / "model.json").is_file():
        raise MedfoundError("the federated run ended without a model package", path=package,
                            hint="see the SuperLink's log: the ServerApp runs there")
    print(f"deployment run finished in {time.time() - started:.0f} s: {package}", flush=True)


# --- the coordinator's and the centers' commands ------------------------------------------------


def superlink_command(*, certs: str | None = None, insecure: bool = False,
                      address: str = DEFAULT_SUPERLINK, database: str | None = None,
                      auth: bool = False) -> list[str]:
    """The ``flower-superlink`` command line for `medfound fed superlink`.

    certs: a folder with ca.crt, server.pem and server.key (scripts/make_certs.sh's layout).
    auth: only SuperNodes whose public keys were registered (`register_centers`) may join.
    """
    host, port = parse_host_port(address, "--address")
    cmd = [_executable("flower-superlink"), "--host", host, "--port", str(port)]
    if database:
        cmd += ["--database", str(database)]
    if insecure:
        if auth:
            raise MedfoundError("node authentication needs TLS: --auth cannot be used with --insecure",
                                hint="drop --insecure and pass --certs DIR (scripts/make_certs.sh DIR)")
        cmd.append("--insecure")
    else:
        cmd += _tls_files(certs, ("ca.crt", "server.pem", "server.key"),
                          ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"))
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def make_center_keys(out: str | Path, center: str, overwrite: bool = False) -> tuple[Path, Path]:
    """A center's node-authentication key pair: OUT/CENTER.key (private, mode 600, stays at
    the center) and OUT/CENTER.pub (OpenSSH public key, for the coordinator to register)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(out)
    private, public = folder / f"{center}.key", folder / f"{center}.pub"
    if private.exists() and not overwrite:
        raise MedfoundError("a key for this center already exists", path=private,
                            hint="keep it (its public key may be registered), or pass --overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    public.write_bytes(pub + f" {center}\n".encode())
    return private, public


def register_centers(public_keys: Sequence[str | Path], *, superlink: str,
                     root_certificates: str | None, flwr_home: str | Path) -> list[str]:
    """Register center public keys with a SuperLink started with ``--auth``
    (``flwr supernode register``); returns the node ids Flower assigned, in order."""
    parse_host_port(superlink, "--superlink")
    if not root_certificates or not Path(root_certificates).is_file():
        raise MedfoundError("registering keys needs TLS: --root-certificates "
                            f"{root_certificates or '(missing)'} is not a file",
                            hint="the CA certificate the SuperLink's certificate is signed with")
    home = Path(flwr_home)
    write_connection(home, superlink, root_certificates, insecure=False)
    env = {**os.environ, "FLWR_HOME": str(home)}
    ids = []
    for key in public_keys:
        if not Path(key).is_file():
            raise MedfoundError("no such public key file", path=key,
                                hint="the CENTER.pub that `medfound center keys` wrote")
        res = subprocess.run([_executable("flwr"), "supernode", "register", str(Path(key).resolve()),
                              CONNECTION, "--format", "json"], env=env, capture_output=True,
                             text=True, check=False)
        try:
            reply = json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            reply = {}
        if res.returncode != 0 or not reply.get("success", False):
            why = reply.get("error-message") or (res.stdout + res.stderr).strip()[-300:]
            raise MedfoundError(f"the SuperLink at {superlink} did not register {key}: {why}",
                                hint="is it running with --auth? Was this key registered before?")
        ids.append(str(reply.get("node-id", "?")))
    return ids


def join_command(*, superlink: str, center: str, data: str, work: str,
                 root_certificates: str | None = None, insecure: bool = False,
                 runtime_port: int | None = None, keep_payloads: bool = False,
                 auth_key: str | None = None, worker_socket: str | None = None) -> list[str]:
    """The ``flower-supernode`` command line for `medfound center join`.

    The node config tells medfound's ClientApp which center this is and where its data and
    work folders are (the audit log goes to WORK/audit/CENTER.jsonl, signed with `auth_key`
    when given), and where the center's
    worker listens, if it has one (medfound.fed.worker).
    """
    data_dir = Path(data).resolve()
    if not (data_dir / "datalist.json").is_file():
        raise MedfoundError("not a center data folder (no datalist.json)", path=data_dir,
                            hint="point --data at one center's folder, e.g. PHANTOMS/center_0")
    work_dir = Path(work).resolve()
    node_config = (f"center={_toml_string(center)} data-dir={_toml_string(str(data_dir))} "
                   f"work-dir={_toml_string(str(work_dir))}"
                   + (" keep-payloads=true" if keep_payloads else "")
                   # the node key also signs the center's audit log (medfound.fed.chain)
                   + (f" audit-key={_toml_string(str(Path(auth_key).resolve()))}"
                      if auth_key else "")
                   + (f" worker-socket={_toml_string(worker_socket)}" if worker_socket else ""))
    cmd = [_executable("flower-supernode"), "--superlink", superlink, "--node-config", node_config]
    if runtime_port:  # the SuperNode's local API for its ClientApp processes (default 9094)
        cmd += ["--port", str(runtime_port)]
    if insecure:
        cmd.append("--insecure")
    else:
        if not root_certificates or not Path(root_certificates).is_file():
            raise MedfoundError("TLS needs the CA certificate the SuperLink's certificate is signed "
                                f"with: --root-certificates {root_certificates or '(missing)'}",
                                hint="copy ca.crt from the coordinator, or use --insecure for a trial")
        cmd += ["--root-certificates", str(Path(root_certificates).resolve())]
    if auth_key:
        if insecure:
            raise MedfoundError("node authentication needs TLS: --auth-key cannot be used with "
                                "--insecure", hint="drop --insecure and pass --root-certificates")
        if not Path(auth_key).is_file():
            raise MedfoundError("no such private key file", path=auth_key,
                                hint="make one with `medfound center keys --out DIR`")
        cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    return cmd


def run_process(cmd: Sequence[str]) -> int:
    """Become the Flower executable (exec): signals and Ctrl-C reach Flower directly, and
    stopping this process stops the SuperLink or SuperNode with it, leaving nothing behind."""
    env = _flower_env()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], list(cmd), env)
    return 1  # not reached


class SuperLinkUnreachable(MedfoundError):
    """`center join` gave up: the SuperLink was out of reach for longer than its wait budget."""

    exit_code = 75  # EX_TEMPFAIL: a service manager may start the join again later


def join_max_wait(value: float | None = None) -> float:
    """The join's wait budget in seconds: `value`, else $MEDFOUND_JOIN_MAX_WAIT_S, else
    JOIN_MAX_WAIT_S."""
    if value is not None:
        return float(value)
    text = os.environ.get(JOIN_MAX_WAIT_ENV)
    try:
        return float(text) if text else JOIN_MAX_WAIT_S
    except ValueError:
        raise MedfoundError(f"{JOIN_MAX_WAIT_ENV}={text!r} is not a number of seconds") from None


def probe_transport(address: str, timeout: float = 3.0) -> str | None:
    """What the SuperLink at `address` speaks: "tls", "plain", or None when nothing answers
    (not started yet, a firewall): a TLS handshake, certificate not checked (only whether the
    port speaks TLS at all; the SuperNode checks the certificate)."""
    try:
        host, port = parse_host_port(address, "--superlink")
    except MedfoundError:
        return None
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(timeout)
            return "tls"
    except ssl.SSLError:
        return "plain"
    except OSError:
        return None
    finally:
        raw.close()


def check_transport(address: str, insecure: bool, timeout: float = 3.0) -> None:
    """Refuse (`MedfoundError`) a join whose TLS setting cannot work with the SuperLink at
    `address`; nothing when they agree or nothing answers there (yet)."""
    spoken = probe_transport(address, timeout)
    if insecure and spoken == "tls":
        raise MedfoundError(f"the SuperLink at {address} serves TLS, and this center joins with "
                            "--insecure (it would retry forever)",
                            hint="drop --insecure and pass --root-certificates CA.crt (the "
                                 "coordinator's CA certificate)")
    if not insecure and spoken == "plain":
        raise MedfoundError(f"the SuperLink at {address} does not serve TLS, and this center "
                            "joins with TLS",
                            hint="ask the coordinator to run it with --certs, or join with "
                                 "--insecure for a trial on one machine")


def run_center(cmd: Sequence[str], worker_socket: Path | None, *,
               max_wait_s: float | None = None) -> int:
    """`medfound center join`: start the center's worker (medfound.fed.worker) on
    `worker_socket` (None: no worker, Flower runs each message in a fresh process), wait until
    it is ready, then start the SuperNode (`cmd`, whose node config names the socket) and
    supervise it (`_supervise`: rejoin with backoff, give up after
    `max_wait_s`, see the module docstring); return the SuperNode's exit status, stopping the
    worker with it.

    Both run in this process's process group, so stopping the group stops all three; each child
    also exits if this process dies (the worker watches it; on Linux the SuperNode is sent
    SIGTERM by the kernel). If the worker stops early the SuperNode carries on, and each message
    runs in its own process again (slower, same results)."""
    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # runs the `finally` below: the children stop too

    signal.signal(signal.SIGTERM, stop)
    superlink, insecure = _option(cmd, "--superlink"), "--insecure" in cmd
    max_wait = join_max_wait(max_wait_s)
    check_transport(superlink, insecure)
    env = _flower_env()
    # The SuperNode's SuperExec asks every second (Flower's default) whether a message waits for
    # a ClientApp process. A tenth of that is a cheap local call; measured, it made no difference
    # beyond run-to-run noise (benchmarks/federation.py), against up to 1 s a message in theory.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    worker = None
    if worker_socket is not None:
        worker = subprocess.Popen([sys.executable, "-m", "medfound.fed.worker", "--socket",
                                   str(worker_socket), "--parent-pid", str(os.getpid())], env=env)
    nodes: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 300
        while (worker is not None and worker_socket is not None and not worker_socket.exists()
               and worker.poll() is None and time.monotonic() < deadline):
            time.sleep(0.1)
        if worker_socket is not None and not worker_socket.exists():
            print("medfound: the center's worker did not start; each message will run in its own "
                  "process", file=sys.stderr, flush=True)
        return _supervise(cmd, env, superlink, insecure, max_wait, worker, nodes)
    except KeyboardInterrupt:
        return 130
    finally:
        children = [*nodes, *([worker] if worker is not None else [])]
        for proc in children:
            if proc.poll() is None:
                proc.terminate()
        for proc in children:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if worker_socket is not None:
            worker_socket.unlink(missing_ok=True)


class _NodeLog:
    """Forwards a SuperNode's output to this process's stdout, line by line, and notes what
    its lines say about the connection."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.connected = False  # the SuperLink admitted it (it logged its node ID)
        self.failing_since: float | None = None  # the current run of failed connection attempts
        self.forgotten = False  # the SuperLink answered 401: it no longer knows this node
        self.refused = False  # node authentication refused it (Flower exit code 305)
        self.thread = threading.Thread(target=self._read, daemon=True, name="supernode-log")
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, ""):
            sys.stdout.write(line)
            sys.stdout.flush()
            if "SuperNode ID" in line or "Connection successful" in line:
                self.connected, self.failing_since = True, None
            elif "Connection attempt failed" in line and self.failing_since is None:
                self.failing_since = time.monotonic()
            elif "401 Unauthorized" in line:
                self.forgotten = True
            elif "Exit Code: 305" in line or "Failed to activate SuperNode" in line:
                self.refused = True


def _supervise(cmd: Sequence[str], env: Mapping[str, str], superlink: str, insecure: bool,
               max_wait: float, worker: subprocess.Popen | None,
               nodes: list[subprocess.Popen]) -> int:
    """Run the SuperNode `cmd` until it ends for good; start it again when the SuperLink
    forgot it (restarted without its database); give up (`SuperLinkUnreachable`) when the
    SuperLink has been out of reach for `max_wait` seconds."""
    lost_at: float | None = None  # since when this center has had no working connection
    backoff, worker_noted = 1.0, False
    while True:
        node = subprocess.Popen(list(cmd), env=dict(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                preexec_fn=_die_with_parent)  # noqa: PLW1509
        nodes.append(node)
        log, probed = _NodeLog(node), 0.0
        while node.poll() is None:
            if worker is not None and worker.poll() is not None and not worker_noted:
                print(f"medfound: the center's worker stopped (exit {worker.returncode}); each "
                      "message now runs in its own process", file=sys.stderr, flush=True)
                worker_noted = True
            if log.connected and log.failing_since is None:
                lost_at, backoff = None, 1.0
            failing = log.failing_since if lost_at is None else lost_at
            if log.failing_since is not None and failing is not None:
                now = time.monotonic()
                if now - failing > max_wait:
                    node.terminate()
                    node.wait(timeout=30)
                    raise SuperLinkUnreachable(
                        f"gave up joining: the SuperLink at {superlink} has been out of reach for "
                        f"{now - failing:.0f} s", hint="start `medfound center join` again once "
                        f"the coordinator's SuperLink is back ({JOIN_MAX_WAIT_ENV} sets the wait)")
                if now - probed > 10:
                    probed = now
                    try:
                        check_transport(superlink, insecure)
                    except MedfoundError:
                        node.terminate()
                        node.wait(timeout=30)
                        raise
            time.sleep(0.5)
        log.thread.join(timeout=5)
        nodes.remove(node)
        rc = int(node.returncode)
        if log.refused:
            raise MedfoundError(f"the SuperLink at {superlink} refused this center (node "
                                "authentication)", hint="join with --auth-key CENTER.key whose "
                                "CENTER.pub the coordinator registered (`medfound fed register`; "
                                "a SuperLink keeps registrations in its --database)")
        if not (rc == 0 or log.forgotten):
            return rc
        # Flower ends a SuperNode the SuperLink no longer knows with status 0: join again.
        now = time.monotonic()
        lost_at = lost_at if lost_at is not None else now
        if now - lost_at > max_wait:
            raise SuperLinkUnreachable(
                f"gave up joining: the SuperLink at {superlink} has not admitted this center "
                f"for {now - lost_at:.0f} s", hint=f"{JOIN_MAX_WAIT_ENV} sets the wait")
        print(f"medfound: the SuperLink at {superlink} no longer knows this center (it restarted "
              f"without its --database?); joining again in {backoff:.0f} s", file=sys.stderr,
              flush=True)
        time.sleep(backoff)
        backoff = min(backoff * 2, 30.0)


def _die_with_parent() -> None:
    """In a child before it execs: have Linux send it SIGTERM when its parent dies
    (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --- helpers ---------------------------------------------------------------------------------


def _option(cmd: Sequence[str], flag: str) -> str:
    """The value after `flag` in a command line ("" when it has none)."""
    args = list(cmd)
    return args[args.index(flag) + 1] if flag in args[:-1] else ""


def _tls_files(certs: str | None, names: Sequence[str], flags: Sequence[str]) -> list[str]:
    if not certs:
        raise MedfoundError("TLS is on by default: --certs DIR is missing",
                            hint="make a CA and server certificate with scripts/make_certs.sh DIR, "
                                 "or pass --insecure for a trial without TLS")
    folder = Path(certs)
    args: list[str] = []
    for name, flag in zip(names, flags, strict=True):
        path = folder / name
        if not path.is_file():
            raise MedfoundError(f"the certificate folder lacks {name}", path=folder,
                                hint="scripts/make_certs.sh DIR writes ca.crt, server.pem, server.key")
        args += [flag, str(path.resolve())]
    return args


def _executable(name: str) -> str:
    """Flower's executables from this Python's environment first, then PATH."""
    own = Path(sys.executable).parent / name
    found = str(own) if own.is_file() else shutil.which(name)
    if not found:
        raise MedfoundError(f"Flower's `{name}` command is not installed",
                            hint="pip install 'medfound[ml]' (it brings flwr)")
    return found


def _flower_env(**extra: str) -> dict[str, str]:
    """This process's environment (plus `extra`) with this Python's bin first on PATH: the
    SuperLink and SuperNode start flwr-serverapp / flwr-clientapp by name, and must get ours."""
    env = {**os.environ, **extra}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _toml_string(text: str) -> str:
    """A TOML basic string holding `text` exactly (JSON escaping is valid TOML escaping)."""
    return json.dumps(text, ensure_ascii=False)


def _pep440(version: str) -> str:
    base = version.split("+")[0]
    return base if base[:1].isdigit() else "0.0.0"
