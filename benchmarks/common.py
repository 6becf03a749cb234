"""What every benchmark script needs: the machine, a quiet moment, measured child runs, and the results file.

The machines these run on are shared, so every figure is written with the load average at its start.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# Big random checkpoints stay outside the repository.
DEFAULT_CACHE = Path(os.environ.get("TLORA_BENCH_CACHE", "/work/bench-cache"))
MIB = 1024 * 1024
# tlora's default targets on Llama-style models.
SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tlora_script() -> str:
    """The console script of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("tlora")
    found = str(beside) if beside.is_file() else shutil.which("tlora")
    if found is None:
        raise SystemExit("the `tlora` console script is not installed: pip install -e .")
    return found


def tlora_in_process(argv: Sequence[object]) -> None:
    """`tlora ARGV` in this process (for measurements inside it); a non-zero exit is raised, sys.argv restored."""
    from tlora_cli.cli import main

    own_argv, sys.argv = sys.argv, ["tlora", *map(str, argv)]
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        sys.argv = own_argv


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def machine() -> dict[str, str]:
    """CPU model, cores, RAM and library versions: what a reader needs to compare a figure with theirs."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        ram_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{ram_kib / MIB:.1f} GiB",
        "python": platform.python_version(),
        "torch": _package("torch"),
        "transformers": _package("transformers"),
        "peft": _package("peft"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load_average() -> float:
    return os.getloadavg()[0]


def wait_until_quiet(max_load: float, tries: int = 4, pause_s: float = 30) -> float:
    """Wait (a few times at most) for the 1-minute load average to drop to `max_load`; returns the last reading."""
    load = load_average()
    for _ in range(tries):
        if load <= max_load:
            break
        print(f"load average {load:.2f} > {max_load}: waiting {pause_s:.0f} s", file=sys.stderr)
        time.sleep(pause_s)
        load = load_average()
    return load


@dataclass
class Measured:
    """One child process: exit code, wall time, kernel high-water mark of its resident memory, an RSS trace."""

    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_mib: float
    load_at_start: float
    stderr: str
    trace: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, RSS MiB)

    def check(self) -> Measured:
        if self.returncode != 0:
            raise SystemExit(f"{shell(self.command)} failed ({self.returncode}):\n{self.stderr[-3000:]}")
        return self


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# wait4's ru_maxrss of a child started from this process is at least this process's own peak RSS
# (vfork + exec keeps the old address space's high-water mark), so a benchmark that has itself held a
# few GB would see that in every later child. The command is started from a small launcher instead,
# whose own peak is a few MB: it reports the command's pid, then its peak RSS (KiB) and exit status.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
print(proc.pid, flush=True)
_, status, usage = os.wait4(proc.pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status), flush=True)
"""


def run_measured(command: Sequence[str], env: dict[str, str] | None = None, trace_every_s: float = 0.25) -> Measured:
    """Run a command and read its own peak RSS from wait4, through LAUNCHER; RSS is also traced over time."""
    command = [str(c) for c in command]
    load = load_average()
    start = time.perf_counter()
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    first = launcher.stdout.readline()
    if not first:
        raise SystemExit(f"{shell(command)} did not start:\n{launcher.stderr.read()[-3000:]}")
    pid = int(first)
    trace: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(trace_every_s):
            rss = _rss_mib(pid)
            if rss is not None:
                trace.append((time.perf_counter() - start, rss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = launcher.stderr.read()
    maxrss_kib, returncode = map(int, launcher.stdout.read().split())
    launcher.wait()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    return Measured(command, returncode, wall, maxrss_kib / 1024, load, stderr, trace)


def shell(command: Sequence[str]) -> str:
    """A command as one would type it, with the venv's script shortened to its name."""
    return " ".join(shlex.quote(Path(c).name if c == tlora_script() else str(c)) for c in command)


def timings(folder: Path, file: str) -> dict[str, float]:
    """The per-phase seconds `tlora` recorded (calibration.json or tlora_metadata.json)."""
    return json.loads((folder / file).read_text())["timings"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(path: Path, title: str, tables: Sequence[str], commands: Sequence[str], notes: str = "") -> None:
    """Print the tables and append them, with the machine, the commands and the loads, to a results file."""
    info = machine()
    body = [
        f"## {title}",
        "",
        f"- date: {info['date']}",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM (shared with other users)",
        f"- versions: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"peft {info['peft']}",
        f"- benchmark: `{shell([sys.executable.rsplit('/', 1)[-1], *sys.argv])}`",
        "",
        *[part for table in tables for part in (table, "")],
        "Commands run (in this order):",
        "",
        *[f"- `{c}`" for c in commands],
        "",
    ]
    if notes:
        body += [notes.strip(), ""]
    text = "\n".join(body) + "\n"
    print(text)
    exists = path.is_file()
    with path.open("a") as f:
        f.write(("" if exists else f"# {path.stem}\n\nAppended by the scripts in benchmarks/; newest last.\n\n") + text)


def fmt_mib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"
