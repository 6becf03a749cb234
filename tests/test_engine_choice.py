"""--engine auto: the whole model when it fits in free memory, else streaming; said, recorded, same numbers."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import HIDDEN_SIZE, INTERMEDIATE_SIZE

from tlora_cli.calib.sizing import MARGIN, ModelSize, choose
from tlora_cli.calib.statistics import COVARIANCES

COVARIANCE_ONLY = frozenset({COVARIANCES})
WITH_GRADIENTS = frozenset({COVARIANCES, "mean_grads", "output_grad_sq"})

FILES = ("adapter_model.safetensors", "adapter_config.json")


def engine_of(adapter) -> dict:
    return json.loads((adapter / "tlora_metadata.json").read_text())["calibration"]["engine"]


def test_auto_picks_whole_for_a_tiny_model_and_gives_its_bytes(model_factory, tiny_init, tmp_path, run_cli, data_file):
    model = model_factory("llama")
    auto = run_cli(
        "init", "--model", model, "--data", data_file, "--num-samples", 4, "--seq-len", 24, "-o", tmp_path / "a"
    )
    assert auto.code == 0, auto.stderr
    assert "engine: whole" in auto.stderr and "fit in 80% of the" in auto.stderr
    assert engine_of(tmp_path / "a") == {
        "requested": "auto",
        "used": "whole",
        "reason": engine_of(tmp_path / "a")["reason"],
    }
    assert "fit in" in engine_of(tmp_path / "a")["reason"]
    assert tiny_init(model, tmp_path / "w", "--engine", "whole").code == 0
    assert engine_of(tmp_path / "w") == {"requested": "whole", "used": "whole", "reason": "--engine whole"}
    for file in FILES:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "w" / file).read_bytes()
    quiet = tiny_init(model, tmp_path / "q")
    assert quiet.code == 0 and "engine:" not in quiet.stderr  # -q hides the informational line


def test_auto_streams_when_memory_is_short_and_gives_the_stream_bytes(model_factory, tiny_init, tmp_path, monkeypatch):
    import tlora_cli.calib.calibrate as calibrate_module

    model = model_factory("qwen2", sliding_window=8, max_window_layers=1)
    monkeypatch.setattr(calibrate_module, "free_memory", lambda device: 200_000)  # the tiny model alone is ~400 kB
    assert tiny_init(model, tmp_path / "a").code == 0
    recorded = engine_of(tmp_path / "a")
    assert recorded["requested"] == "auto" and recorded["used"] == "stream"
    assert "exceed 80% of the 0.0002 GB free" in recorded["reason"]
    assert tiny_init(model, tmp_path / "s", "--engine", "stream").code == 0
    for file in FILES:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "s" / file).read_bytes()


SIZE = ModelSize(num_params=10**6, hidden=HIDDEN_SIZE, intermediate=INTERMEDIATE_SIZE, layers=2, heads=4, vocab=1000)


def test_the_estimate_counts_weights_statistics_and_activations():
    """Independent arithmetic for the tiny shape, float32, T=24."""
    weights = 10**6 * 4
    covariances = 2 * (3 * 64**2 + 96**2) * 4
    per_token = 2 * (10 * 64 + 5 * 96 + 4 * 24) * 4 + 1000 * 12
    assert SIZE.needed("whole", 3, 24, 4, kinds=COVARIANCE_ONLY) == weights + covariances + 3 * 24 * per_token
    assert SIZE.needed("whole", 1, 24, 4, kinds=WITH_GRADIENTS) == weights + covariances + weights + 24 * per_token
    layer_per_token = (10 * 64 + 5 * 96 + 4 * 24) * 4 + 1000 * 12
    assert SIZE.needed("stream", 2, 24, 4, kinds=COVARIANCE_ONLY) == 2 * weights // 2 + 2 * 24 * layer_per_token


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_the_batch_is_the_largest_that_fits(batch):
    need = SIZE.needed("whole", batch, 24, 4, kinds=COVARIANCE_ONLY)
    choice = choose(SIZE, "auto", None, 32, 24, torch.float32, COVARIANCE_ONLY, int(need / MARGIN) + 1)
    assert (choice.engine, choice.batch_size) == ("whole", batch)
    assert choose(SIZE, "auto", None, 2, 24, torch.float32, COVARIANCE_ONLY, 10**12).batch_size == 2  # no more than N
    assert choose(SIZE, "auto", None, 32, 24, torch.float32, COVARIANCE_ONLY, 10**12, max_batch=1).batch_size == 1
    assert choose(SIZE, "auto", 5, 32, 24, torch.float32, COVARIANCE_ONLY, 1).batch_size == 5  # as asked


def test_the_default_batch_is_one_on_cpu_up_to_eight_on_cuda(model_factory, tiny_init, tmp_path):
    from tlora_cli.calib.sizing import batch_limit

    assert (batch_limit("cpu"), batch_limit("cuda"), batch_limit("cuda:1")) == (1, 8, 8)
    assert tiny_init(model_factory("llama"), tmp_path / "a").code == 0
    assert json.loads((tmp_path / "a" / "tlora_metadata.json").read_text())["calibration"]["batch_size"] == 1


def test_explicit_engines_and_unknown_memory():
    assert choose(SIZE, "whole", None, 4, 24, torch.float32, COVARIANCE_ONLY, 1) == choose(
        SIZE, "whole", 1, 4, 24, torch.float32, COVARIANCE_ONLY, 1
    )
    assert choose(SIZE, "whole", None, 4, 24, torch.float32, COVARIANCE_ONLY, 1).engine == "whole"
    unknown = choose(SIZE, "auto", None, 4, 24, torch.float32, COVARIANCE_ONLY, None)
    assert (unknown.engine, unknown.batch_size) == ("stream", 1) and "unknown" in unknown.reason
    assert choose(None, "auto", None, 4, 24, torch.float32, COVARIANCE_ONLY, 10**12).engine == "stream"
    assert ModelSize.of({"model_type": "x"}, 10) is None
    nested = ModelSize.of(
        {"text_config": {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 5}}, 10
    )
    assert nested == ModelSize(10, 8, 32, 2, 2, 5)
