"""The datasets `--data NAME` knows: hub id, config, split, fields and the prompt template people train with.

Each template is copied from the training code cited beside it, because the calibration statistics are only
as task-aware as the samples are faithful to what the trainer will feed the model. Where that code differs
from SPEC.md's encoding (one tokenization of prompt + response, the EOS written as text), SPEC.md wins; the
differences are listed in docs/datasets.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .records import RecordFormat

_ALPACA_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
_ALPACA_INPUT_HEAD = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
# tatsu-lab/stanford_alpaca train.py, PROMPT_DICT["prompt_no_input"] and ["prompt_input"].
ALPACA = _ALPACA_HEAD + "### Instruction:\n{instruction}\n\n### Response:"
ALPACA_INPUT = _ALPACA_INPUT_HEAD + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"


def alpaca_over(field: str) -> str:
    """The Alpaca no-input prompt with another field as the instruction (MetaMath: 'query')."""
    return ALPACA.replace("{instruction}", "{" + field + "}")


def wikitext_articles(rows: Iterable[Mapping]) -> list[dict]:
    """wikitext stores one line per row ('' between paragraphs, ' = Title = ' opening each article, ' = = Section
    = = ' inside one): join each article's non-empty lines into one document, so a sample reads like a page."""
    articles: list[list[str]] = []
    for row in rows:
        line = row["text"] or ""
        if not line.strip():
            continue
        if not articles or (line.startswith(" = ") and not line.startswith(" = = ")):
            articles.append([])
        articles[-1].append(line)
    return [{"text": "".join(lines)} for lines in articles]


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset. `configs` are concatenated (MATH has one per subject); () is the default config.

    `group` turns the split's rows into the records that become samples (wikitext: lines into articles);
    it needs the whole split, so such a set is never streamed.
    """

    name: str
    hub_id: str
    configs: tuple[str, ...]
    split: str
    format: RecordFormat
    source: str
    streaming: bool = False
    group: Callable[[Iterable[Mapping]], list[dict]] | None = None

    def row(self) -> dict[str, str]:
        """What `tlora data list` shows."""
        return {
            "name": self.name,
            "hub id": self.hub_id,
            "config": ", ".join(self.configs) or "default",
            "split": self.split + (" (streamed)" if self.streaming else ""),
            "fields": ", ".join(self.format.fields),
            "template source": self.source,
        }


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "metamath",
            "meta-math/MetaMathQA",
            (),
            "train",
            # TLoRA's math_train.py (github.com/Rambo-Yi/TLora): PROMPT.format_map(instruction=query) and the
            # target f"{response}\n{eos_token}". MetaMath's own train_math.py uses the same prompt over
            # 'query' with no newline before EOS.
            RecordFormat(template=alpaca_over("query"), response_field="response", response_suffix="\n"),
            "TLoRA math_train.py (Alpaca prompt over 'query'; response + newline + EOS)",
        ),
        DatasetSpec(
            "gsm8k",
            "openai/gsm8k",
            ("main",),
            "train",
            # openai/grade-school-math, grade_school_math/dataset.py: question + "\n", then answer + EOS.
            RecordFormat(template="{question}\n", response_field="answer"),
            "openai/grade-school-math dataset.py (question + newline; answer + EOS)",
        ),
        DatasetSpec(
            "math",
            # hendrycks/competition_math was taken down (DMCA, January 2025); EleutherAI's re-upload, used by
            # lm-evaluation-harness, keeps the fields and splits, one config per subject.
            "EleutherAI/hendrycks_math",
            (
                "algebra",
                "counting_and_probability",
                "geometry",
                "intermediate_algebra",
                "number_theory",
                "prealgebra",
                "precalculus",
            ),
            "train",
            # hendrycks/math, modeling/dataset/MATH.py, mode 'full': "\nQUESTION:\n" + problem, then
            # "\nFULL SOLUTION:\n" (both without loss), then solution + EOS.
            RecordFormat(template="\nQUESTION:\n{problem}\nFULL SOLUTION:\n", response_field="solution"),
            "hendrycks/math modeling/dataset/MATH.py ('full' mode; solution + EOS)",
        ),
        DatasetSpec(
            "code-feedback",
            "m-a-p/CodeFeedback-Filtered-Instruction",
            (),
            "train",
            # TLoRA's code_train.py: the Alpaca prompt over 'query', target f"{answer}\n{eos_token}".
            RecordFormat(template=alpaca_over("query"), response_field="answer", response_suffix="\n"),
            "TLoRA code_train.py (Alpaca prompt over 'query'; answer + newline + EOS)",
        ),
        DatasetSpec(
            "wizardlm",
            # The WizardLM org was renamed WizardLMTeam in 2024; this is the 70k evol-instruct set.
            "WizardLMTeam/WizardLM_evol_instruct_70k",
            (),
            "train",
            # TLoRA's chat_train.py: the Alpaca prompt over 'instruction', target f"{output}\n{eos_token}".
            RecordFormat(template=ALPACA, response_field="output", response_suffix="\n"),
            "TLoRA chat_train.py (Alpaca prompt; output + newline + EOS)",
        ),
        DatasetSpec(
            "alpaca",
            "tatsu-lab/alpaca",
            (),
            "train",
            # tatsu-lab/stanford_alpaca train.py: prompt_input when 'input' is filled, else prompt_no_input;
            # target f"{output}{eos_token}".
            RecordFormat(template=ALPACA, input_template=ALPACA_INPUT, response_field="output"),
            "stanford_alpaca train.py (the two Alpaca prompts; output + EOS)",
        ),
        DatasetSpec(
            "commonsense170k",
            # LLM-Adapters' commonsense_170k.json on the hub; 'answer' (the bare label) is not trained on.
            "zwhe99/commonsense_170k",
            (),
            "train",
            # LLM-Adapters finetune.py generate_prompt (copied by TLoRA's commonsense_train.py): the Alpaca
            # prompts with the output on the line after "### Response:", loss on the output + EOS. Their
            # f-string also carries its source indentation (and, in LLM-Adapters, a "noqa: E501" comment) into the
            # prompt; that whitespace is an accident of the code and is not reproduced.
            RecordFormat(template=ALPACA + "\n", input_template=ALPACA_INPUT + "\n", response_field="output"),
            "LLM-Adapters finetune.py (Alpaca prompts, output on its own line; output + EOS)",
        ),
        DatasetSpec(
            "wikitext",
            "Salesforce/wikitext",
            ("wikitext-2-raw-v1",),
            "train",
            RecordFormat(text_field="text"),
            "plain text, one article per sample; loss on every token",
            group=wikitext_articles,
        ),
        DatasetSpec(
            "c4",
            "allenai/c4",
            ("en",),
            "train",
            RecordFormat(text_field="text"),
            "plain text, one web page per sample; loss on every token",
            streaming=True,
        ),
    )
}


def list_datasets() -> list[dict[str, str]]:
    """The rows of `tlora data list`, in registry order."""
    return [spec.row() for spec in REGISTRY.values()]
