"""A tiny real BPE tokenizer trained on the spot, so tests need no download and run in milliseconds."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = [
    "Question: Mia buys 3 packs of 12 pencils. How many pencils does she have?",
    "Answer: She has 3 * 12 = 36 pencils.\n#### 36",
    "The quick brown fox jumps over the lazy dog.",
    "A train travels 60 miles per hour for 2 hours, so it covers 60 * 2 = 120 miles.",
    "Hello world, this is a small calibration corpus for the tokenizer tests.",
]


def make_tokenizer(add_bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE (~300 tokens) that prepends "<s>" like Llama-style tokenizers.

    `add_bos=False` drops the post-processor and `eos=False` leaves the EOS token unset, for the
    edge cases the data layer must reject.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        show_progress=False,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", bos_id)]
        )
    if eos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
