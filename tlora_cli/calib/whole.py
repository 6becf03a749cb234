"""The plain engine: the whole model in memory, one forward and backward per batch of samples.

The streaming engine must reproduce it; the tests hold one against the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..data import EncodedSample
from ..model.targets import Target
from .batches import batch_loss, make_batches
from .collector import Collector
from .statistics import Statistics, StatisticStores


def whole_statistics(
    model: torch.nn.Module,
    targets: list[Target],
    samples: Sequence[EncodedSample],
    collector: Collector,
    stores: StatisticStores,
    batch_size: int = 1,
    on_samples: Callable[[int], None] | None = None,
) -> Statistics:
    """The collector's statistics over every sample, each batch's gradients reduced as they land; finished into
    `stores`. The embeddings' output requires a gradient, so every target's output gets one with no weight's."""
    device = next(model.parameters()).device
    all_modules = dict(model.named_modules())
    modules = {t.name: all_modules[t.name] for t in targets}
    tokens = 0
    embeddings = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    try:
        with collector.watching_inputs(modules), collector.watching_gradients(modules):
            for batch in make_batches(samples, batch_size, device):
                collector.mask = batch.pads
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                collector.end_forward()
                loss = batch_loss(logits, batch)
                if not torch.isfinite(loss):
                    collector.check_finite("the output head")
                loss.backward()
                tokens += int(batch.mask.sum())
                if on_samples:
                    on_samples(len(batch))
    finally:
        embeddings.remove()
    finished, scores = collector.finish(len(samples), tokens)
    stores.put(finished)
    return stores.statistics(targets, collector.input_of, scores, samples)
