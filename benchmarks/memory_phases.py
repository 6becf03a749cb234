"""Resident memory of one `tlora` command phase by phase: which phase reaches the peak, and what stays behind.

Runs the CLI in this process and wraps `Reporter.phase`: at each phase's start the kernel's peak-RSS
counter is reset (/proc/self/clear_refs), so the VmHWM read at its end is that phase's own peak.
Everything outside a phase (imports, the gaps between phases, saving the results) is one more row.

    python benchmarks/memory_phases.py -- calibrate --model DIR --num-samples 2 --seq-len 32 -o OUT
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common import (
    BENCH_DIR,
    append_results,
    fmt_mib,
    load_average,
    markdown_table,
    tlora_in_process,
    wait_until_quiet,
)

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def snapshot() -> dict[str, float]:
    """This process's resident memory in MiB, as the kernel counts it."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in FIELDS:
                values[key] = int(line.split()[1]) / 1024
    return values


def reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_with_phases(tlora_args: list[str]) -> list[list[str]]:
    """Run `tlora ARGS` here; one row per phase: RSS at start, peak, RSS at end, anonymous and file-backed."""
    start = time.perf_counter()
    from tlora_cli import progress

    rows: list[list[str]] = []
    outside = {"peak": snapshot()["VmHWM"]}
    original: Callable = progress.Reporter.phase

    @contextlib.contextmanager
    def phase(self: progress.Reporter, name: str, description: str, total: int | None = None) -> Iterator:
        outside["peak"] = max(outside["peak"], snapshot()["VmHWM"])
        reset_peak()
        before = snapshot()
        began = time.perf_counter()
        with original(self, name, description, total) as step:
            yield step
        after = snapshot()
        rows.append(
            [
                name,
                f"{time.perf_counter() - began:.1f}",
                fmt_mib(before["VmRSS"]),
                fmt_mib(after["VmHWM"]),
                fmt_mib(after["VmRSS"]),
                fmt_mib(after["RssAnon"]),
                fmt_mib(after["RssFile"]),
            ]
        )
        reset_peak()

    progress.Reporter.phase = phase
    tlora_in_process(tlora_args)
    end = snapshot()
    outside["peak"] = max(outside["peak"], end["VmHWM"])
    rows.append(
        [
            "outside phases",
            f"{time.perf_counter() - start - sum(float(r[1]) for r in rows):.1f}",
            "-",
            fmt_mib(outside["peak"]),
            fmt_mib(end["VmRSS"]),
            fmt_mib(end["RssAnon"]),
            fmt_mib(end["RssFile"]),
        ]
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-load", type=float, default=1.0, help="Wait for the load average to drop to this.")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS-memory.md")
    parser.add_argument("tlora_args", nargs=argparse.REMAINDER, help="-- then the tlora command line")
    args = parser.parse_args()
    tlora_args = args.tlora_args[1:] if args.tlora_args[:1] == ["--"] else args.tlora_args
    wait_until_quiet(args.max_load)
    load = load_average()
    rows = run_with_phases(tlora_args)
    table = markdown_table(
        ["phase", "seconds", "RSS at start", "peak in phase", "RSS at end", "anonymous at end", "file-backed at end"],
        rows,
    )
    # glibc reads its malloc tunables from the environment at start-up; they change what RSS keeps.
    tunables = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("MALLOC_", "GLIBC_")))
    append_results(
        args.results,
        f"Memory per phase of `tlora {' '.join(tlora_args[:1])}`" + (f" with {tunables}" if tunables else ""),
        [table],
        [" ".join([tunables, "tlora", *tlora_args]).strip()],
        f"Load average at start: {load:.2f}.",
    )


if __name__ == "__main__":
    main()
