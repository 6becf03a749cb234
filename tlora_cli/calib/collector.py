"""What calibration measures, as hooks on the target modules: both engines run the model, this measures it.

Covariances come from forward pre-hooks (X^T X once per distinct input, real tokens only, summed on and
above the diagonal and mirrored when finished), importance scores and LoRA-DA's gradient moments from each
module's input and output gradient, per sample of a batch. Sums stay where the model runs until `finish()`
turns them into means; under torchrun every rank's sums and counts are added up right before, each on the
rank that holds it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping

import torch

from ..distributed import Dist
from ..errors import TloraError
from .statistics import COVARIANCES, KINDS

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
        self.record(name, key)
        return key, first

    def record(self, name: str, key: str) -> None:
        """That `name` reads the input keyed `key` (seen here, or by another rank)."""
        if self.input_of.setdefault(name, key) != key:
            raise TloraError(
                f"{name} read a different input from one sample to the next; this model cannot be calibrated"
            )

    def end_forward(self) -> None:
        self.live.clear()


class Scratch:
    """One buffer reused from call to call. Fresh memory is paid in page faults on every call (dearly on some
    CPU hosts: ~3.5 MB per module and sample); reused memory is not. On CUDA the caching allocator does as much."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of this shape over the buffer (grown when too small): valid until the next call."""
        numel = math.prod(shape)
        held = self.buffer
        if held is None or held.numel() < numel or held.dtype != dtype or held.device != device:
            self.buffer = held = torch.empty(numel, dtype=dtype, device=device)
        return held[:numel].view(shape)


def accumulate_xtx(
    acc: dict[str, torch.Tensor],
    key: str,
    x: torch.Tensor,
    center: bool,
    mask: torch.Tensor | None,
    scratch: Scratch | None = None,
) -> None:
    """Add X^T X over a batch's real tokens (x: batch x tokens x in; `mask` True on real tokens, None when
    there are no pads) in float32, never in the model's bf16; centred, each sample loses its own mean over
    its own tokens. A float32 input with nothing to centre or mask is read as it is; otherwise it is copied
    into `scratch` and worked on there."""
    x = x.detach()
    if center or mask is not None or x.dtype != torch.float32:
        x = (scratch or Scratch()).take(tuple(x.shape), torch.float32, x.device).copy_(x)
        pads = None if mask is None else ~mask.unsqueeze(-1)
        if pads is not None:
            x.masked_fill_(pads, 0)  # not a product: a pad's activations may be NaN where its attention row is empty
        if center:
            count = x.shape[1] if mask is None else mask.sum(dim=1).view(-1, 1, 1)
            x.sub_(x.sum(dim=1, keepdim=True) / count)
            if pads is not None:
                x.masked_fill_(pads, 0)
    flat = x.reshape(-1, x.shape[-1])
    if key not in acc:
        acc[key] = flat.new_zeros(flat.shape[1], flat.shape[1])
    add_upper_gram(acc[key], flat)


def add_upper_gram(acc: torch.Tensor, flat: torch.Tensor) -> None:
    """acc += flat^T flat on and above the diagonal only (what lies below is left as it was): X^T X is symmetric,
    so a product by row strips, each from its diagonal rightwards, saves a quarter to three eighths of the
    flops, the largest cost calibration adds to a forward and backward. `mirrored` completes it."""
    width = flat.shape[1]
    strips = max(1, min(4, width // 288))  # strips narrower than ~288 columns lose more in efficiency than they save
    edges = [width * i // strips for i in range(strips + 1)]
    for start, end in itertools.pairwise(edges):
        acc[start:end, start:].addmm_(flat[:, start:end].T, flat[:, start:])


def mirrored(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle `upper` holds, in place."""
    upper.triu_()
    return upper.add_(upper.triu(1).T)


def per_sample_scores(
    weight: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, scratch: Scratch | None = None
) -> torch.Tensor:
    """mean|W * dL_n/dW| for each sample n of a batch, in float64 (batch,).

    dL_n/dW = G_n^T X_n from the module's input X_n (tokens x in) and output gradient G_n (tokens x out),
    the per-sample gradient identity of a linear layer (Opacus); formed for a few samples at a time in
    `scratch` and reduced at once, so at most CHUNK_BYTES of them exist.
    """
    out_features, in_features = weight.shape
    step = max(1, CHUNK_BYTES // (out_features * in_features * 4))
    scratch = scratch or Scratch()
    scores = []
    for start in range(0, x.shape[0], step):
        g, xs = grad[start : start + step], x[start : start + step]
        grads = torch.bmm(g.transpose(1, 2), xs, out=scratch.take((len(g), *weight.shape), g.dtype, g.device))
        if grads.dtype not in (torch.float32, torch.float64):
            grads = grads.float()  # a bf16 product would lose the score's low bits
        # In place, no temporaries (float32's pairwise sum is accurate to ~1e-7).
        scores.append(grads.mul_(weight).abs_().sum(dim=(1, 2)).double() / weight.numel())
    return torch.cat(scores)


def _add(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in acc:
        acc[name].add_(value)
    else:
        acc[name] = value


class Collector:
    """Registers the statistics' hooks on target modules and finishes what they summed.

    `kinds`: the tensor statistics to measure (KINDS names): the covariance X^T X from the forward pre-hooks
    (`center`: per-sample centred, else the second moment), every other kind from each module's output gradient
    and input (its KINDS row says how); importance scores are always measured. `dist`: the ranks whose sums
    `finish()` adds up (one process without torchrun); `spread`: under torchrun, each input's statistics go to the
    rank that will factorise it (`owners`, balanced by cost) rather than all to rank 0, so that no rank holds
    more than its share. Scores go to every rank.
    """

    def __init__(
        self,
        center: bool,
        kinds: frozenset[str],
        dtype: torch.dtype,
        dist: Dist | None = None,
        spread: bool = False,
    ):
        self.center, self.dtype = center, dtype
        self.covariances = COVARIANCES in kinds
        self.gradient_kinds = sorted(k for k in kinds if KINDS[k].from_gradient is not None)
        self.dist, self.spread = dist or Dist(), spread
        self.shapes: dict[str, tuple[int, ...]] = {}  # (out, in) of every module watched, for the owners' costs
        self.owners: dict[str, int] = {}  # input key -> the rank holding its statistics (under torchrun)
        self.load = [0.0] * self.dist.world_size
        self.groups = InputGroups()
        self.cov_sum: dict[str, torch.Tensor] = {}
        self.score_sum: dict[str, torch.Tensor] = {}
        self.gradient_sums: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in self.gradient_kinds}
        self.mask: torch.Tensor | None = None  # the running batch's real tokens (Batch.pads), set by the engine
        self.input_scratch, self.gradient_scratch = Scratch(), Scratch()

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
                    accumulate_xtx(self.cov_sum, key, args[0], self.center, self.mask, self.input_scratch)

            return hook

        self.shapes.update({name: tuple(module.weight.shape) for name, module in modules.items()})
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
        self.shapes.update({name: tuple(module.weight.shape) for name, module in modules.items()})
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
        self.score_sum[name].add_(per_sample_scores(weight, x, grad, self.gradient_scratch).sum())
        if self.gradient_kinds:
            flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
            for kind in self.gradient_kinds:
                _add(self.gradient_sums[kind], name, KINDS[kind].from_gradient(flat_grad, flat_x))

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

        Covariances are X^T X / tokens, scores per sample, every other kind per sample or token as its row says;
        under torchrun over every rank's samples and tokens.
        """
        if self.dist.active:
            num_samples, num_tokens = self._reduce(num_samples, num_tokens)
        self.check_finite()
        tensors = {}
        if self.covariances:
            tensors[COVARIANCES] = {k: mirrored(self.cov_sum.pop(k)).div_(num_tokens) for k in list(self.cov_sum)}
        for kind, sums in self.gradient_sums.items():
            count = num_samples if KINDS[kind].per == "samples" else num_tokens
            tensors[kind] = {k: sums.pop(k) / count for k in list(sums)}
        scores = {k: self.score_sum.pop(k).item() / num_samples for k in list(self.score_sum)}
        return tensors, scores

    def _reduce(self, num_samples: int, num_tokens: int) -> tuple[int, int]:
        """Add every rank's sums into the rank that holds each (every rank, for scores) and drop them on the
        others; return the counts over all ranks.

        One gather first says which sums exist, their shapes and the inputs modules read: a rank that had
        no sample has summed nothing and sends zeros, and every rank adds the sums in the same order.
        """
        sums = (self.cov_sum, self.score_sum, *self.gradient_sums.values())
        layout = [{k: (t.shape, t.dtype) for k, t in held.items()} for held in sums]
        gathered = self.dist.all_gather((layout, self.groups.input_of, num_samples, num_tokens))
        for _, input_of, _, _ in gathered:
            for name, key in input_of.items():
                self.groups.record(name, key)
        owned: dict[tuple[int, str], int | None] = {}  # in the gathered (rank) order: the same everywhere
        for i, held in enumerate(sums):
            for rank_layout, *_ in gathered:
                for key, (shape, dtype) in rank_layout[i].items():
                    if key not in held:
                        held[key] = torch.zeros(shape, dtype=dtype, device=self.dist.device)
                    owned.setdefault((i, key), None if held is self.score_sum else self._owner(key))
        self.dist.reduce_sum([(sums[i][key], owner) for (i, key), owner in owned.items()])
        for (i, key), owner in owned.items():
            if owner not in (None, self.dist.rank):
                del sums[i][key]
        return sum(g[2] for g in gathered), sum(g[3] for g in gathered)

    def _owner(self, key: str) -> int:
        """The rank holding the statistics of input `key` (or of module `key`: its input's), picked when first
        seen: rank 0 unless spreading, else the least-loaded rank so far, loads counted in W C flops."""
        key = self.groups.input_of.get(key, key)
        if key not in self.owners:
            rank = 0
            if self.spread:
                rank = min(range(self.dist.world_size), key=lambda r: (self.load[r], r))
                readers = [n for n, k in self.groups.input_of.items() if k == key]
                self.load[rank] += sum(self.shapes[n][0] * self.shapes[n][1] ** 2 for n in readers)
            self.owners[key] = rank
        return self.owners[key]
