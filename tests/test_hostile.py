"""Hostile requests and hostile files, over real gRPC against a real agent process.

Every test ends by checking that the same agent still serves a normal request and has logged
no internal error (conftest.still_serves).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import grpc
import pytest

from conftest import CID, REPO, AgentProcess, cri, docker, log_path, records, still_serves, stream_request
from kubetail_agent_proto import cluster_agent_pb2 as pb
from kubetail_agent_proto import cluster_agent_pb2_grpc as pb_grpc

VALID = {"namespace": "default", "pod_name": "web-1", "container_name": "app",
         "container_id": f"containerd://{CID}"}

# Values no name field may carry. Each must be refused before the agent touches the filesystem.
HOSTILE_NAMES = [
    ("dotdot", ".."),
    ("dot", "."),
    ("dotdot-etc", "../etc"),
    ("dotdot-deep", "../../../../etc/passwd"),
    ("slash", "a/b"),
    ("absolute", "/etc/passwd"),
    ("backslash", "a\\b"),
    ("percent-encoded", "%2e%2e"),
    ("percent-encoded-slash", "a%2fb"),
    ("nul", "a\x00b"),
    ("newline", "web-1\n"),
    ("space", "web 1"),
    ("underscore", "web_1"),  # '_' separates the fields of the file name
    ("glob", "web-*"),
    ("non-ascii", "wéb"),
    ("long-300", "a" * 300),
    ("empty", ""),
]
UPPERCASE = {"namespace": "Default", "pod_name": "Web-1", "container_name": "App"}


def name_cases() -> list[tuple[str, str, str]]:
    cases = []
    for field in ("namespace", "pod_name", "container_name", "container_id"):
        for case_id, value in HOSTILE_NAMES:
            cases.append((f"{field}-{case_id}", field, value))
            if field == "container_id" and value:
                # The runtime prefix is dropped before the check: hostile values behind it too.
                cases.append((f"{field}-prefixed-{case_id}", field, f"containerd://{value}"))
        if field in UPPERCASE:
            cases.append((f"{field}-uppercase", field, UPPERCASE[field]))
    cases.append(("container_id-double-prefix", "container_id", f"containerd://docker://{CID}"))
    cases.append(("container_id-prefix-only", "container_id", "containerd://"))
    return cases


NAME_CASES = name_cases()


def request_with(field: str, value: str, **fields: object) -> pb.LogRecordsStreamRequest:
    return pb.LogRecordsStreamRequest(**{**VALID, field: value}, **fields)


def expect_status(call, code: grpc.StatusCode) -> grpc.RpcError:
    """Consume a streaming call; it must fail with `code` without sending any record."""
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for record in call:
            got.append(record)
    assert got == []
    assert info.value.code() == code, info.value.details()
    return info.value


def test_hostile_names_are_invalid_argument(agent, channel, records_stub, logs_dir: pathlib.Path) -> None:
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "the real file"))
    # The untouched request works, so each refusal below is about the one hostile field.
    assert len(records(records_stub.StreamForward(pb.LogRecordsStreamRequest(**VALID), timeout=10))) == 1
    wrong = []
    for case_id, field, value in NAME_CASES:
        for method in (records_stub.StreamForward, records_stub.StreamBackward):
            try:
                got = records(method(request_with(field, value), timeout=10))
                wrong.append((case_id, "OK", len(got)))
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT or field not in error.details():
                    wrong.append((case_id, error.code().name, error.details()))
    assert wrong == []
    still_serves(agent, channel, logs_dir)


def test_uppercase_container_id_cannot_reach_a_file(agent, channel, records_stub, logs_dir: pathlib.Path) -> None:
    # Container ids are "letters and digits"; upper case cannot form a path, so either refusal is fine,
    # but it must never serve the lower-case file.
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "the real file"))
    call = records_stub.StreamForward(request_with("container_id", f"containerd://{CID.upper()}"), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    still_serves(agent, channel, logs_dir)


def test_traversal_never_reads_a_decoy_outside_the_logs_dir(agent, channel, records_stub,
                                                             logs_dir: pathlib.Path) -> None:
    outside = logs_dir.parent
    secret = cri("2024-05-01T10:00:00Z", "DECOY SECRET")
    # Each request below would, if its names were joined into a path unchecked, open a decoy log
    # file outside the logs dir. The directories the path passes through exist, so it would resolve.
    (logs_dir / "web-1_x").mkdir()
    (logs_dir / "web-1_default_x").mkdir()
    (logs_dir / "web-1_default_app-x").mkdir()
    routes = [
        (dict(VALID, pod_name="../decoy1"), outside / f"decoy1_default_app-{CID}.log"),
        (dict(VALID, pod_name=str(outside / "decoy2")), outside / f"decoy2_default_app-{CID}.log"),
        (dict(VALID, namespace="x/../../decoy3"), outside / f"decoy3_app-{CID}.log"),
        (dict(VALID, container_name="x/../../decoy4"), outside / f"decoy4-{CID}.log"),
        (dict(VALID, container_id="containerd://x/../../decoy5"), outside / "decoy5.log"),
        (dict(VALID, container_id="x/../../decoy5"), outside / "decoy5.log"),
    ]
    for fields, decoy in routes:
        decoy.write_text(secret)
        naive = os.path.join(str(logs_dir), "{pod_name}_{namespace}_{container_name}-{cid}.log".format(
            cid=fields["container_id"].removeprefix("containerd://"), **fields))
        assert os.path.realpath(naive) == str(decoy), "the decoy must be where an unchecked join leads"
    for fields, _decoy in routes:
        for method in (records_stub.StreamForward, records_stub.StreamBackward):
            expect_status(method(pb.LogRecordsStreamRequest(**fields), timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
            follow = pb.LogRecordsStreamRequest(**fields, follow_from=pb.DEFAULT)
            expect_status(records_stub.StreamForward(follow, timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
    # The agent never logged a decoy path (it logs the path of every stream it starts).
    assert not [line for line in agent.lines if "decoy" in line]
    still_serves(agent, channel, logs_dir)


def test_symlink_to_directory_or_fifo_is_not_found(agent, channel, records_stub, logs_dir: pathlib.Path,
                                                    tmp_path: pathlib.Path) -> None:
    target_dir = tmp_path / "a-directory"
    target_dir.mkdir()
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    dangling = tmp_path / "missing"
    cases = {"dir-link": target_dir, "fifo-link": fifo, "dangling-link": dangling}
    for pod, target in cases.items():
        log_path(logs_dir, pod=pod).symlink_to(target)
    os.mkfifo(log_path(logs_dir, pod="fifo-itself"))
    log_path(logs_dir, pod="dir-itself").mkdir()
    loop_link = log_path(logs_dir, pod="loop-link")
    loop_link.symlink_to(loop_link)
    for pod in [*cases, "fifo-itself", "dir-itself", "loop-link"]:
        requests = [(records_stub.StreamForward, stream_request(pod=pod)),
                    (records_stub.StreamBackward, stream_request(pod=pod)),
                    (records_stub.StreamForward, stream_request(pod=pod, follow_from=pb.DEFAULT))]
        for method, request in requests:
            # The timeout only guards against a hang on the FIFO; the answer must be NOT_FOUND.
            error = expect_status(method(request, timeout=10), grpc.StatusCode.NOT_FOUND)
            assert str(logs_dir) in error.details()
    # No writer ever opened the FIFOs: the agent answered without waiting for one.
    still_serves(agent, channel, logs_dir)


class UnprivilegedAgent(AgentProcess):
    """An agent started through a command prefix (setpriv) instead of directly."""

    def __init__(self, prefix: list[str], args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "kubetail_agent", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        self.lines = []
        self._serving = threading.Event()
        self.port = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


NOBODY = 65534


def test_unreadable_file_is_permission_denied_with_path_and_uid() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to start the agent as uid 65534 with setpriv (as a non-root user, "
                    "file permissions do not stop a test that owns the file from the agent's view)")
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run the agent unprivileged"
    uid = NOBODY
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import kubetail_agent"], cwd="/",
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        # The interpreter lives where uid 65534 may not go (pyenv under a 0700 /root, as in CI):
        # stay uid 0 but drop the capabilities that let root ignore file modes.
        uid = 0
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search",
                  "--inh-caps=-dac_override,-dac_read_search"]
    # pytest's tmp_path lives under a 0700 directory: use a world-readable one instead.
    base = pathlib.Path(tempfile.mkdtemp(prefix="kubetail-agent-unprivileged-"))
    agent = None
    try:
        base.chmod(0o755)
        logs = base / "containers"
        logs.mkdir(mode=0o755)
        logs.chmod(0o755)
        secret = log_path(logs)
        secret.write_text(cri("2024-05-01T10:00:00Z", "root only"))
        secret.chmod(0o000)
        config = base / "config.yaml"
        config.write_text(f"addr: 127.0.0.1:0\ncontainer-logs-dir: {logs}\nauth-mode: none\n"
                          "logging:\n  level: debug\n")
        config.chmod(0o644)
        agent = UnprivilegedAgent(prefix, ["serve", "--config", str(config)])
        agent.wait_serving()
        with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
            stub = pb_grpc.LogRecordsServiceStub(channel)
            for method in (stub.StreamForward, stub.StreamBackward):
                error = expect_status(method(stream_request(), timeout=10), grpc.StatusCode.PERMISSION_DENIED)
                assert str(secret) in error.details()
                assert f"uid {uid}" in error.details()
            still_serves(agent, channel, logs)
    finally:
        if agent is not None:
            agent.kill()
        shutil.rmtree(base, ignore_errors=True)


# (pattern, RE2's own error message)
INVALID_PATTERNS = [
    ("(a", "missing ): (a"),
    ("a)", "unexpected ): a)"),
    ("[z-a]", "invalid character class range: z-a"),
    ("(a)\\1", "invalid escape sequence: \\1"),  # no backreferences in RE2
    ("a**", "bad repetition operator: **"),
    ("x{1001}", "invalid repetition size: {1001}"),
    ("x{2,1}", "invalid repetition size: {2,1}"),
    ("(((a{100}){100}){100})", "invalid repetition size: {100}"),
    ("\\pL{1000}", "pattern too large - compile failed"),
    ("\\p{Foo}", "invalid character class range: \\p{Foo}"),
    ("a\\", "trailing \\"),
    ("(?<!a)b", "invalid perl operator: (?<!"),  # no lookbehind in RE2 (linear time)
]


def test_invalid_grep_is_invalid_argument_with_re2_message(agent, channel, records_stub,
                                                           logs_dir: pathlib.Path) -> None:
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "aaa"))
    for pattern, fragment in INVALID_PATTERNS:
        for method in (records_stub.StreamForward, records_stub.StreamBackward):
            error = expect_status(method(stream_request(grep=pattern), timeout=10),
                                  grpc.StatusCode.INVALID_ARGUMENT)
            assert error.details() == f"invalid grep pattern: {fragment}", pattern
    still_serves(agent, channel, logs_dir)


BAD_TIMES = ["yesterday", "2024-05-01", "2024-05-01T10:00:00", "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z",
             "2024-05-01T25:00:00Z", "2024-05-01T10:00:00+99", "1714557600", "2024-05-01T10:00:00Z junk",
             "\x00", "9" * 10000]


def test_invalid_start_and_stop_time_are_invalid_argument(agent, channel, records_stub,
                                                          logs_dir: pathlib.Path) -> None:
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "aaa"))
    for value in BAD_TIMES:
        for field in ("start_time", "stop_time"):
            for method in (records_stub.StreamForward, records_stub.StreamBackward):
                error = expect_status(method(stream_request(**{field: value}), timeout=10),
                                      grpc.StatusCode.INVALID_ARGUMENT)
                assert field in error.details()
                assert len(error.details()) < 400  # a huge value is not echoed back whole
    still_serves(agent, channel, logs_dir)


def test_unknown_follow_from_is_invalid_argument(agent, channel, records_stub, logs_dir: pathlib.Path) -> None:
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "aaa"))
    expect_status(records_stub.StreamForward(stream_request(follow_from=7), timeout=10),
                  grpc.StatusCode.INVALID_ARGUMENT)
    still_serves(agent, channel, logs_dir)


def test_garbage_request_bytes_are_refused_cleanly(agent, channel, logs_dir: pathlib.Path) -> None:
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "aaa"))
    raw = channel.unary_stream("/cluster_agent.LogRecordsService/StreamForward",
                               request_serializer=lambda data: data, response_deserializer=pb.LogRecord.FromString)
    good = pb.LogRecordsStreamRequest(**VALID).SerializeToString()
    assert len(records(raw(good, timeout=10))) == 1
    # Not a protobuf at all, a truncated one, and a string field holding invalid UTF-8. A client
    # hears a deliberate status (gRPC's convention for an unparseable request is INTERNAL; the
    # request is the client's fault, so INVALID_ARGUMENT is fine too), never UNKNOWN with a
    # Python exception in the details.
    for data in (b"\xff\xff\xff\xff", good[:-3], b"\x12\x02\xc3\x28" + good):
        with pytest.raises(grpc.RpcError) as info:
            list(raw(data, timeout=10))
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL), \
            (data, info.value.code(), info.value.details())
        assert "<class" not in info.value.details()
    still_serves(agent, channel, logs_dir)


def test_catastrophic_backtracking_pattern_finishes(agent, channel, records_stub, logs_dir: pathlib.Path) -> None:
    line = cri("2024-05-01T10:00:00Z", "a" * 5000 + "!")
    log_path(logs_dir).write_text(line * 50)
    for pattern in ("(a+)+$", "(a|aa)+$", "(a*)*b", "^(a+)+$"):
        for method in (records_stub.StreamForward, records_stub.StreamBackward):
            # The timeout is only a guard against a hang; RE2 is linear in the input.
            assert records(method(stream_request(grep=pattern), timeout=20)) == []
    # The lines were really scanned: a pattern that does match finds all of them.
    got = records(records_stub.StreamForward(stream_request(grep="(a+)+!$"), timeout=20))
    assert len(got) == 50 and got[0][1] == "a" * 5000 + "!"
    still_serves(agent, channel, logs_dir)


TEN_MIB = 10 << 20
ONE_MIB = 1 << 20


def long_message() -> str:
    tail = " NEEDLE-AT-THE-END"
    body = ("lorem ipsum dolor sit amet " * (TEN_MIB // 27 + 1))[: TEN_MIB - len(tail)]
    return body + tail


def test_ten_mib_line_is_streamed_whole_in_one_mib_records(agent, channel, records_stub,
                                                           logs_dir: pathlib.Path) -> None:
    message = long_message()
    assert len(message) == TEN_MIB
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "before") + cri("2024-05-01T10:00:01Z", message)
                                  + cri("2024-05-01T10:00:02Z", "after"))
    got = records(records_stub.StreamForward(stream_request(), timeout=30))
    assert got[0] == ("2024-05-01T10:00:00.000000000Z", "before", True)
    assert got[-1] == ("2024-05-01T10:00:02.000000000Z", "after", True)
    pieces = got[1:-1]
    assert 10 <= len(pieces) <= 11
    assert all(stamp == "2024-05-01T10:00:01.000000000Z" for stamp, _, _ in pieces)
    assert [final for _, _, final in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(len(text.encode()) <= ONE_MIB for _, text, _ in pieces)
    assert "".join(text for _, text, _ in pieces) == message
    for pattern in ("NEEDLE-AT-THE-END", "NEEDLE-AT-THE-END$", "(?i)needle-at-the-end"):
        for method in (records_stub.StreamForward, records_stub.StreamBackward):
            found = records(method(stream_request(grep=pattern), timeout=30))
            if method is records_stub.StreamBackward:
                found = found[::-1]  # newest first: the final piece comes first
            assert 10 <= len(found) <= 11
            assert "".join(text for _, text, _ in found) == message
            assert found[-1][2] is True
    still_serves(agent, channel, logs_dir)


def test_grep_on_runtime_partial_chunks_sends_the_whole_message(agent, channel, records_stub,
                                                                logs_dir: pathlib.Path) -> None:
    # The container runtime cuts a long line into 16 KiB P chunks. The grep runs on each chunk
    # (as the runtime wrote it); a match in any chunk sends every chunk of the message, so a
    # client never gets half a message. A match straddling a cut is not found (documented).
    message = "x" * 16000 + "NEEDLE" + "x" * 400 + "y" * 20000 + "STRADDLE"
    cut = message.index("STRADDLE") + 4
    chunks = [message[:16384], message[16384:cut], message[cut:]]
    assert "NEEDLE" in chunks[0] and "STRADDLE" not in "".join(chunks[:2]) + "|" + chunks[2]
    group = [(f"2024-05-01T10:00:0{i}.000000000Z", chunk, i == 2) for i, chunk in enumerate(chunks)]
    log_path(logs_dir).write_text(
        cri("2024-05-01T10:00:00Z", "before")
        + "".join(cri(stamp[:19] + "Z", chunk, "F" if final else "P") for stamp, chunk, final in group)
        + cri("2024-05-01T10:00:09Z", "after"))
    wrong = []
    # Unanchored patterns (RE2 prefilter over raw lines) and anchored ones (parsed line by line)
    # must agree: both judge chunk by chunk.
    for pattern, expected in (("NEEDLE", group), ("(?i)needle", group), ("xNEEDLEx", group),
                              ("^x+NEEDLE", group), ("y+STRA$", group), ("^DDLE$", group),
                              ("STRADDLE", []), ("^before", [("2024-05-01T10:00:00.000000000Z", "before", True)])):
        forward = records(records_stub.StreamForward(stream_request(grep=pattern), timeout=10))
        backward = records(records_stub.StreamBackward(stream_request(grep=pattern), timeout=10))
        if forward != expected or backward != expected[::-1]:
            wrong.append((pattern, len(forward), len(backward)))
    assert wrong == []
    still_serves(agent, channel, logs_dir)


def test_non_utf8_bytes_become_replacement_characters(agent, channel, records_stub, logs_dir: pathlib.Path) -> None:
    log_path(logs_dir).write_bytes(
        b"2024-05-01T10:00:00Z stdout F caf\xc3\xa9 \xff\xfe end\n"
        b"2024-05-01T10:00:01Z stdout F overlong \xc0\xaf slash\n"
        b"2024-05-01T10:00:02Z stdout F cut \xe2\x82\n"
        b"2024-05-01T10:00:03Z stdout F \x00nul and \x1b[31mansi\n"
        b"2024-05-01T10:00:04Z stdout F next line\n"
    )
    expected = [
        ("2024-05-01T10:00:00.000000000Z", "caf\u00e9 \ufffd\ufffd end", True),
        ("2024-05-01T10:00:01.000000000Z", "overlong \ufffd\ufffd slash", True),
        ("2024-05-01T10:00:02.000000000Z", "cut \ufffd", True),
        ("2024-05-01T10:00:03.000000000Z", "\x00nul and \x1b[31mansi", True),
        ("2024-05-01T10:00:04.000000000Z", "next line", True),
    ]
    assert records(records_stub.StreamForward(stream_request(), timeout=10)) == expected
    assert records(records_stub.StreamBackward(stream_request(), timeout=10)) == expected[::-1]
    assert records(records_stub.StreamForward(stream_request(grep="end$"), timeout=10)) == expected[:1]
    assert records(records_stub.StreamForward(stream_request(grep="é"), timeout=10)) == expected[:1]
    assert records(records_stub.StreamForward(stream_request(grep="slash|next"), timeout=10)) == \
        [expected[1], expected[4]]
    # Docker json-file: a lone surrogate escape is not UTF-8 either.
    log_path(logs_dir, pod="docker-pod").write_text(
        docker("2024-05-01T10:00:00Z", "bad \\ud800 surrogate\n").replace("\\\\ud800", "\\ud800")
        + docker("2024-05-01T10:00:01Z", "fine\n"))
    got = records(records_stub.StreamForward(stream_request(pod="docker-pod"), timeout=10))
    assert [text for _, text, _ in got] == ["bad \ufffd\ufffd\ufffd surrogate", "fine"]
    still_serves(agent, channel, logs_dir)


def test_split_points_never_cut_a_character(start_agent, logs_dir: pathlib.Path) -> None:
    agent = start_agent(logs_dir, max_record_bytes="1Ki")
    # Invalid bytes right at the cut and valid 4-byte characters around it.
    raw = b"a" * 1022 + b"\xf0\x9f\x98\x80" + b"\xff" * 3 + "😀".encode() * 300
    log_path(logs_dir).write_bytes(b"2024-05-01T10:00:00Z stdout F " + raw + b"\n")
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        got = records(pb_grpc.LogRecordsServiceStub(channel).StreamForward(stream_request(), timeout=10))
        assert "".join(text for _, text, _ in got) == raw.decode("utf-8", "replace")
        assert all(len(text.encode()) <= 1024 + 8 for _, text, _ in got)  # U+FFFD may add bytes
        assert [final for _, _, final in got] == [False] * (len(got) - 1) + [True]
        still_serves(agent, channel, logs_dir)


def test_quoted_literal_patterns(agent, channel, records_stub, logs_dir: pathlib.Path) -> None:
    # Clients that quote user input for RE2 (\Q…\E, or a backslash before each metacharacter)
    # must find exactly that text; a space inside \Q…\E is a literal space too.
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "GET /a b?(x)") + cri("2024-05-01T10:00:01Z", "a.b"))
    first = [("2024-05-01T10:00:00.000000000Z", "GET /a b?(x)", True)]
    patterns = ("\\QGET /a b?(x)\\E", "GET /a\\ b\\?\\(x\\)", "\\Qa b\\E", "\\Q?(x)\\E$")
    wrong = [p for p in patterns if records(records_stub.StreamForward(stream_request(grep=p), timeout=10)) != first]
    assert wrong == []
    assert records(records_stub.StreamForward(stream_request(grep="\\Qa.b\\E"), timeout=10)) == [
        ("2024-05-01T10:00:01.000000000Z", "a.b", True)]
    still_serves(agent, channel, logs_dir)
