"""Where an adapter's budget went, as a picture: a heatmap in the terminal, or a two-panel PNG (matplotlib).

Rows are layers, columns module types; each cell is one module's rank (left) and scaling alpha / r (right).
A module the allocation left at rank 0 shows as a dot; one that was never a target is blank.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..errors import TloraError
from .summary import print_method, summarise, totals_table

LAYER = re.compile(r"^(?P<before>.*?)\.(?P<layer>\d+)\.(?P<after>.+)$")
# viridis at 8 stops: dark (small) to yellow (large); readable on dark and light terminals alike.
RAMP = [
    (68, 1, 84),
    (70, 50, 126),
    (54, 92, 141),
    (39, 127, 142),
    (31, 161, 135),
    (74, 193, 109),
    (160, 218, 57),
    (253, 231, 37),
]


@dataclass
class Grid:
    """Modules placed by (layer, type); None marks a rank-0 module, a missing key a module never targeted."""

    layers: list[str]
    types: list[str]
    cells: dict[tuple[str, str], dict | None]

    def values(self, key: str) -> list[float]:
        return [c[key] for c in self.cells.values() if c is not None]


def _place(name: str) -> tuple[str, str]:
    m = LAYER.match(name)
    return (m["layer"], m["after"]) if m else ("-", name)


def budget_grid(summary: dict) -> Grid:
    cells: dict[tuple[str, str], dict | None] = {_place(name): None for name in summary.get("left_out", [])}
    for m in summary["modules"]:
        cells[_place(m["name"])] = m
    layers = sorted({k[0] for k in cells}, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0, x))
    types = list(dict.fromkeys(k[1] for k in sorted(cells, key=lambda k: _type_order(k[1]))))
    return Grid(layers, types, cells)


ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _type_order(kind: str) -> tuple:
    short = kind.rsplit(".", 1)[-1]
    return (ORDER.index(short) if short in ORDER else len(ORDER), kind)


def type_labels(types: list[str]) -> list[str]:
    """The last part of each type's name (q_proj), the whole path where two would read the same."""
    short = [t.rsplit(".", 1)[-1] for t in types]
    return [s.removesuffix("_proj") if short.count(s) == 1 else t for s, t in zip(short, types)]


def _colour(value: float, top: float, log: bool = False) -> tuple[int, int, int]:
    if top <= 0:
        return RAMP[0]
    x = value / top
    if log:  # two decades below the top map to the bottom; a ratio that underflows to 0 is the bottom too
        x = 1 + math.log10(x) / 2 if x > 0 else 0.0
    x = min(max(x, 0.0), 1.0)
    return RAMP[round(x * (len(RAMP) - 1))]


def short_number(x: float) -> str:
    """At most four characters: 12, 2.3, .48, 5e-3."""
    if x >= 9999.5:
        return f"{x:.0e}".replace("e+0", "e")
    if x >= 9.95:
        return f"{x:.0f}"
    if x >= 0.995:
        return f"{x:.1f}"
    if x >= 0.00995:
        return f"{x:.2f}".removeprefix("0")
    return f"{x:.0e}".replace("e-0", "e-")


def _cell(text: str, rgb: tuple[int, int, int]) -> Text:
    r, g, b = rgb
    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"
    return Text(f"{text:>4}", style=f"{ink} on rgb({r},{g},{b})")


def heatmap(summary: dict) -> Table:
    """Layers x module types, rank and scaling side by side, coloured by size (scaling on a log scale)."""
    grid = budget_grid(summary)
    labels = type_labels(grid.types)
    top_rank = max(grid.values("rank"), default=0)
    top_scaling = max(grid.values("scaling"), default=0.0)
    table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    table.add_column("layer", justify="right")
    for label in labels:
        table.add_column(Text(f"{label[:4]:>4}"), justify="right")
    table.add_column("")
    for label in labels:
        table.add_column(Text(f"{label[:4]:>4}"), justify="right")
    for layer in grid.layers:
        ranks, scalings = [], []
        for kind in grid.types:
            key = (layer, kind)
            if key not in grid.cells:
                ranks.append(Text("    "))
                scalings.append(Text("    "))
            elif grid.cells[key] is None:
                ranks.append(Text("   ·", style="dim"))
                scalings.append(Text("   ·", style="dim"))
            else:
                m = grid.cells[key]
                ranks.append(_cell(str(m["rank"]), _colour(m["rank"], top_rank)))
                scalings.append(_cell(short_number(m["scaling"]), _colour(m["scaling"], top_scaling, log=True)))
        table.add_row(layer, *ranks, "", *scalings)
    return table


def print_picture(summary: dict, console: Console) -> None:
    """`tlora inspect` without --modules: the heatmap, a legend line and the totals."""
    print_method(summary, console)
    console.print(f"{summary['adapter']} (base: {summary['base_model']})", highlight=False)
    grid = budget_grid(summary)
    ranks, scalings = grid.values("rank"), grid.values("scaling")
    console.print(
        Group(
            Text("rank per module (left) and scaling alpha/r (right), by layer and module type", style="bold"),
            heatmap(summary),
            Text(
                f"rank {min(ranks)}-{max(ranks)}, scaling {min(scalings):.3g}-{max(scalings):.3g} (log colours), "
                "· rank 0; --modules: every module; --plot FILE.png",
                style="dim",
            ),
        )
    )
    console.print(totals_table(summary))


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _matrix(grid: Grid, key: str) -> list[list[float]]:
    """Layers x types of one value: NaN where no module is, 0 for a rank-0 module."""
    nan = float("nan")
    rows = []
    for layer in grid.layers:
        row = []
        for kind in grid.types:
            cell = grid.cells.get((layer, kind), "absent")
            row.append(nan if cell == "absent" else 0.0 if cell is None else float(cell[key]))
        rows.append(row)
    return rows


def plot_format(out: Path) -> str:
    """The format matplotlib writes `out` in, from its suffix; one line when it has none matplotlib writes (without
    a suffix matplotlib would add .png and write another file than the one named)."""
    if not has_matplotlib():
        raise TloraError("--plot needs matplotlib: pip install 'tlora-cli[plot]' (or pip install matplotlib)")
    if out.is_dir() and not out.is_symlink():
        raise TloraError(f"--plot {out} is a folder: give a file name, such as {out / 'budget.png'}")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = out.suffix.lower().removeprefix(".")
    if suffix not in formats:
        raise TloraError(
            f"--plot {out}: matplotlib writes no {out.suffix or 'file without a suffix'}: end the name in one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    return suffix


def write_plot(summary: dict, out: Path, name: str | None = None, fmt: str | None = None) -> None:
    """Two panels, rank and scaling, layers down and module types across; PNG (or `fmt`, by default the suffix's).
    Scalings are drawn as log10 on a linear colour scale: matplotlib's log norm fails near the ends of the float
    range (an alpha of 1e-300), log10 of any positive finite number does not."""
    fmt = fmt or plot_format(out)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = budget_grid(summary)
    labels = type_labels(grid.types)
    height = max(3.0, 0.22 * len(grid.layers) + 1.6)
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.3 * len(labels), height), constrained_layout=True)
    panels = (("rank", "rank r_i"), ("scaling", "scaling alpha_i / r_i (log10)"))
    for ax, (key, title) in zip(axes, panels):
        values = _matrix(grid, key)
        if key == "scaling":  # rank-0 modules have no scaling, and no log: leave them blank
            values = [[math.log10(v) if v > 0 else float("nan") for v in row] for row in values]
        image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        step = max(1, len(grid.layers) // 16)
        ax.set_yticks(range(0, len(grid.layers), step), grid.layers[::step])
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, shrink=0.8)
    t, u = summary["totals"], summary["uniform_lora"]
    title = name or Path(summary["adapter"]).name
    fig.suptitle(
        f"{title}: total rank {t['rank']} over {len(summary['modules'])}/{summary['targets']}"
        f" modules (uniform LoRA r={u['rank']}: {u['rank'] * summary['targets']})",
        fontsize=10,
    )
    try:
        fig.savefig(out, dpi=110, format=fmt, metadata={"Software": None} if fmt == "png" else None)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a format's missing tool (LaTeX for .pgf)
        raise TloraError(f"cannot write the picture: {getattr(e, 'strerror', None) or e}".splitlines()[0]) from e
    finally:
        plt.close(fig)


def try_write_plot(folder: Path, out: Path, name: str | None = None) -> bool:
    """The PNG for a model card, when matplotlib is installed; False (and nothing written) otherwise."""
    if not has_matplotlib():
        return False
    write_plot(summarise(folder), out, name)
    return True
