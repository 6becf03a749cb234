"""What `--data` and the flags beside it ask for: which records to read and how each becomes a sample."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import TloraError
from ..options import Options, not_blank, option
from .records import RecordFormat, template_fields


@dataclass(frozen=True)
class DataOptions(Options):
    """`data`: None (the built-in set), a name from the registry, NAME=PATH (that set's format over a local copy:
    a file, or a folder downloaded from the hub), a local file or dataset folder, or a hub dataset id.
    `template` is a str.format string over a record's fields that makes the prompt. `streaming=None` leaves
    the choice to the named set, or to the dataset's size.
    """

    data: str | None = option(
        None,
        "A file (.jsonl/.json/.parquet/.csv/.txt[.gz]), a dataset folder, a name (see `tlora data list`), "
        "NAME=PATH, or a hub id org/name. Default: the built-in math set.",
        "--data",
        "-d",
        check=not_blank,
    )
    config: str | None = option(None, "Hub dataset config (subset).", "--data-config")
    split: str | None = option(None, "Hub dataset split. Default: the named set's, else train.", "--data-split")
    text_field: str | None = option(None, "Field holding plain text (every token carries the loss).")
    prompt_field: str | None = option(None, "Field holding the prompt (no loss).")
    response_field: str | None = option(None, "Field holding the response (the loss).")
    template: str | None = option(None, "Prompt format string over the record, e.g. 'Q: {question}\\nA:'.")
    chat_template: bool = option(
        False, "Prompt as the user turn, response as the assistant turn (the loss).", "--chat-template"
    )
    streaming: bool | None = option(None, "Stream the hub dataset. Default: by its size.", "--streaming/--no-streaming")

    def check_together(self) -> None:
        """Contradictory flags fail before anything is read."""
        given = [flag for flag in self.given() if flag not in ("--data", "--chat-template")]
        if self.data is None and given:
            raise TloraError(f"{', '.join(given)} say how to read --data; give --data too, or drop them")
        if self.text_field is not None and (self.prompt_field or self.response_field or self.template):
            raise TloraError("--text-field makes plain-text samples; drop --prompt-field/--response-field/--template")
        if self.prompt_field is not None and self.template is not None:
            raise TloraError("--template makes the prompt; drop --prompt-field and name the field in the template")
        if self.template is not None:
            template_fields(self.template)  # a malformed or too wide template, before any model or data is read

    def record_format(self, default: RecordFormat | None) -> RecordFormat | None:
        """The format the field flags ask for, the rest taken from `default` (a named set's format, its raw
        fields under a chat template); None (no flags, no default) reads each record's shape from its fields."""
        if self.text_field is not None:
            return RecordFormat(text_field=self.text_field)
        if self.chat_template and default is not None:
            default = default.for_chat()
        if self.prompt_field is None and self.template is None and self.response_field is None:
            return default
        fields: dict[str, Any] = {}
        if default is not None and default.text_field is None:
            fields = dataclasses.asdict(default)
        if self.prompt_field is not None or self.template is not None:
            fields |= {"prompt_field": self.prompt_field, "template": self.template, "input_template": None}
        if self.response_field is not None:
            fields |= {"response_field": self.response_field, "response_suffix": ""}
        if fields.get("response_field") is None:
            raise TloraError("--prompt-field and --template need --response-field, the part that carries the loss")
        if fields.get("prompt_field") is None and fields.get("template") is None:
            raise TloraError("--response-field needs the prompt too: add --prompt-field or --template")
        return RecordFormat(**fields)
