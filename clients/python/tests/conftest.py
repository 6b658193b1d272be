"""Fixtures: the real fleetcare server on a fresh embedded store.

The binary comes from FLEETCARE_BIN (the Rust test harness sets it), else
<repo>/target/debug/fleetcare. Each "database" is the server's default store,
an SQLite file in a data directory of its own (`--data-dir`), so the suite
needs nothing installed. Every data directory is removed and every server
stopped at teardown, also when a test fails.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import pytest

from fleetcare import FleetcareClient, TransitionWatch
from fleetcare.v1 import agent_status_pb2 as pb

CLIENT_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = CLIENT_DIR.parents[1]

# Generous: a debug build on a shared 2-core machine, creating and migrating a database.
STARTUP_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0

# Options every test server gets: nothing scheduled behind the tests' backs (the
# pipeline runs only when a test asks; no agent of a slow run goes OFFLINE).
QUIET_SERVER_ARGS = (
    # No metrics listener: its default port would be shared by every test server.
    "--http-listen",
    "",
    "--heartbeat-timeout",
    "1h",
    "--pipeline-interval-usage",
    "0",
    "--pipeline-interval-errors",
    "0",
)


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (e.g. a harness timeout) interrupts like Ctrl-C, so fixture teardown
    # still stops the servers and drops the databases.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def fleetcare_bin() -> Path:
    path = Path(os.environ.get("FLEETCARE_BIN") or REPO_ROOT / "target" / "debug" / "fleetcare")
    if not path.is_file():
        pytest.fail(
            f"fleetcare server binary not found at {path}: build it (cargo build) or set FLEETCARE_BIN",
            pytrace=False,
        )
    return path


# Where the test servers' data directories live (removed at exit).
DATA_ROOT = Path(tempfile.mkdtemp(prefix="fleetcare-pytest-"))
atexit.register(shutil.rmtree, DATA_ROOT, True)


def data_dir(name: str) -> Path:
    return DATA_ROOT / name


def drop_database(name: str) -> None:
    shutil.rmtree(data_dir(name), ignore_errors=True)


# The server gets SIGTERM if pytest dies without running its teardown. (Not a
# preexec_fn calling prctl: forking a process that runs gRPC's threads aborts the child.)
SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


class FleetcareServer:
    """One `fleetcare serve` process; stderr (JSON logs) is drained by a thread."""

    def __init__(
        self,
        database: str,
        session_dir: Path,
        listen: str = "127.0.0.1:0",
        extra_args: Sequence[str] = QUIET_SERVER_ARGS,
    ) -> None:
        self.database = database
        self.session_dir = session_dir
        self.listen = listen
        self.extra_args = list(extra_args)
        self.address: Optional[str] = None
        self._listening: Optional[str] = None
        self._store_open = False
        self.logs: collections.deque[str] = collections.deque(maxlen=300)
        self._serving = threading.Event()
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._reader: Optional[threading.Thread] = None

    def start(self) -> "FleetcareServer":
        self.session_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, RUST_LOG="info")
        cmd = [
            *([SETPRIV, "--pdeathsig", "TERM"] if SETPRIV else []),
            str(fleetcare_bin()),
            "serve",
            "--listen",
            self.listen,
            "--data-dir",
            str(data_dir(self.database)),
            "--log-format",
            "json",
            "--session-dir",
            str(self.session_dir),
            *self.extra_args,
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._serving.wait(0.1):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"fleetcare did not start (exit {self._proc.returncode}):\n" + "\n".join(self.logs)
                )
        return self

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for raw in self._proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.logs.append(line)
            if self.address is None:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                # The server may listen ("serving", with its address) before
                # its store is open, answering UNAVAILABLE until then, or open
                # the store first ("store open, serving"): a test starts once
                # both are logged.
                if entry.get("message") == "serving" and entry.get("addr"):
                    self._listening = entry["addr"]
                if entry.get("message") == "store open, serving":
                    self._store_open = True
                if self._store_open and self._listening:
                    self.address = self._listening
                    self._serving.set()

    def stop(self) -> Optional[int]:
        """SIGTERM (graceful: watch streams end with OK), wait, SIGKILL if stuck."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(10)
        return proc.returncode

    @property
    def port(self) -> int:
        assert self.address is not None
        return int(self.address.rsplit(":", 1)[1])


@dataclasses.dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server certificate it signed (for localhost and
    127.0.0.1) and a client certificate it signed, made with the openssl CLI."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_args(self, mutual: bool = False) -> List[str]:
        """`fleetcare serve` flags for TLS with these files (and mutual TLS with this CA)."""
        args = ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]
        return [*args, "--tls-client-ca", str(self.ca)] if mutual else args


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(directory: Path, name: str = "fleetcare test CA") -> Pki:
    """A CA and two leaves in `directory`; skips the test when openssl is missing."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    _openssl("req", "-x509", *ec, "-days", "1", "-subj", f"/CN={name}", "-keyout", str(ca_key), "-out", str(ca),
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def leaf(stem: str, subject: str, extensions: str, serial: int) -> Tuple[Path, Path]:
        cert, key, csr, ext = (directory / f"{stem}{suffix}" for suffix in (".pem", "-key.pem", ".csr", ".ext"))
        ext.write_text(extensions + "\nbasicConstraints=critical,CA:FALSE\n")
        _openssl("req", "-new", *ec, "-subj", f"/CN={subject}", "-keyout", str(key), "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-set_serial", str(serial),
                 "-days", "1", "-out", str(cert), "-extfile", str(ext))
        return cert, key

    server_cert, server_key = leaf("server", "localhost",
                                   "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth", 2)
    client_cert, client_key = leaf("client", "pytest-client", "extendedKeyUsage=clientAuth", 3)
    return Pki(directory, ca, server_cert, server_key, client_cert, client_key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetcareServer]:
    """A server shared by the tests that do not need one of their own."""
    database = unique_name("fleetcare_pytest")
    srv = FleetcareServer(database, tmp_path_factory.mktemp("sessions"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        drop_database(database)


@pytest.fixture
def client(server: FleetcareServer) -> Iterator[FleetcareClient]:
    assert server.address is not None
    with FleetcareClient(server.address, insecure=True) as c:
        yield c


ServerFactory = Callable[..., FleetcareServer]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Starts servers for one test: `factory(database=None, listen=..., extra_args=())`;
    a None database is a fresh one, extra_args follow QUIET_SERVER_ARGS. All are
    stopped and their databases dropped after."""
    started: List[FleetcareServer] = []
    databases: List[str] = []

    def factory(
        database: Optional[str] = None, listen: str = "127.0.0.1:0", extra_args: Sequence[str] = ()
    ) -> FleetcareServer:
        if database is None:
            database = unique_name("fleetcare_pytest")
        if database not in databases:
            databases.append(database)
        srv = FleetcareServer(
            database, tmp_path / "sessions", listen=listen, extra_args=[*QUIET_SERVER_ARGS, *extra_args]
        )
        started.append(srv)
        return srv.start()

    try:
        yield factory
    finally:
        for srv in started:
            srv.stop()
        for database in databases:
            drop_database(database)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def next_within(watch: TransitionWatch, timeout: float = 60.0) -> pb.Transition:
    """next(watch), failing the test (instead of hanging) after `timeout` seconds."""
    timer = threading.Timer(timeout, watch.close)
    timer.start()
    try:
        return next(watch)
    except StopIteration:
        pytest.fail(f"no transition within {timeout}s")
    finally:
        timer.cancel()


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.05, what: str = "") -> None:
    """Polls `predicate` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def register_pool(
    client: FleetcareClient, size: int = 1, prefix: str = "py-claim", quota_pools: Sequence[str] = ()
) -> Tuple[dict, List[str]]:
    """Registers `size` IDLE agents carrying a label of their own, so that a
    claim selecting it can take only them: (that label, the agent ids). Each
    is a member of `quota_pools`."""
    pool = unique_name(prefix).replace("_", "-")
    labels = {"pool": pool}
    agent_ids = [f"{pool}-{i}" for i in range(size)]
    for agent_id in agent_ids:
        client.agent_status.RegisterAgent(
            pb.RegisterAgentRequest(agent_id=agent_id, labels=labels, quota_pools=quota_pools), timeout=30
        )
    return labels, agent_ids


def get_agent(client: FleetcareClient, agent_id: str) -> pb.Agent:
    return client.agent_status.GetAgent(pb.GetAgentRequest(agent_id=agent_id), timeout=30).agent


def agent_transitions(client: FleetcareClient, agent_id: str) -> List[pb.Transition]:
    """Every retained transition of `agent_id`, oldest first."""
    found: List[pb.Transition] = []
    token = ""
    while True:
        page = client.agent_status.ListTransitions(
            pb.ListTransitionsRequest(agent_id=agent_id, page_size=1000, page_token=token), timeout=30
        )
        found += page.transitions
        token = page.next_page_token
        if not token:
            return found
