#!/usr/bin/env python3
"""Summarize a py-spy raw profile (as written by `bench_grep.py --profile DIR`).

    python bench/spy_summary.py DIR/case-b.txt [--top 15]

Samples are grouped by what the thread was doing: the asyncio loop (gRPC servicer, record
encoding), the scan pool (RE2, parsing), or native-only threads (gRPC's C core). For each group
it prints how many samples were idle (waiting in epoll/futex/poll) and, of the busy ones, the
Python functions with the most self and inclusive samples (native frames are folded into the
nearest Python caller, so RE2 time shows up under `find_candidate_lines`).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_IDLE = re.compile(r"epoll_wait|epoll_pwait|futex|pthread_cond_|sem_wait|sem_clockwait|poll \(|select \(|"
                   r"nanosleep|clock_nanosleep|do_futex_wait|__lll_lock_wait|take_gil|PyThread_acquire_lock|"
                   r"wait \(threading|_wait_for_tstate_lock|read \(libc|accept|__GI___poll")


# Innermost Python frames that mean "waiting": the pool's queue.get, the loop's epoll, thread joins.
_IDLE_PY = re.compile(r"^_worker \(thread\.py:81\)|^EpollSelector\.select \(selectors\.py|^wait \(threading\.py|"
                      r"^get \(queue\.py|^Thread\.run \(threading\.py")


def python_frame(frame: str) -> bool:
    return ".py:" in frame


def short(frame: str) -> str:
    # "name (path/to/file.py:123)" -> "name (file.py:123)"
    match = re.match(r"(.*) \((.*/)?([^/]*\.py):(\d+)\)$", frame)
    if match:
        return f"{match.group(1)} ({match.group(3)}:{match.group(4)})"
    return frame


def function(frame: str) -> str:
    match = re.match(r"(.*) \((.*/)?([^/]*\.py):\d+\)$", frame)
    return f"{match.group(1)} ({match.group(3)})" if match else frame


def group_of(frames: list[str]) -> str:
    joined = ";".join(frames)
    if "scan_chunk" in joined or "_worker (thread.py" in joined or "concurrent/futures/thread.py" in joined:
        return "scan pool"
    if "_run_once" in joined or "run_forever" in joined or "asyncio" in joined:
        return "asyncio loop"
    if any(python_frame(f) for f in frames):
        return "other python"
    return "native only (gRPC core etc.)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)

    groups: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: {"total": collections.Counter(), "self": collections.Counter(), "incl": collections.Counter(),
                 "native": collections.Counter()})
    with open(args.profile, encoding="utf-8", errors="replace") as handle:
        for raw in handle:
            stack, _, count_text = raw.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")[1:]  # drop "thread (tid)"
            group = groups[group_of(frames)]
            leaf = frames[-1] if frames else "?"
            py = [f for f in frames if python_frame(f)]
            idle = bool(_IDLE.search(leaf)) or (len(frames) > 1 and bool(_IDLE.search(frames[-2]))
                                                and not python_frame(leaf)) \
                or (bool(py) and bool(_IDLE_PY.search(short(py[-1]))))
            group["total"]["idle" if idle else "busy"] += count
            if idle:
                continue
            group["self"][short(py[-1]) if py else "(native) " + leaf] += count
            for name in {function(f) for f in py}:
                group["incl"][name] += count
            if not python_frame(leaf):
                group["native"][leaf] += count

    for name, group in sorted(groups.items(), key=lambda item: -sum(item[1]["total"].values())):
        busy, idle = group["total"]["busy"], group["total"]["idle"]
        print(f"\n## {name}: {busy + idle} samples, {busy} busy, {idle} idle")
        if not busy:
            continue
        print("  self (innermost Python frame, native callees folded in):")
        for frame, count in group["self"].most_common(args.top):
            print(f"    {count / busy:6.1%}  {frame}")
        print("  inclusive:")
        for frame, count in group["incl"].most_common(args.top):
            print(f"    {count / busy:6.1%}  {frame}")
        print("  native leaves:")
        for frame, count in group["native"].most_common(min(args.top, 8)):
            print(f"    {count / busy:6.1%}  {frame[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
