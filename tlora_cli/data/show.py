"""`tlora data show` and `tlora data list`: samples exactly as the model will see them, the loss part marked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text

from ..errors import printable
from ..options import Options, at_least, option
from .calibration_set import load_calibration_set
from .chat import IGNORE_INDEX
from .registry import list_datasets
from .samples import CalibrationSet, EncodedSample

LOSS_STYLE = "bold green"


@dataclass
class ShowOptions(Options):
    count: int = option(3, "How many samples to show.", "--num-samples", check=at_least(1))


CONTEXT_STYLE = "dim"


@dataclass(frozen=True)
class ShownSample:
    """One encoded sample, decoded in its two parts: the context (labels -100) and what carries the loss."""

    where: str
    input_ids: list[int]
    labels: list[int]
    context_text: str
    loss_text: str
    truncated: bool
    # (text, carries the loss) runs in order: more than two for a conversation with several assistant turns
    segments: tuple[tuple[str, bool], ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def header(self) -> str:
        cut = ", truncated" if self.truncated else ""
        return f"{printable(self.where)}: {self.num_tokens} tokens, {self.num_loss_tokens} carry the loss{cut}"


def show_samples(
    data: Any, tokenizer: Any, count: int = 3, seq_len: int = 512, seed: int = 0
) -> tuple[CalibrationSet, list[ShownSample]]:
    """The first `count` samples the calibration would pick with this seed, decoded with special tokens kept.

    `data` is what load_calibration_set takes (DataOptions, a name, a path, None).
    """
    calibration = load_calibration_set(data, tokenizer, count, seq_len, seed)
    shown = [_decode(s, where, tokenizer) for s, where in zip(calibration.samples, calibration.wheres)]
    return calibration, shown


def _decode(sample: EncodedSample, where: str, tokenizer: Any) -> ShownSample:
    # Encoding puts every label-free token first (the prompt), then the ones with loss.
    cut = next((i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX), len(sample.labels))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    ids = sample.input_ids
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, sample.labels):
        loss = label != IGNORE_INDEX
        if runs and runs[-1][1] == loss:
            runs[-1][0].append(token)
        else:
            runs.append(([token], loss))
    segments = tuple((decode(run), loss) for run, loss in runs)
    return ShownSample(where, ids, sample.labels, decode(ids[:cut]), decode(ids[cut:]), sample.truncated, segments)


def _summary(calibration: CalibrationSet, shown: list[ShownSample]) -> str:
    count = f"{len(shown)} sample" + ("s" if len(shown) != 1 else "")
    return (
        f"{count} from {printable(calibration.source)}: {sum(s.num_tokens for s in shown)} tokens, "
        f"{sum(s.num_loss_tokens for s in shown)} carry the loss"
    )


def samples_text(calibration: CalibrationSet, shown: list[ShownSample]) -> Text:
    """For a terminal: the loss part in bold green, the context dimmed, a legend at the end."""
    text = Text()
    text.append(_summary(calibration, shown) + "\n\n", style="bold")
    for sample in shown:
        text.append(sample.header + "\n", style="bold")
        if len(sample.segments) > 2:  # a conversation: context and loss alternate
            for part, loss in sample.segments:
                text.append(part, style=LOSS_STYLE if loss else CONTEXT_STYLE)
        else:
            text.append(sample.context_text, style=CONTEXT_STYLE)
            text.append(sample.loss_text, style=LOSS_STYLE)
        text.append("\n\n")
    text.append("legend: ")
    text.append("carries the loss", style=LOSS_STYLE)
    text.append(" / ")
    text.append("context only (label -100)", style=CONTEXT_STYLE)
    return text


def samples_plain(calibration: CalibrationSet, shown: list[ShownSample]) -> str:
    """For a pipe or a file, where styles are lost: each part under its own marker line."""
    lines = [_summary(calibration, shown), ""]
    for sample in shown:
        lines.append(f"=== {sample.header}")
        if len(sample.segments) > 2:  # a conversation: context and loss alternate
            for part, loss in sample.segments:
                lines += ["--- loss ---" if loss else "--- context (no loss) ---", part]
            lines.append("")
            continue
        if sample.context_text:
            lines += ["--- context (no loss) ---", sample.context_text]
        lines += ["--- loss ---", sample.loss_text, ""]
    return "\n".join(lines)


def datasets_table() -> Table:
    """`tlora data list` for a terminal."""
    rows = list_datasets()
    table = Table(*rows[0].keys(), title="Datasets --data knows by name")
    for row in rows:
        table.add_row(*row.values())
    return table


def datasets_plain() -> str:
    """`tlora data list` for a pipe: one tab-separated line per dataset, with a header line."""
    rows = list_datasets()
    return "\n".join("\t".join(values) for values in [list(rows[0]), *(list(r.values()) for r in rows)])
