"""Each server's own loading rule, applied to tlora's exports of an adapter with rank-0 modules: the delta W every
module gets must be PEFT's on the original adapter, and no module may be lost.

The rules are read from each server's code (notes in the docstrings: file and function); they are re-implemented
here on the exported files, as a server would read them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from cli_main import run_main
from peft import PeftModel
from safetensors.torch import load_file
from test_export import peft_deltas, randomise_b
from transformers import AutoModelForCausalLM

from tlora_cli.exports.vllm import VLLM_MAX_LORA_RANKS

LAYER = re.compile(r"^(?P<before>.*?)\.(?P<layer>\d+)\.(?P<after>.+)$")


def _read(adapter: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors}
    pairs = {
        n: (
            tensors[f"base_model.model.{n}.lora_A.weight"].float(),
            tensors[f"base_model.model.{n}.lora_B.weight"].float(),
        )
        for n in names
    }
    return config, pairs


def _global_scale(config: dict) -> float:
    r = config["r"]
    return config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)


def vllm_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """vLLM (vllm/lora/peft_helper.py, lora_model.py, layers/base_linear.py): only r, lora_alpha, use_rslora and
    target_modules are read (the patterns are dropped); one scaling lora_alpha / r for every module; the top-level r
    must fit --max-lora-rank (from 1, 8, 16, ..., 512), and each module is copied into a buffer of that rank."""
    config, pairs = _read(adapter)
    max_rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= config["r"])
    assert all(a.shape[0] <= max_rank for a, _ in pairs.values())
    return {n: _global_scale(config) * (b @ a) for n, (a, b) in pairs.items()}


def sglang_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """SGLang (srt/lora/lora.py, mem_pool.py load_lora_weight_to_buffer): one scaling lora_alpha / r (use_rslora
    ignored), and every module sliced at the top-level r: a module of another rank fails a shape assertion."""
    config, pairs = _read(adapter)
    for name, (a, b) in pairs.items():
        assert a.shape[0] == config["r"] and b.shape[1] == config["r"], f"SGLang's buffer shape assertion: {name}"
    return {n: config["lora_alpha"] / config["r"] * (b @ a) for n, (a, b) in pairs.items()}


def lorax_deltas(adapter: Path, layers_of: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """LoRAX and TGI (adapters/lora.py LoraWeights.load / prepare_weights): per module type, the layers are stacked;
    the first layer without the module drops the whole type (a warning only); ranks are padded (SGMV: to 8 x TP,
    else to a multiple of 16) and the adapter's r is then set to the padded rank, which scales every type after
    the first. `layers_of`: per type, every layer name the base model has for it."""
    config, pairs = _read(adapter)
    r, alpha = config["r"], config["lora_alpha"]
    deltas = {}
    for names in layers_of.values():
        if any(n not in pairs for n in names):
            continue  # the whole type is dropped
        ranks = {pairs[n][0].shape[0] for n in names}
        assert len(ranks) == 1, "torch.stack of different ranks"
        scale = alpha / r
        for n in names:
            a, b = pairs[n]
            deltas[n] = scale * (b @ a)
        rank = ranks.pop()
        r = 8 if rank <= 8 else 16 * math.ceil(rank / 16)  # `config.r = padded_rank`, read by the next type
    return deltas


def types_and_layers(model_dir: Path, suffixes: tuple[str, ...]) -> dict[str, list[str]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        m = LAYER.match(name)
        if m and isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in suffixes:
            found.setdefault(m["after"], []).append(name)
    return found


SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def sparse_adapter(model_factory, data_file, tmp_path_factory):
    """A tlora adapter whose allocation leaves modules at rank 0, B trained (random)."""
    folder = tmp_path_factory.mktemp("sparse")
    model_dir = model_factory("llama")
    run_main("init", "--model", model_dir, "--data", data_file, "--num-samples", 4, "--seq-len", 24, "--budget-rank", 1,
             "-q", "-o", folder / "adapter")  # fmt: skip
    randomise_b(folder / "adapter")
    meta = json.loads((folder / "adapter" / "tlora_metadata.json").read_text())
    assert any(m["rank"] == 0 for m in meta["modules"])  # the case the servers would lose
    return model_dir, folder / "adapter"


@pytest.mark.parametrize("fmt", ["vllm", "padded"])
def test_every_server_gets_peft_s_delta_w_and_loses_no_module(fmt, sparse_adapter, run_cli, tmp_path):
    model_dir, adapter = sparse_adapter
    reference = peft_deltas(model_dir, adapter)
    layers_of = types_and_layers(model_dir, SUFFIXES)
    every = {n for names in layers_of.values() for n in names}
    assert run_cli("export", adapter, "--format", fmt, "-o", tmp_path / fmt, "-q").code == 0
    rules = {"vllm": [vllm_deltas], "padded": [vllm_deltas, sglang_deltas]}[fmt]
    if fmt == "padded":
        rules.append(lambda path: lorax_deltas(path, layers_of))
    for rule in rules:
        served = rule(tmp_path / fmt)
        for name in every:
            want = reference.get(name, torch.zeros(1))
            got = served.get(name)
            if name in reference or fmt == "padded":  # vLLM zero-fills a module it has no weights for itself
                assert got is not None, f"{rule.__name__} lost {name}"
                assert torch.allclose(got, want.expand_as(got), atol=1e-6, rtol=1e-6), (rule.__name__, name)
    if fmt == "padded":
        config = json.loads((tmp_path / fmt / "adapter_config.json").read_text())
        assert config["r"] == 8 or config["r"] % 16 == 0  # a rank LoRAX/TGI do not pad


def test_a_bfloat16_adapter_s_exports_are_one_rounding_off_or_exact_in_float32(
    model_factory, data_file, run_cli, tiny_init, tmp_path
):
    model_dir = model_factory("llama")
    adapter = tmp_path / "bf16"
    assert tiny_init(model_dir, adapter, "--dtype", "bfloat16", "--budget-rank", 2).code == 0
    randomise_b(adapter)
    reference = peft_deltas(model_dir, adapter)
    for dtype, tolerance in (("auto", 2.0**-8), ("float32", 1e-6)):
        out = tmp_path / f"vllm-{dtype}"
        assert run_cli("export", adapter, "--format", "vllm", "--dtype", dtype, "-o", out, "-q").code == 0
        served = vllm_deltas(out)
        for name, want in reference.items():
            assert (served[name] - want).norm() <= tolerance * want.norm(), (dtype, name)


def test_a_float32_merge_is_peft_s_float32_merge(model_factory, tiny_init, run_cli, tmp_path):
    """A bf16 base merged in float32 (--dtype float32) gives the logits of PEFT's float32 merge_and_unload."""
    model_dir = model_factory("llama", dtype=torch.bfloat16)
    adapter = tmp_path / "a"
    assert tiny_init(model_dir, adapter, "--budget-rank", 2).code == 0
    randomise_b(adapter)
    out = tmp_path / "merged"
    args = ("export", adapter, "--format", "merged", "--model", model_dir, "--dtype", "float32", "-o", out, "-q")
    assert run_cli(*args).code == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert next(merged.parameters()).dtype == torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    ids = torch.tensor([[3, 17, 5, 42, 8, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
