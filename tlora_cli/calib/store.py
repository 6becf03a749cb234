"""Tensors kept between stages, by key: in host memory, or one safetensors file per key in a folder.

One store serves the layer inputs and gradients the streaming engine passes from layer to layer (in an
offload folder when memory is short) and the finished statistics (in a calibration folder, or memory).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import TloraError


class TensorStore(Mapping):
    """`put`, `get` and `drop` tensors by key; as a Mapping it reads them back to the CPU, one at a time.

    `field` names the tensor inside each file (the calibration format's names). `copy=True` copies tensors
    kept in memory when they are on the CPU already, for tensors the caller goes on using (layer outputs).
    `check(tensor, path)` vets each tensor read from a file (a calibration folder's statistics: finite floats).
    """

    def __init__(
        self,
        folder: Path | None,
        field: str = "t",
        keys: list[str] | None = None,
        copy: bool = False,
        check: Callable[[torch.Tensor, Path], torch.Tensor] | None = None,
    ):
        self.folder, self.field, self.copy, self.check = folder, field, copy, check
        self.memory: dict[str, torch.Tensor] = {}
        self.pending: dict[str, torch.cuda.Event] = {}  # copies from a GPU still under way, by key
        self.keys_: dict[str, None] = dict.fromkeys(keys or [])
        if folder is not None and keys is None:
            folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def put(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.keys_[key] = None
        if self.folder is None:
            self.memory[key] = self._to_host(key, tensor)
        else:
            save_file({self.field: tensor.contiguous().cpu()}, self.path(key))

    def get(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        if self.folder is None:
            pending = self.pending.pop(key, None)
            if pending is not None:
                pending.synchronize()
            return self.memory[key].to(device)
        try:
            with safe_open(self.path(key), "pt", device=str(device)) as f:
                tensor = f.get_tensor(self.field)
            return tensor if self.check is None else self.check(tensor, self.path(key))
        except (OSError, RuntimeError, SafetensorError) as e:
            raise TloraError(f"cannot read {self.path(key)}: {e}; recalibrate".splitlines()[0]) from e

    def _to_host(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """From a GPU, the copy is queued behind the work that made the tensor, into pinned memory, and waited
        for only when the tensor is read: the device goes on with the next layer meanwhile (a pinned block is
        not reused before its copy is done, even if dropped sooner). Without pinned memory, a plain copy."""
        if tensor.device.type != "cuda":
            return tensor.to("cpu", copy=self.copy and tensor.device.type == "cpu")
        try:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        except RuntimeError:  # the host cannot lock that much memory
            return tensor.cpu()
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        self.pending[key] = event
        return host

    def drop(self, key: str) -> None:
        self.keys_.pop(key, None)
        self.pending.pop(key, None)
        if self.folder is None:
            self.memory.pop(key, None)
        else:
            self.path(key).unlink(missing_ok=True)

    def nbytes(self, key: str) -> int:
        """Bytes a tensor held in memory takes (0 in a folder: it takes no host memory)."""
        return self.memory[key].nbytes if self.folder is None else 0

    def missing(self) -> list[str]:
        """Keys whose file is not there (a calibration folder copied in part)."""
        return [k for k in self.keys_ if self.folder is not None and not self.path(k).is_file()]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def write_tensors(tensors: Mapping[str, torch.Tensor], folder: Path, field: str) -> None:
    """Each tensor into `folder/<key>.safetensors`; a store already writing there has done it."""
    if isinstance(tensors, TensorStore) and tensors.folder == folder:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for key, tensor in tensors.items():
        save_file({field: tensor.contiguous()}, folder / f"{key}.safetensors")


@contextlib.contextmanager
def scratch_folder(parent: Path | None, prefix: str) -> Iterator[Path | None]:
    """A fresh folder in `parent` (--offload-dir), removed afterwards whatever happens; None without a parent."""
    if parent is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as folder:
        yield Path(folder)
