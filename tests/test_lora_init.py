"""LoRA-Init (SPEC.md, "Task-specific directions"): the pre-launch, the chosen directions, the residual adapter,
and every path that must put it on W_res rather than on the unchanged model."""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from cli_main import run_main
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_export import peft_deltas, server_deltas
from transformers import AutoModelForCausalLM

from tlora_cli.data import load_calibration_set
from tlora_cli.factorisation import random_a
from tlora_cli.methods.prelaunch import cycled
from tlora_cli.model.loading import load_tokenizer
from tlora_cli.training import load_for_training

IDS = torch.tensor([[3, 17, 5, 42, 8, 11, 29, 4, 15, 7, 21, 9]])
RANK, ALPHA, STEPS, BATCH, SEQ = 4, 8.0, 3, 2, 24


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def prelaunch_args(model_dir: Path, data: Path, method: str = "lora-init") -> list:
    """init's flags for a short pre-launch on a tiny model (-o to add)."""
    return ["init", "--model", model_dir, "--data", data, "--method", method, "--budget-rank", RANK, "--alpha", ALPHA,
            "--prelaunch-steps", STEPS, "--prelaunch-batch-size", BATCH, "--seq-len", SEQ, "-q"]  # fmt: skip


def lora_init(run_cli, model_dir: Path, data: Path, out: Path, *extra: str | Path):
    return run_cli(*prelaunch_args(model_dir, data), *extra, "-o", out)


@pytest.fixture(scope="module")
def made(model_factory, data_file, tmp_path_factory):
    """One lora-init run on a tiny float32 Llama, with its pre-launch LoRA saved."""
    folder = tmp_path_factory.mktemp("lora-init")
    model_dir = model_factory("llama")
    run_main(*prelaunch_args(model_dir, data_file), "--save-prelaunch", folder / "prelaunch", "-o", folder / "out")
    return model_dir, folder / "out", folder / "prelaunch"


def sidecar(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(out / "tlora_directions.safetensors").items():
        name, _, field = key.rpartition(".")
        entries.setdefault(name, {})[field] = t
    return entries


def modules_of(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_file(adapter / "adapter_model.safetensors")
    names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors}
    return {
        n: (tensors[f"base_model.model.{n}.lora_A.weight"], tensors[f"base_model.model.{n}.lora_B.weight"])
        for n in names
    }


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {name: module.weight.detach() for name, module in model.named_modules() if hasattr(module, "weight")}


def test_the_adapter_holds_w_s_most_changed_directions(made):
    """s B0 A0 is sum over the chosen j of sigma_j u_j v_j^T from an independent float64 SVD of W, and the chosen j
    are the top r of the change rates recomputed here from the saved pre-launch LoRA (dW formed in full)."""
    model_dir, out, prelaunch = made
    w = weights(model_dir)
    chosen = sidecar(out)
    pre = modules_of(prelaunch)
    scaling = ALPHA / RANK
    assert chosen.keys() == pre.keys() and len(chosen) == 14
    for name, (a, b) in modules_of(out).items():
        u, s, vh = torch.linalg.svd(w[name].double(), full_matrices=False)
        dw = scaling * (pre[name][1].double() @ pre[name][0].double())
        rates = (u.T @ dw @ vh.T).diagonal().abs() / (s + 1e-6)
        expected = sorted(range(len(rates)), key=lambda j: (-rates[j].item(), j))[:RANK]
        assert chosen[name]["indices"].tolist() == expected, name
        assert torch.allclose(chosen[name]["rates"], rates[expected], rtol=1e-6), name
        reference = (u[:, expected] * s[expected]) @ vh[expected]
        assert rel(scaling * (b.double() @ a.double()), reference) < 1e-5, name


def test_the_residual_base_and_the_adapter_give_the_base_model(made, run_cli, tmp_path):
    """Before training, W_res + s B A = W: through the training helper, and through the residual-base export, which
    transformers loads as any model; the helper does not subtract twice from that export."""
    model_dir, out, _ = made
    reference = logits(AutoModelForCausalLM.from_pretrained(model_dir))
    assert rel(logits(load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), out)), reference) < 1e-5
    on_the_base = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out))
    assert rel(on_the_base, reference) > 1e-2  # the mistake the card, inspect and export warn against
    result = run_cli("export", out, "--format", "residual-base", "--model", model_dir, "-o", tmp_path / "base")
    assert result.code == 0, result.stderr
    residual_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert rel(logits(PeftModel.from_pretrained(residual_base, out)), reference) < 1e-5
    helper = load_for_training(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out)
    assert rel(logits(helper), reference) < 1e-5
    card = (tmp_path / "base" / "README.md").read_text()
    assert "Not a model to use on its own" in card


def test_a_trained_residual_adapter_becomes_a_plain_lora_on_the_original_base(made, run_cli, tmp_path):
    model_dir, out, _ = made
    model = load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), out)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(".lora_A." in n for n, p in model.named_parameters() if p.requires_grad)  # LoRA-Init trains A
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = logits(model)
    model.save_pretrained(tmp_path / "trained")
    result = run_cli("export", tmp_path / "trained", "--format", "lora", "--initial", out, "-o", tmp_path / "plain")
    assert result.code == 0, result.stderr
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "plain")
    assert rel(logits(plain), trained) < 1e-5
    assert rel(trained, logits(AutoModelForCausalLM.from_pretrained(model_dir))) > 1e-2  # training moved it
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {2 * RANK}
    reference = peft_deltas(model_dir, tmp_path / "plain")
    for fmt in ("vllm", "padded"):
        assert run_cli("export", tmp_path / "plain", "--format", fmt, "-o", tmp_path / fmt, "-q").code == 0
        served = server_deltas(tmp_path / fmt)
        assert all(torch.allclose(served[n], d, atol=1e-6, rtol=1e-5) for n, d in reference.items())
    merged_args = ("--format", "merged", "--model", model_dir, "-o", tmp_path / "merged", "-q")
    assert run_cli("export", tmp_path / "plain", *merged_args).code == 0
    assert rel(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), trained) < 1e-5


def test_the_prelaunch_is_a_plain_peft_lora_trained_the_same_way(made, data_file):
    """The saved pre-launch LoRA equals PEFT's LoRA with the same start, trained by a plain torch loop: AdamW
    (weight decay 0), the rate warmed up as (k + 1) / t, the loss the mean over each batch's answer tokens."""
    model_dir, _, prelaunch = made
    tokenizer = load_tokenizer(model_dir)
    calib = load_calibration_set(str(data_file), tokenizer, STEPS * BATCH, SEQ, 0)
    order = cycled(len(calib.samples), STEPS * BATCH, 0)
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            short = name.removeprefix("base_model.model.")
            generator = torch.Generator().manual_seed(zlib.crc32(f"0:{short}".encode()))
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(random_a(module.in_features, RANK, generator))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    for k in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = 2e-4 * (k + 1) / STEPS
        batch = [calib.samples[i] for i in order[k * BATCH : (k + 1) * BATCH]]
        total = sum(sum(label != -100 for label in s.labels[1:]) for s in batch)
        for s in batch:
            out = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
            labels = torch.tensor(s.labels[1:])
            (torch.nn.functional.cross_entropy(out, labels, ignore_index=-100, reduction="sum") / total).backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = modules_of(prelaunch)
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = saved[name.removeprefix("base_model.model.")]
            assert rel(a, module.lora_A["default"].weight.detach()) < 1e-5, name
            assert rel(b, module.lora_B["default"].weight.detach()) < 1e-4, name
    meta = json.loads((prelaunch.parent / "out" / "tlora_metadata.json").read_text())
    assert len(meta["calibration"]["prelaunch"]["losses"]) == STEPS and meta["residual"]["id"]


def test_same_seed_same_bytes(made, run_cli, data_file, tmp_path):
    model_dir, out, _ = made
    assert lora_init(run_cli, model_dir, data_file, tmp_path / "again").code == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "tlora_directions.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


def test_every_tlora_path_knows_the_base_must_be_w_res(made, run_cli, tmp_path):
    _, out, prelaunch = made
    card = (out / "README.md").read_text()
    body = card.split("---", 2)[2]
    assert body.index("residual adapter") < body.index("## How it was made") and "do not load it" in body
    shown = run_cli("inspect", out)
    assert shown.code == 0 and "residual adapter" in shown.stdout
    for fmt in ("vllm", "padded", "merged"):
        result = run_cli("export", out, "--format", fmt, "-o", tmp_path / fmt)
        assert result.code == 1 and "a residual adapter" in result.stderr and "--format lora" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / fmt).exists()
    result = run_cli("export", prelaunch, "--format", "residual-base", "-o", tmp_path / "rb")
    assert result.code == 1 and "not a residual adapter" in result.stderr
    result = run_cli("export", prelaunch, "--format", "lora", "-o", tmp_path / "plain")
    assert result.code == 1 and "no residual factors and no Dash term" in result.stderr
    assert not (tmp_path / "rb").exists() and not (tmp_path / "plain").exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--min-rank", "1"], "drop --min-rank"),
        (["--no-rank-allocation"], "drop --no-rank-allocation"),
        (["--damping", "1e-3"], "--damping is read by --method theory and lora-da"),
        (["--prelaunch-steps", "0"], "--prelaunch-steps must be at least 1"),
        (["--prelaunch-lr", "-1"], "--prelaunch-lr must be positive"),
    ],
)
def test_flags_lora_init_cannot_use_are_one_line(run_cli, model_factory, data_file, tmp_path, extra, words):
    result = lora_init(run_cli, model_factory("llama"), data_file, tmp_path / "out", *extra)
    assert result.code == 1 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_prelaunch_that_cannot_fit_says_how_much_is_missing(run_cli, model_factory, data_file, tmp_path, monkeypatch):
    import tlora_cli.methods.prelaunch as prelaunch

    monkeypatch.setattr(prelaunch, "free_memory", lambda device: 100_000)  # the tiny model alone is ~400 kB
    result = lora_init(run_cli, model_factory("llama"), data_file, tmp_path / "out")
    assert result.code == 1 and "GB short" in result.stderr and "GB of weights" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_prelaunch_checkpoints_and_accumulates_when_memory_is_short(
    model_factory, run_cli, data_file, tmp_path, monkeypatch
):
    """Gradient checkpointing and micro-batches give the same pre-launch as a batch run whole (up to rounding)."""
    import tlora_cli.methods.prelaunch as prelaunch
    import tlora_cli.train.memory as memory

    model_dir = model_factory("llama")
    whole = memory.Plan(BATCH, False, "test: the whole batch at once")
    checkpointed = memory.Plan(1, True, "test: one sample at a time, checkpointed")
    results = {}
    for plan in (whole, checkpointed):
        monkeypatch.setattr(prelaunch.memory, "plan", lambda *a, plan=plan, **k: plan)
        out = tmp_path / str(plan.micro_batch)
        assert (
            lora_init(run_cli, model_dir, data_file, out, "--save-prelaunch", tmp_path / f"p{plan.micro_batch}").code
            == 0
        )
        results[plan.micro_batch] = modules_of(tmp_path / f"p{plan.micro_batch}")
        meta = json.loads((out / "tlora_metadata.json").read_text())["calibration"]["prelaunch"]
        assert meta["gradient_checkpointing"] is plan.checkpointing and meta["micro_batch"] == plan.micro_batch
    for name, (a, b) in results[1].items():
        assert rel(a, results[BATCH][name][0]) < 1e-5 and rel(b, results[BATCH][name][1]) < 1e-4, name


@pytest.mark.slow
def test_two_ranks_give_the_same_indices_and_adapter(model_factory, data_file, tmp_path):
    from test_distributed import torchrun

    model_dir = model_factory("llama")
    args = prelaunch_args(model_dir, data_file)
    one = torchrun(1, *args, "-o", tmp_path / "one")
    two = torchrun(2, *args, "-o", tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    for name, entry in sidecar(tmp_path / "one").items():
        assert torch.equal(sidecar(tmp_path / "two")[name]["indices"], entry["indices"]), name
    for name, (a, b) in modules_of(tmp_path / "one").items():
        a2, b2 = modules_of(tmp_path / "two")[name]
        assert (a - a2).abs().max() < 1e-4 and (b - b2).abs().max() < 1e-4, name
    record = json.loads((tmp_path / "two" / "tlora_metadata.json").read_text())["calibration"]["distributed"]
    assert record["world_size"] == 2


@pytest.mark.slow
def test_the_builtin_model_end_to_end_with_a_short_prelaunch(run_cli, tmp_path):
    """SmolLM2 (bf16 checkpoint, float32 on CPU) and the built-in math set: the adapter loads in the helper on
    W_res and the model's output is the base model's up to the bf16 rounding of W_res."""
    from tlora_cli.model.builtin import builtin_model_path

    out = tmp_path / "out"
    result = run_cli(
        "init",
        "--method",
        "lora-init",
        "--prelaunch-steps",
        "2",
        "--prelaunch-batch-size",
        "2",
        "--seq-len",
        "64",
        "--budget-rank",
        "4",
        "-q",
        "-o",
        out,
    )
    assert result.code == 0, result.stderr
    base = builtin_model_path()
    reference = logits(AutoModelForCausalLM.from_pretrained(base))
    helper = load_for_training(AutoModelForCausalLM.from_pretrained(base), out)
    assert rel(logits(helper), reference) < 2e-2  # W_res is rounded to bf16, the checkpoint's dtype
    assert math.isfinite(
        json.loads((out / "tlora_metadata.json").read_text())["calibration"]["prelaunch"]["losses"][-1]
    )
    shutil.rmtree(out)
