#!/usr/bin/env python3
"""Grep and transport benchmark: the agent end-to-end versus `rg -c` and a bare grpcio server.

Not part of the test run. Usage (from the repo root, with the agent installed):

    python bench/bench_grep.py                 # 512 MiB file, 5 runs per case
    python bench/bench_grep.py --size-mib 64 --runs 3 --threads 2
    python bench/bench_grep.py --only a,c --profile /tmp/prof   # also py-spy each case

What it does, in one invocation:

1. Generates (once; cached under bench/data/, which is gitignored) a deterministic CRI log
   file of --size-mib MiB with planted patterns of known frequency, and a 200,000-line file.
2. Warms the page cache, then for each grep case times `rg -c PATTERN FILE` and the agent
   (a real `kubetail-agent serve` subprocess, a real gRPC client calling StreamForward with
   follow_from=NOOP and the grep) on the same file: best of --runs, with both match counts.
3. Times an unfiltered StreamForward of the 200,000-line file against a minimal grpc.aio
   server (also a subprocess) that streams the same records pre-serialized: the transport
   ceiling.
4. Prints a markdown table with the ratios and the targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

# gRPC's C core logs connection teardown (GOAWAY) at INFO on stderr; keep the output a table.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
DATA = BENCH / "data"
GENERATOR_VERSION = 2  # bump when the generator changes: cached files are regenerated

NAMESPACE = "bench"
POD = "web-7d4b9c6f5-x2k8p"
CONTAINER = "app"
CID_BIG = "b" * 64
CID_SMALL = "5" * 64
UNFILTERED_LINES = 200_000

# (key, label, pattern, target ratio agent/rg or None, planted-count key)
CASES = [
    ("a", "rare literal", "SIGSEGV", 1.0, "rare"),
    ("b", "(?i) literal", "(?i)timeout", 1.6, "ci"),
    ("c", "class-only regex", r"[a-z]+\d{3}[A-Z]", 0.8, "cls"),
    ("d", "word on ~30% of lines", "INFO", None, "word"),
]
UNFILTERED_TARGET = 0.95  # agent records/s >= 95 % of the ceiling's


###############################################################################
# Data ########################################################################
###############################################################################

_METHODS = ["GET"] * 6 + ["POST"] * 2 + ["PUT", "DELETE", "PATCH"]
_STATUS = [200] * 14 + [201, 204, 301, 304, 400, 401, 403, 404, 404, 500, 502, 503]
_AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "kube-probe/1.29", "curl/8.5.0", "Go-http-client/1.1", "python-requests/2.31.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4",
]
_COMPONENTS = ["api", "billing", "cart", "checkout", "inventory", "auth", "scheduler", "worker", "gateway"]
_MESSAGES = [
    "request completed", "order processed", "cache miss, loading from database", "user session refreshed",
    "payment authorized", "retrying call to upstream", "reconciling deployment", "queue depth above watermark",
    "connection pool exhausted, waiting for a free connection", "token validated", "leader lease renewed",
    "processed batch of events", "feature flag evaluated", "metrics flushed to collector",
]
_JAVA_CLASSES = ["c.e.s.OrderService", "c.e.s.PaymentClient", "o.s.w.s.DispatcherServlet", "c.e.r.CartRepository",
                 "c.e.s.InventoryService", "o.h.e.j.s.SqlExceptionHelper"]
_LOWER_LEVELS = ["debug", "debug", "info", "info", "info", "warn", "error"]
_OTHER_LEVELS = ["DEBUG", "DEBUG", "DEBUG", "WARN", "WARN", "ERROR"]
_TIMEOUTS = [
    "upstream timeout after 30s while reading response header",
    "Timeout waiting for lease renewal, giving up leadership",
    "context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
    "TIMEOUT acquiring row lock on table orders",
]
_CLASS_PREFIXES = ["sku", "ord", "inv", "lot", "bin"]
_UPPER = "ABCDEFGHJKLMNPQRSTUVWXYZ"


class Generator:
    """Deterministic, realistic CRI lines; counts the lines that carry each planted pattern.

    Planted: "SIGSEGV" on 8 lines spread over the file (a), "timeout" in mixed case on ~1 in
    5,000 lines (b), tokens like "sku482Q" on ~1 in 1,800 (c), the word "INFO" on 30 % (d).
    Nothing else in the generated text matches any of the four patterns (the table shows the
    planted counts next to rg's and the agent's).

    (b) and (c) are kept rare on purpose: they measure the scan, and every record that crosses
    gRPC costs the (Python) client and server tens of microseconds; (d) and the unfiltered
    stream measure that per-record cost.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ts_ns = int(datetime.datetime(2024, 5, 1, 10, tzinfo=datetime.UTC).timestamp()) * 10**9
        self._second = -1
        self._prefix = ""
        self.counts = {"lines": 0, "rare": 0, "ci": 0, "cls": 0, "word": 0}

    def _timestamp(self) -> str:
        self.ts_ns += self.rng.randrange(20_000, 400_000)
        seconds, nanos = divmod(self.ts_ns, 10**9)
        if seconds != self._second:
            self._second = seconds
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        return f"{self._prefix}.{nanos:09d}Z"

    def _extra(self, json_style: bool = False) -> str:
        """Key-values; 1 in 1,500 carry a class-only token (c), 1 in 4,000 a timeout (b)."""
        rng = self.rng
        roll = rng.random()
        if roll < 1 / 1500:
            self.counts["cls"] += 1
            token = f"{rng.choice(_CLASS_PREFIXES)}{rng.randrange(100, 1000)}{rng.choice(_UPPER)}"
            pairs = [("item", token), ("qty", rng.randrange(1, 9)), ("warehouse", f"eu-west-{rng.randrange(1, 4)}")]
        elif roll < 1 / 1500 + 1 / 4000:
            self.counts["ci"] += 1
            pairs = [("error", rng.choice(_TIMEOUTS))]
        else:
            pairs = [("duration_ms", rng.randrange(1, 900)), ("bytes", rng.randrange(100, 90000))]
        if json_style:
            return "".join(f",\"{k}\":" + (f"\"{v}\"" if isinstance(v, str) else str(v)) for k, v in pairs)
        return "".join(f" {k}=" + (f"\"{v}\"" if isinstance(v, str) and " " in v else str(v)) for k, v in pairs)

    def message(self, rare: bool) -> str:
        rng = self.rng
        if rare:
            self.counts["rare"] += 1
            return (f"panic: runtime error: invalid memory address or nil pointer dereference [signal SIGSEGV: "
                    f"segmentation violation code=0x1 addr=0x0 pc=0x{rng.getrandbits(24):06x}]")
        info = rng.random() < 0.30
        if info:
            self.counts["word"] += 1
            kind = rng.randrange(2)
        else:
            kind = rng.randrange(4)
        if kind == 0:  # logfmt
            level = "INFO" if info else rng.choice(_OTHER_LEVELS)
            return (f"level={level} component={rng.choice(_COMPONENTS)} msg=\"{rng.choice(_MESSAGES)}\" "
                    f"request_id={rng.getrandbits(64):016x}" + self._extra())
        if kind == 1:  # Spring Boot
            level = "INFO" if info else rng.choice(_OTHER_LEVELS)
            return (f"{level:>5} 1 --- [nio-8080-exec-{rng.randrange(1, 10)}] {rng.choice(_JAVA_CLASSES):<36}: "
                    f"{rng.choice(_MESSAGES)}" + self._extra())
        if kind == 2:  # nginx access log
            return (f"10.244.{rng.randrange(256)}.{rng.randrange(1, 255)} - - [01/May/2024:10:{rng.randrange(60):02d}:"
                    f"{rng.randrange(60):02d} +0000] \"{rng.choice(_METHODS)} /api/v1/orders/{rng.randrange(100000)}"
                    f"?page={rng.randrange(1, 20)} HTTP/1.1\" {rng.choice(_STATUS)} {rng.randrange(100, 60000)} "
                    f"\"-\" \"{rng.choice(_AGENTS)}\" rt={rng.random():.3f}")
        # zap JSON
        return (f"{{\"level\":\"{rng.choice(_LOWER_LEVELS)}\",\"ts\":{self.ts_ns / 1e9:.6f},"
                f"\"caller\":\"controller/reconcile.go:{rng.randrange(40, 400)}\",\"msg\":\"{rng.choice(_MESSAGES)}\","
                f"\"trace_id\":\"{rng.getrandbits(128):032x}\"" + self._extra(json_style=True) + "}")

    def write(self, path: pathlib.Path, target_bytes: int | None = None, max_lines: int | None = None,
              rare_every: int | None = None) -> dict[str, int]:
        """Write lines until target_bytes or max_lines; a rare line each rare_every bytes."""
        tmp = path.with_suffix(".tmp")
        written = 0
        next_rare = rare_every // 2 if rare_every else None
        stream = ("stdout", "stdout", "stdout", "stderr")
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            batch: list[str] = []
            while True:
                if target_bytes is not None and written >= target_bytes:
                    break
                if max_lines is not None and self.counts["lines"] >= max_lines:
                    break
                rare = next_rare is not None and written >= next_rare
                if rare:
                    next_rare += rare_every
                line = f"{self._timestamp()} {self.rng.choice(stream)} F {self.message(rare)}\n"
                written += len(line)  # ASCII only
                self.counts["lines"] += 1
                batch.append(line)
                if len(batch) >= 20000:
                    out.write("".join(batch))
                    batch.clear()
            out.write("".join(batch))
        tmp.rename(path)
        return dict(self.counts)


def ensure_file(name: str, meta: dict[str, object], **write_args: int) -> tuple[pathlib.Path, dict[str, int]]:
    """Generate DATA/name unless a file made with the same parameters is already there."""
    DATA.mkdir(parents=True, exist_ok=True)
    path, sidecar = DATA / name, DATA / (name + ".json")
    meta = {**meta, "version": GENERATOR_VERSION}
    if path.exists() and sidecar.exists():
        saved = json.loads(sidecar.read_text())
        if saved.get("meta") == meta and saved.get("size") == path.stat().st_size:
            return path, saved["counts"]
    started = time.perf_counter()
    print(f"generating {path} ...", file=sys.stderr, flush=True)
    counts = Generator(int(meta["seed"])).write(path, **write_args)
    sidecar.write_text(json.dumps({"meta": meta, "size": path.stat().st_size, "counts": counts}, indent=1))
    print(f"  {path.stat().st_size / 2**20:.1f} MiB, {counts['lines']:,} lines in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return path, counts


def logs_dir(big: pathlib.Path, small: pathlib.Path) -> pathlib.Path:
    """A container-logs-dir with kubelet-style symlinks to the generated files."""
    directory = DATA / "containers"
    directory.mkdir(parents=True, exist_ok=True)
    for cid, target in ((CID_BIG, big), (CID_SMALL, small)):
        link = directory / f"{POD}_{NAMESPACE}_{CONTAINER}-{cid}.log"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())
    return directory


def warm(path: pathlib.Path) -> None:
    """Read the file once so rg and the agent both read from the page cache."""
    with open(path, "rb", buffering=0) as handle:
        while handle.read(16 << 20):
            pass


###############################################################################
# Processes ###################################################################
###############################################################################


class MemoryPeaks:
    """Peak RssAnon/RssFile of a server, sampled every 10 ms (VmHWM lumps the two together)."""

    def __init__(self, server: Server) -> None:
        self.peaks = server.memory_kib()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.01):
                try:
                    now = server.memory_kib()
                except (OSError, ValueError):
                    return
                self.peaks = {key: max(value, now.get(key, 0)) for key, value in self.peaks.items()}

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {key: value / 1024 for key, value in self.peaks.items()}


class Server:
    """A subprocess that logs {"msg":"serving","port":N} on stderr (stderr goes to a file)."""

    def __init__(self, args: list[str], log_path: pathlib.Path, cwd: pathlib.Path = REPO) -> None:
        self.log_path = log_path
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log, cwd=cwd, env=env)
        self.port = self._wait_port()

    def _wait_port(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("msg") == "serving":
                    return int(event["port"])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.proc.args} did not start:\n{self.log_path.read_text(errors='replace')}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """user+sys CPU time the process has used so far (all threads)."""
        fields = pathlib.Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status_kib(self, *keys: str) -> dict[str, int]:
        """The named kB fields of /proc/PID/status (VmRSS, RssAnon, RssFile...), now."""
        status = pathlib.Path(f"/proc/{self.pid}/status").read_text()
        return {key: int(line.split()[1]) for line in status.splitlines()
                for key in keys if line.startswith(key + ":")}

    def memory_kib(self) -> dict[str, int]:
        """RssAnon and RssFile: anonymous memory is what a memory limit must hold; file pages are
        the mapped log (page cache, reclaimable)."""
        return self.status_kib("RssAnon", "RssFile")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_agent(directory: pathlib.Path, threads: int | None, agent_dir: pathlib.Path = REPO) -> Server:
    """`python -m kubetail_agent serve` run from agent_dir, so agent_dir/kubetail_agent.py is the one served."""
    args = [sys.executable, "-m", "kubetail_agent", "serve", "-a", "127.0.0.1:0",
            "-p", f"container-logs-dir:{directory}", "-p", "auth-mode:none"]
    if threads:
        args += ["-p", f"scan-threads:{threads}"]
    return Server(args, DATA / "agent.log", cwd=agent_dir)


def describe(agent_dir: pathlib.Path) -> str:
    """The commit of agent_dir's checkout (+ "-dirty" when kubetail_agent.py differs from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=agent_dir, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "kubetail_agent.py"], cwd=agent_dir,
                               capture_output=True).returncode != 0
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return str(agent_dir)


def start_ceiling(path: pathlib.Path) -> Server:
    return Server([sys.executable, str(pathlib.Path(__file__).resolve()), "_ceiling-server", str(path)],
                  DATA / "ceiling.log")


def ceiling_server(path: str) -> int:
    """The transport ceiling: a bare grpc.aio server streaming pre-serialized LogRecords.

    Same process type as the agent (grpc.aio, one event loop, an async generator yielding
    bytes) but nothing between the stream and the wire: the records of `path` are parsed and
    serialized with protobuf before the server starts.
    """
    import asyncio

    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    from kubetail_agent_proto import cluster_agent_pb2 as pb

    records: list[bytes] = []
    with open(path, "rb") as handle:
        for raw in handle:
            ts, _stream, tag, message = raw.rstrip(b"\n").split(b" ", 3)
            stamp = Timestamp()
            stamp.FromJsonString(ts.decode())
            records.append(pb.LogRecord(timestamp=stamp, message=message.decode(), is_final=tag == b"F")
                           .SerializeToString())

    async def stream(request: object, context: object):
        for record in records:
            yield record

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("cluster_agent.LogRecordsService", {
            "StreamForward": grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=pb.LogRecordsStreamRequest.FromString),
        })])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(json.dumps({"msg": "serving", "port": port, "records": len(records)}), file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await server.stop(None)

    asyncio.run(main())
    return 0


###############################################################################
# Measuring ###################################################################
###############################################################################


class Client:
    """A real gRPC client (sync API) that costs the machine as little CPU as Python allows.

    Responses stay raw bytes (no protobuf parsing), and SingleThreadedUnaryStream reads the
    stream on the calling thread instead of handing each message over from gRPC's polling
    thread (~30 % less client CPU here; the two processes share 2 cores).
    """

    def __init__(self, port: int) -> None:
        import grpc
        import grpc.experimental

        from kubetail_agent_proto import cluster_agent_pb2 as pb

        self.pb = pb
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_receive_message_length", 64 << 20),
            (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)])
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.calls = {name: self.channel.unary_stream(
            f"/cluster_agent.LogRecordsService/{name}",
            request_serializer=pb.LogRecordsStreamRequest.SerializeToString,
            response_deserializer=None) for name in ("StreamForward", "StreamBackward")}

    def request(self, cid: str, grep: str = "") -> object:
        return self.pb.LogRecordsStreamRequest(namespace=NAMESPACE, pod_name=POD, container_name=CONTAINER,
                                               container_id=cid, grep=grep, follow_from=self.pb.NOOP)

    def stream(self, cid: str, grep: str = "", method: str = "StreamForward") -> tuple[int, float, float]:
        """(records, wall seconds, client CPU seconds) of one whole stream."""
        request = self.request(cid, grep)
        cpu = time.process_time()
        started = time.perf_counter()
        count = 0
        for _record in self.calls[method](request):
            count += 1
        return count, time.perf_counter() - started, time.process_time() - cpu

    def close(self) -> None:
        self.channel.close()


def run_rg(pattern: str, path: pathlib.Path) -> tuple[int, float, float]:
    """(matching lines, wall seconds, CPU seconds) of `rg -c PATTERN FILE`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(["rg", "--no-config", "-c", pattern, str(path)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"rg failed: {done.stderr}")
    count = int(done.stdout.strip() or 0)
    return count, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def best_of(runs: int, *measures) -> list[dict[str, float]]:
    """Per measure: the run with the least wall time of `runs` (+ its CPU and the median wall).

    One untimed warm-up each, then the measures alternate run by run, so a burst of other
    work on the machine hits both sides of a ratio alike.
    """
    results: list[list[dict[str, float]]] = [[] for _ in measures]
    for measure in measures:
        measure()
    for _ in range(runs):
        for measure, got in zip(measures, results):
            got.append(measure())
    bests = []
    for got in results:
        best = dict(min(got, key=lambda r: r["wall"]))
        best["median_wall"] = sorted(r["wall"] for r in got)[len(got) // 2]
        bests.append(best)
    return bests


class Profiler:
    """Optional: py-spy record of the agent while it repeats one case (--profile DIR)."""

    def __init__(self, directory: str | None, agent: Server) -> None:
        self.directory = pathlib.Path(directory) if directory else None
        self.agent = agent
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.py_spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")

    def profile(self, name: str, once, min_runs: int = 1, min_seconds: float = 5.0) -> None:
        """Sample the agent while `once` runs at least min_runs times and min_seconds."""
        if not self.directory:
            return
        out = self.directory / f"{name}.txt"
        # --native shows time in RE2 and gRPC's C code; it pauses the agent for each sample.
        proc = subprocess.Popen([self.py_spy, "record", "--pid", str(self.agent.pid), "--threads", "--idle",
                                 "--native", "--rate", "200", "--format", "raw", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # let py-spy attach
        started, runs = time.monotonic(), 0
        while runs < min_runs or time.monotonic() - started < min_seconds:
            once()
            runs += 1
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not out.exists():
            print(f"  py-spy failed: {err.decode(errors='replace').strip()[-500:]}", file=sys.stderr, flush=True)
            return
        print(f"  profile of {name}: {out}", file=sys.stderr, flush=True)


###############################################################################
# Main ########################################################################
###############################################################################


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}"


def ms_best_median(result: dict[str, float]) -> str:
    return f"{ms(result['wall'])} ({ms(result['median_wall'])})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ceiling-server"]:
        return ceiling_server(argv[1])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512, help="size of the grep file (default 512)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case; the best counts (default 5)")
    parser.add_argument("--runs-d", type=int, default=2,
                        help="timed runs of case (d), which streams ~30 %% of the file (default 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="pass -p scan-threads:N to the agent (default: the agent's own default)")
    parser.add_argument("--seed", type=int, default=20240501)
    parser.add_argument("--only", default="a,b,c,d,u", help="cases to run, e.g. a,c,u (u = unfiltered)")
    parser.add_argument("--agent-dir", type=pathlib.Path, default=REPO,
                        help="directory whose kubetail_agent.py is benchmarked (default: this checkout)")
    parser.add_argument("--profile", metavar="DIR",
                        help="after timing each case, py-spy record the agent while it repeats the case")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if shutil.which("rg") is None:
        parser.error("rg not found: apt-get install ripgrep")

    big, counts = ensure_file(f"cri-{args.size_mib}MiB.log", {"seed": args.seed, "size_mib": args.size_mib},
                              target_bytes=args.size_mib << 20, rare_every=(args.size_mib << 20) // 8)
    small, small_counts = ensure_file(f"cri-{UNFILTERED_LINES}-lines.log",
                                      {"seed": args.seed + 1, "lines": UNFILTERED_LINES},
                                      max_lines=UNFILTERED_LINES)
    directory = logs_dir(big, small)
    warm(big)
    warm(small)
    rg_version = subprocess.run(["rg", "--version"], capture_output=True, text=True).stdout.splitlines()[0]

    load_before = os.getloadavg()[0]
    agent = start_agent(directory, args.threads, args.agent_dir.resolve())
    idle = {key: value / 1024 for key, value in agent.memory_kib().items()}
    memory = MemoryPeaks(agent)
    rows = []
    try:
        client = Client(agent.port)
        profiler = Profiler(args.profile, agent)
        for key, label, pattern, target, count_key in CASES:
            if key not in only:
                continue
            print(f"case {key}: {pattern!r} ...", file=sys.stderr, flush=True)
            warm(big)  # the VM may reclaim cold page-cache pages between cases

            def rg_once(pattern: str = pattern) -> dict[str, float]:
                count, wall, cpu = run_rg(pattern, big)
                return {"count": count, "wall": wall, "cpu": cpu}

            def agent_once(pattern: str = pattern) -> dict[str, float]:
                cpu = agent.cpu_seconds()
                count, wall, client_cpu = client.stream(CID_BIG, pattern)
                return {"count": count, "wall": wall, "cpu": agent.cpu_seconds() - cpu, "client_cpu": client_cpu}

            runs = args.runs_d if key == "d" else args.runs
            rg_best, agent_best = best_of(runs, rg_once, agent_once)
            profiler.profile(f"case-{key}", agent_once)
            rows.append((key, label, pattern, counts[count_key], rg_best, agent_best, target))

        unfiltered = None
        if "u" in only:
            print("unfiltered ...", file=sys.stderr, flush=True)
            warm(small)
            ceiling = start_ceiling(small)
            try:
                ceiling_client = Client(ceiling.port)

                def ceiling_once() -> dict[str, float]:
                    cpu = ceiling.cpu_seconds()
                    count, wall, client_cpu = ceiling_client.stream(CID_SMALL)
                    return {"count": count, "wall": wall, "cpu": ceiling.cpu_seconds() - cpu,
                            "client_cpu": client_cpu}

                def agent_all() -> dict[str, float]:
                    cpu = agent.cpu_seconds()
                    count, wall, client_cpu = client.stream(CID_SMALL)
                    return {"count": count, "wall": wall, "cpu": agent.cpu_seconds() - cpu, "client_cpu": client_cpu}

                ceiling_best, agent_best = best_of(args.runs, ceiling_once, agent_all)
                profiler.profile("unfiltered", agent_all, min_runs=2)
                ceiling_client.close()
            finally:
                ceiling.stop()
            unfiltered = (ceiling_best, agent_best)
        client.close()
    finally:
        peaks = memory.stop()
        agent.stop()

    threads = args.threads or "default"
    print(f"\n{args.size_mib} MiB CRI file ({counts['lines']:,} lines), best of {args.runs} runs "
          f"({args.runs_d} for (d)); "
          f"{rg_version} vs kubetail-agent {describe(args.agent_dir)} (scan-threads {threads}); "
          f"{os.cpu_count()} CPUs; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other work skews the "
          "timings)\n")
    print("| case | pattern | planted | rg matches | agent records | rg ms best (median) | agent ms best (median) | "
          "ratio | target | "
          "rg CPU ms | agent CPU ms | client CPU ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    failures = 0
    for key, label, pattern, planted, rg_best, agent_best, target in rows:
        ratio = agent_best["wall"] / rg_best["wall"]
        ok = target is None or ratio <= target
        failures += not ok
        mismatch = "" if rg_best["count"] == agent_best["count"] == planted else " ⚠"
        verdict = "—" if target is None else f"≤ {target:.1f}× {'ok' if ok else 'MISSED'}"
        print(f"| ({key}) {label} | `{pattern}` | {planted:,} | {rg_best['count']:,} | "
              f"{agent_best['count']:,}{mismatch} | {ms_best_median(rg_best)} | {ms_best_median(agent_best)} | "
              f"{ratio:.2f}× | {verdict} | {ms(rg_best['cpu'])} | {ms(agent_best['cpu'])} | "
              f"{ms(agent_best['client_cpu'])} |")
    if unfiltered:
        ceiling_best, agent_best = unfiltered
        ceiling_rate = ceiling_best["count"] / ceiling_best["wall"]
        agent_rate = agent_best["count"] / agent_best["wall"]
        share = agent_rate / ceiling_rate
        ok = share >= UNFILTERED_TARGET
        failures += not ok
        median_share = ceiling_best["median_wall"] / agent_best["median_wall"]
        print(f"\n| unfiltered StreamForward, {small_counts['lines']:,} lines | records | ms best (median) | "
              "records/s | server CPU ms | client CPU ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, best, rate in (("ceiling: bare grpc.aio, pre-serialized", ceiling_best, ceiling_rate),
                                 ("kubetail-agent", agent_best, agent_rate)):
            print(f"| {name} | {best['count']:,} | {ms_best_median(best)} | {rate:,.0f} | {ms(best['cpu'])} | "
                  f"{ms(best['client_cpu'])} |")
        print(f"\nunfiltered: agent at {share:.0%} of the transport ceiling, best against best "
              f"({median_share:.0%} median against median); target ≥ {UNFILTERED_TARGET:.0%}: "
              f"{'ok' if ok else 'MISSED'}")
    print(f"\nagent memory (sizes deploy/'s requests and limits): idle RssAnon {idle['RssAnon']:.0f} MiB; "
          f"peak during the runs RssAnon {peaks['RssAnon']:.0f} MiB, RssFile {peaks['RssFile']:.0f} MiB "
          "(mapped log pages: page cache, reclaimable)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
