"""The default covariance (centred per sample), `--no-center`, and `--recipe released` against an
independent port of the released code (released_port.py)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from released_port import released_port, similarity
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tlora_cli.allocation import allocate_released
from tlora_cli.calib.folder import load_calibration
from tlora_cli.data import load_calibration_set

N, T = 6, 32


def _samples(model_dir, data_file, n=N):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = load_calibration_set(str(data_file), tokenizer, n, T, 0)
    return [(s.input_ids, s.labels) for s in calib.samples]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_released_recipe_equals_an_independent_port_of_the_released_code(
    arch, model_factory, data_file, tmp_path, tiny_init
):
    model_dir = model_factory(arch)
    out = tmp_path / "adapter"
    result = tiny_init(model_dir, out, "--recipe", "released", "--budget-rank", 4, "--alpha", 8, samples=N, seq_len=T)
    assert result.code == 0, result.stderr
    port = released_port(model_dir, _samples(model_dir, data_file), r=4, lora_alpha=8)
    meta = json.loads((out / "tlora_metadata.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    ranks = {m["name"]: m["rank"] for m in meta["modules"]}
    assert ranks == {name: p["rank"] for name, p in port.items()}
    assert len(set(ranks.values())) > 1, "the scores should spread the ranks"
    active = [n for n, r in ranks.items() if r]
    assert sorted(config["target_modules"]) == sorted(active)
    assert meta["recipe"] == "released" and meta["train_a"] is True
    assert meta["covariance"] == "covariance centred per sample"

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    peft_model = PeftModel.from_pretrained(base, out)
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert sorted(layers) == sorted(active)
    for name in active:
        assert layers[name].scaling["default"] == pytest.approx(port[name]["scaling"], rel=1e-6), name
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert similarity(a, port[name]["A"]) >= 0.9999, name


def test_released_allocation_rounds_half_to_even_and_fixes_the_sum_at_the_largest():
    # Shares 0.125 / 0.375 / 0.5 of R = 12 give 1.5 / 4.5 / 6: Python's round makes them 2 / 4 / 6 (sum 12).
    out = allocate_released(["a", "b", "c"], [(64, 64)] * 3, [1.0, 3.0, 4.0], rank=4, alpha=8)
    assert [m.rank for m in out] == [2, 4, 6]
    # alpha_i = max(alpha, round(alpha_total p_i)) = max(8, round(24 p_i)) = 8, 9, 12; scaling alpha_i / r_init.
    assert [m.scaling for m in out] == pytest.approx([8 / 4, 9 / 4, 12 / 4])
    out = allocate_released(["a", "b", "c", "d"], [(64, 64)] * 4, [3.0, 3.0, 3.0, 1.0], rank=1)
    # R = 4, quotas 1.2 / 1.2 / 1.2 / 0.4 -> 1, 1, 1, 0; one left over goes to the first module of rank 1.
    assert [m.rank for m in out] == [2, 1, 1, 0]
    assert out[3].alpha == 0.0


def test_default_covariance_is_centred_and_no_center_keeps_the_second_moment(
    model_factory, data_file, tmp_path, run_cli
):
    model_dir = model_factory("llama")
    args = ["calibrate", "--model", model_dir, "--data", data_file, "--num-samples", N, "--seq-len", T, "-q"]
    assert run_cli(*args, "-o", tmp_path / "centred").code == 0
    assert run_cli(*args, "--no-center", "-o", tmp_path / "raw").code == 0
    assert run_cli(*args, "--gradients", "-o", tmp_path / "grads").code == 0
    centred, raw = load_calibration(tmp_path / "centred"), load_calibration(tmp_path / "raw")
    assert centred.settings["center"] is True and raw.settings["center"] is False
    assert load_calibration(tmp_path / "grads").settings["center"] is False  # --gradients: lora-da's moment
    # The second moment minus the per-sample means' outer products is the centred covariance.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    inputs = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0][0]))
    for ids, _ in _samples(model_dir, data_file):
        model(input_ids=torch.tensor([ids]))
    tokens = sum(len(x) for x in inputs)
    means = sum(len(x) * torch.outer(x.mean(0), x.mean(0)) for x in inputs) / tokens
    name = "model.layers.0.mlp.down_proj"
    got = centred.stats.covariances[name].double()
    want = raw.stats.covariances[name].double() - means
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_init_never_mixes_centred_and_uncentred_statistics(model_factory, data_file, tmp_path, run_cli):
    model_dir = model_factory("llama")
    args = ["calibrate", "--model", model_dir, "--data", data_file, "--num-samples", N, "--seq-len", T, "-q"]
    assert run_cli(*args, "--no-center", "-o", tmp_path / "raw").code == 0
    assert run_cli(*args, "-o", tmp_path / "centred").code == 0

    def init(calibration, *flags):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        result = run_cli("init", "--calibration", tmp_path / calibration, *flags, "-o", out, "-q")
        return result, out

    result, out = init("raw")  # tlora's default reads the centred covariance
    assert result.code == 1 and "uncentred" in result.stderr and "--no-center" in result.stderr
    assert not out.exists()
    result, out = init("raw", "--no-center")
    assert result.code == 0, result.stderr
    assert json.loads((out / "tlora_metadata.json").read_text())["covariance"] == "uncentred second moment"
    result, out = init("centred", "--no-center")
    assert result.code == 1 and "recalibrate" in result.stderr and not out.exists()
    result, out = init("raw", "--recipe", "released")
    assert result.code == 1 and "--recipe released" in result.stderr and not out.exists()
    result, out = init("centred", "--method", "w-svd")  # reads no covariance: either calibration serves
    assert result.code == 0, result.stderr


def test_released_recipe_refuses_what_it_cannot_honour(model_factory, tiny_init, tmp_path):
    model_dir = model_factory("llama")
    for flags, word in [
        (["--uniform"], "--uniform"),
        (["--min-rank", "1"], "--min-rank"),
        (["--method", "w-svd"], "--method"),
        (["--no-center"], "--no-center"),
        (["--recipe", "paper"], "--recipe"),
    ]:
        result = tiny_init(model_dir, tmp_path / "x", "--recipe", "released", *flags)
        assert result.code == 1 and word in result.stderr and len(result.stderr.strip().splitlines()) == 1, flags
        assert not (tmp_path / "x").exists()


def test_released_recipe_takes_256_samples_unless_told(model_factory, tmp_path, run_cli):
    model_dir = model_factory("llama")
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"text": f"Sample number {i} says hello."}) + "\n" for i in range(300)))
    out = tmp_path / "calib"
    args = ["calibrate", "--model", model_dir, "--data", data, "--seq-len", 16, "-q", "-o", out]
    assert run_cli(*args, "--recipe", "released").code == 0
    assert load_calibration(out).stats.num_samples == 256
    assert run_cli(*args, "--overwrite").code == 0
    assert load_calibration(out).stats.num_samples == 32


def test_a_released_plan_needs_the_released_recipe_at_init_and_then_equals_one_go(
    model_factory, data_file, tmp_path, run_cli
):
    """The recipe decides more than the plan's ranks and alphas (A trains): init may not quietly drop it."""
    model_dir = model_factory("llama")
    common = ["--model", model_dir, "--data", data_file, "--num-samples", N, "--seq-len", T, "-q"]
    assert run_cli("init", *common, "--recipe", "released", "-o", tmp_path / "one-go").code == 0
    assert run_cli("calibrate", *common, "--recipe", "released", "-o", tmp_path / "calib").code == 0
    plan = tmp_path / "plan.json"
    assert run_cli("allocate", tmp_path / "calib", "--recipe", "released", "-o", plan, "-q").code == 0
    staged = ["init", "--calibration", tmp_path / "calib", "--plan", plan, "-q"]
    result = run_cli(*staged, "-o", tmp_path / "forgot")
    assert result.code == 1 and "--recipe released" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "forgot").exists()
    assert run_cli(*staged, "--recipe", "released", "-o", tmp_path / "staged").code == 0
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "one-go" / file).read_bytes() == (tmp_path / "staged" / file).read_bytes()
    metadata = json.loads((tmp_path / "staged" / "tlora_metadata.json").read_text())
    assert metadata["released_recipe"] and metadata["train_a"] is True
