"""Shared fixtures: a real agent process on a loopback port, real gRPC clients, real files."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kubetail_agent_proto import cluster_agent_pb2 as pb
from kubetail_agent_proto import cluster_agent_pb2_grpc as pb_grpc

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE_LOGS = REPO / "tests" / "sample-logs" / "containers"

# A fixed container id for files made by tests.
CID = "0123456789abcdef"


class AgentProcess:
    """A running `kubetail-agent serve` child process and what it printed."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetail_agent", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._serving = threading.Event()
        self.port = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("msg") == "serving":
                self.port = int(event["port"])
                self._serving.set()

    def wait_serving(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while not self._serving.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("agent did not start:\n" + "\n".join(self.lines))
        return self.port

    def events(self) -> list[dict]:
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Ended(NamedTuple):
    """The last item a StreamReader queues: how its stream ended."""

    code: grpc.StatusCode
    details: str


class StreamReader:
    """A server-streaming call drained by a reader thread into a queue (items, then one Ended),
    so a test waits for each item with a deadline and still learns how the stream ended."""

    WAIT = 10  # default deadline for one expected item / state

    def __init__(self, call: Any, convert: Callable[[Any], Any]) -> None:
        self.call = call
        self.convert = convert
        self.queue: queue.Queue = queue.Queue()
        self.ended: tuple[grpc.StatusCode, str] | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.queue.put(self.convert(message))
            self.queue.put(Ended(grpc.StatusCode.OK, ""))
        except grpc.RpcError as exc:
            self.queue.put(Ended(exc.code(), exc.details() or ""))

    def _get(self, timeout: float, got: list) -> Any:
        """The next item, None after `timeout`; fails the test if the stream ended instead."""
        try:
            item = self.queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if isinstance(item, Ended):
            self.ended = (item.code, item.details)
            pytest.fail(f"stream ended with {item.code} {item.details!r} after {got}")
        return item

    def poll(self) -> list:
        """Whatever has arrived, without waiting."""
        got: list = []
        while (item := self._get(0, got)) is not None:
            got.append(item)
        return got

    def take(self, count: int, timeout: float = WAIT) -> list:
        """The next `count` items; fails if the stream ends first or one is not there in time."""
        got: list = []
        for _ in range(count):
            item = self._get(timeout, got)
            if item is None:
                pytest.fail(f"nothing within {timeout} s; got so far {got}")
            got.append(item)
        return got

    def until(self, predicate: Callable[[Any], bool], what: str, timeout: float = WAIT) -> list:
        """Items up to and including the first that satisfies `predicate`."""
        got: list = []
        deadline = time.monotonic() + timeout
        while True:
            item = self._get(deadline - time.monotonic(), got)
            if item is None:
                pytest.fail(f"not received within {timeout} s: {what}; got meanwhile {got}")
            got.append(item)
            if predicate(item):
                return got

    def status(self, timeout: float = WAIT) -> tuple[tuple[grpc.StatusCode, str], list]:
        """Wait for the end of the stream: (code, details) and the items that came before it."""
        got: list = []
        deadline = time.monotonic() + timeout
        while self.ended is None:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the stream did not end within {timeout} s; items meanwhile: {got}")
            if isinstance(item, Ended):
                self.ended = (item.code, item.details)
            else:
                got.append(item)
        return self.ended, got

    def cancel(self) -> None:
        self.call.cancel()
        self.thread.join(self.WAIT)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = StreamReader.WAIT) -> None:
    """Poll `predicate` until it holds; fail the test naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout} s: {what}")
        time.sleep(0.005)


# /proc views of a process: what it holds on to (the leak tests compare them before and after).


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for row in handle:
            if row.startswith("Threads:"):
                return int(row.split()[1])
    raise AssertionError("no Threads: line")


def inotify_fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "inotify" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                out.append(fd)
        except FileNotFoundError:
            continue  # closed meanwhile
    return out


def inotify_watches(pid: int) -> int:
    """Kernel inotify watches the process holds, over all its inotify instances."""
    total = 0
    for fd in inotify_fds(pid):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as handle:
                total += sum(1 for row in handle if row.startswith("inotify wd:"))
        except FileNotFoundError:
            continue
    return total


def write_config(path: pathlib.Path, settings: dict) -> pathlib.Path:
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture
def logs_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "containers"
    path.mkdir()
    return path


@pytest.fixture
def start_agent(tmp_path: pathlib.Path) -> Iterator:
    """start_agent(logs_dir, **config) -> running AgentProcess on 127.0.0.1:<free port>."""
    started: list[AgentProcess] = []

    def start(logs: pathlib.Path, extra_args: tuple[str, ...] = (), **settings: object) -> AgentProcess:
        config = {"addr": "127.0.0.1:0", "container-logs-dir": str(logs), "auth-mode": "none",
                  "logging": {"level": "debug"}, "shutdown-timeout": "5s"}
        for key, value in settings.items():
            config[key.replace("_", "-")] = value
        cfg = write_config(tmp_path / f"config-{len(started)}.yaml", config)
        agent = AgentProcess(["serve", "--config", str(cfg), *extra_args])
        started.append(agent)
        agent.wait_serving()
        return agent

    yield start
    for agent in started:
        agent.kill()


@pytest.fixture
def agent(start_agent, logs_dir: pathlib.Path) -> AgentProcess:
    return start_agent(logs_dir)


@pytest.fixture
def channel(agent: AgentProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as ch:
        yield ch


@pytest.fixture
def records_stub(channel: grpc.Channel) -> pb_grpc.LogRecordsServiceStub:
    return pb_grpc.LogRecordsServiceStub(channel)


def log_path(logs: pathlib.Path, pod: str = "web-1", namespace: str = "default", container: str = "app",
             cid: str = CID) -> pathlib.Path:
    return logs / f"{pod}_{namespace}_{container}-{cid}.log"


def stream_request(pod: str = "web-1", namespace: str = "default", container: str = "app", cid: str = CID,
                   **fields: object) -> pb.LogRecordsStreamRequest:
    return pb.LogRecordsStreamRequest(namespace=namespace, pod_name=pod, container_name=container,
                                      container_id=f"containerd://{cid}", **fields)


def records(stream: Iterator[pb.LogRecord]) -> list[tuple[str, str, bool]]:
    """(RFC 3339 ns timestamp, message, is_final) of each record, for exact comparisons."""
    out = []
    for record in stream:
        ts = record.timestamp
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts.seconds)) + f".{ts.nanos:09d}Z"
        out.append((stamp, record.message, record.is_final))
    return out


def cri(ts: str, message: str, tag: str = "F", stream: str = "stdout") -> str:
    return f"{ts} {stream} {tag} {message}\n"


def docker(ts: str, log: str, stream: str = "stdout") -> str:
    return json.dumps({"log": log, "stream": stream, "time": ts}) + "\n"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `python -m kubetail_agent ARGS` to completion, for commands that exit by themselves."""
    return subprocess.run([sys.executable, "-m", "kubetail_agent", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def still_serves(agent: AgentProcess, channel: grpc.Channel, logs: pathlib.Path) -> None:
    """Assert that `agent` is alive, answers a normal request, and has logged no internal error."""
    assert agent.proc.poll() is None, "agent exited:\n" + "\n".join(agent.lines)
    log_path(logs, pod="sanity-check").write_text(cri("2024-05-01T10:00:00Z", "still serving"))
    stub = pb_grpc.LogRecordsServiceStub(channel)
    got = records(stub.StreamForward(stream_request(pod="sanity-check"), timeout=10))
    assert got == [("2024-05-01T10:00:00.000000000Z", "still serving", True)]
    assert [e for e in agent.events() if e.get("level") == "error"] == []


# --- test PKI (certificates made with `cryptography`) ------------------------------------------

NOW = datetime.datetime.now(datetime.UTC)


class Issued(NamedTuple):
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(ca: Issued, name: str, server: bool, expired: bool = False, client_too: bool = False) -> Issued:
    """A leaf certificate with CN `name`. A server certificate is valid for 127.0.0.1, localhost and
    `name`; with client_too it may also authenticate a client (as deploy/'s health probe uses it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = NOW - datetime.timedelta(hours=1) if expired else NOW + datetime.timedelta(days=30)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + \
        ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_too or not server else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"), x509.DNSName(name)]),
            critical=False)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


class Pki(NamedTuple):
    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    other_client: Issued
    expired_client: Issued
    files: dict[str, pathlib.Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, other_ca = make_ca("kubetail test CA"), make_ca("some other CA")
    server = issue(ca, "kubetail-agent", server=True)
    pki = Pki(ca, server, issue(ca, "kubetail-cluster-api", server=False), other_ca,
              issue(other_ca, "kubetail-cluster-api", server=False),
              issue(ca, "kubetail-cluster-api", server=False, expired=True), {})
    directory = tmp_path_factory.mktemp("pki")
    for name, data in {"ca.pem": ca.cert_pem, "server.pem": server.cert_pem, "server-key.pem": server.key_pem,
                       "garbage.pem": b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
                       "other-ca.pem": other_ca.cert_pem}.items():
        (directory / name).write_bytes(data)
        pki.files[name] = directory / name
    return pki


