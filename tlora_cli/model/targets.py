"""Which linear layers get an adapter, and which of them read the same input (one covariance each)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TloraError

LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Architectures whose projections have other names; everything else uses LLAMA_STYLE.
DEFAULT_TARGETS = {
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


@dataclass(frozen=True)
class Target:
    name: str
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def default_suffixes(model_type: str) -> tuple[str, ...]:
    return DEFAULT_TARGETS.get(model_type, LLAMA_STYLE)


def parse_suffixes(target_modules: str | None, model_type: str) -> tuple[str, ...]:
    if target_modules is None:
        return default_suffixes(model_type)
    suffixes = tuple(s.strip() for s in target_modules.split(",") if s.strip())
    if not suffixes:
        raise TloraError("--target-modules is empty: give comma-separated names like q_proj,v_proj")
    return suffixes


def matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def find_targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[Target]:
    """Linear layers named by a suffix, in model order (the order ties are broken in)."""
    found = [
        Target(name, m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and matches(name, suffixes)
    ]
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TloraError(
            f"no linear layer matches --target-modules {','.join(suffixes)}; this model's linear layers are: "
            + ",".join(linear)
        )
    return found
