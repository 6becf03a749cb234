"""`tlora export`: a PEFT LoRA adapter as inference servers read it, or merged into its base model.

Servers apply one scaling to every module: vLLM reads `r`, `lora_alpha` and `use_rslora` only and ignores
`alpha_pattern`; SGLang refuses patterns that change a module's rank or alpha; LoRAX and TGI stack every
module of a type and need one rank per type. So each format folds the module's own scaling s_i = alpha_i / r_i
into B (in float32, then the adapter's dtype) and writes a config whose single scaling is 1:

- vllm: per-module ranks kept (vLLM pads its buffers to --max-lora-rank); `lora_alpha = r` and every
  pattern alpha equal to its rank, so every reader, PEFT included, scales by exactly 1.
- padded: every A and B zero-padded to one rank, no patterns at all (SGLang, TGI, LoRAX). The padded rows
  of A and columns of B are zero, so B A is unchanged.
- merged: W + s_i B_i A_i written shard by shard under the base's own index: one shard in memory at a time.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import CONFIG, METADATA, WEIGHTS
from .errors import TloraError
from .model_io import Checkpoint, open_shard

FORMATS = ("vllm", "padded", "merged")
# vLLM's --max-lora-rank accepts these values only (vllm/config/lora.py).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<part>[AB])\.weight$")
# Files of a model folder that are weights in another format, or not ours to copy into a merged checkpoint.
SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
SKIP_NAMES = {"README.md", ".gitattributes", "tlora-conversion.json"}


@dataclass
class LoraModule:
    """One adapted module: A (r x in), B (out x r), and the scaling PEFT applies to B A."""

    name: str
    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def scaled_b(self) -> torch.Tensor:
        """s_i B in float32, back in B's dtype: the B a server with scaling 1 must see."""
        return (self.b.float() * self.scaling).to(self.b.dtype).contiguous()

    def delta(self) -> torch.Tensor:
        """s_i B A in float32: what PEFT adds to W."""
        return self.scaling * (self.b.float() @ self.a.float())


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """PEFT's rule for rank_pattern/alpha_pattern: the first key that, as a regex, matches the end of the
    module name at a dot boundary (peft.utils.other.get_pattern_key); None when none does."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _refusal(config: dict, folder: Path) -> str | None:
    """Why the adapter cannot be exported faithfully, or None."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        return f"it is a {peft_type} adapter; only LoRA adapters export"
    if config.get("use_dora"):
        return "it is a DoRA adapter: its magnitude vector rescales W, which no LoRA server applies"
    if config.get("modules_to_save"):
        return f"it saves whole modules ({', '.join(config['modules_to_save'])}), which a LoRA server cannot load"
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        return "it trains biases, which a LoRA server cannot load"
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        return "it mixes rsLoRA with rank or alpha patterns, whose scaling servers do not reproduce"
    if config.get("fan_in_fan_out"):
        return "it is for a fan-in/fan-out (Conv1D) model, which the exported formats do not describe"
    if config.get("layer_replication"):
        return "it replicates layers, which a LoRA server cannot do"
    if config.get("target_parameters"):
        return "it targets parameters rather than modules (target_parameters)"
    return None


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TloraError(f"cannot read {path}: {e}".splitlines()[0]) from e
    if not isinstance(value, dict):
        raise TloraError(f"{path} is not a JSON object")
    return value


def read_lora(folder: Path) -> tuple[dict, list[LoraModule]]:
    """The adapter's config and its modules with PEFT's own per-module scaling; refuses, in one line, any
    adapter whose effect a plain LoRA server (or a merge) would not reproduce."""
    if not folder.is_dir():
        raise TloraError(f"{folder} is not a folder: pass a PEFT LoRA adapter directory")
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise TloraError(f"{folder} is not a PEFT adapter in safetensors: it needs {CONFIG} and {WEIGHTS}")
    config = read_json(folder / CONFIG)
    why = _refusal(config, folder)
    if why:
        raise TloraError(f"cannot export {folder}: {why}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(folder / WEIGHTS, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                m = KEY.match(key)
                if not m:
                    raise TloraError(f"cannot export {folder}: it holds {key}, which is not a LoRA A/B weight")
                parts.setdefault(m["name"], {})[m["part"]] = f.get_tensor(key)
    except (OSError, RuntimeError) as e:  # safetensors raises its own error types on bad files
        raise TloraError(f"cannot read {folder / WEIGHTS}: {e}".splitlines()[0]) from e
    if not parts:
        raise TloraError(f"cannot export {folder}: {WEIGHTS} holds no LoRA weights")
    rslora = bool(config.get("use_rslora"))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = []
    for name in sorted(parts, key=_natural):
        got = parts[name]
        if set(got) != {"A", "B"}:
            raise TloraError(f"cannot export {folder}: {name} lacks lora_{'B' if 'A' in got else 'A'}")
        a, b = got["A"], got["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise TloraError(
                f"cannot export {folder}: {name} has A {list(a.shape)} and B {list(b.shape)}, not r x in and out x r"
            )
        rank_key, alpha_key = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
        rank = int(rank_pattern[rank_key] if rank_key is not None else config.get("r", 8))
        if rank != a.shape[0]:
            raise TloraError(
                f"cannot export {folder}: {CONFIG} gives {name} rank {rank} but its A has {a.shape[0]} rows"
            )
        alpha = float(alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8))
        scaling = alpha / (math.sqrt(rank) if rslora else rank)
        modules.append(LoraModule(name, a, b, alpha, scaling))
    return config, modules


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank` (None above its largest)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def _base_config(config: dict) -> dict:
    """The original config with the scaling fields every format rewrites."""
    out = dict(config)
    out["use_rslora"] = False
    out["inference_mode"] = True
    return out


def vllm_adapter(config: dict, modules: list[LoraModule]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Scaling folded into B; per-module ranks kept; one scaling of 1 for every reader."""
    top = max(m.rank for m in modules)
    ranks = {m.name: m.rank for m in modules}
    out = _base_config(config)
    out.update(r=top, lora_alpha=top)
    # PEFT needs the ranks to build the layers and, without a pattern alpha equal to each rank, would
    # scale a module by top / r_i; vLLM ignores both patterns and scales by lora_alpha / r = 1.
    out["rank_pattern"] = {n: r for n, r in ranks.items() if r != top}
    out["alpha_pattern"] = dict(out["rank_pattern"])
    tensors = {}
    for m in modules:
        tensors[f"base_model.model.{m.name}.lora_A.weight"] = m.a.contiguous()
        tensors[f"base_model.model.{m.name}.lora_B.weight"] = m.scaled_b()
    return out, tensors


def padded_adapter(
    config: dict, modules: list[LoraModule], rank: int | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Scaling folded into B and every A, B zero-padded to one rank: no patterns left for a server to refuse."""
    top = max(m.rank for m in modules)
    rank = top if rank is None else rank
    if rank < top:
        raise TloraError(f"--rank {rank} is below the adapter's largest rank {top}: pass --rank {top} or more")
    out = _base_config(config)
    out.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={})
    tensors = {}
    for m in modules:
        a = torch.zeros(rank, m.a.shape[1], dtype=m.a.dtype)
        a[: m.rank] = m.a
        b = torch.zeros(m.b.shape[0], rank, dtype=m.b.dtype)
        b[:, : m.rank] = m.scaled_b()
        tensors[f"base_model.model.{m.name}.lora_A.weight"] = a
        tensors[f"base_model.model.{m.name}.lora_B.weight"] = b
    return out, tensors


def _copy_metadata(adapter: Path, folder: Path, export: dict) -> None:
    """tlora's metadata (when the adapter has it) with how this export was made."""
    meta = read_json(adapter / METADATA) if (adapter / METADATA).is_file() else {}
    meta["export"] = export
    (folder / METADATA).write_text(json.dumps(meta, indent=2) + "\n")


def write_adapter_export(
    adapter: Path, folder: Path, fmt: str, rank: int | None = None, lora: tuple[dict, list[LoraModule]] | None = None
) -> tuple[dict, list[LoraModule]]:
    """Write the vllm or padded export of `adapter` into `folder`; returns the new config and the modules read
    (`lora`: what read_lora(adapter) returned, when the caller has it)."""
    config, modules = lora or read_lora(adapter)
    if fmt == "vllm":
        if rank is not None:
            raise TloraError("--rank pads to one rank: it goes with --format padded")
        out, tensors = vllm_adapter(config, modules)
    else:
        out, tensors = padded_adapter(config, modules, rank)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    _copy_metadata(adapter, folder, {"format": fmt, "from": str(adapter.resolve()), "rank": out["r"]})
    return out, modules


def write_merged(
    adapter: Path,
    base: Path,
    folder: Path,
    on_shard: Callable[[str], None] | None = None,
    lora: tuple[dict, list[LoraModule]] | None = None,
) -> tuple[dict, list[LoraModule]]:
    """W + s_i B_i A_i for every adapted module, one base shard in memory at a time, under the base's names,
    index and dtype; the base's config, tokenizer and other small files copied beside them."""
    config, modules = lora or read_lora(adapter)
    checkpoint = Checkpoint(base)
    by_weight = {f"{m.name}.weight": m for m in modules}
    missing = [k for k in by_weight if k not in checkpoint.files]
    if missing:
        raise TloraError(
            f"the base model {base} has no tensor {missing[0]}: is it the model this adapter was made for? "
            "(pass the right one with --model)"
        )
    for key, m in by_weight.items():
        shape = _shape(checkpoint.files[key], key)
        if shape != [m.b.shape[0], m.a.shape[1]]:
            raise TloraError(
                f"the base model's {key} is {shape}, but the adapter's B A is {[m.b.shape[0], m.a.shape[1]]}: "
                "is it the model this adapter was made for?"
            )
    by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint.files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        if on_shard:
            on_shard(file.name)
        tensors = {}
        with open_shard(file) as f:
            for name in names:
                tensor = f.get_tensor(name)
                m = by_weight.get(name)
                if m is not None:
                    tensor = (tensor.float() + m.delta()).to(tensor.dtype)
                tensors[name] = tensor.contiguous()
            shard_metadata = f.metadata() or {"format": "pt"}
        save_file(tensors, folder / file.name, metadata=shard_metadata)
        del tensors
    for item in sorted(base.iterdir()):
        if item.is_file() and not item.name.endswith((".safetensors", *SKIP_SUFFIXES)) and item.name not in SKIP_NAMES:
            shutil.copyfile(item, folder / item.name)  # follows the hub cache's symlinks
    return config, modules


def _shape(file: Path, key: str) -> list[int]:
    with open_shard(file) as f:
        return list(f.get_slice(key).get_shape())


def merged_base(adapter: Path, config: dict, model: str | None, revision: str | None) -> tuple[Path, str | None]:
    """The base model folder a merge reads, and its hub id: --model; else the folder tlora calibrated on (its
    metadata); else `base_model_name_or_path` (the built-in model's hub id means the built-in copy)."""
    from .builtin_model import builtin_model_path
    from .model_card import BUILTIN_HUB_ID, base_hub_id
    from .model_io import resolve_model

    if model is not None:
        path = resolve_model(model, revision)
        return path, base_hub_id(model, path)
    meta = read_json(adapter / METADATA) if (adapter / METADATA).is_file() else {}
    calibrated = (meta.get("model") or {}).get("name")
    named = config.get("base_model_name_or_path")
    if isinstance(calibrated, str) and Path(calibrated).is_dir() and revision is None:
        path = Path(calibrated)
    elif named == BUILTIN_HUB_ID and revision is None:
        path = builtin_model_path()
    elif isinstance(named, str) and named:
        path = resolve_model(named, revision)
    else:
        raise TloraError(f"{adapter / CONFIG} names no base model: pass it with --model")
    return path, base_hub_id(named if isinstance(named, str) else None, path)


@dataclass
class ExportResult:
    fmt: str
    modules: int
    rank: int
    hints: list[str]
    warnings: list[str] = field(default_factory=list)


def export(
    adapter: Path,
    out: Path,
    fmt: str,
    model: str | None = None,
    revision: str | None = None,
    rank: int | None = None,
    overwrite: bool = False,
    command: str | None = None,
    on_shard: Callable[[str], None] | None = None,
) -> ExportResult:
    """`tlora export`: write OUT whole or not at all (output.atomic_dir), with a model card."""
    from .model_card import CARD, merged_card, write_card
    from .output import atomic_dir
    from .ownership import run_inputs

    if fmt not in FORMATS:
        raise TloraError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if fmt != "merged" and (model is not None or revision is not None):
        raise TloraError("--model and --revision name the base model a merge reads: they go with --format merged")
    if fmt == "merged" and rank is not None:
        raise TloraError("--rank pads to one rank: it goes with --format padded")
    if out.resolve() == adapter.resolve():
        raise TloraError(f"-o {out} is the adapter itself: write the export to another folder")
    lora = read_lora(adapter)  # refuse before a base model is resolved or downloaded
    warnings: list[str] = []
    inputs = (("ADAPTER", adapter), *run_inputs(model, builtin_model=fmt == "merged" and model is None))
    with atomic_dir(out, overwrite, "merged" if fmt == "merged" else "adapter", inputs) as tmp:
        if fmt == "merged":
            base, hub_id = merged_base(adapter, lora[0], model, revision)
            _, modules = write_merged(adapter, base, tmp, on_shard, lora)
            meta = read_json(adapter / METADATA) if (adapter / METADATA).is_file() else {}
            (tmp / CARD).write_text(merged_card(out, hub_id, meta, str(adapter)))
            top = max(m.rank for m in modules)
            hints = [f"serve it like any model: vllm serve {out}"]
            calibrated = (meta.get("model") or {}).get("fingerprint")
            if calibrated and Checkpoint(base).fingerprint != calibrated:
                warnings.append(
                    f"{base} is not the model this adapter was calibrated on (its weights differ): merged anyway"
                )
        else:
            new_config, modules = write_adapter_export(adapter, tmp, fmt, rank, lora)
            write_card(tmp, command, name=out.name)
            top = new_config["r"]
            base = new_config.get("base_model_name_or_path") or "BASE_MODEL"
            if fmt == "vllm":
                max_rank = vllm_max_lora_rank(top)
                if max_rank is None:
                    hints = [f"its largest rank {top} is above vLLM's largest --max-lora-rank (512)"]
                else:
                    hints = [
                        f"pass --max-lora-rank {max_rank}: vllm serve {base} --enable-lora --max-lora-rank {max_rank} "
                        f"--lora-modules {out.name}={out}"
                    ]
            else:
                hints = [f"every module has rank {top}, scaling 1 (lora_alpha = r = {top}) and no patterns"]
    return ExportResult(fmt, len(modules), top, hints, warnings)
