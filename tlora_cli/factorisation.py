"""A_i from W_i and C_i (SPEC.md, "Factorisation"). Pure tensor functions, no model."""

from __future__ import annotations

import torch


def canonical_signs(rows: torch.Tensor) -> torch.Tensor:
    """Flip each row so its largest-magnitude entry is positive: same inputs, same bytes."""
    idx = rows.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(rows.gather(1, idx))
    signs[signs == 0] = 1
    return rows * signs


def tlora_a(weight: torch.Tensor, covariance: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` right singular vectors of W C as orthonormal rows (rank x in), in float32 or wider.

    The SVD runs on whatever device the inputs are on; the result keeps that device.
    """
    if rank < 1:
        raise ValueError("rank must be at least 1")
    dtype = torch.float64 if weight.dtype == torch.float64 or covariance.dtype == torch.float64 else torch.float32
    product = weight.to(dtype) @ covariance.to(dtype)
    _, _, vh = torch.linalg.svd(product, full_matrices=False)
    return canonical_signs(vh[:rank])
