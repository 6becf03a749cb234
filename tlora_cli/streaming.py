"""The layer-streaming engine: the same statistics as statistics.py, one decoder layer on the device at a time.

The model is built as a skeleton whose parameters live on the meta device; the embeddings, final
norm and head are read from the checkpoint once, each decoder layer only while it runs. The inputs
each layer receives (hidden states plus the masks and position embeddings the model's own code
builds for that layer) are captured with stand-in layers, then layers run one after another over
all samples; the backward pass walks the layers in reverse, recomputing each one with gradients.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .calibration import TensorSink, sink
from .data import EncodedSample
from .errors import TloraError
from .model_io import Checkpoint
from .progress import Reporter
from .statistics import (
    GradientMoments,
    InputGroups,
    Statistics,
    covariance_hook,
    first_non_finite,
    non_finite_error,
    sample_loss,
    score_hook,
)
from .targets import Target, find_targets

Step = Callable[[], None]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with meta parameters but real buffers (rotary frequencies must be computed)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


class StopForward(Exception):
    """Raised by the last stand-in once every layer's inputs are recorded: the head is not needed."""


class StandIn(torch.nn.Module):
    """Takes a decoder layer's place in the model's own forward and hands its call to `fn`."""

    def __init__(self, index: int, layer: torch.nn.Module, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.index, self.fn = index, fn
        if hasattr(layer, "attention_type"):  # models pick each layer's mask by this attribute
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.index, hidden_states, args, kwargs)


def first_tensor(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor, or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, (tuple, list)) else output


class TensorStore:
    """Per-sample tensors kept in host memory, or as files in an offload folder when memory is short."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.memory: dict[str, torch.Tensor] = {}

    def put(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self.folder is None:
            self.memory[key] = tensor.to("cpu", copy=tensor.device.type == "cpu")
        else:
            save_file({"t": tensor.contiguous().cpu()}, self.folder / f"{key}.safetensors")

    def get(self, key: str, device: torch.device) -> torch.Tensor:
        if self.folder is None:
            return self.memory[key].to(device)
        with safe_open(self.folder / f"{key}.safetensors", "pt", device=str(device)) as f:
            return f.get_tensor("t")

    def drop(self, key: str) -> None:
        if self.folder is None:
            self.memory.pop(key, None)
        else:
            (self.folder / f"{key}.safetensors").unlink(missing_ok=True)


class StreamedModel:
    """A causal LM whose decoder layers are read from the checkpoint one at a time."""

    def __init__(self, path: Path, checkpoint: Checkpoint, dtype: torch.dtype, device: str):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.checkpoint, self.dtype, self.device = checkpoint, dtype, torch.device(device)
        try:
            config = AutoConfig.from_pretrained(path)
            with parameters_on_meta():
                self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except Exception as e:  # unknown architecture, broken config
            raise TloraError(f"cannot build the model from {path}/config.json: {e}".splitlines()[0]) from e
        self.model.eval().requires_grad_(False)
        self.config = self.model.config
        self.prefix, self.layers = self._find_layers()
        self.key_of = self._checkpoint_names()
        self._load_resident()

    def _find_layers(self) -> tuple[str, torch.nn.ModuleList]:
        count = getattr(self.config.get_text_config(), "num_hidden_layers", None)
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == count:
                return name, module
        raise TloraError(
            f"cannot stream {type(self.model).__name__}: no list of {count} decoder layers found; "
            "use --engine whole if the model fits in memory"
        )

    def _checkpoint_names(self) -> dict[str, str]:
        """Parameter name -> checkpoint key, through transformers' own renaming rules (GPT-NeoX's embed_out)."""
        renames: list[tuple[str, str]] = []
        with contextlib.suppress(ImportError):
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming

            renames = [
                (source, t.target_patterns[0])
                for t in get_model_conversion_mapping(self.model)
                if type(t) is WeightRenaming
                for source in t.source_patterns
            ]
        names = {}
        for key in self.checkpoint.names():
            name = key
            for source, target in renames:
                name = re.sub(source, target, name)
            names[name] = key
        return names

    def _load(self, module: torch.nn.Module, prefix: str) -> None:
        """Give `module`'s own meta parameters their checkpoint values, on the device, frozen."""
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            name = f"{prefix}.{pname}" if prefix else pname
            if name not in self.key_of:
                raise TloraError(
                    f"the checkpoint has no tensor {name}: it does not match its config.json, or stores weights "
                    "in a layout the streaming engine cannot read (try --engine whole)"
                )
            value = self.checkpoint.get(self.key_of[name], param.shape).to(self.device, self.dtype)
            module._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
        for bname, buf in module._buffers.items():
            if buf is not None:
                module._buffers[bname] = buf.to(self.device)

    def _release(self, module: torch.nn.Module) -> None:
        for owner in module.modules():
            for pname, param in list(owner._parameters.items()):
                if param is not None:
                    owner._parameters[pname] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    def _load_resident(self) -> None:
        """The small modules outside the decoder layers (final norm, rotary buffers) stay on the device.

        The embeddings and the head are as large as a layer or larger (2 x 0.5 GB in float32 for Llama-2-7B),
        so they are read only while used: the embeddings for the capture, the head for the loss.
        """
        self.embeddings, self.head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        names = {id(module): name for name, module in self.model.named_modules()}
        self.name_of = {id(m): names[id(m)] for m in (self.embeddings, self.head) if m is not None}
        head_key = f"{self.name_of.get(id(self.head))}.weight"
        if self.head is not None and self.head is not self.embeddings and head_key not in self.key_of:
            if not getattr(self.config.get_text_config(), "tie_word_embeddings", False):
                raise TloraError("the checkpoint has no output head weight and its config does not tie it")
            self.key_of[head_key] = self.key_of[f"{self.name_of[id(self.embeddings)]}.weight"]  # tied: same tensor
        for name, module in self.model.named_modules():
            if name == self.prefix or name.startswith(f"{self.prefix}.") or id(module) in self.name_of:
                continue
            self._load(module, name)

    @contextlib.contextmanager
    def holding(self, module: torch.nn.Module) -> Iterator[None]:
        """The embeddings or the head, on the device for the duration only."""
        self._load(module, self.name_of[id(module)])
        try:
            yield
        finally:
            self._release(module)

    def layer_of(self, name: str) -> int:
        """The decoder layer a module belongs to: `model.layers.3.mlp.up_proj` -> 3."""
        return int(name[len(self.prefix) + 1 :].split(".")[0])

    def load_layer(self, index: int) -> torch.nn.Module:
        layer = self.layers[index]
        for name, module in layer.named_modules(prefix=f"{self.prefix}.{index}"):
            self._load(module, name)
        return layer

    def unload_layer(self, index: int) -> None:
        self._release(self.layers[index])

    def targets(self, suffixes: tuple[str, ...]) -> list[Target]:
        targets = find_targets(self.model, suffixes)
        outside = [t.name for t in targets if not t.name.startswith(f"{self.prefix}.")]
        if outside:
            raise TloraError(
                f"{outside[0]} is outside the decoder layers, which the streaming engine cannot calibrate: "
                "drop it from --target-modules or use --engine whole"
            )
        return targets

    @contextlib.contextmanager
    def stand_ins(self, fn: Callable[..., torch.Tensor]) -> Iterator[None]:
        """Swap every decoder layer for a StandIn calling `fn` for the duration of one forward."""
        originals = list(self.layers)
        for i, layer in enumerate(originals):
            self.layers[i] = StandIn(i, layer, fn)
        try:
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    def capture(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """What layer 0 receives, and every layer's other arguments, as the model's own forward builds them.

        Runs inside holding(self.embeddings).
        """
        first: list[torch.Tensor] = []
        calls: list[tuple[tuple, dict]] = []

        def record(index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
            if index == 0:
                first.append(hidden)
            calls.append((args, kwargs))
            if index == len(self.layers) - 1:
                raise StopForward
            return hidden

        with self.stand_ins(record), contextlib.suppress(StopForward), torch.no_grad():
            self.model(input_ids=input_ids, use_cache=False)
        return first[0], calls

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The model's own head (final norm, lm_head, soft-capping...) applied to the last layer's output.

        Runs inside holding(self.head); the layers' input is injected, so the embeddings are not needed.
        """

        def inject(index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
            return last_hidden

        with self.stand_ins(inject):
            return self.model(inputs_embeds=torch.zeros_like(last_hidden.detach()), use_cache=False).logits


def stream_statistics(
    streamed: StreamedModel,
    targets: list[Target],
    samples: Sequence[EncodedSample],
    center: bool,
    offload_dir: Path | None,
    stats_dir: Path | None,
    reporter: Reporter,
    gradients: bool = False,
    covariances: bool = True,
) -> Statistics:
    """Covariance on the way up, importance on the way down; one layer on the device at any time.

    Finished statistics go to files under `stats_dir` when given, else to host memory; when every
    layer's covariances would not fit there, they are computed again layer by layer when read
    (RecomputedCovariances). covariances=False skips them (methods that do not use C);
    gradients=True also collects LoRA-DA's mean gradients and output-gradient moments.
    """
    by_layer = targets_by_layer(streamed, targets)
    num_layers = len(streamed.layers)
    scratch = tempfile.TemporaryDirectory(prefix="tlora-offload-", dir=offload_dir) if offload_dir else None
    try:
        store = TensorStore(Path(scratch.name) if scratch else None)
        with reporter.phase("capture", "Capturing layer inputs", len(samples)) as step:
            calls = _capture(streamed, samples, store, step)
        sunk = sink(stats_dir, "covariance")
        groups = InputGroups()
        recompute = False
        with reporter.phase("forward", "Forward, layer by layer", num_layers) as step:
            for layer_index in range(num_layers):
                keep = covariances and not recompute
                found = _forward_layer(streamed, layer_index, by_layer, samples, calls, store, groups, center, keep)
                if layer_index == 0 and _host_short(found, sunk, store, samples, num_layers, reporter):
                    recompute, found = True, {}
                for key in list(found):  # popped, so that no name holds a layer's covariances into the next one
                    sunk.put(key, found.pop(key))
                step()
        grads = (sink(stats_dir, "mean_grad"), sink(stats_dir, "output_grad_sq")) if gradients else None
        with reporter.phase("backward", "Backward, layer by layer", num_layers) as step:
            scores = _stream_backward(streamed, by_layer, samples, calls, store, grads, step)
    finally:
        if scratch:
            scratch.cleanup()
    input_of = dict(groups.input_of)
    held = RecomputedCovariances(streamed, by_layer, input_of, samples, center) if recompute else sunk.result()
    return Statistics(
        targets=targets,
        input_of=input_of,
        covariances=held,
        scores={name: s / len(samples) for name, s in scores.items()},
        num_samples=len(samples),
        num_tokens=sum(len(s.input_ids) for s in samples),
        mean_grads=grads[0].result() if grads else None,
        output_grad_sq=grads[1].result() if grads else None,
    )


def targets_by_layer(streamed: StreamedModel, targets: list[Target]) -> dict[int, list[Target]]:
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(streamed.layer_of(t.name), []).append(t)
    return by_layer


def _capture(
    streamed: StreamedModel, samples: Sequence[EncodedSample], store: TensorStore, step: Step | None = None
) -> list[list[tuple[tuple, dict]]]:
    """Every sample's input to layer 0 into the store; returns each sample's per-layer call arguments."""
    calls = []
    with streamed.holding(streamed.embeddings):
        for n, sample in enumerate(samples):
            hidden, sample_calls = streamed.capture(torch.tensor([sample.input_ids], device=streamed.device))
            store.put(f"h0-{n}", hidden)
            calls.append(sample_calls)
            if step:
                step()
    return calls


class RecomputedCovariances(Mapping):
    """Covariances that did not fit in host memory, computed again one layer at a time as they are read.

    Reading them in model order (what the factorisation does) costs one more forward pass over every
    layer and holds one layer's covariances and one layer's inputs; going back to an earlier layer
    starts again from the embeddings.
    """

    def __init__(
        self,
        streamed: StreamedModel,
        by_layer: dict[int, list[Target]],
        input_of: dict[str, str],
        samples: Sequence[EncodedSample],
        center: bool,
    ):
        self.streamed, self.by_layer, self.samples, self.center = streamed, by_layer, samples, center
        self.keys_ = list(dict.fromkeys(input_of.values()))  # model order
        self.layer, self.current = -1, {}
        self.store, self.calls = TensorStore(None), []

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        target = self.streamed.layer_of(key)
        if target < self.layer:
            self.layer, self.store = -1, TensorStore(None)
        if self.layer < 0:
            self.calls = _capture(self.streamed, self.samples, self.store)
        while self.layer < target:
            self.layer += 1
            self.current.clear()  # the last layer's covariances are not held while the next one runs
            self.current = _forward_layer(
                self.streamed, self.layer, self.by_layer, self.samples, self.calls, self.store, InputGroups(),
                self.center, covariances=self.layer == target,
            )  # fmt: skip
            for n in range(len(self.samples)):
                self.store.drop(f"h{self.layer}-{n}")
        return self.current[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def available_host_memory() -> int | None:
    """Bytes the kernel could give this process now (Linux MemAvailable); None where it cannot say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _host_short(
    found: dict[str, torch.Tensor],
    covariances: TensorSink,
    store: TensorStore,
    samples: Sequence[EncodedSample],
    num_layers: int,
    reporter: Reporter,
) -> bool:
    """After layer 0, whether every layer's covariances and inputs will fit in host memory, not hours later.

    True when covariances held in memory would not fit: they are then recomputed while A is built.
    Warns when the layer inputs alone will not fit either (only --offload-dir helps then).
    """
    available = available_host_memory()
    if available is None:
        return False
    inputs = 0 if store.folder else sum(store.memory[f"h1-{n}"].nbytes for n in range(len(samples))) * num_layers
    needed = 0 if covariances.folder else sum(c.nbytes for c in found.values()) * num_layers
    recompute = needed > 0 and needed + inputs > 0.8 * available
    if recompute:
        reporter.info(
            f"the covariances of all {num_layers} layers would take {needed / 1e9:.3g} GB of the "
            f"{available / 1e9:.3g} GB of host memory available: each layer's is computed again while A is "
            "built (one more forward pass); --offload-dir DIR keeps them on disk instead"
        )
    if inputs > 0.8 * available:
        reporter.warn(
            f"the layer inputs will take about {inputs / 1e9:.3g} GB of host memory and {available / 1e9:.3g} GB "
            "is available: if this run is killed, rerun with --offload-dir DIR on a disk with that much free space"
        )
    return recompute


def _forward_layer(
    streamed: StreamedModel,
    layer_index: int,
    by_layer: dict[int, list[Target]],
    samples: Sequence[EncodedSample],
    calls: list[list[tuple[tuple, dict]]],
    store: TensorStore,
    groups: InputGroups,
    center: bool,
    covariances: bool,
) -> dict[str, torch.Tensor]:
    """Run every sample through one layer while hooks learn which modules share an input and, with
    covariances=True, sum X^T X; returns the layer's covariances, normalised, on the device."""
    device = streamed.device
    layer = streamed.load_layer(layer_index)
    modules = dict(layer.named_modules(prefix=f"{streamed.prefix}.{layer_index}"))
    acc: dict[str, torch.Tensor] = {}
    handles = [
        modules[t.name].register_forward_pre_hook(covariance_hook(t.name, groups, acc if covariances else None, center))
        for t in by_layer.get(layer_index, [])
    ]
    try:
        with torch.no_grad():
            for n in range(len(samples)):
                args, kwargs = calls[n][layer_index]
                out = first_tensor(layer(store.get(f"h{layer_index}-{n}", device), *args, **kwargs))
                groups.end_forward()
                store.put(f"h{layer_index + 1}-{n}", out)
    finally:
        for h in handles:
            h.remove()
        streamed.unload_layer(layer_index)
    bad = first_non_finite(acc)
    if bad:
        raise non_finite_error(bad, streamed.dtype)
    tokens = sum(len(s.input_ids) for s in samples)
    return {key: c.div_(tokens) for key, c in acc.items()}


def _stream_backward(
    streamed: StreamedModel,
    by_layer: dict[int, list[Target]],
    samples: Sequence[EncodedSample],
    calls: list[list[tuple[tuple, dict]]],
    store: TensorStore,
    grads: tuple[TensorSink, TensorSink] | None,
    step: Step | None,
) -> dict[str, float]:
    """Loss at the head, then each layer recomputed with grad; |W * dL_n/dW| is reduced per sample at once."""
    device = streamed.device
    num_layers = len(streamed.layers)
    with streamed.holding(streamed.head):
        for n, sample in enumerate(samples):
            last = store.get(f"h{num_layers}-{n}", device).requires_grad_(True)
            loss = sample_loss(streamed.logits(last), torch.tensor([sample.labels], device=device), n)
            if not torch.isfinite(loss):
                raise non_finite_error("the output head", streamed.dtype)
            loss.backward()
            store.put(f"g-{n}", last.grad)
            store.drop(f"h{num_layers}-{n}")
    scores: dict[str, float] = {}
    for layer_index in reversed(range(num_layers)):
        layer = streamed.load_layer(layer_index)
        modules = dict(layer.named_modules(prefix=f"{streamed.prefix}.{layer_index}"))
        acc = {t.name: torch.zeros((), dtype=torch.float64, device=device) for t in by_layer.get(layer_index, [])}
        handles = []
        moments = GradientMoments() if grads else None
        for name in acc:
            weight = modules[name].weight
            weight.requires_grad_(True)
            on_grad = moments.grad_hook(name) if moments else None
            handles.append(weight.register_post_accumulate_grad_hook(score_hook(acc[name], on_grad)))
            if moments:
                handles.append(modules[name].register_forward_hook(moments.output_hook(name)))
        try:
            for n in range(len(samples)):
                args, kwargs = calls[n][layer_index]
                x = store.get(f"h{layer_index}-{n}", device).requires_grad_(layer_index > 0)
                out = first_tensor(layer(x, *args, **kwargs))
                if out.requires_grad:
                    out.backward(store.get(f"g-{n}", device))
                if layer_index > 0:
                    store.put(f"g-{n}", x.grad)
                store.drop(f"h{layer_index}-{n}")
        finally:
            for h in handles:
                h.remove()
        scores.update({name: s.item() for name, s in acc.items()})
        if moments:
            tokens = sum(len(s.input_ids) for s in samples)
            for name in acc:
                mean_grad, output_grad_sq = moments.pop(name, len(samples), tokens)
                grads[0].put(name, mean_grad)
                grads[1].put(name, output_grad_sq)
                del mean_grad, output_grad_sq  # else the last pair stays alive through the next layer
        streamed.unload_layer(layer_index)
        if step:
            step()
    return scores
