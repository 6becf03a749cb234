"""Tables and the loss-curve plot from run.py's results JSON: what RESULTS-quality.md quotes.

Writes the tables (markdown) to stdout and the plot to a PNG; the numbers are never edited by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a build machine
import matplotlib.pyplot as plt
from run import ARMS, QUALITY_DIR


def mean_std(values: list[float], scale: float = 1.0, digits: int = 3, sign: str = "") -> str:
    """mean ± sample standard deviation over seeds (just the value when there is one seed); sign "+" for
    differences."""
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def lr_of(results: dict, run: dict) -> float:
    """Runs of the shared-rate protocol carry no rate of their own: the protocol's."""
    return run.get("lr", results["protocol"].get("lr"))


def runs_by_arm(results: dict) -> dict[str, list[dict]]:
    """The runs that count: every seed at each arm's selected rate, scored on the test split."""
    selected = results.get("selected", {})
    if not selected:  # the shared-rate protocol: every run counts
        return runs_where(results, lambda run: True)
    return runs_where(results, lambda run: lr_of(results, run) == selected.get(run["arm"]))


def runs_where(results: dict, keep: Callable[[dict], bool]) -> dict[str, list[dict]]:
    """Per arm, the runs scored on the test split that `keep` accepts, by seed."""
    by_arm: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for run in results["runs"].values():
        if "heldout_loss" in run and keep(run):
            by_arm[run["arm"]].append(run)
    return {arm: sorted(runs, key=lambda r: r["seed"]) for arm, runs in by_arm.items() if runs}


def loss_cells(arm: str, runs: list[dict], lora: dict[int, float]) -> str:
    """Held-out loss, its difference to LoRA paired by seed, and exact match: the cells every results table has."""
    deltas = [r["heldout_loss"] - lora[r["seed"]] for r in runs if r["seed"] in lora]
    return (
        f"{mean_std([r['heldout_loss'] for r in runs])} | "
        f"{mean_std(deltas, digits=4, sign='+') if arm != 'lora' and deltas else ''} | "
        f"{mean_std([r['exact_match'] for r in runs], 100, 1)}"
    )


def shared_rate_table(results: dict, lr: float) -> str:
    """Every arm scored at one rate (the protocol's extra runs at `--shared-lr`), paired with LoRA at it."""
    by_arm = runs_where(results, lambda run: lr_of(results, run) == lr)
    lora = {r["seed"]: r["heldout_loss"] for r in by_arm.get("lora", [])}
    rows = [
        f"| arm at lr {lr:g} | held-out loss | Δ loss vs LoRA (paired) | exact match % | seeds |",
        "|---|---|---|---|---|",
    ]
    for arm, runs in by_arm.items():
        rows.append(f"| {ARMS[arm][0]} | {loss_cells(arm, runs, lora)} | {len(runs)} |")
    return "\n".join(rows)


def sweep(results: dict) -> dict[str, dict[float, float]]:
    """Per arm, validation loss by learning rate on the sweep seed (empty for the shared-rate protocol)."""
    seed = results["protocol"].get("sweep_seed")
    curves: dict[str, dict[float, float]] = {}
    for run in results["runs"].values():
        if run.get("valid_loss") is not None and run["seed"] == seed:
            curves.setdefault(run["arm"], {})[run["lr"]] = run["valid_loss"]
    return {arm: dict(sorted(curves[arm].items())) for arm in ARMS if arm in curves}


def sweep_table(results: dict) -> str:
    """Validation loss at every rate tried; the selected one in bold."""
    curves = sweep(results)
    lrs = sorted({lr for curve in curves.values() for lr in curve})
    rows = ["| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for arm, curve in curves.items():
        best = results["selected"].get(arm)
        cells = ["" if lr not in curve else f"**{curve[lr]:.4f}**" if lr == best else f"{curve[lr]:.4f}" for lr in lrs]
        rows.append(f"| {ARMS[arm][0]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cpu_seconds(runs: list[dict]) -> str:
    """Mean CPU seconds of training (all threads); runs made before it was recorded have none."""
    values = [r["train_cpu_s"] for r in runs if "train_cpu_s" in r]
    return f"{statistics.mean(values):.0f}" if values else ""


def main_table(results: dict) -> str:
    """Per arm: held-out loss and exact match over seeds, the paired difference to LoRA, parameters and time."""
    by_arm = runs_by_arm(results)
    lora = {r["seed"]: r["heldout_loss"] for r in by_arm.get("lora", [])}
    base = results["baseline"]
    calib_s = results["calibration"]["seconds"]
    rows = [
        "| arm | learning rate | held-out loss | Δ loss vs LoRA (paired) | exact match % | trainable params | "
        "init s (calibrate + finish) | train s (wall) | train CPU s | eval s | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| no fine-tune (B = 0, every arm at step 0) | | {base['heldout_loss']:.3f} | | "
        f"{100 * base['exact_match']:.1f} | 0 | | | | {base['eval_s']:.0f} | |",
    ]
    for arm, runs in by_arm.items():
        inits = [results["inits"][r["init"]]["seconds"] for r in runs]
        rows.append(
            f"| {ARMS[arm][0]} | {lr_of(results, runs[0]):g} | {loss_cells(arm, runs, lora)} | "
            f"{runs[0]['trainable']:,} | "
            f"{calib_s:.0f} + {statistics.mean(inits):.0f} | {statistics.mean(r['train_s'] for r in runs):.0f} | "
            f"{cpu_seconds(runs)} | "
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
    """Training loss per step (mean over seeds, smoothed), validation loss against the learning rate when
    it was swept, and held-out loss per arm with every seed shown."""
    by_arm = runs_by_arm(results)
    curves_by_lr = sweep(results)
    ratios = [3, 2, 2] if curves_by_lr else [3, 2]
    fig, axes = plt.subplots(1, len(ratios), figsize=(7 * len(ratios), 5.5), gridspec_kw={"width_ratios": ratios})
    curves, heldout = axes[0], axes[-1]
    colours = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
    for arm, runs in by_arm.items():
        mean = [statistics.mean(step) for step in zip(*(r["train_loss"] for r in runs))]
        label = f"{ARMS[arm][0]} (lr {lr_of(results, runs[0]):g})"
        curves.plot(range(1, len(mean) + 1), smooth(mean, window), label=label, linewidth=1.6, color=colours[arm])
    curves.set_xlabel("step (each batch is unseen data: one pass over the training set)")
    curves.set_ylabel(f"training loss (mean over seeds, {window}-step moving average)")
    curves.set_title("Training loss at each arm's learning rate")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    if curves_by_lr:
        swept = axes[1]
        for arm, curve in curves_by_lr.items():
            swept.plot(list(curve), list(curve.values()), marker="o", label=ARMS[arm][0], color=colours[arm])
            best = results["selected"].get(arm)
            if best in curve:
                swept.scatter([best], [curve[best]], s=120, facecolors="none", edgecolors=colours[arm], zorder=3)
        swept.set_xscale("log")
        rates = sorted({lr for curve in curves_by_lr.values() for lr in curve})
        swept.set_xticks(rates, [f"{lr:g}" for lr in rates], rotation=35, ha="right", fontsize=8)
        swept.minorticks_off()  # the rates tried are factors of two apart: decade ticks would overlap them
        swept.set_xlabel("peak learning rate (AdamW, linear warm-up and decay)")
        swept.set_ylabel(f"validation loss, seed {results['protocol']['sweep_seed']} (circle: selected)")
        swept.set_title("Learning-rate sweep")
        swept.grid(alpha=0.3)
        swept.legend(fontsize=8)  # arms still sweeping have no curve on the other panels yet
    labels = list(by_arm)
    for x, arm in enumerate(labels):
        values = [r["heldout_loss"] for r in by_arm[arm]]
        heldout.scatter([x] * len(values), values, color="grey", s=14, zorder=2)
        heldout.scatter([x], [statistics.mean(values)], color=colours[arm], marker="_", s=400, zorder=3)
    heldout.set_xticks(range(len(labels)), [ARMS[a][0] for a in labels], rotation=35, ha="right", fontsize=8)
    heldout.set_ylabel("held-out answer-token loss (dots: seeds, bar: mean)")
    heldout.set_title("Test loss after training")
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
    tables = [("Learning-rate sweep (validation loss)", sweep_table(results))] if sweep(results) else []
    tables.append(("Results", main_table(results)))
    if "shared_lr" in results:
        tables.append(("At one shared rate", shared_rate_table(results, results["shared_lr"])))
    tables += [("Allocation", allocation_table(results)), ("Every run", per_seed_table(results))]
    for title, table in tables:
        print(f"### {title}\n\n{table}\n")


if __name__ == "__main__":
    main()
