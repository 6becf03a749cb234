"""Which engine and batch size a run gets when not told: what the whole engine needs against free memory.

The estimate reads only config.json and the checkpoint's header. It errs on the large side: a wrong
"whole" runs out of memory, a wrong "stream" only runs slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .host_memory import available_host_memory
from .statistics import COVARIANCES, KINDS

MARGIN = 0.8  # of the free memory: allocator slack, fragmentation, what the estimate leaves out
MAX_AUTO_BATCH = 8  # larger batches gain little once a batch's matmuls fill the device


def batch_limit(device: str) -> int:
    """The largest batch picked by default. A GPU sits mostly idle on one sample; on a CPU one sample of a
    few hundred tokens already fills the cores' matmuls, while a batch multiplies the activations' memory
    (and no gain from batching showed through the noise of benchmarks/RESULTS-speed.md, 2026-12-03)."""
    return MAX_AUTO_BATCH if device.startswith("cuda") else 1


def free_memory(device: str) -> int | None:
    """Bytes free where the model runs: CUDA's own count, else the host's available memory (None: unknown)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return available_host_memory()


@dataclass(frozen=True)
class ModelSize:
    """The shapes the estimate needs, from config.json (the text model's, for a multimodal one)."""

    num_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int

    @classmethod
    def of(cls, config: dict, num_params: int) -> ModelSize | None:
        """None when config.json does not give the usual fields."""
        text = config.get("text_config") or config
        try:
            hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
            intermediate = int(text.get("intermediate_size") or 4 * hidden)
            return cls(
                num_params, hidden, intermediate, layers, int(text["num_attention_heads"]), int(text["vocab_size"])
            )
        except (KeyError, TypeError, ValueError):
            return None

    def activations(self, batch: int, seq_len: int, element_size: int, layers: int) -> int:
        """What autograd keeps for one batch through `layers` decoder layers: per token and layer about ten
        hidden-sized and five intermediate-sized tensors and a row of attention weights per head, plus the
        logits with their float32 copy and gradient."""
        per_layer = (10 * self.hidden + 5 * self.intermediate + self.heads * seq_len) * element_size
        return batch * seq_len * (layers * per_layer + self.vocab * (element_size + 8))

    def statistics(self, kinds: frozenset[str]) -> int:
        """The float32 sums held until the end: per layer the covariances of the attention, output projection,
        MLP and down projection inputs; each statistic kept per module as large as its weight (LoRA-DA's mean
        gradient) about the weights' size again in float32."""
        covariances = self.layers * (3 * self.hidden**2 + self.intermediate**2) * 4 if COVARIANCES in kinds else 0
        return covariances + sum(self.num_params * 4 for kind in kinds if KINDS[kind].weight_sized)

    def needed(self, engine: str, batch: int, seq_len: int, element_size: int, kinds: frozenset[str]) -> int:
        """Bytes on the device: all weights and statistics (whole), or two layers' weights (stream)."""
        if engine == "whole":
            return (
                self.num_params * element_size
                + self.statistics(kinds)
                + self.activations(batch, seq_len, element_size, self.layers)
            )
        layer = self.num_params * element_size // max(self.layers, 1)
        return 2 * layer + self.activations(batch, seq_len, element_size, 1)


@dataclass(frozen=True)
class Choice:
    engine: str
    batch_size: int
    reason: str  # why this engine, for the message and the metadata


def choose(
    size: ModelSize | None,
    engine: str,
    batch_size: int | None,
    num_samples: int,
    seq_len: int,
    dtype: torch.dtype,
    kinds: frozenset[str],
    free: int | None,
    max_batch: int = MAX_AUTO_BATCH,
) -> Choice:
    """`engine` "auto" -> whole when it fits in MARGIN of `free` with a batch of one, else stream; `batch_size`
    None -> the largest up to `max_batch` (and the number of samples) that fits with the chosen engine."""
    if size is None or free is None:
        why = "config.json does not give the model's shape" if size is None else "free memory is unknown"
        return Choice("stream" if engine == "auto" else engine, batch_size or 1, f"{why}: streaming is safe")
    room = MARGIN * free
    element = dtype.itemsize
    whole = size.needed("whole", 1, seq_len, element, kinds)
    used = engine if engine != "auto" else ("whole" if whole <= room else "stream")
    if engine != "auto":
        reason = f"--engine {engine}"
    else:
        verdict = "fit in" if used == "whole" else "exceed"
        reason = (
            f"the whole model, its statistics and a batch of one need about {whole / 1e9:.3g} GB: they {verdict} "
            f"{MARGIN:.0%} of the {free / 1e9:.3g} GB free"
        )
    if batch_size is None:
        limit = max(1, min(num_samples, max_batch))
        fits = [b for b in range(1, limit + 1) if size.needed(used, b, seq_len, element, kinds) <= room]
        batch_size = max(fits, default=1)
    return Choice(used, batch_size, reason)
