"""Nothing tlora writes into a folder `--push-to-hub` uploads names the machine's directories: the model's, the
data's, the output's, the home and the temp folders (adapter_config.json's base_model_name_or_path aside, which
PEFT's loaders need as given; the README says how to publish with a hub id there)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def leaks(folder: Path, places: list[str]) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        raw = path.read_bytes()
        if path.name == "adapter_config.json":
            config = json.loads(raw)
            config.pop("base_model_name_or_path", None)
            raw = json.dumps(config).encode()
        text = (
            raw.decode("utf-8", errors="replace")
            if path.suffix != ".safetensors"
            else raw[:65536].decode("utf-8", errors="replace")
        )  # a safetensors file's header (its metadata) is text
        found += [f"{path.relative_to(folder)}: {place}" for place in places if place in text]
    return found


def test_no_published_file_names_a_local_folder(model_factory, data_file, run_cli, tmp_path):
    model_dir = model_factory("llama")
    places = [str(model_dir), str(data_file.parent), str(tmp_path), str(Path.home()), tempfile.gettempdir()]
    common = ["--model", model_dir, "--data", data_file, "--num-samples", "4", "--seq-len", "24", "-q"]
    outputs = []

    def run(*args, out: Path):
        result = run_cli(*args, "-o", out)
        assert result.code == 0, result.stderr
        outputs.append(out)

    run("init", *common, "--budget-rank", "2", out=tmp_path / "adapter")
    run("calibrate", *common, out=tmp_path / "calibration")
    run("allocate", tmp_path / "calibration", "--budget-rank", "2", "-q", out=tmp_path / "plan.json")
    run("init", "--calibration", tmp_path / "calibration", "--plan", tmp_path / "plan.json", "-q", out=tmp_path / "p")
    pre = ["--prelaunch-steps", "2", "--prelaunch-batch-size", "2", "--budget-rank", "2"]
    run("init", *common, "--method", "lora-init", *pre, "--save-prelaunch", tmp_path / "pre", out=tmp_path / "li")
    outputs.append(tmp_path / "pre")
    for fmt, extra in (("vllm", []), ("padded", []), ("merged", ["--model", model_dir])):
        run("export", tmp_path / "adapter", "--format", fmt, *extra, "-q", out=tmp_path / fmt)
    run("export", tmp_path / "li", "--format", "residual-base", "--model", model_dir, "-q", out=tmp_path / "rb")
    run("export", tmp_path / "li", "--format", "lora", "--initial", tmp_path / "li", "-q", out=tmp_path / "plain")
    published = [o for o in outputs if o.name not in ("calibration", "plan.json")]  # these two stay on the machine
    assert [p.name for p in published] == ["adapter", "p", "li", "pre", "vllm", "padded", "merged", "rb", "plain"]
    found = [leak for out in published for leak in leaks(out, places)]
    assert not found, found
