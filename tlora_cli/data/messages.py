"""TRL's conversational format: a record's `messages`, a list of {"role", "content"} turns.

The tokenizer's chat template renders the conversation; the loss covers the assistant turns (each from
after its generation prompt to its end of turn), as TRL's `assistant_only_loss` puts it. A conversation
is rendered turn by turn, and each rendering must start with the one before it; a template that rewrites
earlier turns (some drop past reasoning) is refused rather than guessed at.

Rendering turn by turn costs the square of the conversation's length, so it stops once the first `seq_len`
tokens are known (one rendering of the whole conversation then checks them), and a conversation with more
than MAX_TURNS messages inside those tokens is refused: 10,000 short turns would take minutes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import TloraError
from .chat import IGNORE_INDEX, chat_ids
from .samples import EmptyRecord, EncodedSample, Sample, check_text

FIELD = "messages"
MAX_TURNS = 1000  # messages rendered turn by turn, at most (docs/reliability.md)


def is_conversation(record: Any) -> bool:
    return isinstance(record, Mapping) and isinstance(record.get(FIELD), list)


def messages_sample(record: Mapping, where: str) -> Sample:
    """The record's conversation as a Sample; EmptyRecord when it has no assistant turn with content (skipped and
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
        turns.append(
            (check_text(turn["role"], where, f"message {i}'s role"), check_text(content, where, f"message {i}"))
        )
    if not any(role == "assistant" and content.strip() for role, content in turns):
        raise EmptyRecord(f"{where}: the conversation has no assistant turn with content")
    return Sample(messages=tuple(turns))


def encode_messages(sample: Sample, tokenizer: Any, seq_len: int, where: str) -> EncodedSample:
    """The chat template over the conversation up to its last assistant turn; labels on assistant turns only."""
    if not getattr(tokenizer, "chat_template", None):
        raise TloraError(
            f"{where} is a conversation ('messages'), but the tokenizer has no chat template; "
            "use a model with one, or give text or prompt/response records"
        )
    messages = [{"role": role, "content": content} for role, content in sample.messages or ()]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    _check_turns(tokenizer, messages, last, seq_len, where)
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = chat_ids(tokenizer, messages[:i], where, add_generation_prompt=True) if i else []
        whole = chat_ids(tokenizer, messages[: i + 1], where)
        if prompt[: len(ids)] != ids or whole[: len(prompt)] != prompt or len(whole) == len(prompt):
            raise TloraError(_NOT_TURN_BY_TURN.format(where=where))
        labels += [IGNORE_INDEX] * (len(prompt) - len(ids)) + whole[len(prompt) :]
        ids = whole
        if len(ids) > seq_len:  # later turns only add tokens past the cut, if the template renders turn by turn
            _check_prefix(tokenizer, messages[: last + 1], ids, where)
            break
    return EncodedSample(ids[:seq_len], labels[:seq_len], truncated=len(ids) > seq_len)


_NOT_TURN_BY_TURN = (
    "{where}: the tokenizer's chat template does not render the conversation turn by turn (each rendering "
    "starting with the one before), so the loss cannot be put on the assistant turns alone"
)


def _check_turns(tokenizer: Any, messages: list[dict[str, str]], last: int, seq_len: int, where: str) -> None:
    """Refuse, after one rendering, a conversation whose first MAX_TURNS messages fit in seq_len tokens and come
    before its last assistant turn: rendering it turn by turn would not stop before them."""
    if last >= MAX_TURNS and len(chat_ids(tokenizer, messages[:MAX_TURNS], where)) <= seq_len:
        raise TloraError(
            f"{where}: the conversation has more than {MAX_TURNS} messages within --seq-len {seq_len} (each "
            "assistant turn renders the conversation so far); split it into shorter records or lower --seq-len"
        )


def _check_prefix(tokenizer: Any, messages: list[dict[str, str]], ids: list[int], where: str) -> None:
    """The conversation up to its last assistant turn, rendered once, must start with the turns rendered so far:
    a template that rewrites earlier turns is refused, as when every turn is rendered."""
    if chat_ids(tokenizer, messages, where)[: len(ids)] != ids:
        raise TloraError(_NOT_TURN_BY_TURN.format(where=where))
