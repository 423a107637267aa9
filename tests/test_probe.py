"""`kubetail-agent probe` / a link named grpc_health_probe: grpc_health_probe's flags and exit codes,
against the real agent, with and without mutual TLS."""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import REPO, Issued, Pki, run_cli

ARGV0_LINK_ENV = {"GRPC_VERBOSITY": "NONE"}


def probe(*args: str) -> subprocess.CompletedProcess:
    return run_cli("probe", *args)


def test_plaintext_exit_codes(agent, tmp_path: pathlib.Path) -> None:
    port = agent.port
    ok = probe(f"-addr=127.0.0.1:{port}")
    assert (ok.returncode, ok.stdout) == (0, "status: SERVING\n")
    assert probe("--addr", f"127.0.0.1:{port}", "-v").returncode == 0  # double dash, separate value
    assert probe(f"-addr=:{port}").returncode == 0  # the DaemonSet's form
    assert probe(f"-addr=127.0.0.1:{port}", "-service=no.such.Service").returncode == 3
    assert probe(f"-addr=127.0.0.1:{port}", "-rpc-header", "x-test: 1", "-user-agent=kubelet").returncode == 0
    with __import__("socket").socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    assert probe(f"-addr=127.0.0.1:{closed}", "-connect-timeout=300ms").returncode == 2


@pytest.mark.parametrize("args", [
    [],  # no -addr
    ["-addr=:1", "-connect-timeout=0s"],
    ["-addr=:1", "-rpc-timeout=-1s"],
    ["-addr=:1", "-tls-ca-cert=/x"],  # -tls-* without -tls
    ["-addr=:1", "-tls", "-alts"],
    ["-addr=:1", "-alts", "-spiffe"],
    ["-addr=:1", "-tls", "-tls-no-verify", "-tls-server-name=x"],
    ["-addr=:1", "-tls", "-tls-client-cert=/x"],  # cert without key
    ["-addr=:1", "-tls", "-tls-ca-cert=/nonexistent/ca.pem"],  # TLS material not loadable
    ["-addr=:1", "-bogus"],
    ["-addr"],
])
def test_invalid_arguments_exit_1(args: list[str]) -> None:
    result = probe(*args)
    assert result.returncode == 1, (args, result.stdout, result.stderr)
    assert result.stderr.strip() and "Traceback" not in result.stderr


def test_not_serving_exit_4() -> None:
    # The agent only reports NOT_SERVING while it stops accepting RPCs, so the status a probe can see
    # then is a failed RPC (3). A real grpc health server that reports NOT_SERVING shows exit 4.
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = probe(f"-addr=127.0.0.1:{port}")
        assert result.returncode == 4, result.stderr
        assert "NOT_SERVING" in result.stderr
    finally:
        server.stop(None)


def self_signed_server() -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed-agent")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(key, cert)


def write_pem(path: pathlib.Path, issued: Issued) -> tuple[pathlib.Path, pathlib.Path]:
    cert, key = path / "cert.pem", path / "key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return cert, key


def test_mutual_tls_like_the_daemonset(start_agent, logs_dir: pathlib.Path, tmp_path: pathlib.Path, pki: Pki) -> None:
    agent = start_agent(logs_dir, tls={"cert-file": str(pki.files["server.pem"]),
                                       "key-file": str(pki.files["server-key.pem"]),
                                       "ca-file": str(pki.files["ca.pem"])})
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    client_cert, client_key = write_pem(client_dir, pki.client)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_cert, other_key = write_pem(other_dir, pki.other_client)
    base = [f"-addr=:{agent.port}", "-tls", f"-tls-ca-cert={pki.files['ca.pem']}", "-tls-server-name=localhost"]
    ok = probe(*base, f"-tls-client-cert={client_cert}", f"-tls-client-key={client_key}")
    assert ok.returncode == 0, ok.stderr
    # The same through a link named grpc_health_probe, as the image's /bin/grpc_health_probe.
    link = tmp_path / "grpc_health_probe"
    link.symlink_to(REPO / "kubetail_agent.py")
    linked = subprocess.run([sys.executable, str(link), *base, f"-tls-client-cert={client_cert}",
                             f"-tls-client-key={client_key}"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, **ARGV0_LINK_ENV})
    assert (linked.returncode, linked.stdout) == (0, "status: SERVING\n"), linked.stderr
    # No client certificate, or one from another CA: the handshake fails -> connection failure.
    assert probe(*base).returncode == 2
    assert probe(*base, f"-tls-client-cert={other_cert}", f"-tls-client-key={other_key}").returncode == 2
    # Plain text against a TLS server: connection failure.
    assert probe(f"-addr=:{agent.port}", "-connect-timeout=500ms").returncode == 2


def test_tls_no_verify_with_a_self_signed_server(start_agent, logs_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    cert, key = write_pem(tmp_path, self_signed_server())
    agent = start_agent(logs_dir, tls={"cert-file": str(cert), "key-file": str(key)})
    result = probe(f"-addr=127.0.0.1:{agent.port}", "-tls", "-tls-no-verify")
    assert result.returncode == 0, result.stderr
