"""Peak host memory of `tlora calibrate` and `tlora init` against model size, streaming engine vs whole model.

Each run is a separate `tlora` process; its peak RSS is the kernel's high-water mark for that child
(wait4), so imports, the tokenizer and everything the CLI does count. Small N and T keep the compute
small: what is left is the memory that scales with the model.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch
from common import (
    BENCH_DIR,
    DEFAULT_CACHE,
    SUFFIXES,
    Measured,
    append_results,
    fmt_mib,
    markdown_table,
    run_measured,
    shell,
    timings,
    tlora_script,
    wait_until_quiet,
)
from make_checkpoint import ensure_checkpoint
from safetensors import safe_open

from tlora_cli.factorisation import tlora_a

MODELS = ("smollm2-135m", "tinyllama-1.1b", "llama-2-7b-8-layers", "llama-2-7b")
STREAM_PHASES = ("data", "load", "capture", "forward", "backward", "fingerprint")


def model_dir(name: str, cache: Path) -> Path:
    if name == "smollm2-135m":
        from tlora_cli.model.builtin import builtin_model_path

        return builtin_model_path()
    return ensure_checkpoint(name, cache)


def checkpoint_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape from the safetensors headers; no weight is read."""
    shapes = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                shapes[key] = f.get_slice(key).get_shape()
    return shapes


def factorisation_seconds(target_shapes: list[list[int]]) -> float:
    """Time one tlora_a per distinct shape (what `tlora init` runs per module) and add up over all targets."""
    per_shape = {}
    for out_features, in_features in sorted({tuple(s) for s in target_shapes}):
        weight = torch.randn(out_features, in_features)
        x = torch.randn(2 * in_features, in_features)
        covariance = x.T @ x / x.shape[0]
        start = time.perf_counter()
        tlora_a(weight, covariance, 8)
        per_shape[(out_features, in_features)] = time.perf_counter() - start
    return sum(per_shape[tuple(s)] for s in target_shapes)


def calibrate(path: Path, out: Path, args: argparse.Namespace, *extra: str) -> Measured:
    command = [tlora_script(), "calibrate", "--model", path, "--num-samples", args.num_samples]
    command += ["--seq-len", args.seq_len, "--device", "cpu", "--quiet", "--overwrite", "-o", out, *extra]
    return run_measured(command).check()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--budget-rank", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="Checkpoints and scratch runs.")
    parser.add_argument(
        "--factorisation-minutes",
        type=float,
        default=15.0,
        help="Factorise every target when the estimate is below this; otherwise only the last layer's.",
    )
    parser.add_argument("--max-load", type=float, default=1.0, help="Wait for the load average to drop to this.")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS-memory.md")
    args = parser.parse_args()

    rows, phase_rows, commands, notes = [], [], [], []
    for name in args.models:
        path = model_dir(name, args.cache)
        work = args.cache / "runs" / name
        work.mkdir(parents=True, exist_ok=True)
        shapes = checkpoint_shapes(path)
        params = sum(math.prod(s) for s in shapes.values())
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        targets = {
            k.removesuffix(".weight"): s for k, s in shapes.items() if k.removesuffix(".weight").endswith(SUFFIXES)
        }

        wait_until_quiet(args.max_load)
        stream = calibrate(path, work / "calib-stream", args, "--engine", "stream")
        commands.append(shell(stream.command))
        stream_timings = timings(work / "calib-stream", "calibration.json")
        calib_size = sum(f.stat().st_size for f in (work / "calib-stream").rglob("*") if f.is_file())
        phase_rows.append([name, *(f"{stream_timings.get(p, 0):.1f}" for p in STREAM_PHASES), f"{stream.wall_s:.1f}"])

        available = _mem_available_bytes()
        whole_needs = 4 * params  # --dtype auto computes in float32 on CPU
        if whole_needs < 0.8 * available:
            wait_until_quiet(args.max_load)
            whole = calibrate(path, work / "calib-whole", args, "--engine", "whole")
            shutil.rmtree(work / "calib-whole")  # covariances of a 7B model take 20+ GB of disk
            commands.append(shell(whole.command))
            whole_rss, whole_wall = fmt_mib(whole.peak_rss_mib), f"{whole.wall_s:.1f}"
        else:
            whole_rss = whole_wall = "not run"
            notes.append(
                f"- {name}, whole engine: not run; its float32 weights alone take {whole_needs / 2**30:.1f} GiB "
                f"of the {available / 2**30:.1f} GiB available."
            )

        estimate = factorisation_seconds(list(targets.values()))
        calib = work / "calib-stream"
        factorised = f"all {len(targets)}"
        if estimate > 60 * args.factorisation_minutes:
            layer = max(int(t.split(".layers.")[1].split(".")[0]) for t in targets)
            last = [t.removeprefix("model.") for t in targets if f".layers.{layer}." in t]
            shutil.rmtree(calib)
            calib = work / "calib-last-layer"
            commands.append(shell(calibrate(path, calib, args, "--target-modules", ",".join(last)).command))
            factorised = f"{len(last)} (layer {layer})"
            notes.append(
                f"- {name}, init: factorising all {len(targets)} targets would take about {estimate / 60:.0f} min "
                f"here (one tlora_a per shape, timed); the init ran on a calibration of layer {layer}'s "
                f"{len(last)} projections, one of each shape, which peaks like any module."
            )
        wait_until_quiet(args.max_load)
        command = [tlora_script(), "init", "--model", path, "--calibration", calib, "--budget-rank", args.budget_rank]
        command += ["--device", "cpu", "--quiet", "--overwrite", "-o", work / "adapter"]
        init = run_measured(command).check()
        commands.append(shell(init.command))
        init_timings = timings(work / "adapter", "tlora_metadata.json")
        rows.append(
            [
                name,
                f"{disk / 1e9:.2f} GB",
                f"{params / 1e9:.3f} B",
                fmt_mib(stream.peak_rss_mib),
                f"{calib_size / 1e9:.2f} GB",
                whole_rss,
                f"{stream.wall_s:.1f}",
                whole_wall,
                fmt_mib(init.peak_rss_mib),
                f"{init.wall_s:.1f}",
                f"{init_timings['factorisation']:.1f}",
                factorised,
                f"{stream.load_at_start:.2f}",
            ]
        )
        shutil.rmtree(work)

    table = markdown_table(
        [
            "model",
            "checkpoint on disk",
            "params",
            "peak RSS calibrate, stream",
            "calibration folder",
            "peak RSS calibrate, whole",
            "wall s, stream",
            "wall s, whole",
            "peak RSS init --calibration",
            "wall s, init",
            "factorisation s",
            "modules factorised",
            "load at start",
        ],
        rows,
    )
    phases = markdown_table(["model (stream)", *(f"{p} s" for p in STREAM_PHASES), "process wall s"], phase_rows)
    append_results(
        args.results,
        f"Peak host memory, N={args.num_samples}, T={args.seq_len}, CPU",
        [table, phases],
        commands,
        "\n".join(notes),
    )


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return 1024 * int(next(line for line in f if line.startswith("MemAvailable")).split()[1])


if __name__ == "__main__":
    main()
