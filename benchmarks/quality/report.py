"""Tables and the loss-curve plot from run.py's results JSON: what RESULTS-quality.md quotes.

Writes the tables (markdown) to stdout and the plot to a PNG; the numbers are never edited by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a build machine
import matplotlib.pyplot as plt
from run import ARMS, QUALITY_DIR


def mean_std(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """mean ± sample standard deviation over seeds (just the value when there is one seed)."""
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def runs_by_arm(results: dict) -> dict[str, list[dict]]:
    by_arm: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for run in results["runs"].values():
        by_arm[run["arm"]].append(run)
    return {arm: sorted(runs, key=lambda r: r["seed"]) for arm, runs in by_arm.items() if runs}


def main_table(results: dict) -> str:
    """Per arm: held-out loss and exact match over seeds, the paired difference to LoRA, parameters and time."""
    by_arm = runs_by_arm(results)
    lora = {r["seed"]: r["heldout_loss"] for r in by_arm.get("lora", [])}
    base = results["baseline"]
    calib_s = results["calibration"]["seconds"]
    rows = [
        "| arm | held-out loss | Δ loss vs LoRA (paired) | exact match % | trainable params | "
        "init s (calibrate + finish) | train s | eval s | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| no fine-tune (B = 0, every arm at step 0) | {base['heldout_loss']:.3f} | | "
        f"{100 * base['exact_match']:.1f} | 0 | | | {base['eval_s']:.0f} | |",
    ]
    for arm, runs in by_arm.items():
        deltas = [r["heldout_loss"] - lora[r["seed"]] for r in runs if r["seed"] in lora]
        inits = [results["inits"][r["init"]]["seconds"] for r in runs]
        rows.append(
            f"| {ARMS[arm][0]} | {mean_std([r['heldout_loss'] for r in runs])} | "
            f"{mean_std(deltas, digits=4) if arm != 'lora' and deltas else ''} | "
            f"{mean_std([r['exact_match'] for r in runs], 100, 1)} | {runs[0]['trainable']:,} | "
            f"{calib_s:.0f} + {statistics.mean(inits):.0f} | {statistics.mean(r['train_s'] for r in runs):.0f} | "
            f"{statistics.mean(r['eval_s'] for r in runs):.0f} | {len(runs)} |"
        )
    return "\n".join(rows)


def allocation_table(results: dict) -> str:
    """Per initialisation: how the allocation spread the rank budget and the scalings alpha_i / r_i."""
    rows = [
        "| init | modules with adapter | total rank | rank min-max | rank share of top 10 % modules | "
        "scaling min / median / max | B params | A+B params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, init in results["inits"].items():
        rows.append(
            f"| {key} | {init['modules_with_adapter']} | {init['total_rank']} | {init['rank_min']}-{init['rank_max']} "
            f"| {100 * init['top10pct_rank_share']:.0f} % | {init['scaling_min']:.2f} / {init['scaling_median']:.2f} "
            f"/ {init['scaling_max']:.2f} | {init['params_b']:,} | {init['params_ab']:,} |"
        )
    return "\n".join(rows)


def per_seed_table(results: dict) -> str:
    """Every run, so that a reader can check the spread and the pairing by seed."""
    rows = [
        "| arm | seed | held-out loss | exact match % | train loss, mean of the last 10 steps |",
        "|---|---|---|---|---|",
    ]
    for arm, runs in runs_by_arm(results).items():
        for r in runs:
            tail = statistics.mean(r["train_loss"][-10:])
            em = 100 * r["exact_match"]
            rows.append(f"| {ARMS[arm][0]} | {r['seed']} | {r['heldout_loss']:.4f} | {em:.1f} | {tail:.4f} |")
    return "\n".join(rows)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: one batch of 8 is a noisy estimate of the loss."""
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot(results: dict, path: Path, window: int) -> None:
    """Training loss per step (mean over seeds, smoothed), and held-out loss per arm with every seed shown."""
    by_arm = runs_by_arm(results)
    fig, (curves, heldout) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    for arm, runs in by_arm.items():
        mean = [statistics.mean(step) for step in zip(*(r["train_loss"] for r in runs))]
        curves.plot(range(1, len(mean) + 1), smooth(mean, window), label=ARMS[arm][0], linewidth=1.6)
    curves.set_xlabel("step (each batch is unseen data: one pass over the training set)")
    curves.set_ylabel(f"training loss (mean over seeds, {window}-step moving average)")
    curves.set_title("Training loss")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    labels = list(by_arm)
    for x, arm in enumerate(labels):
        values = [r["heldout_loss"] for r in by_arm[arm]]
        heldout.scatter([x] * len(values), values, color="grey", s=14, zorder=2)
        heldout.scatter([x], [statistics.mean(values)], color="C0", marker="_", s=400, zorder=3)
    heldout.set_xticks(range(len(labels)), [ARMS[a][0] for a in labels], rotation=35, ha="right", fontsize=8)
    heldout.set_ylabel("held-out answer-token loss (dots: seeds, bar: mean)")
    heldout.set_title("Held-out loss after training")
    heldout.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=QUALITY_DIR / "results.json")
    parser.add_argument("--plot", type=Path, default=QUALITY_DIR / "loss_curves.png")
    parser.add_argument("--window", type=int, default=5)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    plot(results, args.plot, args.window)
    for title, table in (
        ("Results", main_table(results)),
        ("Allocation", allocation_table(results)),
        ("Every run", per_seed_table(results)),
    ):
        print(f"### {title}\n\n{table}\n")


if __name__ == "__main__":
    main()
