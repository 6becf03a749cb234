"""`tlora inspect`: what an adapter directory holds and where its budget went."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..adapter.layout import CONFIG, METADATA
from ..adapter.peft import PeftAdapter, read_adapter
from ..errors import TloraError
from ..options import Options, option

LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class InspectOptions(Options):
    modules: bool = option(False, "Every module's rank, alpha, scaling and parameters, as a table.", "--modules")
    plot: Path | None = option(
        None, "Also draw rank and scaling per layer and type into this PNG (or .pdf, .svg; matplotlib)."
    )
    overwrite: bool = option(False, "Replace an existing --plot file.", "--overwrite")


def summarise(folder: Path) -> dict:
    """The adapter as numbers: per module, totals, uniform LoRA at the same r, budget per layer and type."""
    try:
        return _summarise(folder)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, ZeroDivisionError) as e:
        # A hand-edited config or metadata of the wrong shape: say which folder, not where in our code.
        raise TloraError(
            f"{folder}: {CONFIG} or {METADATA} does not have the shape tlora writes ({type(e).__name__}: {e}); "
            "rewrite the adapter with `tlora init`".splitlines()[0]
        ) from e


def _summarise(folder: Path) -> dict:
    adapter = read_adapter(folder, tensors=False)
    meta = adapter.metadata or None
    modules = _modules(adapter)
    # Uniform LoRA at the same r over every target, adapted or not (rank-0 modules are only in the metadata).
    r_init = (meta or {}).get("allocation", {}).get("budget_rank") or round(
        sum(m["rank"] for m in modules) / len(modules)
    )
    all_shapes = [m["shape"] for m in (meta or {}).get("modules", modules)]
    uniform_b = sum(o * r_init for o, _ in all_shapes)
    uniform_ab = sum((o + i) * r_init for o, i in all_shapes)
    total_rank = sum(m["rank"] for m in modules)
    by_layer, by_type = _budget_groups(modules, total_rank)
    return {
        "adapter": str(folder),
        "base_model": adapter.config.get("base_model_name_or_path"),
        "method": meta.get("method") if meta else None,
        "recipe": meta.get("recipe", "default") if meta else None,
        "covariance": meta.get("covariance") if meta else None,
        "train_a": meta.get("train_a") if meta else None,
        "residual": bool(meta and meta.get("residual")),
        "modules": modules,
        "left_out": [m["name"] for m in (meta or {}).get("modules", []) if not m.get("rank")],
        "targets": len(all_shapes),
        "totals": {
            "rank": total_rank,
            "params_b": sum(m["params_b"] for m in modules),
            "params_ab": sum(m["params_ab"] for m in modules),
        },
        "uniform_lora": {"rank": r_init, "params_b": uniform_b, "params_ab": uniform_ab},
        "by_layer": dict(
            sorted(by_layer.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0))
        ),
        "by_type": dict(by_type),
    }


def _modules(adapter: PeftAdapter) -> list[dict]:
    """Each adapted module's rank, alpha, scaling and parameters, in the config's target order."""
    return [
        {
            "name": m.name,
            "rank": m.rank,
            "alpha": m.alpha,
            "scaling": m.scaling,
            "params_b": m.out_features * m.rank,
            "params_ab": (m.out_features + m.in_features) * m.rank,
            "shape": [m.out_features, m.in_features],
        }
        for m in adapter.modules
    ]


def _budget_groups(modules: list[dict], total_rank: int) -> tuple[dict[str, dict], dict[str, dict]]:
    """Ranks and parameters summed per decoder layer and per module type, with each one's share of the rank."""
    by_layer: dict[str, dict] = defaultdict(lambda: {"rank": 0, "params_b": 0, "modules": 0})
    by_type: dict[str, dict] = defaultdict(lambda: {"rank": 0, "params_b": 0, "modules": 0})
    for m in modules:
        layer = LAYER.search(m["name"])
        for group in (by_layer[layer.group(1) if layer else "-"], by_type[m["name"].rsplit(".", 1)[-1]]):
            group["rank"] += m["rank"]
            group["params_b"] += m["params_b"]
            group["modules"] += 1
    for groups in (by_layer, by_type):
        for g in groups.values():
            g["share_of_rank"] = g["rank"] / total_rank
    return by_layer, by_type


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_method(summary: dict, console: Console) -> None:
    """How the adapter was made, in one line (nothing for an adapter without tlora's metadata)."""
    if summary["method"]:
        a_state = "trained" if summary["train_a"] else "frozen"
        covariance = f", covariance {summary['covariance']}" if summary["covariance"] else ""
        console.print(f"method {summary['method']}, recipe {summary['recipe']}{covariance}, A {a_state} in training")
    if summary.get("residual"):
        console.print(
            "[yellow]residual adapter:[/] its base is W_res = W - s B0 A0, not the model: train it with "
            "load_for_training or on `tlora export ADAPTER --format residual-base`; serve it after "
            "`tlora export TRAINED --format lora --initial ADAPTER`"
        )


def totals_table(summary: dict) -> Table:
    """This adapter's totals beside uniform LoRA at the same r over every target."""
    t, u = summary["totals"], summary["uniform_lora"]
    return _table(
        "Totals",
        ["", "modules", "rank", "trainable (B only)", "trainable (A+B)"],
        [
            [
                "this adapter",
                f"{len(summary['modules'])}/{summary['targets']}",
                f"{t['rank']:,}",
                f"{t['params_b']:,}",
                f"{t['params_ab']:,}",
            ],
            [
                f"uniform LoRA r={u['rank']}",
                f"{summary['targets']}/{summary['targets']}",
                f"{u['rank'] * summary['targets']:,}",
                f"{u['params_b']:,}",
                f"{u['params_ab']:,}",
            ],
        ],
    )


def print_summary(summary: dict, console: Console) -> None:
    print_method(summary, console)
    console.print(
        _table(
            f"{summary['adapter']} (base: {summary['base_model']})",
            ["module", "rank", "alpha", "scaling", "params (B)", "params (A+B)"],
            [
                [
                    m["name"],
                    str(m["rank"]),
                    f"{m['alpha']:.4g}",
                    f"{m['scaling']:.4g}",
                    f"{m['params_b']:,}",
                    f"{m['params_ab']:,}",
                ]
                for m in summary["modules"]
            ],
        )
    )
    console.print(totals_table(summary))
    for title, key in (("Budget per layer", "by_layer"), ("Budget per module type", "by_type")):
        console.print(
            _table(
                title,
                ["", "modules", "rank", "share of rank", "params (B)"],
                [
                    [k, str(g["modules"]), str(g["rank"]), f"{g['share_of_rank']:.1%}", f"{g['params_b']:,}"]
                    for k, g in summary[key].items()
                ],
            )
        )
