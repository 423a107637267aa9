"""Authorization (auth-mode token / identity / none) against a real agent and a fake kube-apiserver.

A small HTTPS server on loopback (its CA made here) stands in for the kube-apiserver. It answers
SelfSubjectAccessReviews by the bearer token it receives and SubjectAccessReviews by spec.user and
spec.groups, from the policy tables below, and records every request. The agent reaches it
through a kubeconfig and the real kubernetes client.

Most agents here get a container-logs-dir that does not exist. A request the agent refuses must
come back with the exact authorization status: had the agent looked at the directory first, the
answer would be NOT_FOUND. A request the agent lets through comes back NOT_FOUND from that
directory, which proves it got past authorization.
"""

from __future__ import annotations

import base64
import datetime
import json
import pathlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import AgentProcess, Issued, cri, issue, log_path, make_ca, records, run_cli, stream_request, write_config
from kubetail_agent_proto import cluster_agent_pb2 as pb
from kubetail_agent_proto import cluster_agent_pb2_grpc as pb_grpc

SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
AGENT_TOKEN = "agent-token"  # the agent's own credentials, from the kubeconfig
ALL = "*"  # in a policy: every namespace, and the cluster-wide question too

# Bearer token -> namespaces it may `get pods/log` in (SelfSubjectAccessReview).
ALICE = "alice-secret-token-7f3a9c"
CAROL = "carol-secret-token-51be02"
ADMIN = "admin-secret-token-c0ffee"
NOBODY = "nobody-secret-token-0dd5e1"
STRANGER = "stranger-secret-token-9b9b9b"  # unknown to the apiserver: 401
TOKEN_POLICY: dict[str, Any] = {ALICE: {"default", "team-a"}, CAROL: {"default"}, ADMIN: ALL, NOBODY: set()}
SECRETS = [ALICE, CAROL, ADMIN, NOBODY, STRANGER, AGENT_TOKEN]

# User / group -> namespaces (SubjectAccessReview, identity mode).
USER_POLICY: dict[str, Any] = {"alice": {"default", "team-a"}, "eve": set()}
GROUP_POLICY: dict[str, Any] = {"log-readers": ALL}

METHODS = ("StreamForward", "StreamBackward", "List", "Watch")
CALL_TIMEOUT = 30  # generous: a hang shows up as DEADLINE_EXCEEDED, never as a slow pass
BOUND_DEADLINE = 4  # auth.timeout is 1s where this is used: an agent ignoring it (5s default) misses this deadline
OK = grpc.StatusCode.OK
NOW = datetime.datetime.now(datetime.UTC)


# ---------------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------------


class Pki(NamedTuple):
    kube_ca: Issued  # signs the fake apiserver's certificate and the agent's kube client certificate
    kube_client: Issued  # the agent's own client certificate for the apiserver, CN kubetail-agent
    agent_ca: Issued  # signs the agent's server certificate and the gRPC client certificates
    cluster_api: Issued  # client certificate, CN kubetail-cluster-api
    intruder: Issued  # client certificate from the same CA, CN intruder
    files: dict[str, pathlib.Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    kube_ca, agent_ca = make_ca("fake kube-apiserver CA"), make_ca("kubetail agent CA")
    apiserver, agent = issue(kube_ca, "kube-apiserver", server=True), issue(agent_ca, "kubetail-agent", server=True)
    pki = Pki(kube_ca, issue(kube_ca, "kubetail-agent", server=False), agent_ca,
              issue(agent_ca, "kubetail-cluster-api", server=False), issue(agent_ca, "intruder", server=False), {})
    directory = tmp_path_factory.mktemp("auth-pki")
    for name, data in {"apiserver.pem": apiserver.cert_pem, "apiserver-key.pem": apiserver.key_pem,
                       "agent-ca.pem": agent_ca.cert_pem, "agent.pem": agent.cert_pem,
                       "agent-key.pem": agent.key_pem}.items():
        (directory / name).write_bytes(data)
        pki.files[name] = directory / name
    return pki


# ---------------------------------------------------------------------------------------------
# The fake kube-apiserver
# ---------------------------------------------------------------------------------------------


class Review(NamedTuple):
    """One request the fake apiserver received."""

    path: str
    authorization: str
    body: Any
    client_cert: str | None = None  # CN of the client certificate presented, if any


def _grants(policy: Any, namespace: str | None) -> bool:
    return policy == ALL or (namespace is not None and namespace in policy)


def _status_body(code: int, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": reason,
            "reason": reason, "code": code}


class _Handler(BaseHTTPRequestHandler):
    server_version = "fake-kube-apiserver/1"
    protocol_version = "HTTP/1.0"  # one request per connection: a stopped server refuses at once

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        fake: FakeApiserver = self.server.fake  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        authorization = self.headers.get("Authorization", "")
        peer = self.connection.getpeercert()
        client_cert = None
        if peer:
            client_cert = next(value for rdn in peer["subject"] for key, value in rdn if key == "commonName")
        fake.record(Review(self.path, authorization, body, client_cert))
        if fake.delay:
            fake.release.wait(fake.delay)
        status, answer = fake.answer(self.path, authorization, body, client_cert)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # e.g. the agent gave up on a slow answer and closed the connection


class FakeApiserver:
    """POST /apis/authorization.k8s.io/v1/{self,}subjectaccessreviews over HTTPS on 127.0.0.1."""

    def __init__(self, cert_file: pathlib.Path, key_file: pathlib.Path, ca: Issued, directory: pathlib.Path) -> None:
        self.requests: list[Review] = []
        self._lock = threading.Lock()
        self.delay = 0.0  # seconds to wait before answering
        self.fail_with = 0  # an HTTP status to answer every request with, e.g. 500
        self.release = threading.Event()  # set at teardown: delayed answers go out at once
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_file), str(key_file))
        context.load_verify_locations(cadata=ca.cert_pem.decode())
        context.verify_mode = ssl.CERT_OPTIONAL  # as the apiserver: a client certificate is one way in
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self  # type: ignore[attr-defined]
        # The handshake runs in the handler's thread, not in the accept loop.
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.httpd.server_address[1]
        self.kubeconfig = write_kubeconfig(directory / "kubeconfig.yaml", f"https://127.0.0.1:{self.port}", ca)
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self.running = True

    def record(self, review: Review) -> None:
        with self._lock:
            self.requests.append(review)

    @property
    def reviews(self) -> list[Review]:
        with self._lock:
            return list(self.requests)

    def answer(self, path: str, authorization: str, body: Any,
               client_cert: str | None = None) -> tuple[int, dict[str, Any]]:
        if self.fail_with:
            return self.fail_with, _status_body(self.fail_with, "InternalError")
        token = authorization[7:] if authorization.startswith("Bearer ") else None
        if client_cert == "kubetail-agent":
            token = AGENT_TOKEN  # the apiserver's x509 authenticator runs before its token authenticator
        spec = body.get("spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict):
            return 400, _status_body(400, "BadRequest")
        if path == SSAR_PATH:
            kind = "SelfSubjectAccessReview"
            if token == AGENT_TOKEN:
                policies = [ALL]  # the agent's service account (a review as the agent, not the caller)
            elif token in TOKEN_POLICY:
                policies = [TOKEN_POLICY[token]]
            else:
                return 401, _status_body(401, "Unauthorized")
        elif path == SAR_PATH:
            kind = "SubjectAccessReview"
            if token != AGENT_TOKEN:
                return 401, _status_body(401, "Unauthorized")
            policies = [USER_POLICY.get(spec.get("user"), set())]
            policies += [GROUP_POLICY.get(group, set()) for group in spec.get("groups") or []]
        else:
            return 404, _status_body(404, "NotFound")
        attributes = spec.get("resourceAttributes") or {}
        namespace = attributes.get("namespace")
        allowed = ((attributes.get("verb"), attributes.get("resource"), attributes.get("subresource"))
                   == ("get", "pods", "log") and any(_grants(p, namespace) for p in policies))
        return 200, {"apiVersion": "authorization.k8s.io/v1", "kind": kind, "metadata": {}, "spec": spec,
                     "status": {"allowed": allowed}}

    def stop(self) -> None:
        """Close the listening socket: from now on the port refuses connections."""
        if self.running:
            self.running = False
            self.release.set()
            self.httpd.shutdown()
            self.httpd.server_close()
            self._thread.join(5)


def write_kubeconfig(path: pathlib.Path, server: str, ca: Issued, token: str | None = AGENT_TOKEN,
                     client: Issued | None = None) -> pathlib.Path:
    user: dict[str, str] = {}
    if token is not None:
        user["token"] = token
    if client is not None:
        user["client-certificate-data"] = base64.b64encode(client.cert_pem).decode()
        user["client-key-data"] = base64.b64encode(client.key_pem).decode()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca.cert_pem).decode()}}],
        "users": [{"name": "kubetail-agent", "user": user}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "kubetail-agent"}}],
    }))
    return path


@pytest.fixture
def kube(tmp_path: pathlib.Path, pki: Pki) -> Iterator[FakeApiserver]:
    fake = FakeApiserver(pki.files["apiserver.pem"], pki.files["apiserver-key.pem"], pki.kube_ca, tmp_path)
    yield fake
    fake.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Agents, calls, expectations
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def missing_logs(tmp_path: pathlib.Path) -> pathlib.Path:
    """A container-logs-dir that does not exist: any look at it answers NOT_FOUND."""
    return tmp_path / "never-created"


def start_token_agent(start_agent, logs: pathlib.Path, kubeconfig: pathlib.Path, **settings: Any) -> AgentProcess:
    return start_agent(logs, auth_mode="token", kubeconfig=str(kubeconfig), **settings)


def bearer(token: str, prefix: str = "Bearer ") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"{prefix}{token}"),)


def call(channel: grpc.Channel, method: str, namespaces: Sequence[str] = ("default",),
         metadata: Sequence[tuple[str, str]] = (), timeout: float = CALL_TIMEOUT) -> list[Any]:
    """Run one RPC; return what it produced (a Watch: its first event) or raise grpc.RpcError."""
    if method in ("StreamForward", "StreamBackward"):
        (namespace,) = namespaces
        stub = pb_grpc.LogRecordsServiceStub(channel)
        return records(getattr(stub, method)(stream_request(namespace=namespace), metadata=metadata,
                                             timeout=timeout))
    stub = pb_grpc.LogMetadataServiceStub(channel)
    if method == "List":
        return list(stub.List(pb.LogMetadataListRequest(namespaces=list(namespaces)), metadata=metadata,
                              timeout=timeout).items)
    stream = stub.Watch(pb.LogMetadataWatchRequest(namespaces=list(namespaces)), metadata=metadata,
                        timeout=timeout)
    try:
        return [next(stream)]
    finally:
        stream.cancel()


def outcome(channel: grpc.Channel, method: str, namespaces: Sequence[str] = ("default",),
            metadata: Sequence[tuple[str, str]] = (), timeout: float = CALL_TIMEOUT) -> tuple[grpc.StatusCode, str]:
    try:
        call(channel, method, namespaces, metadata, timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return OK, ""


def reached_logs(method: str, logs: pathlib.Path, namespace: str = "default") -> tuple[grpc.StatusCode, str]:
    """What a request that got past authorization answers when the logs directory is missing."""
    if method in ("StreamForward", "StreamBackward"):
        return grpc.StatusCode.NOT_FOUND, f"log file not found: {log_path(logs, namespace=namespace)}"
    return grpc.StatusCode.NOT_FOUND, f"container logs directory not found: {logs}"


def denied(namespace: str | None) -> tuple[grpc.StatusCode, str]:
    where = f"in namespace `{namespace}`" if namespace else "in all namespaces"
    return grpc.StatusCode.PERMISSION_DENIED, f"permission denied: `get pods/log` {where}"


MISSING_TOKEN = (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token in gRPC metadata `authorization`")
REJECTED_TOKEN = (grpc.StatusCode.UNAUTHENTICATED, "the kube-apiserver rejected the caller's token")


def attributes(namespace: str | None) -> dict[str, str]:
    out = {"verb": "get", "resource": "pods", "subresource": "log"}
    if namespace is not None:
        out["namespace"] = namespace
    return out


def assert_ssar(review: Review, token: str, namespace: str | None) -> None:
    """A SelfSubjectAccessReview authenticated as the caller's token, asking exactly get pods/log."""
    assert review.path == SSAR_PATH
    assert review.authorization == f"Bearer {token}"
    assert review.client_cert is None  # the caller's token is the only credential
    assert review.body.get("apiVersion", "authorization.k8s.io/v1") == "authorization.k8s.io/v1"
    assert review.body.get("kind", "SelfSubjectAccessReview") == "SelfSubjectAccessReview"
    assert review.body["spec"] == {"resourceAttributes": attributes(namespace)}, review.body


def assert_sar(review: Review, namespace: str | None, user: str, groups: Sequence[str] = (),
               extra: dict[str, list[str]] | None = None) -> None:
    """A SubjectAccessReview with the agent's own credentials, about the forwarded user."""
    assert review.path == SAR_PATH
    assert review.authorization == f"Bearer {AGENT_TOKEN}"
    assert review.body.get("apiVersion", "authorization.k8s.io/v1") == "authorization.k8s.io/v1"
    assert review.body.get("kind", "SubjectAccessReview") == "SubjectAccessReview"
    spec = dict(review.body["spec"])
    assert spec.pop("resourceAttributes") == attributes(namespace), review.body
    assert spec.pop("user") == user
    assert spec.pop("groups", []) == list(groups)
    assert spec.pop("extra", {}) == (extra or {})
    assert spec == {}, review.body


def assert_quiet(agent: AgentProcess) -> None:
    """Alive, no internal error logged, and no token anywhere in its (debug-level) log."""
    assert agent.proc.poll() is None, "agent exited:\n" + "\n".join(agent.lines)
    assert [e for e in agent.events() if e.get("level") == "error"] == []
    text = "\n".join(agent.lines)
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} appears in the agent's log"


def serving(agent: AgentProcess, channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert_quiet(agent)


# ---------------------------------------------------------------------------------------------
# auth-mode token
# ---------------------------------------------------------------------------------------------


def test_default_mode_is_token_and_needs_kube_credentials(tmp_path: pathlib.Path) -> None:
    # No auth-mode given: token mode, which cannot work outside a cluster without a kubeconfig.
    cfg = write_config(tmp_path / "config.yaml", {"addr": "127.0.0.1:0", "container-logs-dir": str(tmp_path)})
    result = run_cli("--config", str(cfg), env={"KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kubetail-agent: "), result.stderr
    assert "auth-mode token" in lines[0] and "kubeconfig" in lines[0], lines[0]


def test_missing_or_empty_token_is_unauthenticated(start_agent, kube: FakeApiserver, missing_logs) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for metadata in [(), (("authorization", ""),), (("authorization", "Bearer "),),
                         (("authorization", "Bearer"),), (("authorization", "bearer   "),),
                         (("authorization", "   "),), (("x-remote-user", "alice"),)]:
            for method in METHODS:
                assert outcome(channel, method, metadata=metadata) == MISSING_TOKEN, (method, metadata)
            assert outcome(channel, "List", [], metadata=metadata) == MISSING_TOKEN
        assert kube.reviews == []
        serving(agent, channel)


def test_unknown_token_is_unauthenticated(start_agent, kube: FakeApiserver, missing_logs) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for method in METHODS:
            assert outcome(channel, method, metadata=bearer(STRANGER)) == REJECTED_TOKEN, method
        assert outcome(channel, "List", [], metadata=bearer(STRANGER)) == REJECTED_TOKEN
        reviews = kube.reviews
        assert reviews
        for review in reviews[:-1]:
            assert_ssar(review, STRANGER, "default")
        assert_ssar(reviews[-1], STRANGER, None)
        serving(agent, channel)


@pytest.mark.parametrize("prefix", ["Bearer ", "bearer ", ""], ids=["Bearer", "bearer", "bare"])
def test_allowed_namespace(start_agent, kube: FakeApiserver, missing_logs, prefix: str) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for method in METHODS:
            assert outcome(channel, method, metadata=bearer(ALICE, prefix)) == reached_logs(method, missing_logs)
        # Every RPC asks `get pods/log`: one question, asked once, as the caller (not as the agent).
        (review,) = kube.reviews
        assert_ssar(review, ALICE, "default")
        serving(agent, channel)


def test_allowed_namespace_streams_records(start_agent, kube: FakeApiserver, logs_dir: pathlib.Path) -> None:
    log_path(logs_dir, namespace="team-a").write_text(cri("2024-05-01T10:00:00Z", "hello team-a"))
    log_path(logs_dir, namespace="default").write_text(cri("2024-05-01T10:00:00Z", "hello default"))
    agent = start_token_agent(start_agent, logs_dir, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        expected = [("2024-05-01T10:00:00.000000000Z", "hello team-a", True)]
        assert call(channel, "StreamForward", ["team-a"], bearer(ALICE)) == expected
        assert call(channel, "StreamBackward", ["team-a"], bearer(ALICE)) == expected
        items = call(channel, "List", ["team-a"], bearer(ALICE))
        assert [(i.spec.namespace, i.spec.pod_name) for i in items] == [("team-a", "web-1")]
        assert outcome(channel, "StreamForward", ["default"], bearer(CAROL)) == (OK, "")
        assert outcome(channel, "StreamForward", ["team-a"], bearer(CAROL)) == denied("team-a")
        assert [(r.authorization, r.body["spec"]["resourceAttributes"]["namespace"]) for r in kube.reviews] == [
            (f"Bearer {ALICE}", "team-a"), (f"Bearer {CAROL}", "default"), (f"Bearer {CAROL}", "team-a")]
        serving(agent, channel)


def test_denied_namespace_touches_nothing(start_agent, kube: FakeApiserver, missing_logs) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for method in METHODS:
            assert outcome(channel, method, ["kube-system"], bearer(ALICE)) == denied("kube-system"), method
            assert outcome(channel, method, ["default"], bearer(NOBODY)) == denied("default"), method
        reviews = kube.reviews
        assert len(reviews) == 2  # a denial is cached too
        assert_ssar(reviews[0], ALICE, "kube-system")
        assert_ssar(reviews[1], NOBODY, "default")
        serving(agent, channel)


@pytest.mark.parametrize("method", ["List", "Watch"])
def test_multi_namespace_request_with_one_denied(start_agent, kube: FakeApiserver, missing_logs, method) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        assert outcome(channel, method, ["default", "team-a"], bearer(ALICE)) == reached_logs(method, missing_logs)
        assert outcome(channel, method, ["default", "kube-system", "team-a"], bearer(ALICE)) == denied("kube-system")
        assert outcome(channel, method, ["team-a", "default"], bearer(CAROL)) == denied("team-a")
        asked = sorted((r.authorization, r.body["spec"]["resourceAttributes"]["namespace"]) for r in kube.reviews)
        assert asked == sorted([(f"Bearer {ALICE}", "default"), (f"Bearer {ALICE}", "team-a"),
                                (f"Bearer {ALICE}", "kube-system"), (f"Bearer {CAROL}", "default"),
                                (f"Bearer {CAROL}", "team-a")])
        for review in kube.reviews:
            assert_ssar(review, review.authorization[7:], review.body["spec"]["resourceAttributes"]["namespace"])
        serving(agent, channel)


@pytest.mark.parametrize("method", ["List", "Watch"])
def test_cluster_wide(start_agent, kube: FakeApiserver, missing_logs, method) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        assert outcome(channel, method, [], bearer(ADMIN)) == reached_logs(method, missing_logs)
        # ALICE may read two namespaces, which is not the whole cluster.
        assert outcome(channel, method, [], bearer(ALICE)) == denied(None)
        reviews = kube.reviews
        assert len(reviews) == 2
        assert_ssar(reviews[0], ADMIN, None)  # no namespace key at all: the cluster-wide question
        assert_ssar(reviews[1], ALICE, None)
        serving(agent, channel)


def test_cluster_wide_list_returns_every_namespace(start_agent, kube: FakeApiserver, logs_dir) -> None:
    for namespace in ("default", "team-a", "kube-system"):
        log_path(logs_dir, namespace=namespace).write_text(cri("2024-05-01T10:00:00Z", namespace))
    agent = start_token_agent(start_agent, logs_dir, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        items = call(channel, "List", [], bearer(ADMIN))
        assert sorted(i.spec.namespace for i in items) == ["default", "kube-system", "team-a"]
        serving(agent, channel)


# ---------------------------------------------------------------------------------------------
# allowed-namespaces
# ---------------------------------------------------------------------------------------------


def test_allowed_namespaces_rejects_others_before_any_review(start_agent, kube: FakeApiserver, missing_logs) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig, allowed_namespaces=["default", "team-a"])
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for method in METHODS:
            assert outcome(channel, method, ["kube-system"], bearer(ADMIN)) == denied("kube-system"), method
        for method in ("List", "Watch"):
            assert outcome(channel, method, ["default", "kube-system"], bearer(ADMIN)) == denied("kube-system")
        assert kube.reviews == []
        # Inside the allowed set the apiserver still decides.
        for method in METHODS:
            assert outcome(channel, method, ["team-a"], bearer(ALICE)) == reached_logs(method, missing_logs, "team-a")
            assert outcome(channel, method, ["team-a"], bearer(CAROL)) == denied("team-a")
        assert len(kube.reviews) == 2
        serving(agent, channel)


def test_allowed_namespaces_narrows_cluster_wide_list(start_agent, kube: FakeApiserver, logs_dir) -> None:
    for namespace in ("default", "team-a", "kube-system", "team-b"):
        log_path(logs_dir, namespace=namespace).write_text(cri("2024-05-01T10:00:00Z", namespace))
    agent = start_token_agent(start_agent, logs_dir, kube.kubeconfig, allowed_namespaces=["default", "team-a"])
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for token in (ADMIN, ALICE):  # ALICE may not read the cluster, but may read both allowed namespaces
            items = call(channel, "List", [], bearer(token))
            assert sorted(i.spec.namespace for i in items) == ["default", "team-a"]
        assert outcome(channel, "List", [], bearer(CAROL)) == denied("team-a")
        asked = sorted((r.authorization[7:], r.body["spec"]["resourceAttributes"].get("namespace"))
                       for r in kube.reviews)
        # One review per allowed namespace, none cluster-wide.
        assert asked == sorted([(ADMIN, "default"), (ADMIN, "team-a"), (ALICE, "default"), (ALICE, "team-a"),
                                (CAROL, "default"), (CAROL, "team-a")])
        serving(agent, channel)


def test_allowed_namespaces_narrows_cluster_wide_watch(start_agent, kube: FakeApiserver, logs_dir) -> None:
    agent = start_token_agent(start_agent, logs_dir, kube.kubeconfig, allowed_namespaces=["default", "team-a"])
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        stub = pb_grpc.LogMetadataServiceStub(channel)
        stream = stub.Watch(pb.LogMetadataWatchRequest(), metadata=bearer(ALICE), timeout=CALL_TIMEOUT)
        seen: list[tuple[str, str]] = []
        done = threading.Event()

        def read() -> None:
            try:
                for event in stream:
                    seen.append((event.type, event.object.spec.namespace))
                    if event.object.spec.namespace == "team-a":
                        done.set()
            except grpc.RpcError:
                pass
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # The watch starts after its review; keep adding files (outside the allowed set first)
        # until one from the allowed set is announced.
        for i in range(100):
            for namespace in ("kube-system", "team-b", "team-a"):
                log_path(logs_dir, pod=f"web-{i}", namespace=namespace).write_text(cri("2024-05-01T10:00:00Z", "x"))
            if done.wait(0.2):
                break
        stream.cancel()
        reader.join(10)
        assert ("ADDED", "team-a") in seen
        assert {namespace for _, namespace in seen} == {"team-a"}
        asked = sorted(r.body["spec"]["resourceAttributes"].get("namespace") for r in kube.reviews)
        assert asked == ["default", "team-a"]
        serving(agent, channel)


# ---------------------------------------------------------------------------------------------
# Decision cache
# ---------------------------------------------------------------------------------------------


def test_cache_one_review_for_100_identical_requests(start_agent, kube: FakeApiserver, missing_logs) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for i in range(100):
            method = METHODS[i % 4]
            # With or without the prefix it is the same token, so the same cache entry.
            metadata = bearer(ALICE, "Bearer " if i % 2 else "")
            assert outcome(channel, method, ["default"], metadata) == reached_logs(method, missing_logs)
        assert len(kube.reviews) == 1
        for _ in range(100):
            assert outcome(channel, "StreamForward", ["kube-system"], bearer(ALICE)) == denied("kube-system")
        assert len(kube.reviews) == 2
        # Another caller, same namespace: its own question.
        assert outcome(channel, "StreamForward", ["default"], bearer(CAROL)) == reached_logs(
            "StreamForward", missing_logs)
        assert len(kube.reviews) == 3
        serving(agent, channel)


def test_cache_one_review_for_100_concurrent_requests(start_agent, kube: FakeApiserver, missing_logs) -> None:
    kube.delay = 0.5  # every request arrives while the first review is still in flight
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        barrier = threading.Barrier(100)

        def one(i: int) -> tuple[str, tuple[grpc.StatusCode, str]]:
            method = METHODS[i % 4]
            barrier.wait()
            return method, outcome(channel, method, ["team-a"], bearer(ALICE))

        with ThreadPoolExecutor(100) as pool:
            results = list(pool.map(one, range(100)))
        for method, result in results:
            assert result == reached_logs(method, missing_logs, "team-a")
        (review,) = kube.reviews
        assert_ssar(review, ALICE, "team-a")

        # The same for a denial.
        barrier.reset()

        def denied_one(_i: int) -> tuple[grpc.StatusCode, str]:
            barrier.wait()
            return outcome(channel, "StreamBackward", ["team-a"], bearer(CAROL))

        with ThreadPoolExecutor(100) as pool:
            assert set(pool.map(denied_one, range(100))) == {denied("team-a")}
        assert len(kube.reviews) == 2
        serving(agent, channel)


def test_cache_expiry(start_agent, kube: FakeApiserver, missing_logs) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig, auth={"cache-ttl": "1s"})
    expected = reached_logs("StreamForward", missing_logs)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        started = time.monotonic()
        assert outcome(channel, "StreamForward", ["default"], bearer(ALICE)) == expected
        assert outcome(channel, "StreamForward", ["default"], bearer(ALICE)) == expected
        if time.monotonic() - started < 0.9:  # (on a very slow machine the entry may have expired already)
            assert len(kube.reviews) == 1
        time.sleep(1.5)
        before = len(kube.reviews)
        assert outcome(channel, "StreamForward", ["default"], bearer(ALICE)) == expected
        assert len(kube.reviews) == before + 1
        for review in kube.reviews:
            assert_ssar(review, ALICE, "default")
        serving(agent, channel)


def test_cache_holds_at_most_10000_decisions() -> None:
    # In-process: 10,001 callers through the real Authorizer, with the review itself replaced.
    import asyncio

    from kubetail_agent import AUTH_CACHE_MAX, Authorizer, Caller, Config

    assert AUTH_CACHE_MAX == 10_000
    authorizer = Authorizer(Config(auth_mode="token"))
    asked: list[tuple[str, str]] = []
    authorizer._review_blocking = lambda caller, namespace: asked.append((caller.token, namespace)) or True
    callers = [Caller(("token", f"hash-{i}"), token=f"t{i}") for i in range(AUTH_CACHE_MAX + 1)]

    async def run() -> None:
        for caller in callers[:AUTH_CACHE_MAX]:
            assert await authorizer.decide(caller, "default")
        assert await authorizer.decide(callers[0], "default")  # a hit: now the most recently used
        assert len(asked) == AUTH_CACHE_MAX
        assert await authorizer.decide(callers[AUTH_CACHE_MAX], "default")  # evicts the least recently used
        assert len(authorizer.cache) == AUTH_CACHE_MAX
        assert len(asked) == AUTH_CACHE_MAX + 1
        assert await authorizer.decide(callers[0], "default")  # still cached
        assert len(asked) == AUTH_CACHE_MAX + 1
        assert await authorizer.decide(callers[1], "default")  # was evicted: asked again
        assert asked[-1] == ("t1", "default") and len(asked) == AUTH_CACHE_MAX + 2
        assert len(authorizer.cache) == AUTH_CACHE_MAX

    try:
        asyncio.run(run())
    finally:
        authorizer.close()


# ---------------------------------------------------------------------------------------------
# An apiserver that is down, slow or failing
# ---------------------------------------------------------------------------------------------


def assert_unavailable(result: tuple[grpc.StatusCode, str], what: object) -> None:
    code, details = result
    assert code == grpc.StatusCode.UNAVAILABLE, (what, code, details)
    assert details, what


def test_apiserver_unreachable(start_agent, tmp_path: pathlib.Path, pki: Pki, missing_logs) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "down.yaml", f"https://127.0.0.1:{closed_port()}", pki.kube_ca)
    agent = start_token_agent(start_agent, missing_logs, kubeconfig, auth={"timeout": "1s"})
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for method in METHODS:
            assert_unavailable(outcome(channel, method, metadata=bearer(ALICE), timeout=BOUND_DEADLINE), method)
        assert_unavailable(outcome(channel, "List", [], metadata=bearer(ALICE), timeout=BOUND_DEADLINE), "List")
        serving(agent, channel)


def test_apiserver_goes_down(start_agent, kube: FakeApiserver, missing_logs) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        assert outcome(channel, "List", ["default"], bearer(ALICE)) == reached_logs("List", missing_logs)
        kube.stop()
        for method in METHODS:
            assert_unavailable(outcome(channel, method, ["team-a"], bearer(ALICE), timeout=BOUND_DEADLINE), method)
        # A decision made before the outage still serves.
        for method in METHODS:
            assert outcome(channel, method, ["default"], bearer(ALICE)) == reached_logs(method, missing_logs)
        serving(agent, channel)


def test_apiserver_slow(start_agent, kube: FakeApiserver, missing_logs) -> None:
    kube.delay = 60  # far beyond auth.timeout and the client's deadline
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig, auth={"timeout": "1s"})
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel, ThreadPoolExecutor(5) as pool:
        asked = [(method, ["team-a"]) for method in METHODS] + [("List", [])]
        results = list(pool.map(lambda a: outcome(channel, a[0], a[1], bearer(ALICE), BOUND_DEADLINE), asked))
        for (method, _), result in zip(asked, results):
            assert_unavailable(result, method)
        # A failure is not cached: once the apiserver answers again, the same question succeeds.
        kube.delay = 0
        kube.release.set()
        assert outcome(channel, "StreamForward", ["team-a"], bearer(ALICE)) == reached_logs(
            "StreamForward", missing_logs, "team-a")
        serving(agent, channel)


def test_cached_decisions_are_served_while_a_review_hangs(start_agent, kube: FakeApiserver, missing_logs) -> None:
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)  # auth.timeout: the default 5s
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel, ThreadPoolExecutor(1) as pool:
        assert outcome(channel, "List", ["default"], bearer(ALICE)) == reached_logs("List", missing_logs)
        kube.delay = 60
        slow = pool.submit(outcome, channel, "List", ["team-a"], bearer(ALICE))
        while len(kube.reviews) < 2:  # the team-a review is now held by the apiserver
            assert not slow.done(), slow.result()
            time.sleep(0.01)
        for method in METHODS:
            assert outcome(channel, method, ["default"], bearer(ALICE)) == reached_logs(method, missing_logs)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert not slow.done(), slow.result()  # all of the above went past the review in flight
        kube.release.set()  # the apiserver answers now
        assert slow.result() == reached_logs("List", missing_logs)
        serving(agent, channel)


def test_apiserver_accepts_but_never_answers(start_agent, tmp_path: pathlib.Path, pki: Pki, missing_logs) -> None:
    # A listening socket nobody accepts from: TCP connects, the TLS handshake never completes.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        kubeconfig = write_kubeconfig(tmp_path / "hole.yaml", f"https://127.0.0.1:{hole.getsockname()[1]}",
                                      pki.kube_ca)
        agent = start_token_agent(start_agent, missing_logs, kubeconfig, auth={"timeout": "1s"})
        with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel, ThreadPoolExecutor(8) as pool:
            # More distinct questions at once than the agent has review threads.
            asked = [(method, [namespace]) for method in ("StreamForward", "List")
                     for namespace in ("default", "team-a", "team-b", "team-c")]
            results = list(pool.map(lambda a: outcome(channel, a[0], a[1], bearer(ALICE), BOUND_DEADLINE), asked))
            for what, result in zip(asked, results):
                assert_unavailable(result, what)
            serving(agent, channel)


def test_apiserver_error_is_unavailable_and_not_cached(start_agent, kube: FakeApiserver, missing_logs) -> None:
    kube.fail_with = 500
    agent = start_token_agent(start_agent, missing_logs, kube.kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for method in METHODS:
            assert_unavailable(outcome(channel, method, ["default"], bearer(ALICE)), method)
        kube.fail_with = 503
        assert_unavailable(outcome(channel, "List", [], bearer(ADMIN)), "List")
        kube.fail_with = 0
        for method in METHODS:
            assert outcome(channel, method, ["default"], bearer(ALICE)) == reached_logs(method, missing_logs)
        serving(agent, channel)


def test_kubeconfig_client_certificate_is_never_sent_for_a_caller(start_agent, kube: FakeApiserver,
                                                                 tmp_path: pathlib.Path, missing_logs,
                                                                 pki: Pki) -> None:
    # The agent's own credentials are a client certificate. A SelfSubjectAccessReview that
    # presented it would be a review of the agent (allowed everything), not of the caller.
    kubeconfig = write_kubeconfig(tmp_path / "cert.yaml", f"https://127.0.0.1:{kube.port}", pki.kube_ca,
                                  token=None, client=pki.kube_client)
    agent = start_token_agent(start_agent, missing_logs, kubeconfig)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for method in METHODS:
            assert outcome(channel, method, ["default"], bearer(NOBODY)) == denied("default")
        assert outcome(channel, "List", [], bearer(ALICE)) == denied(None)
        assert_ssar(kube.reviews[0], NOBODY, "default")
        assert_ssar(kube.reviews[1], ALICE, None)
        assert len(kube.reviews) == 2
        serving(agent, channel)


def test_kubeconfig_from_environment(tmp_path: pathlib.Path, kube: FakeApiserver, missing_logs) -> None:
    cfg = write_config(tmp_path / "config.yaml", {"addr": "127.0.0.1:0", "container-logs-dir": str(missing_logs),
                                                  "auth-mode": "token", "logging": {"level": "debug"}})
    agent = AgentProcess(["serve", "--config", str(cfg)], env={"KUBECONFIG": str(kube.kubeconfig)})
    try:
        agent.wait_serving()
        with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
            assert outcome(channel, "List", ["default"], bearer(ALICE)) == reached_logs("List", missing_logs)
            (review,) = kube.reviews
            assert_ssar(review, ALICE, "default")
            serving(agent, channel)
    finally:
        agent.kill()


# ---------------------------------------------------------------------------------------------
# auth-mode identity
# ---------------------------------------------------------------------------------------------


def start_identity_agent(start_agent, logs: pathlib.Path, kubeconfig: pathlib.Path, pki: Pki,
                         allowed_names: Sequence[str] = ("kubetail-cluster-api",), **settings: Any) -> AgentProcess:
    tls = {"cert-file": str(pki.files["agent.pem"]), "key-file": str(pki.files["agent-key.pem"]),
           "ca-file": str(pki.files["agent-ca.pem"]), "allowed-names": list(allowed_names)}
    return start_agent(logs, auth_mode="identity", kubeconfig=str(kubeconfig), tls=tls, **settings)


def mtls_channel(agent: AgentProcess, pki: Pki, client: Issued | None) -> grpc.Channel:
    if client is None:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.agent_ca.cert_pem)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.agent_ca.cert_pem, private_key=client.key_pem,
                                             certificate_chain=client.cert_pem)
    return grpc.secure_channel(f"127.0.0.1:{agent.port}", creds)


def identity(user: str | None, *groups: str, extras: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata = [] if user is None else [("x-remote-user", user)]
    metadata += [("x-remote-group", group) for group in groups]
    if extras is not None:
        metadata.append(("x-remote-extras", extras))
    return tuple(metadata)


def test_identity_mode_good_certificate(start_agent, kube: FakeApiserver, missing_logs, pki: Pki) -> None:
    agent = start_identity_agent(start_agent, missing_logs, kube.kubeconfig, pki)
    extras = {"scopes": ["view", "logs"], "authentication.kubernetes.io/pod-name": ["kubetail-1"]}
    with mtls_channel(agent, pki, pki.cluster_api) as channel:
        for method in METHODS:
            assert outcome(channel, method, ["team-a"], identity("alice")) == reached_logs(method, missing_logs,
                                                                                          "team-a")
        (review,) = kube.reviews
        assert_sar(review, "team-a", "alice")

        # Groups (repeated metadata) and extras reach the review; a group may grant what the user may not.
        who = identity("dave", "system:authenticated", "log-readers", extras=json.dumps(extras))
        assert outcome(channel, "List", [], who) == reached_logs("List", missing_logs)
        assert_sar(kube.reviews[-1], None, "dave", ["system:authenticated", "log-readers"], extras)

        # Denied users: by user policy, and with no matching group.
        for method in METHODS:
            assert outcome(channel, method, ["kube-system"], identity("alice")) == denied("kube-system")
            assert outcome(channel, method, ["default"], identity("eve", "developers")) == denied("default")
        assert_sar(kube.reviews[-2], "kube-system", "alice")
        assert_sar(kube.reviews[-1], "default", "eve", ["developers"])
        assert len(kube.reviews) == 4  # the four RPCs share each decision

        # The whole identity is the cache key: another group list is another question.
        assert outcome(channel, "List", ["default"], identity("eve", "log-readers")) == reached_logs(
            "List", missing_logs)
        assert_sar(kube.reviews[-1], "default", "eve", ["log-readers"])
        assert len(kube.reviews) == 5
        serving(agent, channel)


def test_identity_mode_wrong_name_no_cert_no_user(start_agent, kube: FakeApiserver, missing_logs, pki: Pki) -> None:
    agent = start_identity_agent(start_agent, missing_logs, kube.kubeconfig, pki)
    with mtls_channel(agent, pki, pki.intruder) as channel:
        for method in METHODS:
            assert outcome(channel, method, ["default"], identity("alice")) == (
                grpc.StatusCode.PERMISSION_DENIED, "client certificate name (intruder) is not in tls.allowed-names")
    with mtls_channel(agent, pki, None) as channel:  # refused in the TLS handshake
        for method in METHODS:
            code, _ = outcome(channel, method, ["default"], identity("alice"))
            assert code == grpc.StatusCode.UNAVAILABLE
    with mtls_channel(agent, pki, pki.cluster_api) as channel:
        missing_user = (grpc.StatusCode.UNAUTHENTICATED, "missing gRPC metadata `x-remote-user`")
        for method in METHODS:
            assert outcome(channel, method, ["default"], identity(None, "log-readers")) == missing_user
            assert outcome(channel, method, ["default"], identity("")) == missing_user
            # A bearer token is not an identity in this mode.
            assert outcome(channel, method, ["default"], bearer(ADMIN)) == missing_user
        bad_extras = ("not json", "[]", '["a"]', '{"scopes": "view"}', '{"scopes": [1]}', '{"scopes": {"a": 1}}',
                      "null", '"text"', "{")
        for extras in bad_extras:
            for method in METHODS:
                code, _ = outcome(channel, method, ["default"], identity("alice", extras=extras))
                assert code == grpc.StatusCode.UNAUTHENTICATED, (extras, method)
        assert kube.reviews == []
        serving(agent, channel)


def test_identity_mode_any_verified_peer_when_no_names(start_agent, kube: FakeApiserver, missing_logs,
                                                      pki: Pki) -> None:
    agent = start_identity_agent(start_agent, missing_logs, kube.kubeconfig, pki, allowed_names=())
    with mtls_channel(agent, pki, pki.intruder) as channel:
        assert outcome(channel, "List", ["default"], identity("alice")) == reached_logs("List", missing_logs)
        assert_sar(kube.reviews[-1], "default", "alice")
        serving(agent, channel)


def test_identity_mode_with_a_kubeconfig_client_certificate(start_agent, kube: FakeApiserver,
                                                            tmp_path: pathlib.Path, missing_logs, pki: Pki) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "cert.yaml", f"https://127.0.0.1:{kube.port}", pki.kube_ca,
                                  token=None, client=pki.kube_client)
    agent = start_identity_agent(start_agent, missing_logs, kubeconfig, pki)
    with mtls_channel(agent, pki, pki.cluster_api) as channel:
        assert outcome(channel, "List", ["default"], identity("alice")) == reached_logs("List", missing_logs)
        assert outcome(channel, "List", ["default"], identity("eve")) == denied("default")
        for review in kube.reviews:
            assert review.path == SAR_PATH and review.client_cert == "kubetail-agent"
        serving(agent, channel)


def test_identity_mode_agent_credentials_rejected(start_agent, kube: FakeApiserver, tmp_path: pathlib.Path,
                                                  missing_logs, pki: Pki) -> None:
    # The apiserver refuses the agent's own token: the agent cannot ask, which says nothing about
    # the forwarded user. The Cluster API must not be told its user is unauthenticated.
    kubeconfig = write_kubeconfig(tmp_path / "bad-agent.yaml", f"https://127.0.0.1:{kube.port}", pki.kube_ca,
                                  token="revoked-agent-credential")
    agent = start_identity_agent(start_agent, missing_logs, kubeconfig, pki)
    with mtls_channel(agent, pki, pki.cluster_api) as channel:
        code, details = outcome(channel, "List", ["default"], identity("alice"))
        assert kube.reviews and kube.reviews[0].authorization == "Bearer revoked-agent-credential"
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)


def test_identity_mode_needs_mutual_tls(tmp_path: pathlib.Path, kube: FakeApiserver, pki: Pki) -> None:
    tls = {"cert-file": str(pki.files["agent.pem"]), "key-file": str(pki.files["agent-key.pem"])}
    for i, settings in enumerate([{}, {"tls": tls}]):
        cfg = write_config(tmp_path / f"config-{i}.yaml", {"addr": "127.0.0.1:0", "auth-mode": "identity",
                                                            "kubeconfig": str(kube.kubeconfig), **settings})
        result = run_cli("--config", str(cfg))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("kubetail-agent: "), result.stderr
        assert "tls.ca-file" in lines[0]


# ---------------------------------------------------------------------------------------------
# auth-mode none
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("addr", ["0.0.0.0:0", ":0", "[::]:0"])
def test_none_refuses_a_non_loopback_address(tmp_path: pathlib.Path, addr: str) -> None:
    result = run_cli("-a", addr, "-p", "auth-mode:none", "-p", f"container-logs-dir:{tmp_path}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kubetail-agent: "), result.stderr
    assert "auth-mode none" in lines[0] and "auth.allow-insecure" in lines[0], lines[0]


def test_none_allows_everything_with_a_warning(start_agent, logs_dir: pathlib.Path) -> None:
    log_path(logs_dir, namespace="kube-system").write_text(cri("2024-05-01T10:00:00Z", "secret"))
    agent = start_agent(logs_dir, auth_mode="none", allowed_namespaces=[])
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        assert call(channel, "StreamForward", ["kube-system"]) == [("2024-05-01T10:00:00.000000000Z", "secret", True)]
        assert [i.spec.namespace for i in call(channel, "List", [])] == ["kube-system"]
    warnings = [e for e in agent.events() if e.get("level") == "warn" and "AUTH-MODE NONE" in e["msg"]]
    assert len(warnings) == 1, agent.lines


def test_none_still_applies_allowed_namespaces(start_agent, missing_logs) -> None:
    agent = start_agent(missing_logs, auth_mode="none", allowed_namespaces=["default"])
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        for method in METHODS:
            assert outcome(channel, method, ["kube-system"]) == denied("kube-system")
            assert outcome(channel, method, ["default"]) == reached_logs(method, missing_logs)
