"""TRL's conversational format: a record's `messages`, a list of {"role", "content"} turns.

The tokenizer's chat template renders the conversation; the loss covers the assistant turns (each from
after its generation prompt to its end of turn), as TRL's `assistant_only_loss` puts it. A conversation
is rendered turn by turn, and each rendering must start with the one before it; a template that rewrites
earlier turns (some drop past reasoning) is refused rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import TloraError
from .chat import IGNORE_INDEX, chat_ids
from .samples import EncodedSample, Sample

FIELD = "messages"


def is_conversation(record: Any) -> bool:
    return isinstance(record, Mapping) and isinstance(record.get(FIELD), list)


def messages_sample(record: Mapping, where: str) -> Sample | None:
    """The record's conversation as a Sample; None when it has no assistant turn with content (skipped and
    counted like an empty response)."""
    if not isinstance(record.get(FIELD), list):
        raise TloraError(f"{where}: expected '{FIELD}', a list of role/content turns, like the records before it")
    turns = []
    for i, turn in enumerate(record[FIELD], start=1):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str):
            raise TloraError(f"{where}: message {i} must be an object with a 'role' and a 'content'; fix the record")
        content = turn.get("content")
        if not isinstance(content, str):
            raise TloraError(
                f"{where}: message {i} has {type(content).__name__} content; only text content is read"
                if content is not None
                else f"{where}: message {i} has no 'content'; fix the record"
            )
        turns.append((turn["role"], content))
    if not any(role == "assistant" and content.strip() for role, content in turns):
        return None
    return Sample(messages=tuple(turns))


def encode_messages(sample: Sample, tokenizer: Any, seq_len: int, where: str) -> EncodedSample:
    """The chat template over the conversation up to its last assistant turn; labels on assistant turns only."""
    if not getattr(tokenizer, "chat_template", None):
        raise TloraError(
            f"{where} is a conversation ('messages'), but the tokenizer has no chat template; "
            "use a model with one, or give text or prompt/response records"
        )
    messages = [{"role": role, "content": content} for role, content in sample.messages or ()]
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = chat_ids(tokenizer, messages[:i], where, add_generation_prompt=True) if i else []
        whole = chat_ids(tokenizer, messages[: i + 1], where)
        if prompt[: len(ids)] != ids or whole[: len(prompt)] != prompt or len(whole) == len(prompt):
            raise TloraError(
                f"{where}: the tokenizer's chat template does not render the conversation turn by turn (each "
                "rendering starting with the one before), so the loss cannot be put on the assistant turns alone"
            )
        labels += [IGNORE_INDEX] * (len(prompt) - len(ids)) + whole[len(prompt) :]
        ids = whole
    return EncodedSample(ids[:seq_len], labels[:seq_len], truncated=len(ids) > seq_len)
