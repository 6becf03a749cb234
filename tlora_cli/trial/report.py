"""A trial's result: the table (method x rate) in the terminal and as JSON, the loss curves as a picture."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rich.table import Table

from ..errors import TloraError
from ..outputs.ownership import TRIAL_FORMAT as FORMAT
from .arms import ArmResult

REFERENCE = "random"  # plain LoRA, what every other start is measured against


def summary(results: list[ArmResult], baseline: float) -> dict:
    """Every arm, each method's best rate, and the winner, with its margin over plain LoRA at LoRA's best."""
    best: dict[str, ArmResult] = {}
    for r in results:
        if r.method not in best or r.heldout_loss < best[r.method].heldout_loss:
            best[r.method] = r
    winner = min(best.values(), key=lambda r: r.heldout_loss)
    reference = best.get(REFERENCE)
    delta = {m: r.heldout_loss - reference.heldout_loss for m, r in best.items()} if reference else {}
    return {
        "format": FORMAT,
        "baseline_loss": baseline,
        "arms": [
            {
                "method": r.method,
                "lr": r.lr,
                "heldout_loss": r.heldout_loss,
                "seconds": r.seconds,
                "train_loss": r.train_loss,
            }
            for r in results
        ],
        "best": {
            m: {"lr": r.lr, "heldout_loss": r.heldout_loss, "delta_vs_lora": delta.get(m)} for m, r in best.items()
        },
        "winner": {"method": winner.method, "lr": winner.lr, "heldout_loss": winner.heldout_loss},
    }


def table(result: dict) -> Table:
    """One row per arm, by method and rate; each method's best in bold, the winner starred, and the margin of each
    best over plain LoRA's best (negative: better than LoRA)."""
    table = Table(title=f"held-out loss (no fine-tune: {result['baseline_loss']:.4f})", title_justify="left")
    for name, justify in (("method", "left"), ("lr", "right"), ("held-out loss", "right"), ("vs LoRA", "right"),
                          ("s", "right")):  # fmt: skip
        table.add_column(name, justify=justify)
    for arm in sorted(result["arms"], key=lambda a: (list(result["best"]).index(a["method"]), a["lr"])):
        best = result["best"][arm["method"]]
        is_best = best["lr"] == arm["lr"]
        star = " *" if is_best and result["winner"]["method"] == arm["method"] else ""
        delta = best["delta_vs_lora"] if is_best and best["delta_vs_lora"] is not None else None
        style = "bold" if is_best else None
        table.add_row(
            f"{arm['method']}{star}", f"{arm['lr']:.3g}", f"{arm['heldout_loss']:.4f}",
            "" if delta is None else f"{delta:+.4f}", f"{arm['seconds']:.0f}", style=style,
        )  # fmt: skip
    return table


def write_curves(result: dict, path: Path) -> bool:
    """Each arm's training loss per step (each method's best rate drawn thick); False without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib  # optional: the plot extra

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    colours = {m: f"C{i}" for i, m in enumerate(result["best"])}
    for arm in result["arms"]:
        best = result["best"][arm["method"]]["lr"] == arm["lr"]
        ax.plot(
            arm["train_loss"], color=colours[arm["method"]], linewidth=2 if best else 0.6, alpha=1 if best else 0.5,
            label=f"{arm['method']} {arm['lr']:g}" if best else None,
        )  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    try:
        fig.savefig(path, dpi=110, metadata={"Software": None})
    except (OSError, ValueError) as e:
        raise TloraError(f"cannot write {path}: {e}".splitlines()[0]) from e
    finally:
        plt.close(fig)
    return True
