"""LoRA weights attached to a model's target modules by forward hooks: out = W x + s B (A x), the module untouched.

Hooks rather than replaced modules keep the model as transformers built it (its forward, its checkpointing), and
the weights are plain tensors the trainer owns: float32 however the model computes.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from ..directions import residual
from ..factorisation import random_a


@dataclass
class LoraWeights:
    """One module's LoRA: A (r x in), B (out x r) and the scaling s that multiplies B A; with LoRA-Dash's term, u
    (out x s_d), v^T (s_d x in) and the coefficients dsigma (s_d): out = W x + s B A x + U diag(dsigma) V^T x."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    dash_u: torch.Tensor | None = None
    dash_vh: torch.Tensor | None = None
    dash_sigma: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def to(self, device: str | torch.device, train_a: bool = True) -> LoraWeights:
        """A copy on `device`, float32, its trained tensors leaves that require a gradient (A only with `train_a`)."""

        def leaf(t: torch.Tensor | None, trained: bool) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device, torch.float32).clone().requires_grad_(trained)

        return LoraWeights(
            leaf(self.a, train_a),
            leaf(self.b, True),
            self.scaling,
            leaf(self.dash_u, False),
            leaf(self.dash_vh, False),
            leaf(self.dash_sigma, True),
        )

    def trained(self) -> list[torch.Tensor]:
        return [t for t in (self.a, self.b, self.dash_sigma) if t is not None and t.requires_grad]

    def delta(self) -> torch.Tensor:
        """What the module adds to W, in float32."""
        delta = self.scaling * (self.b.detach().float() @ self.a.detach().float())
        if self.dash_sigma is not None:
            delta = delta + (self.dash_u.float() * self.dash_sigma.detach().float()) @ self.dash_vh.float()
        return delta


def kaiming_start(name: str, shape: tuple[int, int], rank: int, alpha: float, seed: int) -> LoraWeights:
    """PEFT's default start: Kaiming-uniform A (a = sqrt(5)), B = 0; seeded per module by the seed and its name,
    so that the start does not depend on the order modules are visited in."""
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    a = random_a(in_features, rank, generator)
    return LoraWeights(a, torch.zeros(out_features, rank), alpha / rank)


@contextlib.contextmanager
def attached(modules: Mapping[str, torch.nn.Module], weights: Mapping[str, LoraWeights]) -> Iterator[None]:
    """Within the block, each module's output gains s B (A x) (and the Dash term), computed in float32 and added in
    its dtype."""

    def hook_for(lora: LoraWeights):
        def hook(_module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0].to(lora.a.dtype)
            added = lora.scaling * ((x @ lora.a.T) @ lora.b.T)
            if lora.dash_sigma is not None:
                added = added + ((x @ lora.dash_vh.T) * lora.dash_sigma) @ lora.dash_u.T
            return output + added.to(output.dtype)

        return hook

    handles = [modules[name].register_forward_hook(hook_for(lora)) for name, lora in weights.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Start:
    """An adapter's starting point, to train: each module's LoRA, the factors s0 B0 A0 a residual adapter takes out of
    the base (by module: A0, B0, s0), and whether A trains."""

    weights: dict[str, LoraWeights]
    residual: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    train_a: bool


@contextlib.contextmanager
def started(model: torch.nn.Module, start: Start) -> Iterator[dict[str, LoraWeights]]:
    """The model with `start` on it for the block: residual targets hold W_res (their weights restored afterwards,
    exactly), every LoRA hooked on, its trained tensors fresh leaves on the model's device; yields those weights."""
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    kept = {}
    with torch.no_grad():
        for name, (a0, b0, s0) in start.residual.items():
            weight = modules[name].weight
            kept[name] = weight.detach().clone()
            weight.copy_(residual(weight, a0.to(weight.device), b0.to(weight.device), s0))
    weights = {name: lora.to(device, start.train_a) for name, lora in start.weights.items()}
    try:
        with attached(modules, weights):
            yield weights
    finally:
        with torch.no_grad():
            for name, weight in kept.items():
                modules[name].weight.copy_(weight)
