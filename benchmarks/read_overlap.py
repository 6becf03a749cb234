"""The streaming engine's overlap on CPU: `tlora calibrate` on a Llama-2-7B-shaped checkpoint, with and without
reading layers ahead, and with each file written in place instead of on the background writer.

The checkpoint (random bf16 weights, 13.5 GB) is written by make_checkpoint.py. Each run starts with a
cold page cache where the host lets this process drop it (root, writable /proc/sys/vm/drop_caches), so
every layer comes from disk as on a user's first run; where it cannot, the results say the reads were
warm. The settings alternate (default, no read-ahead, writes in place, default, ...) and medians are
reported, beside the phases tlora records: capture, forward, backward, layer_reads (time spent reading
layers) and load_wait (the part of the reads the computation waited for). With read-ahead, load_wait is
what was not hidden. "Writes in place" runs the same code with every file waited for as soon as it is
handed to the writer (what tlora did before the writer): the forward phase's difference is the write time
the writer hides behind the next layer's work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    BENCH_DIR,
    DEFAULT_CACHE,
    append_results,
    fmt_mib,
    markdown_table,
    run_measured,
    shell,
    tlora_script,
    wait_until_quiet,
)
from make_checkpoint import ensure_checkpoint
from speed import write_packed

# Setting: (program, flags); the last is tlora with `TensorStore.put` waiting for each file it hands over.
IN_PLACE = (
    "import sys, tlora_cli.calib.store as s; put = s.TensorStore.put; "
    "s.TensorStore.put = lambda self, k, t: (put(self, k, t), self.flush()); "
    "from tlora_cli.cli import main; sys.argv[0] = 'tlora'; main()"
)
SETTINGS = {
    "default (read-ahead, background writes)": ([tlora_script()], []),
    "--no-read-ahead": ([tlora_script()], ["--no-read-ahead"]),
    "writes in place": ([sys.executable, "-c", IN_PLACE], []),
}
PHASES = ("data", "load", "capture", "forward", "backward", "layer_reads", "load_wait")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (after a sync); False where this process may not."""
    subprocess.run(["sync"], check=False)
    try:
        DROP_CACHES.write_text("1\n")
    except OSError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama-2-7b", help="A shape from make_checkpoint.py.")
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each setting, alternating; medians.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-load", type=float, default=1.0, help="Wait for the load average to drop to this.")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="Where the checkpoint is written.")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS-speed.md")
    args = parser.parse_args()

    model = ensure_checkpoint(args.config, args.cache)
    with tempfile.TemporaryDirectory(prefix="tlora-read-overlap-") as tmp:
        measure(args, model, Path(tmp))


def measure(args: argparse.Namespace, model: str, work: Path) -> None:
    """Every setting, alternating, in a scratch folder (the covariances of a 7B model take 20+ GB)."""
    from transformers import AutoTokenizer

    data = work / "packed.jsonl"
    write_packed(AutoTokenizer.from_pretrained(model), args.num_samples, args.seq_len, data)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    commands, cold = [], []
    for _ in range(args.repeats):
        for index, (name, (program, flags)) in enumerate(SETTINGS.items()):
            out = work / f"calibration-{index}"
            command = [*program, "calibrate", "--model", model, "--data", data, "--device", "cpu"]
            command += ["--num-samples", args.num_samples, "--seq-len", args.seq_len, "--engine", "stream", *flags]
            command += ["--quiet", "--overwrite", "-o", out]
            wait_until_quiet(args.max_load)
            cold.append(drop_page_cache())
            run = run_measured(command, env=env).check()
            commands.append(shell(run.command))
            timings = json.loads((out / "calibration.json").read_text())["timings"]
            shutil.rmtree(out)  # 22 GB of covariances
            runs[name].append({"wall_s": run.wall_s, "rss_mib": run.peak_rss_mib, "load": run.load_at_start, **timings})

    def median(name: str, key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs[name])

    rows = [
        [
            name,
            f"{median(name, 'wall_s'):.1f}",
            *(f"{median(name, p):.1f}" for p in PHASES),
            fmt_mib(median(name, "rss_mib")),
            f"{median(name, 'load'):.2f}",
        ]
        for name in SETTINGS
    ]
    headers = ["setting", "wall s", *(f"{p} s" for p in PHASES), "peak host RSS", "load at start"]
    cache = "cold (page cache dropped before each run)" if all(cold) else "WARM (the page cache could not be dropped)"
    append_results(
        args.results,
        f"Read-ahead and background writes on CPU: tlora calibrate --engine stream, {args.config} (random bf16), "
        f"N={args.num_samples}, T={args.seq_len}, {args.threads} threads",
        [markdown_table(headers, rows)],
        commands,
        f"Median of {args.repeats} runs per setting, alternating. Reads: {cache}. Every layer is read twice (forward, "
        "then backward). layer_reads: seconds spent reading layers; load_wait: the part the computation waited for. "
        "Writes in place: each file waited for when handed over (the same code, TensorStore.put then flush).",
    )


if __name__ == "__main__":
    main()
