"""TLoRA (SPEC.md, "Factorisation"): A = the top-r right singular vectors of W C."""

from __future__ import annotations

from ..factorisation import tlora_a
from .base import Method, a_only

METHOD = Method("tlora", "SVD of W C", a_only(lambda m: tlora_a(m.weight(), m.covariance(), m.rank)), lr=2.5e-4)
