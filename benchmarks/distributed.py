"""torchrun on this 2-core CPU, side by side in one run (issue 18).

1. SmolLM2-135M (the built-in model), `tlora init --num-samples 16 --seq-len 128 --device cpu`: one
   process with 2 threads against `torchrun --nproc-per-node 2` with 1 thread per rank: the same work on
   the same two cores. Rounds alternate the order; the median is reported, with tlora's phase timings
   (rank 0's) and a check that both adapters agree.
2. Factorisation of a Llama-2-7B-shaped model's 224 modules (32 layers x q, k, v, o, gate, up, down) at
   rank 16, split over K = 1, 2, 4, 8 ranks by tlora's own ownership (methods.factorise.input_owners). One module
   of each of the three shapes is timed (random W, a covariance with a spectrum over six decades); every
   layer has the same shapes, so a rank's time is the sum of its modules' times: the K ranks of one node
   would take the largest of them (the factorisation phase's wall time), before gathering to rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    BENCH_DIR,
    REPO,
    append_results,
    load_average,
    markdown_table,
    run_measured,
    shell,
    tlora_script,
    wait_until_quiet,
)

from tlora_cli.allocation import ModuleAllocation
from tlora_cli.distributed import Dist
from tlora_cli.factorisation import tlora_a
from tlora_cli.methods.factorise import factorisation_cost, input_owners
from tlora_cli.model.builtin import builtin_model_path

SMOL_ARGS = ["--num-samples", "16", "--seq-len", "128", "--device", "cpu", "--quiet"]
HIDDEN, MLP, LAYERS, RANK = 4096, 11008, 32, 16
# (module, out, in, the module whose input it reads): q/k/v read one input, gate/up another.
LLAMA_MODULES = [
    ("self_attn.q_proj", HIDDEN, HIDDEN, "self_attn.q_proj"),
    ("self_attn.k_proj", HIDDEN, HIDDEN, "self_attn.q_proj"),
    ("self_attn.v_proj", HIDDEN, HIDDEN, "self_attn.q_proj"),
    ("self_attn.o_proj", HIDDEN, HIDDEN, "self_attn.o_proj"),
    ("mlp.gate_proj", MLP, HIDDEN, "mlp.gate_proj"),
    ("mlp.up_proj", MLP, HIDDEN, "mlp.gate_proj"),
    ("mlp.down_proj", HIDDEN, MLP, "mlp.down_proj"),
]


def smollm2_commands(model: Path, folder: Path, name: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of one SmolLM2 run: `single` (1 x 2 threads) or `torchrun` (2 x 1)."""
    out = folder / name
    args = ["init", "--model", str(model), *SMOL_ARGS, "--overwrite", "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if name == "single":
        return [tlora_script(), *args], {**env, "OMP_NUM_THREADS": "2"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*torchrun, tlora_script(), *args], {**env, "OMP_NUM_THREADS": "1"}


def smallest_cosine(a: Path, b: Path) -> float:
    """The smallest principal-angle cosine between the two adapters' A matrices, over every module."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    worst = 1.0
    for key in (k for k in ta if "lora_A" in k):
        qa, qb = torch.linalg.qr(ta[key].double().T)[0], torch.linalg.qr(tb[key].double().T)[0]
        worst = min(worst, torch.linalg.svdvals(qa.T @ qb).min().item())
    return worst


def bench_smollm2(rounds: int, max_load: float) -> tuple[str, list[str], str]:
    model = builtin_model_path()
    names = ["single", "torchrun"]
    walls: dict[str, list[float]] = {n: [] for n in names}
    loads: dict[str, list[float]] = {n: [] for n in names}
    commands: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tlora-dist-") as tmp:
        folder = Path(tmp)
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                command, env = smollm2_commands(model, folder, name)
                wait_until_quiet(max_load)
                measured = run_measured(command, env=env).check()
                walls[name].append(measured.wall_s)
                loads[name].append(measured.load_at_start)
                if r == 0:
                    commands.append(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {shell(command)}")
        phases = {n: json.loads((folder / n / "tlora_metadata.json").read_text())["timings"] for n in names}
        metas = [json.loads((folder / n / "tlora_metadata.json").read_text()) for n in names]
        same_ranks = [m["rank"] for m in metas[0]["modules"]] == [m["rank"] for m in metas[1]["modules"]]
        cosine = smallest_cosine(folder / "single", folder / "torchrun")
    single = statistics.median(walls["single"])
    rows = []
    for name, label in zip(names, ["1 process x 2 threads", "torchrun: 2 ranks x 1 thread"], strict=True):
        wall = statistics.median(walls[name])
        p = phases[name]
        calib = sum(p.get(k, 0.0) for k in ("capture", "forward", "backward"))
        factorisation = p.get("factorisation", 0.0)
        row = [label, f"{wall:.1f}", f"{single / wall:.2f}x", f"{calib:.1f}", f"{factorisation:.1f}"]
        rows.append([*row, f"{max(loads[name]):.2f}"])
    headers = ["SmolLM2-135M, N=16, T=128", "wall s (median)", "speed-up", "capture+forward+backward s"]
    table = markdown_table([*headers, "factorisation s", "load at start (max)"], rows)
    note = (
        f"Median of {rounds} rounds, order alternating. Phase seconds are rank 0's last run. The two adapters: "
        f"same ranks {same_ranks}, smallest principal-angle cosine between their A matrices {cosine:.6f}."
    )
    return table, commands, note


def llama_allocations() -> tuple[list[ModuleAllocation], dict[str, str]]:
    allocations, input_of = [], {}
    for layer in range(LAYERS):
        for module, out, inp, reads in LLAMA_MODULES:
            name = f"model.layers.{layer}.{module}"
            allocations.append(ModuleAllocation(name, out, inp, 1.0, 1 / 224, RANK, float(RANK)))
            input_of[name] = f"model.layers.{layer}.{reads}"
    return allocations, input_of


def time_shapes() -> dict[tuple[int, int], float]:
    """Seconds of tlora_a for one module of each distinct (out, in) shape."""
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    for out, inp in sorted({(o, i) for _, o, i, _ in LLAMA_MODULES}):
        weight = torch.randn(out, inp, generator=generator) / inp**0.5
        basis = torch.linalg.qr(torch.randn(inp, inp, generator=generator, dtype=torch.float64))[0]
        spectrum = torch.logspace(0, -6, inp, dtype=torch.float64)
        covariance = ((basis * spectrum) @ basis.T).float()
        start = time.perf_counter()
        tlora_a(weight, covariance, RANK)
        seconds[(out, inp)] = time.perf_counter() - start
    return seconds


def bench_split() -> tuple[str, str]:
    seconds = time_shapes()
    allocations, input_of = llama_allocations()
    total = sum(seconds[(a.out_features, a.in_features)] for a in allocations)
    rows = []
    for k in (1, 2, 4, 8):
        owners = input_owners(allocations, input_of, Dist(0, k))
        per_rank = [0.0] * k
        costs = [0.0] * k
        for a in allocations:
            rank = owners[input_of[a.name]]
            per_rank[rank] += seconds[(a.out_features, a.in_features)]
            costs[rank] += factorisation_cost(a)
        slowest = max(per_rank)
        rows.append(
            [k, f"{slowest:.0f}", f"{min(per_rank):.0f}", f"{total / slowest:.2f}x", f"{max(costs) / min(costs):.3f}"]
        )
    table = markdown_table(
        ["ranks K", "slowest rank s", "fastest rank s", "speed-up", "cost model: heaviest / lightest rank"], rows
    )
    shapes = ", ".join(f"{o}x{i}: {s:.1f} s" for (o, i), s in seconds.items())
    note = (
        f"Llama-2-7B shapes, 224 modules at rank {RANK}, `tlora_a` (float64 product W C and subspace iteration) "
        f"timed once per shape on this CPU ({shapes}); a rank's time is the sum over the modules it owns."
    )
    return table, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-split", action="store_true", help="only the SmolLM2 comparison")
    parser.add_argument("--max-load", type=float, default=1.0, help="wait for this 1-minute load before each run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"load average at start: {load_average():.2f}", file=sys.stderr)
    smol_table, commands, smol_note = bench_smollm2(args.rounds, args.max_load)
    tables, notes = [smol_table], [smol_note]
    if not args.skip_split:
        wait_until_quiet(args.max_load)
        split_table, split_note = bench_split()
        tables.append(split_table)
        notes.append(split_note)
    append_results(
        BENCH_DIR / "RESULTS-speed.md",
        "torchrun on a 2-core CPU: 2 ranks x 1 thread against 1 process x 2 threads; a 7B's factorisation over K ranks",
        tables,
        commands,
        "\n\n".join(notes),
    )


if __name__ == "__main__":
    main()
