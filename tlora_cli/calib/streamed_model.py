"""A causal LM streamed from its checkpoint: a meta skeleton whose decoder layers are read one at a time.

The embeddings, final norm and head are read from the checkpoint only while used, each decoder layer only
while it runs (with `read_ahead`, the next layer is read on a background thread while one computes).
Stand-in layers take the decoder layers' places in the model's own forward, to capture what
each layer receives (masks, position embeddings) or to feed the head a given last hidden state.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import TloraError
from ..model.checkpoint import Checkpoint
from ..model.targets import Target, find_targets


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


Read = list[tuple[torch.nn.Module, dict[str, torch.Tensor]]]  # a layer's modules and their tensors, on the host


class StreamedModel:
    """A causal LM whose decoder layers are read from the checkpoint one at a time.

    `read_seconds` is the time spent reading layers, `wait_seconds` the part of it the computation waited for.
    """

    def __init__(self, path: Path, checkpoint: Checkpoint, dtype: torch.dtype, device: str, read_ahead: bool = True):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.checkpoint, self.dtype, self.device = checkpoint, dtype, torch.device(device)
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlora-reader") if read_ahead else None
        self.pending: tuple[int, Future[Read]] | None = None
        self.read_seconds = self.wait_seconds = 0.0
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

    def _read(self, module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """`module`'s own parameters from the checkpoint, on the host: pinned when bound for a GPU, so the copy
        there can overlap the computation."""
        tensors = {}
        for pname, param in module._parameters.items():
            if param is None:
                continue
            name = f"{prefix}.{pname}" if prefix else pname
            if name not in self.key_of:
                raise TloraError(
                    f"the checkpoint has no tensor {name}: it does not match its config.json, or stores weights "
                    "in a layout the streaming engine cannot read (try --engine whole)"
                )
            value = self.checkpoint.get(self.key_of[name], param.shape)
            tensors[pname] = value.pin_memory() if self.device.type == "cuda" else value
        return tensors

    def _place(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Give `module`'s meta parameters these values, on the device in the compute dtype, frozen."""
        for pname, value in tensors.items():
            value = value.to(self.device, non_blocking=True).to(self.dtype)
            module._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
        for bname, buf in module._buffers.items():
            if buf is not None:
                module._buffers[bname] = buf.to(self.device)

    def _load(self, module: torch.nn.Module, prefix: str) -> None:
        self._place(module, self._read(module, prefix))
        self.checkpoint.release()

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

    def _read_layer(self, index: int, layer: torch.nn.Module) -> Read:
        """`layer` is looked up by the caller: while a stand-in holds its place, self.layers has the stand-in."""
        start = time.perf_counter()
        read = [
            (module, self._read(module, name)) for name, module in layer.named_modules(prefix=f"{self.prefix}.{index}")
        ]
        self.checkpoint.release()  # the layer's pages leave the resident set with its tensors
        self.read_seconds += time.perf_counter() - start
        return read

    def read_ahead(self, index: int) -> None:
        """Start reading layer `index` on the reader thread, for the load_layer(index) that follows."""
        if self.reader is not None and 0 <= index < len(self.layers):
            self.pending = (index, self.reader.submit(self._read_layer, index, self.layers[index]))

    def load_layer(self, index: int) -> torch.nn.Module:
        """Layer `index` on the device: what read_ahead read (an error there is raised here), else read now."""
        pending, self.pending = self.pending, None
        start = time.perf_counter()
        if pending is not None and pending[0] == index:
            read = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()
            read = self._read_layer(index, self.layers[index])
        self.wait_seconds += time.perf_counter() - start
        for module, tensors in read:
            self._place(module, tensors)
        return self.layers[index]

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

    def capture(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
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
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return first[0], calls

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The model's own head (final norm, lm_head, soft-capping...) applied to the last layer's output.

        Runs inside holding(self.head); the layers' input is injected, so the embeddings are not needed.
        """

        def inject(index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
            return last_hidden

        with self.stand_ins(inject):
            return self.model(inputs_embeds=torch.zeros_like(last_hidden.detach()), use_cache=False).logits

    def layer_modules(self, index: int, targets: list[Target]) -> dict[str, torch.nn.Module]:
        """The target modules of decoder layer `index`, by name (the layer must be loaded to measure them)."""
        modules = dict(self.layers[index].named_modules(prefix=f"{self.prefix}.{index}"))
        return {t.name: modules[t.name] for t in targets}

    def targets_by_layer(self, targets: list[Target]) -> dict[int, list[Target]]:
        by_layer: dict[int, list[Target]] = {}
        for t in targets:
            by_layer.setdefault(self.layer_of(t.name), []).append(t)
        return by_layer
