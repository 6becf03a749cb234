"""Tensors kept between stages, by key: in host memory, or one safetensors file per key in a folder.

One store serves the layer inputs and gradients the streaming engine passes from layer to layer (in an
offload folder when memory is short) and the finished statistics (in a calibration folder, or memory).
Files are written on a background thread (safetensors lets go of the GIL while it writes), so a finished
layer's statistics reach the disk while the next layer computes.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import TloraError

# Bytes handed to the writer and not yet on disk, beyond which `put` waits: a Llama-2-7B layer's covariances
# (0.66 GiB) go out while the next layer runs; a bigger single tensor goes alone.
WRITE_AHEAD_BYTES = 2**30


class TensorStore(Mapping):
    """`put`, `get` and `drop` tensors by key; as a Mapping it reads them back to the CPU, one at a time.

    `field` names the tensor inside each file (the calibration format's names). `copy=True` copies tensors
    kept in memory when they are on the CPU already, for tensors the caller goes on using (layer outputs).
    `check(tensor, path)` vets each tensor read from a file (a calibration folder's statistics: finite floats).
    Used as a context manager it waits for its files on the way out (and on an error, writes no more).
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
        self.writing: dict[str, tuple[Future, int]] = {}  # files not yet written, by key: (job, bytes)
        self.writer: ThreadPoolExecutor | None = None
        self.keys_: dict[str, None] = dict.fromkeys(keys or [])
        if folder is not None and keys is None:
            folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def put(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.keys_[key] = None
        host, copied = self._to_host(tensor)
        if self.folder is None:
            self.memory[key] = host
            if copied is not None:
                self.pending[key] = copied
            return
        self._wait(key)  # a file put again is written once the first write is done
        self._reap()
        while self.writing and sum(b for _, b in self.writing.values()) + host.nbytes > WRITE_AHEAD_BYTES:
            self._wait(next(iter(self.writing)))
        if self.writer is None:
            self.writer = ThreadPoolExecutor(1, thread_name_prefix="tlora-writer")
        job = self.writer.submit(_write, {self.field: host.contiguous()}, self.path(key), copied)
        self.writing[key] = (job, host.nbytes)

    def get(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        self._wait(key)
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

    def _to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """The tensor on the host, and the event that marks its copy done when that copy is still under way.

        From a GPU, the copy is queued behind the work that made the tensor, into pinned memory, and waited
        for only when the tensor is read or written: the device goes on with the next layer meanwhile (a pinned
        block is not reused before its copy is done, even if dropped sooner). Without pinned memory, a plain copy.
        """
        if tensor.device.type != "cuda":
            return tensor.to("cpu", copy=self.copy and tensor.device.type == "cpu"), None
        try:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        except RuntimeError:  # the host cannot lock that much memory
            return tensor.cpu(), None
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        return host, event

    def _wait(self, key: str) -> None:
        """Until the file of `key` is written, if it is being written; a failed write raises its error here."""
        job, _ = self.writing.pop(key, (None, 0))
        if job is not None:
            job.result()

    def _reap(self) -> None:
        """Forget the writes that are done (raising the first that failed)."""
        for key in [k for k, (job, _) in self.writing.items() if job.done()]:
            self._wait(key)

    def flush(self) -> None:
        """Until every file handed to the writer is written; the first that failed is raised."""
        for key in list(self.writing):
            self._wait(key)

    def close(self, failed: bool = False) -> None:
        """Every write done (raised when it failed) and the writer stopped; after a failure elsewhere, writes
        not yet begun are cancelled and the rest waited for quietly, so no file appears after this returns."""
        try:
            if failed:
                for job, _ in self.writing.values():
                    job.cancel()
                self.writing.clear()
            else:
                self.flush()
        finally:
            if self.writer is not None:
                self.writer.shutdown(wait=True)
                self.writer = None

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, kind: type | None, *_) -> None:
        self.close(failed=kind is not None)

    def drop(self, key: str) -> None:
        self.keys_.pop(key, None)
        self.pending.pop(key, None)
        job, _ = self.writing.pop(key, (None, 0))
        if job is not None and not job.cancel():
            with contextlib.suppress(Exception):  # the file goes anyway
                job.result()
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


def _write(tensors: dict[str, torch.Tensor], path: Path, copied: torch.cuda.Event | None) -> None:
    """On the writer thread: once the copy from the GPU (if any) is done, the file."""
    if copied is not None:
        copied.synchronize()
    save_file(tensors, path)


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
