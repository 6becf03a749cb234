"""Standard LoRA's start: Kaiming-uniform A, trained with B, seeded per module by --seed and the module's name."""

from __future__ import annotations

import zlib

import torch

from ..factorisation import random_a
from .base import Method, ModuleInputs, a_only


def build_a(m: ModuleInputs) -> torch.Tensor:
    seed = zlib.crc32(f"{m.seed}:{m.name}".encode())  # per module: independent of order
    return random_a(m.in_features, m.rank, torch.Generator().manual_seed(seed))


METHOD = Method("random", "standard LoRA", a_only(build_a), statistics=frozenset(), trains_a=True, seeded=True, lr=1e-3)
