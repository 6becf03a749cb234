"""Tiny random causal LMs saved like real hub checkpoints (sharded safetensors + tokenizer), and a hub cache.

Built on the spot from config classes so tests need no download; every weight is drawn at a healthy scale
because the default initialisers leave some weights near zero (and norms at exactly one), which would hide
bugs in code that must use every tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizer_fixture import make_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma2", "gemma3_text", "gpt_neox", "qwen3", "phi3")
# Architectures whose config can make attention local; for the others `sliding_window` is refused.
SLIDING_ARCHITECTURES = ("qwen2", "mistral", "gemma2", "gemma3_text", "qwen3", "phi3")

HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 96
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
MAX_POSITIONS = 256
WEIGHT_STD = 0.2
NUM_SHARDS = 4  # asked-for shards; save_pretrained gives at least 3 since no tensor spans two


def _arch_kwargs(arch: str, sliding_window: int | None, max_window_layers: int) -> dict[str, Any]:
    """The fields each config class needs on top of the shared ones (its defaults are sized for 7B models)."""
    if arch in ("llama", "gpt_neox"):
        return {}
    if arch in ("qwen2", "qwen3"):
        # Qwen ignores `sliding_window` unless `use_sliding_window`; layers below `max_window_layers`
        # stay full.
        window = {
            "use_sliding_window": sliding_window is not None,
            "sliding_window": sliding_window,
            "max_window_layers": max_window_layers,
        }
        return window | ({"head_dim": HEAD_DIM} if arch == "qwen3" else {})
    if arch in ("mistral", "phi3"):
        # MistralConfig defaults to a 4096 window: pass None explicitly for plain causal attention.
        return {"sliding_window": sliding_window}
    if arch in ("gemma2", "gemma3_text"):
        # Gemma alternates sliding/full layers (Gemma 3 with its own local rotary embedding); with no
        # window asked for, the 4096 default is longer than any test sequence.
        window = {"sliding_window": sliding_window} if sliding_window is not None else {}
        return {"head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM} | window
    raise ValueError(f"unknown architecture {arch!r}; pick one of {ARCHITECTURES}")


def make_tiny_config(
    arch: str = "llama",
    *,
    tie_embeddings: bool = False,
    sliding_window: int | None = None,
    max_window_layers: int = 0,
    num_layers: int = 2,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> PreTrainedConfig:
    """A config with grouped-query attention (where the architecture has it) and the test tokenizer's ids."""
    if sliding_window is not None and arch not in SLIDING_ARCHITECTURES:
        raise ValueError(f"{arch} has no sliding-window attention; use one of {SLIDING_ARCHITECTURES}")
    if tokenizer is None:
        tokenizer = make_tokenizer()
    shared: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": NUM_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": tie_embeddings,
    }
    if arch != "gpt_neox":  # GPT-NeoX has no grouped-query attention
        shared["num_key_value_heads"] = NUM_KV_HEADS
    return AutoConfig.for_model(arch, **shared, **_arch_kwargs(arch, sliding_window, max_window_layers))


def make_tiny_model(
    path: Path,
    arch: str = "llama",
    *,
    tie_embeddings: bool = False,
    sliding_window: int | None = None,
    max_window_layers: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    num_layers: int = 2,
) -> Path:
    """Save a deterministic random model plus tokenizer to `path` as >= 3 safetensors shards with an index.

    `max_window_layers` (Qwen only) keeps the first layers on full attention so layers differ.
    """
    tokenizer = make_tokenizer()
    config = make_tiny_config(
        arch,
        tie_embeddings=tie_embeddings,
        sliding_window=sliding_window,
        max_window_layers=max_window_layers,
        num_layers=num_layers,
        tokenizer=tokenizer,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():  # tied weights are listed once
            if param.dim() >= 2:
                param.normal_(0.0, WEIGHT_STD)
            else:  # norm scales around their default, biases small but non-zero
                param.add_(torch.randn_like(param), alpha=0.1)
    model.to(dtype)
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=total_bytes // NUM_SHARDS)
    tokenizer.save_pretrained(path)
    return path


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: Path, size: int) -> bool:
    """Weights (and anything big) live in LFS on the hub, so their blob is named by sha256."""
    return path.suffix in (".safetensors", ".bin", ".gguf") or size >= 10 * 2**20


def make_hub_cache(model_dir: Path, cache_dir: Path, repo_id: str, revision: str = "main") -> Path:
    """Lay `model_dir` out as `snapshot_download(repo_id)` would have cached it; return the snapshot folder.

    Blobs are named as the hub names them (sha256 for LFS files, git blob sha1 otherwise), snapshot files
    are relative symlinks, `refs/<revision>` holds the commit, and the tree listing that recent
    huggingface_hub writes is there too, so offline look-ups can check the snapshot is complete. The commit
    hash is derived from the content, so the same folder always gives the same commit.
    """
    repo_folder = cache_dir / f"models--{repo_id.replace('/', '--')}"
    blobs = repo_folder / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    tree: dict[str, dict[str, Any]] = {}
    for file in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        data = file.read_bytes()
        entry: dict[str, Any] = {"size": len(data), "blob_id": _git_blob_sha1(data)}
        if _is_lfs(file, len(data)):
            entry |= {"lfs_sha256": hashlib.sha256(data).hexdigest(), "lfs_size": len(data)}
        blob = blobs / entry.get("lfs_sha256", entry["blob_id"])
        if not blob.exists():
            shutil.copyfile(file, blob)
        tree[file.relative_to(model_dir).as_posix()] = entry
    commit = hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()

    snapshot = repo_folder / "snapshots" / commit
    for name, entry in tree.items():
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blobs / entry.get("lfs_sha256", entry["blob_id"]), link.parent))
    ref = repo_folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # no newline: huggingface_hub reads the file verbatim
    trees = repo_folder / "trees"
    trees.mkdir(exist_ok=True)
    (trees / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}, indent=1))
    return snapshot


def use_offline_hub_cache(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """Point huggingface_hub at `cache_dir`, offline, for this process and its subprocesses.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once at import, so the env vars alone only reach
    subprocesses; the module constants are patched too.
    """
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
