"""LoRA-Dash's term on a PEFT model (SPEC.md, "Task-specific directions"): per module, sum_j dsigma_j u_j v_j^T x
added to the LoRA layer's output, u and v fixed (W's own directions, from the sidecar), dsigma a trainable
parameter that starts at 0, so the model is unchanged until it trains.

The terms live in one ModuleDict on the PEFT model itself (`dash_terms`), each added to its LoRA layer's output by a
forward hook: a trainer sees dsigma as one more parameter (trained, clipped, kept in the optimizer's state like any),
while PEFT, which saves what hangs on its tuner layers, leaves it out of adapter_model.safetensors; `save_trained`
writes it to the sidecar instead."""

from __future__ import annotations

import torch

from ..directions import DASH_SIGMA, DASH_U, DASH_VH
from ..errors import TloraError

DASH_FIELDS = (DASH_U, DASH_VH, DASH_SIGMA)
ATTRIBUTE = "dash_terms"  # on the PeftModel, outside the tuner layers whose every parameter PEFT saves


class DashTerm(torch.nn.Module):
    """u (out x s) and v^T (s x in) as buffers outside the state dict; dsigma (s) the one trainable parameter."""

    def __init__(self, u: torch.Tensor, vh: torch.Tensor, sigma: torch.Tensor):
        super().__init__()
        self.register_buffer("u", u.float(), persistent=False)
        self.register_buffer("vh", vh.float(), persistent=False)
        self.sigma = torch.nn.Parameter(sigma.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """sum_j dsigma_j u_j (v_j^T x), in float32."""
        return ((x.float() @ self.vh.T) * self.sigma) @ self.u.T

    def delta(self) -> torch.Tensor:
        """U diag(dsigma) V^T: what the term adds to W."""
        return (self.u * self.sigma.detach()) @ self.vh


def _key(name: str) -> str:
    return name.replace(".", "__")  # a ModuleDict key has no dots


def attach_dash(model: torch.nn.Module, entries: dict[str, dict[str, torch.Tensor]], folder) -> int:
    """Give each module of a PEFT model with a Dash entry its term; returns how many. The hook sits on the LoRA layer
    (whose input is the module's), so the term is added once, beside B A."""
    layers = {name.removeprefix("base_model.model."): m for name, m in model.named_modules()}
    terms = torch.nn.ModuleDict()
    for name, entry in entries.items():
        if not all(field in entry for field in DASH_FIELDS):
            continue
        layer = layers.get(name)
        if layer is None or not hasattr(layer, "lora_A"):
            raise TloraError(f"{folder}'s sidecar has a Dash term for {name}, which the adapter does not adapt")
        weight = layer.get_base_layer().weight
        term = DashTerm(entry[DASH_U], entry[DASH_VH], entry[DASH_SIGMA]).to(weight.device)
        if (term.u.shape[0], term.vh.shape[1]) != tuple(weight.shape):
            raise TloraError(f"{folder}'s Dash term for {name} does not fit its weight: rewrite the adapter")
        terms[_key(name)] = term
        layer.register_forward_hook(lambda _m, args, out, term=term: out + term(args[0]).to(out.dtype))
    if len(terms):
        setattr(model, ATTRIBUTE, terms)
    return len(terms)


def dash_terms(model: torch.nn.Module) -> dict[str, DashTerm]:
    """The Dash terms of a model, by the adapted module's name."""
    terms = getattr(model, ATTRIBUTE, None) or {}
    return {key.replace("__", "."): term for key, term in terms.items()}
