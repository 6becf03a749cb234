"""`tlora trial`: the held-out split, the arms, their scores against an independent PEFT loop, the best folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_lora_init import rel
from transformers import AutoModelForCausalLM

from tlora_cli.data import load_calibration_set
from tlora_cli.model.loading import load_tokenizer
from tlora_cli.train.loop import Plan, Schedule, heldout_loss, train
from tlora_cli.train.lora import started
from tlora_cli.training import load_for_training
from tlora_cli.training.start import start_from_adapter
from tlora_cli.trial.arms import EXTEND, first_rates, more_rates

TEXTS = [
    f"Problem {i}: a train travels {i + 2} miles an hour for {i % 5 + 1} hours, so it covers "
    f"{(i + 2) * (i % 5 + 1)} miles in all."
    for i in range(24)
]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def peft_loop(model: torch.nn.Module, batches, lr: float, steps: int, warmup: int) -> None:
    """benchmarks/quality/run.py's loop before it called the library: PEFT's layers, HF's own loss over the batch's
    answer tokens, AdamW, linear warm-up and decay, gradients clipped at 1."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup))
    )
    for batch in batches:
        length = max(len(s.input_ids) for s in batch)
        ids = torch.tensor([s.input_ids + [0] * (length - len(s.input_ids)) for s in batch])
        labels = torch.tensor([s.labels + [-100] * (length - len(s.labels)) for s in batch])
        mask = torch.tensor([[1] * len(s.input_ids) + [0] * (length - len(s.input_ids)) for s in batch])
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", ["tlora", "lora-init", "lora-dash"])
def test_the_library_trainer_equals_a_peft_loop(method, model_factory, data, tiny_init, tmp_path):
    """The trial's (and the quality benchmark's) short fine-tune of an adapter, A frozen or trained, residual or
    with a Dash term, ends at the held-out loss PEFT's own training of the same adapter gives."""
    model_dir = model_factory("llama")
    pre = ["--prelaunch-steps", "2", "--prelaunch-batch-size", "2"]
    extra = {"tlora": [], "lora-init": pre, "lora-dash": [*pre, "--dash-directions", "2"]}[method]
    assert tiny_init(model_dir, tmp_path / "a", "--method", method, "--budget-rank", 4, *extra, samples=8).code == 0
    samples = load_calibration_set(str(data), load_tokenizer(model_dir), 16, 32, 0).samples
    batches, heldout = [samples[i : i + 2] for i in range(0, 12, 2)], samples[12:]
    steps, warmup, lr = len(batches), 2, 5e-3
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with started(model, start_from_adapter(tmp_path / "a")) as weights:
        params = [t for w in weights.values() for t in w.trained()]
        train(model, params, batches, Schedule(steps, lr, warmup, decay=True), Plan(1, False, "test"), clip=1.0)
        ours = heldout_loss(model, heldout)
    reference = load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "a")
    peft_loop(reference, batches, lr, steps, warmup)
    theirs = heldout_loss(reference.eval(), heldout)
    before = heldout_loss(AutoModelForCausalLM.from_pretrained(model_dir), heldout)
    assert abs(ours - theirs) <= 1e-4 * theirs, (ours, theirs)
    assert abs(ours - before) > 1e-3  # training moved it
    assert torch.equal(next(model.parameters()), next(AutoModelForCausalLM.from_pretrained(model_dir).parameters()))


def test_rates_widen_only_past_an_edge_that_wins():
    centre = 1e-3
    grid = first_rates(centre)
    assert grid == [5e-4, 1e-3, 2e-3]
    assert more_rates({5e-4: 2.0, 1e-3: 1.0, 2e-3: 1.5}, centre) == []
    assert more_rates({5e-4: 2.0, 1e-3: 1.5, 2e-3: 1.0}, centre) == [4e-3]
    assert more_rates({5e-4: 1.0, 1e-3: 1.5, 2e-3: 2.0}, centre) == [2.5e-4]
    tried = {5e-4: 2.0, 1e-3: 1.5, 2e-3: 1.2}
    for _ in range(EXTEND):
        (rate,) = more_rates(tried, centre)
        tried[rate] = min(tried.values()) - 0.1  # each rate higher wins
    assert more_rates(tried, centre) == []  # no further than EXTEND past the edge


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--methods", "tlora,nope"], "--methods names 'nope'"),
        (["--lrs", "1e-3,-2"], "--lrs must be auto or comma-separated positive rates"),
        (["--eval-samples", "500"], "leaves none to train on"),
        (["--damping", "1e-3"], "--damping is read by none of --methods"),
        (["--min-rank", "1"], "No such option"),
    ],
)
def test_bad_trial_inputs_are_one_line(args, words, run_cli, model_factory, data, tmp_path):
    result = run_cli("trial", "--model", model_factory("llama"), "--data", data, *args, "-o", tmp_path / "t", "-q")
    assert result.code in (1, 2) and words in result.stderr and not (tmp_path / "t").exists()
    if result.code == 1:
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_trial_end_to_end(run_cli, model_factory, data, tmp_path, monkeypatch):
    """The held-out samples reach no calibration, pre-launch or fine-tune; the same seed gives the same table; the
    winner's start is written as an adapter PEFT loads, with the rate in its metadata."""
    import tlora_cli.calib.calibrate as calibrate_module
    import tlora_cli.methods.prelaunch as prelaunch_module
    import tlora_cli.trial.arms as arms_module

    seen: list[tuple[int, ...]] = []

    def watching(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, list) and arg and isinstance(arg[0], list):  # a trainer's batches
                    seen.extend(tuple(s.input_ids) for batch in arg for s in batch)
                elif isinstance(arg, list) and arg and hasattr(arg[0], "input_ids"):  # calibration's samples
                    seen.extend(tuple(s.input_ids) for s in arg)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    watching(arms_module, "train")
    watching(prelaunch_module, "train")
    watching(calibrate_module, "whole_statistics")  # the samples calibration runs
    model_dir = model_factory("llama")
    args = [
        "trial", "--model", model_dir, "--data", data, "--methods", "tlora,random,lora-init", "--steps", "3",
        "--eval-samples", "6", "--num-samples", "4", "--seq-len", "32", "--prelaunch-steps", "2",
        "--prelaunch-batch-size", "2", "--budget-rank", "4", "--json", "-q",
    ]  # fmt: skip
    first = run_cli(*args, "-o", tmp_path / "one")
    assert first.code == 0, first.stderr
    result = json.loads(first.stdout)
    tokenizer = load_tokenizer(model_dir)
    chosen = load_calibration_set(str(data), tokenizer, 24, 32, 0)
    heldout = {tuple(s.input_ids) for s in chosen.samples[:6]}
    assert result["split"]["heldout"] == [w.replace(str(data), data.name) for w in chosen.wheres[:6]]
    assert seen and not heldout & set(seen), "a held-out sample was trained or calibrated on"
    assert {a["method"] for a in result["arms"]} == {"tlora", "random", "lora-init"}
    assert all(math.isfinite(a["heldout_loss"]) for a in result["arms"])
    second = run_cli(*args, "-o", tmp_path / "two")
    assert json.loads(second.stdout)["arms"] == [
        {**a, "seconds": b["seconds"]} for a, b in zip(result["arms"], json.loads(second.stdout)["arms"])
    ]
    best = tmp_path / "one" / "best"
    meta = json.loads((best / "tlora_metadata.json").read_text())
    assert meta["trial"]["lr"] == result["winner"]["lr"] and meta["method"] == result["winner"]["method"]
    assert meta["trial"]["steps"] == 3 and "in a 3-step trial" in (best / "README.md").read_text()
    again = tmp_path / "two" / "best" / "adapter_model.safetensors"
    assert (best / "adapter_model.safetensors").read_bytes() == again.read_bytes()
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    started_model = load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), best)
    assert rel(started_model(input_ids=ids).logits, base(input_ids=ids).logits) < 1e-5  # every start leaves W as it is
    assert json.loads((tmp_path / "one" / "trial.json").read_text())["winner"] == result["winner"]
