"""The GPU figures: `tlora init` on a Llama-2-7B-shaped checkpoint: time per phase, peak device memory, peak RSS.

gpu_check.sh runs the CUDA tests, then this. It writes the checkpoint (random bf16 weights, no download)
with make_checkpoint.py, packs built-in math problems into N texts of T tokens (as speed.py does), and
runs `tlora init` once per engine setting (auto, stream, stream without read-ahead), each in its own
process started through common.run_measured (peak host RSS from wait4); the process records its own
peak device memory (torch.cuda.max_memory_allocated) on the way out. One table goes to
benchmarks/RESULTS-gpu.md, with the device's name.

--dry-run does all of it on CPU with a tiny shape and a few short samples, the runs in this process, into
a scratch results file: it checks the commands and the results format, and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BENCH_DIR,
    DEFAULT_CACHE,
    append_results,
    fmt_mib,
    markdown_table,
    run_measured,
    shell,
    tlora_in_process,
)
from make_checkpoint import ensure_checkpoint
from speed import write_packed

DRY_RUN_RESULTS = "tlora-gpu-check-dry-run.md"
RUNS = {
    "auto": ["--engine", "auto"],
    "stream": ["--engine", "stream"],
    "stream, no read-ahead": ["--engine", "stream", "--no-read-ahead"],
}
PHASES = ("data", "load", "capture", "forward", "backward", "forward_backward", "layer_reads", "load_wait")
PHASES += ("fingerprint", "factorisation", "writing")


def child(peak_file: Path, argv: list[str]) -> None:
    """Run `tlora ARGV` in this process and write down, however it ends, the device and its peak memory."""
    import torch

    try:
        tlora_in_process(argv)
    finally:
        cuda = torch.cuda.is_available()
        peak = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        }
        peak_file.write_text(json.dumps(peak))


def run_init(model: Path, data: Path, work: Path, name: str, args: argparse.Namespace) -> dict:
    """One `tlora init` in a child process: its command, wall time, phases, peaks."""
    out, peak_file = work / name.replace(", ", "-").replace(" ", "-"), work / f"{name}.peak.json"
    argv = ["init", "--model", model, "--data", data, "--num-samples", args.num_samples, "--seq-len", args.seq_len]
    argv += ["--budget-rank", args.budget_rank, "--device", args.device, *RUNS[name], "--quiet", "--overwrite"]
    argv += ["-o", out]
    if args.dry_run:  # in this process: one import of torch instead of three, a few seconds in all
        start = time.perf_counter()
        child(peak_file, argv)
        wall_s, rss_mib = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    else:
        run = run_measured([sys.executable, __file__, "child", peak_file, "--", *argv]).check()
        wall_s, rss_mib = run.wall_s, run.peak_rss_mib
    metadata = json.loads((out / "tlora_metadata.json").read_text())
    peak = json.loads(peak_file.read_text())
    return {
        "command": shell(["tlora", *map(str, argv)]),
        "wall_s": wall_s,
        "rss_mib": rss_mib,
        "device": peak["device"],
        "device_peak": peak["peak_bytes"],
        "engine": metadata["calibration"]["engine"]["used"],
        "batch_size": metadata["calibration"]["batch_size"],
        "timings": metadata["timings"],
    }


def table(runs: dict[str, dict]) -> str:
    rows = []
    for name, r in runs.items():
        peak = "n/a (CPU)" if r["device_peak"] is None else fmt_mib(r["device_peak"] / 2**20)
        phases = [f"{r['timings'].get(p, 0.0):.1f}" for p in PHASES]
        rows.append([name, r["engine"], r["batch_size"], f"{r['wall_s']:.1f}", *phases, peak, fmt_mib(r["rss_mib"])])
    headers = ["run", "engine used", "batch", "wall s", *(f"{p} s" for p in PHASES), "peak device memory"]
    return markdown_table([*headers, "peak host RSS"], rows)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        return child(Path(sys.argv[2]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, scratch results file.")
    scratch = f"{DRY_RUN_RESULTS} in the temp folder"
    parser.add_argument("--results", type=Path, help=f"Default: benchmarks/RESULTS-gpu.md (a dry run: {scratch})")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="Where the checkpoint is written.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlora-gpu-check-") as tmp:
        measure(args, Path(tmp))


def measure(args: argparse.Namespace, work: Path) -> None:
    """Every run in a scratch folder, removed afterwards; a dry run's results go beside it unless given."""
    dry = args.dry_run
    config = "tiny-llama" if dry else "llama-2-7b"
    args.device, args.num_samples, args.seq_len, args.budget_rank = ("cpu", 4, 64, 8) if dry else ("cuda", 32, 512, 128)
    results = args.results or (Path(tempfile.gettempdir()) / DRY_RUN_RESULTS if dry else BENCH_DIR / "RESULTS-gpu.md")
    model = ensure_checkpoint(config, work if dry else args.cache)

    from transformers import AutoTokenizer

    data = work / "packed.jsonl"
    write_packed(AutoTokenizer.from_pretrained(model), args.num_samples, args.seq_len, data)
    runs = {name: run_init(model, data, work, name, args) for name in RUNS}
    device = next(iter(runs.values()))["device"]
    title = f"tlora init on {device}: {config} (random bf16), N={args.num_samples}, T={args.seq_len}, budget rank "
    title += f"{args.budget_rank}" + (" (DRY RUN on CPU: checks the commands, measures nothing)" if dry else "")
    append_results(
        results,
        title,
        [table(runs)],
        [r["command"] for r in runs.values()],
        "Wall s: the whole process (imports, checkpoint reads, calibration, factorisation, writing). layer_reads: "
        "time spent reading layers from the checkpoint, load_wait: the part of it the computation waited for "
        "(stream engine). Peak device memory: torch.cuda.max_memory_allocated in the tlora process; peak host "
        "RSS: wait4's ru_maxrss.",
    )
    print(f"results appended to {results}")


if __name__ == "__main__":
    main()
