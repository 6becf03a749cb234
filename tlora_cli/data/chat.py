"""The tokenizer's chat template, rendered to ids with one line for a template that fails."""

from __future__ import annotations

from typing import Any

from ..errors import TloraError

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and so every HF model) skips


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], where: str, **kwargs: Any) -> list[int]:
    from jinja2 import TemplateError

    try:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))
    except TemplateError as e:
        raise TloraError(f"{where}: the tokenizer's chat template failed ({e}); drop --chat-template") from None
