"""Inputs a hostile user can hand tlora, round 3 (issue 32): sizes a user controls, the environment, output names,
misleading messages and silent wrong results. Each case ends in its exit code (1, or 2 for usage; never 3) and
one line naming the thing, leaves every input and an existing OUT byte-for-byte as it was, and keeps its
promise where the input is fine (docs/reliability.md maps each class to its gate)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from cli_main import run_main
from safetensors.torch import load_file, save_file
from test_faults import N_ARGS, init_args, no_debris, one_line, snapshot
from transformers import AutoTokenizer

from tlora_cli import cli
from tlora_cli.data import files, load_calibration_set
from tlora_cli.data import messages as messages_module
from tlora_cli.errors import TloraError

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _calibrate(model: Path, data: Path, out: Path, *flags: str) -> Path:
    """`tlora calibrate` for a module-scoped fixture (run_cli is per test)."""
    run_main("calibrate", "--model", model, "--data", data, *N_ARGS, *flags, "-o", out)
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory, model_factory, data_file) -> Path:
    """A calibration of the shared tiny model, made once; tests edit copies."""
    return _calibrate(model_factory("llama"), data_file, tmp_path_factory.mktemp("measured") / "calib")


@pytest.fixture(scope="module")
def measured_gradients(tmp_path_factory, model_factory, data_file) -> Path:
    """The same with LoRA-DA's gradient statistics (and so the uncentred covariance)."""
    out = tmp_path_factory.mktemp("measured") / "calib"
    return _calibrate(model_factory("llama"), data_file, out, "--gradients")


@pytest.fixture
def model(model_factory) -> Path:
    return model_factory("llama")


@pytest.fixture
def calibration(measured, tmp_path) -> Path:
    return Path(shutil.copytree(measured, tmp_path / "calib"))


@pytest.fixture
def data(data_file, tmp_path) -> Path:
    return Path(shutil.copy(data_file, tmp_path / "calib.jsonl"))


@pytest.fixture
def torchrun_free(monkeypatch) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def refused(run_cli, args: list, code: int, *needles: str, inputs: tuple[Path, ...] = ()) -> str:
    """`tlora ARGS` ends in one line holding every needle and exit `code`; nothing under tmp (the inputs, an OUT
    already there) nor any other input changes, and no temporary folder is left."""
    out = Path(args[args.index("-o") + 1]) if "-o" in args else None
    roots = [p for p in (*inputs, out.parent if out else None) if p is not None and p.exists()]
    before = snapshot(*roots)
    line = one_line(run_cli(*args), code, *needles)
    assert snapshot(*roots) == before
    if out is not None:
        no_debris(out.parent)
    return line


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- Hang and memory: every size a user controls is bounded before it is allocated ---------------------------


def _conversation(turns: int) -> dict:
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": f"turn {i}, a few words"} for i in range(turns)]}


@pytest.fixture
def counted_renders(monkeypatch) -> list[int]:
    """Every chat template rendering of a conversation counted; past 100 the old quadratic loop is running."""
    count = [0]
    real = messages_module.chat_ids

    def counting(*args, **kwargs):
        count[0] += 1
        if count[0] > 100:
            raise RuntimeError("the conversation is rendered turn by turn past --seq-len")
        return real(*args, **kwargs)

    monkeypatch.setattr(messages_module, "chat_ids", counting)
    return count


def test_conversation_of_10000_turns_renders_only_what_seq_len_keeps(chat_model, tmp_path, counted_renders):
    """It used to take 20 minutes (one rendering per assistant turn over a growing prefix); the sample is the
    same as the one of its first 20 turns, which fill the 64 tokens kept."""
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    long = _write_jsonl(tmp_path / "long.jsonl", [_conversation(10_000)])
    [sample] = load_calibration_set(str(long), tokenizer, 1, 64, 0).samples
    assert counted_renders[0] <= 30
    short = _write_jsonl(tmp_path / "short.jsonl", [_conversation(20)])
    [expected] = load_calibration_set(str(short), tokenizer, 1, 64, 0).samples
    assert sample == expected and sample.truncated and len(sample.input_ids) == 64


def test_conversation_too_long_for_its_window_is_refused(run_cli, chat_model, tmp_path, counted_renders):
    data = _write_jsonl(tmp_path / "long.jsonl", [_conversation(10_000)])
    args = ["data", "show", data, "--model", chat_model, "--seq-len", "1000000", "--num-samples", "1"]
    refused(run_cli, args, 1, "long.jsonl: line 1", "more than 1000 messages", inputs=(tmp_path,))
    assert counted_renders[0] == 1


def test_one_huge_line_of_a_gzip_file_is_refused_while_read(run_cli, model, tmp_path):
    """A line is read up to the bound and no further (the whole file used to be decompressed and decoded, then
    split: 3.8 GB for a 1.2 GB line)."""
    path = tmp_path / "huge.jsonl.gz"
    line = json.dumps({"text": "a" * (files.MAX_LINE + 10)})
    path.write_bytes(gzip.compress(f'{{"text": "fine"}}\n{line}\n'.encode(), compresslevel=1))
    refused(
        run_cli, ["data", "show", path, "--model", model], 1, "huge.jsonl.gz: line 2", "longer than", inputs=(path,)
    )
    tracemalloc.start()
    try:
        with pytest.raises(TloraError, match="line 2"):
            files.read_records(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * files.MAX_LINE  # the line so far, decoded, and what gzip holds: not the file 3 times over


def test_lines_under_the_bound_read_as_before(tmp_path):
    """Control: streamed line by line, a file gives the records, their places and the hash it always gave."""
    records = [{"text": "x" * 70_000}, {"text": "é\u2028ü"}, {"question": "q", "answer": "a"}]
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records).encode()
    for name, content in (("d.jsonl", raw), ("d.jsonl.gz", gzip.compress(raw))):
        (tmp_path / name).write_bytes(content)
        read, digest = files.read_records(tmp_path / name)
        assert [r for _, r in read] == records and [w for w, _ in read][-1].endswith("line 3")
        assert digest == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("template", ["Q: {question:>300000000}", "{question:.99999999}", "{question!r:^10001}"])
def test_template_wider_than_the_bound_is_refused_before_any_work(run_cli, model, data, tmp_path, template):
    args = init_args(model, data, tmp_path / "adapter", "--template", template, "--response-field", "answer")
    refused(run_cli, args, 1, "template", "{question}", "10,000 characters", inputs=(model,))


def test_template_within_the_bound_still_formats(run_cli, model, tmp_path):
    """Control: a format spec within the bound keeps its meaning."""
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "What?", "answer": "That."}])
    result = run_cli(
        "data", "show", data, "--model", model, "--template", "Q: {question:>12}|", "--response-field", "answer"
    )
    assert result.code == 0 and "Q:        What?|" in result.stdout, result.stderr


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('{"text": "hello \\ud800 world"}', ["line 1", "'text'", "unpaired surrogate", "\\ud800"]),
        ('{"question": "why \\udc80?", "answer": "x"}', ["line 1", "'question'", "unpaired surrogate"]),
        ('{"question": ' + "9" * 5000 + ', "answer": "x"}', ["line 1", "number too long", "4300 digits"]),
        ('[{"text": ' + "9" * 5000 + "}]", ["number too long"]),
    ],
)
def test_data_show_of_text_no_tokenizer_takes(run_cli, model, tmp_path, text, needles):
    data = tmp_path / ("d.json" if text.startswith("[") else "d.jsonl")
    data.write_text(text + "\n")
    refused(run_cli, ["data", "show", data, "--model", model], 1, *needles, inputs=(data,))


# --- The environment: torchrun's variables and Ctrl-C ---------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE must be a whole number, got 'abc'"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be 1 or more"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK must be a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK must be between 0 and 1"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "x"}, "MASTER_PORT must be"),
    ],
)
def test_torchrun_variables_torchrun_never_sets(
    run_cli, monkeypatch, torchrun_free, model, data, tmp_path, env, needle
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused(run_cli, init_args(model, data, tmp_path / "adapter"), 1, needle, inputs=(model, data))


def test_world_size_abc_in_a_one_process_command(run_cli, monkeypatch, torchrun_free, calibration, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    refused(run_cli, ["allocate", calibration, "-o", tmp_path / "plan.json"], 1, "WORLD_SIZE", inputs=(calibration,))


def test_a_stray_rank_does_not_silence_the_one_process(run_cli, monkeypatch, torchrun_free, calibration, tmp_path):
    """Only a torchrun run (WORLD_SIZE above 1) has ranks to silence."""
    monkeypatch.setenv("RANK", "1")
    result = run_cli("allocate", calibration, "-o", tmp_path / "plan.json")
    assert result.code == 0 and "wrote" in result.stderr, result.stderr
    refused(run_cli, ["allocate", calibration, "-o", tmp_path / "plan.json"], 1, "already exists")


INTERRUPTED_IMPORT = """
import sys, runpy

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "typer":  # the first heavy import the CLI makes
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
if sys.argv[1] == "module":
    runpy.run_module("tlora_cli", run_name="__main__", alter_sys=True)
else:  # what pip's console script for `tlora` does
    from tlora_cli.__main__ import main
    sys.exit(main())
"""


@pytest.mark.parametrize("entry", ["module", "script"])
def test_interrupt_during_the_first_imports(tmp_path, entry):
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_IMPORT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, script, entry], capture_output=True, text=True, env=env, timeout=300)
    assert (result.returncode, result.stderr) == (130, "interrupted: nothing was written\n")
    assert list(tmp_path.iterdir()) == [script]


def test_the_tlora_command_is_the_entry_that_catches_it():
    scripts = (ROOT / "pyproject.toml").read_text().partition("[project.scripts]")[2].partition("[")[0]
    assert 'tlora = "tlora_cli.__main__:main"' in scripts


def test_interrupt_before_the_command_runs(run_cli, monkeypatch, calibration, tmp_path):
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "quiet_libraries", interrupted)
    try:
        result = run_cli("allocate", calibration, "-o", tmp_path / "plan.json")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C before the command ran escaped main as a traceback")
    assert (result.code, result.stderr) == (130, "interrupted: nothing was written\n")
    assert not (tmp_path / "plan.json").exists()


# --- Output names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "needle"), [(300, "300 bytes"), (250, "250 bytes")])
def test_output_name_longer_than_the_file_system_allows(run_cli, model, calibration, tmp_path, length, needle):
    """250 fits the file system but not the temporary name written first beside it."""
    out = tmp_path / ("x" * length)
    args = ["init", "--model", model, "--calibration", calibration, "-q", "-o", out]
    refused(run_cli, args, 1, needle, "choose a shorter one", inputs=(calibration,))


def test_plan_name_longer_than_the_file_system_allows(run_cli, calibration, tmp_path):
    refused(run_cli, ["allocate", calibration, "-o", tmp_path / ("p" * 300)], 1, "longer than", inputs=(calibration,))


def test_any_path_longer_than_the_file_system_allows(run_cli, model, tmp_path):
    data = tmp_path / ("d" * 300 + ".jsonl")
    refused(run_cli, ["data", "show", data, "--model", model], 1, "longer than the file system allows")
    refused(run_cli, ["inspect", tmp_path / ("a" * 300)], 1, "longer than the file system allows")


def test_output_name_that_is_not_utf8(run_cli, model, calibration, tmp_path):
    """safetensors opens UTF-8 paths only: refused before any work, named as the user typed it, never by the
    temporary folder's name."""
    for out in (tmp_path / os.fsdecode(b"a\xffb"), tmp_path / os.fsdecode(b"p\xff.json")):
        args = ["init", "--model", model, "--calibration", calibration, "-q", "-o", out]
        if out.suffix == ".json":
            args = ["allocate", calibration, "-o", out]
        line = refused(run_cli, args, 1, "not UTF-8", inputs=(calibration,))
        assert "\\xff" in line and ".tmp-" not in line and not out.exists()


def test_messages_naming_a_file_that_is_not_utf8(run_cli, model, tmp_path):
    """The name as the user typed it (\\xff), in a sample's header and in an error: printing a surrogate fails."""
    good = tmp_path / os.fsdecode(b"d\xff.jsonl")
    _write_jsonl(good, [{"text": "the quick brown fox jumps over the lazy dog"}])
    result = run_cli("data", "show", good, "--model", model)
    assert result.code == 0 and "d\\xff.jsonl: line 1:" in result.stdout, result.stderr
    bad = tmp_path / os.fsdecode(b"e\xff.jsonl")
    bad.write_text("not json\n")
    refused(run_cli, ["data", "show", bad, "--model", model], 1, "e\\xff.jsonl: line 1", inputs=(bad,))


# --- Messages: what is wrong, in the user's terms -------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--num-samples", "5"],
        ["--seed", "3"],
        ["--seq-len", "8"],
        ["--engine", "whole"],
        ["--batch-size", "2"],
        ["--target-modules", "q_proj"],
        ["--no-read-ahead"],
    ],
)
def test_init_from_a_calibration_refuses_flags_it_would_ignore(run_cli, model, calibration, tmp_path, flags):
    out = Path(shutil.copytree(calibration, tmp_path / "adapter-like"))  # an existing OUT, untouched
    args = ["init", "--model", model, "--calibration", calibration, *flags, "-q", "--overwrite", "-o", out]
    refused(run_cli, args, 1, flags[0], "--calibration", inputs=(calibration, model))


def test_init_from_a_calibration_takes_the_flags_that_apply(run_cli, model, calibration, tmp_path):
    """Control: the factorisation's device, the adapter's dtype, the covariance asked for, and the seed of a
    method that draws A."""
    args = ["--seed", "3", "--method", "random", "--device", "cpu", "--dtype", "float32", "--center"]
    result = run_cli("init", "--model", model, "--calibration", calibration, *args, "-q", "-o", tmp_path / "a")
    assert result.code == 0, result.stderr


@pytest.mark.parametrize(("damping", "needle"), [("1e300", "too large"), ("1e-320", "too small")])
def test_lora_da_damping_out_of_the_covariances_scale(run_cli, model, measured_gradients, tmp_path, damping, needle):
    calibration = Path(shutil.copytree(measured_gradients, tmp_path / "calib"))
    args = ["init", "--model", model, "--calibration", calibration, "--method", "lora-da", "--no-center"]
    args += ["--damping", damping, "-q", "-o", tmp_path / "adapter"]
    line = refused(run_cli, args, 1, "--damping", needle, "covariance of model.layers.0", inputs=(calibration,))
    assert "mean gradient is zero" not in line


@pytest.mark.parametrize(
    ("record", "flags", "needles"),
    [
        ({"prompt": "What?", "response": None}, [], ["line 1", "'response'", "null"]),
        (
            {"prompt": "What?", "response": None},
            ["--prompt-field", "prompt", "--response-field", "response"],
            ["no usable samples", "line 1: field 'response' is null"],
        ),
        (
            {"question": "What?", "answer": None},
            ["--template", "Q: {question}", "--response-field", "answer"],
            ["no usable samples", "line 1: field 'answer' is null"],
        ),
    ],
)
def test_a_null_response_names_the_field_and_the_record(run_cli, model, tmp_path, record, flags, needles):
    data = _write_jsonl(tmp_path / "nulls.jsonl", [record])
    line = refused(run_cli, init_args(model, data, tmp_path / "adapter", *flags), 1, *needles, inputs=(data,))
    assert "but no" not in line  # not "has 'response' but no 'query'"


# --- Silent wrong results: the budget, a plan and a covariance mean what they say ----------------------------


def _scale_scores(calibration: Path, factor: float) -> None:
    path = calibration / "calibration.json"
    manifest = json.loads(path.read_text())
    for module in manifest["modules"]:
        module["score"] *= factor
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("factor", [1e-310, 1e-318])
def test_the_budget_is_kept_whatever_the_scale_of_the_scores(run_cli, calibration, tmp_path, factor):
    plans = {}
    for name, scale in (("plain", 1.0), ("scaled", factor)):
        folder = Path(shutil.copytree(calibration, tmp_path / name))
        _scale_scores(folder, scale)
        assert run_cli("allocate", folder, "-q", "-o", tmp_path / f"{name}.json").code == 0
        plans[name] = json.loads((tmp_path / f"{name}.json").read_text())
    ranks = {name: [m["rank"] for m in plan["modules"]] for name, plan in plans.items()}
    assert sum(ranks["scaled"]) == plans["scaled"]["settings"]["budget"] == 14 * 8
    assert ranks["scaled"] == ranks["plain"]


def _plan(run_cli, calibration: Path, tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "plan.json"
    assert run_cli("allocate", calibration, "-q", "-o", path).code == 0
    return path, json.loads(path.read_text())


def _duplicate(doc):
    doc["modules"].append(dict(doc["modules"][0], rank=1))


def _totals_rank(doc):
    doc["totals"]["rank"] += 1


def _settings_budget(doc):
    doc["settings"]["budget"] = 999


def _scaling(doc):
    doc["modules"][0]["scaling"] *= 2  # as if it set the module's scaling: only rank and alpha do


def _shape(doc):
    doc["modules"][0]["shape"] = [64, 96]


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_duplicate, ["model.layers.0.self_attn.q_proj twice"]),
        (_totals_rank, ['totals "rank"']),
        (_settings_budget, ['settings "budget" is 999']),
        (_scaling, ["model.layers.0.self_attn.q_proj has scaling"]),
        (_shape, ["model.layers.0.self_attn.q_proj has shape [64, 96]"]),
    ],
)
def test_a_plan_that_contradicts_itself_is_refused(run_cli, model, calibration, tmp_path, edit, needles):
    plan, doc = _plan(run_cli, calibration, tmp_path)
    edit(doc)
    plan.write_text(json.dumps(doc))
    out = tmp_path / "adapter"
    assert run_cli("init", "--model", model, "--calibration", calibration, "-q", "-o", out).code == 0
    args = ["init", "--model", model, "--calibration", calibration, "--plan", plan, "-q", "--overwrite", "-o", out]
    refused(run_cli, args, 1, f"plan {plan}", *needles, inputs=(calibration, model))


def _covariance(calibration: Path) -> Path:
    return calibration / "covariances" / "model.layers.0.self_attn.q_proj.safetensors"


def _negative(c: torch.Tensor) -> torch.Tensor:
    return -c


def _lopsided(c: torch.Tensor) -> torch.Tensor:
    c = c.clone()
    c[0, 1] += c.abs().max()
    return c


def _indefinite(c: torch.Tensor) -> torch.Tensor:
    c = c.clone()
    c[0, 0] -= 2 * torch.linalg.eigvalsh(c.double())[-1].item()  # one direction below 0, the others as they were
    return c


@pytest.mark.parametrize(
    ("damage", "needle"),
    [(_negative, "not positive semi-definite"), (_lopsided, "not symmetric"), (_indefinite, "semi-definite")],
)
def test_a_covariance_that_is_not_one_is_refused(run_cli, model, calibration, tmp_path, damage, needle):
    path = _covariance(calibration)
    tensors = load_file(path)
    (field,) = tensors
    save_file({field: damage(tensors[field]).contiguous()}, path)
    args = ["init", "--model", model, "--calibration", calibration, "-q", "-o", tmp_path / "adapter"]
    refused(run_cli, args, 1, "model.layers.0.self_attn.q_proj", needle, inputs=(calibration, model))


def test_a_covariance_within_float32_rounding_is_read(run_cli, model, calibration, tmp_path):
    """Control: symmetric to 1e-6 and an eigenvalue at -1e-6 of the largest, what float32 sums leave, is read."""
    path = _covariance(calibration)
    tensors = load_file(path)
    (field,) = tensors
    c = tensors[field].double()
    values, vectors = torch.linalg.eigh(c)
    values[0] = -1e-6 * values[-1]
    c = (vectors * values) @ vectors.T
    c[0, 1] += 1e-6 * c.abs().max()
    save_file({field: c.float().contiguous()}, path)
    result = run_cli("init", "--model", model, "--calibration", calibration, "-q", "-o", tmp_path / "adapter")
    assert result.code == 0, result.stderr
