"""How a record becomes a Sample, for local files and hub datasets alike: a RecordFormat maps it.

The format comes from a known set, the field flags, or the field names (detect_format, by one precedence):
fixed once for a dataset, as a trainer's preprocessing fixes it, and per record for a local file without
field flags (record_to_sample), whose records may differ in shape.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from ..errors import TloraError
from .messages import is_conversation, messages_sample
from .samples import EmptyRecord, Sample, check_text

# Checked in this order; the first pair whose two fields are both present wins.
PAIR_FIELDS = (
    ("query", "response"),
    ("question", "answer"),
    ("instruction", "output"),
    ("prompt", "completion"),
    ("prompt", "response"),
)
MAX_WIDTH = 10_000  # a width or precision in a template's format spec, at most (docs/reliability.md)
FIELDS_HELP = "'text', or a pair " + ", ".join(f"'{p}'/'{r}'" for p, r in PAIR_FIELDS)


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

    def to_sample(self, record: Mapping, where: str) -> Sample:
        """The record as a Sample; EmptyRecord, naming the field, when its text, response or a field of its prompt
        is empty or null (the caller counts it)."""
        if not isinstance(record, Mapping):
            raise TloraError(f"{where}: expected a record with named fields, got {type(record).__name__}")
        if self.text_field is not None:
            text = _value(record, self.text_field, where)
            _check_filled(record, {self.text_field: text}, where)
            return Sample(text=text)
        template = self.template
        if self.input_template is not None and _value(record, "input", where).strip():
            template = self.input_template
        names = [self.prompt_field] if template is None else template_fields(template)
        values = {name: _value(record, name, where) for name in names}
        response = _value(record, self.response_field, where)
        _check_filled(record, {**values, self.response_field: response}, where)
        prompt = values[self.prompt_field] if template is None else _format(template, values, where)
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
    """The shape a dataset's column names imply, by the same precedence as a local file's records."""
    available = list(columns)
    fmt = _shape(available)
    if fmt is None:
        fields = ", ".join(f"'{k}'" for k in available) or "none"
        raise TloraError(
            f"{source}: no usable fields (the records have {fields}); name them with --text-field, or "
            f"--prompt-field (or --template) and --response-field, or give records with {FIELDS_HELP}"
        )
    return fmt


def _shape(available: list[str]) -> RecordFormat | None:
    """'text' if present, else the first pair of PAIR_FIELDS present; None when there is neither."""
    if "text" in available:
        return RecordFormat(text_field="text")
    for prompt_key, response_key in PAIR_FIELDS:
        if prompt_key in available and response_key in available:
            # Alpaca style: a filled input follows the instruction after a blank line.
            alpaca = prompt_key == "instruction" and "input" in available
            return RecordFormat(
                prompt_field=prompt_key,
                input_template="{instruction}\n\n{input}" if alpaca else None,
                response_field=response_key,
            )
    return None


def record_to_sample(record: Any, where: str) -> Sample:
    """Map one record of a local file to a Sample by its own field names; `where` prefixes errors ("file: line 3").

    The shape is found as detect_format finds a dataset's, from the fields this record fills: a null or blank
    field counts as absent, so that columnar files (Parquet, CSV) may mix text rows and pair rows. The file is
    the user's to fix, so a shape that is only partly filled, or a field that is not a string, is reported.
    """
    if not isinstance(record, dict):
        raise TloraError(f"{where}: expected an object with {FIELDS_HELP}, got {type_name(record)}")
    filled = [key for key, value in record.items() if _filled(value)]
    if "text" not in filled and is_conversation(record):  # TRL's conversational format
        try:
            return messages_sample(record, where)
        except EmptyRecord as e:
            raise TloraError(f"{e}; add one or remove the record") from None
    fmt = _shape(filled)
    if fmt is None:
        _report_unusable(record, where)
    for name in fmt.fields:
        _string_field(record, name, where)
    return fmt.to_sample(record, where)


def _report_unusable(record: dict[str, Any], where: str) -> NoReturn:
    """No complete shape: report what is wrong with the first one the record has every field of (a null one),
    else with the first one it partly has."""
    shapes = (("text",), *PAIR_FIELDS)
    for shape in sorted(shapes, key=lambda shape: not all(key in record for key in shape)):  # stable
        if any(key in record for key in shape):
            for key in shape:
                if key not in record:
                    given = next(k for k in shape if k in record)
                    raise TloraError(f"{where}: has '{given}' but no '{key}'; add it or use {FIELDS_HELP}")
                _string_field(record, key, where)
    fields = ", ".join(f"'{k}'" for k in record) or "none"
    raise TloraError(f"{where}: no usable fields (it has {fields}); each record needs {FIELDS_HELP}")


def _filled(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _string_field(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise TloraError(f"{where}: field '{key}' must be a string, got {type_name(value)}; fix the record")
    if not value.strip():
        raise TloraError(f"{where}: field '{key}' is empty; fill it in or remove the record")
    return value


def type_name(value: Any) -> str:
    """JSON's names for types, which is what the user wrote."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


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
        if _too_wide(spec or ""):
            raise TloraError(
                f"the template {template!r} pads or cuts {{{name}}} to more than {MAX_WIDTH:,} characters; "
                f"write {{{name}}} without a format spec, or a smaller width"
            )
        names.append(name)
    return names


_NUMBER = re.compile(r"[0-9]+")


def _too_wide(spec: str) -> bool:
    """A width or precision over MAX_WIDTH (`{question:>300000000}` would take GBs), compared as digits first:
    int() refuses a number of more than 4300 digits."""
    limit = len(str(MAX_WIDTH))
    return any(len(n.lstrip("0")) > limit or int(n) > MAX_WIDTH for n in _NUMBER.findall(spec))


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
    return check_text(str(value), where, f"field '{name}'")


def _check_filled(record: Mapping, values: dict[str, str], where: str) -> None:
    """EmptyRecord naming the first field of `values` (name -> its text) that is empty or null."""
    for name, value in values.items():
        if not value.strip():
            raise EmptyRecord(f"{where}: field '{name}' is {'null' if record[name] is None else 'empty'}")


def _no_field(name: str, available: list[str]) -> str:
    fields = ", ".join(f"'{k}'" for k in available) or "none"
    return f"no field '{name}' (the records have {fields}); fix the field flag or the template"
