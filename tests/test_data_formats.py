"""prompt/response pairs, and TRL's conversational `messages` format (chat template, loss on assistant turns)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from tlora_cli.data import DataOptions, load_calibration_set
from tlora_cli.data.encode import IGNORE_INDEX

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "How many legs has a cat?"},
        {"role": "assistant", "content": "Four legs."},
        {"role": "user", "content": "And a bird?"},
        {"role": "assistant", "content": "Two legs, and wings."},
    ]
}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_response_pairs_are_read(run_cli, model_factory, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", [{"prompt": "What does the fox do?", "response": "It jumps."}])
    result = run_cli("data", "show", data, "--model", model_factory("llama"), "--num-samples", 1)
    assert result.code == 0, result.stderr
    context, loss = result.stdout.split("--- loss ---")
    assert "What does the fox do?" in context and "It jumps." in loss and "</s>" in loss


def test_messages_loss_covers_the_assistant_turns(chat_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    data = _write(tmp_path / "chat.jsonl", [CONVERSATION])
    [sample] = load_calibration_set(str(data), tokenizer, 1, 512, 0).samples
    whole = tokenizer.apply_chat_template(CONVERSATION["messages"], tokenize=True, return_dict=False)
    assert sample.input_ids == list(whole)
    loss_text = tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])
    assert loss_text == "Four legs.</s>\nTwo legs, and wings.</s>\n"
    context = tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label == IGNORE_INDEX])
    assert "How many legs" in context and "And a bird?" in context and "<|assistant|>" in context
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(sample.input_ids, sample.labels))
    # cut to T tokens, the first assistant turn still carries the loss
    cut = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX) + 3
    [short] = load_calibration_set(str(data), tokenizer, 1, cut, 0).samples
    assert len(short.input_ids) == cut and short.labels == sample.labels[:cut] and short.truncated


def test_data_show_and_init_read_conversations(chat_model, run_cli, tiny_init, tmp_path):
    data = _write(tmp_path / "chat.jsonl", [CONVERSATION] * 3)
    result = run_cli("data", "show", data, "--model", chat_model, "--num-samples", 1)
    assert result.code == 0, result.stderr
    parts = result.stdout.split("--- loss ---")
    assert len(parts) == 3  # two assistant turns, each marked
    assert "Four legs." in parts[1] and "And a bird?" in parts[1] and "Two legs, and wings." in parts[2]
    assert tiny_init(chat_model, tmp_path / "adapter", "--data", data, samples=3, seq_len=256).code == 0
    # a dataset folder goes through the dataset reader, which finds the format on its own too
    folder = tmp_path / "chat-set"
    folder.mkdir()
    _write(folder / "train.jsonl", [CONVERSATION] * 2)
    options = DataOptions(str(folder))
    [sample] = load_calibration_set(options, AutoTokenizer.from_pretrained(chat_model), 1, 512, 0).samples
    assert sum(label != IGNORE_INDEX for label in sample.labels) > 0


def test_bad_conversations_are_refused(chat_model, model_factory, run_cli, tmp_path):
    cases = [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn with content"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "message 1 has no 'content'"),
        ({"messages": ["hi"]}, "message 1 must be an object"),
    ]
    for record, message in cases:
        data = _write(tmp_path / "bad.jsonl", [record])
        result = run_cli("data", "show", data, "--model", chat_model)
        assert result.code == 1 and message in result.stderr, result.stderr
    data = _write(tmp_path / "chat.jsonl", [CONVERSATION])
    no_template = run_cli("data", "show", data, "--model", model_factory("llama"))
    assert no_template.code == 1 and "has no chat template" in no_template.stderr
