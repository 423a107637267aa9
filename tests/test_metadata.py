"""LogMetadataService (List, Watch) over real gRPC against a real agent: real files, real inotify.

The layout is a node's: `<tmp>/containers/<pod>_<ns>_<container>-<id>.log` (the agent's
container-logs-dir) are symlinks into `<tmp>/pods/<ns>_<pod>_<uid>/<container>/0.log`, where the
runtime writes. Sizes and mtimes are compared exactly with os.stat (nanoseconds).

Nothing here asserts how long something took. A Watch stream is read by a thread into a queue;
"the stream is live" and "nothing else came before this point" are established with probe entries
(see `sync`): events of one stream arrive in the order the agent saw the changes. Where a debounce
window must close before "no duplicate" can be checked, the test sleeps past it (2 s). Every wait
has a deadline only so that a broken agent fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import grpc
import pytest

from conftest import (
    CID,
    AgentProcess,
    StreamReader,
    fd_count,
    inotify_fds,
    inotify_watches,
    thread_count,
    wait_until,
    write_config,
)
from kubetail_agent_proto import cluster_agent_pb2 as pb
from kubetail_agent_proto import cluster_agent_pb2_grpc as pb_grpc

CALL_TIMEOUT = 120  # gRPC deadline of a Watch stream: far beyond any test, only against hangs
WAIT = 10  # deadline for one expected event / state
DEBOUNCE_S = 2.0  # the agent's per-file debounce window (issue 3)
SETTLE = DEBOUNCE_S + 0.7  # sleep this long to let every open debounce window close
PROBE_EVERY = 0.05  # sync: a new probe entry this often until the stream reports one
NODE = "node-a"
POD_UID = "8d2f5a4e-1c3b-4d5e-9f6a-7b8c9d0e1f2a"
SYSCTL = pathlib.Path("/proc/sys/fs/inotify/max_user_watches")
# kubelet's /var/log/containers naming, as issue 3 states it
ENTRY_NAME = re.compile(r"^(?P<pod>[^_]+)_(?P<namespace>[^_]+)_(?P<container>.+)-(?P<container_id>[^-]+)\.log$")


# ---------------------------------------------------------------------------------------------
# Files: kubelet's layout
# ---------------------------------------------------------------------------------------------


class Entry(NamedTuple):
    """One container-logs-dir entry and the file it resolves to (the same path for a plain file)."""

    link: pathlib.Path
    target: pathlib.Path
    pod: str
    namespace: str
    container: str
    cid: str

    @property
    def name(self) -> str:
        return self.link.name


def entry_name(pod: str, namespace: str, container: str, cid: str) -> str:
    return f"{pod}_{namespace}_{container}-{cid}.log"


def pod_log(logs_dir: pathlib.Path, pod: str, namespace: str = "default", container: str = "app",
            cid: str = CID, content: str = "", relative: bool = True, link: bool = True) -> Entry:
    """kubelet: the runtime's `pods/<ns>_<pod>_<uid>/<container>/0.log`, then the symlink to it."""
    directory = logs_dir.parent / "pods" / f"{namespace}_{pod}_{POD_UID}" / container
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "0.log"
    target.write_text(content)
    path = logs_dir / entry_name(pod, namespace, container, cid)
    if link:
        path.symlink_to(os.path.relpath(target, logs_dir) if relative else target)
    return Entry(path, target, pod, namespace, container, cid)


def plain_log(logs_dir: pathlib.Path, pod: str, namespace: str = "default", container: str = "app",
              cid: str = CID, content: str = "") -> Entry:
    """A regular file directly in the logs dir (no symlink)."""
    path = logs_dir / entry_name(pod, namespace, container, cid)
    path.write_text(content)
    return Entry(path, path, pod, namespace, container, cid)


def remove_pod_log(entry: Entry) -> None:
    """kubelet's cleanup: the symlink, then the pod's log directory."""
    entry.link.unlink()
    if entry.target != entry.link:
        shutil.rmtree(entry.target.parent.parent)


def append(path: pathlib.Path, text: str) -> None:
    with open(path, "a") as handle:  # one write(2)
        handle.write(text)


def state(path: pathlib.Path) -> tuple[int, int]:
    """(size, mtime ns) of the file `path` resolves to."""
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


class Item(NamedTuple):
    """A LogMetadata, flattened for exact comparisons; size/mtime None when fileInfo is absent."""

    id: str
    node: str
    namespace: str
    pod: str
    container: str
    container_id: str
    size: int | None
    mtime_ns: int | None


def item(message: pb.LogMetadata) -> Item:
    spec = message.spec
    size = mtime = None
    if message.HasField("fileInfo"):
        stamp = message.fileInfo.last_modified_at
        size, mtime = message.fileInfo.size, stamp.seconds * 1_000_000_000 + stamp.nanos
    return Item(message.id, spec.node_name, spec.namespace, spec.pod_name, spec.container_name,
                spec.container_id, size, mtime)


def expected_item(entry: Entry, node: str = NODE, present: bool = True) -> Item:
    size, mtime = state(entry.link) if present else (None, None)
    return Item(entry.cid, node, entry.namespace, entry.pod, entry.container, entry.cid, size, mtime)


class Ev(NamedTuple):
    """A watch event: type, the entry's file name, and its fileInfo (None, None when absent)."""

    type: str
    name: str
    size: int | None
    mtime_ns: int | None


def ev(event: pb.LogMetadataWatchEvent) -> Ev:
    got = item(event.object)
    return Ev(event.type, entry_name(got.pod, got.namespace, got.container, got.container_id), got.size,
              got.mtime_ns)


def added(entry: Entry) -> Ev:
    return Ev("ADDED", entry.name, *state(entry.link))


def modified(entry: Entry) -> Ev:
    return Ev("MODIFIED", entry.name, *state(entry.link))


def deleted(entry: Entry) -> Ev:
    return Ev("DELETED", entry.name, None, None)


def list_items(stub: pb_grpc.LogMetadataServiceStub, namespaces: Sequence[str] = ()) -> list[Item]:
    reply = stub.List(pb.LogMetadataListRequest(namespaces=list(namespaces)), timeout=WAIT)
    return sorted(item(message) for message in reply.items)


def rpc_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if not isinstance(result, pb.LogMetadataList):
            for _ in result:  # type: ignore[attr-defined]
                pass
    return raised.value.code(), raised.value.details() or ""


# ---------------------------------------------------------------------------------------------
# Watch streams
# ---------------------------------------------------------------------------------------------


PROBE_POD = "probe-"


def is_probe(event: Ev) -> bool:
    return event.name.startswith(PROBE_POD)


class Watch(StreamReader):
    """A Watch call read in the background; items are Ev tuples, `raw` the messages themselves."""

    def __init__(self, stub: pb_grpc.LogMetadataServiceStub, namespaces: Sequence[str] = (),
                 timeout: float = CALL_TIMEOUT) -> None:
        self.raw: list[pb.LogMetadataWatchEvent] = []

        def convert(event: pb.LogMetadataWatchEvent) -> Ev:
            self.raw.append(event)
            return ev(event)

        super().__init__(stub.Watch(pb.LogMetadataWatchRequest(namespaces=list(namespaces)), timeout=timeout),
                         convert)


class Prober:
    """Creates probe entries (plain files `probe-<n>_<ns>_p-<n>.log`) in the logs dir."""

    def __init__(self, logs_dir: pathlib.Path) -> None:
        self.logs_dir = logs_dir
        self.numbers = itertools.count()
        self.paths: list[pathlib.Path] = []

    def make(self, namespace: str) -> str:
        n = next(self.numbers)
        path = self.logs_dir / entry_name(f"{PROBE_POD}{n}", namespace, "p", f"{n:04x}")
        path.write_text("")
        self.paths.append(path)
        return path.name

    def clear(self) -> None:
        """Remove the probes; call it while no stream is open (else they report DELETED)."""
        for path in self.paths:
            path.unlink(missing_ok=True)
        self.paths.clear()


def sync(prober: Prober, streams: Sequence[Watch], namespace: str = "probe",
         timeout: float = WAIT) -> list[list[Ev]]:
    """Make sure every stream is live and has delivered everything the agent saw so far.

    Probe entries are created until each stream has reported one (a probe created before a
    stream subscribed is never reported: no snapshot), then one last probe that every stream must
    report. Returns, per stream, the non-probe events received meanwhile, in order.
    """
    others: list[list[Ev]] = [[] for _ in streams]
    live = [False] * len(streams)
    deadline = time.monotonic() + timeout
    while not all(live):
        if time.monotonic() > deadline:
            pytest.fail(f"{live.count(False)} of {len(streams)} watch streams reported no probe within {timeout} s")
        prober.make(namespace)
        pause = time.monotonic() + PROBE_EVERY
        while not all(live) and time.monotonic() < pause:
            for i, stream in enumerate(streams):
                if not live[i]:
                    for event in stream.poll():
                        if is_probe(event):
                            live[i] = True
                        else:
                            others[i].append(event)
            time.sleep(0.002)
    last = prober.make(namespace)
    for i, stream in enumerate(streams):
        for event in stream.until(lambda e: e.name == last, f"probe {last}"):
            if not is_probe(event):
                others[i].append(event)
    return others


# ---------------------------------------------------------------------------------------------
# /proc views of a process
# ---------------------------------------------------------------------------------------------


def user_watches(uid: int) -> int:
    """inotify watches held by all processes of `uid` (what fs.inotify.max_user_watches limits)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            total += inotify_watches(int(pid))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def expected_watches(logs_dir: pathlib.Path) -> int:
    """The invariant for any number (> 0) of Watch streams: one watch on the logs directory plus
    one per distinct file (inode) that a matching entry resolves to."""
    files = set()
    for path in logs_dir.iterdir():
        try:
            info = os.stat(path)
        except FileNotFoundError:
            continue
        if ENTRY_NAME.fullmatch(path.name) and os.path.isfile(path):
            files.add((info.st_dev, info.st_ino))
    return 1 + len(files)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def meta_agent(start_agent, logs_dir: pathlib.Path) -> AgentProcess:
    return start_agent(logs_dir, node_name=NODE)


@pytest.fixture
def meta_channel(meta_agent: AgentProcess):
    with grpc.insecure_channel(f"127.0.0.1:{meta_agent.port}") as channel:
        yield channel


@pytest.fixture
def stub(meta_channel: grpc.Channel) -> pb_grpc.LogMetadataServiceStub:
    return pb_grpc.LogMetadataServiceStub(meta_channel)


@pytest.fixture
def prober(logs_dir: pathlib.Path) -> Prober:
    return Prober(logs_dir)


@pytest.fixture
def watches():
    """Watch streams opened by a test; cancelled at its end whatever happened."""
    opened: list[Watch] = []
    yield opened
    for stream in opened:
        stream.cancel()


def open_watch(watches: list[Watch], stub: pb_grpc.LogMetadataServiceStub, namespaces: Sequence[str] = ()) -> Watch:
    stream = Watch(stub, namespaces)
    watches.append(stream)
    return stream


def quiet_errors(agent: AgentProcess) -> list[dict]:
    """Events logged above info, but the start-up warning of auth-mode none."""
    return [event for event in agent.events() if event.get("level") not in ("debug", "info")
            and not event.get("msg", "").startswith("AUTH-MODE NONE")]


# =============================================================================================
# List
# =============================================================================================


def test_list_matching_entries_exact(logs_dir: pathlib.Path, meta_agent, stub) -> None:
    """Every kind of matching entry, with its spec parsed from the name and the target's stat."""
    entries = [
        pod_log(logs_dir, "web-7d4b9c6f5-x2k8p", "default", "nginx", "4f9b2c1d8e7a", "a\n" * 10),
        pod_log(logs_dir, "api-0", "team-a", "server", "77aa", "abc\n", relative=False),  # absolute link
        plain_log(logs_dir, "db-0", "team-b", "postgres", "99ff00", "plain file\n"),
        # The container name is `.+` (greedy): it keeps `-` and `_`; the id is after the last `-`.
        pod_log(logs_dir, "job-1", "team-a", "side_car-v2", "0abc", "x\n"),
        pod_log(logs_dir, "empty", "default", "app", "e0", ""),
    ]
    # Nanosecond mtimes that are not multiples of a µs, different from the symlinks' own.
    for i, entry in enumerate(entries):
        os.utime(entry.target, ns=(1_714_557_600_000_000_001, 1_714_557_600_123_456_789 + i * 1_000_000_007))
        if entry.link != entry.target:
            os.utime(entry.link, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000), follow_symlinks=False)
    got = list_items(stub)
    assert got == sorted(expected_item(entry) for entry in entries)
    by_pod = {i.pod: i for i in got}
    assert by_pod["job-1"].container == "side_car-v2" and by_pod["job-1"].id == "0abc"
    assert by_pod["web-7d4b9c6f5-x2k8p"].size == 20  # the target's size, not the link's
    assert by_pod["api-0"].mtime_ns == 1_714_557_600_123_456_789 + 1_000_000_007
    # Field by field, as protobuf: id = container id, spec, and fileInfo set even for size 0.
    reply = stub.List(pb.LogMetadataListRequest(), timeout=WAIT)
    empty = next(message for message in reply.items if message.spec.pod_name == "empty")
    assert empty == pb.LogMetadata(
        id="e0", spec=pb.LogMetadataSpec(node_name=NODE, namespace="default", pod_name="empty",
                                         container_name="app", container_id="e0"),
        fileInfo=pb.LogMetadataFileInfo(size=0, last_modified_at={"seconds": 1_714_557_604,
                                                                   "nanos": 123_456_789 + 28}))
    assert empty.HasField("fileInfo")


def test_list_skips_non_matching_names(logs_dir: pathlib.Path, meta_agent, stub) -> None:
    good = pod_log(logs_dir, "web-1", "default", "app", "c1d2", "ok\n")
    for name in ["README", "web-1_default_app.log", "web-1_default_app-c1d2.log.20240501-100000",
                 "web-1_default_app-c1d2.txt", "web-1_app-c1d2.log", "_default_app-c1d2.log",
                 "web-1__app-c1d2.log", "web-1_default_app-.log", "web-1_default_-c1d2.log",
                 "web-1_default_app-c1d2.log.gz", "web-1_default_app-c1d2.log.tmp", ".log"]:
        (logs_dir / name).write_text("not an entry\n")
    (logs_dir / "pods-dir").mkdir()
    assert list_items(stub) == [expected_item(good)]


def test_list_skips_broken_and_non_file_entries(logs_dir: pathlib.Path, meta_agent, stub) -> None:
    good = pod_log(logs_dir, "web-1", content="ok\n")
    broken = pod_log(logs_dir, "gone-1", content="x\n")
    broken.target.unlink()  # the link stays, dangling
    (logs_dir / entry_name("loop-1", "default", "app", CID)).symlink_to(entry_name("loop-1", "default", "app", CID))
    (logs_dir / entry_name("dir-1", "default", "app", CID)).mkdir()
    (logs_dir / entry_name("dirlink-1", "default", "app", CID)).symlink_to(logs_dir.parent)
    os.mkfifo(logs_dir / entry_name("fifo-1", "default", "app", CID))
    assert list_items(stub) == [expected_item(good)]
    skipped = [e for e in meta_agent.events() if e.get("level") == "debug" and e.get("name") == broken.name]
    assert skipped, "the broken link is skipped with a debug log naming it"
    assert quiet_errors(meta_agent) == []


def test_list_namespaces_filter(logs_dir: pathlib.Path, meta_agent, stub) -> None:
    entries = {ns: [pod_log(logs_dir, f"{ns}-pod-{i}", ns, content=f"{ns}\n" * (i + 1)) for i in range(2)]
               for ns in ("default", "team-a", "team-b")}
    everything = sorted(expected_item(e) for group in entries.values() for e in group)

    def only(*namespaces: str) -> list[Item]:
        return sorted(expected_item(e) for ns in namespaces for e in entries[ns])

    assert list_items(stub, []) == everything
    assert list_items(stub, [""]) == everything  # empty strings are ignored: still all namespaces
    assert list_items(stub, ["", ""]) == everything
    assert list_items(stub, ["team-a"]) == only("team-a")
    assert list_items(stub, ["team-a", "team-b"]) == only("team-a", "team-b")
    assert list_items(stub, ["", "team-b"]) == only("team-b")
    assert list_items(stub, ["team-b", "team-b"]) == only("team-b")
    assert list_items(stub, ["nobody-here"]) == []
    # Not a namespace name at all: refused, not silently empty.
    code, _ = rpc_error(lambda: stub.List(pb.LogMetadataListRequest(namespaces=["Team-A"]), timeout=WAIT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def churn_entries(logs_dir: pathlib.Path, stop: threading.Event, churned: list[int]) -> None:
    """Until `stop`: create kubelet-style entries in batches of 50 and remove them again (target
    first, then the link, so links are also seen dangling); churned[0] counts them."""
    n = 0
    while not stop.is_set():
        batch = [pod_log(logs_dir, f"churn-{n + i}", content="c\n") for i in range(50)]
        n += 50
        for entry in batch:
            entry.target.unlink()
        for entry in batch:
            entry.link.unlink()
            shutil.rmtree(entry.target.parent.parent)
        churned[0] = n


def test_list_tolerates_files_vanishing_while_listing(logs_dir: pathlib.Path, meta_agent, stub) -> None:
    """Entries and targets that disappear between the directory read and the stat are skipped.

    A churn thread creates and removes kubelet-style entries (target first, then the link, so
    links are also seen dangling) while List is called again and again: every call succeeds and
    reports only entries that exist, with their exact state, never an error.
    """
    stable = [pod_log(logs_dir, f"stable-{i}", content="s\n" * i) for i in range(5)]
    want_stable = sorted(expected_item(e) for e in stable)
    stop = threading.Event()
    churned = [0]
    thread = threading.Thread(target=churn_entries, args=(logs_dir, stop, churned), daemon=True)
    thread.start()
    try:
        for _ in range(60):
            got = list_items(stub)
            assert [i for i in got if i.pod.startswith("stable-")] == want_stable
            for found in got:
                assert found.pod.startswith(("stable-", "churn-")), found
                if found.pod.startswith("churn-"):
                    assert (found.size, found.node) == (2, NODE), found
    finally:
        stop.set()
        thread.join(WAIT)
    assert churned[0] > 0
    assert meta_agent.proc.poll() is None
    assert quiet_errors(meta_agent) == []
    assert list_items(stub) == want_stable


def test_list_missing_directory_is_not_found(start_agent, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "no-such-dir" / "containers"
    agent = start_agent(missing)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        stub = pb_grpc.LogMetadataServiceStub(channel)
        code, details = rpc_error(lambda: stub.List(pb.LogMetadataListRequest(), timeout=WAIT))
        assert code == grpc.StatusCode.NOT_FOUND
        assert str(missing) in details
        code, details = rpc_error(lambda: stub.List(pb.LogMetadataListRequest(namespaces=["x"]), timeout=WAIT))
        assert (code, str(missing) in details) == (grpc.StatusCode.NOT_FOUND, True)
        # The directory is looked at per request: once it exists, List works.
        missing.mkdir(parents=True)
        (missing / entry_name("web-1", "default", "app", CID)).write_text("late\n")
        assert [i.pod for i in list_items(stub)] == ["web-1"]
    assert quiet_errors(agent) == []


def test_list_and_watch_authorize_before_reading_the_directory(start_agent, tmp_path: pathlib.Path) -> None:
    """The authorization hook sees the requested namespaces (empty = cluster-wide) before the
    directory is read: with allowed-namespaces, a namespace outside it is PERMISSION_DENIED even
    though the directory does not exist (NOT_FOUND would show the directory was read first), and
    a cluster-wide request is narrowed to what the hook allows."""
    missing = tmp_path / "missing"
    agent = start_agent(missing, allowed_namespaces=["team-a", "team-b"], node_name=NODE)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        stub = pb_grpc.LogMetadataServiceStub(channel)
        for namespaces in (["team-c"], ["team-a", "team-c"], ["", "kube-system"]):
            for method in ("List", "Watch"):
                if method == "List":
                    code, details = rpc_error(lambda ns=namespaces: stub.List(
                        pb.LogMetadataListRequest(namespaces=ns), timeout=WAIT))
                else:
                    code, details = rpc_error(lambda ns=namespaces: stub.Watch(
                        pb.LogMetadataWatchRequest(namespaces=ns), timeout=WAIT))
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method, namespaces, code, details)
                assert str(missing) not in details
        # Allowed namespaces (and the cluster-wide request) get past the hook to the directory.
        for namespaces in (["team-a"], [], [""]):
            code, _ = rpc_error(lambda ns=namespaces: stub.List(pb.LogMetadataListRequest(namespaces=ns),
                                                                timeout=WAIT))
            assert code == grpc.StatusCode.NOT_FOUND
            code, _ = rpc_error(lambda ns=namespaces: stub.Watch(pb.LogMetadataWatchRequest(namespaces=ns),
                                                                 timeout=WAIT))
            assert code == grpc.StatusCode.NOT_FOUND
        missing.mkdir()
        entries = {ns: pod_log(missing, f"{ns}-pod", ns, content="x\n") for ns in ("team-a", "team-b", "team-c")}
        assert list_items(stub, []) == sorted(expected_item(entries[ns]) for ns in ("team-a", "team-b"))
        assert list_items(stub, ["team-b"]) == [expected_item(entries["team-b"])]


def test_node_name_from_config_or_environment(tmp_path: pathlib.Path, logs_dir: pathlib.Path) -> None:
    entry = pod_log(logs_dir, "web-1", content="x\n")
    base = {"addr": "127.0.0.1:0", "container-logs-dir": str(logs_dir), "auth-mode": "none"}
    cases = [("env only", {}, {"NODE_NAME": "node-from-env"}, "node-from-env"),
             ("config beats env", {"node-name": "node-from-config"}, {"NODE_NAME": "node-from-env"},
              "node-from-config"),
             ("neither", {}, {"NODE_NAME": ""}, "")]
    for i, (what, settings, env, want) in enumerate(cases):
        config = write_config(tmp_path / f"node-{i}.yaml", {**base, **settings})
        agent = AgentProcess(["serve", "--config", str(config)], env=env)
        try:
            agent.wait_serving()
            with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
                got = list_items(pb_grpc.LogMetadataServiceStub(channel))
            assert got == [expected_item(entry, node=want)], what
        finally:
            agent.kill()


@pytest.mark.parametrize("method", ["List", "Watch"])
def test_malformed_request_is_invalid_argument(meta_agent, meta_channel: grpc.Channel, method: str) -> None:
    path = f"/cluster_agent.LogMetadataService/{method}"
    for garbage in (b"\x0a\xff\xff\xff", b"\x0a\x02\xc3\x28", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
                    b"\x0b"):
        if method == "List":
            call = meta_channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        else:
            call = meta_channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        code, details = rpc_error(lambda call=call, garbage=garbage: call(garbage, timeout=WAIT))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (garbage, code, details)
    assert meta_agent.proc.poll() is None
    assert quiet_errors(meta_agent) == []


# =============================================================================================
# Watch
# =============================================================================================


def test_watch_add_write_delete(logs_dir: pathlib.Path, meta_agent, stub, prober, watches) -> None:
    """No snapshot; a created entry is ADDED, then a write to its file MODIFIED, then its removal
    DELETED (fileInfo empty) — one event per change, nothing duplicated afterwards. For a relative
    symlink, an absolute one and a plain file, one after the other."""
    existing = pod_log(logs_dir, "existing", content="old\n")
    stream = open_watch(watches, stub)
    assert sync(prober, [stream]) == [[]]  # no snapshot of `existing`

    layouts = {"relative-link": lambda: pod_log(logs_dir, "rel-1"),
               "absolute-link": lambda: pod_log(logs_dir, "abs-1", relative=False),
               "plain-file": lambda: plain_log(logs_dir, "plain-1")}
    for layout, make in layouts.items():
        entry = make()  # created empty, then written: ADDED, then MODIFIED
        assert stream.take(1) == [added(entry)], layout
        mtime = state(entry.link)[1]
        assert stream.raw[-1].object == pb.LogMetadata(
            id=CID, spec=pb.LogMetadataSpec(node_name=NODE, namespace="default", pod_name=entry.pod,
                                            container_name="app", container_id=CID),
            fileInfo=pb.LogMetadataFileInfo(size=0, last_modified_at={"seconds": mtime // 10**9,
                                                                      "nanos": mtime % 10**9})), layout

        append(entry.target, "2024-05-01T10:00:00Z stdout F hello\n")
        assert stream.take(1) == [modified(entry)], layout

        if layout == "plain-file":
            entry.link.unlink()
        else:
            remove_pod_log(entry)
        assert stream.take(1) == [deleted(entry)], layout
        assert not stream.raw[-1].object.HasField("fileInfo")

    time.sleep(SETTLE)  # any trailing event of a debounce window would be out by now
    assert sync(prober, [stream]) == [[]]
    assert existing.link.exists()


def test_watch_created_then_written_plain_file_with_raw_events(logs_dir: pathlib.Path, meta_agent, stub, prober,
                                                               watches) -> None:
    """Many raw inotify events per change (CREATE, OPEN, MODIFY, CLOSE_WRITE, ATTRIB, …) make one
    event each: create + chmod + utime of a new file is one ADDED; then several writes through one
    handle plus a close are MODIFIED once (leading), then at most once more (trailing) with the
    final state."""
    stream = open_watch(watches, stub)
    sync(prober, [stream])
    path = logs_dir / entry_name("web-1", "default", "app", CID)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    os.close(fd)
    entry = Entry(path, path, "web-1", "default", "app", CID)
    assert stream.take(1) == [added(entry)]
    first = stream.raw[-1].object.fileInfo.size
    assert first == 0
    with open(path, "a") as handle:
        handle.write("line 1\n")
        handle.flush()
        event = stream.take(1)[0]
        assert event[:2] == ("MODIFIED", entry.name)
        handle.write("line 2\n")
        handle.flush()
    os.chmod(path, 0o644)  # ATTRIB, no change of size or mtime
    events = stream.until(lambda e: (e.size, e.mtime_ns) == state(path), "MODIFIED with the final state")
    assert [e[:2] for e in events] == [("MODIFIED", entry.name)]
    time.sleep(SETTLE)
    assert sync(prober, [stream]) == [[]]


def test_watch_target_removed_before_link(logs_dir: pathlib.Path, meta_agent, stub, prober, watches) -> None:
    """The runtime's file goes first, the symlink later: one DELETED, nothing for the link."""
    entry = pod_log(logs_dir, "web-1", content="x\n")
    stream = open_watch(watches, stub)
    sync(prober, [stream])
    shutil.rmtree(entry.target.parent.parent)
    assert stream.take(1) == [deleted(entry)]
    entry.link.unlink()
    time.sleep(1.0)  # room for a wrong second DELETED (the agent re-checks dangling links)
    assert sync(prober, [stream]) == [[]]


def test_watch_dangling_link_is_added_when_its_file_appears(logs_dir: pathlib.Path, meta_agent, stub, prober,
                                                           watches) -> None:
    stream = open_watch(watches, stub)
    sync(prober, [stream])
    entry = pod_log(logs_dir, "web-1", link=False)
    entry.target.unlink()
    entry.link.symlink_to(os.path.relpath(entry.target, logs_dir))  # dangling: not an item yet
    assert sync(prober, [stream]) == [[]]
    assert list_items(stub, ["default"]) == []
    entry.target.write_text("now it exists\n")
    assert stream.take(1) == [added(entry)]
    assert list_items(stub, ["default"]) == [expected_item(entry)]


def test_watch_ignores_non_matching_names(logs_dir: pathlib.Path, meta_agent, stub, prober, watches) -> None:
    stream = open_watch(watches, stub)
    sync(prober, [stream])
    for name in ("README", "web-1_default_app.log", "web-1_default_app-c1d2.log.20240501-100000",
                 "web-1_default_app-c1d2.log.tmp"):
        (logs_dir / name).write_text("x\n")
        append(logs_dir / name, "more\n")
    (logs_dir / "README").unlink()
    assert sync(prober, [stream]) == [[]]


def test_watch_follows_kubelet_rotation(logs_dir: pathlib.Path, meta_agent, stub, prober, watches) -> None:
    """kubelet renames 0.log to 0.log.<timestamp>; the runtime reopens, creating a new 0.log — at
    once (`quick`) or after a moment (`paused`, 0.3 s). The entry exists throughout: its events are
    MODIFIED only (never DELETED/ADDED), and writes to the new file are reported for the same
    entry with the new file's size and mtime."""
    quick = pod_log(logs_dir, "quick", content="before rotation\n" * 100)
    paused = pod_log(logs_dir, "paused", content="before rotation\n" * 50)
    stream = open_watch(watches, stub)
    sync(prober, [stream])
    pid = meta_agent.proc.pid

    def rename(entry: Entry) -> None:
        with open(entry.target, "a") as runtime:  # the runtime's handle: written before and after
            runtime.write("last line of the old file\n")
            runtime.flush()
            os.rename(entry.target, entry.target.with_name("0.log.20240501-100000"))
            runtime.write("written to the renamed file\n")

    def reopen(entry: Entry) -> None:
        with open(entry.target, "x") as runtime:
            runtime.write("first line of the new file\n")

    rename(quick)
    reopen(quick)
    rename(paused)
    time.sleep(0.3)
    reopen(paused)
    finals = {entry.name: (entry.name, *state(entry.target)) for entry in (quick, paused)}
    events: list[Ev] = []
    pending = set(finals)
    while pending:
        events += stream.until(lambda e: e.name in pending and (e.name, e.size, e.mtime_ns) == finals[e.name],
                               f"the new files' state for {sorted(pending)}")
        pending.discard(events[-1].name)
    # Checked at the end, so that a failure here still shows whether the rest works.
    not_modified = {entry.pod: [e for e in events if e.name == entry.name and e.type != "MODIFIED"]
                    for entry in (quick, paused)}
    for entry in (quick, paused):
        mine = [e for e in events if e.name == entry.name]
        assert len(mine) <= 2, mine  # the write before the rename (leading), the new file (trailing)
    # Writes to the rotated-away files are not the entries' any more.
    append(quick.target.with_name("0.log.20240501-100000"), "late write to the rotated file\n")
    time.sleep(SETTLE)
    assert sync(prober, [stream]) == [[]]

    # The watch moved to the new file: a later write is reported (the window closed: at once).
    for entry in (quick, paused):
        append(entry.target, "second line of the new file\n")
        assert stream.take(1) == [modified(entry)]
    # The old files are not watched any more, the new ones are: still one watch per entry.
    wait_until(lambda: inotify_watches(pid) == expected_watches(logs_dir),
               f"{expected_watches(logs_dir)} watches (now {inotify_watches(pid)})")
    assert not_modified == {"quick": [], "paused": []}, "the entry never disappeared: no DELETED/ADDED"


def test_watch_copytruncate_and_rewrite_report_the_size(logs_dir: pathlib.Path, meta_agent, stub, prober,
                                                        watches) -> None:
    entry = pod_log(logs_dir, "web-1", content="x" * 1000)
    stream = open_watch(watches, stub)
    sync(prober, [stream])
    os.truncate(entry.target, 0)
    assert stream.take(1) == [modified(entry)]
    assert stream.raw[-1].object.fileInfo.size == 0
    time.sleep(SETTLE)
    assert sync(prober, [stream]) == [[]]


def test_watch_namespace_filter(logs_dir: pathlib.Path, meta_agent, stub, prober, watches) -> None:
    only_a = open_watch(watches, stub, ["team-a"])
    only_b = open_watch(watches, stub, ["", "team-b"])  # empty strings ignored
    every = open_watch(watches, stub, [])
    every_blank = open_watch(watches, stub, [""])  # only empty strings: all namespaces
    both = open_watch(watches, stub, ["team-a", "team-b"])
    none_here = open_watch(watches, stub, ["team-z"])
    see_a = [only_a, every_blank, both]  # streams that see team-a (probes are made there), but `every`
    sync(prober, see_a + [every], namespace="team-a")
    sync(prober, [only_b], namespace="team-b")
    sync(prober, [none_here], namespace="team-z")

    # Each change is seen by `every` before the next is made, so none is folded into another.
    seen: list[Ev] = []

    def step(want: Ev) -> Ev:
        got = every.until(lambda e: e == want, f"{want} on the unfiltered stream")
        seen.extend(e for e in got if not is_probe(e))
        return want

    b1 = pod_log(logs_dir, "b1", "team-b", content="b\n")
    b1_added = step(added(b1))
    a1 = pod_log(logs_dir, "a1", "team-a", content="a\n")
    a1_added = step(added(a1))
    c1 = pod_log(logs_dir, "c1", "default", content="c\n")
    c1_added = step(added(c1))
    append(b1.target, "more b\n")
    b1_modified = step(modified(b1))
    remove_pod_log(a1)
    a1_deleted = step(deleted(a1))
    seen.extend(sync(prober, [every], namespace="team-a")[0])

    assert seen == [b1_added, a1_added, c1_added, b1_modified, a1_deleted]
    assert sync(prober, see_a, namespace="team-a") == [
        [a1_added, a1_deleted],
        [b1_added, a1_added, c1_added, b1_modified, a1_deleted],
        [b1_added, a1_added, b1_modified, a1_deleted],
    ]
    assert sync(prober, [only_b], namespace="team-b") == [[b1_added, b1_modified]]
    assert sync(prober, [none_here], namespace="team-z") == [[]]


def test_watch_debounce_burst(logs_dir: pathlib.Path, meta_agent, stub, prober, watches) -> None:
    """1,000 writes to one file within about a second: at most 2 MODIFIED (leading + trailing),
    the last with the final size and mtime. Files debounce independently: another file written
    during the first one's window is reported at once, before the first one's trailing event."""
    busy = pod_log(logs_dir, "busy", content="start\n")
    other = pod_log(logs_dir, "other", content="start\n")
    stream = open_watch(watches, stub)
    sync(prober, [stream])
    writes = 1000
    other_state: tuple[int, int] | None = None
    started = time.monotonic()
    with open(busy.target, "a") as runtime:
        for i in range(writes):
            runtime.write(f"2024-05-01T10:00:00.{i:09d}Z stdout F burst line {i}\n")
            runtime.flush()  # one write(2) each
            if i == writes // 2:
                append(other.target, "a single write to another file\n")
                other_state = state(other.target)
            # paced to about 1 s in all (never more than the write itself when running late)
            time.sleep(max(0.0, started + (i + 1) * 0.001 - time.monotonic()))
    burst_s = time.monotonic() - started
    final = state(busy.target)

    events = stream.until(lambda e: e.name == busy.name and (e.size, e.mtime_ns) == final,
                          "MODIFIED with the burst's final state")
    time.sleep(SETTLE)  # a further (wrong) trailing event would come out by now
    events += sync(prober, [stream])[0]
    busy_events = [e for e in events if e.name == busy.name]
    assert {e.type for e in busy_events} == {"MODIFIED"}
    # Leading + trailing: at most 2 for a burst shorter than the window. (Were the test itself
    # slowed down past the window, the agent may send one more per window it spanned.)
    assert len(busy_events) <= 2 + int(burst_s // DEBOUNCE_S), (burst_s, busy_events)
    assert (busy_events[-1].size, busy_events[-1].mtime_ns) == final
    # Leading: the first event came while the burst was still going (a size before the final).
    assert busy_events[0].size < final[0], busy_events
    # Independent windows: `other` was reported at once, between busy's leading and trailing.
    assert other_state is not None
    assert [e for e in events if e.name == other.name] == [Ev("MODIFIED", other.name, *other_state)]
    assert events.index(Ev("MODIFIED", other.name, *other_state)) < events.index(busy_events[-1])
    assert events.index(busy_events[0]) < events.index(Ev("MODIFIED", other.name, *other_state))


def test_watch_two_concurrent_streams_both_receive(logs_dir: pathlib.Path, meta_agent, stub, prober,
                                                   watches) -> None:
    first, second = open_watch(watches, stub), open_watch(watches, stub)
    sync(prober, [first, second])
    entry = pod_log(logs_dir, "web-1", content="")
    want = [added(entry)]
    assert first.take(1) == want and second.take(1) == want
    append(entry.target, "hello\n")
    want = [modified(entry)]
    assert first.take(1) == want and second.take(1) == want
    remove_pod_log(entry)
    assert first.take(1) == [deleted(entry)] and second.take(1) == [deleted(entry)]
    # One stream cancelled: the other keeps receiving.
    first.cancel()
    again = pod_log(logs_dir, "web-2", content="x\n")
    assert second.take(1) == [added(again)]


def test_watch_missing_directory_is_not_found(start_agent, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "missing" / "containers"
    agent = start_agent(missing)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        stub = pb_grpc.LogMetadataServiceStub(channel)
        code, details = rpc_error(lambda: stub.Watch(pb.LogMetadataWatchRequest(), timeout=WAIT))
        assert code == grpc.StatusCode.NOT_FOUND
        assert str(missing) in details
    assert inotify_watches(agent.proc.pid) == 0
    assert quiet_errors(agent) == []


def test_watches_are_shared_by_all_streams(logs_dir: pathlib.Path, meta_agent, stub, prober, watches) -> None:
    """One inotify instance; one watch on the logs directory plus one per distinct file the entries
    resolve to — the same for 1 stream as for 100, and none once the last stream is gone."""
    files = 30
    entries = [pod_log(logs_dir, f"web-{i}", content=f"{i}\n") for i in range(files)]
    # Two entries resolving to one file (e.g. a stale and a fresh link) share its watch.
    (logs_dir / entry_name("web-0", "default", "app", "feedbeef")).symlink_to(entries[0].target)
    pid = meta_agent.proc.pid
    assert inotify_watches(pid) == 0  # nobody watching: nothing watched

    first = open_watch(watches, stub)
    sync(prober, [first])
    one_stream = inotify_watches(pid)
    assert one_stream == expected_watches(logs_dir) == 1 + files + len(prober.paths)
    assert len(inotify_fds(pid)) == 1

    # 99 more clients: 10 connections (channels) with about 10 streams each, some filtered.
    with contextlib.ExitStack() as stack:
        channels = [stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{meta_agent.port}")) for _ in range(10)]
        stubs = [pb_grpc.LogMetadataServiceStub(channel) for channel in channels]
        streams = [first] + [open_watch(watches, stubs[i % 10], [] if i % 2 else ["default", "probe"])
                             for i in range(99)]
        shared_by_100(meta_agent, logs_dir, prober, streams, entries)


def shared_by_100(meta_agent: AgentProcess, logs_dir: pathlib.Path, prober: Prober, streams: list[Watch],
                  entries: list[Entry]) -> None:
    pid = meta_agent.proc.pid
    files = len(entries)
    sync(prober, streams)
    assert inotify_watches(pid) == expected_watches(logs_dir) == 1 + files + len(prober.paths)
    assert len(inotify_fds(pid)) == 1

    # All 100 streams are served by those watches.
    newcomer = pod_log(logs_dir, "newcomer", content="n\n")
    for stream in streams:
        assert stream.take(1) == [added(newcomer)]
    append(entries[7].target, "hello\n")
    for stream in streams:
        assert stream.take(1) == [modified(entries[7])]
    assert inotify_watches(pid) == expected_watches(logs_dir) == 2 + files + len(prober.paths)

    for stream in streams:
        stream.cancel()
    wait_until(lambda: inotify_watches(pid) == 0, f"no watch once every stream is gone (now {inotify_watches(pid)})")


def test_watch_limit_is_resource_exhausted(logs_dir: pathlib.Path, meta_agent, stub, prober, watches) -> None:
    """fs.inotify.max_user_watches reached: RESOURCE_EXHAUSTED naming the sysctl, logged, and the
    stream ends — never a partial watch, never a crash. Also when the limit is hit by a file that
    appears while streams are live. The sysctl is restored whatever happens."""
    if not os.access(SYSCTL, os.W_OK):
        pytest.skip(f"{SYSCTL} is not writable here (needs root and a writable /proc/sys)")
    original = SYSCTL.read_text().strip()
    try:
        SYSCTL.write_text(original)
    except OSError as exc:
        pytest.skip(f"{SYSCTL} is not writable here: {exc}")
    files = 40
    for i in range(files):
        pod_log(logs_dir, f"web-{i}", content="x\n")
    pid = meta_agent.proc.pid
    uid = os.stat(f"/proc/{pid}").st_uid
    try:
        # Room for the directory and half the files: the agent cannot watch them all.
        SYSCTL.write_text(str(user_watches(uid) + files // 2))
        stream = open_watch(watches, stub)
        (code, details), events = stream.status()
        SYSCTL.write_text(original)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert "fs.inotify.max_user_watches" in details
        assert events == []
    finally:
        SYSCTL.write_text(original)
    assert SYSCTL.read_text().strip() == original
    wait_until(lambda: inotify_watches(pid) == 0, "the watches taken before the limit are released")
    logged = [e for e in meta_agent.events() if e.get("level") == "error"]
    assert logged and "max_user_watches" in json.dumps(logged), meta_agent.lines[-5:]
    # It failed part-way (the directory and some files were watched already), and let them go.
    assert str(logs_dir.parent / "pods") in json.dumps(logged)
    assert meta_agent.proc.poll() is None
    assert len(list_items(stub)) == files  # List is unaffected

    # Live streams, then a new file that cannot be watched: every stream ends with the error.
    streams = [open_watch(watches, stub), open_watch(watches, stub)]
    sync(prober, streams)
    try:
        SYSCTL.write_text(str(user_watches(uid)))  # no room for one more watch
        pod_log(logs_dir, "one-too-many", content="x\n")
        ends = [stream.status() for stream in streams]
        SYSCTL.write_text(original)
    finally:
        SYSCTL.write_text(original)
    for (code, details), _events in ends:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert "fs.inotify.max_user_watches" in details
    wait_until(lambda: inotify_watches(pid) == 0, "every watch released after the failure")
    assert meta_agent.proc.poll() is None

    # With the limit back, Watch works again and sees everything.
    stream = open_watch(watches, stub)
    sync(prober, [stream])
    assert inotify_watches(pid) == expected_watches(logs_dir)
    late = pod_log(logs_dir, "late", content="x\n")
    assert stream.take(1) == [added(late)]


def test_cancelled_streams_release_everything(logs_dir: pathlib.Path, meta_agent, stub, prober) -> None:
    """fds, threads and inotify watches return to the baseline after many cancelled streams,
    including streams cancelled while a debounce window was open."""
    entries = [pod_log(logs_dir, f"web-{i}", content="x\n") for i in range(10)]
    pid = meta_agent.proc.pid

    def cycle(streams: int, write: int | None) -> None:
        opened = [Watch(stub, [] if i % 2 else ["default", "probe"]) for i in range(streams)]
        try:
            sync(prober, opened)
            if write is not None:  # opens a debounce window (and a timer) that the cancel must drop
                append(entries[write % len(entries)].target, "ping\n")
                for stream in opened:
                    assert stream.take(1)[0].type == "MODIFIED"
                append(entries[write % len(entries)].target, "ping again\n")
        finally:
            for stream in opened:
                stream.cancel()
        wait_until(lambda: inotify_watches(pid) == 0, "watches released after the cancel")
        prober.clear()

    cycle(1, None)  # warm-up: the inotify instance and gRPC's threads are created on first use
    cycle(3, 0)
    fds, threads = fd_count(pid), thread_count(pid)
    for i in range(100):
        cycle(1, i if i % 3 == 0 else None)
    for i in range(4):
        cycle(25, i)
    wait_until(lambda: fd_count(pid) <= fds and thread_count(pid) <= threads,
               f"fds back to {fds} and threads back to {threads} "
               f"(now {fd_count(pid)} fds, {thread_count(pid)} threads)")
    assert inotify_watches(pid) == 0
    assert quiet_errors(meta_agent) == []
    # Still healthy: a fresh stream works.
    stream = Watch(stub)
    try:
        sync(prober, [stream])
        append(entries[1].target, "still alive\n")
        assert stream.until(lambda e: e.name == entries[1].name, "MODIFIED")[-1].type == "MODIFIED"
    finally:
        stream.cancel()


def test_shutdown_ends_watch_with_unavailable(start_agent, logs_dir: pathlib.Path, prober) -> None:
    pod_log(logs_dir, "web-1", content="x\n")
    agent = start_agent(logs_dir, shutdown_timeout="60s")  # the stop must not wait for it
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        stub = pb_grpc.LogMetadataServiceStub(channel)
        streams = [Watch(stub), Watch(stub, ["default", "probe"])]
        try:
            sync(prober, streams)
            agent.proc.send_signal(signal.SIGTERM)
            for stream in streams:
                (code, details), events = stream.status()
                assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
                assert "shutting down" in details
                assert events == []
            assert agent.proc.wait(WAIT) == 0
        finally:
            for stream in streams:
                stream.cancel()
    assert any(event.get("msg") == "stopped" for event in agent.events()), agent.lines[-5:]
    assert quiet_errors(agent) == []


def test_watch_starts_while_files_vanish(logs_dir: pathlib.Path, meta_agent, stub, prober) -> None:
    """A file that disappears while a Watch is starting is skipped, as List skips it: the stream
    still comes up (the first subscriber makes the agent scan and watch every entry)."""
    stop = threading.Event()
    thread = threading.Thread(target=churn_entries, args=(logs_dir, stop, [0]), daemon=True)
    thread.start()
    try:
        for _ in range(40):
            stream = Watch(stub)
            try:
                sync(prober, [stream])  # fails if the stream ended (e.g. NOT_FOUND) instead
            finally:
                stream.cancel()
            wait_until(lambda: inotify_watches(meta_agent.proc.pid) == 0, "the watcher stopped")
    finally:
        stop.set()
        thread.join()


def test_watch_leading_edge_after_a_quiet_window(logs_dir: pathlib.Path, meta_agent, stub, prober, watches) -> None:
    """After a window closes with nothing to send, the file is quiet again: its next change is
    sent at once, before anything that happens after it (a probe entry), not 2 s later."""
    entry = pod_log(logs_dir, "quiet", content="start\n")
    stream = open_watch(watches, stub)
    sync(prober, [stream])
    append(entry.target, "first\n")  # MODIFY, then CLOSE_WRITE inside the window: trailing, nothing new
    assert stream.take(1) == [Ev("MODIFIED", entry.name, *state(entry.target))]
    time.sleep(SETTLE)  # the window has closed
    append(entry.target, "second\n")
    second = Ev("MODIFIED", entry.name, *state(entry.target))
    assert sync(prober, [stream])[0] == [second]  # before the probe made after the write
