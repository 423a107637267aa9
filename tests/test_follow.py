"""Follow streams over real gRPC against a real agent process: real files, real inotify, real rotation.

Nothing here asserts how long something took. Every wait has a generous deadline only so a broken
agent fails the test instead of hanging it; every gRPC call has a timeout or is cancelled.
"""

from __future__ import annotations

import os
import pathlib
import queue
import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import (
    AgentProcess,
    StreamReader,
    cri,
    docker,
    fd_count,
    inotify_watches,
    log_path,
    records,
    still_serves,
    stream_request,
    thread_count,
    wait_until,
)
from kubetail_agent_proto import cluster_agent_pb2 as pb
from kubetail_agent_proto import cluster_agent_pb2_grpc as pb_grpc

MODES = [pytest.param(pb.DEFAULT, id="DEFAULT"), pytest.param(pb.END, id="END")]

CALL_TIMEOUT = 60  # gRPC deadline of a follow stream: far beyond any test, only against hangs
WAIT = 10  # deadline for one expected record / state
DELETED_WAIT = 20  # the agent waits 5 s for a deleted file to come back; this is 5 s + slack


# Timestamps: line i is at 10:00:00 + i ms, so every line has its own, increasing timestamp.

def ts(i: int) -> str:
    return f"2024-05-01T10:00:{i // 1000:02d}.{i % 1000:03d}Z"


def line(i: int, message: str) -> str:
    return cri(ts(i), message)


def rec(i: int, message: str, final: bool = True) -> tuple[str, str, bool]:
    return (f"2024-05-01T10:00:{i // 1000:02d}.{i % 1000:03d}000000Z", message, final)


def append(path: pathlib.Path, text: str) -> None:
    with open(path, "a") as handle:
        handle.write(text)


class Follow(StreamReader):
    """A StreamForward call read in the background; items are records() tuples."""

    def __init__(self, stub: pb_grpc.LogRecordsServiceStub, request: pb.LogRecordsStreamRequest,
                 timeout: float = CALL_TIMEOUT) -> None:
        super().__init__(stub.StreamForward(request, timeout=timeout), lambda record: records([record])[0])


def files_open(pid: int, path: pathlib.Path) -> int:
    """How many of the process's fds are open on `path` (the resolved file)."""
    target, count = str(path.resolve()), 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == target
        except FileNotFoundError:
            continue  # closed meanwhile
    return count


def mappings_of(pid: int, path: pathlib.Path) -> int:
    """How many memory mappings of `path` (the resolved file) the process has."""
    target = str(path.resolve())
    with open(f"/proc/{pid}/maps") as handle:
        return sum(1 for row in handle if row.rstrip("\n").endswith(target))


def wait_following(agent: AgentProcess, watches: int = 1) -> None:
    """Wait until the agent watches files with inotify: its (first) follow stream is live.

    An END stream ignores what was written before it took its starting offset; the agent subscribes
    to inotify only after that, so a watch in /proc means "lines written from now on are new".
    """
    wait_until(lambda: inotify_watches(agent.proc.pid) >= watches, f"{watches} inotify watch(es) in the agent")


def open_live(stub: pb_grpc.LogRecordsServiceStub, agent: AgentProcess, mode: int,
              historical: list[tuple[str, str, bool]], **fields: object) -> Follow:
    """Open a follow stream and return once it is live (DEFAULT: its history arrived)."""
    follow = Follow(stub, stream_request(follow_from=mode, **fields))
    if mode == pb.DEFAULT:
        assert follow.take(len(historical)) == historical
    else:
        wait_following(agent)
    return follow


# 1. append ####################################################################################


@pytest.mark.parametrize("mode", MODES)
def test_appended_lines_arrive_in_order_exactly_once(logs_dir: pathlib.Path, agent, records_stub, mode) -> None:
    path = log_path(logs_dir)
    path.write_text(line(0, "old 0") + line(1, "old 1") + line(2, "old 2"))
    history = [rec(0, "old 0"), rec(1, "old 1"), rec(2, "old 2")]
    follow = open_live(records_stub, agent, mode, history)
    try:
        append(path, line(10, "new 10"))
        assert follow.take(1) == [rec(10, "new 10")]
        append(path, line(11, "new 11") + line(12, "new 12"))  # two lines in one write
        append(path, line(13, "new 13"))
        append(path, line(14, "sentinel"))
        # Nothing before, between or after (up to the sentinel): each line exactly once, in order.
        assert follow.take(4) == [rec(11, "new 11"), rec(12, "new 12"), rec(13, "new 13"), rec(14, "sentinel")]
        assert follow.queue.empty()
    finally:
        follow.cancel()


def test_follow_docker_json_file(logs_dir: pathlib.Path, agent, records_stub) -> None:
    path = log_path(logs_dir)
    path.write_text(docker("2024-05-01T10:00:00Z", "old\n"))
    follow = open_live(records_stub, agent, pb.DEFAULT, [("2024-05-01T10:00:00.000000000Z", "old", True)])
    try:
        append(path, docker("2024-05-01T10:00:01Z", "part one ") + docker("2024-05-01T10:00:01Z", "and two\n"))
        assert follow.take(2) == [("2024-05-01T10:00:01.000000000Z", "part one ", False),
                                  ("2024-05-01T10:00:01.000000000Z", "and two", True)]
    finally:
        follow.cancel()


# 2. split writes ##############################################################################


@pytest.mark.parametrize("mode", MODES)
def test_line_written_in_two_writes_is_emitted_once_whole(logs_dir: pathlib.Path, agent, records_stub,
                                                          mode) -> None:
    path = log_path(logs_dir)
    path.write_text(line(0, "old"))
    follow = open_live(records_stub, agent, mode, [rec(0, "old")])
    try:
        whole = line(1, "hello split world")
        cut = whole.index("split")
        with open(path, "a") as handle:
            handle.write(whole[:cut])
            handle.flush()
            time.sleep(0.3)  # let the agent see (and wake up on) the unterminated half
            handle.write(whole[cut:])
            handle.flush()
            handle.write(line(2, "sentinel"))
        assert follow.take(2) == [rec(1, "hello split world"), rec(2, "sentinel")]
        assert follow.queue.empty()
    finally:
        follow.cancel()


@pytest.mark.parametrize("mode", MODES)
def test_unterminated_last_line_at_start_is_emitted_once_completed(logs_dir: pathlib.Path, agent, records_stub,
                                                                   mode) -> None:
    path = log_path(logs_dir)
    tail = line(1, "tail completed later")
    cut = tail.index("completed")
    path.write_text(line(0, "old") + tail[:cut])
    # DEFAULT: "old" arrives but not the half line; END: the stream is live before the line completes.
    follow = open_live(records_stub, agent, mode, [rec(0, "old")])
    try:
        time.sleep(0.3)  # room for a wrong early emission of the half line to show up first
        append(path, tail[cut:])
        append(path, line(2, "sentinel"))
        assert follow.take(2) == [rec(1, "tail completed later"), rec(2, "sentinel")]
        assert follow.queue.empty()
    finally:
        follow.cancel()


@pytest.mark.parametrize("mode", MODES)
def test_partial_chunks_of_one_message_in_follow(logs_dir: pathlib.Path, agent, records_stub, mode) -> None:
    path = log_path(logs_dir)
    path.write_text(line(0, "old"))
    follow = open_live(records_stub, agent, mode, [rec(0, "old")])
    try:
        append(path, cri(ts(1), "first part ", "P"))
        time.sleep(0.1)
        append(path, cri(ts(2), "second part", "F"))
        assert follow.take(2) == [rec(1, "first part ", False), rec(2, "second part")]
    finally:
        follow.cancel()


@pytest.mark.parametrize("mode", MODES)
def test_line_longer_than_a_read_written_in_pieces(logs_dir: pathlib.Path, agent, records_stub, mode) -> None:
    """A 2.5 MiB line (more than the agent reads at once) arriving in three writes: emitted once,
    as max-record-bytes (1 MiB) records, all but the last with is_final false."""
    path = log_path(logs_dir)
    path.write_text(line(0, "old"))
    follow = open_live(records_stub, agent, mode, [rec(0, "old")])
    try:
        message = "".join(chr(ord("a") + i % 26) for i in range(5 << 19))
        whole = line(1, message)
        with open(path, "a") as handle:
            for piece in (whole[: 1 << 20], whole[1 << 20: 2 << 20], whole[2 << 20:]):
                handle.write(piece)
                handle.flush()
                time.sleep(0.2)  # the agent wakes up on each piece
            handle.write(line(2, "sentinel"))
        got = follow.take(4)
        assert [(stamp, len(text), final) for stamp, text, final in got[:3]] == [
            (rec(1, "")[0], 1 << 20, False), (rec(1, "")[0], 1 << 20, False), (rec(1, "")[0], 1 << 19, True)]
        assert "".join(text for _stamp, text, _final in got[:3]) == message
        assert got[3] == rec(2, "sentinel")
    finally:
        follow.cancel()


# 3. kubelet rotation ##########################################################################


def kubelet_layout(logs_dir: pathlib.Path, pod: str = "web-1", namespace: str = "default",
                   container: str = "app") -> pathlib.Path:
    """/var/log/pods/<ns>_<pod>_<uid>/<container>/0.log with its /var/log/containers symlink."""
    directory = logs_dir.parent / "pods" / f"{namespace}_{pod}_8d2f5a4e-1c3b-4d5e-9f6a-7b8c9d0e1f2a" / container
    directory.mkdir(parents=True)
    target = directory / "0.log"
    target.write_text("")
    log_path(logs_dir, pod=pod, namespace=namespace, container=container).symlink_to(target)
    return target


def rotate(target: pathlib.Path, stamp: str = "20240501-100000") -> pathlib.Path:
    """kubelet: rename 0.log -> 0.log.<stamp>; the runtime reopens, creating a new 0.log."""
    rotated = target.with_name(f"{target.name}.{stamp}")
    os.rename(target, rotated)
    return rotated


@pytest.mark.parametrize("mode", MODES)
def test_kubelet_rotation(logs_dir: pathlib.Path, agent, records_stub, mode) -> None:
    target = kubelet_layout(logs_dir)
    append(target, line(0, "old"))
    follow = open_live(records_stub, agent, mode, [rec(0, "old")])
    try:
        append(target, line(1, "live before rotation"))
        assert follow.take(1) == [rec(1, "live before rotation")]
        # The runtime's handle on the old file: written just before the rename and after it,
        # until the runtime reopens the log (creating the new 0.log).
        with open(target, "a") as runtime:
            runtime.write(line(2, "old file, before rename"))
            runtime.flush()
            rotate(target)
            runtime.write(line(3, "old file, after rename"))
        with open(target, "x") as runtime:
            runtime.write(line(4, "new file 1"))
            runtime.flush()
            runtime.write(line(5, "new file 2"))
        assert follow.take(4) == [rec(2, "old file, before rename"), rec(3, "old file, after rename"),
                                  rec(4, "new file 1"), rec(5, "new file 2")]
        # And it keeps following the new file, with nothing duplicated in between.
        append(target, line(6, "sentinel"))
        assert follow.take(1) == [rec(6, "sentinel")]
        assert follow.queue.empty()
    finally:
        follow.cancel()


def test_kubelet_rotation_with_a_pause_before_the_reopen(logs_dir: pathlib.Path, agent, records_stub) -> None:
    """Between kubelet's rename and the runtime's reopen, 0.log does not exist for a while and the
    runtime still writes to the renamed file: the agent reads those lines, then the new file."""
    target = kubelet_layout(logs_dir)
    append(target, line(0, "old"))
    follow = open_live(records_stub, agent, pb.DEFAULT, [rec(0, "old")])
    try:
        with open(target, "a") as runtime:
            rotate(target)
            time.sleep(0.3)  # the agent notices that 0.log is gone
            runtime.write(line(1, "renamed file"))
            runtime.flush()
            assert follow.take(1) == [rec(1, "renamed file")]
            runtime.write(line(2, "renamed file, last"))
        with open(target, "x") as runtime:
            runtime.write(line(3, "new file"))
        assert follow.take(2) == [rec(2, "renamed file, last"), rec(3, "new file")]
        append(target, line(4, "sentinel"))
        assert follow.take(1) == [rec(4, "sentinel")]
        assert follow.queue.empty()
    finally:
        follow.cancel()


def test_kubelet_rotation_twice_in_a_row(logs_dir: pathlib.Path, agent, records_stub) -> None:
    """Two rotations, each seen by the agent, each continuing at the start of the new file."""
    target = kubelet_layout(logs_dir)
    append(target, line(0, "first file"))
    follow = open_live(records_stub, agent, pb.DEFAULT, [rec(0, "first file")])
    try:
        rotate(target, "20240501-100000")
        append(target, line(1, "second file"))
        assert follow.take(1) == [rec(1, "second file")]
        rotate(target, "20240501-100010")
        append(target, line(2, "third file"))
        append(target, line(3, "sentinel"))
        assert follow.take(2) == [rec(2, "third file"), rec(3, "sentinel")]
        assert follow.queue.empty()
    finally:
        follow.cancel()


def test_kubelet_rotation_races_with_the_writer(logs_dir: pathlib.Path, agent, records_stub) -> None:
    """Rotations while the agent is busy with the old file: every line arrives exactly once, in order.

    Like containerd, the writer keeps its handle on the old file across the rename and writes to it
    until it reopens (creating the new 0.log). The rename and reopen race with the agent reading
    the old file, so the agent must finish the old file after it sees the new one, not only before.
    Each rotation waits for the previous lines, as kubelet rotates at most every 10 s.
    """
    target = kubelet_layout(logs_dir)
    follow = Follow(records_stub, stream_request(follow_from=pb.DEFAULT))
    wait_following(agent)
    try:
        i = 0
        for rotation in range(50):
            expected = []
            with open(target, "a") as runtime:
                for _ in range(10):
                    runtime.write(line(i, f"line {i}"))
                    runtime.flush()
                    expected.append(rec(i, f"line {i}"))
                    i += 1
                rotate(target, f"20240501-10{rotation // 60:02d}{rotation % 60:02d}")
                runtime.write(line(i, f"line {i}"))
                expected.append(rec(i, f"line {i}"))
                i += 1
            append(target, line(i, f"line {i}"))
            expected.append(rec(i, f"line {i}"))
            i += 1
            got = []
            while not got or got[-1] != expected[-1]:
                got += follow.take(1)
            assert got == expected, f"rotation {rotation}: lost {[r for r in expected if r not in got]}"
            for old in target.parent.glob("0.log.*"):
                old.unlink()  # kubelet keeps a few; the agent has finished with them
    finally:
        follow.cancel()


# 4. copytruncate ##############################################################################


@pytest.mark.parametrize("mode", MODES)
def test_copytruncate(logs_dir: pathlib.Path, agent, records_stub, mode) -> None:
    path = log_path(logs_dir)
    history = [line(i, f"old line number {i} " + "x" * 40) for i in range(20)]
    path.write_text("".join(history))
    follow = open_live(records_stub, agent, mode, [rec(i, f"old line number {i} " + "x" * 40) for i in range(20)])
    try:
        append(path, line(20, "live before truncation"))
        assert follow.take(1) == [rec(20, "live before truncation")]
        shutil.copyfile(path, logs_dir / "copy.log.1")
        os.truncate(path, 0)
        # Much less than was there before: the file is visibly shorter when the agent looks.
        append(path, line(21, "after truncate 1"))
        append(path, line(22, "after truncate 2"))
        assert follow.take(2) == [rec(21, "after truncate 1"), rec(22, "after truncate 2")]
        append(path, line(23, "sentinel"))
        assert follow.take(1) == [rec(23, "sentinel")]
        assert follow.queue.empty()
    finally:
        follow.cancel()


# 5. deletion ##################################################################################


def test_deleted_file_ends_the_stream_ok(logs_dir: pathlib.Path, agent, records_stub) -> None:
    """Deleted and not recreated: after the agent's 5 s grace the stream ends with status OK.

    Both modes, for a plain file in the logs dir and for a real node's layout where the symlink and
    the pod's whole directory go; all four streams at once so the grace is waited for only once.
    """
    pods = ["plain-default", "plain-end", "pod-default", "pod-end"]
    files = {}
    for pod in pods:
        if pod.startswith("plain"):
            files[pod] = log_path(logs_dir, pod=pod)
        else:
            files[pod] = kubelet_layout(logs_dir, pod=pod)
        append(files[pod], line(0, "old"))
    follows = {pod: Follow(records_stub, stream_request(pod=pod, follow_from=pb.END if pod.endswith("end")
                                                        else pb.DEFAULT)) for pod in pods}
    try:
        for pod in pods:
            if pod.endswith("default"):
                assert follows[pod].take(1) == [rec(0, "old")]
        wait_following(agent, 3)  # the logs dir and each pod's container dir
        for pod in pods:
            append(files[pod], line(1, "last words"))
            assert follows[pod].take(1) == [rec(1, "last words")]
        for pod in pods:
            log_path(logs_dir, pod=pod).unlink()
            if pod.startswith("pod"):
                shutil.rmtree(files[pod].parent.parent)
        for pod in pods:
            (code, details), rest = follows[pod].status(timeout=DELETED_WAIT)
            assert (pod, code, rest) == (pod, grpc.StatusCode.OK, []), details
        wait_until(lambda: inotify_watches(agent.proc.pid) == 0, "watches released after the streams ended")
    finally:
        for follow in follows.values():
            follow.cancel()


def test_deleted_then_recreated_within_grace_keeps_following(logs_dir: pathlib.Path, agent, records_stub) -> None:
    path = log_path(logs_dir)
    path.write_text(line(0, "old"))
    follow = open_live(records_stub, agent, pb.DEFAULT, [rec(0, "old")])
    try:
        path.unlink()
        time.sleep(0.5)  # well inside the 5 s grace
        path.write_text(line(1, "recreated"))
        assert follow.take(1) == [rec(1, "recreated")]
        append(path, line(2, "sentinel"))
        assert follow.take(1) == [rec(2, "sentinel")]
    finally:
        follow.cancel()


# 6. END ignores history and start_time ########################################################


def test_end_ignores_history_and_start_time(logs_dir: pathlib.Path, agent, records_stub) -> None:
    path = log_path(logs_dir)
    path.write_text("".join(line(i, f"old {i}") for i in range(5)))
    # start_time before all of history: with DEFAULT it would select all five old lines.
    follow = Follow(records_stub, stream_request(follow_from=pb.END, start_time="2024-05-01T09:00:00Z"))
    try:
        wait_following(agent)
        append(path, line(5, "new 5") + line(6, "new 6"))
        assert follow.take(2) == [rec(5, "new 5"), rec(6, "new 6")]
        assert follow.queue.empty()
    finally:
        follow.cancel()


def test_end_ignores_a_start_time_after_the_new_lines(logs_dir: pathlib.Path, agent, records_stub) -> None:
    """follow_from=END starts at the end of the file; start_time plays no part, also for new lines."""
    path = log_path(logs_dir)
    path.write_text(line(0, "old"))
    follow = Follow(records_stub, stream_request(follow_from=pb.END, start_time="2024-05-01T11:00:00Z"))
    try:
        wait_following(agent)
        append(path, line(1, "new 1") + line(2, "new 2"))
        assert follow.take(2) == [rec(1, "new 1"), rec(2, "new 2")]
    finally:
        follow.cancel()


def test_default_with_start_time_then_follows(logs_dir: pathlib.Path, agent, records_stub) -> None:
    path = log_path(logs_dir)
    path.write_text("".join(line(i, f"old {i}") for i in range(5)))
    follow = Follow(records_stub, stream_request(follow_from=pb.DEFAULT, start_time=ts(3)))
    try:
        assert follow.take(2) == [rec(3, "old 3"), rec(4, "old 4")]
        append(path, line(5, "new 5"))
        assert follow.take(1) == [rec(5, "new 5")]
    finally:
        follow.cancel()


# 7. stop_time: no follow ######################################################################


def test_default_with_stop_time_is_finite(logs_dir: pathlib.Path, agent, records_stub) -> None:
    path = log_path(logs_dir)
    path.write_text("".join(line(i, f"line {i}") for i in range(5)))
    follow = Follow(records_stub, stream_request(follow_from=pb.DEFAULT, stop_time=ts(2)))
    (code, details), got = follow.status()
    assert (code, details) == (grpc.StatusCode.OK, "")
    assert got == [rec(0, "line 0"), rec(1, "line 1"), rec(2, "line 2")]
    # A stop_time after everything in the file: still the whole file and then the end.
    follow = Follow(records_stub, stream_request(follow_from=pb.DEFAULT, stop_time="2030-01-01T00:00:00Z"))
    (code, _details), got = follow.status()
    assert code == grpc.StatusCode.OK
    assert got == [rec(i, f"line {i}") for i in range(5)]
    assert inotify_watches(agent.proc.pid) == 0  # never followed


# 8. grep ######################################################################################


@pytest.mark.parametrize("mode", MODES)
def test_grep_applies_to_followed_lines(logs_dir: pathlib.Path, agent, records_stub, mode) -> None:
    path = log_path(logs_dir)
    path.write_text(line(0, "keep old") + line(1, "drop old"))
    follow = open_live(records_stub, agent, mode, [rec(0, "keep old")], grep="keep")
    try:
        append(path, line(2, "drop new") + line(3, "keep new") + line(4, "also drop"))
        # A P…P F message is judged whole: it matches through any of its chunks.
        append(path, cri(ts(5), "drop start ", "P") + cri(ts(6), "and keep end", "F"))
        append(path, cri(ts(7), "drop this ", "P") + cri(ts(8), "whole message", "F"))
        append(path, line(9, "keep sentinel"))
        assert follow.take(4) == [rec(3, "keep new"), rec(5, "drop start ", False), rec(6, "and keep end"),
                                  rec(9, "keep sentinel")]
        assert follow.queue.empty()
    finally:
        follow.cancel()


# 9. shutdown ##################################################################################


def test_shutdown_health_and_follow_streams(start_agent, logs_dir: pathlib.Path) -> None:
    path = log_path(logs_dir)
    path.write_text(line(0, "old"))
    # A long shutdown-timeout: the stop must not depend on it running out.
    agent = start_agent(logs_dir, shutdown_timeout="60s")
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        stub = pb_grpc.LogRecordsServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT).status == serving

        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
        statuses: queue.Queue = queue.Queue()

        def read_watch() -> None:
            try:
                for response in watch:
                    statuses.put(response.status)
            except grpc.RpcError as exc:
                statuses.put(exc.code())

        watcher = threading.Thread(target=read_watch, daemon=True)
        watcher.start()
        # The END stream's file is in a directory of its own: its own watch shows when it is live.
        append(kubelet_layout(logs_dir, pod="end-1"), line(0, "old"))
        follows = [open_live(stub, agent, pb.DEFAULT, [rec(0, "old")]),
                   Follow(stub, stream_request(pod="end-1", follow_from=pb.END))]
        try:
            assert statuses.get(timeout=WAIT) == serving
            wait_following(agent, 2)

            agent.proc.send_signal(signal.SIGTERM)

            assert statuses.get(timeout=WAIT) == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            for follow in follows:
                (code, details), rest = follow.status(timeout=WAIT)
                assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
                assert "shutting down" in details
                assert rest == []
            assert agent.proc.wait(CALL_TIMEOUT) == 0  # one SIGTERM, as from the kubelet
        finally:
            watch.cancel()
            for follow in follows:
                follow.cancel()
    assert any(event.get("msg") == "stopped" for event in agent.events()), agent.lines[-5:]


def test_shutdown_lets_a_finite_stream_finish(start_agent, logs_dir: pathlib.Path) -> None:
    """A finite stream still in flight at SIGTERM (the client reads slowly) completes, status OK."""
    path = log_path(logs_dir)
    count = 2000
    payload = "p" * 16000
    with open(path, "w") as handle:  # 32 MB: far more than gRPC flow control and socket buffers hold
        handle.writelines(line(i, f"{i} {payload}") for i in range(count))
    agent = start_agent(logs_dir, shutdown_timeout="60s")
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        stub = pb_grpc.LogRecordsServiceStub(channel)
        finite = stub.StreamForward(stream_request(), timeout=CALL_TIMEOUT)
        follow = Follow(stub, stream_request(follow_from=pb.END))
        try:
            assert next(finite).message == f"0 {payload}"
            wait_following(agent)
            agent.proc.send_signal(signal.SIGTERM)
            (code, details), _ = follow.status()
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            received = 1
            for record in finite:  # raises if the stream does not end with OK
                assert record.message == f"{received} {payload}"
                received += 1
            assert received == count
            assert agent.proc.wait(CALL_TIMEOUT) == 0
        finally:
            finite.cancel()
            follow.cancel()
    # The finite stream really was still being sent when the shutdown began.
    shutting_down = [event for event in agent.events() if event.get("msg") == "shutting down"]
    assert [event.get("active_streams") for event in shutting_down] == [2]


def test_shutdown_does_not_wait_for_a_slow_follow_client(start_agent, logs_dir: pathlib.Path) -> None:
    """A follow stream that is still sending (its client reads slowly) ends at SIGTERM too.

    Only finite streams may hold the shutdown for up to shutdown-timeout; a follow stream never
    finishes by itself, so it must not make the agent wait for the timeout, whatever phase it is in.
    """
    path = log_path(logs_dir)
    payload = "p" * 16000
    with open(path, "w") as handle:  # 32 MB of history: the stream is blocked on flow control
        handle.writelines(line(i, f"{i} {payload}") for i in range(2000))
    agent = start_agent(logs_dir, shutdown_timeout="60s")
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        stub = pb_grpc.LogRecordsServiceStub(channel)
        call = stub.StreamForward(stream_request(follow_from=pb.DEFAULT), timeout=CALL_TIMEOUT)
        try:
            assert next(call).message == f"0 {payload}"
            agent.proc.send_signal(signal.SIGTERM)
            # The client reads nothing more: the agent must still stop (long before the 60 s).
            try:
                code = agent.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                pytest.fail("the agent waited for shutdown-timeout because a follow stream was still sending")
            assert code == 0
            with pytest.raises(grpc.RpcError) as ended:
                for _record in call:
                    pass
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            call.cancel()


# 10. leaks ####################################################################################


def test_cancelled_streams_release_everything(logs_dir: pathlib.Path, agent, records_stub) -> None:
    path = log_path(logs_dir)
    path.write_text("".join(line(i, f"history {i}") for i in range(100)))
    pid = agent.proc.pid

    def one_stream(i: int) -> None:
        """A stream that is surely following (watch in place, a new line received), then cancelled."""
        mode = pb.DEFAULT if i % 2 else pb.END
        follow = Follow(records_stub, stream_request(follow_from=mode, grep=f"^ping {i}$"))
        wait_following(agent)
        append(path, line(1000 + i, f"ping {i}"))
        assert follow.take(1) == [rec(1000 + i, f"ping {i}")]
        follow.cancel()
        wait_until(lambda: inotify_watches(pid) == 0, f"watch released after stream {i} was cancelled")

    # Warm-up: the scan pool's threads and the inotify instance are created on first use.
    one_stream(-1)
    one_stream(0)
    # The baseline must not count the log file itself: a cancelled stream closes it just after
    # its watch is released, and a baseline taken in between made "25 streams hold 25 more" fail.
    wait_until(lambda: files_open(pid, path) == 0, "the warm-up streams closed the log file")
    fds, threads = fd_count(pid), thread_count(pid)

    for i in range(1, 201):
        one_stream(i)
    wait_until(lambda: fd_count(pid) <= fds and thread_count(pid) <= threads,
               f"fds back to {fds} and threads back to {threads} "
               f"(now {fd_count(pid)} fds, {thread_count(pid)} threads)")
    assert mappings_of(pid, path) == 0

    # In batches: 25 streams open at once share one kernel watch; each holds its file open.
    for batch in range(4):
        follows = [Follow(records_stub, stream_request(follow_from=pb.DEFAULT, grep=f"^batch {batch}$"))
                   for _ in range(25)]
        append(path, line(2000 + batch, f"batch {batch}"))
        for follow in follows:
            assert follow.take(1) == [rec(2000 + batch, f"batch {batch}")]
        wait_until(lambda: fd_count(pid) >= fds + 25, "each open stream holds its file")
        wait_until(lambda: inotify_watches(pid) == 1, "one shared watch for 25 streams on one file")
        for follow in follows:
            follow.cancel()
        wait_until(lambda: fd_count(pid) <= fds and inotify_watches(pid) == 0,
                   f"fds back to {fds}, no watch (now {fd_count(pid)} fds, {inotify_watches(pid)} watches)")
    assert mappings_of(pid, path) == 0
    # The agent is still healthy and serves a fresh follow stream.
    follow = open_live(records_stub, agent, pb.END, [])
    try:
        append(path, line(3000, "still alive"))
        assert follow.take(1) == [rec(3000, "still alive")]
    finally:
        follow.cancel()
    # Cancelling is routine: nothing logged above info (but the start-up warning of auth-mode none).
    assert [event for event in agent.events() if event.get("level") not in ("debug", "info")
            and not event["msg"].startswith("AUTH-MODE NONE")] == []


def test_cancelled_grep_scans_release_everything(logs_dir: pathlib.Path, agent, records_stub) -> None:
    """NOOP and backward grep streams over a large file, cancelled while the scan pool is still
    scanning ahead: every handle and mapping is released, and nothing but JSON reaches stderr."""
    path = log_path(logs_dir)
    with open(path, "w") as handle:  # ~40 MiB, one match every 100 lines
        for block in range(2000):
            handle.write("".join(cri(f"2024-05-01T10:00:00.{block * 100 + i:09d}Z",
                                     "line sku000Q" if i == 0 else f"line {i} " + "x" * 150) for i in range(100)))
    pid = agent.proc.pid
    warm = Follow(records_stub, stream_request(grep=r"[a-z]+\d{3}[A-Z]"))  # pool threads exist now
    assert len(warm.status()[1]) == 2000
    fds = fd_count(pid)
    for i in range(40):
        request = stream_request(grep=r"[a-z]+\d{3}[A-Z]")
        call = records_stub.StreamBackward(request) if i % 2 else records_stub.StreamForward(request)
        stream = StreamReader(call, lambda record: record)
        stream.take(1 + i % 5)
        stream.cancel()
    wait_until(lambda: fd_count(pid) <= fds and mappings_of(pid, path) == 0,
               f"fds back to {fds}, no mapping (now {fd_count(pid)} fds, {mappings_of(pid, path)} mappings)")
    assert [line for line in agent.lines if not line.startswith("{")] == []
    assert [event for event in agent.events() if event.get("level") not in ("debug", "info")
            and not event["msg"].startswith("AUTH-MODE NONE")] == []


@pytest.mark.parametrize("grep", ["", "line"], ids=["unfiltered", "grep"])
def test_truncated_while_its_history_streams(logs_dir: pathlib.Path, agent, channel, records_stub, grep) -> None:
    """copytruncate while the window is still being sent (the client reads slowly): the agent
    must not touch the mapped pages that no longer exist (SIGBUS would kill it). A NOOP stream
    ends OK where the file now ends; a DEFAULT stream follows on from the truncated file's start."""
    path = log_path(logs_dir)
    total = 300_000  # ~50 MiB: far more than gRPC's flow-control windows hold
    with open(path, "w") as handle:
        for block in range(total // 1000):
            handle.write("".join(cri(f"2024-05-01T10:00:00.{block * 1000 + i:09d}Z", f"line {i} " + "x" * 120)
                                 for i in range(1000)))
    noop = records_stub.StreamForward(stream_request(grep=grep), timeout=60)
    follow = records_stub.StreamForward(stream_request(grep=grep, follow_from=pb.DEFAULT), timeout=60)
    for call in (noop, follow):
        for _ in range(5):
            next(call)
    time.sleep(0.5)  # both streams now wait on flow control, far from the end of the window
    os.truncate(path, 0)
    append(path, line(1, "line after truncation"))
    assert sum(1 for _ in noop) < total - 5  # ends OK (a status would raise here), short of the old end
    follow_rest = StreamReader(follow, lambda record: records([record])[0])
    follow_rest.until(lambda r: r[1] == "line after truncation", "the line written after the truncation")
    follow_rest.cancel()
    still_serves(agent, channel, logs_dir)
