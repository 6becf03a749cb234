"""benchmarks/gpu_check.sh, ready for the session that gets a GPU: its dry run on CPU runs every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~25 s on two busy cores: pytest's collection and three tiny `tlora init` runs
def test_the_dry_run_runs_every_command_and_writes_the_results_table(tmp_path):
    results = tmp_path / "RESULTS-gpu.md"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [REPO / "benchmarks" / "gpu_check.sh", "--dry-run", "--results", results],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tests collected" in done.stdout  # the CUDA tests exist and import
    for test in (  # every file's CUDA tests: those marked `cuda`, whatever their names
        "test_streaming.py::test_a_tensor_leaving_the_gpu_is_read_as_it_was_when_put",
        "test_streaming.py::test_streamed_on_cuda_equals_the_whole_model_on_cpu[mistral]",
        "test_batching.py::test_batched_stream_on_cuda_with_read_ahead_equals_a_batch_of_one_on_cpu",
        "test_store.py::test_a_file_from_the_gpu_holds_the_tensor_as_it_was_when_put",
        "test_factorisation.py::test_ill_conditioned_products_match_the_float64_svd[shape2-40-cuda]",
    ):
        assert f"tests/{test}\n" in done.stdout, test
    assert "-cpu]" not in done.stdout  # nothing else
    text = results.read_text()
    assert "## tlora init on cpu: tiny-llama (random bf16), N=4, T=64, budget rank 8 (DRY RUN" in text
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    for column in ("engine used", "batch", "wall s", "forward_backward s", "load_wait s", "peak device memory"):
        assert f"| {column} |" in header, column
    assert header.endswith("| peak host RSS |")
    rows = [
        line.split(" | ") for line in text.splitlines() if line.startswith("| auto ") or line.startswith("| stream")
    ]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("| auto", "whole", "1"),  # a CPU runs batches of one by default (sizing.batch_limit)
        ("| stream", "stream", "1"),
        ("| stream, no read-ahead", "stream", "1"),
    ]
    assert all(r[-2] == "n/a (CPU)" and r[-1].endswith("MiB |") for r in rows)
    commands = [line for line in text.splitlines() if line.startswith("- `tlora init ")]
    assert len(commands) == 3 and all("--budget-rank 8 --device cpu" in c for c in commands)
    assert "--no-read-ahead" in commands[2]
