"""What calibration measures, as hooks on the target modules: both engines run the model, this measures it.

Covariances come from forward pre-hooks (X^T X once per distinct input, real tokens only), importance
scores and LoRA-DA's gradient moments from each module's input and output gradient, per sample of a
batch. Sums stay where the model runs until `finish()` turns them into means: a distributed run would
all-reduce the sums right before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch

from ..errors import TloraError

CHUNK_BYTES = 256 * 2**20  # per-sample weight gradients formed at once, in float32


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


def accumulate_xtx(acc: dict[str, torch.Tensor], key: str, x: torch.Tensor, center: bool, mask: torch.Tensor) -> None:
    """Add X^T X over a batch's real tokens (x: batch x tokens x in, `mask` True on real tokens) in float32,
    never in the model's bf16; centred, each sample loses its own mean over its own tokens."""
    x = x.detach().float()
    keep = mask.unsqueeze(-1)
    if center:
        x = x - torch.where(keep, x, 0).sum(dim=1, keepdim=True) / mask.sum(dim=1).view(-1, 1, 1)
    flat = torch.where(keep, x, 0).reshape(-1, x.shape[-1])
    if key in acc:
        acc[key].addmm_(flat.T, flat)
    else:
        acc[key] = flat.T @ flat


def per_sample_scores(weight: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """mean|W * dL_n/dW| for each sample n of a batch, in float64 (batch,).

    dL_n/dW = G_n^T X_n from the module's input X_n (tokens x in) and output gradient G_n (tokens x out),
    the per-sample gradient identity of a linear layer (Opacus); formed for a few samples at a time and
    reduced at once, so at most CHUNK_BYTES of them exist.
    """
    out_features, in_features = weight.shape
    step = max(1, CHUNK_BYTES // (out_features * in_features * 4))
    scores = []
    for start in range(0, x.shape[0], step):
        grads = torch.bmm(grad[start : start + step].transpose(1, 2), x[start : start + step])
        if grads.dtype not in (torch.float32, torch.float64):
            grads = grads.float()  # a bf16 product would lose the score's low bits
        # In place on the gradients, freed here anyway: no temporaries (float32's pairwise sum is accurate to ~1e-7).
        scores.append(grads.mul_(weight).abs_().sum(dim=(1, 2)).double() / weight.numel())
    return torch.cat(scores)


def _add(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in acc:
        acc[name].add_(value)
    else:
        acc[name] = value


class Collector:
    """Registers the statistics' hooks on target modules and finishes what they summed.

    `center`: per-sample centred covariance (else the second moment); `covariances=False` skips X^T X
    (methods that never read C); `gradients=True` adds LoRA-DA's mean gradients and output-gradient moments.
    """

    def __init__(self, center: bool, covariances: bool, gradients: bool, dtype: torch.dtype):
        self.center, self.covariances, self.gradients, self.dtype = center, covariances, gradients, dtype
        self.groups = InputGroups()
        self.cov_sum: dict[str, torch.Tensor] = {}
        self.score_sum: dict[str, torch.Tensor] = {}
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.out_sq_sum: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None  # the running batch's real tokens (Batch.mask), set by the engine

    @property
    def input_of(self) -> dict[str, str]:
        return dict(self.groups.input_of)

    @contextlib.contextmanager
    def watching_inputs(self, modules: Mapping[str, torch.nn.Module], covariances: bool = True) -> Iterator[None]:
        """Forward pre-hooks: which modules share an input and, unless switched off, X^T X per distinct input."""
        keep = self.covariances and covariances

        def hook_for(name: str) -> Callable:
            def hook(_module: torch.nn.Module, args: tuple) -> None:
                key, first = self.groups.key(name, args[0])
                if first and keep:
                    accumulate_xtx(self.cov_sum, key, args[0], self.center, self.mask)

            return hook

        handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def end_forward(self) -> None:
        """Call after each forward: the tensors seen in it may be freed and their ids reused."""
        self.groups.end_forward()

    @contextlib.contextmanager
    def watching_gradients(self, modules: Mapping[str, torch.nn.Module]) -> Iterator[None]:
        """Each module's per-sample weight gradients, from its input and the gradient reaching its output, reduced
        to their scores (and LoRA-DA's moments) as that gradient lands. No weight needs a gradient: the caller
        makes the modules' inputs require one."""
        handles = []
        for name, module in modules.items():
            self.score_sum[name] = torch.zeros((), dtype=torch.float64, device=module.weight.device)
            handles.append(module.register_forward_hook(self._gradient_hook(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _gradient_hook(self, name: str) -> Callable:
        """Forward hook: keep the module's input until its output's gradient arrives, then reduce both."""

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:
                x = args[0].detach()
                output.register_hook(lambda grad: self._add_gradient(name, module.weight.detach(), x, grad.detach()))

        return hook

    def _add_gradient(self, name: str, weight: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Pads add nothing: no loss depends on them, so their output gradient is zero."""
        self.score_sum[name].add_(per_sample_scores(weight, x, grad).sum())
        if self.gradients:
            flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
            _add(self.grad_sum, name, flat_grad.T @ flat_x)  # sum over samples of dL_n/dW
            _add(self.out_sq_sum, name, flat_grad.pow(2).sum(dim=0))

    def check_finite(self, fallback: str | None = None) -> None:
        """Raise naming the first input whose covariance holds a NaN or inf (or `fallback` when none does)."""
        bad = next(
            (k for k, c in self.cov_sum.items() if not torch.isfinite(c.sum()) and not torch.isfinite(c).all()),
            fallback,
        )  # a NaN or inf makes the sum non-finite; only then is every entry looked at (the sum may overflow)
        if bad:
            hint = " (float16 overflows easily: try --dtype bfloat16 or float32)" if self.dtype == torch.float16 else ""
            raise TloraError(f"NaN or inf in the activations entering {bad}{hint}; check the model's weights")

    def finish(self, num_samples: int, num_tokens: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
        """Every sum held so far as a mean, handed over and no longer held: ({kind: {key: tensor}}, scores).

        Covariances are X^T X / tokens, scores and mean gradients per sample, output-gradient moments per token.
        """
        self.check_finite()
        tensors = {"covariances": {k: self.cov_sum.pop(k).div_(num_tokens) for k in list(self.cov_sum)}}
        if self.gradients:
            tensors["mean_grads"] = {k: self.grad_sum.pop(k) / num_samples for k in list(self.grad_sum)}
            tensors["output_grad_sq"] = {k: self.out_sq_sum.pop(k) / num_tokens for k in list(self.out_sq_sum)}
        scores = {k: self.score_sum.pop(k).item() / num_samples for k in list(self.score_sum)}
        return tensors, scores
