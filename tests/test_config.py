"""Configuration: load_config and its parsers, and how `python -m kubetail_agent` exits on bad config."""

from __future__ import annotations

import json
import pathlib
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

import kubetail_agent
from conftest import AgentProcess, cri, log_path, records, run_cli, stream_request, write_config
from kubetail_agent import Config, ConfigError, load_config, parse_addr, parse_duration, parse_size
from kubetail_agent_proto import cluster_agent_pb2_grpc as pb_grpc

# ---------------------------------------------------------------------------------------------
# parse_duration / parse_size
# ---------------------------------------------------------------------------------------------

DURATIONS = [
    ("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5s", 1.5), ("2h45m", 9900.0),
    ("250us", 250e-6), ("250µs", 250e-6), ("10ns", 10e-9), (" 30s ", 30.0), ("0s", 0.0),
    (5, 5.0), (0, 0.0), (1.5, 1.5),
]
BAD_DURATIONS = ["", "abc", "30", "30 s", "-1s", "1d", "s", "30s garbage", True, False, -1, float("nan"),
                 None, [1], {"s": 1}]


@pytest.mark.parametrize("value,seconds", DURATIONS, ids=[repr(v) for v, _ in DURATIONS])
def test_parse_duration(value, seconds) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", BAD_DURATIONS, ids=[repr(v) for v in BAD_DURATIONS])
def test_parse_duration_rejects(value) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


SIZES = [
    ("1Mi", 1 << 20), ("1MiB", 1 << 20), ("512Ki", 512 << 10), ("512KiB", 512 << 10), ("1048576", 1 << 20),
    (1048576, 1 << 20), ("1M", 1_000_000), ("1MB", 1_000_000), ("4k", 4000), ("4Kb", 4000), ("1 Mi", 1 << 20),
    ("1mi", 1 << 20), ("1024", 1024), ("1024b", 1024), (" 2Mi ", 2 << 20),
]
BAD_SIZES = ["", "abc", "1023", "0", "1Gi", "1.5Mi", "-1Mi", "Mi", "1Mi garbage", True, None, [1024], 1023]


@pytest.mark.parametrize("value,size", SIZES, ids=[repr(v) for v, _ in SIZES])
def test_parse_size(value, size) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", BAD_SIZES, ids=[repr(v) for v in BAD_SIZES])
def test_parse_size_rejects(value) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


# ---------------------------------------------------------------------------------------------
# load_config
# ---------------------------------------------------------------------------------------------

FULL_YAML = """\
addr: 127.0.0.1:6000
container-logs-dir: /logs
node-name: node-a
logging:
  enabled: false
  level: warn
  format: pretty
tls:
  cert-file: /tls/cert.pem
  key-file: /tls/key.pem
  ca-file: /tls/ca.pem
  allowed-names: [a, b]
allowed-namespaces:
  - default
  - kube-system
auth-mode: none
shutdown-timeout: 1m30s
max-record-bytes: 512Ki
scan-threads: 3
"""

FULL_CONFIG = Config(
    addr="127.0.0.1:6000", container_logs_dir="/logs", node_name="node-a", logging_enabled=False,
    logging_level="warn", logging_format="pretty", tls_cert_file="/tls/cert.pem", tls_key_file="/tls/key.pem",
    tls_ca_file="/tls/ca.pem", tls_allowed_names=("a", "b"), allowed_namespaces=("default", "kube-system"),
    auth_mode="none", shutdown_timeout=90.0, max_record_bytes=512 << 10, scan_threads=3,
)


def test_defaults_without_a_file() -> None:
    config, warnings = load_config(env={})
    assert config == Config()
    assert warnings == []
    assert config.addr == ":50051" and config.container_logs_dir == "/var/log/containers"
    assert config.logging_enabled and config.logging_level == "info" and config.logging_format == "json"
    assert config.shutdown_timeout == 30.0 and config.max_record_bytes == 1 << 20
    assert not config.tls_enabled
    assert 1 <= config.effective_scan_threads <= 4
    assert load_config(env={"NODE_NAME": "node-x"})[0].node_name == "node-x"


def test_yaml_file_sets_every_key(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(FULL_YAML)
    assert load_config(str(path), env={}) == (FULL_CONFIG, [])
    # The file's node-name wins over NODE_NAME.
    assert load_config(str(path), env={"NODE_NAME": "from-env"})[0].node_name == "node-a"


def test_json_file_by_extension(tmp_path: pathlib.Path) -> None:
    import yaml

    path = tmp_path / "config.json"
    path.write_text(json.dumps(yaml.safe_load(FULL_YAML)))
    assert load_config(str(path), env={}) == (FULL_CONFIG, [])
    # A .json file is parsed as JSON, not YAML.
    path.write_text("addr: 127.0.0.1:6000\n")
    with pytest.raises(ConfigError, match="cannot parse config file"):
        load_config(str(path), env={})


def test_env_substitution(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setenv("KTA_DIR", "/from/env")
    monkeypatch.setenv("KTA_LEVEL", "debug")
    monkeypatch.setenv("KTA_PORT", "7000")
    monkeypatch.delenv("KTA_UNSET", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text("container-logs-dir: ${KTA_DIR}/containers\nlogging:\n  level: ${KTA_LEVEL}\n"
                    "addr: 127.0.0.1:${KTA_PORT}\nnode-name: x${KTA_UNSET}y\n"
                    "tls:\n  allowed-names: [$KTA_DIR]\n")
    config, _ = load_config(str(path), env={})
    assert config.container_logs_dir == "/from/env/containers"
    assert config.logging_level == "debug"
    assert config.addr == "127.0.0.1:7000"
    assert config.node_name == "xy"  # an unset variable becomes empty
    assert config.tls_allowed_names == ("$KTA_DIR",)  # only ${NAME} is substituted


def test_older_layout_under_cluster_agent(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("cluster-agent:\n" + "".join(f"  {line}\n" for line in FULL_YAML.splitlines()))
    assert load_config(str(path), env={}) == (FULL_CONFIG, [])
    path.write_text("cluster-agent: not-a-mapping\n")
    with pytest.raises(ConfigError, match="cluster-agent"):
        load_config(str(path), env={})


def test_params_and_addr_override_the_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(FULL_YAML)
    config, warnings = load_config(str(path), [
        "logging.level:debug",
        "cluster-agent.container-logs-dir:/other/logs",
        "cluster-agent.logging.enabled:true",
        "shutdown-timeout:5s",
        "max-record-bytes:2Mi",
        "allowed-namespaces:ns-1, ns-2",
        "tls.allowed-names:[x, y]",
        "addr:127.0.0.1:6001",
    ], env={})
    assert warnings == []
    assert config.logging_level == "debug"
    assert config.container_logs_dir == "/other/logs"
    assert config.logging_enabled is True
    assert config.shutdown_timeout == 5.0
    assert config.max_record_bytes == 2 << 20
    assert config.allowed_namespaces == ("ns-1", "ns-2")
    assert config.tls_allowed_names == ("x", "y")
    assert config.addr == "127.0.0.1:6001"
    assert config.node_name == "node-a"  # untouched keys keep the file's value
    # -a wins over both the file and -p.
    assert load_config(str(path), ["addr:127.0.0.1:6001", "auth.allow-insecure:true"], addr=":7000",
                       env={})[0].addr == ":7000"
    # The last -p for a key wins.
    assert load_config(None, ["logging.level:warn", "logging.level:error"], env={})[0].logging_level == "error"


def test_params_keep_string_values_verbatim() -> None:
    # -p values are strings on the command line; for a string key YAML must not reinterpret them
    # (0123 is not octal 83, 1_000 is not 1000, yes is not a boolean, "a #b" has no comment).
    for value in ("0123", "1_000", "0x1F", "yes", "a #b", "1:30"):
        config, _ = load_config(None, [f"node-name:{value}"], env={})
        assert config.node_name == value


def test_param_without_colon_is_an_error() -> None:
    for param in ("logging.level", ":debug"):
        with pytest.raises(ConfigError, match="key:value"):
            load_config(None, [param], env={})


ADDRS = [(":50051", "[::]:50051"), ("*:50051", "[::]:50051"), ("127.0.0.1:0", "127.0.0.1:0"),
         ("[::1]:50051", "[::1]:50051"), ("localhost:8080", "localhost:8080")]
BAD_ADDRS = ["nope", "50051", "127.0.0.1", "127.0.0.1:", "127.0.0.1:http", ":65536", ":-1", ""]


def test_parse_addr() -> None:
    for addr, target in ADDRS:
        assert parse_addr(addr) == target
        assert load_config(None, addr=addr, env={})[0].addr == addr
    for addr in BAD_ADDRS:
        with pytest.raises(ConfigError, match="addr"):
            load_config(None, addr=addr, env={})


WRONG_VALUES = [
    ("logging.enabled", "maybe"), ("logging.enabled", 2), ("logging.level", "loud"), ("logging.format", "xml"),
    ("shutdown-timeout", "abc"), ("shutdown-timeout", -5), ("max-record-bytes", 12), ("max-record-bytes", "big"),
    ("scan-threads", -1), ("scan-threads", "two"), ("scan-threads", 1.5), ("auth-mode", "ldap"),
    ("addr", "nope"), ("addr", ["127.0.0.1:0"]), ("container-logs-dir", {"a": 1}), ("node-name", True),
    ("allowed-namespaces", {"a": 1}), ("tls.allowed-names", [{"a": 1}]),
]


def nested(key: str, value: object) -> dict:
    head, _, rest = key.partition(".")
    return {head: nested(rest, value) if rest else value}


@pytest.mark.parametrize("key,value", WRONG_VALUES, ids=[f"{k}={v!r}" for k, v in WRONG_VALUES])
def test_wrong_value_is_a_config_error_naming_the_key(tmp_path: pathlib.Path, key, value) -> None:
    path = write_config(tmp_path / "config.yaml", nested(key, value))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert key in str(info.value)
    assert "\n" not in str(info.value)


def test_tls_files_must_come_together() -> None:
    with pytest.raises(ConfigError, match="tls.cert-file and tls.key-file"):
        load_config(None, ["tls.cert-file:/c.pem"], env={})
    with pytest.raises(ConfigError, match="tls.cert-file and tls.key-file"):
        load_config(None, ["tls.key-file:/k.pem"], env={})
    with pytest.raises(ConfigError, match="tls.ca-file"):
        load_config(None, ["tls.ca-file:/ca.pem"], env={})
    config, _ = load_config(None, ["tls.cert-file:/c.pem", "tls.key-file:/k.pem"], env={})
    assert config.tls_enabled


def test_tls_enabled_switch() -> None:
    """tls.enabled (Kubetail's Helm chart writes it, with null file paths when false)."""
    files = ["tls.cert-file:/c.pem", "tls.key-file:/k.pem"]
    config, warnings = load_config(None, ["tls.enabled:false", *files, "tls.ca-file:/ca.pem"], env={})
    assert not config.tls_enabled and (config.tls_cert_file, config.tls_ca_file) == ("", "")
    assert warnings == ["tls.enabled is false: tls.cert-file, tls.key-file, tls.ca-file ignored"]
    assert load_config(None, ["tls.enabled:true", *files], env={})[0].tls_enabled
    with pytest.raises(ConfigError, match="tls.enabled is true: set tls.cert-file and tls.key-file"):
        load_config(None, ["tls.enabled:true", "tls.cert-file:/c.pem"], env={})
    with pytest.raises(ConfigError, match="auth-mode identity needs mutual TLS"):
        load_config(None, ["tls.enabled:false", *files, "tls.ca-file:/ca.pem", "auth-mode:identity"], env={})


HELM_CHART_CONFIG = """\
allowed-namespaces:
- default
- kube-system
cluster-agent:
  addr: :50051
  logging:
    enabled: true
    level: "info"
    format: "json"
  tls:
    enabled: false
    cert-file: null
    key-file: null
"""


def test_helm_chart_config_loads_without_warnings(tmp_path: pathlib.Path) -> None:
    """The config.yaml Kubetail's Helm chart renders for its cluster agent (defaults plus
    allowedNamespaces): the drop-in image must take it as it is."""
    path = tmp_path / "config.yaml"
    path.write_text(HELM_CHART_CONFIG)
    config, warnings = load_config(str(path), env={"NODE_NAME": "node-1"})
    assert warnings == []
    assert config == Config(addr=":50051", node_name="node-1", allowed_namespaces=("default", "kube-system"),
                            tls_switch=False)
    path.write_text(HELM_CHART_CONFIG.replace('level: "info"', 'level: "disabled"'))
    config, _ = load_config(str(path), env={})
    assert config.logging_level == "disabled"


def test_unknown_keys_are_warnings(tmp_path: pathlib.Path) -> None:
    path = write_config(tmp_path / "config.yaml", {"bogus": 1, "logging": {"level": "debug", "colour": "red"},
                                                   "extra": {"deep": {"er": 1}}})
    config, warnings = load_config(str(path), ["also-bogus:x"], env={})
    assert config.logging_level == "debug"
    assert sorted(warnings) == sorted([
        "unknown config key 'bogus' ignored", "unknown config key 'logging.colour' ignored",
        "unknown config key 'extra' ignored", "unknown config key 'also-bogus' ignored"])


def test_file_errors(tmp_path: pathlib.Path) -> None:
    cases = {
        "missing.yaml": None,
        "garbage.yaml": "addr: [unclosed\n  - {\n",
        "tabs.yaml": "addr:\n\t- x\n",
        "list.yaml": "- addr\n- x\n",
        "scalar.yaml": "just a string\n",
        "garbage.json": "{not json",
        "binary.yaml": b"\xff\xfe\x00garbage",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(ConfigError) as info:
            load_config(str(path), env={})
        assert str(path) in str(info.value) and "\n" not in str(info.value), name
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path), env={})  # a directory
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert load_config(str(empty), env={}) == (Config(), [])


# ---------------------------------------------------------------------------------------------
# The process: exit codes, one-line errors, warnings, --version, the default command
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def held_port() -> int:
    """A port this test is listening on: an agent that tried to bind it would fail differently."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def assert_one_line_exit(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kubetail-agent: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


PROCESS_BAD_SETTINGS = [
    ("logging.enabled", "maybe"), ("shutdown-timeout", "abc"), ("max-record-bytes", "12"), ("auth-mode", "ldap"),
    ("scan-threads", "-1"), ("logging.level", "loud"),
]


def test_config_errors_exit_with_one_line_before_binding(tmp_path: pathlib.Path, held_port: int) -> None:
    addr = f"127.0.0.1:{held_port}"
    missing = tmp_path / "missing.yaml"
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("addr: [unclosed\n  - {\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01garbage")
    runs = [
        (["serve", "--config", str(missing)], ("cannot read config file", str(missing))),
        (["--config", str(garbage)], ("cannot parse config file", str(garbage))),
        (["--config", str(binary)], (str(binary),)),
        (["--config", str(tmp_path)], ("cannot read config file",)),  # a directory
        (["-c", str(write_config(tmp_path / "nope.yaml", {"addr": "nope"}))], ("addr", "nope")),
        (["-p", "addr"], ("key:value",)),
        (["-a", "nope"], ("addr",)),
    ]
    for i, (key, value) in enumerate(PROCESS_BAD_SETTINGS):
        path = write_config(tmp_path / f"bad-{i}.yaml", {"addr": addr, **nested(key, value)})
        runs.append((["--config", str(path)], (key, value)))
        runs.append((["-a", addr, "-p", f"cluster-agent.{key}:{value}"], (key, value)))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda args: run_cli(*args), [args for args, _ in runs]))
    for (args, fragments), result in zip(runs, results, strict=True):
        line = assert_one_line_exit(result, *fragments)
        assert "cannot listen" not in line, args  # it failed before it tried to bind the held port


def test_address_in_use_is_one_line(tmp_path: pathlib.Path, held_port: int) -> None:
    result = run_cli("-a", f"127.0.0.1:{held_port}", "-p", f"container-logs-dir:{tmp_path}", "-p", "auth-mode:none")
    assert_one_line_exit(result, "cannot listen", f"127.0.0.1:{held_port}")


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"kubetail-agent {kubetail_agent.__version__}\n"


def serve_and_check(args: list[str], logs: pathlib.Path, env: dict[str, str] | None = None,
                    host: str = "127.0.0.1") -> AgentProcess:
    """Start an agent with exactly `args`, read a record through it, stop it; returns it (stopped)."""
    log_path(logs).write_text(cri("2024-05-01T10:00:00Z", "configured"))
    agent = AgentProcess(args, env=env)
    try:
        port = agent.wait_serving()
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = pb_grpc.LogRecordsServiceStub(channel)
            assert records(stub.StreamForward(stream_request(), timeout=10)) == [
                ("2024-05-01T10:00:00.000000000Z", "configured", True)]
        assert agent.stop(signal.SIGTERM, timeout=30) == 0
        assert agent.events()[-1]["msg"] == "stopped"
    finally:
        agent.kill()
    return agent


def test_serve_is_the_default_command(tmp_path: pathlib.Path, logs_dir: pathlib.Path) -> None:
    path = write_config(tmp_path / "config.yaml", {"addr": "127.0.0.1:0", "container-logs-dir": str(logs_dir),
                                                   "auth-mode": "none"})
    serve_and_check([f"--config={path}"], logs_dir)  # the DaemonSet's args, unchanged
    serve_and_check(["-c", str(path)], logs_dir)


def test_serve_with_json_env_older_layout_and_overrides(tmp_path: pathlib.Path, logs_dir: pathlib.Path) -> None:
    # JSON, the older layout, ${NAME} from the agent's environment, and -p/-a over a file whose
    # own addr and logs dir would not work.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"cluster-agent": {"addr": "nope", "container-logs-dir": "${KTA_LOGS}",
                                                  "auth-mode": "none",
                                                  "logging": {"level": "${KTA_LEVEL}"}}}))
    agent = serve_and_check(["serve", "--config", str(path), "-a", "127.0.0.1:0"], logs_dir,
                            env={"KTA_LOGS": str(logs_dir), "KTA_LEVEL": "debug"})
    assert any(e["msg"] == "stream started" for e in agent.events())  # logging.level came from ${KTA_LEVEL}
    path.write_text(json.dumps({"addr": "nope", "container-logs-dir": "/nonexistent", "auth-mode": "none"}))
    serve_and_check(["--config", str(path), "-p", "cluster-agent.addr:127.0.0.1:0",
                     "-p", f"container-logs-dir:{logs_dir}"], logs_dir)
    serve_and_check(["-a", "127.0.0.1:0", "-p", f"cluster-agent.container-logs-dir:{logs_dir}",
                     "-p", "auth-mode:none"], logs_dir)


# auth-mode none on every interface must be asked for explicitly.
INSECURE = ["-p", "auth-mode:none", "-p", "auth.allow-insecure:true"]


def test_port_only_addr_binds_every_interface(logs_dir: pathlib.Path) -> None:
    agent = serve_and_check(["-a", ":0", "-p", f"container-logs-dir:{logs_dir}", *INSECURE], logs_dir)
    assert [e["addr"] for e in agent.events() if e["msg"] == "serving"] == [":0"]
    if not socket.has_ipv6:
        return
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return  # no IPv6 loopback here; IPv4 above is still checked
    serve_and_check(["-a", ":0", "-p", f"container-logs-dir:{logs_dir}", *INSECURE], logs_dir, host="[::1]")


def test_unknown_keys_are_logged_as_warnings(start_agent, logs_dir: pathlib.Path) -> None:
    agent = start_agent(logs_dir, bogus_key=1, logging={"level": "debug", "colour": "red"},
                        extra_args=("-p", "cluster-agent.another-bogus:x"))
    warnings = {e["msg"] for e in agent.events() if e.get("level") == "warn" and e["msg"].startswith("unknown")}
    assert warnings == {"unknown config key 'bogus-key' ignored", "unknown config key 'logging.colour' ignored",
                        "unknown config key 'another-bogus' ignored"}
    # Warnings come before the agent reports that it is serving.
    msgs = [e["msg"] for e in agent.events()]
    assert msgs.index("serving") > max(msgs.index(w) for w in warnings)


def start_without_json_log(args: list[str]) -> tuple[AgentProcess, grpc.Channel]:
    """Start an agent whose log is not JSON (so its port cannot be read from it): on a fixed free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agent = AgentProcess(["-a", f"127.0.0.1:{port}", *args])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
    except grpc.FutureTimeoutError:
        channel.close()
        agent.kill()
        raise AssertionError("agent did not start:\n" + "\n".join(agent.lines)) from None
    return agent, channel


def test_logging_disabled_and_pretty(logs_dir: pathlib.Path) -> None:
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "quiet"))
    for extra, check in (
        (["-p", "logging.enabled:false"], lambda lines: lines == []),  # not even the warning
        (["-p", "logging.level:disabled"], lambda lines: lines == []),  # the Helm chart's spelling
        (["-p", "logging.format:pretty", "-p", "logging.level:debug"],
         lambda lines: any("serving" in line for line in lines) and any("bogus" in line for line in lines)
         and not any(line.startswith("{") for line in lines)),
    ):
        agent, channel = start_without_json_log(["-p", f"container-logs-dir:{logs_dir}", "-p", "bogus:1",
                                                 "-p", "auth-mode:none", *extra])
        try:
            stub = pb_grpc.LogRecordsServiceStub(channel)
            assert len(records(stub.StreamForward(stream_request(), timeout=10))) == 1
            assert agent.stop(signal.SIGTERM, timeout=30) == 0
            assert check(agent.lines), agent.lines
        finally:
            channel.close()
            agent.kill()


def test_reflection_lists_the_services_and_sigint_stops_like_sigterm(start_agent, logs_dir: pathlib.Path) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    agent = start_agent(logs_dir)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"cluster_agent.LogMetadataService", "cluster_agent.LogRecordsService", "grpc.health.v1.Health"} <= services
    assert agent.stop(signal.SIGINT) == 0
    assert [e["msg"] for e in agent.events()][-2:] == ["shutting down", "stopped"]
