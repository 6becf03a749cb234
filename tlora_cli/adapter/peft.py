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
from ..model.checkpoint import header_problem
from .gate import cast
from .layout import CONFIG, METADATA, WEIGHTS

KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<part>[AB])\.weight$")
DEFAULT_RANK, DEFAULT_ALPHA = 8, 8  # LoraConfig's defaults, for a config that leaves r or lora_alpha out
WIDER = "the adapter's dtype cannot hold it: export a copy of the adapter saved in float32"


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
        """s_i B in float32, then in `dtype` (default B's own) through the tensor gate: the B a server with scaling 1
        must see."""
        name = f"{self.name}'s lora_B times its scaling {self.scaling:.3g}"
        return cast(self.b.float() * self.scaling, dtype or self.b.dtype, name, WIDER).contiguous()

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
    """The adapter in `folder`, checked against itself (consistency gate): every rank a whole number of at least 1,
    every alpha finite, every pattern key a regex, A and B floating point of matching shapes, and every module the
    config names by its path present in the weights. Without `tensors`, shapes come from the header alone."""
    config = read_config(folder)
    parts = _read_parts(folder / WEIGHTS, tensors)
    if not parts:
        raise TloraError(f"{folder / WEIGHTS} holds no LoRA weights")
    rslora = bool(config.get("use_rslora"))
    rank_pattern, alpha_pattern = _pattern(config, "rank_pattern", True), _pattern(config, "alpha_pattern", False)
    default_rank = _number(config.get("r", DEFAULT_RANK), "r", True)
    default_alpha = _number(config.get("lora_alpha", DEFAULT_ALPHA), "lora_alpha", False)
    order = _targets(config)
    position = {name: i for i, name in enumerate(order)}
    modules = []
    for name in sorted(parts, key=lambda n: (position.get(n, len(order)), model_order(n))):
        a, b = _factors(folder / WEIGHTS, name, parts[name])
        rank_key, alpha_key = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
        rank = rank_pattern[rank_key] if rank_key is not None else default_rank
        alpha = float(alpha_pattern[alpha_key] if alpha_key is not None else default_alpha)
        if rank != a.shape[0]:
            raise TloraError(f"{folder / CONFIG} gives {name} rank {rank} but its A has {a.shape[0]} rows")
        loaded = (a.tensor, b.tensor) if tensors else (None, None)
        modules.append(
            LoraModule(name, rank, alpha, peft_scaling(alpha, rank, rslora), b.shape[0], a.shape[1], *loaded)
        )
    _check_named([*order, *rank_pattern, *alpha_pattern], [m.name for m in modules], folder)
    meta = folder / METADATA
    metadata = (
        read_object(meta, f"rewrite the adapter with `tlora init`, or remove {METADATA}") if meta.exists() else {}
    )
    return PeftAdapter(folder, config, modules, metadata)


@dataclass
class Part:
    """One lora_A or lora_B weight as read: shape and safetensors dtype (F32, BF16, I64, ...), the tensor if read."""

    shape: list[int]
    dtype: str
    tensor: torch.Tensor | None


def _factors(path: Path, name: str, got: dict[str, Part]) -> tuple[Part, Part]:
    """A module's A (r x in) and B (out x r), both present, floating point and of shapes that fit together."""
    if set(got) != {"A", "B"}:
        raise TloraError(f"{path}: {name} lacks lora_{'B' if 'A' in got else 'A'}")
    a, b = got["A"], got["B"]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise TloraError(f"{path}: {name} has A {a.shape} and B {b.shape}, not r x in and out x r")
    for part, piece in (("A", a), ("B", b)):
        if not piece.dtype.startswith(("F", "BF")):
            raise TloraError(
                f"{path}: {name}'s lora_{part} is {piece.dtype}, not a floating-point tensor: a LoRA weight is "
                "float32, bfloat16 or float16; save the adapter again"
            )
        if piece.tensor is not None and not bool(torch.isfinite(piece.tensor).all()):
            raise TloraError(f"{path}: {name}'s lora_{part} holds NaN or inf values: the training that saved it failed")
    return a, b


def _number(value: object, where: str, rank: bool) -> int | float:
    """A rank (a whole number of at least 1) or an alpha (a finite number) from adapter_config.json, or one line."""
    if rank:
        ok, wanted = isinstance(value, int) and value >= 1, "a whole number of at least 1"
    else:
        ok, wanted = isinstance(value, (int, float)) and _finite(value), "a finite number"
    if not ok or isinstance(value, bool):
        raise TloraError(f"{CONFIG}'s {where} is {value!r}, which is not {wanted}: fix it, or save the adapter again")
    return value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _pattern(config: dict, field: str, rank: bool) -> dict:
    """rank_pattern or alpha_pattern: a mapping of valid regexes to ranks (or alphas)."""
    value = config.get(field) or {}
    if not isinstance(value, dict):
        raise TloraError(f"{CONFIG}'s {field} is a {type(value).__name__}, not a mapping of module names to numbers")
    for key, number in value.items():
        try:
            re.compile(key)
        except re.error as e:
            raise TloraError(f"{CONFIG}'s {field} key {key!r} is not a valid regular expression ({e})") from e
        _number(number, f"{field} entry {key!r}", rank)
    return value


def _targets(config: dict) -> list[str]:
    """target_modules as a list of names ([] for PEFT's regex form or none)."""
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return []
    odd = [t for t in targets if not isinstance(t, str)]
    if odd:
        raise TloraError(f"{CONFIG}'s target_modules holds {odd[0]!r}, which is not a module name")
    return targets


# A module named by its path, with its layer index (model.layers.0.self_attn.q_proj), not a short name or a regex.
MODULE_PATH = re.compile(r"[\w.]*(?:^|\.)\d+\.[\w.]+")


def _check_named(entries: list[str], names: list[str], folder: Path) -> None:
    """Every module the config names by its path has weights: one it names that the file lacks means the two do not
    belong together. Short names (q_proj) and regexes may match nothing, as PEFT allows."""
    for entry in entries:
        if MODULE_PATH.fullmatch(entry) and not any(n == entry or n.endswith("." + entry) for n in names):
            raise TloraError(
                f"{folder / CONFIG} names {entry}, but {WEIGHTS} holds no weights for it: the config and the weights "
                "do not belong together; save the adapter again"
            )


def _read_parts(path: Path, tensors: bool) -> dict[str, dict[str, Part]]:
    """Per module, lora_A and lora_B: shape and dtype from the header, and the tensors when asked for."""
    problem = header_problem(path)
    if problem:
        raise TloraError(f"cannot read {path}: {problem}")
    parts: dict[str, dict[str, Part]] = {}
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                m = KEY.match(key)
                if not m:
                    raise TloraError(f"{path} holds {key}, which is not a LoRA A/B weight of a PEFT adapter")
                piece = f.get_slice(key)
                tensor = f.get_tensor(key) if tensors else None
                parts.setdefault(m["name"], {})[m["part"]] = Part(list(piece.get_shape()), piece.get_dtype(), tensor)
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors raises its own error types on bad files
        raise TloraError(f"cannot read {path}: {e}".splitlines()[0]) from e
    return parts
