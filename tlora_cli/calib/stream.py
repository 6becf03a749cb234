"""The layer-streaming engine: the same statistics as whole.py, one decoder layer on the device at a time.

The inputs each layer receives are captured with stand-in layers, then layers run one after another over
all samples (covariances on the way up); the backward pass walks the layers in reverse, recomputing each
one with gradients (importance scores, gradient moments). What is measured is the collector's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ..data import EncodedSample
from ..errors import TloraError
from ..model.targets import Target
from ..progress import Reporter
from .batches import batch_loss, make_batches
from .collector import Collector
from .host_memory import covariances_too_big
from .statistics import COVARIANCES, Statistics, StatisticStores
from .store import TensorStore, scratch_folder
from .streamed_model import StreamedModel, first_tensor

Step = Callable[..., None]
Finished = dict[str, dict[str, torch.Tensor]]


class LayerInputs:
    """What each decoder layer receives per batch: its hidden states (a store: host memory or an offload
    folder), and the other arguments (masks, position embeddings) the model's own forward built for it."""

    def __init__(self, store: TensorStore):
        self.store = store
        self.calls: list[list[tuple[tuple, dict]]] = []

    def put(self, layer: int, n: int, hidden: torch.Tensor) -> None:
        self.store.put(f"h{layer}-{n}", hidden)

    def get(self, layer: int, n: int, device: torch.device) -> torch.Tensor:
        return self.store.get(f"h{layer}-{n}", device)

    def drop(self, layer: int, n: int) -> None:
        self.store.drop(f"h{layer}-{n}")

    def put_grad(self, n: int, grad: torch.Tensor) -> None:
        """dL/d(hidden states) of batch n at the layer the backward pass has reached."""
        self.store.put(f"g-{n}", grad)

    def grad(self, n: int, device: torch.device) -> torch.Tensor:
        return self.store.get(f"g-{n}", device)

    def call(self, layer: int, n: int) -> tuple[tuple, dict]:
        return self.calls[n][layer]

    def host_bytes(self, layer: int) -> int:
        """Host memory one layer's inputs take over all batches (0 when offloaded)."""
        return sum(self.store.nbytes(f"h{layer}-{n}") for n in range(len(self.calls)))


class LayerWalk:
    """Runs batches of samples through a StreamedModel layer by layer, with a collector's hooks on each layer's
    targets."""

    def __init__(
        self,
        streamed: StreamedModel,
        targets: list[Target],
        samples: Sequence[EncodedSample],
        collector: Collector,
        inputs: LayerInputs,
        batch_size: int = 1,
    ):
        self.streamed, self.samples, self.collector, self.inputs = streamed, samples, collector, inputs
        self.batches = make_batches(samples, batch_size, streamed.device)
        self.by_layer = streamed.targets_by_layer(targets)
        self.num_tokens = sum(len(s.input_ids) for s in samples)

    def finish(self) -> tuple[Finished, dict[str, float]]:
        return self.collector.finish(len(self.samples), self.num_tokens)

    def capture(self, step: Step | None = None) -> None:
        """Every batch's input to layer 0, and every layer's other arguments."""
        streamed = self.streamed
        streamed.read_ahead(0)
        with streamed.holding(streamed.embeddings):
            for n, batch in enumerate(self.batches):
                hidden, calls = streamed.capture(batch.input_ids, batch.attention_mask)
                self.inputs.put(0, n, hidden)
                self.inputs.calls.append(calls)
                if step:
                    step(len(batch))

    def forward_layer(self, index: int, covariances: bool = True) -> Finished:
        """Every batch through one layer, its outputs stored as the next layer's inputs; returns what the
        collector finished (the layer's covariances, on the device), which the caller moves off at once."""
        layer = self.streamed.load_layer(index)
        self.streamed.read_ahead(index + 1)
        modules = self.streamed.layer_modules(index, self.by_layer.get(index, []))
        try:
            with self.collector.watching_inputs(modules, covariances), torch.no_grad():
                for n, batch in enumerate(self.batches):
                    self.collector.mask = batch.pads
                    args, kwargs = self.inputs.call(index, n)
                    out = first_tensor(layer(self.inputs.get(index, n, self.streamed.device), *args, **kwargs))
                    self.collector.end_forward()
                    self.inputs.put(index + 1, n, out)
        finally:
            self.streamed.unload_layer(index)
        return self.finish()[0]

    def backward(self, stores: StatisticStores, step: Step | None = None) -> dict[str, float]:
        """Loss at the head, then each layer recomputed with grad, in reverse; returns the scores."""
        streamed, device, inputs = self.streamed, self.streamed.device, self.inputs
        num_layers = len(streamed.layers)
        streamed.read_ahead(num_layers - 1)
        with streamed.holding(streamed.head):
            for n, batch in enumerate(self.batches):
                last = inputs.get(num_layers, n, device).requires_grad_(True)
                loss = batch_loss(streamed.logits(last), batch)
                if not torch.isfinite(loss):
                    self.collector.check_finite("the output head")
                loss.backward()
                inputs.put_grad(n, last.grad)
                inputs.drop(num_layers, n)
        scores: dict[str, float] = {}
        for index in reversed(range(num_layers)):
            layer = streamed.load_layer(index)
            streamed.read_ahead(index - 1)
            with self.collector.watching_gradients(streamed.layer_modules(index, self.by_layer.get(index, []))):
                for n in range(len(self.batches)):
                    args, kwargs = inputs.call(index, n)
                    x = inputs.get(index, n, device).requires_grad_(True)  # the targets' outputs need a gradient
                    out = first_tensor(layer(x, *args, **kwargs))
                    if out.requires_grad:
                        out.backward(inputs.grad(n, device))
                    if index > 0:
                        inputs.put_grad(n, x.grad)
                    inputs.drop(index, n)
            finished, layer_scores = self.finish()
            scores.update(layer_scores)
            stores.put(finished)
            streamed.unload_layer(index)
            if step:
                step()
        return scores


def stream_statistics(
    streamed: StreamedModel,
    targets: list[Target],
    samples: Sequence[EncodedSample],
    collector: Collector,
    stores: StatisticStores,
    offload_dir: Path | None,
    reporter: Reporter,
    batch_size: int = 1,
) -> Statistics:
    """Covariance on the way up, importance on the way down; one layer on the device at any time.

    Finished statistics go to `stores` as each layer is done; when every layer's covariances would not fit
    in host memory, they are computed again layer by layer when read (RecomputedCovariances). Layer inputs
    wait in host memory, or in a scratch folder in `offload_dir`.
    """
    num_layers = len(streamed.layers)
    with scratch_folder(offload_dir, "tlora-offload-") as folder, TensorStore(folder, copy=True) as offloaded:
        walk = LayerWalk(streamed, targets, samples, collector, LayerInputs(offloaded), batch_size)
        with reporter.phase("capture", "Capturing layer inputs", len(samples)) as step:
            walk.capture(step)
        recompute = False
        with reporter.phase("forward", "Forward, layer by layer", num_layers) as step:
            for index in range(num_layers):
                finished = walk.forward_layer(index, covariances=not recompute)
                if index == 0:
                    in_memory = COVARIANCES not in stores or stores[COVARIANCES].folder is None
                    held = sum(c.nbytes for c in finished.get(COVARIANCES, {}).values()) if in_memory else 0
                    recompute = covariances_too_big(walk.inputs.host_bytes(1), held, num_layers, reporter)
                    if recompute and collector.dist.active:  # reading them again would take every rank
                        raise TloraError(
                            "under torchrun the covariances of every layer must fit in host memory: "
                            "pass --offload-dir DIR to keep them on disk"
                        )
                    if recompute:
                        finished = {}
                stores.put(finished)
                step()
        with reporter.phase("backward", "Backward, layer by layer", num_layers) as step:
            scores = walk.backward(stores, step)
            stores.flush()  # the last layer's files, in the phase that made them
    # Reading layers on the reader thread overlaps the computation: of read time, only the wait costs.
    reporter.record("layer_reads", streamed.read_seconds)
    reporter.record("load_wait", streamed.wait_seconds)
    input_of = collector.input_of
    covariances = (
        RecomputedCovariances(streamed, targets, input_of, samples, collector, batch_size) if recompute else None
    )
    return stores.statistics(targets, input_of, scores, samples, covariances)


class RecomputedCovariances(Mapping):
    """Covariances that did not fit in host memory, computed again one layer at a time as they are read.

    Reading them in model order (what the factorisation does) costs one more forward pass over every
    layer and holds one layer's covariances and one layer's inputs; going back to an earlier layer
    starts again from the embeddings.
    """

    def __init__(
        self,
        streamed: StreamedModel,
        targets: list[Target],
        input_of: dict[str, str],
        samples: Sequence[EncodedSample],
        measured: Collector,
        batch_size: int,
    ):
        self.streamed, self.targets, self.samples, self.batch_size = streamed, targets, samples, batch_size
        self.center, self.dtype = measured.center, measured.dtype  # as the calibration measured them
        self.keys_ = list(dict.fromkeys(input_of.values()))  # model order
        self.layer, self.current = -1, {}
        self.walk: LayerWalk | None = None  # a fresh one from the embeddings whenever reading goes back

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        target = self.streamed.layer_of(key)
        if target < self.layer:
            self.layer = -1
        if self.layer < 0:
            collector = Collector(self.center, frozenset({COVARIANCES}), self.dtype)
            inputs = LayerInputs(TensorStore(None, copy=True))
            self.walk = LayerWalk(self.streamed, self.targets, self.samples, collector, inputs, self.batch_size)
            self.walk.capture()
        while self.layer < target:
            self.layer += 1
            self.current.clear()  # the last layer's covariances are not held while the next one runs
            self.current = self.walk.forward_layer(self.layer, covariances=self.layer == target)["covariances"]
            for n in range(len(self.walk.batches)):
                self.walk.inputs.drop(self.layer, n)
        return self.current[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)
