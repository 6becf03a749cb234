"""A_i from W_i and C_i (SPEC.md, "Factorisation"). Pure tensor functions, no model."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 or wider (SPEC.md): float64 when an input already is."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
    dtype = compute_dtype(weight, covariance)
    product = weight.to(dtype) @ covariance.to(dtype)
    _, _, vh = torch.linalg.svd(product, full_matrices=False)
    return canonical_signs(vh[:rank])


def w_svd_a(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The paper's W-SVD ablation (PiSSA's A, base weights untouched): top right singular vectors of W."""
    _, _, vh = torch.linalg.svd(weight.to(compute_dtype(weight)), full_matrices=False)
    return canonical_signs(vh[:rank])


def theory_a(weight: torch.Tensor, covariance: torch.Tensor, rank: int, damping: float = 1e-6) -> torch.Tensor:
    """The paper's closed form (Eq. 3/16): A = V_r^T C^{-1/2}, V_r from the SVD of W C^{1/2}.

    C is regularised as C + damping * I (Appendix A's Tikhonov term) so that C^{-1/2} exists; the
    long tail of tiny eigenvalues is what makes this unstable in practice (Appendix B).
    """
    dtype = compute_dtype(weight, covariance)
    values, vectors = torch.linalg.eigh(
        covariance.to(dtype) + damping * torch.eye(len(covariance), dtype=dtype, device=covariance.device)
    )
    values = values.clamp_min(damping)
    root = (vectors * values.sqrt()) @ vectors.T
    inverse_root = (vectors * values.rsqrt()) @ vectors.T
    _, _, vh = torch.linalg.svd(weight.to(dtype) @ root, full_matrices=False)
    return canonical_signs(vh[:rank]) @ inverse_root


def random_a(in_features: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Standard LoRA's A: Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), as PEFT does."""
    bound = 1.0 / in_features**0.5
    return (torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).float()
