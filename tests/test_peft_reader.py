"""The one PEFT adapter reader: ranks and scalings by PEFT's own pattern rule, whoever wrote the adapter."""

from __future__ import annotations

import json

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from tlora_cli.adapter.peft import read_adapter


def peft_scalings(model_dir, adapter) -> dict[str, tuple[int, float]]:
    """(rank, scaling) of every LoRA layer as PEFT itself builds them."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    return {
        name.removeprefix("base_model.model."): (module.r["default"], module.scaling["default"])
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def test_suffix_patterns_are_read_as_peft_reads_them(model_factory, run_cli, tmp_path):
    """Trainers write patterns as suffixes (`q_proj`, `layers.1.mlp.down_proj`), not full names: `tlora inspect`
    used to look each module up by its full name and report the default alpha for all of them."""
    model_dir = model_factory("llama")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 32, r"layers\.0\.mlp\.down_proj": 3},
    )
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_scalings(model_dir, tmp_path / "adapter")
    assert len({s for _, s in expected.values()}) >= 4  # the patterns make a difference to check

    read = {m.name: (m.rank, m.scaling) for m in read_adapter(tmp_path / "adapter", tensors=False).modules}
    assert read.keys() == expected.keys()
    for name, (rank, scaling) in expected.items():
        assert read[name][0] == rank and abs(read[name][1] - scaling) < 1e-12, name

    result = run_cli("inspect", tmp_path / "adapter", "--json")
    assert result.code == 0, result.stderr
    shown = {m["name"]: (m["rank"], m["scaling"]) for m in json.loads(result.stdout)["modules"]}
    assert shown == read
