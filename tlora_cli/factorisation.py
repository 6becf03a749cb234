"""A_i from W_i and C_i (SPEC.md, "Factorisation"). Pure tensor functions, no model."""

from __future__ import annotations

import math

import torch


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype A is returned in: float64 when an input already is, else float32. The work is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def canonical_signs(rows: torch.Tensor) -> torch.Tensor:
    """Flip each row so its largest-magnitude entry is positive: same inputs, same bytes."""
    idx = rows.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(rows.gather(1, idx))
    signs[signs == 0] = 1
    return rows * signs


def top_right_singular_vectors(matrix: torch.Tensor, rank: int, tol: float = 1e-8, max_iter: int = 200) -> torch.Tensor:
    """The top-`rank` right singular vectors of `matrix` as orthonormal float64 rows, to float64 accuracy.

    SPEC.md asks for the subspace a float64 SVD gives, however ill-conditioned the matrix: a float32
    SVD mixes vectors whose singular values are close when sigma_1 is 1e5 times larger. Below 1024 on
    either side the full float64 SVD is quick (SmolLM2's 576 x 1536 products take 0.1 s). A Llama-2-7B
    down_proj product (4096 x 11008) would take minutes, and only r << 4096 vectors are kept: there a
    block of k = 2r + 16 vectors is refined by float64 subspace iteration on M^T M with a Rayleigh-Ritz
    step on M itself (the SVD of M Q, which does not square the condition number). The top-r Ritz
    subspace converges like (sigma_{k+1} / sigma_r)^(2t), so the change between two steps times
    1 / (1 - rate) bounds how far it still is from its limit; iteration stops once that bound, or the
    residual over the Ritz gap at r, is below `tol`. A spectrum too flat for the block to converge in
    `max_iter` steps gets the full SVD.
    """
    if rank < 1:
        raise ValueError("rank must be at least 1")
    m = matrix.double()
    block = 2 * rank + 16
    if min(m.shape) < 1024 or 4 * block > min(m.shape):  # the full SVD is quick enough
        return torch.linalg.svd(m, full_matrices=False)[2][:rank]
    generator = torch.Generator(device=m.device).manual_seed(0)  # fixed start: same inputs, same bytes
    start = torch.randn(m.shape[1], block, generator=generator, dtype=m.dtype, device=m.device)
    basis = torch.linalg.qr(m.T @ (m @ start))[0]
    previous = None
    for _ in range(max_iter):
        image = m @ basis  # (out x k)
        _, values, vh = torch.linalg.svd(image, full_matrices=False)
        ritz = basis @ vh[:rank].T  # (in x r), orthonormal
        if _converged(m, image, vh, values, ritz, previous, rank, tol):
            return ritz.T
        previous = ritz
        basis = torch.linalg.qr(m.T @ image)[0]
    return torch.linalg.svd(m, full_matrices=False)[2][:rank]


def _converged(
    m: torch.Tensor,
    image: torch.Tensor,
    vh: torch.Tensor,
    values: torch.Tensor,
    ritz: torch.Tensor,
    previous: torch.Tensor | None,
    rank: int,
    tol: float,
) -> bool:
    """Whether the top-r Ritz subspace is within `tol` (sine of the largest angle) of the true one.

    Two certificates, either suffices: the residual ||M^T M U - U Theta^2|| over the Ritz gap
    theta_r^2 - theta_{r+1}^2 (Davis-Kahan), which rounding caps near eps * kappa^2; and the step from
    the previous subspace over 1 - (theta_k / theta_r)^2, the geometric tail of a linear convergence
    whose rate theta_k / theta_r overestimates (sigma_{k+1} / sigma_r): it holds where rounding
    caps the first.
    """
    top, gap_at_r = values[:rank], values[rank - 1] ** 2 - values[rank] ** 2
    gram = m.T @ (image @ vh[:rank].T)  # M^T M U
    residual = torch.linalg.matrix_norm(gram - ritz * top**2)
    if gap_at_r > 0 and residual <= tol * gap_at_r:
        return True
    if previous is None:
        return False
    rate = (values[-1] / values[rank - 1]) ** 2
    # sin of the largest angle between span(previous) and span(ritz): ||(I - P_prev) ritz||_2
    step = torch.linalg.matrix_norm(ritz - previous @ (previous.T @ ritz), ord=2)
    return bool(rate < 1 and step / (1 - rate) <= tol)


def tlora_a(weight: torch.Tensor, covariance: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` right singular vectors of W C as orthonormal rows (rank x in); product and SVD in float64.

    The SVD runs on whatever device the inputs are on; the result keeps that device.
    """
    product = weight.double() @ covariance.double()
    return canonical_signs(top_right_singular_vectors(product, rank)).to(result_dtype(weight, covariance))


def w_svd_a(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The paper's W-SVD ablation (PiSSA's A, base weights untouched): top right singular vectors of W."""
    return canonical_signs(top_right_singular_vectors(weight, rank)).to(result_dtype(weight))


def theory_a(weight: torch.Tensor, covariance: torch.Tensor, rank: int, damping: float = 1e-6) -> torch.Tensor:
    """The paper's closed form (Eq. 3/16): A = V_r^T C^{-1/2}, V_r from the SVD of W C^{1/2}.

    C is regularised as C + damping * I (Appendix A's Tikhonov term) so that C^{-1/2} exists; the
    long tail of tiny eigenvalues is what makes this unstable in practice (Appendix B).
    """
    c = covariance.double()
    values, vectors = torch.linalg.eigh(c + damping * torch.eye(len(c), dtype=c.dtype, device=c.device))
    values = values.clamp_min(damping)
    root = (vectors * values.sqrt()) @ vectors.T
    inverse_root = (vectors * values.rsqrt()) @ vectors.T
    top = top_right_singular_vectors(weight.double() @ root, rank)
    return (canonical_signs(top) @ inverse_root).to(result_dtype(weight, covariance))


def random_a(in_features: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Standard LoRA's A: Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), as PEFT does."""
    bound = 1.0 / in_features**0.5
    return (torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).float()


class DampingScale(ValueError):
    """A damping so far from the covariance's scale that LoRA-DA's K-FAC step under- or overflows float64 (it is
    about G / damping^2 where the damping dominates): no A can be built from it."""

    def __init__(self, too_large: bool, largest: float):
        super().__init__(f"damping too {'large' if too_large else 'small'} for a covariance of scale {largest:.3g}")
        self.too_large, self.largest = too_large, largest


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
    dtype = torch.float64
    if not bool(mean_grad.any()):
        raise ValueError("the mean gradient is zero: no task signal reached this module")
    values, vectors = torch.linalg.eigh(covariance.to(dtype))
    inverse_z = (vectors / (values.clamp_min(0) + damping)) @ vectors.T
    inverse_s = 1.0 / (output_grad_sq.to(dtype) + damping)
    step = -(inverse_z @ mean_grad.to(dtype).T) * inverse_s  # (in x out)
    sigma = torch.linalg.matrix_norm(step, ord=2) if bool(step.isfinite().all()) else math.inf
    if not 0 < sigma**2 < math.inf:  # the step, or its square, left float64's range: the damping's doing
        largest = values.max().item()
        raise DampingScale(too_large=damping > largest, largest=largest)
    step = step / sigma
    coefficient = beta * inverse_s.sum() / (population * sigma**2)
    guidance = coefficient * inverse_z - step @ step.T
    _, vectors = torch.linalg.eigh((guidance + guidance.T) / 2)  # ascending eigenvalues
    return canonical_signs(vectors[:, :rank].T).to(result_dtype(covariance, mean_grad))
