"""The streaming engine must give exactly what the whole-model path gives, one layer at a time."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from reference import rel_err
from safetensors.torch import load_file, save_file

from tlora_cli.calib.folder import load_calibration
from tlora_cli.calib.store import TensorStore
from tlora_cli.calib.streamed_model import StreamedModel

MODELS = [
    ("llama", {}),
    ("llama", {"tie_embeddings": True}),
    ("qwen2", {"sliding_window": 8, "max_window_layers": 1}),
    ("mistral", {"sliding_window": 8}),
    ("gemma2", {"sliding_window": 8}),
    ("gemma3_text", {"sliding_window": 8, "num_layers": 6}),  # layer 6 is global, 1-5 local
    ("gpt_neox", {}),
    ("qwen3", {}),
    ("phi3", {}),
]
SMALL = ("--num-samples", "4", "--seq-len", "32", "-q")
COMMON = (*SMALL, "--engine", "stream")  # tiny models fit: --engine auto would pick whole


@pytest.mark.parametrize(("arch", "options"), MODELS, ids=[f"{a}-{'-'.join(o) or 'plain'}" for a, o in MODELS])
def test_streamed_statistics_and_adapter_equal_the_whole_model(
    arch, options, model_factory, data_file, tmp_path, run_cli, monkeypatch
):
    model_dir = model_factory(arch, **options)
    # Whenever something large is read onto the device, nothing else large is there: one decoder layer, or
    # the embeddings (capture), or the head (loss), never two of these at once.
    loaded: set[str] = set()
    original_load, original_unload, original_holding = (
        StreamedModel.load_layer,
        StreamedModel.unload_layer,
        StreamedModel.holding,
    )

    def load(self, index):
        loaded.add(f"layer {index}")
        assert len(loaded) == 1, f"{sorted(loaded)} on the device at once"
        return original_load(self, index)

    def unload(self, index):
        loaded.discard(f"layer {index}")
        return original_unload(self, index)

    @contextlib.contextmanager
    def holding(self, module):
        name = "embeddings" if module is self.embeddings else "head"
        loaded.add(name)
        assert len(loaded) == 1, f"{sorted(loaded)} on the device at once"
        with original_holding(self, module):
            yield
        loaded.discard(name)

    monkeypatch.setattr(StreamedModel, "load_layer", load)
    monkeypatch.setattr(StreamedModel, "unload_layer", unload)
    monkeypatch.setattr(StreamedModel, "holding", holding)
    for engine in ("stream", "whole"):
        for command in ("calibrate", "init"):
            out = tmp_path / f"{command}-{engine}"
            result = run_cli(command, "--model", model_dir, "--data", data_file, *SMALL, "--engine", engine, "-o", out)
            assert result.code == 0, result.stderr
    assert_same_numbers(
        tmp_path / "calibrate-stream", tmp_path / "calibrate-whole", tmp_path / "init-stream", tmp_path / "init-whole"
    )


def assert_same_numbers(calib: Path, calib_ref: Path, adapter: Path, adapter_ref: Path, alpha_rel: float = 0) -> None:
    """Statistics to 1e-5 relative, the same subspaces for A, the same ranks, the same alphas (to `alpha_rel`
    relative: they follow the scores' last bits)."""
    streamed, whole = load_calibration(calib), load_calibration(calib_ref)
    assert streamed.stats.input_of == whole.stats.input_of
    assert streamed.stats.num_tokens == whole.stats.num_tokens
    for name, key in whole.stats.input_of.items():
        assert rel_err(streamed.stats.covariances[key], whole.stats.covariances[key]) < 1e-5, name
        assert rel_err(streamed.stats.scores[name], whole.stats.scores[name]) < 1e-5, name
    a_stream = load_file(adapter / "adapter_model.safetensors")
    a_whole = load_file(adapter_ref / "adapter_model.safetensors")
    assert a_stream.keys() == a_whole.keys()
    for key, a in a_whole.items():
        if "lora_A" in key:
            r = a.shape[0]
            assert (torch.linalg.matrix_norm(a_stream[key].double() @ a.double().T) ** 2 / r).item() > 0.9999, key
    config, config_ref = (json.loads((a / "adapter_config.json").read_text()) for a in (adapter, adapter_ref))
    for key in ("lora_alpha", "alpha_pattern"):
        assert config.pop(key) == pytest.approx(config_ref.pop(key), rel=alpha_rel, abs=0)
    assert config == config_ref


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("arch", "options"), [MODELS[1], MODELS[3], MODELS[5]], ids=["llama-tied", "mistral", "gemma3"]
)
def test_streamed_on_cuda_equals_the_whole_model_on_cpu(arch, options, model_factory, data_file, tmp_path, run_cli):
    """The path users take on a GPU: layers streamed onto CUDA, covariances offloaded to the host."""
    model_dir = model_factory(arch, **options)
    runs = {"cuda": ("--engine", "stream", "--device", "cuda"), "cpu": ("--engine", "whole", "--device", "cpu")}
    for device, flags in runs.items():
        for command in ("calibrate", "init"):
            out = tmp_path / f"{command}-{device}"
            args = ("--model", model_dir, "--data", data_file, *SMALL, "--dtype", "float32", *flags, "-o", out)
            result = run_cli(command, *args)
            assert result.code == 0, result.stderr
    assert_same_numbers(
        tmp_path / "calibrate-cuda", tmp_path / "calibrate-cpu", tmp_path / "init-cuda", tmp_path / "init-cpu"
    )


@pytest.mark.cuda
def test_a_tensor_leaving_the_gpu_is_read_as_it_was_when_put():
    """The copy to the host is queued, not waited for: what the device does next must not reach it, and a read
    waits for it."""
    store = TensorStore(None)
    on_device = torch.randn(4096, 4096, device="cuda")
    expected = on_device.cpu()
    torch.cuda._sleep(10**9)  # keeps the stream busy: the copy is still queued when put returns
    store.put("c", on_device)
    assert store.memory["c"].is_pinned() and "c" in store.pending
    on_device.zero_()  # queued behind the copy
    assert torch.equal(store.get("c"), expected)
    store.put("d", on_device)
    store.drop("d")  # dropped with its copy under way: nothing to wait for, nothing left
    assert "d" not in store.pending and "d" not in store
    torch.cuda.synchronize()


@pytest.mark.parametrize("method", ["tlora", "lora-da"])
def test_offload_dir_gives_the_same_numbers_and_is_emptied(method, model_factory, data_file, tmp_path, run_cli):
    model_dir = model_factory("qwen2", sliding_window=8, max_window_layers=1)
    offload = tmp_path / "offload"
    offload.mkdir()
    args = ("--model", model_dir, "--data", data_file, "--method", method, *COMMON)
    assert run_cli("init", *args, "-o", tmp_path / "memory").code == 0
    assert run_cli("init", *args, "--offload-dir", offload, "-o", tmp_path / "disk").code == 0
    assert list(offload.iterdir()) == []
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "memory" / file).read_bytes() == (tmp_path / "disk" / file).read_bytes()
    missing = run_cli("init", *args, "--offload-dir", tmp_path / "nope", "-o", tmp_path / "x")
    assert missing.code == 1 and "--offload-dir" in missing.stderr


def test_covariances_are_recomputed_when_host_memory_is_short(model_factory, data_file, tmp_path, run_cli, monkeypatch):
    """Counted after layer 0: q/k/v share one covariance, gate/up one, o and down one each, float32, every
    layer. When they would not fit, each layer's is made again while A is built: the same adapter, to the byte."""
    from tiny_models import HIDDEN_SIZE, INTERMEDIATE_SIZE

    import tlora_cli.calib.host_memory as host_memory

    needed = 2 * 4 * (3 * HIDDEN_SIZE**2 + INTERMEDIATE_SIZE**2)  # 2 layers
    args = ("--model", model_factory("llama"), "--data", data_file, "--num-samples", "4", "--seq-len", "32")
    args += ("--engine", "stream")
    monkeypatch.setattr(host_memory, "available_host_memory", lambda: 10**12)
    roomy = run_cli("init", *args, "-o", tmp_path / "roomy")
    assert roomy.code == 0 and "host memory" not in roomy.stderr
    loads = []
    original = StreamedModel.load_layer
    monkeypatch.setattr(StreamedModel, "load_layer", lambda self, i: loads.append(i) or original(self, i))
    monkeypatch.setattr(host_memory, "available_host_memory", lambda: needed)
    short = run_cli("init", *args, "-o", tmp_path / "short")
    assert short.code == 0, short.stderr
    assert f"would take {needed / 1e9:.3g} GB of the {needed / 1e9:.3g} GB of host memory available" in short.stderr
    assert "warning" not in short.stderr  # the layer inputs still fit
    assert loads == [0, 1, 1, 0, 0, 1]  # forward, backward, then forward once more while A is built
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "short" / file).read_bytes() == (tmp_path / "roomy" / file).read_bytes()
    offloaded = run_cli("init", *args, "--offload-dir", tmp_path, "-o", tmp_path / "offloaded")
    assert offloaded.code == 0 and "host memory" not in offloaded.stderr
    monkeypatch.setattr(host_memory, "available_host_memory", lambda: 1)
    tiny = run_cli("init", *args, "-o", tmp_path / "tiny")
    assert tiny.code == 0 and "warning: the layer inputs will take" in tiny.stderr and "--offload-dir" in tiny.stderr


def alive_at_each_layer_load(monkeypatch) -> tuple[list[weakref.ref], list[int]]:
    """Weak references a test fills with the statistics it sees made, and how many of them are still
    alive each time a layer is read: what a finished layer still holds while the next one runs."""
    refs: list[weakref.ref] = []
    alive: list[int] = []
    original = StreamedModel.load_layer

    def load(self, index):
        alive.append(sum(ref() is not None for ref in refs))
        return original(self, index)

    monkeypatch.setattr(StreamedModel, "load_layer", load)
    return refs, alive


def test_recomputed_covariances_are_freed_before_the_next_layer_runs(model_factory, tiny_init, tmp_path, monkeypatch):
    """While A is built from recomputed covariances, one layer's are held at a time, not two."""
    import tlora_cli.calib.host_memory as host_memory
    from tlora_cli.calib.stream import LayerWalk

    made, alive_at_load = alive_at_each_layer_load(monkeypatch)
    original = LayerWalk.forward_layer

    def forward_layer(*args, **kwargs):
        found = original(*args, **kwargs)
        made.extend(weakref.ref(c) for c in found["covariances"].values())
        return found

    monkeypatch.setattr(LayerWalk, "forward_layer", forward_layer)
    monkeypatch.setattr(host_memory, "available_host_memory", lambda: 1)
    assert tiny_init(model_factory("llama"), tmp_path / "out", "--engine", "stream").code == 0
    assert alive_at_load == [0, 0, 0, 0, 0, 0]  # forward 0, 1, backward 1, 0, recomputed 0, 1


def test_recomputed_covariances_equal_the_kept_ones_in_any_order(model_factory, data_file, monkeypatch):
    """Read backwards, every layer is recomputed from the embeddings; the numbers do not change."""
    import tlora_cli.calib.host_memory as host_memory
    from tlora_cli.calib.stream import RecomputedCovariances
    from tlora_cli.pipeline import CalibrationOptions, ModelSource, calibrate
    from tlora_cli.progress import Reporter

    source = ModelSource.open(str(model_factory("mistral", sliding_window=8)))
    options = CalibrationOptions(num_samples=4, seq_len=32, device="cpu", engine="stream")
    kept = calibrate(source, str(data_file), options, Reporter(quiet=True))[0].stats
    monkeypatch.setattr(host_memory, "available_host_memory", lambda: 1)
    recomputed = calibrate(source, str(data_file), options, Reporter(quiet=True))[0].stats
    assert isinstance(recomputed.covariances, RecomputedCovariances)
    assert list(recomputed.covariances) == list(kept.covariances)
    assert recomputed.scores == kept.scores
    for key in [*reversed(list(kept.covariances)), *kept.covariances]:
        assert torch.equal(recomputed.covariances[key], kept.covariances[key]), key


@pytest.mark.parametrize("gradients", [False, True])
def test_layer_statistics_are_freed_once_written(gradients, model_factory, data_file, tmp_path, run_cli, monkeypatch):
    """`calibrate` writes each layer's covariances (and LoRA-DA's gradient statistics) to its folder; nothing
    may keep them alive into the next layer, or the peak grows by a layer's worth (0.6 GiB for Llama-2-7B)."""
    from tlora_cli.calib.store import TensorStore

    written, alive_at_load = alive_at_each_layer_load(monkeypatch)
    original = TensorStore.put

    def put(self, key, tensor):
        if self.folder is not None:  # the statistics, into the calibration folder (layer inputs stay in memory)
            written.append(weakref.ref(tensor))
        return original(self, key, tensor)

    monkeypatch.setattr(TensorStore, "put", put)
    model_dir = model_factory("llama")
    flags = ["--gradients"] if gradients else []
    result = run_cli("calibrate", "--model", model_dir, "--data", data_file, *COMMON, *flags, "-o", tmp_path / "c")
    assert result.code == 0, result.stderr
    assert len(written) == 8 + (2 * 14 if gradients else 0)  # 4 inputs x 2 layers; mean gradient and moments
    assert alive_at_load == [0, 0, 0, 0]  # forward 0, 1, backward 1, 0


@pytest.mark.parametrize("engine", ["stream", "whole"])
@pytest.mark.parametrize("method", ["random", "w-svd"])
def test_methods_without_c_compute_no_covariance(engine, method, model_factory, tiny_init, tmp_path, monkeypatch):
    import tlora_cli.calib.collector as collector

    calls = []
    original = collector.accumulate_xtx
    monkeypatch.setattr(collector, "accumulate_xtx", lambda *a: calls.append(a[1]) or original(*a))
    assert tiny_init(model_factory("llama"), tmp_path / "c", "--engine", engine).code == 0
    assert calls
    calls.clear()
    assert tiny_init(model_factory("llama"), tmp_path / method, "--engine", engine, "--method", method).code == 0
    assert calls == []


def test_offload_dir_is_emptied_on_failure(model_factory, tiny_init, tmp_path):
    offload = tmp_path / "offload"
    offload.mkdir()
    result = tiny_init(
        model_factory("llama"),
        tmp_path / "out",
        "--engine",
        "stream",
        "--offload-dir",
        offload,
        "--budget-rank",
        100000,
    )
    assert result.code == 1 and list(offload.iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_checkpoint_missing_a_tensor_is_refused_in_one_line(model_factory, data_file, tmp_path, run_cli):
    """A weight the config needs but no shard holds must stop the run, not leave a meta tensor to compute with."""
    model_dir = tmp_path / "model"
    shutil.copytree(model_factory("llama"), model_dir)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = "model.layers.1.mlp.down_proj.weight"
    shard = model_dir / index["weight_map"].pop(dropped)
    tensors = load_file(shard)
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    result = run_cli("calibrate", "--model", model_dir, "--data", data_file, *COMMON, "-o", out)
    assert result.code == 1 and "Traceback" not in result.stderr
    assert f"the checkpoint has no tensor {dropped}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_targets_outside_the_layers_are_refused(model_factory, tiny_init, tmp_path):
    result = tiny_init(
        model_factory("llama"), tmp_path / "out", "--engine", "stream", "--target-modules", "q_proj,lm_head"
    )
    assert result.code == 1 and "lm_head is outside the decoder layers" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_run_killed_mid_way_leaves_no_output(sig, model_factory, tmp_path):
    model_dir = model_factory("llama", num_layers=8)
    data = tmp_path / "long.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"The quick brown fox {i} jumps over the lazy dog. " * 20}) + "\n" for i in range(64)
        )
    )
    offload, out = tmp_path / "offload", tmp_path / "out"
    offload.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tlora_cli",
            "init",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--num-samples",
            "64",
            "--seq-len",
            "200",
            "--offload-dir",
            str(offload),
            "--engine",
            "stream",
            "-q",
            "-o",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not any(offload.rglob("*.safetensors")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    if sig == signal.SIGTERM:  # a kill -9 cannot clean up, but still leaves no OUT
        assert list(offload.iterdir()) == []
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        assert "interrupted" in proc.stderr.read()


def test_a_checkpoint_opens_each_shard_once_however_many_tensors_it_reads(model_factory, monkeypatch):
    """Every open parses a shard's header again; a layer's tensors are read one by one from the same shard."""
    import tlora_cli.model.checkpoint as model_io

    opened: list[Path] = []
    original = model_io.safe_open
    monkeypatch.setattr(model_io, "safe_open", lambda file, fw: opened.append(file) or original(file, fw))
    checkpoint = model_io.Checkpoint(model_factory("llama"))
    shards = set(checkpoint.files.values())
    assert len(shards) > 1  # the tiny models are saved sharded
    for name in checkpoint.names():
        checkpoint.get(name)
    assert checkpoint.fingerprint
    assert sorted(opened) == sorted(shards)


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads /proc/self/smaps (Linux)")
@pytest.mark.parametrize("read_ahead", [True, False], ids=["read-ahead", "no-read-ahead"])
def test_layers_read_and_unloaded_leave_nothing_of_their_shards_resident(read_ahead, model_factory):
    """A shard reader maps its file, and what was read through it stays in the resident set while the map
    lives: kept open all along, a streamed 7B's peak RSS held the whole checkpoint. After every layer has
    been read and unloaded, the shards' maps hold no more than the modules that stay loaded needed."""
    import tlora_cli.model.checkpoint as model_io

    path = model_factory("llama")
    checkpoint = model_io.Checkpoint(path)
    shards = {os.path.realpath(f) for f in checkpoint.files.values()}

    def resident_kib() -> int:
        total, mapped = 0, None
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if "-" in fields[0]:  # a mapping's header line: its file is the last field
                    mapped = fields[-1]
                elif fields[0] == "Rss:" and mapped in shards:
                    total += int(fields[1])
        return total

    streamed = StreamedModel(path, checkpoint, torch.float32, "cpu", read_ahead=read_ahead)
    kept = resident_kib()  # the final norm and the like stay loaded (float32 as read: the tensors map their shard)
    for index in range(len(streamed.layers)):
        streamed.read_ahead(index)
        streamed.load_layer(index)
        streamed.unload_layer(index)
    with streamed.holding(streamed.embeddings):
        assert resident_kib() > kept  # what is loaded shows: the test can see it
    assert resident_kib() <= kept


def test_reading_ahead_reads_every_layer_on_the_reader_thread_and_changes_no_number(
    model_factory, tiny_init, tmp_path, monkeypatch
):
    """Each layer is read on the background thread while the one before it computes; off, on the main thread."""
    import threading

    threads: list[str] = []
    original = StreamedModel._read_layer
    monkeypatch.setattr(
        StreamedModel,
        "_read_layer",
        lambda self, i, layer: threads.append(threading.current_thread().name) or original(self, i, layer),
    )
    model = model_factory("gemma3_text", sliding_window=8, num_layers=3)
    for flag in ("--read-ahead", "--no-read-ahead"):
        threads.clear()
        assert tiny_init(model, tmp_path / flag, "--engine", "stream", flag).code == 0
        reader = flag == "--read-ahead"
        assert len(threads) == 6 and all(name.startswith("tlora-reader") == reader for name in threads), threads
        timings = json.loads((tmp_path / flag / "tlora_metadata.json").read_text())["timings"]
        assert timings["load_wait"] >= 0 and timings["layer_reads"] > 0
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "--read-ahead" / file).read_bytes() == (tmp_path / "--no-read-ahead" / file).read_bytes()


def test_an_error_on_the_reader_thread_is_one_line(model_factory, tiny_init, tmp_path, monkeypatch):
    import threading

    import tlora_cli.model.checkpoint as model_io

    original = model_io.Checkpoint.get

    def get(self, name, shape=None):
        if name == "model.layers.1.mlp.up_proj.weight":
            assert threading.current_thread().name.startswith("tlora-reader")
            raise model_io.TloraError(f"cannot read {name} from a shard: I/O error")
        return original(self, name, shape)

    monkeypatch.setattr(model_io.Checkpoint, "get", get)
    result = tiny_init(model_factory("llama"), tmp_path / "out", "--engine", "stream")
    assert result.code == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: cannot read model.layers.1.mlp.up_proj.weight from a shard: I/O error"
    assert not (tmp_path / "out").exists()
