"""Reliability round 3, outputs and tensors: what a hostile user or a crafted file hands `init`, `export` and
`inspect`. Each case ends in exit 1 or 2 (never 3, an internal error) with one line naming the thing, leaves every
input and an existing OUT byte-for-byte as it was, and leaves no half-written output behind."""

from __future__ import annotations

import errno
import json
import shlex
import shutil
import struct
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_faults import init_args, no_debris, one_line, snapshot
from tiny_models import make_hub_cache, use_offline_hub_cache

from tlora_cli.errors import TloraError
from tlora_cli.outputs.atomic import atomic_dir

WEIGHTS, CONFIG, METADATA = "adapter_model.safetensors", "adapter_config.json", "tlora_metadata.json"
FIRST = "model.layers.0.self_attn.q_proj"


def _main(*args: str | Path) -> int:
    """`tlora ARGS` in this process, for the module's shared fixtures (run_cli is per test)."""
    from tlora_cli.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["tlora", *map(str, args)])
        try:
            main()
        except SystemExit as e:
            return e.code
    return 0


@pytest.fixture(scope="module")
def made(tmp_path_factory, model_factory, data_file) -> tuple[Path, Path]:
    """A private base model and a tlora adapter on it with per-module ranks and a random (trained) B."""
    root = tmp_path_factory.mktemp("made")
    base = root / "base"
    shutil.copytree(model_factory("llama"), base)
    adapter = root / "adapter"
    assert _main(*init_args(base, data_file, adapter, "--budget-rank", "4")) == 0
    tensors = load_file(adapter / WEIGHTS)
    generator = torch.Generator().manual_seed(0)
    for key, t in tensors.items():
        if ".lora_B." in key:
            tensors[key] = torch.randn(t.shape, generator=generator) * 0.3
    save_file(tensors, adapter / WEIGHTS, metadata={"format": "pt"})
    assert json.loads((adapter / CONFIG).read_text())["target_modules"][0] == FIRST
    return base, adapter


@pytest.fixture
def base(made) -> Path:
    return made[0]


@pytest.fixture
def adapter(made, tmp_path) -> Path:
    """A copy of the shared adapter, free to damage."""
    return Path(shutil.copytree(made[1], tmp_path / "adapter"))


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _edit_weights(adapter: Path, edit) -> None:
    tensors = load_file(adapter / WEIGHTS)
    edit(tensors)
    save_file(tensors, adapter / WEIGHTS, metadata={"format": "pt"})


def _no_lock(folder: Path) -> None:
    no_debris(folder)
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".lock")]


# --- 1. Output gate: OUT re-checked at the swap, under a lock; never an input, the adapter's base included -------


def test_an_output_that_appears_during_init_is_kept(run_cli, base, data_file, tmp_path, monkeypatch):
    """Another program (or a second init) makes OUT while this run writes: without --overwrite, it stays."""
    from tlora_cli.adapter import writer

    out = tmp_path / "adapter"

    def meanwhile(folder, meta):
        out.mkdir()
        (out / "notes.txt").write_text("the other run's")
        writer.write_metadata(folder, meta)

    monkeypatch.setattr("tlora_cli.pipeline.write_metadata", meanwhile)
    one_line(run_cli(*init_args(base, data_file, out)), 1, "appeared", str(out))
    assert (out / "notes.txt").read_text() == "the other run's" and len(list(out.iterdir())) == 1
    _no_lock(tmp_path)


def test_overwrite_rechecks_at_the_swap_what_it_replaces(run_cli, made, data_file, tmp_path, monkeypatch):
    """OUT was tlora's when the run began and a user's folder when it ended: --overwrite must not delete it."""
    from tlora_cli.adapter import writer

    base, made_adapter = made
    out = Path(shutil.copytree(made_adapter, tmp_path / "adapter"))

    def meanwhile(folder, meta):
        shutil.rmtree(out)
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
        writer.write_metadata(folder, meta)

    monkeypatch.setattr("tlora_cli.pipeline.write_metadata", meanwhile)
    one_line(run_cli(*init_args(base, data_file, out, "--overwrite")), 1, "not an adapter folder written by tlora")
    assert (out / "thesis.tex").read_text() == "precious"
    _no_lock(tmp_path)


def test_two_runs_to_one_new_output_cannot_both_win(tmp_path):
    """Both pass the first check (OUT is free), both finish: exactly one is put in place, the other says so."""
    out, gate = tmp_path / "adapter", threading.Barrier(2, timeout=60)
    results: dict[int, str] = {}

    def run(i: int) -> None:
        try:
            with atomic_dir(out, False) as tmp:
                (tmp / "who").write_text(str(i))
                gate.wait()
            results[i] = "won"
        except TloraError as e:
            results[i] = str(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == "won"]
    assert len(winners) == 1, results
    assert "appeared" in results[1 - winners[0]] and (out / "who").read_text() == str(winners[0])
    _no_lock(tmp_path)


def _based_on(adapter: Path, base: Path) -> None:
    """The adapter names `base` as the model it was made on, in its metadata and its config."""
    _edit_json(adapter / METADATA, lambda m: m["model"].update(name=str(base), fingerprint=None))
    _edit_json(adapter / CONFIG, lambda c: c.update(base_model_name_or_path=str(base)))


def test_export_never_writes_into_or_over_the_base_the_adapter_names(run_cli, adapter, base, tmp_path):
    """No --model: the base comes from the adapter's metadata, and it is an input like --model."""
    merged = tmp_path / "merged"  # a tlora output, so --overwrite would replace it, and a model to make adapters on
    assert run_cli("export", adapter, "--format", "merged", "-o", merged, "-q").code == 0
    _based_on(adapter, merged)
    before = snapshot(tmp_path, base)
    for out, extra in ((merged, ["--overwrite"]), (merged / "inside", []), (base / "inside", ["--model", base])):
        one_line(run_cli("export", adapter, "--format", "merged", "-o", out, "-q", *extra), 1, "input", str(out))
    assert snapshot(tmp_path, base) == before
    initial = tmp_path / "initial"
    shutil.copytree(adapter, initial)
    before = snapshot(tmp_path, base)
    args = ["export", adapter, "--format", "lora", "--initial", initial, "-o", initial, "--overwrite"]
    one_line(run_cli(*args), 1, "--initial")
    assert snapshot(tmp_path, base) == before
    _no_lock(tmp_path)


# --- 2. inspect --plot: an output like any other ---------------------------------------------------------------


def test_plot_refuses_what_it_must_not_write(run_cli, adapter, tmp_path):
    pytest.importorskip("matplotlib")
    mine = tmp_path / "photo.png"
    mine.write_bytes(b"\x89PNG the user's")
    secret = tmp_path / "secret"
    secret.write_text("key")
    (tmp_path / "link.png").symlink_to(secret)
    (tmp_path / "folder").mkdir()
    before = snapshot(tmp_path)
    cases = [
        (mine, [], "already exists"),
        (tmp_path / "link.png", ["--overwrite"], "symbolic link"),
        (tmp_path / "folder", [], "is a folder"),
        (tmp_path / "budget.txt", [], "--plot"),
        (tmp_path / "budget", [], "--plot"),
        (adapter / "budget2.png", [], "ADAPTER"),
    ]
    for target, extra, needle in cases:
        one_line(run_cli("inspect", adapter, "--plot", target, *extra), 1, needle)
    assert snapshot(tmp_path) == before
    _no_lock(tmp_path)


def test_plot_is_replaced_whole_or_not_at_all(run_cli, adapter, tmp_path, monkeypatch):
    """--overwrite replaces the picture through a temp file: a full disk leaves the old one, whole."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    picture = tmp_path / "budget.png"
    assert run_cli("inspect", adapter, "--plot", picture).code == 0
    before = snapshot(tmp_path)

    def disk_full(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG trunc")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Figure, "savefig", disk_full)
        one_line(run_cli("inspect", adapter, "--plot", picture, "--overwrite"), 1, "No space left")
    assert snapshot(tmp_path) == before
    _no_lock(tmp_path)
    result = run_cli("inspect", adapter, "--plot", picture, "--overwrite")
    assert result.code == 0 and picture.read_bytes().startswith(b"\x89PNG")


# --- 3. Tensor gate: finite and within the dtype, before the swap ----------------------------------------------


@pytest.mark.parametrize(("alpha", "needle"), [("1e40", "overflows float32"), ("1e-300", "below the smallest")])
def test_init_refuses_a_scaling_the_adapter_cannot_hold(run_cli, base, data_file, tmp_path, alpha, needle):
    out = tmp_path / "adapter"
    before = snapshot(tmp_path, base)
    one_line(run_cli(*init_args(base, data_file, out, "--alpha", alpha)), 1, needle, "--alpha")
    assert not out.exists() and snapshot(tmp_path, base) == before
    _no_lock(tmp_path)


def _half(adapter: Path, b: float, a: float | None = None) -> None:
    """The adapter saved in float16, every B entry `b` (and every A entry `a`)."""

    def edit(tensors):
        for key, t in tensors.items():
            value = b if ".lora_B." in key else a
            tensors[key] = (t if value is None else torch.full_like(t, value)).half()

    _edit_weights(adapter, edit)


def test_float16_export_that_would_fold_into_inf(run_cli, adapter, tmp_path):
    """s B in float16: B = 60000 with a scaling above 1 is beyond 65504."""
    _half(adapter, 60000.0)
    _edit_json(adapter / CONFIG, lambda c: c["alpha_pattern"].update({FIRST: 4 * c["rank_pattern"][FIRST]}))
    before = snapshot(tmp_path)
    for fmt in ("vllm", "padded"):
        one_line(run_cli("export", adapter, "--format", fmt, "-o", tmp_path / fmt), 1, FIRST, "float16", "float32")
    assert snapshot(tmp_path) == before
    _no_lock(tmp_path)


def test_merge_into_a_float16_base_that_overflows(run_cli, adapter, model_factory, tmp_path):
    half = Path(shutil.copytree(model_factory("llama", dtype=torch.float16), tmp_path / "half"))
    _half(adapter, 30000.0, 1.0)  # B A = r * 30000 per entry, far beyond float16
    before = snapshot(tmp_path)
    args = ["export", adapter, "--format", "merged", "--model", half, "-o", tmp_path / "merged", "-q"]
    one_line(run_cli(*args), 1, "model.layers.0", "float16", "float32")
    assert snapshot(tmp_path) == before
    _no_lock(tmp_path)


def test_export_refuses_a_nan_in_the_adapter(run_cli, adapter, tmp_path):
    _edit_weights(adapter, lambda t: t[f"base_model.model.{FIRST}.lora_B.weight"].__setitem__((0, 0), float("nan")))
    before = snapshot(tmp_path)
    one_line(run_cli("export", adapter, "-o", tmp_path / "out"), 1, FIRST, "NaN")
    assert snapshot(tmp_path) == before


# --- 4. Reader consistency gate: every adapter file checked against itself -------------------------------------


def _pattern_value(value):
    return lambda c: c["rank_pattern"].update({FIRST: value})


def _bad_regex(c):
    c["alpha_pattern"]["(["] = 2.0


def _nan_alpha(c):
    c["alpha_pattern"] = {}
    c["lora_alpha"] = float("nan")


def _huge_alpha(c):
    c["alpha_pattern"] = {}
    c["lora_alpha"] = 10**400  # a JSON integer beyond any float


def _nan_pattern_alpha(c):
    c["alpha_pattern"][FIRST] = float("nan")


def _absent_target(c):
    c["target_modules"].append("model.layers.9.self_attn.q_proj")


def _absent_pattern(c):
    c["rank_pattern"]["model.layers.9.mlp.up_proj"] = 4


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_pattern_value("abc"), "rank_pattern"),
        (_pattern_value(None), "rank_pattern"),
        (_pattern_value(True), "rank_pattern"),
        (_bad_regex, "regular expression"),
        (_nan_alpha, "lora_alpha"),
        (_huge_alpha, "lora_alpha"),
        (_nan_pattern_alpha, "alpha_pattern"),
        (_absent_target, "model.layers.9.self_attn.q_proj"),
        (_absent_pattern, "model.layers.9.mlp.up_proj"),
    ],
)
def test_inconsistent_adapter_config(run_cli, adapter, tmp_path, edit, needle):
    _edit_json(adapter / CONFIG, edit)
    before = snapshot(tmp_path)
    one_line(run_cli("export", adapter, "-o", tmp_path / "out"), 1, needle)
    one_line(run_cli("inspect", adapter), 1, needle)
    assert snapshot(tmp_path) == before


def _zero_rank(adapter: Path) -> None:
    def edit(tensors):
        tensors[f"base_model.model.{FIRST}.lora_A.weight"] = tensors[f"base_model.model.{FIRST}.lora_A.weight"][:0]
        tensors[f"base_model.model.{FIRST}.lora_B.weight"] = tensors[f"base_model.model.{FIRST}.lora_B.weight"][:, :0]

    _edit_weights(adapter, edit)
    _edit_json(adapter / CONFIG, _pattern_value(0))


def _integer_b(adapter: Path) -> None:
    key = f"base_model.model.{FIRST}.lora_B.weight"
    _edit_weights(adapter, lambda t: t.update({key: (t[key] * 10).long()}))


def _header(data: bytes):
    return lambda adapter: (adapter / WEIGHTS).write_bytes(data)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_zero_rank, "rank_pattern"),
        (_integer_b, "I64"),
        (_header(b"\x10\x00\x00"), "truncated"),
        (_header(struct.pack("<Q", 8 << 30) + b"{}"), "8,589,934,592"),
        (_header(struct.pack("<Q", 500) + b'{"a": 1}'), "truncated"),
    ],
)
def test_inconsistent_adapter_weights(run_cli, adapter, tmp_path, damage, needle):
    damage(adapter)
    before = snapshot(tmp_path)
    one_line(run_cli("export", adapter, "-o", tmp_path / "out"), 1, needle)
    one_line(run_cli("inspect", adapter), 1, needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("data", [b"\x10\x00", struct.pack("<Q", 8 << 30) + b"{}"])
def test_checkpoint_shard_with_a_bad_header(run_cli, adapter, base, tmp_path, data):
    model = Path(shutil.copytree(base, tmp_path / "model"))
    sorted(model.glob("*.safetensors"))[1].write_bytes(data)
    before = snapshot(tmp_path)
    args = ["export", adapter, "--format", "merged", "--model", model, "-o", tmp_path / "merged", "-q"]
    one_line(run_cli(*args), 1, "checkpoint shard", "8,589,934,592" if len(data) > 8 else "truncated")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("rank", ["10000", "100000000"])
def test_padded_rank_is_bounded_by_the_modules(run_cli, adapter, tmp_path, rank):
    before = snapshot(tmp_path)
    one_line(run_cli("export", adapter, "--format", "padded", "--rank", rank, "-o", tmp_path / "out"), 1, "--rank")
    assert snapshot(tmp_path) == before


def test_residual_factors_that_do_not_fit_the_base(run_cli, adapter, base, tmp_path):
    """A residual adapter whose sidecar's B0 A0 is not its module's shape: one line, not a broadcast error."""
    sidecar = {}
    for key, t in load_file(adapter / WEIGHTS).items():
        name, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        wide = part.startswith("A") and name == FIRST
        sidecar[f"{name}.residual_{part[0]}"] = torch.zeros(t.shape[0], t.shape[1] + 1) if wide else torch.zeros_like(t)
        sidecar[f"{name}.residual_scaling"] = torch.tensor(1.0, dtype=torch.float64)
    save_file(sidecar, adapter / "tlora_directions.safetensors")
    _edit_json(adapter / METADATA, lambda m: m.update(residual={"id": "x"}))
    before = snapshot(tmp_path, base)
    args = ["export", adapter, "--format", "residual-base", "-o", tmp_path / "residual", "-q"]
    one_line(run_cli(*args), 1, FIRST, "residual factors")
    assert snapshot(tmp_path, base) == before


def test_inspect_draws_an_alpha_of_1e_300(run_cli, adapter, tmp_path):
    """Scalings near the end of the float range: matplotlib's log norm fails there, the picture must not."""
    pytest.importorskip("matplotlib")
    _edit_json(adapter / CONFIG, lambda c: c.update(alpha_pattern={k: 1e-300 for k in c["alpha_pattern"]}))
    assert run_cli("inspect", adapter).code == 0
    result = run_cli("inspect", adapter, "--plot", tmp_path / "tiny.png")
    assert result.code == 0, result.stderr
    assert (tmp_path / "tiny.png").read_bytes().startswith(b"\x89PNG")


# --- 5. Merged export: the base's layout kept, and only its own checkpoint files copied ------------------------


def _in_subfolders(base: Path, folder: Path) -> Path:
    """The base re-saved as two shards a/model.safetensors and b/model.safetensors, by an index."""
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, folder / name)
    tensors = {}
    for shard in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(shard))
    names = sorted(tensors)
    weight_map = {}
    for sub, part in (("a", names[::2]), ("b", names[1::2])):
        (folder / sub).mkdir()
        save_file({n: tensors[n] for n in part}, folder / sub / "model.safetensors", metadata={"format": "pt"})
        weight_map |= {n: f"{sub}/model.safetensors" for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_merged_keeps_shards_in_subfolders(run_cli, adapter, base, tmp_path):
    model = _in_subfolders(base, tmp_path / "model")
    out = tmp_path / "merged"
    result = run_cli("export", adapter, "--format", "merged", "--model", model, "-o", out, "-q")
    assert result.code == 0, result.stderr
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name, file in weight_map.items():
        assert name in load_file(out / file), (name, file)
    written = load_file(out / weight_map[f"{FIRST}.weight"])[f"{FIRST}.weight"]
    original = load_file(model / weight_map[f"{FIRST}.weight"])[f"{FIRST}.weight"]
    assert not torch.equal(written, original)  # merged, not copied


def test_merged_copies_no_file_from_outside_the_model(run_cli, adapter, base, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    model = Path(shutil.copytree(base, tmp_path / "model"))
    (model / "notes.txt").symlink_to(secret)  # not a checkpoint file: never copied
    out = tmp_path / "merged"
    assert run_cli("export", adapter, "--format", "merged", "--model", model, "-o", out, "-q").code == 0
    assert not (out / "notes.txt").exists() and (out / "tokenizer.json").is_file()
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)  # a checkpoint file that leads outside: refused
    before = snapshot(tmp_path)
    args = ["export", adapter, "--format", "merged", "--model", model, "-o", tmp_path / "m2", "-q"]
    one_line(run_cli(*args), 1, "tokenizer.json", "outside the model folder")
    assert snapshot(tmp_path) == before
    _no_lock(tmp_path)


def test_merged_from_the_hub_cache_follows_its_blob_links(run_cli, adapter, base, tmp_path, monkeypatch):
    """A hub snapshot's files are links into the repo's blobs/, two levels up: they stay inside the model."""
    cache = tmp_path / "hub"
    snapshot_dir = make_hub_cache(base, cache, "tiny-org/tiny-llama")
    use_offline_hub_cache(monkeypatch, cache)
    for model, out in ((snapshot_dir, tmp_path / "by-path"), ("tiny-org/tiny-llama", tmp_path / "by-id")):
        result = run_cli("export", adapter, "--format", "merged", "--model", model, "-o", out, "-q")
        assert result.code == 0, result.stderr
        assert not (out / "tokenizer.json").is_symlink()
        assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    before = snapshot(tmp_path)
    inside = cache / "models--tiny-org--tiny-llama" / "merged"
    args = ["export", adapter, "--format", "merged", "--model", "tiny-org/tiny-llama", "-o", inside, "-q"]
    one_line(run_cli(*args), 1, "lies inside the --model input")
    assert snapshot(tmp_path) == before


# --- 6. Messages: protecting warnings are never quiet, printed commands are quoted -----------------------------


def test_quiet_keeps_the_wrong_base_warning(run_cli, adapter, base, tmp_path):
    other = Path(shutil.copytree(base, tmp_path / "other"))
    shard = sorted(other.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    key = sorted(k for k in tensors if tensors[k].dim() == 2)[0]
    tensors[key][0] += 1.0  # the fingerprint reads first rows
    save_file(tensors, shard, metadata={"format": "pt"})
    result = run_cli("export", adapter, "--format", "merged", "--model", other, "-o", tmp_path / "m", "-q")
    assert result.code == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "not the model this adapter" in lines[0]


def test_export_hint_quotes_what_the_adapter_says(run_cli, adapter, tmp_path):
    crafted = "org/model; touch pwned #"
    _edit_json(adapter / CONFIG, lambda c: c.update(base_model_name_or_path=crafted))
    out = tmp_path / "my export"
    result = run_cli("export", adapter, "-o", out)
    assert result.code == 0, result.stderr
    command = next(line for line in result.stderr.splitlines() if "vllm serve" in line).split(": ", 1)[1]
    words = shlex.split(command)
    assert words[:3] == ["vllm", "serve", crafted] and words[-1] == f"{out.name}={out}"
