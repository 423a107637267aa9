"""TLS and mutual TLS, with a CA and certificates made here, against a real agent process."""

from __future__ import annotations

import pathlib
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import AgentProcess, Issued, Pki, cri, log_path, records, run_cli, stream_request, write_config
from kubetail_agent_proto import cluster_agent_pb2_grpc as pb_grpc


def credentials(pki: Pki, client: Issued | None = None, trust: Issued | None = None) -> grpc.ChannelCredentials:
    trust = trust or pki.ca
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=trust.cert_pem)
    return grpc.ssl_channel_credentials(root_certificates=trust.cert_pem, private_key=client.key_pem,
                                        certificate_chain=client.cert_pem)


@pytest.fixture
def tls_agent(start_agent, logs_dir: pathlib.Path, pki: Pki) -> AgentProcess:
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "over tls"))
    return start_agent(logs_dir, tls={"cert-file": str(pki.files["server.pem"]),
                                      "key-file": str(pki.files["server-key.pem"])})


@pytest.fixture
def mtls_agent(start_agent, logs_dir: pathlib.Path, pki: Pki) -> AgentProcess:
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "over tls"))
    return start_agent(logs_dir, tls={"cert-file": str(pki.files["server.pem"]),
                                      "key-file": str(pki.files["server-key.pem"]),
                                      "ca-file": str(pki.files["ca.pem"])})


EXPECTED = [("2024-05-01T10:00:00.000000000Z", "over tls", True)]


def assert_works(target: str, creds: grpc.ChannelCredentials) -> None:
    with grpc.secure_channel(target, creds) as channel:
        stub = pb_grpc.LogRecordsServiceStub(channel)
        assert records(stub.StreamForward(stream_request(), timeout=10)) == EXPECTED
        assert records(stub.StreamBackward(stream_request(), timeout=10)) == EXPECTED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def assert_refused(channel: grpc.Channel) -> None:
    stub = pb_grpc.LogRecordsServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamForward(stream_request(), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_server(tls_agent: AgentProcess, pki: Pki) -> None:
    serving = [e for e in tls_agent.events() if e["msg"] == "serving"]
    assert serving[0]["tls"] is True and serving[0]["mtls"] is False
    port = tls_agent.port
    # A plain-text client cannot talk to it.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert_refused(channel)
    # A client that does not trust the server's CA refuses the handshake.
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials(pki, trust=pki.other_ca)) as channel:
        assert_refused(channel)
    # A client trusting the CA works, by IP and by DNS name (both are in the SAN); no client
    # certificate is needed without tls.ca-file, but one is accepted.
    assert_works(f"127.0.0.1:{port}", credentials(pki))
    assert_works(f"localhost:{port}", credentials(pki))
    assert_works(f"127.0.0.1:{port}", credentials(pki, client=pki.client))
    assert tls_agent.proc.poll() is None


def test_mutual_tls(mtls_agent: AgentProcess, pki: Pki) -> None:
    serving = [e for e in mtls_agent.events() if e["msg"] == "serving"]
    assert serving[0]["tls"] is True and serving[0]["mtls"] is True
    target = f"127.0.0.1:{mtls_agent.port}"
    with grpc.insecure_channel(target) as channel:
        assert_refused(channel)
    for rejected in (None, pki.other_client, pki.expired_client):
        with grpc.secure_channel(target, credentials(pki, client=rejected)) as channel:
            assert_refused(channel)
    assert_works(target, credentials(pki, client=pki.client))
    # The refusals did not disturb the server.
    assert mtls_agent.proc.poll() is None
    assert [e for e in mtls_agent.events() if e.get("level") == "error"] == []


def assert_one_line_exit(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kubetail-agent: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_tls_config_errors(tmp_path: pathlib.Path, pki: Pki) -> None:
    cert, key, ca = (str(pki.files[n]) for n in ("server.pem", "server-key.pem", "ca.pem"))
    cases = [
        ({"tls": {"cert-file": cert}}, ("tls.cert-file", "tls.key-file")),
        ({"tls": {"key-file": key}}, ("tls.cert-file", "tls.key-file")),
        ({"tls": {"ca-file": ca}}, ("tls.ca-file",)),
        ({"tls": {"cert-file": str(tmp_path / "missing.pem"), "key-file": key}}, ("tls.cert-file", "missing.pem")),
        ({"tls": {"cert-file": cert, "key-file": str(tmp_path / "missing.pem")}}, ("tls.key-file", "missing.pem")),
        ({"tls": {"cert-file": cert, "key-file": key, "ca-file": str(tmp_path / "missing.pem")}},
         ("tls.ca-file", "missing.pem")),
    ]
    for i, (settings, fragments) in enumerate(cases):
        path = write_config(tmp_path / f"config-{i}.yaml", {"addr": "127.0.0.1:0", **settings})
        assert_one_line_exit(run_cli("--config", str(path)), *fragments)
    # The same through -p.
    assert_one_line_exit(run_cli("-a", "127.0.0.1:0", "-p", f"tls.cert-file:{cert}"), "tls.key-file")


def test_unusable_tls_files_are_one_line_config_errors(tmp_path: pathlib.Path, pki: Pki) -> None:
    # Files that exist but hold no usable certificate or key: the error names the file, and is
    # not mistaken for an address problem ("cannot listen").
    cert, key, garbage = (str(pki.files[n]) for n in ("server.pem", "server-key.pem", "garbage.pem"))
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(pki.client.key_pem)  # a valid key that does not belong to the certificate
    cases = [
        ({"cert-file": garbage, "key-file": key}, "tls.cert-file"),
        ({"cert-file": cert, "key-file": garbage}, "tls.key-file"),
        ({"cert-file": cert, "key-file": str(other_key)}, "tls.key-file"),
        ({"cert-file": cert, "key-file": key, "ca-file": garbage}, "tls.ca-file"),
    ]
    for i, (tls, fragment) in enumerate(cases):
        path = write_config(tmp_path / f"config-{i}.yaml", {"addr": "127.0.0.1:0", "tls": tls})
        result = run_cli("--config", str(path))
        assert_one_line_exit(result, fragment)
        assert "cannot listen" not in result.stderr


def test_tls_agent_stops_cleanly(tls_agent: AgentProcess, pki: Pki) -> None:
    assert_works(f"127.0.0.1:{tls_agent.port}", credentials(pki))
    assert tls_agent.stop(signal.SIGTERM, timeout=30) == 0
    assert tls_agent.events()[-1]["msg"] == "stopped"
