"""Progress bars and messages on stderr (stdout stays clean for --json), and the time of each phase."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .distributed import is_main_process
from .errors import printable
from .options import Options, option


@dataclass
class ProgressOptions(Options):
    quiet: bool = option(False, "No progress bars or messages.", "--quiet", "-q")


@dataclass
class ReportOptions(Options):
    """How a command reports its result: stdout carries nothing but it (progress and messages go to stderr)."""

    as_json: bool = option(False, "Print the result as one JSON object on stdout (for CI jobs).", "--json")


class Reporter:
    """Shows what each phase is doing and records how long it took (the metadata's `timings`)."""

    def __init__(self, quiet: bool = False) -> None:
        # Under torchrun only rank 0 talks: K copies of every bar and line would say nothing more.
        self.console = Console(stderr=True, quiet=quiet or not is_main_process(), soft_wrap=True)
        self.loud = Console(stderr=True, quiet=not is_main_process(), soft_wrap=True)  # -q does not silence it
        self.timings: dict[str, float] = {}

    def info(self, message: str) -> None:
        self.console.print(printable(message), highlight=False)

    def warn(self, message: str, protects: bool = False) -> None:
        """A warning; one that `protects` a result (the output may be wrong: a base other than the adapter's) is
        printed under -q too."""
        console = self.loud if protects else self.console
        console.print(f"[yellow]warning:[/] {printable(message)}", highlight=False)

    @contextmanager
    def phase(self, name: str, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """A timed phase with a bar; the yielded callable advances it by one (or by its argument), and with
        `description` also says what the bar is at (a running loss)."""
        start = time.perf_counter()
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=self.console.quiet,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda count=1, description=None: bar.update(
                task, advance=count, **({"description": description} if description else {})
            )
            if total is None:
                bar.update(task, total=1, completed=1)
        self.record(name, time.perf_counter() - start)

    def record(self, name: str, seconds: float) -> None:
        """A time measured elsewhere (a background thread's), beside the phases'."""
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 3)
