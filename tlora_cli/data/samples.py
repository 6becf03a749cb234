"""The data types that travel from the calibration files to the statistics passes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import TloraError

# Halves of UTF-16 pairs: JSON's "\ud800" escape reads into a Python string that no tokenizer or terminal takes.
_SURROGATE = re.compile("[\ud800-\udfff]")


class EmptyRecord(TloraError):
    """A record with nothing to learn from (an empty or null field it is read from, a conversation without an
    assistant turn): a dataset's is passed over and counted, as trainers drop them; a file's is refused."""


def check_text(text: str, where: str, what: str) -> str:
    """`text` as it is, or a TloraError naming the record and the field when it is not Unicode text."""
    bad = _SURROGATE.search(text)
    if bad:
        raise TloraError(
            f"{where}: {what} holds an unpaired surrogate (\\u{ord(bad.group()):04x} at character {bad.start() + 1}), "
            "which is not text; fix the record"
        )
    return text


@dataclass(frozen=True)
class Sample:
    """One calibration example: plain `text` (every token carries loss), a `prompt`/`response` pair
    (loss on the response only, as in supervised fine-tuning), or a conversation of (role, content) `messages`
    (loss on the assistant turns, data/messages.py)."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if self.messages is not None:
            if self.text is not None or self.prompt is not None or self.response is not None:
                raise ValueError("a conversation Sample holds messages only")
            return
        pair_parts = (self.prompt is not None) + (self.response is not None)
        if (self.text is None and pair_parts != 2) or (self.text is not None and pair_parts != 0):
            raise ValueError("a Sample needs either text, or both prompt and response, not a mix")

    @property
    def is_pair(self) -> bool:
        return self.text is None and self.messages is None


@dataclass(frozen=True)
class EncodedSample:
    """Token ids and their labels (-100 where there is no loss), unpadded, at most seq_len long."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass(frozen=True)
class CalibrationSet:
    """The encoded samples plus what the metadata file needs to say where they came from.

    `sha256` is the file's for a local file; for a dataset read in part (a hub id, a folder) it is the hash
    of the picked samples' text, which is what the statistics saw. `wheres` names each sample's record.
    `provenance` holds what the metadata should add for a dataset (hub id, config, split, revision, format).
    """

    samples: list[EncodedSample]
    source: str
    sha256: str
    num_available: int
    wheres: list[str] = field(default_factory=list)
    num_skipped: int = 0  # records passed over for an empty text, prompt or response
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)

    @property
    def num_loss_tokens(self) -> int:
        """Raw label count: the model's own one-token shift is not applied here."""
        return sum(label != -100 for s in self.samples for label in s.labels)

    @property
    def num_truncated(self) -> int:
        return sum(s.truncated for s in self.samples)
