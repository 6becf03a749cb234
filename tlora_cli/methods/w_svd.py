"""The paper's W-SVD ablation (PiSSA's A, base weights untouched): A = the top-r right singular vectors of W."""

from __future__ import annotations

from ..factorisation import w_svd_a
from .base import Method, a_only

METHOD = Method(
    "w-svd", "SVD of W alone", a_only(lambda m: w_svd_a(m.weight(), m.rank)), statistics=frozenset(), lr=2e-3
)
