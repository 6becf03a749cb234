"""Every bad input: one line on stderr, exit code 1, and nothing left behind."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

N_ARGS = ("--num-samples", "3", "--seq-len", "16", "-q")


def assert_clean_failure(result, out, *needles):
    assert result.code == 1, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def init(run_cli, model_factory, data_file, tmp_path):
    def run(*args, model=None, data=None, out=None):
        model = model or model_factory("llama")
        out = out or tmp_path / "out"
        return run_cli("init", "--model", model, "--data", data or data_file, *N_ARGS, *args, "-o", out), out

    return run


def test_missing_model(init, tmp_path):
    assert_clean_failure(*init(model=tmp_path / "nope"), "does not exist")


def test_model_folder_without_weights(init, tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    assert_clean_failure(*init(model=folder), "no safetensors weights")


def test_corrupt_shard(init, model_factory, tmp_path):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(model_factory("llama"), folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"not a safetensors file")
    assert_clean_failure(*init(model=folder), "cannot")


def test_no_matching_target_modules(init):
    assert_clean_failure(*init("--target-modules", "c_attn,c_proj"), "no linear layer matches", "q_proj")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--budget-rank", "0"), "--budget-rank"),
        (("--alpha", "0"), "--alpha"),
        (("--alpha", "-2"), "--alpha"),
        (("--min-rank", "-1"), "--min-rank"),
        (("--seq-len", "1"), "--seq-len"),
        (("--num-samples", "0"), "num"),
        (("--device", "tpu"), "--device"),
        (("--dtype", "int8"), "--dtype"),
        (("--budget-rank", "100000"), "budget"),
    ],
)
def test_bad_numbers(init, args, needle):
    assert_clean_failure(*init(*args), needle)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("empty.jsonl", "", "empty"),
        ("broken.jsonl", '{"text": "fine"}\n{"text": \n', "line 2"),
        ("fields.jsonl", '{"title": "a", "body": "b"}\n', "title"),
        ("data.xml", "<a/>", ".xml"),
    ],
)
def test_bad_data(init, tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_text(content)
    assert_clean_failure(*init(data=path), needle)


def test_unknown_data_name(init):
    assert_clean_failure(*init(data="no-such-dataset"), "no-such-dataset")


def test_unreadable_data(init, tmp_path):
    folder = tmp_path / "a-folder.jsonl"
    folder.mkdir()
    assert_clean_failure(*init(data=folder))


def test_non_finite_activations_name_the_layer(init, model_factory, tmp_path):
    import shutil

    folder = tmp_path / "nan-model"
    shutil.copytree(model_factory("llama"), folder)
    key = "model.layers.1.mlp.up_proj.weight"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_clean_failure(*init(model=folder), "NaN or inf", "model.layers.1.mlp.down_proj")


def test_existing_out_is_left_untouched(init, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result, _ = init(out=out)
    assert result.code == 1 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite replaces only what tlora wrote: a folder of the user's own files stays as it is.
    result, _ = init("--overwrite", out=out)
    assert result.code == 1 and "not an adapter folder written by tlora" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert init(out=out)[0].code == 0
    result, _ = init("--overwrite", out=out)
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir() if p.name != "budget.png") == [  # budget.png with matplotlib
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tlora_metadata.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_unwritable_out(init, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result, _ = init(out=blocker / "out")
    assert result.code == 1 and "is a file, not a folder" in result.stderr
    if os.geteuid() != 0:  # root writes anywhere; /proc refuses everyone
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result, _ = init(out=locked / "out")
        assert result.code == 1 and "not writable" in result.stderr
    result, _ = init(out=tmp_path.anchor + "proc/tlora-out")
    assert result.code == 1 and "cannot write" in result.stderr


def test_calibration_and_plan_from_another_model_are_refused(run_cli, model_factory, data_file, tmp_path):
    llama, qwen = model_factory("llama"), model_factory("llama", seed=1)
    common = ["--data", data_file, *N_ARGS]
    assert run_cli("calibrate", "--model", llama, *common, "-o", tmp_path / "calib").code == 0
    assert run_cli("allocate", tmp_path / "calib", "-o", tmp_path / "plan.json", "-q").code == 0
    out = tmp_path / "out"
    result = run_cli("init", "--calibration", tmp_path / "calib", "--model", qwen, "-o", out, "-q")
    assert_clean_failure(result, out, "different model", "recalibrate")
    assert run_cli("calibrate", "--model", qwen, *common, "-o", tmp_path / "calib2").code == 0
    result = run_cli(
        "init", "--calibration", tmp_path / "calib2", "--model", qwen, "--plan", tmp_path / "plan.json", "-o", out, "-q"
    )
    assert_clean_failure(result, out, "different model")
    result = run_cli("init", "--calibration", tmp_path / "nothing", "--model", qwen, "-o", out, "-q")
    assert_clean_failure(result, out, "not a calibration directory")


def test_damaged_plan_and_calibration(run_cli, model_factory, data_file, tmp_path):
    model = model_factory("llama")
    assert run_cli("calibrate", "--model", model, "--data", data_file, *N_ARGS, "-o", tmp_path / "calib").code == 0
    assert run_cli("allocate", tmp_path / "calib", "-o", tmp_path / "plan.json", "-q").code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    plan["modules"][0]["rank"] = 10**6
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    result = run_cli("init", "--calibration", tmp_path / "calib", "--plan", tmp_path / "plan.json", "-o", out, "-q")
    assert_clean_failure(result, out, "rank", "must be an integer")
    (tmp_path / "plan.json").write_text("{oops")
    result = run_cli("init", "--calibration", tmp_path / "calib", "--plan", tmp_path / "plan.json", "-o", out, "-q")
    assert_clean_failure(result, out, "not valid JSON")
    manifest = tmp_path / "calib" / "calibration.json"
    manifest.write_text(manifest.read_text()[:50])
    result = run_cli("init", "--calibration", tmp_path / "calib", "--model", model, "-o", out, "-q")
    assert_clean_failure(result, out, "damaged")


def test_conflicting_flags(run_cli, tmp_path):
    out = tmp_path / "out"
    result = run_cli("init", "--calibration", tmp_path, "--plan", tmp_path / "p.json", "--budget-rank", "4", "-o", out)
    assert_clean_failure(result, out, "--plan")
    result = run_cli("init", "--calibration", tmp_path, "--data", "x.jsonl", "-o", out)
    assert_clean_failure(result, out, "--data")


def test_inspect_of_something_else(run_cli, tmp_path):
    result = run_cli("inspect", tmp_path)
    assert result.code == 1 and "not a PEFT adapter" in result.stderr
    result = run_cli("inspect", tmp_path / "missing")
    assert result.code == 1 and "not a folder" in result.stderr


def test_interrupt_leaves_nothing(init, monkeypatch, tmp_path):
    import tlora_cli.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "factorise", interrupted)
    result, out = init()
    assert result.code == 130
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("kind", ["safetensors", "oserror"])
def test_a_full_disk_is_one_line_and_leaves_nothing(kind, run_cli, model_factory, data_file, tmp_path, monkeypatch):
    """safetensors' writer reports ENOSPC as a message, Python as OSError 28; both stop cleanly."""
    import errno

    from safetensors import SafetensorError

    import tlora_cli.calib.store as store

    def full(*args, **kwargs):
        if kind == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "save_file", full)
    out = tmp_path / "calib"
    result = run_cli("calibrate", "--model", model_factory("llama"), "--data", data_file, *N_ARGS, "-o", out)
    assert_clean_failure(result, out, "the disk filled up", "--offload-dir")
