"""A_i against an independent SVD, the sign rule, and determinism."""

import pytest
import torch

from tlora_cli.factorisation import (
    canonical_signs,
    lora_da_a,
    random_a,
    theory_a,
    tlora_a,
    top_right_singular_vectors,
    w_svd_a,
)


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / (4 * n)


def test_rows_span_the_top_right_singular_subspace_of_w_c():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    c = _spd(40, 1)
    for r in (1, 5, 24):
        a = tlora_a(w.float(), c.float(), r).double()
        # Independent reference: eigenvectors of (WC)^T (WC), largest first.
        m = w @ c
        vals, vecs = torch.linalg.eigh(m.T @ m)
        ref = vecs[:, vals.argsort(descending=True)[:r]].T
        assert a.shape == (r, 40)
        assert torch.allclose(a @ a.T, torch.eye(r, dtype=torch.float64), atol=1e-5)
        assert (torch.linalg.matrix_norm(ref @ a.T) ** 2 / r).item() > 0.9999


def test_float64_inputs_stay_float64():
    w, c = torch.randn(8, 6, dtype=torch.float64), _spd(6, 2)
    assert tlora_a(w, c, 3).dtype == torch.float64
    assert tlora_a(w.float(), c.float(), 3).dtype == torch.float32


def test_sign_rule_makes_the_largest_entry_positive_and_results_reproducible():
    w, c = torch.randn(16, 12), _spd(12, 3).float()
    a = tlora_a(w, c, 6)
    top = a.gather(1, a.abs().argmax(dim=1, keepdim=True))
    assert (top > 0).all()
    assert torch.equal(a, tlora_a(w.clone(), c.clone(), 6))
    assert torch.equal(canonical_signs(-a), a)


def _subspace_overlap(a: torch.Tensor, ref: torch.Tensor) -> float:
    q, _ = torch.linalg.qr(a.double().T)
    return (torch.linalg.matrix_norm(ref.double() @ q) ** 2 / len(ref)).item()


def test_w_svd_spans_the_top_right_singular_subspace_of_w():
    w = torch.randn(20, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(w.T @ w)
    ref = vecs[:, vals.argsort(descending=True)[:6]].T
    assert _subspace_overlap(w_svd_a(w.float(), 6), ref) > 0.9999


def test_theory_is_whitened_and_spans_the_top_subspace_of_w_c_half():
    w = torch.randn(20, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    c = _spd(32, 6)
    a = theory_a(w, c, 5, damping=1e-6)
    c_reg = c + 1e-6 * torch.eye(32, dtype=torch.float64)
    # A = V^T C^-1/2 with orthonormal V: A C A^T = I.
    assert torch.allclose(a @ c_reg @ a.T, torch.eye(5, dtype=torch.float64), atol=1e-8)
    vals, vecs = torch.linalg.eigh(c_reg)
    half = vecs @ torch.diag(vals.sqrt()) @ vecs.T
    m = w @ half
    mvals, mvecs = torch.linalg.eigh(m.T @ m)
    ref = mvecs[:, mvals.argsort(descending=True)[:5]].T
    assert _subspace_overlap(a @ half, ref) > 0.9999


def test_random_is_kaiming_uniform_seeded():
    a = random_a(400, 8, torch.Generator().manual_seed(1))
    assert a.shape == (8, 400) and a.dtype == torch.float32
    assert a.abs().max() <= 1 / 20 and a.abs().max() > 0.045
    assert abs(a.std().item() - (1 / 20) / 3**0.5) < 0.003
    assert torch.equal(a, random_a(400, 8, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, random_a(400, 8, torch.Generator().manual_seed(2)))


def _lora_da_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    z = _spd(24, seed)
    s = torch.rand(16, generator=g, dtype=torch.float64) * 1e-3 + 1e-4
    grad = torch.randn(16, 24, generator=g, dtype=torch.float64) * 1e-2
    return z, s, grad


def test_lora_da_takes_the_smallest_eigenvectors_of_the_guidance_matrix():
    z, s, grad = _lora_da_inputs(7)
    d, beta, population = 1e-6, 0.5, 1000
    a = lora_da_a(z, s, grad, 5, beta=beta, population=population, damping=d)
    # Independently, with explicit inverses.
    z_inv = torch.linalg.inv(z + d * torch.eye(24, dtype=torch.float64))
    step = -z_inv @ grad.T @ torch.diag(1 / (s + d))
    sigma = torch.linalg.svdvals(step)[0]
    h = beta * (1 / (s + d)).sum() / (population * sigma**2) * z_inv - (step / sigma) @ (step / sigma).T
    vals, vecs = torch.linalg.eigh(h)
    ref = vecs[:, vals.argsort()[:5]].T
    assert torch.allclose(a @ a.T, torch.eye(5, dtype=torch.float64), atol=1e-8)
    assert _subspace_overlap(a, ref) > 0.9999


def test_lora_da_without_variance_is_the_natural_gradient_subspace():
    z, s, grad = _lora_da_inputs(8)
    a = lora_da_a(z, s, grad, 4, beta=0.0, damping=1e-6)
    natural = torch.diag(1 / (s + 1e-6)) @ grad @ torch.linalg.inv(z + 1e-6 * torch.eye(24, dtype=torch.float64))
    vals, vecs = torch.linalg.eigh(natural.T @ natural)
    assert _subspace_overlap(a, vecs[:, vals.argsort(descending=True)[:4]].T) > 0.9999


def test_lora_da_accepts_a_covariance_summed_in_float32_with_slightly_negative_eigenvalues():
    # Real case (SmolLM2's down_proj): rank-deficient inputs of large scale, X^T X summed in float32.
    g = torch.Generator().manual_seed(10)
    x = torch.randn(40, 24, generator=g) @ torch.randn(24, 64, generator=g) * 30.0  # rank 24 of 64
    z = (x.T @ x / 40).float()
    assert torch.linalg.eigvalsh(z.double()).min() < -1e-6  # what made Cholesky fail
    s = torch.rand(16, generator=g, dtype=torch.float64) * 1e-3 + 1e-4
    grad = torch.randn(16, 40, generator=g, dtype=torch.float64) @ x.double() * 1e-4  # rows in the inputs' span
    a = lora_da_a(z, s, grad, 4)
    assert torch.isfinite(a).all()
    assert torch.allclose(a @ a.T, torch.eye(4, dtype=a.dtype), atol=1e-6)


def test_lora_da_refuses_a_zero_gradient():
    z, s, grad = _lora_da_inputs(9)
    with pytest.raises(ValueError, match="zero"):
        lora_da_a(z, s, torch.zeros_like(grad), 2)


def _with_spectrum(m: int, n: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(singular_values), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, len(singular_values), generator=g, dtype=torch.float64))[0]
    return (u * singular_values) @ v.T


def test_large_matrices_take_the_iterative_path_and_match_the_full_svd():
    # 1024 x 1100 with r = 4: a block of 24 vectors, small enough for subspace iteration.
    values = torch.arange(1, 1025, dtype=torch.float64) ** -0.5  # slow decay: many iterations
    matrix = _with_spectrum(1024, 1100, values, 11).float()
    a = top_right_singular_vectors(matrix, 4)
    full = torch.linalg.svd(matrix.double(), full_matrices=False)[2][:4]
    assert a.dtype == torch.float64 and a.shape == (4, 1100)
    assert not torch.equal(a, full)  # not the SVD's own bytes: the iterative path answered
    assert torch.allclose(a.double() @ a.double().T, torch.eye(4, dtype=torch.float64), atol=1e-6)
    assert _subspace_overlap(a, full) > 1 - 1e-9
    assert torch.equal(a, top_right_singular_vectors(matrix.clone(), 4))


def test_when_the_iteration_does_not_converge_the_full_svd_answers():
    values = torch.linspace(1.0, 0.99, 1024, dtype=torch.float64)  # almost flat: no convergence in 100 steps
    matrix = _with_spectrum(1024, 1100, values, 12)
    assert torch.equal(top_right_singular_vectors(matrix, 4), torch.linalg.svd(matrix, full_matrices=False)[2][:4])


def _ill_conditioned(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    """sigma_1 / sigma_r = 1e6 and sigma_r / sigma_{r+1} = 1.01: the case SPEC.md's accuracy rule is about."""
    k = min(m, n)
    values = torch.empty(k, dtype=torch.float64)
    values[:rank] = torch.logspace(0, -6, rank, dtype=torch.float64)
    values[rank:] = values[rank - 1] / 1.01 * torch.logspace(0, -2, k - rank, dtype=torch.float64)
    return _with_spectrum(m, n, values, seed)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "rank"), [((64, 96), 9), ((1100, 1300), 9), ((1100, 1300), 40)])
def test_ill_conditioned_products_match_the_float64_svd(shape, rank, device):
    # float32 inputs, as a calibration holds them; the reference is a float64 SVD of the same product.
    w = _ill_conditioned(*shape, rank, seed=rank).float()
    c = torch.eye(shape[1])
    reference = torch.linalg.svd(w.double() @ c.double(), full_matrices=False)[2][:rank]
    a = tlora_a(w.to(device), c.to(device), rank)
    assert a.device.type == device
    assert _subspace_overlap(a.cpu(), reference) >= 0.9999
    # The case is hard: a float32 SVD misses the subspace on the larger shapes (what SPEC.md rules out).
    if min(shape) >= 1024:
        assert _subspace_overlap(torch.linalg.svd(w, full_matrices=False)[2][:rank], reference) < 0.9999


def test_every_method_factorises_in_float64():
    w = _ill_conditioned(64, 96, 9, seed=3)
    reference = torch.linalg.svd(w, full_matrices=False)[2][:9]
    assert _subspace_overlap(w_svd_a(w.float(), 9), reference) >= 0.9999
    # theory: A C^{1/2} spans the top subspace of W C^{1/2}; with C = I that is W's.
    assert _subspace_overlap(theory_a(w.float(), torch.eye(96), 9, damping=1e-12), reference) >= 0.9999
