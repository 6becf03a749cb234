"""`tlora trial` against the same arms run separately, each as its own `tlora trial --methods M --lrs R`.

One trial loads the model once, calibrates once and builds every start from that; separate runs each do all of it
again. Both run on the built-in SmolLM2 and math set with the same settings, so every arm's held-out loss must be the
same number in both (checked and reported); what differs is the time and the memory.

    python benchmarks/trial.py [--methods tlora,random,w-svd --lrs 2.5e-4,1e-3 --steps 10 --eval-samples 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import append_results, fmt_mib, markdown_table, run_measured, shell, wait_until_quiet

RESULTS = Path(__file__).resolve().parent / "RESULTS-speed.md"


def trial_command(args: argparse.Namespace, methods: str, lrs: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "tlora_cli", "trial", "--methods", methods, "--lrs", lrs, "--steps", str(args.steps),
        "--eval-samples", str(args.eval_samples), "--num-samples", str(args.num_samples), "--seq-len",
        str(args.seq_len), "--device", "cpu", "--json", "-q", "-o", str(out),
    ]  # fmt: skip


def losses(stdout_file: Path) -> dict[tuple[str, float], float]:
    result = json.loads(stdout_file.read_text())
    return {(a["method"], a["lr"]): a["heldout_loss"] for a in result["arms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="tlora,random,w-svd")
    parser.add_argument("--lrs", default="2.5e-4,1e-3")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-load", type=float, default=1.0)
    args = parser.parse_args()
    methods, lrs = args.methods.split(","), args.lrs.split(",")
    with tempfile.TemporaryDirectory(prefix="tlora-trial-bench-") as scratch:
        folder = Path(scratch)
        wait_until_quiet(args.max_load)
        whole_command = trial_command(args, args.methods, args.lrs, folder / "whole")
        whole = run_measured(["sh", "-c", f"exec {shell(whole_command)} > {folder / 'whole.json'}"]).check()
        shared = losses(folder / "whole.json")
        separate, rows, equal = [], [], True
        for method in methods:
            for lr in lrs:
                out = folder / f"{method}-{lr}"
                command = trial_command(args, method, lr, out)
                run = run_measured(["sh", "-c", f"exec {shell(command)} > {out}.json"]).check()
                separate.append(run)
                ((key, loss),) = losses(Path(f"{out}.json")).items()
                equal &= loss == shared[key]
                rows.append([method, lr, f"{shared[key]:.6f}", f"{loss:.6f}", f"{run.wall_s:.1f}"])
    total = sum(r.wall_s for r in separate)
    table = markdown_table(["run", "wall s", "peak RSS"], [
        [f"one trial, {len(rows)} arms", f"{whole.wall_s:.1f}", fmt_mib(whole.peak_rss_mib)],
        [f"{len(rows)} separate trials of one arm each (sum)", f"{total:.1f}",
         fmt_mib(max(r.peak_rss_mib for r in separate))],
    ])  # fmt: skip
    arms = markdown_table(["method", "lr", "held-out loss (one trial)", "(its own trial)", "own trial s"], rows)
    verdict = f"one trial / separate runs: {whole.wall_s / total:.3f}; every arm's loss the same in both: {equal}"
    append_results(
        RESULTS,
        f"tlora trial: one run of {len(rows)} arms against each arm alone ({args.steps} steps, SmolLM2, CPU)",
        [table, arms, verdict],
        [shell(whole_command), shell(trial_command(args, "METHOD", "LR", Path("OUT")))],
    )


if __name__ == "__main__":
    main()
