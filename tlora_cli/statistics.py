"""Covariance and importance on the whole model (SPEC.md, "Statistics").

This is the plain path: the model is in memory, every sample goes forward and backward once, hooks
collect X^T X per distinct input and |W * dL/dW| per target. The streaming engine must reproduce it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import EncodedSample
from .errors import TloraError
from .targets import Target


@dataclass
class Statistics:
    """What calibration measures; covariances are keyed by the first module that reads each input."""

    targets: list[Target]
    input_of: dict[str, str]
    covariances: Mapping[str, torch.Tensor]
    scores: dict[str, float]
    num_samples: int
    num_tokens: int
    # LoRA-DA only (docs/lora-da.md section 3): per module, the mean over samples of dL_n/dW, and
    # diag E[g g^T] of the gradients g reaching the module's output, averaged over tokens.
    mean_grads: Mapping[str, torch.Tensor] | None = None
    output_grad_sq: Mapping[str, torch.Tensor] | None = None


class InputGroups:
    """Recognises modules that read the very same tensor within one forward (q/k/v, gate/up).

    Tensors are compared by identity while a forward holds them alive, so no name rules are needed.
    """

    def __init__(self) -> None:
        self.live: list[tuple[torch.Tensor, str]] = []
        self.input_of: dict[str, str] = {}

    def key(self, name: str, x: torch.Tensor) -> tuple[str, bool]:
        """The covariance key of this input, and whether this module is the first to read it."""
        key = next((k for t, k in self.live if t is x), None)
        first = key is None
        if first:
            self.live.append((x, name))
            key = name
        if self.input_of.setdefault(name, key) != key:
            raise TloraError(
                f"{name} read a different input from one sample to the next; this model cannot be calibrated"
            )
        return key, first

    def end_forward(self) -> None:
        self.live.clear()


def accumulate_xtx(acc: dict[str, torch.Tensor], key: str, x: torch.Tensor, center: bool) -> None:
    """Add X^T X of one sample's (tokens x in) input in float32, never in the model's bf16."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    if center:
        flat = flat - flat.mean(dim=0, keepdim=True)
    if key in acc:
        acc[key].addmm_(flat.T, flat)
    else:
        acc[key] = flat.T @ flat


def covariance_hook(name: str, groups: InputGroups, acc: dict[str, torch.Tensor] | None, center: bool):
    """Forward pre-hook: X^T X of the module's input, once per distinct input (acc=None: only the groups)."""

    def hook(_module: torch.nn.Module, args: tuple) -> None:
        key, first = groups.key(name, args[0])
        if first and acc is not None:
            accumulate_xtx(acc, key, args[0], center)

    return hook


def score_hook(total: torch.Tensor, on_grad: Callable[[torch.Tensor], None] | None = None):
    """Post-accumulate-grad hook: add mean|W * dL_n/dW| to `total`, then free the gradient at once."""

    def hook(param: torch.Tensor) -> None:
        grad = param.grad
        if on_grad:
            on_grad(grad)
        if grad.dtype not in (torch.float32, torch.float64):
            grad = grad.float()  # a bf16 product would lose the score's low bits
        # In place on the gradient, which is freed here anyway: no temporaries, ten times faster than a
        # product, its abs and a float64 mean (float32's pairwise sum is accurate to ~1e-7).
        total.add_(grad.mul_(param.detach()).abs_().sum(), alpha=1 / grad.numel())
        param.grad = None

    return hook


class GradientMoments:
    """LoRA-DA's statistics, gathered in the same backward passes as the importance scores."""

    def __init__(self) -> None:
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.out_sq: dict[str, torch.Tensor] = {}

    def output_hook(self, name: str):
        """Forward hook: square the gradient that will reach the module's output, summed over tokens."""

        def add(grad: torch.Tensor) -> None:
            _add(self.out_sq, name, grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(dim=0))

        def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(add)

        return hook

    def grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        return lambda grad: _add(self.grad_sum, name, grad.detach().float())

    def pop(self, name: str, num_samples: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One module's finished (mean gradient, output-gradient second moments), freed here."""
        return self.grad_sum.pop(name) / num_samples, self.out_sq.pop(name) / num_tokens


def _add(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in acc:
        acc[name].add_(value)
    else:
        acc[name] = value.clone()


def sample_loss(logits: torch.Tensor, labels: torch.Tensor, index: int) -> torch.Tensor:
    """Mean next-token cross-entropy of one sample over its loss tokens (batch of one)."""
    targets = labels[0, 1:]
    if not (targets != -100).any():
        raise TloraError(f"calibration sample {index} has no token to predict: it needs at least 2 tokens")
    return F.cross_entropy(logits[0, :-1].float(), targets, ignore_index=-100)


def first_non_finite(covariances: dict[str, torch.Tensor]) -> str | None:
    """A NaN or inf anywhere makes the sum non-finite; only then is every entry looked at (the sum may overflow)."""
    return next(
        (k for k, c in covariances.items() if not torch.isfinite(c.sum()) and not torch.isfinite(c).all()), None
    )


def non_finite_error(where: str, dtype: torch.dtype) -> TloraError:
    hint = " (float16 overflows easily: try --dtype bfloat16 or float32)" if dtype == torch.float16 else ""
    return TloraError(f"NaN or inf in the activations entering {where}{hint}; check the model's weights")


def compute_statistics(
    model: torch.nn.Module,
    targets: list[Target],
    samples: Sequence[EncodedSample],
    center: bool = False,
    on_sample: Callable[[], None] | None = None,
    gradients: bool = False,
    covariances: bool = True,
) -> Statistics:
    """One forward and backward per sample on the whole model; reduces each gradient as it lands.

    gradients=True also keeps LoRA-DA's mean gradients and output-gradient moments; covariances=False
    skips X^T X (methods that do not use C).
    """
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    groups = InputGroups()
    acc: dict[str, torch.Tensor] = {}
    score_acc = {t.name: torch.zeros((), dtype=torch.float64, device=device) for t in targets}
    handles = []
    moments = GradientMoments() if gradients else None
    for t in targets:
        weight = modules[t.name].weight
        weight.requires_grad_(True)
        hook = covariance_hook(t.name, groups, acc if covariances else None, center)
        handles.append(modules[t.name].register_forward_pre_hook(hook))
        on_grad = moments.grad_hook(t.name) if moments else None
        handles.append(weight.register_post_accumulate_grad_hook(score_hook(score_acc[t.name], on_grad)))
        if moments:
            handles.append(modules[t.name].register_forward_hook(moments.output_hook(t.name)))
    tokens = 0
    try:
        for n, sample in enumerate(samples):
            ids = torch.tensor([sample.input_ids], device=device)
            labels = torch.tensor([sample.labels], device=device)
            logits = model(input_ids=ids).logits
            groups.end_forward()
            loss = sample_loss(logits, labels, n)
            if not torch.isfinite(loss):
                raise non_finite_error(first_non_finite(acc) or "the output head", model.dtype)
            loss.backward()
            tokens += len(sample.input_ids)
            if on_sample:
                on_sample()
    finally:
        for h in handles:
            h.remove()
        for t in targets:
            modules[t.name].weight.requires_grad_(False)
            modules[t.name].weight.grad = None
    bad = first_non_finite(acc)
    if bad:
        raise non_finite_error(bad, model.dtype)
    stats = Statistics(
        targets=targets,
        input_of=dict(groups.input_of),
        covariances={k: (c / tokens).cpu() for k, c in acc.items()},
        scores={name: s.item() / len(samples) for name, s in score_acc.items()},
        num_samples=len(samples),
        num_tokens=tokens,
    )
    if moments:
        finished = {t.name: moments.pop(t.name, len(samples), tokens) for t in targets}
        stats.mean_grads = {name: g.cpu() for name, (g, _) in finished.items()}
        stats.output_grad_sq = {name: s.cpu() for name, (_, s) in finished.items()}
    return stats
