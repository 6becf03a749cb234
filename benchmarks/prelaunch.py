"""The pre-launch of `tlora init --method lora-init` against a plain PEFT + torch loop doing the same steps.

Both train the same LoRA (rank, alpha, targets, PEFT's Kaiming start with tlora's seeds) on the same samples in the
same order, one sample at a time (the CPU default), with AdamW and the same warm-up, on SmolLM2-135M in float32.
tlora's figure is its `prelaunch` phase (from the adapter's metadata); the reference times its own loop the same
way, from the first step to the last. Peak RSS is each whole process's. The two alternate, pair by pair, and the
ratio of each pair is reported with the medians (the goal: tlora within 1.1x of the plain loop).

    python benchmarks/prelaunch.py [--steps 20 --batch-size 4 --seq-len 256 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

from common import append_results, fmt_mib, markdown_table, run_measured, shell, wait_until_quiet

RESULTS = Path(__file__).resolve().parent / "RESULTS-speed.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reference(args: argparse.Namespace) -> None:
    """The plain loop: PEFT's LoRA, a torch AdamW, the loss as tlora's (mean over the batch's answer tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tlora_cli.data import load_calibration_set
    from tlora_cli.factorisation import random_a
    from tlora_cli.methods.prelaunch import cycled
    from tlora_cli.model.builtin import builtin_model_path
    from tlora_cli.model.loading import load_tokenizer

    path = builtin_model_path()
    calib = load_calibration_set(None, load_tokenizer(path), args.steps * args.batch_size, args.seq_len, 0)
    order = cycled(len(calib.samples), args.steps * args.batch_size, 0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(model, config)
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            seed = zlib.crc32(f"0:{name.removeprefix('base_model.model.')}".encode())
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(
                    random_a(module.in_features, args.rank, torch.Generator().manual_seed(seed))
                )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    start = time.perf_counter()
    for k in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-4 * (k + 1) / args.steps
        batch = [calib.samples[i] for i in order[k * args.batch_size : (k + 1) * args.batch_size]]
        total = sum(sum(label != -100 for label in s.labels[1:]) for s in batch)
        for s in batch:
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(s.labels[1:]), reduction="sum") / total
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(json.dumps({"loop_s": time.perf_counter() - start}), file=sys.stderr)


def tlora_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tlora_cli",
        "init",
        "--method",
        "lora-init",
        "--device",
        "cpu",
        "--budget-rank",
        str(args.rank),
        "--prelaunch-steps",
        str(args.steps),
        "--prelaunch-batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "-q",
        "-o",
        str(out),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-load", type=float, default=1.0)
    parser.add_argument("--reference", action="store_true", help="Run the plain loop in this process.")
    args = parser.parse_args()
    if args.reference:
        reference(args)
        return
    flags = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    ref_command = [sys.executable, __file__, "--reference", *flags, "--rank", str(args.rank)]
    rows, ratios = {"tlora": [], "peft": []}, []
    with tempfile.TemporaryDirectory(prefix="tlora-prelaunch-bench-") as scratch:
        for round_ in range(args.rounds):
            wait_until_quiet(args.max_load)
            out = Path(scratch) / f"out{round_}"
            ours = run_measured(tlora_command(args, out)).check()
            loop = json.loads((out / "tlora_metadata.json").read_text())["timings"]["prelaunch"]
            theirs = run_measured(ref_command).check()
            ref_loop = json.loads(theirs.stderr.strip().splitlines()[-1])["loop_s"]
            rows["tlora"].append((loop, ours.peak_rss_mib, ours.wall_s))
            rows["peft"].append((ref_loop, theirs.peak_rss_mib, theirs.wall_s))
            ratios.append(loop / ref_loop)
            print(f"round {round_}: tlora {loop:.1f} s, peft {ref_loop:.1f} s, ratio {loop / ref_loop:.3f}", flush=True)
    table = markdown_table(
        ["run", "training loop s (median)", "min-max", "peak RSS (median)", "whole process s (median)"],
        [
            [
                name,
                f"{statistics.median(r[0] for r in runs):.1f}",
                f"{min(r[0] for r in runs):.1f}-{max(r[0] for r in runs):.1f}",
                fmt_mib(statistics.median(r[1] for r in runs)),
                f"{statistics.median(r[2] for r in runs):.1f}",
            ]
            for name, runs in rows.items()
        ],
    )
    spread = f"min {min(ratios):.3f}, max {max(ratios):.3f}"
    ratio = f"tlora / peft, pair by pair: median {statistics.median(ratios):.3f} ({spread})"
    append_results(
        RESULTS,
        f"Pre-launch (lora-init) against a plain PEFT + torch loop: {args.steps} steps x {args.batch_size} samples, "
        f"T={args.seq_len}, r={args.rank}",
        [table, ratio],
        [shell(tlora_command(args, Path("OUT"))), shell(ref_command)],
    )


if __name__ == "__main__":
    main()
