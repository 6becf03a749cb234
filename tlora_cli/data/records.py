"""How a dataset record becomes a Sample when its fields are named: by a known set's format or the field flags.

Local files without field flags keep `files.record_to_sample`, which reads each record's shape from its field
names; here the shape is fixed once for the whole dataset, as a trainer's preprocessing fixes it.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import TloraError
from .files import FIELDS_HELP, PAIR_FIELDS
from .samples import Sample


@dataclass(frozen=True)
class RecordFormat:
    """Plain text from `text_field`, or a prompt/response pair.

    The prompt is `template` (a str.format string over the record's fields) or the `prompt_field` verbatim;
    `input_template` replaces it when the record's 'input' field is filled, as the two Alpaca templates do.
    The response is `response_field` verbatim plus `response_suffix` (the TLoRA scripts end each response
    with a newline before EOS); encoding adds the EOS token, as SPEC.md says.
    """

    text_field: str | None = None
    prompt_field: str | None = None
    template: str | None = None
    input_template: str | None = None
    response_field: str | None = None
    response_suffix: str = ""

    def __post_init__(self) -> None:
        pair = (self.prompt_field is not None or self.template is not None) and self.response_field is not None
        if (self.text_field is None) == (not pair) or (self.prompt_field is not None and self.template is not None):
            raise ValueError("a RecordFormat needs text_field, or a prompt (field or template) and response_field")

    @property
    def fields(self) -> list[str]:
        """Every field the format reads, in order, for listings and up-front checks."""
        names = [self.text_field, self.prompt_field]
        for template in (self.template, self.input_template):
            names += template_fields(template) if template else []
        names.append(self.response_field)
        return list(dict.fromkeys(name for name in names if name is not None))

    def check_columns(self, columns: Iterable[str], source: str) -> None:
        """Fail once, naming every field the dataset has, when one the format needs is missing (a misspelt
        flag or template field), rather than on each record."""
        available = list(columns)
        for name in self.fields:
            if name not in available:
                raise TloraError(f"{source}: {_no_field(name, available)}")

    def to_sample(self, record: Mapping, where: str) -> Sample | None:
        """The record as a Sample, or None when its text, response or a field of its prompt is empty (the
        caller counts it)."""
        if not isinstance(record, Mapping):
            raise TloraError(f"{where}: expected a record with named fields, got {type(record).__name__}")
        if self.text_field is not None:
            text = _value(record, self.text_field, where)
            return Sample(text=text) if text.strip() else None
        template = self.template
        if self.input_template is not None and _value(record, "input", where).strip():
            template = self.input_template
        if template is None:
            values = {"prompt": _value(record, self.prompt_field, where)}
        else:
            values = {name: _value(record, name, where) for name in template_fields(template)}
        response = _value(record, self.response_field, where)
        if not response.strip() or not all(value.strip() for value in values.values()):
            return None
        prompt = values["prompt"] if template is None else _format(template, values, where)
        return Sample(prompt=prompt, response=response + self.response_suffix)

    def for_chat(self) -> RecordFormat:
        """The raw fields, for a chat template to wrap: trainers put the bare instruction in the user turn and
        the bare response in the assistant turn, never a prompt template's header. A template over several
        fields stays (there is no one field to take its place)."""
        fields = template_fields(self.template) if self.template is not None else []
        if len(fields) != 1:
            return dataclasses.replace(self, response_suffix="")
        alpaca_input = "{" + fields[0] + "}\n\n{input}" if self.input_template is not None else None
        return RecordFormat(prompt_field=fields[0], input_template=alpaca_input, response_field=self.response_field)

    def describe(self) -> str:
        """One line for metadata and listings."""
        if self.text_field is not None:
            return f"text: {self.text_field}"
        prompt = repr(self.template) if self.template is not None else self.prompt_field
        if self.input_template is not None:
            prompt += f" (with an input: {self.input_template!r})"
        suffix = f" + {self.response_suffix!r}" if self.response_suffix else ""
        return f"prompt: {prompt}; response: {self.response_field}{suffix}"


def detect_format(columns: Iterable[str], source: str) -> RecordFormat:
    """The shape a dataset's column names imply, by the same precedence as local files (files.PAIR_FIELDS)."""
    available = list(columns)
    if "text" in available:
        return RecordFormat(text_field="text")
    for prompt_key, response_key in PAIR_FIELDS:
        if prompt_key in available and response_key in available:
            # Alpaca style, as for local files: a filled input follows the instruction after a blank line.
            alpaca = prompt_key == "instruction" and "input" in available
            return RecordFormat(
                prompt_field=prompt_key,
                input_template="{instruction}\n\n{input}" if alpaca else None,
                response_field=response_key,
            )
    fields = ", ".join(f"'{k}'" for k in available) or "none"
    raise TloraError(
        f"{source}: no usable fields (the records have {fields}); name them with --text-field, or --prompt-field "
        f"(or --template) and --response-field, or give records with {FIELDS_HELP}"
    )


def template_fields(template: str) -> list[str]:
    """The record fields a str.format template names; a malformed or positional template is the user's to fix."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TloraError(
            f"the template {template!r} is not a valid format string ({e}); write fields as {{name}} "
            "and literal braces as {{ and }}"
        ) from None
    names = []
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        name = field.split(".", 1)[0].split("[", 1)[0]
        if not name or name.isdigit():
            raise TloraError(f"the template {template!r} has a positional field {{{field}}}; name a record field")
        if name != field or "{" in (spec or ""):  # templates read fields, never attributes or items of them
            raise TloraError(
                f"the template {template!r} has {{{field}}}; a template may only name fields, as {{{name}}}"
            )
        names.append(name)
    return names


def _format(template: str, values: dict[str, str], where: str) -> str:
    try:
        return template.format_map(values)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise TloraError(f"{where}: the template {template!r} cannot be filled ({e}); simplify its fields") from None


def _value(record: Mapping, name: str, where: str) -> str:
    """A field as text: numbers are written out, a missing value is empty, anything else is an error."""
    if name not in record:
        raise TloraError(f"{where}: {_no_field(name, list(record))}")
    value = record[name]
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TloraError(f"{where}: field '{name}' must be text, got {type(value).__name__}; pick another field")
    return str(value)


def _no_field(name: str, available: list[str]) -> str:
    fields = ", ".join(f"'{k}'" for k in available) or "none"
    return f"no field '{name}' (the records have {fields}); fix the field flag or the template"
