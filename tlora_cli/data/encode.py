"""Tokenization and loss masks exactly as SPEC.md ("Terms") fixes them, so that every command agrees."""

from __future__ import annotations

from typing import Any

from ..errors import TloraError
from .samples import EncodedSample, Sample

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and so every HF model) skips


def check_seq_len(seq_len: int) -> None:
    """A loss needs one token to condition on and one to predict."""
    if seq_len < 2:
        raise TloraError(f"the sequence length must be at least 2 tokens, got {seq_len}; ask for 2 or more")


def encode_sample(sample: Sample, tokenizer: Any, seq_len: int, *, where: str = "a sample") -> EncodedSample:
    """Text: every token is a target. Pair: prompt + response + EOS, loss on the response and EOS only.

    A too-long pair gives up prompt tokens first (it keeps at least the first one), because the
    response is what the loss, and so the importance scores, are measured on. `where` names the
    sample in errors.
    """
    check_seq_len(seq_len)
    if not sample.is_pair:
        ids = _ids(tokenizer, sample.text, add_special_tokens=True)
        encoded = EncodedSample(ids[:seq_len], ids[:seq_len], truncated=len(ids) > seq_len)
    else:
        if tokenizer.eos_token_id is None:
            raise TloraError(
                "the tokenizer has no EOS token, which ends every prompt/response sample; "
                "use a tokenizer that defines eos_token, or give plain 'text' samples"
            )
        prompt = _ids(tokenizer, sample.prompt, add_special_tokens=True)
        response = [*_ids(tokenizer, sample.response, add_special_tokens=False), tokenizer.eos_token_id]
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


def _ids(tokenizer: Any, text: str | None, add_special_tokens: bool) -> list[int]:
    # verbose=False: we truncate ourselves, so the "longer than model_max_length" warning is noise.
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])
