"""LoRA-Dash and LoRA-TSD: a trainable coefficient on each of W's top task-specific directions, kept in the sidecar,
trained through the helper (by TRL's SFTTrainer here), folded back into a plain LoRA on the original base."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_lora_init import ALPHA, RANK, logits, modules_of, prelaunch_args, rel, sidecar, weights
from test_trl import sft_trainer
from transformers import AutoModelForCausalLM

from tlora_cli.training import load_for_training, save_trained

DASH = 3


def init(run_cli, model_dir, data, out, method: str, *extra):
    result = run_cli(*prelaunch_args(model_dir, data, method), "--dash-directions", DASH, *extra, "-o", out)
    assert result.code == 0, result.stderr
    return out


@pytest.mark.parametrize("method", ["lora-dash", "lora-tsd"])
def test_the_dash_directions_are_w_s_top_change_rates(method, model_factory, data_file, run_cli, tmp_path):
    """The sidecar's u, v^T are W's singular vectors (an independent float64 SVD) at the s_d largest change rates,
    recomputed here from the saved pre-launch adapter; dsigma starts at 0, and with it the model is the adapter
    without the Dash term: the pre-launch model (lora-dash) or the base model (lora-tsd)."""
    model_dir = model_factory("llama")
    out = init(run_cli, model_dir, data_file, tmp_path / "out", method, "--save-prelaunch", tmp_path / "pre")
    w, pre = weights(model_dir), modules_of(tmp_path / "pre")
    entries = sidecar(out)
    scaling = ALPHA / RANK
    for name, entry in entries.items():
        u, s, vh = torch.linalg.svd(w[name].double(), full_matrices=False)
        dw = scaling * (pre[name][1].double() @ pre[name][0].double())
        rates = (u.T @ dw @ vh.T).diagonal().abs() / (s + 1e-6)
        top = sorted(range(len(rates)), key=lambda j: (-rates[j].item(), j))[:DASH]
        assert entry["dash_indices"].tolist() == top, name
        # the same direction up to its sign: compare the rank-one matrices u_j v_j^T
        for k, j in enumerate(top):
            mine = torch.outer(entry["dash_u"][:, k].double(), entry["dash_vh"][k].double())
            assert rel(mine, torch.outer(u[:, j], vh[j])) < 1e-5, (name, j)
        assert torch.equal(entry["dash_sigma"], torch.zeros(DASH))
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), out)
    extra = [p for n, p in model.named_parameters() if "dash_terms" in n and p.requires_grad]
    assert len(extra) == len(entries) and all(p.numel() == DASH for p in extra)  # s_d more per module, no more
    if method == "lora-tsd":
        assert rel(logits(model), logits(base)) < 1e-5
    else:
        without = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
        assert (logits(model) - logits(without)).abs().max() <= 1e-6 * logits(without).abs().max()
        assert modules_of(out).keys() == pre.keys()
        assert all(torch.equal(modules_of(out)[n][1], pre[n][1]) for n in pre)  # B continues from the pre-launch


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora-dash", "lora-tsd"])
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed: pip install trl")
def test_sft_trainer_moves_every_dsigma_and_the_folded_lora_is_the_trained_model(
    method, model_factory, data_file, run_cli, tmp_path
):
    model_dir = model_factory("llama")
    out = init(run_cli, model_dir, data_file, tmp_path / "out", method)
    model = load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), out)
    trainer = sft_trainer(model, model_dir, tmp_path / "run")
    trainer.train()
    trainer.model.eval()
    trained = logits(trainer.model)
    save_trained(trainer.model, tmp_path / "trained", out)
    sigma = {k: v for k, v in load_file(tmp_path / "trained" / "tlora_directions.safetensors").items() if "sigma" in k}
    assert sigma and all(v.abs().min() > 0 for v in sigma.values()), "every dsigma must have moved"
    assert "dash" not in "".join(
        load_file(tmp_path / "trained" / "adapter_model.safetensors")
    )  # PEFT's file stays PEFT's
    result = run_cli("export", tmp_path / "trained", "--format", "lora", "-o", tmp_path / "plain", "-q")
    assert result.code == 0, result.stderr
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "plain")
    assert rel(logits(plain), trained) < 1e-5
    ranks = set(json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["rank_pattern"].values())
    assert ranks == {RANK + DASH + (RANK if method == "lora-tsd" else 0)}
    result = run_cli(
        "export", tmp_path / "plain", "--format", "merged", "--model", model_dir, "-o", tmp_path / "m", "-q"
    )
    assert result.code == 0 and rel(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), trained) < 1e-5


def test_a_dash_adapter_goes_to_servers_only_folded(model_factory, data_file, run_cli, tmp_path):
    model_dir = model_factory("llama")
    out = init(run_cli, model_dir, data_file, tmp_path / "out", "lora-dash")
    result = run_cli("export", out, "--format", "vllm", "-o", tmp_path / "v")
    assert result.code == 1 and "LoRA-Dash adapter" in result.stderr and "--format lora" in result.stderr
    model = load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), out)
    model.save_pretrained(tmp_path / "plain-save")  # PEFT's own save: no sidecar, so no trained dsigma
    result = run_cli("export", tmp_path / "plain-save", "--format", "lora", "--initial", out, "-o", tmp_path / "p")
    assert result.code == 0 and "no trained Dash coefficients" in result.stderr
    card = (out / "README.md").read_text()
    assert "Dash" in card and "ignores" in card
