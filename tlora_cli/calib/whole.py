"""The plain engine: the whole model in memory, one forward and backward per sample.

The streaming engine must reproduce it; the tests hold one against the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..data import EncodedSample
from ..targets import Target
from .collector import Collector, sample_loss
from .statistics import Statistics, StatisticStores


def whole_statistics(
    model: torch.nn.Module,
    targets: list[Target],
    samples: Sequence[EncodedSample],
    collector: Collector,
    stores: StatisticStores,
    on_sample: Callable[[], None] | None = None,
) -> Statistics:
    """The collector's statistics over every sample, each gradient reduced as it lands; finished into `stores`."""
    device = next(model.parameters()).device
    all_modules = dict(model.named_modules())
    modules = {t.name: all_modules[t.name] for t in targets}
    tokens = 0
    with collector.watching_inputs(modules), collector.watching_gradients(modules):
        for n, sample in enumerate(samples):
            logits = model(input_ids=torch.tensor([sample.input_ids], device=device)).logits
            collector.end_forward()
            loss = sample_loss(logits, torch.tensor([sample.labels], device=device), n)
            if not torch.isfinite(loss):
                collector.check_finite("the output head")
            loss.backward()
            tokens += len(sample.input_ids)
            if on_sample:
                on_sample()
    finished, scores = collector.finish(len(samples), tokens)
    stores.put(finished)
    return stores.statistics(targets, collector.input_of, scores, samples)
