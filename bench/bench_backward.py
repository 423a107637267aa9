#!/usr/bin/env python3
"""Tail latency: how fast the first records of a big file come back, newest first.

Not part of the test run. Usage (from the repo root, with the agent installed):

    python bench/bench_backward.py                # the 512 MiB file of bench_grep.py
    python bench/bench_backward.py --size-mib 1024

For each request the client reads the first --records records (fewer if the stream ends),
then cancels. It prints the time to the first record and to the last one read, and the agent's
CPU time from the request until 1 s after the cancel: if StreamBackward scanned the whole file,
that CPU time would be close to a full scan's (the last row, a forward grep that matches almost
nothing, gives that reference).
"""

from __future__ import annotations

import argparse
import sys
import time

import bench_grep as bg


def first_records(client: bg.Client, agent: bg.Server, method: str, grep: str, limit: int) -> dict[str, float]:
    request = client.request(bg.CID_BIG, grep)
    cpu = agent.cpu_seconds()
    started = time.perf_counter()
    call = client.calls[method](request)
    count, first = 0, None
    try:
        for _record in call:
            count += 1
            if first is None:
                first = time.perf_counter() - started
            if count >= limit:
                break
        last = time.perf_counter() - started
    finally:
        call.cancel()
    time.sleep(1.0)  # anything the agent still does for this stream shows up in its CPU time
    return {"count": count, "first": first or 0.0, "last": last, "cpu": agent.cpu_seconds() - cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--records", type=int, default=100, help="records to read before cancelling (100)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=20240501)
    args = parser.parse_args(argv)

    big, counts = bg.ensure_file(f"cri-{args.size_mib}MiB.log", {"seed": args.seed, "size_mib": args.size_mib},
                                 target_bytes=args.size_mib << 20, rare_every=(args.size_mib << 20) // 8)
    small, _ = bg.ensure_file(f"cri-{bg.UNFILTERED_LINES}-lines.log",
                              {"seed": args.seed + 1, "lines": bg.UNFILTERED_LINES}, max_lines=bg.UNFILTERED_LINES)
    directory = bg.logs_dir(big, small)
    bg.warm(big)
    cases = [
        ("StreamBackward", "", args.records),
        ("StreamBackward", "INFO", args.records),
        ("StreamBackward", "(?i)timeout", args.records),
        ("StreamBackward", "SIGSEGV", 1),  # the newest is 1/16 of the file from the end
        ("StreamForward", "", args.records),
        ("StreamForward", r"[a-z]+\d{3}[A-Z]", 10**9),  # reference: a full scan of the file
    ]
    agent = bg.start_agent(directory, args.threads)
    rows = []
    try:
        client = bg.Client(agent.port)
        for method, grep, limit in cases:
            print(f"{method} {grep!r} ...", file=sys.stderr, flush=True)
            first_records(client, agent, method, grep, limit)  # warm-up
            runs = [first_records(client, agent, method, grep, limit) for _ in range(args.runs)]
            rows.append((method, grep, limit, min(runs, key=lambda r: r["last"])))
        client.close()
    finally:
        agent.stop()

    print(f"\n{args.size_mib} MiB CRI file ({counts['lines']:,} lines), best of {args.runs}; agent CPU counted "
          "from the request to 1 s after the cancel\n")
    print("| method | grep | records read | first record ms | last record ms | agent CPU ms |")
    print("|---|---|---:|---:|---:|---:|")
    for method, grep, limit, best in rows:
        wanted = "all" if limit >= 10**9 else f"{best['count']:,} of {limit:,}"
        print(f"| {method} | `{grep or '(none)'}` | {wanted} | {bg.ms(best['first'])} | {bg.ms(best['last'])} | "
              f"{bg.ms(best['cpu'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
