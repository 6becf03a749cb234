"""Many processes under torchrun: each rank calibrates a share of the samples, the ranks add up their sums,
each factorises the modules it owns, and rank 0 gathers the A matrices and alone writes OUT.

Without torchrun's environment (WORLD_SIZE unset or 1; a stray RANK is then ignored) there is one Dist of one
process, no process group, and every collective here is a no-op. Under torchrun every collective first agrees on
errors: a rank that fails tells the others at their next collective, so that every rank stops with the same one
line (said by rank 0) instead of waiting for a partner that will never come.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as td

from .errors import Lost, Stopped, TloraError

TIMEOUT_ENV = "TLORA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600  # a hung rank stops the job (a CI run) after this long
GRACE_S = 5.0  # how long a rank other than 0 leaves rank 0 to say why they all stop
LOST = "another rank stopped or was killed (its error, if any, is above); nothing was written"


def is_main_process() -> bool:
    """Global rank 0 under torchrun, or a run without it: the process that prints and writes. Only a torchrun
    run (WORLD_SIZE above 1) has other ranks: a stray RANK alone, or variables that do not parse (which
    `torchrun_env` refuses in one line), never silence the one process there is."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def torchrun_env() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) without WORLD_SIZE, or with 1 (RANK is then ignored).
    What torchrun never sets is one line naming the variable, before any process group is joined."""
    world_size = _whole_number("WORLD_SIZE", "1")
    if world_size < 1:
        raise TloraError(f"WORLD_SIZE must be 1 or more, got {world_size}: unset it, or start the run with torchrun")
    if world_size == 1:
        return 0, 1
    _required("RANK", world_size)
    rank = _whole_number("RANK", "0")
    if not 0 <= rank < world_size:
        raise TloraError(f"RANK must be between 0 and {world_size - 1} (WORLD_SIZE is {world_size}), got {rank}")
    return rank, world_size


def _required(name: str, world_size: int) -> None:
    if not os.environ.get(name, "").strip():
        raise TloraError(
            f"WORLD_SIZE is {world_size} but {name} is not set: start the run with torchrun (which sets it), "
            "or unset WORLD_SIZE"
        )


def _whole_number(name: str, default: str) -> int:
    raw = os.environ.get(name, default)
    try:
        return int(raw)
    except ValueError:
        raise TloraError(
            f"{name} must be a whole number, got {raw!r}: unset it, or start the run with torchrun"
        ) from None


def refuse_ranks(command: str) -> None:
    """Only calibrate and init share their work among torchrun's ranks; any other command would have every rank
    do the same work and write the same file at once. Every rank stops, rank 0 says why."""
    rank, world_size = torchrun_env()
    if world_size > 1:
        _let_main_speak(Dist(rank, world_size))
        raise Stopped(f"tlora {command} runs in one process: run it without torchrun (only calibrate and init share)")


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e9:  # NaN and inf too
        raise TloraError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return seconds


@dataclass
class Dist:
    """This process's place among the ranks; `device` is where its collectives' tensors live."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: str = "cpu"

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def samples_per_rank(self, n: int) -> list[int]:
        """Contiguous shares of n samples: the first n % K ranks take one more; a rank may take none."""
        return [n // self.world_size + (r < n % self.world_size) for r in range(self.world_size)]

    def share(self, n: int) -> range:
        """The indices of the samples this rank calibrates."""
        counts = self.samples_per_rank(n)
        start = sum(counts[: self.rank])
        return range(start, start + counts[self.rank])

    def record(self, n: int, owners: Mapping[str, int] | None = None) -> dict:
        """What the metadata and the calibration folder say about the split (nothing without torchrun), with
        how many inputs' statistics each rank held when they were spread over the ranks."""
        if not self.active:
            return {}
        record = {"world_size": self.world_size, "backend": self.backend, "samples_per_rank": self.samples_per_rank(n)}
        if owners:
            record["inputs_per_rank"] = [list(owners.values()).count(r) for r in range(self.world_size)]
        return record

    def agree(self, error: str | None = None) -> None:
        """Every rank says whether it failed; when one did, every rank raises Stopped with its message.

        Two small collectives: the lowest failing rank (a MIN over the ranks), then its message from it.
        """
        if not self.active:
            return
        healthy = self.world_size
        flag = torch.tensor([self.rank if error is not None else healthy], device=self.device)
        message = [error]
        with _lost_rank():
            td.all_reduce(flag, op=td.ReduceOp.MIN)
            source = int(flag.item())
            if source == healthy:
                return
            td.broadcast_object_list(message, src=source)
        raise Stopped(message[0] if source == 0 else f"rank {source}: {message[0]}")

    def reduce_sum(self, tensors: list[tuple[torch.Tensor, int | None]]) -> None:
        """Add every rank's tensors, in place, into the given rank's (into every rank's for None); each tensor
        must be on `device`. What the other ranks are left with is not a sum: they drop it."""
        if not self.active:
            return
        self.agree()
        with _lost_rank():
            for t, owner in tensors:
                if owner is None:
                    td.all_reduce(t)
                else:
                    td.reduce(t, dst=owner)

    def all_gather(self, obj: object) -> list[object]:
        """Every rank's `obj` (small, picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        self.agree()
        gathered: list[object] = [None] * self.world_size
        with _lost_rank():
            td.all_gather_object(gathered, obj)
        return gathered

    def gather_to_main(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's tensors merged on rank 0 (the others get {}): the A matrices each rank built."""
        if not self.active:
            return tensors
        self.agree()
        gathered: list[dict[str, torch.Tensor] | None] = [None] * self.world_size if self.is_main else None
        with _lost_rank():
            td.gather_object(tensors, gathered, dst=0)
        return {k: v for part in gathered or [] for k, v in part.items()}

    def owner_of(self, costs: Mapping[str, float]) -> dict[str, int]:
        """A rank for each piece of work, balanced by cost: largest first onto the least-loaded rank.

        The same on every rank (ties go to the lower rank, then to the earlier piece), so no message is needed.
        """
        load = [0.0] * self.world_size
        owners: dict[str, int] = {}
        for key in sorted(costs, key=lambda k: -costs[k]):  # stable: equal costs keep their order
            rank = min(range(self.world_size), key=lambda r: (load[r], r))
            owners[key] = rank
            load[rank] += costs[key]
        return owners


@contextlib.contextmanager
def _lost_rank() -> Iterator[None]:
    """A collective whose partner is gone (killed, or past the timeout) fails on the ranks still there."""
    try:
        yield
    except RuntimeError as e:  # torch's DistBackendError and gloo's connection errors are RuntimeErrors
        raise Lost(LOST) from e


def _from_env(device: str) -> Dist:
    """Join torchrun's process group: NCCL with this rank on cuda:LOCAL_RANK for a CUDA device, else gloo."""
    rank, world_size = torchrun_env()
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # where the ranks meet: init_process_group's own error is a traceback
        _required(name, world_size)
    _whole_number("MASTER_PORT", "0")
    if device.startswith("cuda"):
        backend, device = "nccl", f"cuda:{_whole_number('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    else:
        backend = "gloo"
    timeout = datetime.timedelta(seconds=timeout_seconds())
    td.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return Dist(rank, world_size, backend, device)


def _let_main_speak(dist: Dist) -> None:
    """torchrun stops every rank as soon as one exits: a rank other than 0 waits a moment before it does,
    so that rank 0 has said why every rank stopped (rank 0's own exit then ends this one)."""
    if not dist.is_main:
        time.sleep(GRACE_S)


@contextlib.contextmanager
def launched(device: str) -> Iterator[Dist]:
    """The ranks of this run (one, without torchrun) for the block; any rank's error stops them all.

    `device` is the one the run asked for (cpu or cuda); under torchrun each rank gets its own GPU.
    """
    if torchrun_env()[1] == 1:
        yield Dist(device=device)
        return
    dist = _from_env(device)
    try:
        yield dist
    except Stopped:
        _let_main_speak(dist)
        raise
    except Exception as e:  # an interrupt passes: torchrun is stopping every rank anyway
        message = str(e) if isinstance(e, TloraError) else f"internal error: {type(e).__name__}: {e}"
        try:
            dist.agree((message.splitlines() or [type(e).__name__])[0])
        except Lost:
            pass  # the others are gone: this rank says it itself
        except Stopped as agreed:
            if isinstance(e, TloraError):
                _let_main_speak(dist)
                raise agreed from e  # rank 0 says it, for every rank
        raise  # the others are gone, or a bug that this rank shows as such too
    finally:
        td.destroy_process_group()
