"""The TLoRA paper's closed form: A = V_r^T C^-1/2, V_r from the SVD of W C^1/2, with C + damping I."""

from __future__ import annotations

from ..factorisation import theory_a
from .base import DampingOptions, Method, ModuleInputs, a_only


def build_a(m: ModuleInputs):
    return theory_a(m.weight(), m.covariance(), m.rank, m.option(DampingOptions, "damping"))


METHOD = Method("theory", "V_r^T C^-1/2", a_only(build_a), options=(DampingOptions,), lr=2.5e-4)
