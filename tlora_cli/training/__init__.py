"""Training a tlora adapter with PEFT: A frozen as TLoRA prescribes, a residual adapter (LoRA-Init, LoRA-TSD) on its
residual base W_res = W - s B0 A0 made in memory, LoRA-Dash's trainable coefficients attached, and a trained adapter
saved with what PEFT's own save leaves out."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapter.layout import CONFIG, METADATA, SIDECAR
from ..adapter.sidecar import RESIDUAL_A, read_sidecar, residual_factors, write_sidecar
from ..directions import DASH_SIGMA, residual
from ..errors import TloraError
from ..exports import serving_block
from ..jsonio import dump, maybe_object, read_object
from ..names import published
from ..outputs.card import write_card
from .callback import KeepLoraAFrozen
from .dash import attach_dash, dash_terms

__all__ = ["KeepLoraAFrozen", "freeze_lora_a", "load_for_training", "save_trained", "to_residual_base"]
RESIDUAL_MARK = "tlora_residual"  # the config attribute of a model whose targets hold W_res: {"id": ...}


def freeze_lora_a(model: torch.nn.Module) -> int:
    """Turn every lora_A weight into a buffer; returns how many.

    PEFT calls requires_grad_(True) on every LoRA layer on load and again on `set_adapter`; a buffer
    is untouched by that, never reaches an optimizer (so no weight decay drifts it), and is still
    saved, merged and moved with the model like the weight it replaces.
    """
    frozen = 0
    for name, module in model.named_modules():
        if ".lora_A." not in f".{name}." or not isinstance(module, torch.nn.Linear):
            continue
        weight = module._parameters.pop("weight", None)
        if weight is None:  # already a buffer
            continue
        module.register_buffer("weight", weight.detach())
        frozen += 1
    return frozen


def to_residual_base(model: torch.nn.Module, adapter_dir: str | Path) -> bool:
    """Subtract the residual adapter's s B0 A0 from `model`'s target weights in place (float32 arithmetic, then the
    model's dtype), and mark the model so it is never done twice. False for an adapter that is not residual.

    A model already marked with this adapter's id (a `--format residual-base` export, or this function before) is
    left as it is; one marked for another adapter is refused."""
    folder = Path(adapter_dir)
    entries = {name: e for name, e in read_sidecar(folder).items() if RESIDUAL_A in e}
    if not entries:
        return False
    identity = ((maybe_object(folder / METADATA) or {}).get("residual") or {}).get("id")
    mark = getattr(model.config, RESIDUAL_MARK, None)
    if mark:
        if isinstance(mark, dict) and mark.get("id") == identity:
            return True
        raise TloraError(
            f"this model's weights are already the residual base of another adapter (id {mark}), not of {folder}: "
            "load the original base model"
        )
    modules = dict(model.named_modules())
    for name, entry in entries.items():
        if name not in modules:
            raise TloraError(f"{folder / SIDECAR} names {name}, which this model does not have: is it the base model?")
        a0, b0, scaling = residual_factors(entry, name, folder)
        weight = modules[name].weight
        with torch.no_grad():
            weight.copy_(residual(weight, a0.to(weight.device), b0.to(weight.device), scaling))
    setattr(model.config, RESIDUAL_MARK, {"id": identity})
    return True


def load_for_training(base_model: torch.nn.Module, adapter_dir: str | Path, freeze_a: bool | None = None):
    """`PeftModel.from_pretrained(..., is_trainable=True)` with A frozen as the adapter's recipe says, and for a
    residual adapter on its residual base (`base_model`'s targets are changed in place: pass the original model).

    freeze_a=None follows `train_a` in tlora_metadata.json (`tlora init --train-a/--freeze-a`);
    without metadata, A is frozen.
    """
    from peft import PeftModel  # optional: the peft extra

    if freeze_a is None:
        freeze_a = not (maybe_object(Path(adapter_dir) / METADATA) or {}).get("train_a", False)
    to_residual_base(base_model, adapter_dir)
    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=True)
    attach_dash(model, read_sidecar(Path(adapter_dir)), adapter_dir)
    if freeze_a:
        freeze_lora_a(model)
    return model


def save_trained(model: torch.nn.Module, folder: str | Path, initial: str | Path) -> None:
    """`model.save_pretrained(folder)` plus what PEFT leaves out or rewrites: the sidecar of the adapter `initial`
    it was loaded from (`load_for_training`), every Dash coefficient as trained; tlora's metadata, marked as trained;
    the base's name as `initial` gives it (PEFT writes the path it loaded the base from), and tlora's card in place
    of PEFT's placeholder. `tlora export FOLDER --format lora` then needs no --initial."""
    folder, initial = Path(folder), Path(initial)
    model.save_pretrained(folder)
    entries = read_sidecar(initial)
    for name, term in dash_terms(model).items():
        entries.setdefault(name, {})[DASH_SIGMA] = term.sigma.detach().float().cpu()
    write_sidecar(folder, entries)
    base = (maybe_object(initial / CONFIG) or {}).get("base_model_name_or_path")
    if base:
        config = read_object(folder / CONFIG, "save the adapter again")
        (folder / CONFIG).write_text(
            json.dumps({**config, "base_model_name_or_path": base}, indent=2, sort_keys=True) + "\n"
        )
    meta = maybe_object(initial / METADATA)
    if meta is not None:
        (folder / METADATA).write_text(dump({**meta, "trained": {"from": published(initial.name)}}))
        write_card(folder, name=folder.name, serving=serving_block())
