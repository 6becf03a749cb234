"""`--format lora`: a plain LoRA on the original base from an adapter with more than PEFT's format holds: trained on
a residual base (LoRA-Init, LoRA-TSD), or with LoRA-Dash's coefficients. Each part is one more LoRA block of the
module's scaling s:

- the residual: W_res + s B A = W + s [B | -(s0/s) B0] [A; A0] (PEFT's conversion of PiSSA adapters);
- the Dash term: sum_j dsigma_j u_j v_j^T = s (U diag(dsigma) / s) V^T, rows v_j^T under A, columns beside B;

so A' stacks A, A0 and V^T, B' puts B, -(s0/s) B0 and U diag(dsigma)/s side by side, rank r + r0 + s_d per module and
alpha s (r + r0 + s_d), which keeps each module's scaling s."""

from __future__ import annotations

import shlex

import torch

from ..adapter.gate import cast
from ..adapter.peft import WIDER, LoraModule, tensor_key
from ..adapter.sidecar import RESIDUAL_A, read_sidecar, residual_factors
from ..directions import DASH_SIGMA, DASH_U, DASH_VH
from ..errors import TloraError
from .base import ExportFormat, ExportJob, Written, base_config, write_lora


def write(job: ExportJob) -> Written:
    adapter = job.adapter
    residual, dash, warnings = _parts(job)
    tensors, ranks, alphas = {}, {}, {}
    for m in adapter.modules:
        blocks = [(m.a.float(), m.b.float())]
        if residual:
            a0, b0, s0 = residual_factors(residual[m.name], m.name, job.initial or adapter.folder)
            blocks.append((a0.float(), -(s0 / m.scaling) * b0.float()))
        if dash:
            entry = dash[m.name]
            blocks.append((entry[DASH_VH].float(), entry[DASH_U].float() * entry[DASH_SIGMA].float() / m.scaling))
        a, b = _stacked(m, blocks, job.dtype)
        tensors[tensor_key(m.name, "A")], tensors[tensor_key(m.name, "B")] = a, b
        ranks[m.name] = a.shape[0]
        alphas[m.name] = m.scaling * a.shape[0]
    top = max(ranks, key=lambda name: ranks[name])
    config = base_config(adapter.config)
    config.update(
        r=ranks[top], lora_alpha=alphas[top], target_modules=list(ranks), rank_pattern=ranks, alpha_pattern=alphas
    )
    note = (
        "a plain LoRA on the original base: the adapter as trained, with its residual's factors and its Dash term "
        "folded in as more rank, so that PEFT, every server and the vllm, padded and merged exports take it on the "
        "unchanged model."
    )
    write_lora(job, "lora", config, tensors, note, drop=("residual",), initial=job.initial)
    out = shlex.quote(str(job.out))
    hint = f"load it on the original base; for servers: tlora export {out} --format vllm|padded|merged"
    return Written(len(adapter.modules), ranks[top], [hint], warnings)


def _parts(job: ExportJob) -> tuple[dict, dict, list[str]]:
    """The residual factors and the trained Dash terms to fold in (from the adapter's sidecar, else --initial's),
    each for every module or none, and the warning for a Dash term left out."""
    adapter = job.adapter
    own = read_sidecar(adapter.folder)
    initial = read_sidecar(job.initial) if job.initial else {}
    residual = _entries(own, RESIDUAL_A) or _entries(initial, RESIDUAL_A)
    dash = _entries(own, DASH_U) or _entries(initial, DASH_U)
    if not residual and not dash:
        where = f"{adapter.folder} and --initial {job.initial}" if job.initial else f"{adapter.folder}"
        raise TloraError(
            f"{where} hold no residual factors and no Dash term: --format lora converts an adapter of --method "
            "lora-init, lora-dash or lora-tsd (pass the folder `tlora init` wrote with --initial); any other "
            "adapter is a plain LoRA already"
        )
    warnings = []
    if dash and not any(DASH_SIGMA in e for e in own.values()):
        warnings.append(
            f"{adapter.folder} has no trained Dash coefficients (it was saved without tlora_cli.training.save_trained):"
            " the Dash term is left out, as a trainer that ignores it trains"
        )
        dash = {}
    names = {m.name for m in adapter.modules}
    for part, entries in (("residual factors", residual), ("Dash terms", dash)):
        if entries and set(entries) != names:
            odd = sorted(names ^ set(entries))[0]
            raise TloraError(f"{adapter.folder} and its {part} disagree on module {odd}: pass the right --initial")
    return residual, dash, warnings


def _entries(sidecar: dict[str, dict[str, torch.Tensor]], field: str) -> dict[str, dict[str, torch.Tensor]]:
    return {name: entry for name, entry in sidecar.items() if field in entry}


def _stacked(
    m: LoraModule, blocks: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A' (rows of every block's A) and B' (columns of every block's B), in `dtype` or the adapter's own."""
    for a, b in blocks:
        if a.shape[1] != m.in_features or b.shape[0] != m.out_features or a.shape[0] != b.shape[1]:
            raise TloraError(f"the factors kept for {m.name} do not fit its A and B: is --initial the right adapter?")
    a = cast(torch.cat([a for a, _ in blocks]), dtype or m.a.dtype, f"{m.name}'s stacked lora_A", WIDER).contiguous()
    b = cast(torch.cat([b for _, b in blocks], dim=1), dtype or m.b.dtype, f"{m.name}'s stacked lora_B", WIDER)
    return a, b.contiguous()


FORMAT = ExportFormat(
    "lora",
    "a plain LoRA on the original base, from a lora-init, lora-dash or lora-tsd adapter after training",
    "tlora export TRAINED -o PLAIN --format lora           # lora-init/-dash/-tsd: a plain LoRA on the base",
    write,
    reads=frozenset({"initial"}),
    residual=True,
)
