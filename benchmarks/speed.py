"""Wall time of `tlora init` per phase, beside PEFT's CorDA and EVA and a plain forward+backward, on the same samples.

SmolLM2-135M on CPU, N samples of exactly T tokens. The built-in math problems are ~120 tokens
each, so consecutive problems are joined into plain-text samples of at least T tokens and written
to a .jsonl file that every method reads. Everything runs in float32 (what `tlora` picks on CPU)
with the same number of torch threads.

What is timed:
- tlora: the default (`--engine auto`, the batch size it picks), then whole and stream with batches of
  one and with the default batch (once, where that is 1): the whole `tlora init` process (imports
  included), and its own per-phase timings from tlora_metadata.json; one untimed `tlora init
  --num-samples 1` runs first as warm-up.
- floor: forward + backward of every sample in transformers, in batches of one and of the default run's
  batch size, with only the target projections' weights requiring grad; the model load and one
  warm-up batch are not timed.
- CorDA: `preprocess_corda` (covariances + one SVD per target), then `get_peft_model`.
- EVA: `get_eva_state_dict` (forward passes with incremental SVD until converged), then the LoRA init.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from common import (
    BENCH_DIR,
    SUFFIXES,
    Measured,
    append_results,
    markdown_table,
    run_measured,
    shell,
    tlora_script,
    wait_until_quiet,
)

# tlora's phases; the whole engine has forward_backward where the streaming one has capture, forward, backward
# (and layer_reads, load_wait: time reading layers, and the part of it the computation waited for).
PHASES = ("data", "load", "capture", "forward", "backward", "forward_backward", "layer_reads", "load_wait")
PHASES += ("fingerprint", "factorisation", "writing")
# (engine, --batch-size): None is the default batch size tlora picks from free memory.
TLORA_RUNS = (("auto", None), ("whole", 1), ("whole", None), ("stream", 1), ("stream", None))
COMPUTE_PHASES = ("capture", "forward", "backward", "forward_backward")
FINISHING_PHASES = ("factorisation", "writing")
BACKGROUND = ("layer_reads", "load_wait")  # inside the forward and backward phases already


@dataclass
class Round:
    figures: dict[tuple[str, str], tuple[float, float]]
    phases: dict[str, dict[str, float]]
    commands: list[str]
    eva_passes: int


def packed_texts(tokenizer, num_samples: int, seq_len: int) -> list[str]:
    """Join consecutive built-in problems (question and worked answer) until each text has seq_len tokens."""
    raw = resources.files("tlora_cli.data").joinpath("math_word_problems.jsonl.gz").read_bytes()
    problems = [json.loads(line) for line in gzip.decompress(raw).decode().splitlines() if line.strip()]
    texts, current = [], ""
    for problem in problems:
        current += problem["prompt"] + problem["completion"] + "\n\n"
        if len(tokenizer(current).input_ids) >= seq_len:
            texts.append(current)
            current = ""
            if len(texts) == num_samples:
                return texts
    raise SystemExit(f"the built-in problems make only {len(texts)} samples of {seq_len} tokens")


def write_packed(tokenizer, num_samples: int, seq_len: int, path: Path) -> list[str]:
    """packed_texts as a .jsonl file of {"text": ...} records, which every tlora run reads; returns the texts."""
    texts = packed_texts(tokenizer, num_samples, seq_len)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model.requires_grad_(False)


def timed(fn: Callable[[], object], max_load: float) -> tuple[float, float]:
    """(seconds, load average at start) of one call, started once the machine is quiet."""
    load = wait_until_quiet(max_load)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, load


def floor(path: Path, samples: list[torch.Tensor], batch_size: int, max_load: float) -> tuple[float, float]:
    """Forward + backward per batch, gradients only for the targets' weights: what any method must at least do.
    The samples all have the same length, so batches need no padding."""
    model = load_model(path)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in SUFFIXES:
            module.weight.requires_grad_(True)

    batches = [torch.cat(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]

    def run(some: list[torch.Tensor]) -> None:
        for ids in some:
            model(input_ids=ids, labels=ids).loss.backward()

    run(batches[:1])  # warm-up
    model.zero_grad(set_to_none=True)
    return timed(lambda: run(batches), max_load)


def corda(path: Path, samples: list[torch.Tensor], rank: int, max_load: float) -> tuple[float, float, float]:
    """(preprocess_corda s, get_peft_model s, load at start), IPM mode as in PEFT's example."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = load_model(path)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(SUFFIXES),
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method="ipm"),
    )
    with torch.no_grad():
        model(input_ids=samples[0])  # warm-up

    def run_model() -> None:
        for ids in samples:
            model(input_ids=ids)

    seconds, load = timed(lambda: preprocess_corda(model, config, run_model=run_model), max_load)
    start = time.perf_counter()
    get_peft_model(model, config)
    return seconds, time.perf_counter() - start, load


def eva(path: Path, samples: list[torch.Tensor], rank: int, max_load: float) -> tuple[float, float, int, float]:
    """(get_eva_state_dict s, LoRA init s, forward passes, load at start); EVA cycles the data until converged.

    The SVDs run on the PEFT model (adapters disabled inside), so the state dict's keys are the ones
    initialize_lora_eva_weights looks up.
    """
    from peft import EvaConfig, LoraConfig, get_eva_state_dict, get_peft_model, initialize_lora_eva_weights

    model = load_model(path)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(SUFFIXES), init_lora_weights="eva", eva_config=EvaConfig()
    )
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in samples]
    start = time.perf_counter()
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    init = time.perf_counter() - start
    with torch.no_grad():
        peft_model(**batches[0])  # warm-up
    passes = 0

    def forward(m: torch.nn.Module, inputs: dict) -> object:
        nonlocal passes
        passes += 1
        return m(**inputs)

    state: dict = {}
    seconds, load = timed(
        lambda: state.update(get_eva_state_dict(peft_model, batches, forward_fn=forward, show_progress_bar=False)),
        max_load,
    )
    start = time.perf_counter()
    initialize_lora_eva_weights(peft_model, eva_state_dict=state)
    return seconds, init + time.perf_counter() - start, passes, load


def tlora(
    model: Path, data: Path, out: Path, args: argparse.Namespace, engine: str, num_samples: int, batch: int | None
) -> Measured:
    command = [tlora_script(), "calibrate" if args.calibrate_only else "init", "--model", model, "--data", data]
    command += ["--num-samples", num_samples, "--seq-len", args.seq_len, "--device", "cpu"]
    command += [] if args.calibrate_only else ["--budget-rank", args.budget_rank]
    command += ["--engine", engine, *(["--batch-size", batch] if batch else []), "--quiet", "--overwrite", "-o", out]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    wait_until_quiet(args.max_load)
    return run_measured(command, env=env).check()


def record_file(args: argparse.Namespace) -> str:
    """What the run writes its settings and timings into: a calibration folder's manifest, or the metadata."""
    return "calibration.json" if args.calibrate_only else "tlora_metadata.json"


def one_round(path: Path, data: Path, samples: list[torch.Tensor], work: Path, args: argparse.Namespace) -> Round:
    """Every method once: (method, what is timed) -> (seconds, load at start), tlora's phases, the commands."""
    figures: dict[tuple[str, str], tuple[float, float]] = {}
    phases: dict[str, dict[str, float]] = {}
    commands = []
    default_batch = 1
    for engine, batch in TLORA_RUNS:
        if batch is None and engine != "auto" and default_batch == 1:
            continue  # the default batch is 1 here (a CPU): the batch-1 run of this engine is this very run
        out = work / f"{engine}-{batch or 'default'}"
        run = tlora(path, data, out, args, engine, args.num_samples, batch)
        commands.append(shell(run.command))
        recorded = json.loads((out / record_file(args)).read_text())
        calibration = recorded["settings"] if args.calibrate_only else recorded["calibration"]
        if engine == "auto":
            default_batch = calibration["batch_size"]
        method = f"tlora --engine {engine}" + (f" --batch-size {batch}" if batch else "")
        method += f" ({calibration['engine']['used']}, batch {calibration['batch_size']})"
        phases[method] = recorded["timings"]
        compute = sum(v for k, v in phases[method].items() if k in COMPUTE_PHASES)
        calib = sum(v for k, v in phases[method].items() if k not in FINISHING_PHASES and k not in BACKGROUND)
        figures[method, "its forward and backward phases"] = (compute, run.load_at_start)
        figures[method, "calibration: every phase but factorisation and writing"] = (calib, run.load_at_start)
        figures[method, "the whole process: imports, calibration" + ("" if args.calibrate_only else ", A, writing")] = (
            run.wall_s,
            run.load_at_start,
        )
    for batch in dict.fromkeys((1, default_batch)):
        figures[f"floor, batch {batch}", "forward + backward of every sample"] = floor(
            path, samples, batch, args.max_load
        )
    passes = 0
    if args.peft:
        preprocess, init, load = corda(path, samples, args.budget_rank, args.max_load)
        figures["CorDA (IPM)", "preprocess_corda"] = (preprocess, load)
        figures["CorDA (IPM)", "preprocess_corda + get_peft_model"] = (preprocess + init, load)
        state, init, passes, load = eva(path, samples, args.budget_rank, args.max_load)
        figures["EVA", "get_eva_state_dict"] = (state, load)
        figures["EVA", "get_eva_state_dict + LoRA init"] = (state + init, load)
    return Round(figures, phases, commands, passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--budget-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="Run everything this often; report medians.")
    parser.add_argument("--max-load", type=float, default=1.0, help="Wait for the load average to drop to this.")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS-speed.md")
    parser.add_argument("--peft", action=argparse.BooleanOptionalAction, default=True, help="Also CorDA and EVA.")
    parser.add_argument("--calibrate-only", action="store_true", help="Time `tlora calibrate`, not `tlora init`.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    from tlora_cli.model.builtin import builtin_model_path

    path = builtin_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory(prefix="tlora-speed-") as tmp:
        measure(args, path, tokenizer, Path(tmp))


def measure(args: argparse.Namespace, path: Path, tokenizer, work: Path) -> None:
    """Every round in a scratch folder, removed afterwards."""
    data = work / "packed.jsonl"
    texts = write_packed(tokenizer, args.num_samples, args.seq_len, data)
    # Tokenized as SPEC.md says tlora does: the tokenizer's defaults, truncated on the right.
    samples = [torch.tensor([tokenizer(t).input_ids[: args.seq_len]]) for t in texts]

    tlora(path, data, work / "warm-up", args, "stream", 1, None)
    rounds = [one_round(path, data, samples, work, args) for _ in range(args.repeats)]
    tokens = json.loads((work / "auto-default" / record_file(args)).read_text())
    tokens = tokens["num_tokens"] if args.calibrate_only else tokens["calibration"]["num_tokens"]

    floor_s = statistics.median(r.figures["floor, batch 1", "forward + backward of every sample"][0] for r in rounds)
    rows = []
    for method, what in rounds[0].figures:
        seconds = statistics.median(r.figures[method, what][0] for r in rounds if (method, what) in r.figures)
        load = statistics.median(r.figures[method, what][1] for r in rounds if (method, what) in r.figures)
        rows.append([method, what, f"{seconds:.1f}", f"{seconds / floor_s:.2f}x", f"{load:.2f}"])
    phase_rows = [
        [method, *(f"{statistics.median(r.phases[method].get(p, 0.0) for r in rounds):.1f}" for p in PHASES)]
        for method in rounds[0].phases
    ]
    append_results(
        args.results,
        f"Wall time, SmolLM2-135M, N={args.num_samples}, T={args.seq_len} ({tokens} tokens), CPU, "
        f"{args.threads} threads, float32",
        [
            markdown_table(["method", "what is timed", "seconds", "vs floor, batch 1", "load at start"], rows),
            markdown_table(["tlora run", *(f"{p} s" for p in PHASES)], phase_rows),
        ],
        [c for r in rounds for c in r.commands],
        f"Median of {args.repeats} round(s). Where the default batch is 1, each engine runs once, at batch 1. "
        f"Samples: {args.num_samples} texts of consecutive built-in math "
        f"problems, cut to {args.seq_len} tokens. "
        + (
            f"EVA cycles through them until its SVDs converge: {', '.join(str(r.eva_passes) for r in rounds)} "
            "forward passes."
            if args.peft
            else "CorDA and EVA not run (--no-peft)."
        ),
    )


if __name__ == "__main__":
    main()
