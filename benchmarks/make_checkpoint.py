"""Write a random-weight Llama checkpoint with the real shapes of a known model, one tensor at a time.

Memory benchmarks need 1B and 7B checkpoints; downloading them is neither possible nor needed, since
only the shapes matter for memory. Each tensor is generated, added to the current shard and the shard
is flushed once it reaches --shard-gb, so writing a 13.5 GB checkpoint needs about one shard of memory.

The tokenizer is SmolLM2's byte-level BPE cut down to the first 32,000 tokens (the merges that build
a token past that are dropped): it still encodes any text, and the vocabulary matches Llama's 32,000,
so the embedding and head have their real shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from common import DEFAULT_CACHE
from safetensors.torch import save_file

VOCAB = 32000
CONFIGS: dict[str, dict[str, int]] = {
    "tinyllama-1.1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
    },
    "llama-2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
    },
}
# Llama-2-7B's width with a quarter of its depth: the streaming engine's peak memory should not change.
CONFIGS["llama-2-7b-8-layers"] = {**CONFIGS["llama-2-7b"], "num_hidden_layers": 8}
# A few MB: what gpu_check.py --dry-run runs its commands on.
CONFIGS["tiny-llama"] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def tensor_shapes(shape: dict[str, int]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM with untied head, in the order transformers writes them."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    yield "model.embed_tokens.weight", (VOCAB, hidden)
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (hidden,)
        yield f"{p}.self_attn.q_proj.weight", (hidden, hidden)
        yield f"{p}.self_attn.k_proj.weight", (kv, hidden)
        yield f"{p}.self_attn.v_proj.weight", (kv, hidden)
        yield f"{p}.self_attn.o_proj.weight", (hidden, hidden)
        yield f"{p}.post_attention_layernorm.weight", (hidden,)
        yield f"{p}.mlp.gate_proj.weight", (inter, hidden)
        yield f"{p}.mlp.up_proj.weight", (inter, hidden)
        yield f"{p}.mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (VOCAB, hidden)


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors in order into shards of at most `shard_bytes` (bf16), so shard names are known up front."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def random_tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """N(0, 0.02) matrices (the usual init), ones for norms; seeded per tensor, so reruns give the same bytes."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write_tokenizer(out: Path) -> None:
    """SmolLM2's tokenizer restricted to ids < VOCAB: a valid byte-level BPE whose ids fit the embedding."""
    from tlora_cli.model.builtin import builtin_model_path

    source = builtin_model_path()
    spec = json.loads((source / "tokenizer.json").read_text())
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if i < VOCAB}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [
        m for m in spec["model"]["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab
    ]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < VOCAB]
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    shutil.copy(source / "tokenizer_config.json", out / "tokenizer_config.json")


def write_config(out: Path, shape: dict[str, int]) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
        **shape,
    )
    config.save_pretrained(out)


def write_checkpoint(name: str, out: Path, shard_gb: float = 2.0, seed: int = 0) -> Path:
    """Config, tokenizer, bf16 shards and index; written beside `out` and renamed into place when complete."""
    shape = CONFIGS[name]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shards = plan_shards(list(tensor_shapes(shape)), int(shard_gb * 1e9))
    weight_map: dict[str, str] = {}
    total = 0
    index = 0
    for number, members in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        shard: dict[str, torch.Tensor] = {}
        for tensor_name, tensor_shape in members:
            shard[tensor_name] = random_tensor(tensor_shape, seed * 1_000_003 + index)
            weight_map[tensor_name] = file
            total += 2 * math.prod(tensor_shape)
            index += 1
        save_file(shard, partial / file, metadata={"format": "pt"})
        print(f"wrote {file}: {len(members)} tensors", flush=True)
        del shard
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    write_config(partial, shape)
    write_tokenizer(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def checkpoint_dir(name: str, cache: Path) -> Path:
    return cache / f"random-{name}"


def ensure_checkpoint(name: str, cache: Path) -> Path:
    """The checkpoint in the cache, written first if it is not there yet."""
    out = checkpoint_dir(name, cache)
    if not (out / "model.safetensors.index.json").is_file():
        write_checkpoint(name, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, help=f"Default: {DEFAULT_CACHE}/random-CONFIG")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="Largest shard size in GB (1e9 bytes).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or checkpoint_dir(args.config, DEFAULT_CACHE)
    write_checkpoint(args.config, out, args.shard_gb, args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
