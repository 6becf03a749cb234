"""The data options as a user reaches them: `tlora data list/show` and the data flags of init/calibrate."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

GSM8K_RECORDS = [
    {
        "question": "Mia buys 3 packs of 12 pencils. How many pencils does she have?",
        "answer": "She has 3 * 12 = 36 pencils.\n#### 36",
    },
    {
        "question": "A train travels 60 miles per hour for 2 hours. How far does it go?",
        "answer": "It covers 60 * 2 = 120 miles.\n#### 120",
    },
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_data_list_names_the_known_datasets(run_cli):
    result = run_cli("data", "list")
    assert result.code == 0
    rows = {line.split("\t")[0]: line.split("\t")[1] for line in result.stdout.strip().splitlines()[1:]}
    assert rows["metamath"] == "meta-math/MetaMathQA"
    assert rows["gsm8k"] == "openai/gsm8k"
    assert {"math", "code-feedback", "wizardlm", "alpaca", "commonsense170k", "wikitext", "c4"} <= set(rows)


def test_data_show_marks_the_loss_and_counts_tokens(run_cli, model_factory, tmp_path):
    model_dir = model_factory("llama")
    data = _write(tmp_path / "local.jsonl", GSM8K_RECORDS[:1])
    result = run_cli("data", "show", f"gsm8k={data}", "--model", model_dir, "--num-samples", "1")
    assert result.code == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # gsm8k's template: the question and a newline as the prompt, the answer and EOS as the loss.
    prompt = tokenizer(GSM8K_RECORDS[0]["question"] + "\n")["input_ids"]
    answer = tokenizer(GSM8K_RECORDS[0]["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert f"{len(prompt) + len(answer)} tokens, {len(answer)} carry the loss" in result.stdout
    context, loss = result.stdout.split("--- loss ---")
    assert GSM8K_RECORDS[0]["question"] in context.split("--- context (no loss) ---")[1]
    assert "#### 36" in loss


def test_named_format_over_a_local_copy_reaches_the_metadata(tiny_init, model_factory, tmp_path):
    data = _write(tmp_path / "gsm8k.jsonl", GSM8K_RECORDS)
    out = tmp_path / "adapter"
    result = tiny_init(model_factory("llama"), out, "--data", f"gsm8k={data}", samples=2, seq_len=48)
    assert result.code == 0, result.stderr
    meta = json.loads((out / "tlora_metadata.json").read_text())
    assert meta["data"]["source"] == f"gsm8k={data}"
    assert meta["data"]["num_samples"] == 2


def test_field_and_template_flags(run_cli, model_factory, tmp_path):
    model_dir = model_factory("llama")
    data = _write(tmp_path / "custom.jsonl", [{"q": "What is 2 + 2?", "a": "4"}, {"q": "What is 3 + 3?", "a": "6"}])
    flags = ["--response-field", "a", "--template", "Q: {q}\nA:"]
    result = run_cli("data", "show", data, "--model", model_dir, *flags)
    assert result.code == 0, result.stderr
    assert "Q: What is 2 + 2?" in result.stdout or "Q: What is 3 + 3?" in result.stdout
    out = tmp_path / "adapter"
    args = ["--model", model_dir, "--data", data, *flags, "--num-samples", "2", "--seq-len", "24", "-q"]
    assert run_cli("calibrate", *args, "-o", out).code == 0
    bad = run_cli("data", "show", data, "--model", model_dir, "--response-field", "a", "--template", "Q: {question}")
    assert bad.code == 1 and "question" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_data_flags_conflict_with_a_calibration(run_cli, tmp_path):
    out = tmp_path / "out"
    result = run_cli("init", "--calibration", tmp_path, "--template", "{x}", "-o", out)
    assert result.code == 1 and "--calibration" in result.stderr and not out.exists()


def test_uncached_hub_dataset_offline_is_one_line(tiny_init, model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    out = tmp_path / "adapter"
    result = tiny_init(model_factory("llama"), out, "--data", "nobody/no-such-dataset")
    assert result.code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/no-such-dataset" in lines[0] and not out.exists()


def test_too_few_tokens_for_the_largest_rank_is_warned(run_cli, model_factory, data_file, tmp_path):
    args = ["--model", model_factory("llama"), "--data", data_file, "--num-samples", "2", "--seq-len", "8"]
    assert run_cli("calibrate", *args, "-q", "-o", tmp_path / "calib").code == 0
    result = run_cli("allocate", tmp_path / "calib", "--budget-rank", "20", "-o", tmp_path / "plan.json")
    assert result.code == 0 and "warning:" in result.stderr and "16 tokens" in result.stderr
    result = run_cli("init", *args, "--budget-rank", "20", "-o", tmp_path / "out")
    assert result.code == 0 and "fewer directions than A needs" in result.stderr
