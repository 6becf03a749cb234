"""Fault injection: what a clumsy or hostile user can hand tlora. Each case ends in one line and exit 1 (usage
errors: exit 2, as Click does), never an internal error, and leaves every input and every unrelated file
byte-for-byte as it was."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tlora_cli.outputs import atomic as output

N_ARGS = ("--num-samples", "3", "--seq-len", "16", "-q")


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots (links not followed) with its bytes' hash: the 'untouched' check."""
    seen = {}
    for root in roots:
        paths = [root] if root.is_file() or root.is_symlink() else sorted(root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                seen[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                seen[str(p)] = "dir"
    return seen


def one_line(result, code: int = 1, *needles: str) -> str:
    assert result.code == code, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "internal error" not in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_debris(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def model(model_factory, tmp_path) -> Path:
    """A private copy of the tiny model, so a test may damage it or point -o at it."""
    folder = tmp_path / "model"
    shutil.copytree(model_factory("llama"), folder)
    return folder


@pytest.fixture
def data(data_file, tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(data_file, folder / "calib.jsonl")
    return folder / "calib.jsonl"


@pytest.fixture
def calibration(run_cli, model, data, tmp_path) -> Path:
    out = tmp_path / "calib"
    result = run_cli("calibrate", "--model", model, "--data", data, *N_ARGS, "-o", out)
    assert result.code == 0, result.stderr
    return out


def init_args(model: Path, data: Path, out: Path, *args) -> list:
    return ["init", "--model", model, "--data", data, *N_ARGS, *args, "-o", out]


# --- Data loss: --overwrite replaces only what tlora wrote, and never an input -------------------------------


def test_overwrite_refuses_a_folder_of_user_files(run_cli, model, data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    before = snapshot(tmp_path)
    one_line(run_cli(*init_args(model, data, out, "--overwrite")), 1, "not an adapter folder written by tlora")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_regular_file(run_cli, model, data, tmp_path):
    out = tmp_path / "thesis.pdf"
    out.write_bytes(b"%PDF precious")
    before = snapshot(tmp_path)
    one_line(run_cli(*init_args(model, data, out, "--overwrite")), 1, "not an adapter folder")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_the_model_itself(run_cli, model, data, tmp_path):
    before = snapshot(tmp_path)
    one_line(run_cli(*init_args(model, data, model, "--overwrite")), 1, "--model")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_the_calibration_being_read(run_cli, model, calibration, tmp_path):
    before = snapshot(tmp_path)
    args = ["init", "--model", model, "--calibration", calibration, "-q", "--overwrite", "-o", calibration]
    one_line(run_cli(*args), 1, "--calibration")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_the_data_and_its_folder(run_cli, model, data, tmp_path):
    before = snapshot(tmp_path)
    one_line(run_cli(*init_args(model, data, data, "--overwrite")), 1, "--data")
    one_line(run_cli(*init_args(model, data, data.parent, "--overwrite")), 1, "--data")
    one_line(run_cli(*init_args(model, data, data.parent)), 1, "--data")  # contains it, even without --overwrite
    assert snapshot(tmp_path) == before


def test_plan_is_never_written_over_its_calibration(run_cli, calibration, tmp_path):
    before = snapshot(tmp_path)
    one_line(run_cli("allocate", calibration, "-q", "--overwrite", "-o", calibration), 1)
    one_line(run_cli("allocate", calibration, "-q", "--overwrite", "-o", calibration / "calibration.json"), 1)
    assert snapshot(tmp_path) == before


def test_output_inside_an_input_folder_is_refused(run_cli, model, data, tmp_path):
    before = snapshot(tmp_path)
    one_line(run_cli(*init_args(model, data, model / "adapter")), 1, "lies inside", "--model")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_its_own_outputs(run_cli, model, data, calibration, tmp_path):
    out = tmp_path / "adapter"
    assert run_cli(*init_args(model, data, out)).code == 0
    assert run_cli(*init_args(model, data, out, "--overwrite", "--budget-rank", "4")).code == 0
    assert json.loads((out / "tlora_metadata.json").read_text())["allocation"]["budget_rank"] == 4
    plan = tmp_path / "plan.json"
    assert run_cli("allocate", calibration, "-q", "-o", plan).code == 0
    assert run_cli("allocate", calibration, "-q", "--overwrite", "--budget-rank", "4", "-o", plan).code == 0
    assert run_cli("calibrate", "--model", model, "--data", data, *N_ARGS, "--overwrite", "-o", calibration).code == 0
    no_debris(tmp_path)


def test_overwrite_refuses_another_kind_of_tlora_output(run_cli, model, data, calibration, tmp_path):
    """A calibration is not an adapter: `init -o CALIB --overwrite` must not replace it."""
    other = tmp_path / "other-calib"
    shutil.copytree(calibration, other)
    before = snapshot(tmp_path)
    one_line(run_cli(*init_args(model, data, other, "--overwrite")), 1, "not an adapter folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", [".", ""])
def test_output_that_names_no_new_path(run_cli, model, data, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    one_line(run_cli(*init_args(model, data, name, "--overwrite")), 1)
    assert snapshot(tmp_path) == before


def test_output_given_as_a_symlink(run_cli, model, data, tmp_path):
    target = tmp_path / "real-adapter"
    assert run_cli(*init_args(model, data, target)).code == 0
    link = tmp_path / "link"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path)
    one_line(run_cli(*init_args(model, data, link, "--overwrite")), 1, "symbolic link")
    one_line(run_cli(*init_args(model, data, dangling)), 1, "symbolic link")
    assert snapshot(tmp_path) == before


def test_interrupt_while_the_old_output_is_removed(run_cli, model, data, tmp_path, monkeypatch):
    """A SIGTERM after the new OUT is in place: no half-deleted debris, and no message saying nothing was written."""
    out = tmp_path / "adapter"
    assert run_cli(*init_args(model, data, out)).code == 0
    real_remove = output._remove

    def remove(path: Path) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        real_remove(path)

    monkeypatch.setattr(output, "_remove", remove)
    result = run_cli(*init_args(model, data, out, "--overwrite", "--budget-rank", "4"))
    assert result.code == 130
    assert "nothing was written" not in result.stderr and "written in full" in result.stderr
    assert json.loads((out / "tlora_metadata.json").read_text())["allocation"]["budget_rank"] == 4
    no_debris(tmp_path)


def test_interrupt_before_the_swap_keeps_the_old_output(run_cli, model, data, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    assert run_cli(*init_args(model, data, out)).code == 0
    before = snapshot(out)
    from tlora_cli.adapter import writer as adapter

    def write(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter, "write_metadata", write)
    monkeypatch.setattr("tlora_cli.pipeline.write_metadata", write)
    result = run_cli(*init_args(model, data, out, "--overwrite", "--budget-rank", "4"))
    assert result.code == 130 and "nothing was written" in result.stderr
    assert snapshot(out) == before
    no_debris(tmp_path)


def test_outputs_follow_the_umask(run_cli, model, data, calibration, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "adapter"
        assert run_cli(*init_args(model, data, out)).code == 0
        plan = tmp_path / "plan.json"
        assert run_cli("allocate", calibration, "-q", "-o", plan).code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in ("adapter_model.safetensors", "adapter_config.json", "tlora_metadata.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(plan.stat().st_mode) == 0o644


def test_output_under_a_file_says_so(run_cli, model, data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_line(run_cli(*init_args(model, data, blocker / "out")), 1, "is a file")
    assert "does not exist" not in line


# --- No exit 0 with a broken or irreproducible adapter -------------------------------------------------------


def test_alpha_so_large_the_total_overflows(run_cli, model, data, tmp_path):
    out = tmp_path / "adapter"
    one_line(run_cli(*init_args(model, data, out, "--alpha", "1e308")), 1, "--alpha")
    assert not out.exists()
    no_debris(tmp_path)


@pytest.mark.parametrize(
    ("flag", "value"), [("--alpha", "nan"), ("--alpha", "inf"), ("--damping", "nan"), ("--lora-da-beta", "nan")]
)
def test_non_finite_flags_are_usage_errors(run_cli, model, data, tmp_path, flag, value):
    result = run_cli(*init_args(model, data, tmp_path / "adapter", flag, value))
    assert result.code == 2 and flag in result.stderr and "not a finite number" in result.stderr
    assert "internal error" not in result.stderr


def test_lora_da_hyper_parameter_that_makes_a_nan(run_cli, model, data, tmp_path):
    out = tmp_path / "adapter"
    result = run_cli(*init_args(model, data, out, "--method", "lora-da", "--lora-da-beta", "1e308"))
    if result.code == 0:  # the hyper-parameter stayed finite through the factorisation: A must be finite too
        a = load_file(out / "adapter_model.safetensors")
        assert all(bool(torch.isfinite(t).all()) for t in a.values())
    else:
        one_line(result, 1, "NaN or inf", "--lora-da-beta")


def test_gate_refuses_a_non_finite_a(monkeypatch, run_cli, model, data, tmp_path):
    from tlora_cli import pipeline

    real = pipeline.factorise

    def poisoned(*args, **kwargs):
        starts = real(*args, **kwargs)
        name = sorted(starts)[0]
        starts[name].a = torch.full_like(starts[name].a, float("nan"))
        return starts

    monkeypatch.setattr(pipeline, "factorise", poisoned)
    out = tmp_path / "adapter"
    one_line(run_cli(*init_args(model, data, out)), 1, "NaN or inf", "model.layers.0")
    assert not out.exists()


def _shard_of(model: Path, part: str) -> tuple[Path, str]:
    for shard in sorted(model.glob("*.safetensors")):
        for key in load_file(shard):
            if part in key:
                return shard, key
    raise AssertionError(part)


def test_whole_engine_refuses_a_missing_tensor(run_cli, model, data, tmp_path):
    shard, key = _shard_of(model, "layers.0.mlp.gate_proj")
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = model / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        doc["weight_map"].pop(key)
        index.write_text(json.dumps(doc))
    before = snapshot(tmp_path)
    one_line(run_cli(*init_args(model, data, tmp_path / "adapter", "--engine", "whole")), 1, "gate_proj")
    assert snapshot(tmp_path) == before


# --- Calibration folders checked against themselves and the model -------------------------------------------


def _edit_manifest(calibration: Path, edit) -> None:
    path = calibration / "calibration.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _drop_module(m):
    m["modules"].pop(0)  # q_proj: k_proj and v_proj read its covariance


def _input_outside(m):
    m["modules"][0]["input"] = "../../../../etc/passwd"
    m["modules"][0]["name"] = "../../../../etc/passwd"


def _negative_shape(m):
    m["modules"][0]["shape"] = [-8, 64]


def _nan_score(m):
    m["modules"][0]["score"] = float("nan")


def _text_score(m):
    m["modules"][0]["score"] = "high"


def _no_fingerprint(m):
    del m["model"]["fingerprint"]


def _modules_not_a_list(m):
    m["modules"] = {"a": 1}


def _wrong_width(m):
    m["modules"][0]["shape"] = [m["modules"][0]["shape"][0], m["modules"][0]["shape"][1] + 1]


def _not_an_object(m):
    m.clear()
    m["format"] = "tlora-calibration/1"
    m["modules"] = "x"


@pytest.mark.parametrize(
    "edit",
    [
        _drop_module,
        _input_outside,
        _negative_shape,
        _nan_score,
        _text_score,
        _no_fingerprint,
        _modules_not_a_list,
        _wrong_width,
        _not_an_object,
    ],
)
def test_inconsistent_calibration(run_cli, model, calibration, tmp_path, edit):
    _edit_manifest(calibration, edit)
    before = snapshot(tmp_path)
    out, plan = tmp_path / "adapter", tmp_path / "plan.json"
    one_line(run_cli("init", "--model", model, "--calibration", calibration, "-q", "-o", out), 1)
    one_line(run_cli("allocate", calibration, "-q", "-o", plan), 1)
    assert snapshot(tmp_path) == before


def test_calibration_pointing_outside_its_folder(run_cli, model, calibration, tmp_path):
    """A module name that leads out of the folder to a file that exists there is refused, never read."""
    first = json.loads((calibration / "calibration.json").read_text())["modules"][0]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(calibration / "covariances" / f"{first['input']}.safetensors", outside)
    _edit_manifest(calibration, lambda m: m["modules"][0].update(name="../../outside", input="../../outside"))
    before = snapshot(tmp_path)
    line = one_line(run_cli("allocate", calibration, "-q", "-o", tmp_path / "plan.json"), 1)
    assert "outside" in line
    assert snapshot(tmp_path) == before


def _first_covariance(calibration: Path) -> Path:
    return sorted((calibration / "covariances").glob("*.safetensors"))[0]


@pytest.mark.parametrize("damage", ["nan", "shape", "field", "garbage", "missing", "integer"])
def test_malformed_covariance(run_cli, model, calibration, tmp_path, damage):
    path = _first_covariance(calibration)
    cov = load_file(path)["covariance"]
    if damage == "nan":
        cov[0, 0] = float("nan")
        save_file({"covariance": cov}, path)
    elif damage == "shape":
        save_file({"covariance": cov[:-1]}, path)
    elif damage == "field":
        save_file({"other": cov}, path)
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 40)
    elif damage == "integer":
        save_file({"covariance": cov.to(torch.int32)}, path)
    else:
        path.unlink()
    before = snapshot(tmp_path)
    out = tmp_path / "adapter"
    one_line(run_cli("init", "--model", model, "--calibration", calibration, "-q", "-o", out), 1)
    assert snapshot(tmp_path) == before
    no_debris(tmp_path)


def test_calibration_against_a_model_with_other_shapes(run_cli, model, calibration, tmp_path):
    """The same fingerprint, but the manifest claims other shapes than the checkpoint's (a hand edit)."""

    def edit(m):
        m["modules"][0]["shape"] = [m["modules"][0]["shape"][0] * 2, m["modules"][0]["shape"][1]]

    _edit_manifest(calibration, edit)
    before = snapshot(tmp_path)
    one_line(run_cli("init", "--model", model, "--calibration", calibration, "-q", "-o", tmp_path / "a"), 1)
    assert snapshot(tmp_path) == before


# --- Plans ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["NaN", '"high"', "Infinity", "true"])
def test_plan_with_bad_scores(run_cli, model, calibration, tmp_path, score):
    plan = tmp_path / "plan.json"
    assert run_cli("allocate", calibration, "-q", "-o", plan).code == 0
    doc = json.loads(plan.read_text())
    text = json.dumps(doc).replace(json.dumps(doc["modules"][0]["score"]), score, 1)
    plan.write_text(text)
    before = snapshot(tmp_path)
    args = ["init", "--model", model, "--calibration", calibration, "--plan", plan, "-q", "-o", tmp_path / "a"]
    one_line(run_cli(*args), 1, "score")
    assert snapshot(tmp_path) == before


def test_plan_nested_too_deeply(run_cli, model, calibration, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("[" * 100_000 + "]" * 100_000)
    args = ["init", "--model", model, "--calibration", calibration, "--plan", plan, "-q", "-o", tmp_path / "a"]
    one_line(run_cli(*args), 1, "plan")


def test_uniform_with_min_rank_above_the_budget(run_cli, model, data, tmp_path):
    result = run_cli(*init_args(model, data, tmp_path / "a", "--uniform", "--budget-rank", "2", "--min-rank", "4"))
    one_line(result, 1, "--min-rank")


# --- Inputs that used to end in an internal error -----------------------------------------------------------


def test_checkpoint_tensor_of_the_wrong_shape(run_cli, model, data, tmp_path):
    shard, key = _shard_of(model, "layers.0.mlp.up_proj")
    tensors = load_file(shard)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    before = snapshot(tmp_path)
    one_line(run_cli(*init_args(model, data, tmp_path / "a", "--engine", "stream")), 1, "up_proj", "shape")
    one_line(run_cli(*init_args(model, data, tmp_path / "a", "--engine", "whole")), 1)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", ["[1, 2]", '"llama"', "null", "[" * 100_000])
def test_config_that_is_not_an_object(run_cli, model, data, tmp_path, content):
    (model / "config.json").write_text(content)
    one_line(run_cli(*init_args(model, data, tmp_path / "a")), 1, "config.json")


def test_data_nested_very_deeply(run_cli, model, tmp_path):
    for name, text in (("deep.jsonl", "[" * 100_000 + "\n"), ("deep.json", "[" * 100_000)):
        path = tmp_path / name
        path.write_text(text)
        one_line(run_cli(*init_args(model, path, tmp_path / "a")), 1, name)


def test_data_path_that_is_a_device_or_a_pipe(run_cli, model, tmp_path):
    device = tmp_path / "zero.jsonl"
    device.symlink_to("/dev/zero")
    one_line(run_cli(*init_args(model, device, tmp_path / "a")), 1, "not a regular file")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    one_line(run_cli(*init_args(model, fifo, tmp_path / "a")), 1, "not a regular file")


def test_calibration_missing_its_fingerprint(run_cli, model, calibration, tmp_path):
    _edit_manifest(calibration, _no_fingerprint)
    result = run_cli("init", "--model", model, "--calibration", calibration, "-q", "-o", tmp_path / "a")
    one_line(result, 1, "fingerprint")


@pytest.mark.parametrize("damage", ["weights", "config", "config-list"])
def test_inspect_on_a_corrupt_adapter(run_cli, model, data, tmp_path, damage):
    out = tmp_path / "adapter"
    assert run_cli(*init_args(model, data, out)).code == 0
    if damage == "weights":
        (out / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    elif damage == "config":
        (out / "adapter_config.json").write_text("{not json")
    else:
        (out / "adapter_config.json").write_text("[1, 2, 3]")
    one_line(run_cli("inspect", out), 1)
    one_line(run_cli("inspect", out, "--json"), 1)


def test_typo_in_an_option_is_a_usage_error(run_cli, model, data, tmp_path):
    result = run_cli(*init_args(model, data, tmp_path / "a", "--budget-rnak", "4"))
    assert result.code == 2, result.stderr
    assert "No such option: --budget-rnak" in result.stderr and "--budget-rank" in result.stderr
    assert "internal error" not in result.stderr
    result = run_cli("inti")
    assert result.code == 2 and "Did you mean 'init'" in result.stderr


# --- Resources and manners ----------------------------------------------------------------------------------


def test_one_huge_line_is_not_tokenized_whole(model, tmp_path, monkeypatch):
    from tlora_cli.data import encode
    from tlora_cli.data.samples import Sample
    from tlora_cli.model.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    text = "the quick brown fox jumps over the lazy dog " * 400_000  # 17.6 MB
    seen = []
    real = encode._all_ids

    def counting(tok, piece, add_special_tokens):
        seen.append(len(piece))
        return real(tok, piece, add_special_tokens)

    monkeypatch.setattr(encode, "_all_ids", counting)
    encoded = encode.encode_sample(Sample(text=text), tokenizer, 64)
    assert max(seen) < 100_000 and encoded.truncated and len(encoded.input_ids) == 64
    short = "the quick brown fox " * 40
    expected = real(tokenizer, short, True)[:64]
    assert encode.encode_sample(Sample(text=short), tokenizer, 64).input_ids == expected
    pair = encode.encode_sample(Sample(prompt=text, response=text), tokenizer, 64)
    assert len(pair.input_ids) == 64 and max(seen) < 100_000


@pytest.mark.parametrize(
    "template", ["{question.__class__.__mro__}", "{question[0]}", "{question:{answer.__class__}}", "{question.upper}"]
)
def test_templates_only_read_fields(run_cli, model, tmp_path, template):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "What?", "answer": "That."}) + "\n")
    args = ["--template", template, "--response-field", "answer"]
    line = one_line(run_cli(*init_args(model, path, tmp_path / "a", *args)), 1, "template")
    assert "object" not in line  # nothing was evaluated


def test_missing_tokenizer_says_what_to_do(run_cli, model, data, tmp_path):
    for file in model.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            file.unlink()
    line = one_line(run_cli(*init_args(model, data, tmp_path / "a")), 1, "tokenizer")
    assert "copy them from the base model" in line


def test_non_finite_alpha_never_reaches_a_plan(run_cli, calibration, tmp_path):
    plan = tmp_path / "plan.json"
    one_line(run_cli("allocate", calibration, "-q", "--alpha", "1e308", "-o", plan), 1, "--alpha")
    assert not plan.exists()


def test_scores_in_metadata_are_finite_json(run_cli, model, data, tmp_path):
    out = tmp_path / "adapter"
    assert run_cli(*init_args(model, data, out)).code == 0
    meta = json.loads((out / "tlora_metadata.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert all(math.isfinite(m["score"]) for m in meta["modules"])


def test_hub_dataset_without_network_fails_fast(tmp_path, model_factory):
    """No retry warnings (eleven lines over ~23 s before): one quick look, then offline mode and the one line."""
    import subprocess
    import sys
    import time

    env = {
        **os.environ,
        "HF_ENDPOINT": "https://hub.invalid",  # a name no resolver knows, as without a network
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
    }
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(proxy, None)
    model = model_factory("llama")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "tlora_cli", "data", "show", "someorg/no-such-set", "--model", str(model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "someorg/no-such-set" in lines[0]
    assert elapsed < 120


@pytest.mark.parametrize(
    "edit",
    [
        lambda meta: meta.update(allocation=[1]),
        lambda meta: meta.update(modules=[{"name": "x"}]),
        lambda meta: meta.update(modules="abc"),
    ],
)
def test_inspect_on_hand_edited_metadata(run_cli, model, data, tmp_path, edit):
    out = tmp_path / "adapter"
    assert run_cli(*init_args(model, data, out)).code == 0
    meta = json.loads((out / "tlora_metadata.json").read_text())
    edit(meta)
    (out / "tlora_metadata.json").write_text(json.dumps(meta))
    result = run_cli("inspect", out)
    assert result.code in (0, 1) and "internal error" not in result.stderr, result.stderr
    if result.code == 1:
        one_line(result, 1)


def test_plan_whose_settings_are_not_an_object(run_cli, model, calibration, tmp_path):
    plan = tmp_path / "plan.json"
    assert run_cli("allocate", calibration, "-q", "-o", plan).code == 0
    doc = json.loads(plan.read_text())
    doc["settings"] = [float("nan")]
    plan.write_text(json.dumps(doc))
    args = ["init", "--model", model, "--calibration", calibration, "--plan", plan, "-q", "-o", tmp_path / "a"]
    one_line(run_cli(*args), 1, "settings")


def test_empty_data_argument(run_cli, model, tmp_path):
    one_line(run_cli(*init_args(model, "", tmp_path / "a")), 1, "--data is empty")


def test_overwrite_without_an_atomic_exchange(run_cli, model, data, tmp_path, monkeypatch):
    """Where renameat2 is missing, the two-rename fallback still ends with the new OUT and no debris."""
    out = tmp_path / "adapter"
    assert run_cli(*init_args(model, data, out)).code == 0
    monkeypatch.setattr(output, "_renameat2", lambda a, b, flags: None)
    assert run_cli(*init_args(model, data, out, "--overwrite", "--budget-rank", "4")).code == 0
    assert json.loads((out / "tlora_metadata.json").read_text())["allocation"]["budget_rank"] == 4
    no_debris(tmp_path)


@pytest.mark.parametrize("extra", ["README.md", "checkpoint-100/optimizer.pt", "covariances/notes.txt"])
def test_overwrite_keeps_files_tlora_did_not_write(run_cli, model, data, calibration, tmp_path, extra):
    """An adapter a trainer saved into (README.md, checkpoints) or a calibration with the user's notes is
    not wholly tlora's: --overwrite would delete what the user added, so it is refused."""
    out = tmp_path / "adapter"
    assert run_cli(*init_args(model, data, out)).code == 0
    target = calibration if extra.startswith("covariances") else out
    (target / extra).parent.mkdir(parents=True, exist_ok=True)
    (target / extra).write_text("the user's")
    before = snapshot(tmp_path)
    if target is out:
        one_line(run_cli(*init_args(model, data, out, "--overwrite")), 1, "tlora did not write")
    else:
        args = ["calibrate", "--model", model, "--data", data, *N_ARGS, "--overwrite", "-o", calibration]
        one_line(run_cli(*args), 1, "tlora did not write")
    assert snapshot(tmp_path) == before
