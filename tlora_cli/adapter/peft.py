"""The one reader of a PEFT LoRA adapter (tlora's, or one a trainer saved): its config, its modules with the rank,
alpha and scaling PEFT gives each (by PEFT's own pattern rule), and optionally their A and B."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import TloraError
from ..jsonio import read_object
from .layout import CONFIG, METADATA, WEIGHTS

KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<part>[AB])\.weight$")
DEFAULT_RANK, DEFAULT_ALPHA = 8, 8  # LoraConfig's defaults, for a config that leaves r or lora_alpha out


def model_order(name: str) -> list:
    """Sort key: model order for names PEFT wrote in alphabetical order (layers.10 after layers.9)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def tensor_key(name: str, part: str) -> str:
    """The key of a module's lora_A or lora_B weight in adapter_model.safetensors (no adapter name)."""
    return f"base_model.model.{name}.lora_{part}.weight"


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """PEFT's rule for rank_pattern/alpha_pattern: the first key that, as a regex, matches the end of the
    module name at a dot boundary (peft.utils.other.get_pattern_key); None when none does."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def peft_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """What PEFT multiplies B A by: alpha / r, or alpha / sqrt(r) under rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


@dataclass
class LoraModule:
    """One adapted module: its rank, alpha and scaling as PEFT applies them; A (r x in) and B (out x r) when read."""

    name: str
    rank: int
    alpha: float
    scaling: float
    out_features: int
    in_features: int
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    def scaled_b(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s_i B in float32, then in `dtype` (default B's own): the B a server with scaling 1 must see."""
        return (self.b.float() * self.scaling).to(dtype or self.b.dtype).contiguous()

    def delta(self) -> torch.Tensor:
        """s_i B A in float32: what PEFT adds to W."""
        return self.scaling * (self.b.float() @ self.a.float())


@dataclass
class PeftAdapter:
    """An adapter folder as PEFT reads it; `metadata` is tlora_metadata.json when there is one ({} otherwise)."""

    folder: Path
    config: dict
    modules: list[LoraModule]
    metadata: dict


def read_config(folder: Path) -> dict:
    """adapter_config.json of a folder that holds a PEFT adapter in safetensors."""
    if not folder.is_dir():
        raise TloraError(f"{folder} is not a folder: pass a PEFT LoRA adapter directory")
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise TloraError(f"{folder} is not a PEFT adapter in safetensors: it needs {CONFIG} and {WEIGHTS}")
    return read_object(folder / CONFIG, "rewrite it, or save the adapter again with PEFT")


def read_adapter(folder: Path, tensors: bool = True) -> PeftAdapter:
    """The adapter in `folder`; without `tensors`, shapes come from the safetensors header alone."""
    config = read_config(folder)
    parts = _read_parts(folder / WEIGHTS, tensors)
    if not parts:
        raise TloraError(f"{folder / WEIGHTS} holds no LoRA weights")
    rslora = bool(config.get("use_rslora"))
    rank_pattern, alpha_pattern = _pattern(config, "rank_pattern"), _pattern(config, "alpha_pattern")
    order = config.get("target_modules") if isinstance(config.get("target_modules"), list) else []
    position = {name: i for i, name in enumerate(order)}
    modules = []
    for name in sorted(parts, key=lambda n: (position.get(n, len(order)), model_order(n))):
        got = parts[name]
        if set(got) != {"A", "B"}:
            raise TloraError(f"{folder / WEIGHTS}: {name} lacks lora_{'B' if 'A' in got else 'A'}")
        a, b = got["A"], got["B"]
        a_shape, b_shape = _shape(a), _shape(b)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise TloraError(f"{folder / WEIGHTS}: {name} has A {a_shape} and B {b_shape}, not r x in and out x r")
        rank_key, alpha_key = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
        rank = rank_pattern[rank_key] if rank_key is not None else config.get("r", DEFAULT_RANK)
        alpha = alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", DEFAULT_ALPHA)
        rank, alpha = int(rank), float(alpha)
        if rank != a_shape[0]:
            raise TloraError(f"{folder / CONFIG} gives {name} rank {rank} but its A has {a_shape[0]} rows")
        loaded = (a, b) if tensors else (None, None)
        modules.append(
            LoraModule(name, rank, alpha, peft_scaling(alpha, rank, rslora), b_shape[0], a_shape[1], *loaded)
        )
    meta = folder / METADATA
    metadata = (
        read_object(meta, f"rewrite the adapter with `tlora init`, or remove {METADATA}") if meta.exists() else {}
    )
    return PeftAdapter(folder, config, modules, metadata)


def _pattern(config: dict, field: str) -> dict:
    value = config.get(field) or {}
    if not isinstance(value, dict):
        raise TloraError(f"{CONFIG}'s {field} is a {type(value).__name__}, not a mapping of module names to numbers")
    return value


def _shape(part: torch.Tensor | list[int]) -> list[int]:
    return list(part.shape) if isinstance(part, torch.Tensor) else part


def _read_parts(path: Path, tensors: bool) -> dict[str, dict[str, torch.Tensor | list[int]]]:
    """Per module, lora_A and lora_B: the tensors, or their shapes from the header."""
    parts: dict[str, dict[str, torch.Tensor | list[int]]] = {}
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                m = KEY.match(key)
                if not m:
                    raise TloraError(f"{path} holds {key}, which is not a LoRA A/B weight of a PEFT adapter")
                parts.setdefault(m["name"], {})[m["part"]] = (
                    f.get_tensor(key) if tensors else list(f.get_slice(key).get_shape())
                )
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors raises its own error types on bad files
        raise TloraError(f"cannot read {path}: {e}".splitlines()[0]) from e
    return parts
