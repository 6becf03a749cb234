"""Model cards in adapter folders, and the hub id an adapter names as its base model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tlora_cli.adapter.peft import PeftAdapter
from tlora_cli.exports.merged import merged_base
from tlora_cli.model.builtin import BUILTIN_HUB_ID, COMPLETE_MARKER
from tlora_cli.model.resolve import ModelOptions, base_hub_id, base_model_name, looks_like_hub_id
from tlora_cli.outputs.card import adapter_card


def _named_copy(model_dir: Path, dst: Path, name_or_path: str | None) -> Path:
    """A local model folder whose config.json names where it came from, as save_pretrained writes it."""
    shutil.copytree(model_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    config["_name_or_path"] = name_or_path
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_init_writes_a_hub_ready_card(model_factory, tiny_init, run_cli, tmp_path):
    model_dir = _named_copy(model_factory("llama"), tmp_path / "model", "tiny-org/tiny-llama")
    out = tmp_path / "adapter"
    old = os.umask(0o022)
    try:
        result = tiny_init(model_dir, out, "--budget-rank", 2)
    finally:
        os.umask(old)
    assert result.code == 0, result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-org/tiny-llama"
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "tiny-org/tiny-llama"
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert "tlora" in data["tags"] and "base_model:adapter:tiny-org/tiny-llama" in data["tags"]
    assert "datasets" not in data  # a local file
    body = card.text
    assert "tlora init --model" in body and "--budget-rank 2" in body  # the command
    for words in ("samples N", "| 4 of 6 |", "24 at most", "r_init 2 x 14 modules = 28 ranks", "| method | tlora |"):
        assert words in body, words
    assert "load_for_training" in body and "tiny-org/tiny-llama" in body and "A stays as initialised" in body
    assert "tlora export ADAPTER -o ADAPTER-vllm --format vllm" in body
    assert "budget.png" in body and (out / "budget.png").read_bytes().startswith(b"\x89PNG")
    # files and folder follow the umask (mkdtemp's 0700 and safetensors' 0600 do not leak out)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}

    # an export carries the base and says how to serve it
    assert run_cli("export", out, "-o", tmp_path / "vllm", "-q").code == 0
    exported = ModelCard.load(tmp_path / "vllm" / "README.md")
    assert exported.data.to_dict()["base_model"] == "tiny-org/tiny-llama"
    assert "export:vllm" in exported.data.to_dict()["tags"]
    assert "--max-lora-rank" in exported.text


def test_local_model_without_hub_id_names_its_folder(model_factory, tiny_init, tmp_path):
    model_dir = _named_copy(model_factory("llama"), tmp_path / "model", "/home/me/checkpoints/run-3")
    out = tmp_path / "adapter"
    assert tiny_init(model_dir, out, "--budget-rank", 2).code == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir.resolve())
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert "base_model" not in data and data["library_name"] == "peft"


def test_builtin_model_is_named_by_its_hub_id(tmp_path, monkeypatch):
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2"}))
    assert base_hub_id(str(folder), folder) is None
    (folder / COMPLETE_MARKER).write_text("{}")
    assert base_hub_id(str(folder), folder) == BUILTIN_HUB_ID
    assert base_model_name(str(folder), folder) == BUILTIN_HUB_ID
    # a merge of an adapter naming the built-in model reads the built-in copy, never the hub
    import tlora_cli.exports.merged as merged

    monkeypatch.setattr(merged, "builtin_model_path", lambda progress=None: folder)
    adapter = PeftAdapter(tmp_path, {"base_model_name_or_path": BUILTIN_HUB_ID}, [], {})
    path, hub_id = merged_base(adapter, ModelOptions())
    assert (path, hub_id) == (folder, BUILTIN_HUB_ID)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("meta-llama/Llama-3.1-8B", True),
        ("/root/.cache/tlora/SmolLM2-135M-Instruct", False),
        ("./model", False),
        ("a/b/c", False),
        ("gpt2", False),
        ("../up", False),
        ("", False),
        (None, False),
    ],
)
def test_looks_like_hub_id(name, ok):
    assert looks_like_hub_id(name) is ok


def test_card_lists_hub_datasets(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "r": 8}))
    meta = {
        "tool": "tlora",
        "method": "tlora",
        "train_a": False,
        "data": {"source": "gsm8k", "hub_id": "openai/gsm8k", "num_samples": 32, "num_available": 7473},
        "modules": [{"name": "x", "rank": 8}],
        "allocation": {"budget_rank": 8, "budget": 8, "alpha_total": 8.0},
    }
    (tmp_path / "tlora_metadata.json").write_text(json.dumps(meta))
    card = ModelCard(adapter_card(tmp_path, "tlora init --data gsm8k", name="my-adapter"))
    assert card.data.to_dict()["datasets"] == ["openai/gsm8k"]
    assert "# my-adapter" in card.text and "(hub: openai/gsm8k)" in card.text and "| 32 of 7473 |" in card.text


@pytest.mark.parametrize(
    ("method", "says", "never"),
    [
        ("tlora", ["`--method tlora`: task-aware LoRA (TLoRA)", "B starts at zero"], []),
        ("random", ["`--method random`: standard LoRA", "B starts at zero"], ["TLoRA"]),
        ("lora-init", ["`--method lora-init`", "start non-zero, on the residual base"], ["B starts at zero", "TLoRA"]),
        ("lora-dash", ["`--method lora-dash`", "already changes the model"], ["B starts at zero", "TLoRA"]),
    ],
)
def test_the_card_says_what_each_method_s_start_does_to_the_model(method, says, never, tmp_path):
    """The card's first paragraph follows the method: LoRA-Dash's B is the pre-launch's, so its adapter is not a
    no-op, and a random start is not TLoRA's."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "r": 8}))
    meta = {"tool": "tlora", "method": method, "residual": method == "lora-init", "modules": [{"name": "x", "rank": 8}]}
    (tmp_path / "tlora_metadata.json").write_text(json.dumps(meta))
    first = ModelCard(adapter_card(tmp_path)).text.split("\n## ")[0]
    assert all(words in first for words in says), first
    assert not any(words in first for words in never), first
