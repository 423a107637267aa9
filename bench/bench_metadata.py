#!/usr/bin/env python3
"""LogMetadataService benchmark: List of 5,000 entries, and Watch fan-out over shared watches.

Not part of the test run. Usage (from the repo root, with the agent installed):

    python bench/bench_metadata.py                      # 5,000 entries, List x 20, Watch 1/10/100
    python bench/bench_metadata.py --files 1000 --streams 1,10
    python bench/bench_metadata.py --profile /tmp/prof  # also py-spy the agent while it repeats List

What it does, in one invocation:

1. Builds a node's layout in a temp dir: --files entries `containers/<pod>_<ns>_<c>-<id>.log`,
   relative symlinks into `pods/<ns>_<pod>_<uid>/<c>/0.log` (one CRI line each, 20 namespaces).
2. Starts the real agent (`python -m kubetail_agent serve -a 127.0.0.1:0 -p container-logs-dir:DIR
   -p auth-mode:none`) and reads its port from the JSON "serving" line on stderr.
3. Times List end to end with a real gRPC client (one untimed call first): --runs calls parsed into
   LogMetadataList, and --runs calls with a raw-bytes deserializer (the agent plus transport only),
   plus a List filtered to one namespace. Best and median.
4. For each stream count: opens that many Watch streams (one channel, a reader thread each), makes
   sure they are live (probe entries), reads the agent's inotify watch count from
   /proc/<pid>/fdinfo, appends one line to every file, and waits until every stream has received a
   MODIFIED for every entry. Then cancels them all and checks that the watches are gone.
5. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import bench_grep as bg  # noqa: E402
import grpc  # noqa: E402

from kubetail_agent_proto import cluster_agent_pb2 as pb  # noqa: E402
from kubetail_agent_proto import cluster_agent_pb2_grpc as pb_grpc  # noqa: E402

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
LIST_TARGET_MS = 150.0
NAMESPACES = 20
PROBE_NS = "probe"


###############################################################################
# Layout ######################################################################
###############################################################################


def build(root: pathlib.Path, files: int) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """`root/containers` with `files` symlinks into `root/pods`; returns it and the targets."""
    logs = root / "containers"
    logs.mkdir()
    targets = []
    for i in range(files):
        namespace = f"ns-{i % NAMESPACES:02d}"
        pod = f"web-{i:05d}-7d4b9c6f5-x2k8p"
        cid = f"{i:08x}" + "c0ffee" * 9 + "abcd"  # 64 hex digits, like containerd's
        directory = root / "pods" / f"{namespace}_{pod}_8d2f5a4e-1c3b-4d5e-9f6a-{i:012x}" / "app"
        directory.mkdir(parents=True)
        target = directory / "0.log"
        target.write_text(f"2024-05-01T10:00:00.000000000Z stdout F started {i}\n")
        (logs / f"{pod}_{namespace}_app-{cid}.log").symlink_to(os.path.relpath(target, logs))
        targets.append(target)
    return logs, targets


###############################################################################
# Agent process ###############################################################
###############################################################################


class Agent(bg.Server):
    """The agent serving `logs`, and what this benchmark reads of it from /proc."""

    def __init__(self, logs: pathlib.Path, log_file: pathlib.Path) -> None:
        super().__init__([sys.executable, "-m", "kubetail_agent", "serve", "-a", "127.0.0.1:0",
                          "-p", f"container-logs-dir:{logs}", "-p", "auth-mode:none"], log_file)

    def rss_mib(self) -> float:
        return self.status_kib("VmRSS")["VmRSS"] / 1024

    def inotify(self) -> tuple[int, int]:
        """(inotify instances, watches) of the agent, from /proc/<pid>/fd and fdinfo."""
        instances = watches = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                if "inotify" not in os.readlink(f"/proc/{self.pid}/fd/{fd}"):
                    continue
                instances += 1
                with open(f"/proc/{self.pid}/fdinfo/{fd}") as handle:
                    watches += sum(1 for row in handle if row.startswith("inotify wd:"))
            except FileNotFoundError:
                continue
        return instances, watches

    def errors(self) -> list[str]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                out.append(line)
                continue
            if event.get("level") not in ("debug", "info") and not event.get("msg", "").startswith("AUTH-MODE"):
                out.append(line)
        return out


###############################################################################
# List ########################################################################
###############################################################################


def time_calls(call, runs: int) -> list[float]:
    call()  # untimed: connection, first-use imports in the agent
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


###############################################################################
# Watch #######################################################################
###############################################################################


class Stream:
    """A Watch stream read by a thread: the entries it got MODIFIED for, and probes seen."""

    def __init__(self, stub: pb_grpc.LogMetadataServiceStub) -> None:
        self.call = stub.Watch(pb.LogMetadataWatchRequest(), timeout=3600)
        self.lock = threading.Lock()
        self.modified: set[str] = set()
        self.probes = 0
        self.events = 0
        self.error: str | None = None
        self.done = threading.Event()
        self.want = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events += 1
                if event.object.spec.namespace == PROBE_NS:
                    self.probes += 1
                    continue
                if event.type == "MODIFIED":
                    self.modified.add(event.object.id)
                    if self.want and len(self.modified) >= self.want:
                        self.done.set()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code()} {exc.details()}"
            self.done.set()

    def cancel(self) -> None:
        self.call.cancel()
        self.thread.join(10)


def make_live(logs: pathlib.Path, streams: list[Stream], timeout: float = 60) -> list[pathlib.Path]:
    """Probe entries until every stream has reported one (a Watch has no snapshot)."""
    probes = []
    deadline = time.monotonic() + timeout
    while any(s.probes == 0 for s in streams):
        if time.monotonic() > deadline:
            raise RuntimeError("Watch streams did not become live")
        path = logs / f"probe-{len(probes)}_{PROBE_NS}_p-{len(probes):04x}.log"
        path.write_text("")
        probes.append(path)
        time.sleep(0.05)
    return probes


def watch_round(agent: Agent, logs: pathlib.Path, targets: list[pathlib.Path], count: int,
                round_no: int) -> dict[str, object]:
    files = len(targets)
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}",
                               options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.LogMetadataServiceStub(channel)
        opened = time.perf_counter()
        streams = [Stream(stub) for _ in range(count)]
        probes = make_live(logs, streams)
        live_s = time.perf_counter() - opened
        for path in probes:  # their watches go; the count below is the entries' alone
            path.unlink()
        expected = 1 + files  # the logs directory + one per file an entry resolves to
        deadline = time.monotonic() + 30
        while agent.inotify()[1] != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        instances, watches = agent.inotify()
        for stream in streams:
            stream.want = files
        cpu0 = agent.cpu_seconds()
        started = time.perf_counter()
        for target in targets:
            with open(target, "a") as handle:
                handle.write(f"2024-05-01T10:00:{round_no:02d}.000000000Z stdout F round {round_no}\n")
        written_s = time.perf_counter() - started
        deadline = time.monotonic() + 600
        for stream in streams:
            stream.done.wait(max(0.0, deadline - time.monotonic()))
        delivered_s = time.perf_counter() - started
        cpu = agent.cpu_seconds() - cpu0
        complete = sum(1 for s in streams if len(s.modified) == files)
        errors = [s.error for s in streams if s.error]
        rss = agent.rss_mib()
        for stream in streams:
            stream.cancel()
    deadline = time.monotonic() + 30
    while agent.inotify()[1] != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"streams": count, "instances": instances, "watches": watches, "expected": expected,
            "live_s": live_s, "written_s": written_s, "delivered_s": delivered_s, "cpu_s": cpu,
            "complete": complete, "errors": errors, "rss": rss,
            "after_cancel": agent.inotify()[1]}


###############################################################################
# Profile #####################################################################
###############################################################################


def profile_list(agent: Agent, stub: pb_grpc.LogMetadataServiceStub, directory: str, seconds: float) -> None:
    py_spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "list.txt"
    spy = subprocess.Popen([py_spy, "record", "--pid", str(agent.pid), "--format", "raw", "--rate", "500",
                            "--output", str(raw), "--duration", str(int(seconds) + 2)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    end = time.monotonic() + seconds
    calls = 0
    while time.monotonic() < end:
        stub.List(pb.LogMetadataListRequest(), timeout=60)
        calls += 1
    _, err = spy.communicate(timeout=60)
    if spy.returncode != 0:
        print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
        return
    print(f"\npy-spy: {calls} List calls profiled into {raw}; top frames by own samples:\n")
    own: dict[str, int] = {}
    total = 0
    for row in raw.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        if not any("List" in f or "list_log_files" in f or "metadata_message" in f for f in frames):
            continue
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {100 * n / max(total, 1):5.1f}%  {frame}")


###############################################################################
# Main ########################################################################
###############################################################################


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--streams", default="1,10,100")
    parser.add_argument("--profile", metavar="DIR", help="py-spy record the agent while it repeats List")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.streams.split(",") if c]

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench-metadata-"))
    agent = None
    try:
        t0 = time.perf_counter()
        logs, targets = build(root, args.files)
        print(f"built {args.files} entries in {time.perf_counter() - t0:.1f} s under {root}", file=sys.stderr)
        agent = Agent(logs, root / "agent.log")
        with grpc.insecure_channel(f"127.0.0.1:{agent.port}",
                                   options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            stub = pb_grpc.LogMetadataServiceStub(channel)
            raw_list = channel.unary_unary("/cluster_agent.LogMetadataService/List",
                                           request_serializer=pb.LogMetadataListRequest.SerializeToString,
                                           response_deserializer=None)
            reply = stub.List(pb.LogMetadataListRequest(), timeout=60)
            if len(reply.items) != args.files:
                raise RuntimeError(f"List returned {len(reply.items)} items, not {args.files}")
            size = len(reply.SerializeToString())
            cpu0 = agent.cpu_seconds()
            parsed = time_calls(lambda: stub.List(pb.LogMetadataListRequest(), timeout=60), args.runs)
            cpu_parsed = (agent.cpu_seconds() - cpu0) / (args.runs + 1)
            raw = time_calls(lambda: raw_list(pb.LogMetadataListRequest(), timeout=60), args.runs)
            one_ns = time_calls(lambda: stub.List(pb.LogMetadataListRequest(namespaces=["ns-07"]), timeout=60),
                                args.runs)
            if args.profile:
                profile_list(agent, stub, args.profile, 10)
        rounds = []
        for i, count in enumerate(counts):
            print(f"watch round: {count} stream(s)…", file=sys.stderr, flush=True)
            rounds.append(watch_round(agent, logs, targets, count, i + 1))
        errors = agent.errors()
    finally:
        if agent is not None:
            agent.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    dirty = subprocess.run(["git", "diff", "--quiet", "--", "kubetail_agent.py"], cwd=REPO).returncode != 0
    print(f"\n### LogMetadataService, {args.files} entries (commit {commit.strip()}{'-dirty' if dirty else ''}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]})\n")
    print("| measure | best | median | target |")
    print("|---|---|---|---|")
    verdict = "✅" if min(parsed) * 1000 <= LIST_TARGET_MS else "❌"
    print(f"| List, all {args.files} items, parsed by the client ({size / 1024:.0f} KiB reply) | "
          f"{ms(min(parsed))} | {ms(statistics.median(parsed))} | ≤ {LIST_TARGET_MS:.0f} ms {verdict} |")
    print(f"| List, raw reply bytes (agent + transport only) | {ms(min(raw))} | {ms(statistics.median(raw))} | |")
    print(f"| List, one namespace ({args.files // NAMESPACES} items) | {ms(min(one_ns))} | "
          f"{ms(statistics.median(one_ns))} | |")
    print(f"| agent CPU per full List | {ms(cpu_parsed)} | | |")
    print()
    print("| Watch streams | inotify instances | inotify watches (entries + dir) | all MODIFIED received "
          "| append → last event | agent CPU | agent RSS | watches after cancel |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rounds:
        ok = "✅" if r["watches"] == r["expected"] else "❌"
        got = f"{r['complete']}/{r['streams']} streams × {args.files}"
        if r["errors"]:
            got += f" ⚠ {r['errors'][0]}"
        print(f"| {r['streams']} | {r['instances']} | {r['watches']} (= {r['expected']} {ok}) | {got} | "
              f"{r['delivered_s']:.2f} s | {r['cpu_s']:.2f} s | {r['rss']:.0f} MiB | {r['after_cancel']} |")
    if errors:
        print("\nagent logged above info:\n" + "\n".join(errors[:10]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
