"""Task-specific directions (SPEC.md, "Task-specific directions"; papers/lora-tsd-paper.txt, Eq. 4, 7-8): which of
W's singular directions a short LoRA run moved most, and LoRA-Init's factors on them. Pure tensor functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPSILON = 1e-6  # the paper's epsilon in delta_j = |u_j^T dW v_j| / (sigma_j + epsilon)
# Each module's fields in an adapter's sidecar: the directions A and B were put on (LoRA-Init), and LoRA-Dash's term.
INDICES, RATES = "indices", "rates"
DASH_U, DASH_VH, DASH_SIGMA, DASH_INDICES, DASH_RATES = "dash_u", "dash_vh", "dash_sigma", "dash_indices", "dash_rates"


@dataclass
class Directions:
    """Some of W's singular triplets, most changed first: W's own indices j, the change rates delta_j, u_j as the
    columns of `u` (out x k), sigma_j, v_j^T as the rows of `vh` (k x in); float64."""

    indices: torch.Tensor
    rates: torch.Tensor
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def delta(self) -> torch.Tensor:
        """sum_j sigma_j u_j v_j^T over these directions."""
        return (self.u * self.s) @ self.vh

    def first(self, count: int) -> Directions:
        return Directions(self.indices[:count], self.rates[:count], self.u[:, :count], self.s[:count], self.vh[:count])


def ranked_directions(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> Directions:
    """Every singular direction of W (an SVD in float64), ranked by its change rate under dW = scaling B A, ties
    to the smaller j. u_j^T dW v_j = scaling sum_k (U^T B)_jk (V^T A^T)_jk: dW, which is out x in, is never formed.
    Each pair (u_j, v_j) is flipped together so that v_j's largest-magnitude entry is positive: same inputs, same
    bytes, and sigma_j u_j v_j^T unchanged."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    signs[signs == 0] = 1
    u, vh = u * signs, vh * signs[:, None]
    projected = scaling * ((u.T @ b.double()) * (vh @ a.double().T)).sum(dim=1)
    rates = projected.abs() / (s + EPSILON)
    order = torch.sort(-rates, stable=True).indices
    return Directions(order, rates[order], u[:, order], s[order], vh[order])


def lora_init_factors(directions: Directions, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U_r (S_r / s)^1/2, (S_r / s)^1/2 V_r^T), PiSSA's convention: s B A = U_r S_r V_r^T."""
    root = (directions.s / scaling).sqrt()
    return directions.u * root, root[:, None] * directions.vh


def residual(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_res = W - s B A, in float32 (SPEC.md), returned in W's dtype."""
    return (weight.float() - scaling * (b.float() @ a.float())).to(weight.dtype)


def dash_fields(directions: Directions) -> dict[str, torch.Tensor]:
    """A Dash term on these directions, as the sidecar keeps it: u, v^T (float32), their indices and change rates,
    and dsigma, which starts at 0."""
    return {
        DASH_U: directions.u.float(),
        DASH_VH: directions.vh.float(),
        DASH_SIGMA: torch.zeros(len(directions.s)),
        DASH_INDICES: directions.indices,
        DASH_RATES: directions.rates,
    }
