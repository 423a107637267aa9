"""LogRecordsService over real gRPC: windows, grep, directions, formats — exact expected records."""

from __future__ import annotations

import json
import pathlib

import grpc
import pytest

from conftest import SAMPLE_LOGS, cri, docker, log_path, records, run_cli, stream_request
from kubetail_agent_proto import cluster_agent_pb2 as pb

T = "2024-05-01T10:00:0{}Z"

# Ten CRI lines one second apart: message "line <i>".
TEN = "".join(cri(T.format(i), f"line {i}") for i in range(10))


def recs(*indices: int) -> list[tuple[str, str, bool]]:
    return [(f"2024-05-01T10:00:0{i}.000000000Z", f"line {i}", True) for i in indices]


WINDOW_CASES = [
    # (name, request fields, expected indices)
    ("everything", {}, list(range(10))),
    ("window before the file", {"stop_time": "2024-05-01T09:00:00Z"}, []),
    ("window after the file", {"start_time": "2024-05-01T11:00:00Z"}, []),
    ("window inside", {"start_time": "2024-05-01T10:00:03.5Z", "stop_time": "2024-05-01T10:00:06.5Z"}, [4, 5, 6]),
    ("boundaries inclusive", {"start_time": T.format(3), "stop_time": T.format(6)}, [3, 4, 5, 6]),
    ("offset timezone", {"start_time": "2024-05-01T12:00:08+02:00"}, [8, 9]),
    ("start after stop", {"start_time": T.format(6), "stop_time": T.format(3)}, []),
    ("nanosecond boundary", {"start_time": "2024-05-01T10:00:02.000000001Z"}, list(range(3, 10))),
    ("grep literal", {"grep": "line 7"}, [7]),
    ("grep regex", {"grep": r"line [2-4]$"}, [2, 3, 4]),
    ("grep never matches the prefix", {"grep": "stdout"}, []),
    ("grep never matches the timestamp", {"grep": "10:00"}, []),
    ("grep trimmed", {"grep": "  line 1  "}, [1]),
    ("grep and window", {"grep": "line", "start_time": T.format(8)}, [8, 9]),
    ("grep case sensitive", {"grep": "LINE 3"}, []),
    ("grep (?i)", {"grep": "(?i)LINE 3"}, [3]),
    ("grep anchored at message start", {"grep": "^line 5"}, [5]),
]


@pytest.mark.parametrize("name,fields,expected", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_forward_and_backward_windows(logs_dir: pathlib.Path, records_stub, name, fields, expected) -> None:
    log_path(logs_dir).write_text(TEN)
    forward = records(records_stub.StreamForward(stream_request(**fields), timeout=10))
    backward = records(records_stub.StreamBackward(stream_request(**fields), timeout=10))
    assert forward == recs(*expected)
    assert backward == recs(*reversed(expected))


def test_partial_lines_and_ansi(logs_dir: pathlib.Path, records_stub) -> None:
    log_path(logs_dir).write_text(
        cri("2024-05-01T10:00:00Z", "before")
        + cri("2024-05-01T10:00:01Z", "hello \x1b[31mwor", "P")
        + cri("2024-05-01T10:00:01.5Z", "ld\x1b[0m and more", "P")
        + cri("2024-05-01T10:00:02Z", "end of message", "F")
        + cri("2024-05-01T10:00:03Z", "after")
    )
    group = [("2024-05-01T10:00:01.000000000Z", "hello \x1b[31mwor", False),
             ("2024-05-01T10:00:01.500000000Z", "ld\x1b[0m and more", False),
             ("2024-05-01T10:00:02.000000000Z", "end of message", True)]
    # A grep match in any chunk brings the whole message; ANSI codes around a space are tolerated.
    assert records(records_stub.StreamForward(stream_request(grep="more"), timeout=10)) == group
    assert records(records_stub.StreamForward(stream_request(grep="and more"), timeout=10)) == group
    ansi = cri("2024-05-01T10:00:04Z", "hello \x1b[31mworld\x1b[0m")
    with open(log_path(logs_dir), "a") as handle:
        handle.write(ansi)
    assert records(records_stub.StreamForward(stream_request(grep="hello world"), timeout=10)) == [
        ("2024-05-01T10:00:04.000000000Z", "hello \x1b[31mworld\x1b[0m", True)]
    # A window that starts inside the partial sequence starts at its first chunk,
    # and one that ends inside it ends after its F chunk.
    assert records(records_stub.StreamForward(
        stream_request(start_time="2024-05-01T10:00:01.2Z", stop_time="2024-05-01T10:00:01.7Z"), timeout=10)) == group
    assert records(records_stub.StreamBackward(stream_request(grep="more"), timeout=10)) == group[::-1]


def test_docker_json_file(logs_dir: pathlib.Path, records_stub) -> None:
    part = "x" * 16384
    log_path(logs_dir).write_text(
        docker("2024-05-01T10:00:00.1Z", 'say "hi" \\ \u003cok\u003e\n')
        + docker("2024-05-01T10:00:01.25Z", part)
        + docker("2024-05-01T10:00:01.25Z", "tail\n")
        + docker("2024-05-01T10:00:02Z", "no newline at the end")
        + "not json at all\n"
        + docker("2024-05-01T10:00:03Z", "last\n")
    )
    got = records(records_stub.StreamForward(stream_request(), timeout=10))
    assert got == [
        ("2024-05-01T10:00:00.100000000Z", 'say "hi" \\ <ok>', True),
        ("2024-05-01T10:00:01.250000000Z", part, False),
        ("2024-05-01T10:00:01.250000000Z", "tail", True),
        ("2024-05-01T10:00:02.000000000Z", "no newline at the end", False),
        ("2024-05-01T10:00:03.000000000Z", "last", True),
    ]
    assert records(records_stub.StreamForward(stream_request(grep='"hi" \\\\ <ok>'), timeout=10)) == got[:1]
    assert records(records_stub.StreamForward(stream_request(grep="tail"), timeout=10)) == got[1:3]


def test_malformed_lines_empty_file_and_unterminated_tail(logs_dir: pathlib.Path, records_stub) -> None:
    path = log_path(logs_dir)
    path.write_text("")
    assert records(records_stub.StreamForward(stream_request(), timeout=10)) == []
    assert records(records_stub.StreamBackward(stream_request(), timeout=10)) == []
    path.write_bytes(
        b"garbage line\n"
        + cri("2024-05-01T10:00:00Z", "one").encode()
        + b"2024-13-45T10:00:00Z stdout F bad date\n"
        + b"\n"
        + b"2024-05-01T10:00:01.123456Z stderr F caf\xc3\xa9 \xff\xfe bytes\n"
        + b"2024-05-01T10:00:02.5+00:00 stdout F\n"
        + b"2024-05-01T10:00:03Z stdout P in progr"
    )
    expected = [
        ("2024-05-01T10:00:00.000000000Z", "one", True),
        ("2024-05-01T10:00:01.123456000Z", "caf\u00e9 \ufffd\ufffd bytes", True),
        ("2024-05-01T10:00:02.500000000Z", "", True),
        ("2024-05-01T10:00:03.000000000Z", "in progr", False),
    ]
    assert records(records_stub.StreamForward(stream_request(), timeout=10)) == expected
    assert records(records_stub.StreamBackward(stream_request(), timeout=10)) == expected[::-1]


def test_oversized_message_is_split(start_agent, logs_dir: pathlib.Path) -> None:
    agent = start_agent(logs_dir, max_record_bytes="4Ki")
    message = ("é" + "a" * 4095) * 3  # multibyte characters near every cut point
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", message) + cri("2024-05-01T10:00:01Z", "next"))
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        from kubetail_agent_proto import cluster_agent_pb2_grpc as pb_grpc

        got = records(pb_grpc.LogRecordsServiceStub(channel).StreamForward(stream_request(), timeout=10))
    pieces = [r for r in got if r[0].startswith("2024-05-01T10:00:00")]
    assert "".join(p[1] for p in pieces) == message
    assert all(len(p[1].encode()) <= 4096 for p in pieces)
    assert [p[2] for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert got[-1] == ("2024-05-01T10:00:01.000000000Z", "next", True)


def test_many_lines_in_order_across_chunks(logs_dir: pathlib.Path, records_stub) -> None:
    # Enough data for several scan chunks, so parallel scanning must still keep order.
    lines = [cri(f"2024-05-01T10:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z",
                 f"entry {i} {'needle' if i % 997 == 0 else 'hay'} " + "x" * 100) for i in range(40000)]
    log_path(logs_dir).write_text("".join(lines))
    got = records(records_stub.StreamForward(stream_request(grep="needle"), timeout=30))
    assert [int(m.split()[1]) for _, m, _ in got] == [i for i in range(40000) if i % 997 == 0]
    got = records(records_stub.StreamBackward(stream_request(grep="needle"), timeout=30))
    assert [int(m.split()[1]) for _, m, _ in got] == [i for i in range(40000) if i % 997 == 0][::-1]
    everything = list(records_stub.StreamBackward(stream_request(), timeout=30))
    assert len(everything) == 40000 and everything[0].message.startswith("entry 39999 ")


def test_follow_from_enum_values_roundtrip() -> None:
    assert pb.LogRecordsStreamRequest(follow_from=pb.END).follow_from == 2


def _mapped_rss_kib(pid: int, path: str) -> int | None:
    """Resident KiB of the agent's mapping of `path` (None when it is not mapped)."""
    total, inside = None, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:
                inside = fields[-1] == path
            elif inside and fields[0] == "Rss:":
                total = (total or 0) + int(fields[1])
    return total


def _read_kib(pid: int) -> int:
    """KiB the process has read with read/pread so far (rchar: page-cache hits count too)."""
    with open(f"/proc/{pid}/io") as io:
        return next(int(row.split()[1]) for row in io if row.startswith("rchar:")) // 1024


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])  # minflt, field 10


def _large_log(logs_dir: pathlib.Path) -> tuple[pathlib.Path, int]:
    """128 MiB of lines at 10:00:00.123456789, then one "newest" line at 10:00:01; (path, KiB)."""
    path = log_path(logs_dir)
    line = cri("2024-05-01T10:00:00.123456789Z", "y" * 90).encode()
    block = line * ((1 << 20) // len(line))
    with open(path, "wb") as handle:
        for _ in range(128):
            handle.write(block)
        handle.write(cri("2024-05-01T10:00:01Z", "newest").encode())
    return path, path.stat().st_size // 1024


def test_backward_tail_reads_only_the_end_of_a_large_file(agent, logs_dir: pathlib.Path, records_stub) -> None:
    # 128 MiB of lines; a client that takes the newest 100 records and stops reading must not
    # have made the agent touch the whole file. Measured as resident pages of the agent's mmap
    # of that file, and as what it read with pread (chunks are scanned on pread copies), while
    # the stream is still open (no timing involved).
    path, size_kib = _large_log(logs_dir)
    read_before = _read_kib(agent.proc.pid)
    call = records_stub.StreamBackward(stream_request(), timeout=60)
    first = [next(call) for _ in range(100)]
    assert first[0].message == "newest"
    real = str(path.resolve())
    rss = None
    for _ in range(50):  # the mapping exists from the first record on; read it while it is open
        rss = _mapped_rss_kib(agent.proc.pid, real)
        if rss is not None:
            break
    read = _read_kib(agent.proc.pid) - read_before
    call.cancel()
    assert rss is not None, "the agent did not map the file"
    print(f"resident {rss} KiB, read {read} KiB of {size_kib} KiB")
    assert rss < size_kib // 4, f"{rss} KiB of a {size_kib} KiB file resident after 100 records"
    assert read < size_kib // 4, f"{read} KiB of a {size_kib} KiB file read after 100 records"


def test_window_start_is_found_without_reading_the_file(agent, logs_dir: pathlib.Path, records_stub) -> None:
    # The window's start is found by binary search over byte offsets: a start_time at the end of
    # a 128 MiB file costs a few small reads, not a scan from the start.
    # Measured as pread bytes (rchar) and as page faults, which count the pages of the mapping
    # that the search touches: the search costs ~100 here (most of them the stream's own
    # allocations), a scan through the 128 MiB over 700 (the kernel maps 64 KiB or more around
    # each fault).
    path, size_kib = _large_log(logs_dir)
    read_before, faults_before = _read_kib(agent.proc.pid), _minor_faults(agent.proc.pid)
    got = records(records_stub.StreamForward(stream_request(start_time="2024-05-01T10:00:00.5Z"), timeout=60))
    read, faults = _read_kib(agent.proc.pid) - read_before, _minor_faults(agent.proc.pid) - faults_before
    print(f"read {read} KiB, {faults} page faults for a {size_kib} KiB file")
    assert got == [("2024-05-01T10:00:01.000000000Z", "newest", True)]
    assert read < 1024, f"{read} KiB read of a {size_kib} KiB file to find the window's start"
    assert faults < 300, f"{faults} page faults to find the window's start in a {size_kib} KiB file"


def test_fused_cri_encoder_matches_the_general_path() -> None:
    # encode_cri_records is the unfiltered hot path; its output must be byte-identical to parsing
    # each line and encoding it, whatever the line looks like.
    import kubetail_agent as agent

    lines = [
        b"2024-05-01T10:00:00Z stdout F whole second",
        b"2024-05-01T10:00:00.5Z stdout F half",
        b"2024-05-01T10:00:00.123456789Z stderr P partial",
        b"2024-05-01T10:00:00.123456789Z stderr P:x tagged partial",
        b"2024-05-01T10:00:00.000000000Z stdout F zero nanos",
        b"2024-05-01T10:00:00.1234567891Z stdout F ten digits",
        b"2024-05-01T12:00:00.25+02:00 stdout F offset",
        b"2024-05-01T10:00:00.Z stdout F empty fraction",
        b"2024-05-01T10:00:00.1_2Z stdout F underscore",
        b"2024-05-01T10:00:00.5Z stdout F",
        b"2024-05-01T10:00:00.5Z stdout F ",
        b"2024-05-01T10:00:00.5Z stdout F bad \xff utf8",
        b"1970-01-01T00:00:00Z stdout F epoch",
        b"1969-12-31T23:59:59.5Z stdout F before the epoch",
        b"2024-05-01T10:00:00.5Z stdout F " + b"m" * 5000,
        b"garbage",
        b"",
        b"2024-05-01T10:00:00.5z stdout F lowercase z",
    ]
    data = b"\n".join(lines * 2) + b"\n"
    expected = []
    for raw in data.split(b"\n"):
        line = agent.parse_cri_line(raw)
        if line is not None:
            expected.extend(agent.encode_log_record(p) for p in agent.line_records(line, 4096))
    assert agent.encode_cri_records(data, 4096) == expected
    assert all(pb.LogRecord.FromString(r).SerializeToString() == r for r in expected)


# ---------------------------------------------------------------------------------------------
# The local CLI: the same code path, JSON lines on stdout
# ---------------------------------------------------------------------------------------------


def test_cli_stream_backward_and_forward_print_protobuf_json() -> None:
    api = next(SAMPLE_LOGS.glob("api-*.log"))  # CRI-O style: +01:00 offsets, 9 digits
    ansi = "\u001b[31mERROR\u001b[0m \u001b[1mrequest\u001b[0m handled id="
    result = run_cli("stream-backward", str(api), "--grep", "ERROR", "--start-time", "2026-11-28T10:00:05+01:00",
                     "--stop-time", "2026-11-28T09:00:11.000000011Z")
    assert result.returncode == 0, result
    assert [json.loads(row) for row in result.stdout.splitlines()] == [
        {"timestamp": f"2026-11-28T09:00:{i:02d}.{i:09d}Z", "message": ansi.encode().decode("unicode_escape") + str(i),
         "isFinal": True} for i in (11, 8, 5)]
    result = run_cli("stream-forward", str(api), "--stop-time", "2026-11-28T09:00:01.000000001Z")
    assert result.returncode == 0, result
    assert [json.loads(row)["timestamp"] for row in result.stdout.splitlines()] == [
        "2026-11-28T09:00:00.000000000Z", "2026-11-28T09:00:01.000000001Z"]
    assert result.stdout.splitlines()[0].startswith('{"timestamp": "2026-11-28T09:00:00.000000000Z", "message": ')


def test_cli_errors_are_one_line_and_exit_1(tmp_path: pathlib.Path) -> None:
    for args in (["stream-forward", str(tmp_path / "missing.log")],
                 ["stream-backward", str(next(SAMPLE_LOGS.glob("api-*.log"))), "--grep", "(unclosed"]):
        result = run_cli(*args)
        assert result.returncode == 1 and result.stdout == "", result
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_backward_never_follows(logs_dir: pathlib.Path, records_stub) -> None:
    log_path(logs_dir).write_text(cri("2024-05-01T10:00:00Z", "one") + cri("2024-05-01T10:00:01Z", "two"))
    for mode in (pb.DEFAULT, pb.END):  # ignored: the stream ends after the oldest record
        got = records(records_stub.StreamBackward(stream_request(follow_from=mode), timeout=10))
        assert [message for _, message, _ in got] == ["two", "one"]
