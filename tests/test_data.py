"""The calibration-data layer: file formats, the SPEC.md tokenization contract, errors, selection."""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import json
import operator
import random
import re
import sys
from fractions import Fraction
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizer_fixture import make_tokenizer

from tlora_cli.data import (
    CalibrationSet,
    EncodedSample,
    Sample,
    builtin_samples,
    encode_sample,
    load_calibration_set,
    read_samples,
)
from tlora_cli.errors import TloraError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import math_problems  # the generator of the shipped set lives with the benchmarks

RECORDS = [
    {"text": "The quick brown fox."},
    {"question": "How many?", "answer": "Three."},
    {"text": "Second text\nwith two lines."},
]
EXPECTED = [
    Sample(text="The quick brown fox."),
    Sample(prompt="How many?", response="Three."),
    Sample(text="Second text\nwith two lines."),
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special).input_ids


def write(path: Path, data: bytes) -> Path:
    """Write `data`, gzip-compressed when the name says .gz."""
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def csv_bytes(records: list[dict]) -> bytes:
    fields = sorted({k for r in records for k in r})
    lines = [",".join(fields)]
    for r in records:
        lines.append(",".join('"' + r.get(k, "").replace('"', '""') + '"' for k in fields))
    return ("\n".join(lines) + "\n").encode()


def parquet_bytes(records: list[dict]) -> bytes:
    schema = pa.schema([(k, pa.string()) for k in sorted({k for r in records for k in r})])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records, schema=schema), sink)
    return sink.getvalue().to_pybytes()


ENCODERS = {
    "jsonl": lambda recs: "".join(json.dumps(r) + "\n" for r in recs).encode(),
    "json": lambda recs: json.dumps(recs).encode(),
    "csv": csv_bytes,
    "parquet": parquet_bytes,
}


# --- reading files -----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", ["", ".gz"])
@pytest.mark.parametrize("fmt", sorted(ENCODERS))
def test_read_every_format(tmp_path: Path, fmt: str, gz: str) -> None:
    path = write(tmp_path / f"data.{fmt}{gz}", ENCODERS[fmt](RECORDS))
    assert read_samples(path) == EXPECTED


@pytest.mark.parametrize("key", ["data", "train"])
def test_read_json_wrapped_list(tmp_path: Path, key: str) -> None:
    path = write(tmp_path / "d.json", json.dumps({key: RECORDS, "meta": 1}).encode())
    assert read_samples(path) == EXPECTED


@pytest.mark.parametrize("gz", ["", ".gz"])
def test_read_txt_paragraphs(tmp_path: Path, gz: str) -> None:
    text = "First para\nstill first.\n\n  \nSecond para.\n\n\nThird.\n"
    path = write(tmp_path / f"d.txt{gz}", text.encode())
    assert read_samples(path) == [
        Sample(text="First para\nstill first."),
        Sample(text="Second para."),
        Sample(text="Third."),
    ]


def test_read_txt_without_blank_lines_is_one_sample_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.TXT", "\ufeffone\r\ntwo\nthree".encode())
    assert read_samples(path) == [Sample(text="one"), Sample(text="two"), Sample(text="three")]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"query": "q", "response": "r"}, Sample(prompt="q", response="r")),
        ({"question": "q", "answer": "a"}, Sample(prompt="q", response="a")),
        ({"instruction": "i", "output": "o"}, Sample(prompt="i", response="o")),
        ({"instruction": "i", "input": "x", "output": "o"}, Sample(prompt="i\n\nx", response="o")),
        ({"instruction": "i", "input": " ", "output": "o"}, Sample(prompt="i", response="o")),
        ({"instruction": "i", "input": None, "output": "o"}, Sample(prompt="i", response="o")),
        ({"prompt": "p", "completion": " c"}, Sample(prompt="p", response=" c")),
        # Precedence: text first, then the pairs in the documented order.
        ({"text": "t", "prompt": "p", "completion": "c"}, Sample(text="t")),
        ({"question": "q", "answer": "a", "prompt": "p", "completion": "c"}, Sample(prompt="q", response="a")),
        ({"query": "q", "response": "r", "question": "x", "answer": "y"}, Sample(prompt="q", response="r")),
        # A blank field is absent, so columnar files can mix shapes; extra fields are ignored.
        ({"text": None, "question": "q", "answer": "a"}, Sample(prompt="q", response="a")),
        ({"text": "", "prompt": "p", "completion": "c", "id": 7}, Sample(prompt="p", response="c")),
    ],
)
def test_field_pairs(tmp_path: Path, record: dict, expected: Sample) -> None:
    path = write(tmp_path / "d.jsonl", (json.dumps(record) + "\n").encode())
    assert read_samples(path) == [expected]


def test_jsonl_keeps_unicode_line_separators(tmp_path: Path) -> None:
    text = "one\u2028two\x0cthree\u0085four"
    path = write(tmp_path / "d.jsonl", (json.dumps({"text": text}, ensure_ascii=False) + "\r\n").encode())
    assert read_samples(path) == [Sample(text=text)]


def test_csv_mixed_shapes_and_multiline_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "prompt", "completion"])
        w.writerow(["line one\nline two, with comma", "", ""])
        w.writerow(["", "p", "c"])
    assert read_samples(path) == [Sample(text="line one\nline two, with comma"), Sample(prompt="p", response="c")]


# --- read errors ---------------------------------------------------------------------------------


def assert_error(exc: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)


@pytest.mark.parametrize(
    ("name", "content", "parts"),
    [
        ("e.jsonl", b"", ["e.jsonl", "empty"]),
        ("e.jsonl.gz", gzip.compress(b""), ["e.jsonl.gz", "empty"]),
        ("e.jsonl", b"\n \n", ["no samples"]),
        ("e.json", b"[]", ["no samples"]),
        ("e.txt", b" \n\n", ["no samples"]),
        ("e.csv", b"text\n", ["no samples"]),
        ("bad.jsonl", b'{"text": "a"}\n\n{"text": oops}\n', ["bad.jsonl", "line 3", "invalid JSON"]),
        ("bad.json", b'[{"text": "a"},\n {"text": }]', ["bad.json", "invalid JSON", "line 2"]),
        ("bad.json", b'{"rows": []}', ["'data' or 'train'", "'rows'"]),
        ("bad.json", b'"text"', ["list of records"]),
        ("bad.jsonl", b'["a"]\n', ["line 1", "got a list", "'text'"]),
        (
            "bad.jsonl",
            b'{"text": "a"}\n{"body": "x", "title": "y"}\n',
            [
                "line 2",
                "'body', 'title'",
                "'text'",
                "'query'/'response'",
                "'question'/'answer'",
                "'instruction'/'output'",
                "'prompt'/'completion'",
            ],
        ),
        ("bad.jsonl", b'{"question": "q"}\n', ["line 1", "has 'question' but no 'answer'"]),
        ("bad.jsonl", b'{"text": 5}\n', ["line 1", "'text' must be a string", "got a number"]),
        ("bad.jsonl", b'{"text": null}\n', ["'text' must be a string", "got null"]),
        ("bad.jsonl", b'{"text": "  "}\n', ["'text' is empty"]),
        ("bad.jsonl", b'{"question": "q", "answer": ""}\n', ["'answer' is empty"]),
        ("bad.jsonl", b'{"instruction": "i", "input": 3, "output": "o"}\n', ["'input' must be a string"]),
        ("bad.json", b'[{"text": "a"}, {"text": ["x"]}]', ["record 2", "got a list"]),
        ("bad.csv", b"text,other\na,b,c\n", ["line 2", "more values"]),
        ("bad.csv", b"question,answer\nq\n", ["line 2", "fewer values"]),
        ("big.csv", b"text\n" + b"x" * 200_000 + b"\n", ["big.csv", "line 2", "malformed CSV", "field limit"]),
        ("bad.jsonl.gz", b"not gzip at all", ["bad.jsonl.gz", "not a valid gzip file"]),
        ("bad.jsonl.gz", gzip.compress(b'{"text": "a"}\n')[:-6], ["not a valid gzip file"]),
        ("bad.parquet", b"PAR1 not really", ["bad.parquet", "not a readable Parquet file"]),
        ("bad.jsonl", b'{"text": "caf\xe9"}\n', ["not UTF-8"]),
        ("data.xlsx", b"x", ["data.xlsx", "unknown file type", ".jsonl, .json, .parquet, .csv or .txt", ".gz"]),
        ("data.gz", b"x", ["unknown file type"]),
    ],
)
def test_read_errors(tmp_path: Path, name: str, content: bytes, parts: list[str]) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TloraError) as exc:
        read_samples(path)
    assert_error(exc, *parts)


def test_parquet_null_in_only_shape(tmp_path: Path) -> None:
    path = write(tmp_path / "d.parquet", parquet_bytes([{"text": "a"}, {"text": None}]))
    with pytest.raises(TloraError) as exc:
        read_samples(path)
    assert_error(exc, "d.parquet", "record 2", "got null")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(TloraError) as exc:
        read_samples(tmp_path / "nope.jsonl")
    assert_error(exc, "nope.jsonl", "no such file")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(TloraError) as exc:
        read_samples(tmp_path / "dir.jsonl")
    assert_error(exc, "dir.jsonl", "is a directory")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "locked.jsonl", b'{"text": "a"}\n')

    def deny(self: Path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    # Root reads through chmod 000, so fake the denial where the file is opened.
    monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(TloraError) as exc:
        read_samples(path)
    assert_error(exc, "locked.jsonl", "permission denied")


# --- encoding ------------------------------------------------------------------------------------


def test_encode_text_exact(tok) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    expected = ids(tok, text)
    assert expected[0] == tok.bos_token_id  # the fixture's template makes add_special_tokens matter
    enc = encode_sample(Sample(text=text), tok, 512)
    assert enc == EncodedSample(expected, expected, truncated=False)


def test_encode_text_truncates_right(tok) -> None:
    text = "Hello world, this is a small calibration corpus."
    full = ids(tok, text)
    enc = encode_sample(Sample(text=text), tok, 5)
    assert enc.input_ids == full[:5] == enc.labels
    assert enc.truncated
    assert encode_sample(Sample(text=text), tok, len(full)) == EncodedSample(full, full)


def test_encode_pair_exact(tok) -> None:
    prompt, response = "Question: How many pencils?\nAnswer:", " She has 3 * 12 = 36 pencils."
    p, r = ids(tok, prompt), ids(tok, response, special=False)
    assert p[0] == tok.bos_token_id and tok.bos_token_id not in r
    enc = encode_sample(Sample(prompt=prompt, response=response), tok, 512)
    assert enc.input_ids == p + r + [tok.eos_token_id]
    assert enc.labels == [-100] * len(p) + r + [tok.eos_token_id]
    assert not enc.truncated


def pair_lengths(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    return ids(tok, prompt), [*ids(tok, response, special=False), tok.eos_token_id]


PROMPT = "The quick brown fox jumps over the lazy dog, again and again."
RESPONSE = " A train travels 60 miles per hour for 2 hours."


@pytest.mark.parametrize("cut", ["fits", "one_over", "prompt_long", "response_fills", "response_long", "tiny"])
def test_encode_pair_truncation(tok, cut: str) -> None:
    p, r = pair_lengths(tok, PROMPT, RESPONSE)
    assert len(p) > 5 and len(r) > 5
    seq_len, kept_p, kept_r = {
        "fits": (len(p) + len(r), p, r),
        "one_over": (len(p) + len(r) - 1, p[:-1], r),
        "prompt_long": (len(r) + 3, p[:3], r),  # the prompt gives way first
        "response_fills": (len(r) + 1, p[:1], r),  # the prompt keeps its first token
        "response_long": (len(r), p[:1], r[: len(r) - 1]),  # the response loses its tail (EOS first)
        "tiny": (2, p[:1], r[:1]),
    }[cut]
    enc = encode_sample(Sample(prompt=PROMPT, response=RESPONSE), tok, seq_len)
    assert enc.input_ids == kept_p + kept_r
    assert enc.labels == [-100] * len(kept_p) + kept_r
    assert len(enc.input_ids) <= seq_len
    assert enc.truncated == (cut != "fits")


def test_encode_both_long(tok) -> None:
    prompt, response = PROMPT * 4, RESPONSE * 4
    p, r = pair_lengths(tok, prompt, response)
    enc = encode_sample(Sample(prompt=prompt, response=response), tok, 20)
    assert enc.input_ids == p[:1] + r[:19]
    assert enc.labels == [-100, *r[:19]]
    assert tok.eos_token_id not in enc.input_ids[1:]


def test_encode_errors(tok) -> None:
    with pytest.raises(TloraError) as exc:
        encode_sample(Sample(text="hi"), tok, 1)
    assert_error(exc, "at least 2", "got 1")
    no_eos = make_tokenizer(eos=False)
    assert no_eos.eos_token_id is None
    with pytest.raises(TloraError) as exc:
        encode_sample(Sample(prompt="a", response="b"), no_eos, 16)
    assert_error(exc, "no EOS token")
    # Plain text needs no EOS.
    assert encode_sample(Sample(text="hello"), no_eos, 16).input_ids == ids(no_eos, "hello")
    bare = make_tokenizer(add_bos=False)
    with pytest.raises(TloraError) as exc:
        encode_sample(Sample(text=""), bare, 16, where="data.jsonl: sample 7")
    assert_error(exc, "data.jsonl: sample 7", "0 token(s)", "nothing to predict")
    single = next(t for t in ["a", "Q", "e"] if len(ids(bare, t)) == 1)
    with pytest.raises(TloraError) as exc:
        encode_sample(Sample(text=single), bare, 16)
    assert_error(exc, "1 token(s)")


def test_sample_shape_is_checked() -> None:
    for bad in [{}, {"text": "t", "prompt": "p"}, {"prompt": "p"}, {"response": "r"}]:
        with pytest.raises(ValueError):
            Sample(**bad)


# --- loading and selection -----------------------------------------------------------------------


@pytest.fixture
def ten_texts(tmp_path: Path) -> Path:
    lines = "".join(json.dumps({"text": f"Sample number {i} about the fox."}) + "\n" for i in range(10))
    return write(tmp_path / "ten.jsonl", lines.encode())


def decoded_numbers(tok, cal: CalibrationSet) -> list[int]:
    return [int(re.search(r"number (\d+)", tok.decode(s.input_ids)).group(1)) for s in cal.samples]


def test_load_selection_is_seeded(tok, ten_texts: Path) -> None:
    a = load_calibration_set(str(ten_texts), tok, 4, 64, seed=3)
    order = list(range(10))
    random.Random(3).shuffle(order)
    assert decoded_numbers(tok, a) == order[:4]
    assert decoded_numbers(tok, load_calibration_set(str(ten_texts), tok, 4, 64, seed=3)) == order[:4]
    assert decoded_numbers(tok, load_calibration_set(str(ten_texts), tok, 4, 64, seed=4)) != order[:4]
    assert a.source == str(ten_texts)
    assert a.sha256 == hashlib.sha256(ten_texts.read_bytes()).hexdigest()
    assert a.num_available == 10
    assert a.num_tokens == sum(len(s.input_ids) for s in a.samples)
    assert a.num_loss_tokens == a.num_tokens  # plain text: every token carries loss


def test_load_fewer_available(tok, ten_texts: Path) -> None:
    cal = load_calibration_set(str(ten_texts), tok, 32, 64, seed=0)
    assert cal.num_available == 10
    assert sorted(decoded_numbers(tok, cal)) == list(range(10))


def test_load_names_each_sample_by_its_line(tok, tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.jsonl", b'{"text": "The quick brown fox."}\n\n{"question": "How many?", "answer": "3"}\n'
    )
    cal = load_calibration_set(str(path), tok, 2, 64, seed=0)
    assert sorted(cal.wheres) == [f"{path}: line 1", f"{path}: line 3"]
    assert cal.provenance == {} and cal.num_skipped == 0


def test_load_counts_and_hash_of_gz_bytes(tok, tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl.gz", b'{"prompt": "Question: 1 + 1?", "completion": " 2"}\n')
    cal = load_calibration_set(str(path), tok, 1, 64, seed=0)
    assert cal.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    r = ids(tok, " 2", special=False)
    assert cal.num_loss_tokens == len(r) + 1
    assert cal.num_tokens == len(ids(tok, "Question: 1 + 1?")) + len(r) + 1
    assert cal.num_truncated == 0


def test_load_errors(tok, ten_texts: Path, tmp_path: Path) -> None:
    with pytest.raises(TloraError) as exc:
        load_calibration_set(str(tmp_path / "missing.jsonl"), tok, 4, 64, 0)
    assert_error(exc, "no data file or dataset named", "missing.jsonl", "a dataset name (metamath, ", "org/name")
    with pytest.raises(TloraError) as exc:
        load_calibration_set(str(ten_texts), tok, 0, 64, 0)
    assert_error(exc, "at least 1", "got 0")
    with pytest.raises(TloraError) as exc:
        load_calibration_set(str(ten_texts), tok, 4, 1, 0)
    assert_error(exc, "at least 2")
    short = write(tmp_path / "short.txt", b"long enough line\nx\n")
    with pytest.raises(TloraError) as exc:
        load_calibration_set(str(short), make_tokenizer(add_bos=False), 4, 64, 0)
    assert_error(exc, f"{short}: sample 2", "nothing to predict")


# --- the built-in set ----------------------------------------------------------------------------


def test_builtin_set(tok) -> None:
    samples, source, sha = builtin_samples()
    raw = resources.files("tlora_cli.data").joinpath("math_word_problems.jsonl.gz").read_bytes()
    assert source == "builtin:math-word-problems"
    assert sha == hashlib.sha256(raw).hexdigest()
    assert len(samples) == 400
    problems = math_problems.generate_problems(400, 0)
    for sample, problem in zip(samples, problems):
        assert sample.prompt == f"Question: {problem['question']}\nAnswer:"
        assert sample.response == f" {problem['answer']}"
        assert sample.response.rsplit("\n", 1)[1] == f"#### {number_text(problem['final'])}"
    cal = load_calibration_set(None, tok, 8, 512, seed=0)
    assert (cal.source, cal.sha256, cal.num_available, len(cal.samples)) == (source, sha, 400, 8)
    assert 0 < cal.num_loss_tokens < cal.num_tokens


def test_shipped_file_is_reproducible() -> None:
    raw = resources.files("tlora_cli.data").joinpath("math_word_problems.jsonl.gz").read_bytes()
    assert math_problems.to_jsonl_gz(math_problems.generate_problems(400, 0)) == raw


def test_generator_main_writes_file(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl.gz"
    math_problems.main(["--out", str(out), "--n", "5", "--seed", "9"])
    assert out.read_bytes() == math_problems.to_jsonl_gz(math_problems.generate_problems(5, 9))
    assert len(read_samples(out)) == 5


def number_text(x: int | float) -> str:
    return str(x) if isinstance(x, int) else repr(x)


OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr: str) -> Fraction:
    """Exact value of a + - * / expression, independent of the generator's own arithmetic."""

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        raise ValueError(f"unexpected {ast.dump(node)} in {expr!r}")

    return ev(ast.parse(expr, mode="eval").body)


COMPUTATION = re.compile(r"(\(?\d[\d.]*(?:\s*[-+*/]\s*\(?\d[\d.]*\)?)+)\s*=\s*\$?(\d+(?:\.\d+)?)")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
# Numbers a solution may use without the question stating them: unit conversions and counting.
KNOWN = {Fraction(n) for n in (2, 12, 60, 100, 1000)}


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return math_problems.generate_problems(400, 0)


def test_generator_arithmetic_checks_out(problems: list[dict]) -> None:
    for problem in problems:
        question, answer = problem["question"], problem["answer"]
        *steps, last = answer.split("\n")
        assert last == f"#### {number_text(problem['final'])}"
        assert isinstance(problem["final"], (int, float))
        available = {Fraction(n) for n in NUMBER.findall(question)} | KNOWN
        results = []
        for step in steps:
            found = COMPUTATION.findall(step)
            assert found, f"no computation in {step!r}"
            for lhs, rhs in found:
                assert evaluate(lhs) == Fraction(rhs), f"{lhs} != {rhs} in {step!r}"
                # Every operand comes from the question, a unit constant, or an earlier result.
                for operand in NUMBER.findall(lhs):
                    assert Fraction(operand) in available, f"{operand} unexplained in {answer!r}"
                available.add(Fraction(rhs))
                results.append(Fraction(rhs))
        assert results[-1] == Fraction(str(problem["final"]))


def test_generator_is_deterministic_and_varied(problems: list[dict]) -> None:
    assert math_problems.generate_problems(400, 0) == problems
    assert math_problems.generate_problems(20, 1) != problems[:20]
    assert len({p["question"] for p in problems}) == 400
    assert len(math_problems.TEMPLATES) >= 12
    # Every template appears: each has a distinctive phrase.
    openings = {re.sub(r"[\d$.,]+", "#", p["answer"].split("\n")[0])[:20] for p in problems}
    assert len(openings) >= len(math_problems.TEMPLATES)
    assert any(isinstance(p["final"], float) for p in problems)  # clean decimals occur too
