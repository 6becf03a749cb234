"""The tensor gate: every tensor tlora writes (adapter, sidecar, export, merged or residual checkpoint) is finite and
fits the dtype it is written in, checked before the output is put in place. A NaN or inf in a weight, or a scaling
that overflows, gives NaN logits with exit 0 otherwise."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import TloraError


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def misfit(value: torch.Tensor, dtype: torch.dtype) -> str | None:
    """What is wrong with writing `value` (computed in float32 or wider) as `dtype`, in words; None when it fits."""
    if not value.is_floating_point():
        return None
    if not bool(torch.isfinite(value).all()):
        return "holds NaN or inf values"
    if not dtype.is_floating_point or not value.numel():
        return None
    low, high = torch.aminmax(value.detach())
    top = max(-float(low), float(high))
    largest = torch.finfo(dtype).max
    if top > largest:
        return f"reaches {top:.3g}, beyond the largest {dtype_name(dtype)} ({largest:.3g})"
    return None


def cast(value: torch.Tensor, dtype: torch.dtype, name: str, advice: str) -> torch.Tensor:
    """`value` in `dtype`, or one line naming the tensor when it is not finite or does not fit the dtype."""
    problem = misfit(value, dtype)
    if problem:
        raise TloraError(f"{name} {problem}: {advice}")
    return value.to(dtype)


def check_written(tensors: Mapping[str, torch.Tensor], where: str, advice: str) -> None:
    """The last look before a file of tensors is saved: each one finite."""
    for key, tensor in tensors.items():
        problem = misfit(tensor, tensor.dtype)
        if problem:
            raise TloraError(f"{where}: {key} {problem}: {advice}")


def check_scaling(name: str, scaling: float, b: torch.Tensor | None, dtype: torch.dtype, flag: str) -> None:
    """PEFT multiplies B A x by the scaling alpha / r: a scaling (or s B) beyond the adapter dtype's range gives inf;
    one below float32's smallest normal number (PEFT computes a float16 adapter in float32) rounds its effect away.
    `flag`: what sets alpha."""
    largest, tiny = torch.finfo(dtype).max, torch.finfo(torch.float32).tiny
    size = abs(scaling)
    top = float(b.abs().max()) * size if b is not None and b.numel() else 0.0
    if size > largest or top > largest:
        what = f"scaling {scaling:.3g}" if size > largest else f"B times its scaling {scaling:.3g} ({top:.3g})"
        wider = ", or pass --dtype float32" if largest < torch.finfo(torch.float32).max else ""
        raise TloraError(f"{name}'s {what} overflows {dtype_name(dtype)} (largest {largest:.3g}): lower {flag}{wider}")
    if 0 < size < tiny:
        raise TloraError(
            f"{name}'s scaling {scaling:.3g} is below the smallest float32 ({tiny:.3g}), so the adapter would "
            f"change nothing: raise {flag}"
        )
