"""Named and hub datasets, offline: each name's schema laid out as its hub repo, read through `datasets`.

Every test here runs with HF_HUB_OFFLINE and caches in a temporary folder. A hub dataset is "downloaded" by
putting a snapshot of its repo into the hub cache (as `hf download --repo-type dataset` leaves it), or by
preparing `datasets`' own Arrow cache (as a first online `load_dataset` leaves it). Expected token ids come
from tokenizing the expected strings directly, never from the code under test.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_models import make_hub_cache, use_offline_hub_cache
from tokenizer_fixture import make_tokenizer

from tlora_cli.data import (
    REGISTRY,
    DataOptions,
    datasets_plain,
    datasets_table,
    list_datasets,
    load_calibration_set,
    samples_plain,
    samples_text,
    show_samples,
)
from tlora_cli.data import sources as sources_module
from tlora_cli.data.hub import STREAM_BUFFER, Split
from tlora_cli.errors import TloraError

HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n"
)
INPUT_HEAD = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n"
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MATH_SUBJECTS = [
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
]


# --- an offline machine with a hub cache ---------------------------------------------------------------------


def offline(mp: pytest.MonkeyPatch, root: Path) -> Path:
    """HF_HUB_OFFLINE with empty hub and datasets caches under `root`; returns the hub cache."""
    use_offline_hub_cache(mp, root / "hub")
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "datasets")
    mp.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", root / "datasets" / "downloads")
    mp.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", root / "datasets" / "downloads" / "extracted")
    return root / "hub"


@pytest.fixture(scope="module", autouse=True)
def hub_cache(tmp_path_factory) -> Path:
    """Every test in this module is offline; the snapshots put here live for the module."""
    with pytest.MonkeyPatch.context() as mp:
        yield offline(mp, tmp_path_factory.mktemp("hf"))


@pytest.fixture
def empty_machine(monkeypatch, tmp_path) -> Path:
    """Offline with nothing cached at all (overrides the module's caches for one test)."""
    return offline(monkeypatch, tmp_path)


def put_snapshot(hub: Path, repo_id: str, files: dict[str, bytes], workdir: Path) -> str:
    """Lay the repo `files` out in the hub cache as a dataset snapshot; returns its commit."""
    repo = workdir / repo_id.replace("/", "--")
    for name, data in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    snapshot = make_hub_cache(repo, hub, repo_id)  # lays out a model repo: rename it to the dataset repo it is
    target = hub / f"datasets--{repo_id.replace('/', '--')}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(hub / f"models--{repo_id.replace('/', '--')}", target)
    return snapshot.name


def put_arrow_cache(cache: Path, repo_id: str, config: str, rows: list[dict], workdir: Path) -> None:
    """Prepare `datasets`' Arrow cache for (repo_id, config, train) where an online load_dataset leaves it:
    HF_DATASETS_CACHE/<org>___<name>/<config>/<version>/<commit>/."""
    from datasets.packaged_modules.json.json import Json

    data = workdir / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = repo_id.split("/")[1]
    builder = Json(cache_dir=str(workdir / "build"), dataset_name=name, config_name=config, data_files=[str(data)])
    builder.download_and_prepare()
    org = repo_id.split("/")[0]
    target = cache / f"{org}___{builder.dataset_name}" / config / "0.0.0" / "0123456789abcdef"
    shutil.copytree(builder.cache_dir, target)


def readme(configs: dict[str, dict[str, str]]) -> bytes:
    """A dataset card whose YAML names the data files of each config and split, as hub repos do."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, path in splits.items():
            lines += [f"  - split: {split}", f"    path: {path}"]
    return ("\n".join([*lines, "---", "", "# test dataset", ""])).encode()


def parquet(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def assert_one_line(exc: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)


# --- tokenizers and expected encodings -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHATML
    return tokenizer


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special).input_ids


def expect_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """SPEC.md: prompt (with special tokens) + response + EOS, loss on the response and EOS."""
    p, r = ids(tokenizer, prompt), [*ids(tokenizer, response, special=False), tokenizer.eos_token_id]
    return p + r, [-100] * len(p) + r


def expect_chat(tokenizer, user: str, assistant: str) -> tuple[list[int], list[int]]:
    """ChatML rendered by hand: loss on everything after the assistant header."""
    prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    p = ids(tokenizer, prompt, special=False)
    whole = ids(tokenizer, prompt + assistant + "<|im_end|>\n", special=False)
    assert whole[: len(p)] == p
    return whole, [-100] * len(p) + whole[len(p) :]


def expect_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    t = ids(tokenizer, text)
    return t, t


def encodings(cal) -> dict[tuple[int, ...], list[int]]:
    return {tuple(s.input_ids): s.labels for s in cal.samples}


def as_map(*encoded: tuple[list[int], list[int]]) -> dict[tuple[int, ...], list[int]]:
    return {tuple(input_ids): labels for input_ids, labels in encoded}


# --- each name's schema, as its hub repo holds it ------------------------------------------------------------


@dataclass
class Schema:
    """A named set's repo: its files, its records, and what each record must encode to (plain and chat)."""

    files: dict[str, bytes]
    rows: list[dict]
    plain: Any  # row -> ("pair", prompt, response) or ("text", text)
    chat: Any = None  # row -> (user, assistant); None for plain-text sets


MATH_ROWS = {
    subject: [
        {
            "problem": f"What is {i} + {i}? ({subject})",
            "level": "Level 1",
            "type": subject,
            "solution": f"$\\boxed{{{2 * i}}}$",
        }
        for i in (1, 2)
    ]
    for subject in MATH_SUBJECTS
}
METAMATH = [
    {
        "type": "GSM_Rephrased",
        "query": "Mia buys 3 packs of 12 pencils. How many?",
        "original_question": "x",
        "response": "She has 3 * 12 = 36 pencils.\nThe answer is: 36",
    },
    {
        "type": "MATH_AnsAug",
        "query": "What is 60 * 2?",
        "original_question": "y",
        "response": "60 * 2 = 120.\nThe answer is: 120",
    },
]
GSM8K = [
    {"question": "A train travels 60 miles per hour for 2 hours. How far?", "answer": "60 * 2 = 120\n#### 120"},
    {"question": "Mia has 3 packs of 12 pencils. How many?", "answer": "3 * 12 = 36\n#### 36"},
]
CODE = [
    {
        "query": "Write hello world in Python.",
        "answer": "```python\nprint('Hello world')\n```",
        "resource": "r",
        "lang": "python",
    },
    {"query": "Say hello.", "answer": "Hello world, this is the answer.", "resource": "r", "lang": "python"},
]
WIZARD = [
    {"instruction": "Say hello to the world.", "output": "Hello world, this is the answer."},
    {"instruction": "What does the fox do?", "output": "The quick brown fox jumps over the lazy dog."},
]
ALPACA_ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello world.", "text": "ignored"},
    {"instruction": "Count the pencils.", "input": "3 packs of 12", "output": "36 pencils.", "text": "ignored"},
]
COMMONSENSE = [
    {
        "instruction": "Please answer the following question with true or false, question: is the fox quick?\n\n"
        "Answer format: true/false",
        "input": "",
        "output": "the correct answer is true",
        "answer": "true",
    },
    {
        "instruction": "Please choose the correct solution.",
        "input": "Solution1: jump Solution2: sit",
        "output": "the correct answer is solution1",
        "answer": "solution1",
    },
]
WIKI_LINES = ["", " = Alpha = \n", "", " Alpha is a letter . \n", "", " = = History = = \n", "", " It was used . \n"]
WIKI_LINES += ["", " = Beta = \n", "", " Beta follows alpha . \n", ""]
WIKI_ARTICLES = [
    " = Alpha = \n Alpha is a letter . \n = = History = = \n It was used . \n",
    " = Beta = \n Beta follows alpha . \n",
]
C4_SHARDS = [
    [
        {"text": f"Shard {s} page {i}: the quick brown fox.", "timestamp": "2019-04-25T12:57:54Z", "url": "u"}
        for i in range(3)
    ]
    for s in range(2)
]


def _alpaca_prompt(row: dict, extra: str = "") -> str:
    if row["input"]:
        return f"{INPUT_HEAD}{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:{extra}"
    return f"{HEAD}{row['instruction']}\n\n### Response:{extra}"


def _alpaca_user(row: dict) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")


SCHEMAS: dict[str, Schema] = {
    "metamath": Schema(
        {"MetaMathQA-395K.json": json.dumps(METAMATH).encode()},
        METAMATH,
        lambda r: ("pair", f"{HEAD}{r['query']}\n\n### Response:", r["response"] + "\n"),
        lambda r: (r["query"], r["response"]),
    ),
    "gsm8k": Schema(
        {
            "README.md": readme({"main": {"train": "main/train-*"}, "socratic": {"train": "socratic/train-*"}}),
            "main/train-00000-of-00001.parquet": parquet(GSM8K),
            "socratic/train-00000-of-00001.parquet": parquet([{"question": "wrong config", "answer": "no"}]),
        },
        GSM8K,
        lambda r: ("pair", r["question"] + "\n", r["answer"]),
        lambda r: (r["question"], r["answer"]),
    ),
    "math": Schema(
        {
            "README.md": readme({s: {"train": f"{s}/train-*", "test": f"{s}/test-*"} for s in MATH_SUBJECTS}),
            **{f"{s}/train-00000-of-00001.parquet": parquet(MATH_ROWS[s]) for s in MATH_SUBJECTS},
            **{f"{s}/test-00000-of-00001.parquet": parquet(MATH_ROWS[s][:1]) for s in MATH_SUBJECTS},
        },
        [row for s in MATH_SUBJECTS for row in MATH_ROWS[s]],
        lambda r: ("pair", f"\nQUESTION:\n{r['problem']}\nFULL SOLUTION:\n", r["solution"]),
        lambda r: (r["problem"], r["solution"]),
    ),
    "code-feedback": Schema(
        {"CodeFeedback-Filtered-Instruction.jsonl": jsonl(CODE)},
        CODE,
        lambda r: ("pair", f"{HEAD}{r['query']}\n\n### Response:", r["answer"] + "\n"),
        lambda r: (r["query"], r["answer"]),
    ),
    "wizardlm": Schema(
        {"alpaca_evol_instruct_70k.json": json.dumps(WIZARD).encode()},
        WIZARD,
        lambda r: ("pair", f"{HEAD}{r['instruction']}\n\n### Response:", r["output"] + "\n"),
        lambda r: (r["instruction"], r["output"]),
    ),
    "alpaca": Schema(
        {"data/train-00000-of-00001-a09b74b3ef9c3b56.parquet": parquet(ALPACA_ROWS)},
        ALPACA_ROWS,
        lambda r: ("pair", _alpaca_prompt(r), r["output"]),
        lambda r: (_alpaca_user(r), r["output"]),
    ),
    "commonsense170k": Schema(
        {"commonsense_170k.json": json.dumps(COMMONSENSE).encode()},
        COMMONSENSE,
        lambda r: ("pair", _alpaca_prompt(r, "\n"), r["output"]),
        lambda r: (_alpaca_user(r), r["output"]),
    ),
    "wikitext": Schema(
        {
            "README.md": readme({"wikitext-2-raw-v1": {"train": "wikitext-2-raw-v1/train-*"}}),
            "wikitext-2-raw-v1/train-00000-of-00001.parquet": parquet([{"text": line} for line in WIKI_LINES]),
        },
        [{"text": article} for article in WIKI_ARTICLES],
        lambda r: ("text", r["text"]),
    ),
    "c4": Schema(
        {
            "README.md": readme({"en": {"train": "en/c4-train.*.json.gz", "validation": "en/c4-validation.*"}}),
            **{f"en/c4-train.0000{s}-of-01024.json.gz": gzip.compress(jsonl(rows)) for s, rows in enumerate(C4_SHARDS)},
            "en/c4-validation.00000-of-00008.json.gz": gzip.compress(jsonl([{"text": "valid", "url": ""}])),
        },
        [row for rows in C4_SHARDS for row in rows],
        lambda r: ("text", r["text"]),
    ),
}


@pytest.fixture(scope="module")
def snapshots(hub_cache, tmp_path_factory) -> dict[str, str]:
    """Every named set "downloaded" into the module's hub cache; their commits, by name."""
    work = tmp_path_factory.mktemp("repos")
    return {name: put_snapshot(hub_cache, REGISTRY[name].hub_id, s.files, work) for name, s in SCHEMAS.items()}


def expected(tokenizer, schema: Schema, chat: bool) -> dict[tuple[int, ...], list[int]]:
    out = {}
    for row in schema.rows:
        if chat:
            input_ids, labels = expect_chat(tokenizer, *schema.chat(row))
        else:
            kind, *parts = schema.plain(row)
            input_ids, labels = (expect_pair if kind == "pair" else expect_text)(tokenizer, *parts)
        out[tuple(input_ids)] = labels
    return out


def test_every_name_has_a_schema_test() -> None:
    assert set(SCHEMAS) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_named_set_exact_tokens(name: str, snapshots, tok) -> None:
    schema = SCHEMAS[name]
    cal = load_calibration_set(name, tok, 100, 512, seed=0)
    assert encodings(cal) == expected(tok, schema, chat=False)
    assert len(cal.samples) == cal.num_available == len(schema.rows)
    assert cal.source == name
    spec = REGISTRY[name]
    assert cal.provenance["hub_id"] == spec.hub_id
    assert cal.provenance["revision"] == snapshots[name]
    assert cal.provenance["streaming"] == spec.streaming


@pytest.mark.parametrize("name", sorted(n for n, s in SCHEMAS.items() if s.chat))
def test_named_set_exact_tokens_chat(name: str, snapshots, chat_tok) -> None:
    cal = load_calibration_set(DataOptions(name, chat_template=True), chat_tok, 100, 512, seed=0)
    assert encodings(cal) == expected(chat_tok, SCHEMAS[name], chat=True)
    assert cal.provenance["chat_template"] is True


@pytest.mark.parametrize("name", ["wikitext", "c4"])
def test_plain_text_sets_refuse_a_chat_template(name: str, snapshots, chat_tok) -> None:
    with pytest.raises(TloraError) as exc:
        load_calibration_set(DataOptions(name, chat_template=True), chat_tok, 2, 64, 0)
    assert_one_line(exc, "plain text", "--chat-template")


def test_seeded_order_of_a_hub_set(snapshots, tok) -> None:
    """Same seed, same samples in the same order; the picks are the first N of a seeded shuffle."""
    rows = SCHEMAS["math"].rows
    a = load_calibration_set("math", tok, 5, 512, seed=3)
    assert [s.input_ids for s in a.samples] == [
        s.input_ids for s in load_calibration_set("math", tok, 5, 512, 3).samples
    ]
    assert a.samples != load_calibration_set("math", tok, 5, 512, seed=4).samples
    by_ids = {tuple(ids): i for i, ids in enumerate(expected(tok, SCHEMAS["math"], chat=False))}
    order = list(range(len(rows)))
    random.Random(3).shuffle(order)
    assert [by_ids[tuple(s.input_ids)] for s in a.samples] == order[:5]
    assert a.wheres == [f"math: record {i + 1}" for i in order[:5]]
    assert a.num_available == len(rows)


# --- offline ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "parts"),
    [
        (
            "metamath",
            ["'meta-math/MetaMathQA'", "HF_HUB_OFFLINE=1", "hf download meta-math/MetaMathQA", "metamath=DIR"],
        ),
        ("acme/qa", ["'acme/qa'", "hf download acme/qa --repo-type dataset", "--data DIR"]),
    ],
)
def test_offline_and_not_cached(empty_machine, tok, data: str, parts: list[str]) -> None:
    with pytest.raises(TloraError) as exc:
        load_calibration_set(data, tok, 4, 64, 0)
    assert_one_line(exc, "cannot reach the Hugging Face Hub", "no copy of it is cached", *parts)


def test_offline_with_an_incomplete_snapshot(empty_machine, tok, tmp_path) -> None:
    """A README alone (what reading the card online leaves) is not a cached copy."""
    put_snapshot(empty_machine, "openai/gsm8k", {"README.md": SCHEMAS["gsm8k"].files["README.md"]}, tmp_path)
    with pytest.raises(TloraError) as exc:
        load_calibration_set("gsm8k", tok, 4, 64, 0)
    assert_one_line(exc, "'openai/gsm8k'", "no copy of it is cached")


def test_offline_from_datasets_arrow_cache(empty_machine, tok, tmp_path) -> None:
    """What a first online run leaves in HF_DATASETS_CACHE is enough: `datasets` finds it by itself."""
    put_arrow_cache(datasets.config.HF_DATASETS_CACHE, "openai/gsm8k", "main", GSM8K, tmp_path)
    cal = load_calibration_set("gsm8k", tok, 10, 512, 0)
    assert encodings(cal) == expected(tok, SCHEMAS["gsm8k"], chat=False)
    assert cal.provenance["revision"] == "0123456789abcdef"
    with pytest.raises(TloraError) as exc:  # another config is not cached
        load_calibration_set(DataOptions("gsm8k", config="socratic"), tok, 10, 512, 0)
    assert_one_line(exc, "no copy of it is cached")


# --- streaming ---------------------------------------------------------------------------------------------------


def test_streaming_reads_only_the_buffer_and_the_picks(monkeypatch, tok) -> None:
    read = []

    def pages():
        for i in range(100_000):
            read.append(i)
            yield {"text": f"Page {i} about the quick brown fox.", "url": "u"}

    stream = datasets.IterableDataset.from_generator(pages)
    monkeypatch.setattr(sources_module, "open_split", lambda *args: Split(stream, True, "abc", None))
    cal = load_calibration_set("acme/web", tok, 4, 64, seed=0)
    assert len(cal.samples) == 4 and len(read) <= STREAM_BUFFER + 4
    assert cal.wheres[0].startswith("acme/web: streamed record ")
    assert cal.provenance["streaming"] is True and cal.num_available == 4
    first = [s.input_ids for s in cal.samples]
    read.clear()
    assert [s.input_ids for s in load_calibration_set("acme/web", tok, 4, 64, seed=0).samples] == first
    assert [s.input_ids for s in load_calibration_set("acme/web", tok, 4, 64, seed=1).samples] != first


def test_c4_is_streamed_and_shuffled(snapshots, tok) -> None:
    cal = load_calibration_set("c4", tok, 3, 512, seed=0)
    assert cal.provenance["streaming"] is True
    assert all(w.startswith("c4: streamed record ") for w in cal.wheres)
    texts = {tuple(ids(tok, r["text"])) for r in SCHEMAS["c4"].rows}
    assert {tuple(s.input_ids) for s in cal.samples} <= texts


def test_streaming_a_regrouped_set_is_refused(snapshots, tok) -> None:
    with pytest.raises(TloraError) as exc:
        load_calibration_set(DataOptions("wikitext", streaming=True), tok, 2, 64, 0)
    assert_one_line(exc, "wikitext", "drop --streaming")


# --- any hub id, with field flags ----------------------------------------------------------------------------------

ACME_FIELDS = "(the records have 'q', 'a', 'id', 'tags')"
QA = {
    "v1": [{"q": "How many pencils?", "a": "36 pencils.", "id": 1, "tags": ["math"]}],
    "v2": [
        {"q": "How far does the train go?", "a": "120 miles.", "id": 2},
        {"q": "Hello?", "a": "", "id": 3},
        {"q": " ", "a": "An answer without a question.", "id": 4},
    ],
}


@pytest.fixture(scope="module")
def acme(hub_cache, tmp_path_factory) -> str:
    files = {
        "README.md": readme({c: {"train": f"{c}/train-*", "validation": f"{c}/validation-*"} for c in QA}),
        **{f"{c}/train-00000-of-00001.parquet": parquet(rows) for c, rows in QA.items()},
        **{f"{c}/validation-00000-of-00001.parquet": parquet(rows[:1]) for c, rows in QA.items()},
    }
    return put_snapshot(hub_cache, "acme/qa", files, tmp_path_factory.mktemp("acme"))


def test_hub_id_with_template(acme, tok) -> None:
    options = DataOptions(
        "acme/qa", config="v2", split="validation", template="Question: {q}\nAnswer:", response_field="a"
    )
    cal = load_calibration_set(options, tok, 4, 512, 0)
    assert encodings(cal) == as_map(expect_pair(tok, "Question: How far does the train go?\nAnswer:", "120 miles."))
    assert (cal.provenance["hub_id"], cal.provenance["config"], cal.provenance["split"]) == (
        "acme/qa",
        "v2",
        "validation",
    )


def test_hub_id_with_fields_and_empty_records(acme, tok) -> None:
    """Records with an empty response, or an empty field in the prompt, are passed over and counted."""
    for flags in ({"prompt_field": "q"}, {"template": "Q: {q}"}):
        options = DataOptions("acme/qa", config="v2", response_field="a", **flags)
        cal = load_calibration_set(options, tok, 4, 512, 0)
        prompt = "Q: How far does the train go?" if "template" in flags else "How far does the train go?"
        assert encodings(cal) == as_map(expect_pair(tok, prompt, "120 miles."))
        assert cal.num_skipped == 2 and cal.num_available == 1


def test_no_usable_samples(tok, tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl([{"q": "a", "a": ""}, {"q": "b", "a": None}]))
    with pytest.raises(TloraError) as exc:
        load_calibration_set(DataOptions(str(path), prompt_field="q", response_field="a"), tok, 4, 64, 0)
    assert_one_line(exc, "no usable samples", "all 2 records")


def test_hub_id_with_text_field_and_chat(acme, tok, chat_tok) -> None:
    cal = load_calibration_set(DataOptions("acme/qa", config="v1", text_field="q"), tok, 4, 512, 0)
    assert encodings(cal) == as_map(expect_text(tok, "How many pencils?"))
    options = DataOptions("acme/qa", config="v1", template="Q: {q}", response_field="a", chat_template=True)
    cal = load_calibration_set(options, chat_tok, 4, 512, 0)
    assert encodings(cal) == as_map(expect_chat(chat_tok, "Q: How many pencils?", "36 pencils."))


@pytest.mark.parametrize(
    ("options", "parts"),
    [
        (DataOptions("acme/qa", config="v1"), ["acme/qa", "no usable fields", ACME_FIELDS, "--text-field"]),
        (DataOptions("acme/qa", config="v1", template="{question}", response_field="a"), ["'question'", ACME_FIELDS]),
        (DataOptions("acme/qa", config="v1", prompt_field="q", response_field="answer"), ["'answer'", ACME_FIELDS]),
        (DataOptions("acme/qa", config="v1", template="{q", response_field="a"), ["not a valid format string"]),
        (DataOptions("acme/qa", config="v1", template="{} {0}", response_field="a"), ["positional field"]),
        (DataOptions("acme/qa", config="v3"), ["acme/qa (config v3)", "--data-config"]),
        (DataOptions("acme/qa", text_field="q"), ["Config name is missing", "'v1', 'v2'", "--data-config"]),
        (DataOptions("acme/qa", config="v1", split="test"), ["test", "--data-split"]),
        (DataOptions("acme/qa", config="v1", text_field="tags"), ["field 'tags' must be text, got list"]),
    ],
)
def test_hub_id_errors(acme, tok, options: DataOptions, parts: list[str]) -> None:
    with pytest.raises(TloraError) as exc:
        load_calibration_set(options, tok, 4, 64, 0)
    assert_one_line(exc, *parts)
    assert acme not in str(exc.value)  # the snapshot's folder is no business of the user's


def test_named_set_with_a_new_template_or_response(snapshots, tok) -> None:
    """--template replaces the named set's prompt, its response side (field and suffix) stays; --response-field
    replaces the response side (so MetaMath's own format, without TLoRA's newline, is one flag away)."""
    cal = load_calibration_set(DataOptions("metamath", template="Q: {query}\nA:"), tok, 10, 512, 0)
    assert encodings(cal) == as_map(*(expect_pair(tok, f"Q: {r['query']}\nA:", r["response"] + "\n") for r in METAMATH))
    cal = load_calibration_set(DataOptions("metamath", response_field="response"), tok, 10, 512, 0)
    prompt = "{}{}\n\n### Response:"
    assert encodings(cal) == as_map(
        *(expect_pair(tok, prompt.format(HEAD, r["query"]), r["response"]) for r in METAMATH)
    )


# --- local copies ------------------------------------------------------------------------------------------------


def test_named_set_from_a_local_file_and_folder(snapshots, tok, tmp_path) -> None:
    """--data NAME=PATH, the advice of the offline error, gives what the hub copy gives."""
    path = tmp_path / "MetaMathQA-395K.json"
    path.write_bytes(SCHEMAS["metamath"].files["MetaMathQA-395K.json"])
    want = expected(tok, SCHEMAS["metamath"], chat=False)
    cal = load_calibration_set(f"metamath={path}", tok, 10, 512, 0)
    assert encodings(cal) == want and cal.source == f"metamath={path}"
    folder = tmp_path / "math"
    for name, data in SCHEMAS["math"].files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    assert encodings(load_calibration_set(f"math={folder}", tok, 100, 512, 0)) == expected(tok, SCHEMAS["math"], False)
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_bytes(jsonl([{"text": line} for line in WIKI_LINES]))
    assert encodings(load_calibration_set(f"wikitext={wiki}", tok, 10, 512, 0)) == expected(
        tok, SCHEMAS["wikitext"], False
    )


def test_local_dataset_folder_and_file_with_flags(tok, tmp_path) -> None:
    folder = tmp_path / "my-set"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl([{"question": "How many?", "answer": "Three."}]))
    cal = load_calibration_set(str(folder), tok, 4, 64, 0)  # fields detected from the column names
    assert encodings(cal) == as_map(expect_pair(tok, "How many?", "Three."))
    cal = load_calibration_set(
        DataOptions(str(folder / "train.jsonl"), template="Q: {question}", response_field="answer"), tok, 4, 64, 0
    )
    assert encodings(cal) == as_map(expect_pair(tok, "Q: How many?", "Three."))
    with pytest.raises(TloraError) as exc:
        load_calibration_set(
            DataOptions(str(folder / "train.jsonl"), template="{query}", response_field="answer"), tok, 4, 64, 0
        )
    assert_one_line(exc, "train.jsonl: line 1", "no field 'query'", "'question', 'answer'")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TloraError) as exc:
        load_calibration_set(str(tmp_path / "empty"), tok, 4, 64, 0)
    assert_one_line(exc, "doesn't contain any data files")


@pytest.mark.parametrize(
    ("data", "parts"),
    [
        ("metamth", ["no data file or dataset named 'metamth'", "did you mean 'metamath'?", "org/name"]),
        ("missing.jsonl", ["no data file or dataset named 'missing.jsonl'", ".jsonl"]),
        ("dir/missing.jsonl", ["'dir/missing.jsonl'"]),
        ("metamath=/no/such/file.json", ["/no/such/file.json", "no such file"]),
    ],
)
def test_unknown_data(tok, data: str, parts: list[str]) -> None:
    with pytest.raises(TloraError) as exc:
        load_calibration_set(data, tok, 4, 64, 0)
    assert_one_line(exc, *parts)


@pytest.mark.parametrize(
    ("options", "parts"),
    [
        (DataOptions(None, split="train"), ["--data-split", "give --data"]),
        (DataOptions("x.jsonl", text_field="t", template="{t}"), ["--text-field", "drop"]),
        (
            DataOptions("x.jsonl", prompt_field="p", template="{p}", response_field="r"),
            ["--template", "--prompt-field"],
        ),
        (DataOptions("acme/qa", prompt_field="q"), ["--response-field"]),
        (DataOptions("acme/qa", response_field="a"), ["--prompt-field or --template"]),
    ],
)
def test_contradictory_flags(tok, options: DataOptions, parts: list[str]) -> None:
    with pytest.raises(TloraError) as exc:
        load_calibration_set(options, tok, 4, 64, 0)
    assert_one_line(exc, *parts)


# --- chat templates ------------------------------------------------------------------------------------------------


def test_chat_template_keeps_the_response_when_truncating(snapshots, chat_tok) -> None:
    row = GSM8K[0]
    full, labels = expect_chat(chat_tok, row["question"], row["answer"])
    prompt_len = labels.count(-100)
    seq_len = len(full) - prompt_len + 2
    cal = load_calibration_set(DataOptions("gsm8k", chat_template=True), chat_tok, 10, seq_len, 0)
    sample = next(s for s in cal.samples if s.labels[2:] == full[prompt_len:])
    assert sample.input_ids == full[:2] + full[prompt_len:] and sample.truncated


def test_chat_template_errors(tok, tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl([{"prompt": "Hello?", "completion": "Hello world."}]))
    with pytest.raises(TloraError) as exc:
        load_calibration_set(DataOptions(str(path), chat_template=True), tok, 4, 64, 0)
    assert_one_line(exc, "no chat template", "--chat-template")
    odd = make_tokenizer()
    # Marks the last user turn, which is no longer last once the assistant answers: the prefix breaks.
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last and m['role'] == 'user' %}LAST {% endif %}{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %} A:{% endif %}"
    )
    with pytest.raises(TloraError) as exc:
        load_calibration_set(DataOptions(str(path), chat_template=True), odd, 4, 64, 0)
    assert_one_line(exc, f"{path}: line 1", "assistant turn alone", "--template")
    odd.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TloraError) as exc:
        load_calibration_set(DataOptions(str(path), chat_template=True), odd, 4, 64, 0)
    assert_one_line(exc, "chat template failed", "roles must alternate")


# --- data show / data list / the rank warning ------------------------------------------------------------------------


def test_show_samples(snapshots, tok) -> None:
    cal, shown = show_samples("gsm8k", tok, count=2, seq_len=512, seed=0)
    assert len(shown) == 2 and cal.source == "gsm8k"
    for sample in shown:
        prompt_len = sample.labels.count(-100)
        assert sample.context_text == tok.decode(sample.input_ids[:prompt_len])
        assert sample.loss_text == tok.decode(sample.input_ids[prompt_len:])
        assert sample.loss_text.endswith("</s>") and sample.context_text.startswith("<s>")
        assert sample.num_loss_tokens == len(sample.input_ids) - prompt_len
    plain = samples_plain(cal, shown)
    assert plain.splitlines()[0].startswith("2 samples from gsm8k: ")
    assert plain.count("--- loss ---") == 2 and plain.count("--- context (no loss) ---") == 2
    assert f"=== {shown[0].where}: {shown[0].num_tokens} tokens, {shown[0].num_loss_tokens} carry the loss" in plain
    text = samples_text(cal, shown)
    styled = {text.plain[span.start : span.end] for span in text.spans if span.style == "bold green"}
    assert {s.loss_text for s in shown} <= styled and "carries the loss" in styled
    assert shown[0].context_text in {text.plain[s.start : s.end] for s in text.spans if s.style == "dim"}


def test_show_plain_text_has_no_context_part(snapshots, tok) -> None:
    cal, shown = show_samples("wikitext", tok, count=1)
    assert shown[0].context_text == "" and "--- context" not in samples_plain(cal, shown)


def test_list_datasets() -> None:
    rows = list_datasets()
    assert [r["name"] for r in rows] == list(REGISTRY)
    by_name = {r["name"]: r for r in rows}
    assert by_name["metamath"]["hub id"] == "meta-math/MetaMathQA"
    assert by_name["gsm8k"]["config"] == "main" and by_name["c4"]["split"] == "train (streamed)"
    assert by_name["math"]["fields"] == "problem, solution"
    assert by_name["alpaca"]["fields"] == "instruction, input, output"
    assert "TLoRA" in by_name["code-feedback"]["template source"]
    assert datasets_table().row_count == len(REGISTRY)
    lines = datasets_plain().splitlines()
    assert lines[0].split("\t") == list(rows[0]) and len(lines) == len(REGISTRY) + 1


def test_rank_warning() -> None:
    from tlora_cli.calib.statistics import Statistics

    def stats(tokens: int) -> Statistics:
        return Statistics(targets=[], input_of={}, tensors={}, scores={}, num_samples=1, num_tokens=tokens)

    assert stats(64).rank_warning(64) is None
    message = stats(40).rank_warning(64)
    assert "40 tokens" in message and "rank 64" in message and "\n" not in message
