"""Shared fixtures: tiny models, calibration files, and a way to run the CLI in-process."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

# Tiny models gain nothing from threads, and spinning threads crawl on a busy 2-core machine.
torch.set_num_threads(1)

TEXTS = [
    {"text": "The quick brown fox jumps over the lazy dog. Hello world, this is a small corpus."},
    {
        "question": "Mia buys 3 packs of 12 pencils. How many pencils does she have?",
        "answer": "She has 3 * 12 = 36 pencils.\n#### 36",
    },
    {"text": "A train travels 60 miles per hour for 2 hours, so it covers 60 * 2 = 120 miles."},
    {"prompt": "Question: how far does the train go?\nAnswer:", "completion": " 60 * 2 = 120 miles.\n#### 120"},
    {"instruction": "Say hello to the world.", "output": "Hello world, this is the answer."},
    {"query": "What does the fox do?", "response": "The quick brown fox jumps over the lazy dog."},
]


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped where there is no CUDA device (CI); gpu_check.sh selects them by the mark."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `tlora ARGS` in this process: the exit code and both streams, as a shell would see them."""
    from tlora_cli.cli import main

    def run(*args: str | Path) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["tlora", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


@pytest.fixture
def tiny_init(run_cli, data_file):
    """`tlora init` on a tiny model with a few short samples; extra CLI arguments pass through."""

    def run(model_dir: Path, out: Path, *args: str | Path | int, samples: int = 4, seq_len: int = 24) -> CliResult:
        return run_cli(
            "init",
            "--model",
            model_dir,
            "--data",
            data_file,
            "--num-samples",
            samples,
            "--seq-len",
            seq_len,
            *map(str, args),
            "-o",
            out,
            "-q",
        )

    return run


# A small ChatML-like template: every rendering of a conversation starts with the rendering of its prefix.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture
def chat_model(model_factory, tmp_path) -> Path:
    """The tiny Llama with CHAT_TEMPLATE."""
    folder = tmp_path / "chat-model"
    shutil.copytree(model_factory("llama"), folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TEXTS))
    return path


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Tiny models by (arch, options), built once per session."""
    cache: dict[tuple, Path] = {}

    def build(arch: str = "llama", **options) -> Path:
        key = (arch, *sorted(options.items()))
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(arch), arch, **options)
        return cache[key]

    return build
