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


def top_right_singular_vectors(
    matrix: torch.Tensor, rank: int, tol: float = 1e-12, max_iter: int = 100
) -> torch.Tensor:
    """The top-`rank` right singular vectors of `matrix` as orthonormal rows, in its dtype.

    A full SVD of a Llama-2-7B down_proj product (4096 x 11008) takes about a minute on a laptop CPU,
    and only r << 11008 of its vectors are kept. For a large matrix a block of k = 2r + 16 vectors is
    refined by subspace iteration on M^T M with a Rayleigh-Ritz step (O(m n k) per step, in float64),
    until every wanted Ritz pair has a residual below `tol` times the largest Ritz value, which bounds
    the error of the subspace by that residual over the spectral gap at r. A spectrum that decays too
    slowly for the block to converge in `max_iter` steps gets the full SVD, as small matrices do (below
    1024 the full SVD is as fast: SmolLM2's 576 x 1536 products take 0.1 s).
    """
    if rank < 1:
        raise ValueError("rank must be at least 1")
    block = 2 * rank + 16
    if min(matrix.shape) < 1024 or 4 * block > min(matrix.shape):  # the full SVD is quick enough
        return torch.linalg.svd(matrix, full_matrices=False)[2][:rank]
    m = matrix.double()
    generator = torch.Generator(device=m.device).manual_seed(0)  # fixed start: same inputs, same bytes
    basis = torch.linalg.qr(
        m.T @ (m @ torch.randn(m.shape[1], block, generator=generator, dtype=m.dtype, device=m.device))
    )[0]
    for _ in range(max_iter):
        image = m @ basis  # (out x k)
        _, values, vh = torch.linalg.svd(image, full_matrices=False)
        ritz = basis @ vh[:rank].T  # (in x r), orthonormal
        gram = m.T @ (image @ vh[:rank].T)  # M^T M ritz
        residual = torch.linalg.vector_norm(gram - ritz * values[:rank] ** 2, dim=0).max()
        if residual <= tol * values[0] ** 2:
            return ritz.T.to(matrix.dtype)
        basis = torch.linalg.qr(m.T @ image)[0]
    return torch.linalg.svd(matrix, full_matrices=False)[2][:rank]


def tlora_a(weight: torch.Tensor, covariance: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` right singular vectors of W C as orthonormal rows (rank x in), in float32 or wider.

    The SVD runs on whatever device the inputs are on; the result keeps that device.
    """
    dtype = compute_dtype(weight, covariance)
    return canonical_signs(top_right_singular_vectors(weight.to(dtype) @ covariance.to(dtype), rank))


def w_svd_a(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The paper's W-SVD ablation (PiSSA's A, base weights untouched): top right singular vectors of W."""
    return canonical_signs(top_right_singular_vectors(weight.to(compute_dtype(weight)), rank))


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


def lora_da_a(
    covariance: torch.Tensor,
    output_grad_sq: torch.Tensor,
    mean_grad: torch.Tensor,
    rank: int,
    beta: float = 0.03,
    population: int = 100_000,
    damping: float = 1e-6,
) -> torch.Tensor:
    """LoRA-DA's A (docs/lora-da.md sections 4-5): the eigenvectors of the guidance matrix H with the
    smallest eigenvalues, H = c (Z + dI)^-1 - D D^T, where D is the K-FAC natural-gradient step
    -(Z + dI)^-1 G^T diag(1/(s + d)) scaled to spectral norm 1 and c = beta tr(diag(1/(s + d))) / (N sigma^2).

    Z is the input covariance (TLoRA's C), s the output-gradient second moments, G the mean gradient,
    N the size of the fine-tuning set. A dense eigh replaces the paper's LOBPCG: exact and reproducible.
    Z is inverted through its eigendecomposition with eigenvalues clamped at 0, not by Cholesky as the
    released code does: a covariance summed in float32 has eigenvalues a little below 0 in the directions
    its inputs never span, far larger than an absolute 1e-6 damping, and Cholesky fails on it.
    """
    dtype = compute_dtype(covariance, mean_grad)
    values, vectors = torch.linalg.eigh(covariance.to(dtype))
    inverse_z = (vectors / (values.clamp_min(0) + damping)) @ vectors.T
    inverse_s = 1.0 / (output_grad_sq.to(dtype) + damping)
    step = -(inverse_z @ mean_grad.to(dtype).T) * inverse_s  # (in x out)
    sigma = torch.linalg.matrix_norm(step, ord=2)
    if not sigma > 0:
        raise ValueError("the mean gradient is zero: no task signal reached this module")
    step = step / sigma
    coefficient = beta * inverse_s.sum() / (population * sigma**2)
    guidance = coefficient * inverse_z - step @ step.T
    _, vectors = torch.linalg.eigh((guidance + guidance.T) / 2)  # ascending eigenvalues
    return canonical_signs(vectors[:, :rank].T)
