"""Batched calibration gives what a batch of one gives: each sample's own gradient, pads left out."""

from __future__ import annotations

import pytest
import torch
from reference import rel_err
from test_streaming import assert_same_numbers

from tlora_cli.calib.batches import Batch, batch_loss, make_batches
from tlora_cli.calib.collector import accumulate_xtx, mirrored, per_sample_scores
from tlora_cli.calib.folder import load_calibration
from tlora_cli.data import EncodedSample, load_calibration_set
from tlora_cli.errors import TloraError
from tlora_cli.model.loading import load_tokenizer

# q/k/v reading one input, local attention with padding, GPT-NeoX's fused attention and parallel MLP
BATCH_MODELS = [
    ("llama", {}),
    ("gemma3_text", {"sliding_window": 8}),
    ("qwen2", {"sliding_window": 8, "max_window_layers": 1}),
    ("gpt_neox", {}),
]
ARGS = ("--num-samples", "6", "--seq-len", "64", "-q")


def test_the_samples_differ_in_length(model_factory, data_file):
    """Otherwise the batches below would hold no padding to get wrong."""
    samples = load_calibration_set(str(data_file), load_tokenizer(model_factory("llama")), 6, 64, 0).samples
    assert len({len(s.input_ids) for s in samples}) >= 3


@pytest.mark.parametrize("engine", ["whole", "stream"])
@pytest.mark.parametrize(("arch", "options"), BATCH_MODELS, ids=[a for a, _ in BATCH_MODELS])
def test_batches_give_the_numbers_of_a_batch_of_one(engine, arch, options, model_factory, data_file, tmp_path, run_cli):
    """Batches of 4 (then 2) with padding against batches of 1: covariances and scores to 1e-5, same ranks, A."""
    model = model_factory(arch, **options)
    for batch in (1, 4):
        for command in ("calibrate", "init"):
            flags = ("--engine", engine, "--batch-size", batch, "-o", tmp_path / f"{command}-{batch}")
            result = run_cli(command, "--model", model, "--data", data_file, *ARGS, *flags)
            assert result.code == 0, result.stderr
    assert load_calibration(tmp_path / "calibrate-4").settings["batch_size"] == 4
    calibrations, adapters = (
        (tmp_path / "calibrate-4", tmp_path / "calibrate-1"),
        (tmp_path / "init-4", tmp_path / "init-1"),
    )
    assert_same_numbers(*calibrations, *adapters, alpha_rel=1e-6)


@pytest.mark.parametrize("engine", ["whole", "stream"])
def test_batched_lora_da_moments_equal_a_batch_of_one(engine, model_factory, data_file, tmp_path, run_cli):
    model = model_factory("llama")
    for batch in (1, 3):
        flags = ("--gradients", "--engine", engine, "--batch-size", batch, "-o", tmp_path / str(batch))
        assert run_cli("calibrate", "--model", model, "--data", data_file, *ARGS, *flags).code == 0
    one, three = load_calibration(tmp_path / "1").stats, load_calibration(tmp_path / "3").stats
    for kind in ("mean_grads", "output_grad_sq"):
        assert one.tensors[kind].keys() == three.tensors[kind].keys()
        for key in one.tensors[kind]:
            assert rel_err(three.tensors[kind][key], one.tensors[kind][key]) < 1e-5, (kind, key)


@pytest.mark.parametrize("width", [40, 600, 1200], ids=["one-strip", "two-strips", "four-strips"])
@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
def test_covariance_sums_equal_a_float64_product_per_sample(width, center):
    """Summed by strips above the diagonal over a padded batch and an unpadded one, then mirrored: each
    sample's real tokens only, centred on their own mean, against a float64 product sample by sample."""
    torch.manual_seed(0)
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4, [True] * 7 + [False] * 2])
    batches = [
        (torch.randn(3, 9, width) + 3, mask),
        (torch.randn(2, 9, width) + torch.tensor([-1.0, 2.0]).view(2, 1, 1), None),
    ]
    sums: dict[str, torch.Tensor] = {}
    expected = torch.zeros(width, width, dtype=torch.float64)
    for x, pads in batches:
        accumulate_xtx(sums, "input", x, center, pads)
        for n in range(len(x)):
            real = (x[n] if pads is None else x[n][pads[n]]).double()
            real = real - real.mean(dim=0) if center else real
            expected += real.T @ real
    result = mirrored(sums["input"])
    assert torch.equal(result, result.T)
    assert rel_err(result, expected) < 1e-6


def test_per_sample_scores_equal_autograd_one_sample_at_a_time(monkeypatch):
    """Against each sample's own weight gradient from autograd, chunked two samples at a time."""
    import tlora_cli.calib.collector as collector

    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3)
    x, target = torch.randn(4, 6, 5), torch.randn(4, 6, 3)
    expected = []
    for n in range(4):
        linear.zero_grad()
        ((linear(x[n]) - target[n]) ** 2).sum().backward()
        expected.append((linear.weight * linear.weight.grad).abs().mean().item())
    out = linear(x)
    grad = 2 * (out - target).detach()  # the output gradient of the summed losses
    monkeypatch.setattr(collector, "CHUNK_BYTES", 2 * 3 * 5 * 4)
    scores = per_sample_scores(linear.weight.detach(), x, grad)
    assert scores.dtype == torch.float64 and scores.shape == (4,)
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


def test_batch_loss_is_the_sum_of_each_samples_mean_and_names_an_empty_sample():
    samples = [EncodedSample([1, 2, 3, 4], [-100, 2, 3, 4]), EncodedSample([5, 6], [-100, 6])]
    (batch,) = make_batches(samples, 2, "cpu")
    assert batch.mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.labels[1].tolist() == [-100, 6, -100, -100]
    logits = torch.randn(2, 4, 8)
    means = [
        torch.nn.functional.cross_entropy(logits[0, :3], torch.tensor([2, 3, 4])),
        torch.nn.functional.cross_entropy(logits[1, :1], torch.tensor([6])),
    ]
    assert torch.allclose(batch_loss(logits, batch), means[0] + means[1])
    empty = Batch(batch.input_ids, torch.full_like(batch.labels, -100), batch.mask, first=7, padded=batch.padded)
    with pytest.raises(TloraError, match="calibration sample 7 has no token"):
        batch_loss(logits, empty)


@pytest.mark.cuda
def test_batched_stream_on_cuda_with_read_ahead_equals_a_batch_of_one_on_cpu(
    model_factory, data_file, tmp_path, run_cli
):
    """The GPU path: pinned reads ahead, non-blocking copies, batches with padding; against the plain CPU path."""
    model = model_factory("llama")
    runs = {
        "cuda": ("--engine", "stream", "--device", "cuda", "--batch-size", "4"),
        "cpu": ("--engine", "whole", "--device", "cpu", "--batch-size", "1"),
    }
    for device, flags in runs.items():
        for command in ("calibrate", "init"):
            args = ("--model", model, "--data", data_file, *ARGS, "--dtype", "float32", *flags)
            assert run_cli(command, *args, "-o", tmp_path / f"{command}-{device}").code == 0
    calibrations, adapters = (
        (tmp_path / "calibrate-cuda", tmp_path / "calibrate-cpu"),
        (tmp_path / "init-cuda", tmp_path / "init-cpu"),
    )
    assert_same_numbers(*calibrations, *adapters, alpha_rel=1e-6)
