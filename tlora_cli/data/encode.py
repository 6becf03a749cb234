"""Tokenization and loss masks exactly as SPEC.md ("Terms") fixes them, so that every command agrees."""

from __future__ import annotations

from typing import Any

from ..errors import TloraError
from .chat import IGNORE_INDEX, chat_ids
from .messages import encode_messages
from .samples import EncodedSample, Sample


def check_seq_len(seq_len: int) -> None:
    """A loss needs one token to condition on and one to predict."""
    if seq_len < 2:
        raise TloraError(f"the sequence length must be at least 2 tokens, got {seq_len}; ask for 2 or more")


def encode_sample(
    sample: Sample, tokenizer: Any, seq_len: int, *, where: str = "a sample", chat_template: bool = False
) -> EncodedSample:
    """Text: every token is a target. Pair: prompt + response + EOS, loss on the response and EOS only.

    With `chat_template`, the pair is the tokenizer's chat template over a user turn (the prompt) and an
    assistant turn (the response): the loss covers what follows the generation prompt, so the template's
    own end-of-turn token takes the place of EOS. A too-long pair gives up prompt tokens first (it keeps at
    least the first one), because the response is what the loss, and so the importance scores, are measured
    on. `where` names the sample in errors.
    """
    check_seq_len(seq_len)
    if sample.messages is not None:  # a conversation: always through the chat template
        encoded = encode_messages(sample, tokenizer, seq_len, where)
    elif not sample.is_pair:
        if chat_template:
            raise TloraError(
                f"{where} is plain text, but a chat template needs a user turn and an assistant turn; "
                "drop --chat-template, or give prompt/response samples"
            )
        ids = _ids(tokenizer, sample.text, add_special_tokens=True, limit=seq_len)
        encoded = EncodedSample(ids[:seq_len], ids[:seq_len], truncated=len(ids) > seq_len)
    else:
        prompt, response = (
            _chat_pair(tokenizer, sample, where) if chat_template else _plain_pair(tokenizer, sample, seq_len)
        )
        truncated = len(prompt) + len(response) > seq_len
        if truncated:
            response = response[: seq_len - min(1, len(prompt))]
            prompt = prompt[: seq_len - len(response)]
        encoded = EncodedSample(prompt + response, [IGNORE_INDEX] * len(prompt) + response, truncated)
    # The model predicts position t from the tokens before it, so a label at position 0 never counts.
    if all(label == IGNORE_INDEX for label in encoded.labels[1:]):
        raise TloraError(
            f"{where} encodes to {len(encoded.input_ids)} token(s), which leaves nothing to predict; "
            "make it longer or remove it"
        )
    return encoded


def _plain_pair(tokenizer: Any, sample: Sample, seq_len: int | None = None) -> tuple[list[int], list[int]]:
    if tokenizer.eos_token_id is None:
        raise TloraError(
            "the tokenizer has no EOS token, which ends every prompt/response sample; "
            "use a tokenizer that defines eos_token, or give plain 'text' samples"
        )
    prompt = _ids(tokenizer, sample.prompt, add_special_tokens=True, limit=seq_len)
    return prompt, [*_ids(tokenizer, sample.response, add_special_tokens=False, limit=seq_len), tokenizer.eos_token_id]


def _chat_pair(tokenizer: Any, sample: Sample, where: str) -> tuple[list[int], list[int]]:
    """(the user turn up to the assistant's header, the assistant turn), as TRL's SFTTrainer splits a
    prompt/completion conversation: the whole conversation must start with the prompt's tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise TloraError("the tokenizer has no chat template; drop --chat-template, or use --template instead")
    user = [{"role": "user", "content": sample.prompt}]
    prompt = chat_ids(tokenizer, user, where, add_generation_prompt=True)
    whole = chat_ids(tokenizer, [*user, {"role": "assistant", "content": sample.response}], where)
    if whole[: len(prompt)] != prompt or len(whole) == len(prompt):
        raise TloraError(
            f"{where}: the tokenizer's chat template does not render the conversation as the user turn plus an "
            "assistant turn, so the loss cannot be put on the assistant turn alone; drop --chat-template and "
            "use --template instead"
        )
    return prompt, whole[len(prompt) :]


# Characters tokenized per token still needed, at first: a token rarely spans more than a few characters.
_CHARS_PER_TOKEN = 16
# Tokens past the limit a prefix must give before its first `limit` are trusted: cutting the text can change
# only the tokens at the cut.
_MARGIN = 32


def _ids(tokenizer: Any, text: str | None, add_special_tokens: bool, limit: int | None = None) -> list[int]:
    """The token ids of `text`; with `limit`, only as many as needed to know the first `limit` and whether
    there are more (limit + 1 of them at most): a 17 MB line is never tokenized whole for 64 tokens."""
    if text is not None and limit is not None:
        chars = max(4096, _CHARS_PER_TOKEN * (limit + _MARGIN))
        while chars < len(text):
            ids = _all_ids(tokenizer, text[:chars], add_special_tokens)
            if len(ids) > limit + _MARGIN:
                return ids[: limit + 1]
            chars *= 4
    return _all_ids(tokenizer, text, add_special_tokens)


def _all_ids(tokenizer: Any, text: str | None, add_special_tokens: bool) -> list[int]:
    # verbose=False: we truncate ourselves, so the "longer than model_max_length" warning is noise.
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])
