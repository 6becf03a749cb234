"""torchrun: K ranks on CPU with gloo give the single-process answer, the same bytes every time, and stop
together with one line and no output when one rank fails.

Each torchrun test starts K Python processes that import torch and transformers (15-25 s on two cores):
they are marked slow, and CI runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reference import rel_err
from safetensors.torch import load_file

from tlora_cli.calib.folder import load_calibration
from tlora_cli.distributed import LOST, TIMEOUT_ENV, Dist, timeout_seconds
from tlora_cli.errors import Stopped, TloraError

ROOT = Path(__file__).resolve().parents[1]

# tlora's CLI with one rank made to fail (MODE: error before any collective, late mid-calibration, kill, hang).
FAILING = """
import os, signal, time
from tlora_cli.calib import calibrate as calibrate_module
from tlora_cli.calib import collector
from tlora_cli.errors import TloraError

def fail(*args, **kwargs):
    if os.environ["MODE"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ["MODE"] == "hang":
        time.sleep(3600)
    raise TloraError("rank trouble: " + os.environ["MODE"])

if os.environ["RANK"] == "1":
    if os.environ["MODE"] == "error":
        calibrate_module.read_data = fail
    else:
        collector.Collector.finish = fail
from tlora_cli.cli import main
main()
"""


def torchrun(k: int, *args: str | Path, script: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node K -m tlora_cli ARGS` (or the script), one thread per rank."""
    entry = [str(script)] if script else ["-m", "tlora_cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k), *entry]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=environ, timeout=600)
    return result


def init_args(model: Path, data: Path, out: Path, samples: int, *extra: str) -> list[str | Path]:
    common = ["init", "--model", model, "--data", data, "--num-samples", str(samples), "--seq-len", "24", "-q"]
    return [*common, *extra, "-o", out]


def subspace_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest cosine of the principal angles between the row spaces of a and b."""
    qa, qb = torch.linalg.qr(a.double().T)[0], torch.linalg.qr(b.double().T)[0]
    return torch.linalg.svdvals(qa.T @ qb).min().item()


def assert_same_adapter(adapter: Path, reference: Path) -> None:
    """Equal ranks, alphas to 1e-5, the same subspaces for A, the same counts of samples and tokens."""
    meta, ref = (json.loads((p / "tlora_metadata.json").read_text()) for p in (adapter, reference))
    for key in ("num_samples", "num_tokens"):
        assert meta["calibration"][key] == ref["calibration"][key]
    assert [m["name"] for m in meta["modules"]] == [m["name"] for m in ref["modules"]]
    for m, r in zip(meta["modules"], ref["modules"], strict=True):
        assert m["rank"] == r["rank"], m["name"]
        assert rel_err(m["alpha"], r["alpha"]) < 1e-5 and rel_err(m["score"], r["score"]) < 1e-5, m["name"]
    tensors, ref_tensors = (load_file(p / "adapter_model.safetensors") for p in (adapter, reference))
    assert tensors.keys() == ref_tensors.keys()
    for key, a in ref_tensors.items():
        if "lora_A" in key:
            assert subspace_cosine(tensors[key], a) >= 0.9999, key


def distributed_record(adapter: Path) -> dict:
    return json.loads((adapter / "tlora_metadata.json").read_text())["calibration"]["distributed"]


def test_shares_are_contiguous_uneven_and_may_be_empty():
    shares = [Dist(rank, 3).share(5) for rank in range(3)]
    assert shares == [range(0, 2), range(2, 4), range(4, 5)]
    assert [len(Dist(rank, 3).share(2)) for rank in range(3)] == [1, 1, 0]
    assert Dist().share(5) == range(5) and Dist().record(5) == {}
    assert Dist(0, 3, "gloo").record(5) == {"world_size": 3, "backend": "gloo", "samples_per_rank": [2, 2, 1]}


def test_owners_balance_the_cost_largest_first():
    costs = {"a": 8.0, "b": 5.0, "c": 4.0, "d": 3.0, "e": 0.0}
    owners = Dist(0, 2).owner_of(costs)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}  # loads 11 and 9: e goes to the lighter
    assert set(Dist().owner_of(costs).values()) == {0}


class SecondOfTwoRanks(Dist):
    """Rank 1 of 2 in one process: the other rank calibrated the same samples, so every sum doubles."""

    def __init__(self) -> None:
        super().__init__(1, 2, "gloo")

    def share(self, n: int) -> range:
        return range(n)

    def all_gather(self, obj: object) -> list[object]:
        return [obj, obj]

    def reduce_sum(self, tensors: list[tuple[torch.Tensor, int | None]]) -> None:
        for t, _ in tensors:
            t.mul_(2)


@pytest.mark.parametrize("engine", ["stream", "whole"])
def test_each_input_s_statistics_stay_only_on_the_rank_that_owns_it(engine, model_factory, data_file):
    """init spreads the inputs over the ranks (no rank holds every covariance); calibrate sends all to rank 0."""
    from tlora_cli.pipeline import CalibrationOptions, ModelSource, calibrate
    from tlora_cli.progress import Reporter

    source = ModelSource.open(str(model_factory("llama")))
    options = CalibrationOptions(num_samples=3, seq_len=24, device="cpu", engine=engine)
    single = calibrate(source, str(data_file), options, Reporter(quiet=True))[0].stats
    spread = calibrate(source, str(data_file), options, Reporter(quiet=True), dist=SecondOfTwoRanks(), spread=True)
    stats = spread[0].stats
    mine = {key for key, rank in stats.owners.items() if rank == 1}
    assert set(stats.owners) == set(single.covariances) and 0 < len(mine) < len(stats.owners)
    assert set(stats.covariances) == mine  # the other rank's inputs are not held here
    for key in mine:
        assert torch.equal(stats.covariances[key], single.covariances[key]), key
    assert stats.scores == pytest.approx(single.scores, rel=1e-12)  # every rank gets every score
    to_main = calibrate(source, str(data_file), options, Reporter(quiet=True), dist=SecondOfTwoRanks())[0].stats
    assert not dict(to_main.covariances) and to_main.owners is None


def test_the_timeout_is_a_positive_number_of_seconds(monkeypatch):
    assert timeout_seconds() == 600
    monkeypatch.setenv(TIMEOUT_ENV, "30")
    assert timeout_seconds() == 30
    for bad in ("abc", "0", "-5", "inf", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(TloraError, match=TIMEOUT_ENV):
            timeout_seconds()


def test_only_rank_0_says_why_every_rank_stopped(run_cli, monkeypatch, model_factory, tmp_path):
    from tlora_cli import pipeline
    from tlora_cli.calib import calibrate as calibrate_module

    def stop(*args, **kwargs):
        raise Stopped("rank 1: no data here")

    monkeypatch.setattr(calibrate_module, "read_data", stop)
    args = ["init", "--model", model_factory("llama"), "-o", tmp_path / "out"]
    result = run_cli(*args)
    assert result.code == 1 and result.stderr.strip() == "error: rank 1: no data here"
    monkeypatch.setenv("RANK", "1")  # alone, a stray variable: the one process still speaks
    assert run_cli(*args).stderr.strip() == "error: rank 1: no data here"

    @contextlib.contextmanager
    def second_of_two(device: str):
        yield Dist(1, 2, device=device)  # rank 1 of a torchrun job, without its process group

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(pipeline, "launched", second_of_two)
    result = run_cli(*args)
    assert result.code == 1 and result.stderr == ""


REFUSED = "runs in one process: run it without torchrun (only calibrate and init share)"


@pytest.mark.parametrize(
    "command", [["allocate", "calib", "-o", "plan.json"], ["inspect", "adapter"], ["data", "list"]]
)
def test_commands_without_ranks_refuse_torchrun_said_once(command, run_cli, monkeypatch):
    """Under torchrun every rank would do the same work and write the same file: each stops, rank 0 says why."""
    from tlora_cli import distributed

    monkeypatch.setattr(distributed, "GRACE_S", 0.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = run_cli(*command)
    assert result.code == 1 and result.stdout == ""
    assert result.stderr.strip() == f"error: tlora {command[0]} {REFUSED}"
    monkeypatch.setenv("RANK", "1")
    result = run_cli(*command)
    assert result.code == 1 and result.stderr == "" and result.stdout == ""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert REFUSED not in run_cli(*command).stderr


@pytest.mark.slow
def test_allocate_under_torchrun_stops_with_one_line_and_writes_nothing(tmp_path):
    result = torchrun(2, "allocate", tmp_path / "calib", "-o", tmp_path / "plan.json")
    assert result.returncode != 0
    ours = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert ours == [f"error: tlora allocate {REFUSED}"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("k", "engine", "per_rank"), [(2, "stream", [3, 2]), (3, "whole", [2, 2, 1])], ids=["k2-stream", "k3-whole"]
)
def test_k_ranks_give_the_single_process_answer(k, engine, per_rank, model_factory, data_file, tmp_path, run_cli):
    model = model_factory("llama")
    single, out = tmp_path / "single", tmp_path / "out"
    assert run_cli(*init_args(model, data_file, single, 5, "--engine", engine)).code == 0
    result = torchrun(k, *init_args(model, data_file, out, 5, "--engine", engine))
    assert result.returncode == 0, result.stderr
    assert_same_adapter(out, single)
    record = distributed_record(out)
    held = record.pop("inputs_per_rank")  # 2 layers x (q/k/v, o, gate/up, down), each input on one rank
    assert sum(held) == 8 and min(held) > 0, held
    assert record == {"world_size": k, "backend": "gloo", "samples_per_rank": per_rank}
    assert result.stdout == ""


@pytest.mark.slow
def test_same_ranks_same_bytes_even_with_a_rank_without_samples(model_factory, data_file, tmp_path, run_cli):
    """LoRA-DA's gradient sums too; with 2 samples over 3 ranks the last one calibrates nothing."""
    model, args = model_factory("llama"), ("--method", "lora-da")
    assert run_cli(*init_args(model, data_file, tmp_path / "single", 2, *args)).code == 0
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        result = torchrun(3, *init_args(model, data_file, out, 2, *args))
        assert result.returncode == 0, result.stderr
    assert distributed_record(outs[0])["samples_per_rank"] == [1, 1, 0]
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert_same_adapter(outs[0], tmp_path / "single")


@pytest.mark.slow
def test_calibrate_under_torchrun_then_init_in_one_process(model_factory, data_file, tmp_path, run_cli):
    model, calib, calib_ref = model_factory("llama"), tmp_path / "calib", tmp_path / "calib-ref"
    args = ["calibrate", "--model", model, "--data", data_file, "--num-samples", "5", "--seq-len", "24", "-q"]
    result = torchrun(2, *args, "-o", calib)
    assert result.returncode == 0, result.stderr
    assert run_cli(*args, "-o", calib_ref).code == 0
    distributed, single = load_calibration(calib), load_calibration(calib_ref)
    assert distributed.settings["distributed"] == {"world_size": 2, "backend": "gloo", "samples_per_rank": [3, 2]}
    assert distributed.stats.input_of == single.stats.input_of
    assert (distributed.stats.num_samples, distributed.stats.num_tokens) == (5, single.stats.num_tokens)
    for key, cov in single.stats.covariances.items():
        assert rel_err(distributed.stats.covariances[key], cov) < 1e-5, key
    adapter, adapter_ref = tmp_path / "adapter", tmp_path / "adapter-ref"
    assert run_cli("init", "--calibration", calib, "-q", "-o", adapter).code == 0
    assert run_cli("init", "--calibration", calib_ref, "-q", "-o", adapter_ref).code == 0
    assert_same_adapter(adapter, adapter_ref)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "lines"),
    [
        ("error", ["error: rank 1: rank trouble: error"]),  # before any collective: every rank agrees on it
        ("late", ["error: rank 1: rank trouble: late"]),  # mid-calibration, in a layer's reduction
        # SIGKILL: no word from the rank; rank 0 loses it in a collective, or torchrun stops rank 0 first
        ("kill", [f"error: {LOST}", "interrupted: nothing was written"]),
        ("hang", [f"error: {LOST}"]),  # rank 0 gives up after TLORA_DIST_TIMEOUT, then torchrun stops rank 1
    ],
    ids=["error", "late", "kill", "hang"],
)
def test_one_failing_rank_stops_every_rank_with_one_line_and_no_output(mode, lines, model_factory, data_file, tmp_path):
    script, out = tmp_path / "failing.py", tmp_path / "out"
    script.write_text(FAILING)
    start = time.perf_counter()
    args = init_args(model_factory("llama"), data_file, out, 5)
    result = torchrun(2, *args, script=script, MODE=mode, **{TIMEOUT_ENV: "20"})
    assert result.returncode != 0
    assert time.perf_counter() - start < 120
    ours = [x for x in result.stderr.splitlines() if x.startswith(("error:", "interrupted:"))]
    assert len(ours) == 1 and ours[0] in lines, result.stderr
    assert "tlora_cli" not in result.stderr  # no traceback of ours (torchrun prints its own report)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
