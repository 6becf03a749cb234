"""The tiny-model and hub-cache fixtures really have the properties other tests rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from tiny_models import (
    ARCHITECTURES,
    NUM_KV_HEADS,
    SLIDING_ARCHITECTURES,
    make_hub_cache,
    make_tiny_model,
    use_offline_hub_cache,
)
from tokenizer_fixture import make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

# Checkpoint names that transformers 5 renames on load (and back on save).
RENAMED_ON_LOAD = {"gpt_neox": {"embed_out.weight": "lm_head.weight"}}


def _index(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def _ids(length: int) -> torch.Tensor:
    return torch.arange(3, 3 + length).unsqueeze(0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_is_sharded_loads_and_trains(tmp_path: Path, arch: str) -> None:
    path = make_tiny_model(tmp_path / arch, arch)
    weight_map = _index(path)
    assert len(set(weight_map.values())) >= 3
    assert all((path / shard).is_file() for shard in weight_map.values())
    assert (path / "tokenizer.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(make_tokenizer())
    renames = RENAMED_ON_LOAD.get(arch, {})
    assert {renames.get(name, name) for name in weight_map} == set(model.state_dict())
    if arch != "gpt_neox":
        assert model.config.num_key_value_heads == NUM_KV_HEADS < model.config.num_attention_heads

    loss = model(_ids(12), labels=_ids(12)).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            assert 0.15 < param.std() < 0.25, name
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_norm_scales_and_biases_are_not_defaults(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path, "qwen2"))
    layer = model.model.layers[0]
    assert not torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert layer.self_attn.q_proj.bias.abs().sum() > 0


def test_weights_are_deterministic_per_seed(tmp_path: Path) -> None:
    def first_tensor(path: Path) -> torch.Tensor:
        name, shard = next(iter(_index(path).items()))
        with safe_open(path / shard, "pt") as f:
            return f.get_tensor(name)

    same = first_tensor(make_tiny_model(tmp_path / "a")), first_tensor(make_tiny_model(tmp_path / "b"))
    other = first_tensor(make_tiny_model(tmp_path / "c", seed=1))
    assert torch.equal(*same)
    assert not torch.equal(same[0], other)


def test_dtype_is_saved(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, dtype=torch.bfloat16)
    name, shard = next(iter(_index(path).items()))
    with safe_open(path / shard, "pt") as f:
        assert f.get_tensor(name).dtype == torch.bfloat16
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tied_embeddings_are_stored_once(tmp_path: Path, arch: str) -> None:
    path = make_tiny_model(tmp_path, arch, tie_embeddings=True)
    assert "lm_head.weight" not in _index(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight is model.get_input_embeddings().weight


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path)(ids).logits[0]


def _last_logits_ignore_first_token(path: Path, length: int) -> bool:
    """Whether changing token 0 leaves the last position's logits alone (true only with a small window)."""
    changed = _ids(length)
    changed[0, 0] = 200
    return torch.allclose(_logits(path, _ids(length))[-1], _logits(path, changed)[-1])


@pytest.mark.parametrize("arch", SLIDING_ARCHITECTURES)
def test_sliding_window_is_applied(tmp_path: Path, arch: str) -> None:
    windowed = make_tiny_model(tmp_path / "w", arch, sliding_window=8)
    full = make_tiny_model(tmp_path / "f", arch)  # same seed, so same weights
    assert AutoModelForCausalLM.from_pretrained(windowed).config.sliding_window == 8
    w_logits, f_logits = _logits(windowed, _ids(24)), _logits(full, _ids(24))
    assert torch.allclose(w_logits[:8], f_logits[:8])  # a query sees itself and the 7 tokens before it
    assert not torch.allclose(w_logits[-1], f_logits[-1])
    # With 2 local layers of window 8, position 23 sees back to position 23 - 2 * 7 = 9 at most.
    # Gemma2 alternates sliding and full layers, so its full layer still sees token 0.
    assert _last_logits_ignore_first_token(windowed, 24) == (arch != "gemma2")
    assert not _last_logits_ignore_first_token(full, 24)


def test_qwen2_can_mix_full_and_sliding_layers(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "qwen2", sliding_window=8, max_window_layers=1)
    config = AutoModelForCausalLM.from_pretrained(path).config
    assert config.layer_types == ["full_attention", "sliding_attention"]
    assert not _last_logits_ignore_first_token(path, 24)


def test_sliding_window_refused_where_unsupported() -> None:
    with pytest.raises(ValueError, match="sliding"):
        make_tiny_model(Path("unused"), "llama", sliding_window=8)


def test_hub_cache_resolves_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = make_tiny_model(tmp_path / "model", tie_embeddings=True)
    cache = tmp_path / "hub"
    snapshot = make_hub_cache(model_dir, cache, "tiny-org/tiny-llama")
    assert snapshot == make_hub_cache(model_dir, cache, "tiny-org/tiny-llama", revision="v1")
    assert all(p.is_symlink() and p.resolve().parent.name == "blobs" for p in snapshot.iterdir())
    use_offline_hub_cache(monkeypatch, cache)

    assert Path(snapshot_download("tiny-org/tiny-llama")) == snapshot
    assert Path(snapshot_download("tiny-org/tiny-llama", revision="v1")) == snapshot
    assert Path(snapshot_download("tiny-org/tiny-llama", allow_patterns=["*.json"])) == snapshot
    model = AutoModelForCausalLM.from_pretrained("tiny-org/tiny-llama")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert AutoTokenizer.from_pretrained("tiny-org/tiny-llama").bos_token == "<s>"

    # A subprocess sees only the environment variables, as the CLI would.
    code = "import sys; from huggingface_hub import snapshot_download as s; print(s(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", code, "tiny-org/tiny-llama"], env=os.environ, capture_output=True, text=True
    )
    assert Path(out.stdout.strip()) == snapshot, out.stderr
