"""`tlora inspect`: the budget as a heatmap by default, the long table with --modules, a PNG with --plot."""

from __future__ import annotations

import json

import pytest

import tlora_cli.report.picture as budget_plot
from tlora_cli.report.picture import budget_grid, short_number, type_labels


@pytest.fixture
def adapter(model_factory, tiny_init, tmp_path):
    out = tmp_path / "adapter"
    result = tiny_init(model_factory("llama"), out, "--budget-rank", 1, "--alpha", 4)
    assert result.code == 0, result.stderr
    return out


def test_default_is_a_heatmap_and_totals(adapter, run_cli):
    result = run_cli("inspect", adapter)
    assert result.code == 0, result.stderr
    out = result.stdout
    assert "rank per module (left) and scaling alpha/r (right)" in out
    assert "Totals" in out and "uniform LoRA r=1" in out
    assert "model.layers.0.self_attn.q_proj" not in out  # no per-module rows
    header = next(line for line in out.splitlines() if line.lstrip().startswith("layer"))
    assert header.split() == ["layer", *["q", "k", "v", "o", "gate", "up", "down"] * 2]
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    # budget 1 x 14 leaves some modules at rank 0: shown as dots, on both sides
    meta = json.loads((adapter / "tlora_metadata.json").read_text())
    zero = sum(1 for m in meta["modules"] if not m["rank"])
    assert zero and sum(r.count("·") for r in rows) == 2 * zero
    ranks = {m["name"]: m["rank"] for m in meta["modules"]}
    assert rows[0][1] == (
        str(ranks["model.layers.0.self_attn.q_proj"]) if ranks["model.layers.0.self_attn.q_proj"] else "·"
    )


def test_modules_flag_prints_the_long_table(adapter, run_cli):
    result = run_cli("inspect", adapter, "--modules")
    assert result.code == 0
    active = [m["name"] for m in json.loads((adapter / "tlora_metadata.json").read_text())["modules"] if m["rank"]]
    assert "Budget per layer" in result.stdout and all(name in result.stdout for name in active)


def test_plot_writes_a_png(adapter, run_cli, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "budget.png"
    result = run_cli("inspect", adapter, "--plot", png)
    assert result.code == 0, result.stderr
    assert png.read_bytes().startswith(b"\x89PNG") and f"wrote {png}" in result.stderr
    assert "Totals" in result.stdout
    again = run_cli("inspect", adapter, "--json", "--plot", tmp_path / "b.png")
    assert again.code == 0 and json.loads(again.stdout)["totals"] and (tmp_path / "b.png").is_file()
    bad = run_cli("inspect", adapter, "--plot", tmp_path / "missing-folder" / "x.png")
    assert bad.code == 1 and "cannot write" in bad.stderr


def test_plot_without_matplotlib_says_what_to_install(adapter, run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(budget_plot, "has_matplotlib", lambda: False)
    result = run_cli("inspect", adapter, "--plot", tmp_path / "x.png")
    assert result.code == 1 and "pip install 'tlora-cli[plot]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_grid_helpers():
    summary = {
        "adapter": "/nonexistent",
        "modules": [
            {"name": "model.layers.10.self_attn.q_proj", "rank": 4, "scaling": 0.5},
            {"name": "model.layers.2.mlp.down_proj", "rank": 2, "scaling": 2.0},
            {"name": "lm_head", "rank": 1, "scaling": 1.0},
        ],
    }
    grid = budget_grid(summary)
    assert grid.layers == ["2", "10", "-"]
    assert grid.types == ["self_attn.q_proj", "mlp.down_proj", "lm_head"]
    assert type_labels(["self_attn.q_proj", "vision.q_proj", "mlp.up_proj"]) == [
        "self_attn.q_proj",
        "vision.q_proj",
        "up",
    ]
    assert [short_number(x) for x in (12.4, 2.34, 0.476, 0.0042, 123456)] == ["12", "2.3", ".48", "4e-3", "1e5"]
