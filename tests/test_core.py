"""The whole-model path against an independent float64 computation, and the adapter in PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from reference import reference_statistics, rel_err, top_right_singular
from safetensors.torch import load_file
from tiny_models import make_hub_cache, use_offline_hub_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from tlora_cli.allocation import allocate
from tlora_cli.calib.folder import load_calibration
from tlora_cli.data import load_calibration_set
from tlora_cli.training import load_for_training

SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCHS = ["llama", "qwen2", "mistral"]
N, T = 6, 32


def _samples(model_dir, data_file):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = load_calibration_set(str(data_file), tokenizer, N, T, 0)
    return [(s.input_ids, s.labels) for s in calib.samples]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("center", [False, True])
def test_calibration_equals_independent_float64_computation(arch, center, model_factory, data_file, tmp_path, run_cli):
    model_dir = model_factory(arch)
    args = ["calibrate", "--model", model_dir, "--data", data_file, "--num-samples", N, "--seq-len", T]
    result = run_cli(*args, *([] if center else ["--no-center"]), "-o", tmp_path / "calib", "--quiet")
    assert result.code == 0, result.stderr
    calib = load_calibration(tmp_path / "calib")
    ref = reference_statistics(model_dir, _samples(model_dir, data_file), SUFFIXES, center)
    assert [t.name for t in calib.stats.targets] == ref.names
    assert calib.stats.num_tokens == ref.tokens
    for name in ref.names:
        cov = calib.stats.covariances[calib.stats.input_of[name]]
        assert cov.dtype == torch.float32
        assert rel_err(cov, ref.covariances[name]) < 1e-5, name
        assert rel_err(calib.stats.scores[name], ref.scores[name]) < 1e-5, name
    # q/k/v read one tensor and gate/up another: one covariance each, named after the first reader.
    layer = "model.layers.0"
    assert {calib.stats.input_of[f"{layer}.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")} == {
        f"{layer}.self_attn.q_proj"
    }
    assert calib.stats.input_of[f"{layer}.mlp.up_proj"] == f"{layer}.mlp.gate_proj"
    assert calib.stats.input_of[f"{layer}.mlp.down_proj"] == f"{layer}.mlp.down_proj"
    assert len(calib.stats.covariances) == 4 * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_init_matches_reference_and_loads_in_peft(arch, model_factory, data_file, tmp_path, tiny_init):
    model_dir = model_factory(arch)
    out = tmp_path / "adapter"
    result = tiny_init(model_dir, out, "--budget-rank", 1, "--alpha", 4, samples=N, seq_len=T)
    assert result.code == 0, result.stderr
    ref = reference_statistics(model_dir, _samples(model_dir, data_file), SUFFIXES, center=True)  # the default
    shapes = [tuple(ref.weights[n].shape) for n in ref.names]
    expected = allocate(ref.names, shapes, [ref.scores[n] for n in ref.names], rank=1, alpha=4)
    config = json.loads((out / "adapter_config.json").read_text())
    meta = json.loads((out / "tlora_metadata.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")

    ranks = {m["name"]: m["rank"] for m in meta["modules"]}
    assert sum(ranks.values()) == len(ref.names)
    assert ranks == {e.name: e.rank for e in expected}
    zero = [n for n, r in ranks.items() if r == 0]
    assert zero, "the budget should leave some module without adapter"
    active = [n for n, r in ranks.items() if r > 0]
    assert config["target_modules"] == active
    assert config["rank_pattern"] == {n: ranks[n] for n in active}
    assert config["alpha_pattern"] == pytest.approx({e.name: e.alpha for e in expected if e.rank})
    assert set(tensors) == {f"base_model.model.{n}.lora_{p}.weight" for n in active for p in "AB"}
    for n in active:
        a = tensors[f"base_model.model.{n}.lora_A.weight"].double()
        assert a.shape == (ranks[n], ref.weights[n].shape[1])
        assert torch.allclose(a @ a.T, torch.eye(ranks[n], dtype=torch.float64), atol=1e-5)
        want = top_right_singular(ref.weights[n], ref.covariances[n], ranks[n])
        assert (torch.linalg.matrix_norm(want @ a.T) ** 2 / ranks[n]).item() > 0.9999, n
        assert not tensors[f"base_model.model.{n}.lora_B.weight"].any()

    # PEFT: no missing or unexpected keys, A as saved, per-module scaling, output unchanged.
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([_samples(model_dir, data_file)[0][0]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(base, out, is_trainable=True)
    check = peft_model.load_adapter(out, adapter_name="check")
    assert not check.unexpected_keys
    assert not [k for k in check.missing_keys if "lora_" in k and ".check." in k]
    lora_layers = {
        n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    assert sorted(lora_layers) == sorted(active)
    for n, layer in lora_layers.items():
        assert torch.equal(layer.lora_A["default"].weight, tensors[f"base_model.model.{n}.lora_A.weight"])
        assert layer.scaling["default"] == pytest.approx(config["alpha_pattern"][n] / ranks[n])
    peft_model.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, base_logits)


def test_training_helper_keeps_a_frozen_through_set_adapter(model_factory, data_file, tmp_path, run_cli, tiny_init):
    model_dir = model_factory("llama")
    out = tmp_path / "adapter"
    assert tiny_init(model_dir, out, "--budget-rank", 4).code == 0
    model = load_for_training(AutoModelForCausalLM.from_pretrained(model_dir), out)
    model.set_adapter("default")  # PEFT re-enables every lora_ weight here
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n for n in trainable)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids = torch.tensor([_samples(model_dir, data_file)[0][0]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if ".lora_B." in n}
    # A is still saved with the adapter, under PEFT's usual key.
    model.save_pretrained(tmp_path / "trained")
    saved = load_file(tmp_path / "trained" / "adapter_model.safetensors")
    original = load_file(out / "adapter_model.safetensors")
    assert {k for k in saved if "lora_A" in k} == {k for k in original if "lora_A" in k}
    assert all(torch.equal(saved[k], original[k]) for k in original if "lora_A" in k)


def test_same_inputs_give_identical_bytes_and_stages_equal_one_go(model_factory, data_file, tmp_path, run_cli):
    model_dir = model_factory("qwen2")
    common = ["--model", model_dir, "--data", data_file, "--num-samples", 5, "--seq-len", 24, "-q"]
    for name in ("one", "two"):
        assert run_cli("init", *common, "--budget-rank", 3, "-o", tmp_path / name).code == 0
    assert run_cli("calibrate", *common, "-o", tmp_path / "calib").code == 0
    assert run_cli("allocate", tmp_path / "calib", "--budget-rank", 3, "-o", tmp_path / "plan.json", "-q").code == 0
    assert (
        run_cli(
            "init",
            "--calibration",
            tmp_path / "calib",
            "--model",
            model_dir,
            "--plan",
            tmp_path / "plan.json",
            "-o",
            tmp_path / "staged",
            "-q",
        ).code
        == 0
    )
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        one = (tmp_path / "one" / file).read_bytes()
        assert one == (tmp_path / "two" / file).read_bytes()
        assert one == (tmp_path / "staged" / file).read_bytes()


def test_edited_plan_is_honoured(model_factory, data_file, tmp_path, run_cli):
    model_dir = model_factory("llama")
    common = ["--model", model_dir, "--data", data_file, "--num-samples", 4, "--seq-len", 24, "-q"]
    assert run_cli("calibrate", *common, "-o", tmp_path / "calib").code == 0
    assert (
        run_cli("allocate", tmp_path / "calib", "--uniform", "--budget-rank", 2, "-o", tmp_path / "plan.json").code == 0
    )
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {(m["rank"], m["alpha"]) for m in plan["modules"]} == {(2, 2.0)}
    plan["modules"][0].update(rank=5, alpha=7.5)
    plan["modules"][1].update(rank=0)
    for module in plan["modules"][:2]:  # what follows from rank and alpha is corrected, or deleted as here
        for derived in ("scaling", "trainable_params_b", "trainable_params_ab"):
            del module[derived]
    del plan["totals"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert (
        run_cli(
            "init", "--calibration", tmp_path / "calib", "--plan", tmp_path / "plan.json", "-o", tmp_path / "out", "-q"
        ).code
        == 0
    )
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    first, second = plan["modules"][0]["name"], plan["modules"][1]["name"]
    assert config["rank_pattern"][first] == 5 and config["alpha_pattern"][first] == 7.5
    assert second not in config["target_modules"] and second not in config["rank_pattern"]
    assert config["r"] == 5 and config["lora_alpha"] == 7.5


def test_uniform_and_min_rank(model_factory, data_file, tmp_path, run_cli):
    model_dir = model_factory("mistral")
    common = ["--model", model_dir, "--data", data_file, "--num-samples", 4, "--seq-len", 24, "-q"]
    assert run_cli("init", *common, "--uniform", "--budget-rank", 3, "--alpha", 6, "-o", tmp_path / "u").code == 0
    config = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {3} and set(config["alpha_pattern"].values()) == {6}
    assert len(config["target_modules"]) == 14
    assert run_cli("init", *common, "--budget-rank", 1, "--min-rank", 1, "-o", tmp_path / "m").code == 0
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {1} and len(config["target_modules"]) == 14


def test_hub_id_resolves_through_an_offline_cache(model_factory, data_file, tmp_path, run_cli, monkeypatch):
    cache = tmp_path / "hub"
    make_hub_cache(model_factory("llama"), cache, "tiny-org/tiny-llama")
    use_offline_hub_cache(monkeypatch, cache)
    out = tmp_path / "adapter"
    result = run_cli(
        "init",
        "--model",
        "tiny-org/tiny-llama",
        "--data",
        data_file,
        "--num-samples",
        3,
        "--seq-len",
        16,
        "-o",
        out,
        "-q",
    )
    assert result.code == 0, result.stderr
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/tiny-llama"
    missing = run_cli("init", "--model", "tiny-org/not-cached", "--data", data_file, "-o", tmp_path / "x")
    assert missing.code == 1 and "no cached copy" in missing.stderr and not (tmp_path / "x").exists()


def test_inspect_reports_the_adapter(model_factory, data_file, tmp_path, run_cli, tiny_init):
    model_dir = model_factory("llama")
    out = tmp_path / "adapter"
    assert tiny_init(model_dir, out, "--budget-rank", 2).code == 0
    result = run_cli("inspect", out, "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    meta = json.loads((out / "tlora_metadata.json").read_text())
    active = [m for m in meta["modules"] if m["rank"]]
    assert [m["name"] for m in summary["modules"]] == [m["name"] for m in active]
    assert summary["totals"]["rank"] == 2 * 14
    assert summary["totals"]["params_b"] == sum(m["shape"][0] * m["rank"] for m in active)
    assert summary["totals"]["params_ab"] == sum((m["shape"][0] + m["shape"][1]) * m["rank"] for m in active)
    assert summary["uniform_lora"]["params_ab"] == sum((m["shape"][0] + m["shape"][1]) * 2 for m in meta["modules"])
    assert sum(g["rank"] for g in summary["by_layer"].values()) == 28
    assert set(summary["by_type"]) <= set(SUFFIXES)
    for m in summary["modules"]:
        assert m["scaling"] == pytest.approx(m["alpha"] / m["rank"])
    table = run_cli("inspect", out, "--modules")
    assert table.code == 0 and "uniform LoRA r=2" in table.stdout and "Budget per layer" in table.stdout


@pytest.mark.parametrize(("method", "trains_a"), [("w-svd", False), ("random", True), ("theory", False)])
def test_other_methods_write_loadable_adapters(
    method, trains_a, model_factory, data_file, tmp_path, run_cli, tiny_init
):
    model_dir = model_factory("llama")
    out = tmp_path / method
    result = tiny_init(model_dir, out, "--budget-rank", 2, "--method", method)
    assert result.code == 0, result.stderr
    meta = json.loads((out / "tlora_metadata.json").read_text())
    assert meta["method"] == method and meta["train_a"] is trains_a
    if method == "w-svd":  # A spans W's own top right singular vectors, whatever the data
        tensors = load_file(out / "adapter_model.safetensors")
        weights = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).state_dict()
        for m in (m for m in meta["modules"] if m["rank"]):
            a = tensors[f"base_model.model.{m['name']}.lora_A.weight"].double()
            eye = torch.eye(m["shape"][1], dtype=torch.float64)
            want = top_right_singular(weights[f"{m['name']}.weight"], eye, m["rank"])
            assert (torch.linalg.matrix_norm(want @ a.T) ** 2 / m["rank"]).item() > 0.9999
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([_samples(model_dir, data_file)[0][0]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = load_for_training(base, out)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    a_trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_A." in n}
    assert bool(a_trainable) is trains_a
    flipped = tiny_init(model_dir, tmp_path / "f", "--method", method, "--train-a" if not trains_a else "--freeze-a")
    assert flipped.code == 0
    assert json.loads((tmp_path / "f" / "tlora_metadata.json").read_text())["train_a"] is (not trains_a)


def test_bad_method(run_cli, model_factory, data_file, tmp_path):
    result = run_cli(
        "init", "--model", model_factory("llama"), "--data", data_file, "--method", "pissa", "-o", tmp_path / "x"
    )
    assert result.code == 1 and "--method must be one of" in result.stderr and not (tmp_path / "x").exists()


def test_inspect_works_without_metadata(model_factory, tmp_path, tiny_init, run_cli):
    out = tmp_path / "adapter"
    assert tiny_init(model_factory("llama"), out, "--budget-rank", 2).code == 0
    (out / "tlora_metadata.json").unlink()
    summary = json.loads(run_cli("inspect", out, "--json").stdout)
    active = summary["modules"]
    assert summary["uniform_lora"]["rank"] == round(sum(m["rank"] for m in active) / len(active))
    assert summary["targets"] == len(active)


@pytest.mark.parametrize("engine", ["stream", "whole"])
def test_lora_da_statistics_equal_independent_computation(engine, model_factory, data_file, tmp_path, run_cli):
    model_dir = model_factory("llama")
    args = ["--model", model_dir, "--data", data_file, "--num-samples", N, "--seq-len", T, "--engine", engine, "-q"]
    assert run_cli("calibrate", *args, "--gradients", "-o", tmp_path / "calib").code == 0
    calib = load_calibration(tmp_path / "calib")
    ref = reference_statistics(model_dir, _samples(model_dir, data_file), SUFFIXES)
    for name in ref.names:
        assert rel_err(calib.stats.tensors["mean_grads"][name], ref.mean_grads[name]) < 1e-5, name
        assert rel_err(calib.stats.tensors["output_grad_sq"][name], ref.output_grad_sq[name]) < 1e-5, name
    out = tmp_path / "adapter"
    result = run_cli("init", "--calibration", tmp_path / "calib", "--method", "lora-da", "-o", out, "-q")
    assert result.code == 0, result.stderr
    assert json.loads((out / "tlora_metadata.json").read_text())["method"] == "lora-da"
    # Without the gradient statistics, lora-da says what to do instead.
    assert run_cli("calibrate", *args, "-o", tmp_path / "plain").code == 0
    result = run_cli("init", "--calibration", tmp_path / "plain", "--method", "lora-da", "-o", tmp_path / "x", "-q")
    assert result.code == 1 and "--gradients" in result.stderr and not (tmp_path / "x").exists()


def test_lora_da_adapter_loads_and_leaves_the_output_unchanged(model_factory, data_file, tmp_path, tiny_init):
    model_dir = model_factory("qwen2")
    out = tmp_path / "adapter"
    result = tiny_init(model_dir, out, "--method", "lora-da", "--lora-da-population", 100)
    assert result.code == 0, result.stderr
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([_samples(model_dir, data_file)[0][0]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        model = load_for_training(base, out)
        assert torch.equal(model(input_ids=ids).logits, want)
    meta = json.loads((out / "tlora_metadata.json").read_text())
    assert meta["lora_da_population"] == 100 and meta["train_a"] is False
