"""A real trainer: TRL's SFTTrainer trains a tlora adapter with A frozen; the result reloads and exports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_export import IDS, _check_server_rule, logits

RECORDS = [
    {"prompt": "Question: how far does the train go?\nAnswer:", "completion": " 60 * 2 = 120 miles."},
    {"prompt": "Say hello to the world.", "completion": " Hello world, this is the answer."},
    {"prompt": "What does the fox do?", "completion": " The quick brown fox jumps over the lazy dog."},
    {"prompt": "Mia buys 3 packs of 12 pencils. How many?", "completion": " 3 * 12 = 36 pencils."},
]


def sft_trainer(model: torch.nn.Module, model_dir: Path, folder: Path, steps: int = 4, callbacks: tuple = ()):
    """TRL's SFTTrainer on RECORDS, on the CPU, at a rate that moves every B in a few steps; weight decay on, which
    would drift A if A reached the optimizer."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=2, learning_rate=5e-2, weight_decay=0.1,
        logging_steps=1, save_strategy="no", report_to=[], max_length=48, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    dataset = Dataset.from_list(RECORDS * 2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks)
    )


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed: pip install trl")
def test_sft_trainer_trains_b_with_a_frozen_and_the_adapter_exports(model_factory, tiny_init, run_cli, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tlora_cli.training import load_for_training

    model_dir = model_factory("llama")
    adapter = tmp_path / "adapter"
    assert tiny_init(model_dir, adapter, "--budget-rank", 4).code == 0
    model = load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    before = {n: t.detach().clone() for n, t in model.state_dict().items() if ".lora_" in n}
    trainer = sft_trainer(model, model_dir, tmp_path / "run")
    trainer.train()
    after = {n: t.detach() for n, t in trainer.model.state_dict().items() if ".lora_" in n}
    assert set(after) == set(before)
    a_keys = [n for n in before if ".lora_A." in n]
    b_keys = [n for n in before if ".lora_B." in n]
    assert a_keys and b_keys
    assert all(torch.equal(before[n], after[n]) for n in a_keys), "A must stay as initialised"
    assert all(after[n].abs().max() > 0 for n in b_keys), "every B must have moved from zero"

    trained = tmp_path / "trained"
    trainer.model.save_pretrained(trained)
    saved = load_file(trained / "adapter_model.safetensors")
    original = load_file(adapter / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], original[k]) for k in original if ".lora_A." in k)
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=IDS).logits
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), trained)
    torch.testing.assert_close(logits(reloaded), want, atol=1e-5, rtol=1e-5)
    assert json.loads((trained / "adapter_config.json").read_text())["alpha_pattern"]

    for fmt in ("vllm", "padded"):
        result = run_cli("export", trained, "-o", tmp_path / fmt, "--format", fmt, "-q")
        assert result.code == 0, result.stderr
        _check_server_rule(model_dir, trained, tmp_path / fmt)
    result = run_cli("export", trained, "-o", tmp_path / "merged", "--format", "merged", "--model", model_dir, "-q")
    assert result.code == 0, result.stderr
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), want, atol=1e-5, rtol=1e-5
    )
