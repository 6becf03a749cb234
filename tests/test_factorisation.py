"""A_i against an independent SVD, the sign rule, and determinism."""

import torch

from tlora_cli.factorisation import canonical_signs, tlora_a


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
