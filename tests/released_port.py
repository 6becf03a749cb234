"""An independent port of the paper's released initialisation, to hold `--recipe released` and the default against.

Rambo-Yi/TLora: tlora.py `preprocess_tlora` (per-sample centred X^T X and |W * dL/dW| as running means
over samples, ranks round(R p_i) fixed at the largest, a_i = max(alpha, round(alpha_total p_i))),
lora/layer.py `update_layer` (scaling a_i / r from the config's r) and `tlora_init` (A = top rows of
a float32 SVD of W C). It shares no code with tlora_cli: the model through transformers in float32
with its own loss, forward hooks, weight gradients read from `.grad` after each sample's backward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

SUFFIXES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "o_proj", "gate_proj")


def released_port(
    model_dir: Path, samples: list[tuple[list[int], list[int]]], r: int, lora_alpha: float
) -> dict[str, dict]:
    """What the released code gives each target: rank, PEFT scaling and A (float32 SVD of W C)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    targets = [
        (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in SUFFIXES
    ]
    cov: dict[str, torch.Tensor] = {}
    score: dict[str, float] = {}

    def hook(name):
        def record(_module, args, _out):
            x = args[0].detach().squeeze(0)
            x = x - x.mean(dim=0, keepdim=True)
            count = record.count
            new = x.T @ x
            cov[name] = new if count == 0 else cov[name] * (count / (count + 1)) + new / (count + 1)
            record.count += 1

        record.count = 0
        return record

    for name, module in targets:
        module.register_forward_hook(hook(name))
    for n, (ids, labels) in enumerate(samples):
        model.zero_grad()
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        loss.backward()
        for name, module in targets:
            s = torch.abs(module.weight.data * module.weight.grad).mean().item()
            score[name] = s if n == 0 else score[name] * (n / (n + 1)) + s / (n + 1)
    total = sum(score.values())
    sum_r, sum_alpha = r * len(targets), lora_alpha * len(targets)
    ranks = [round(sum_r * score[name] / total) for name, _ in targets]
    missing = sum_r - sum(ranks)
    while missing != 0:
        i = ranks.index(max(ranks))
        ranks[i] += 1 if missing > 0 else -1
        missing += -1 if missing > 0 else 1
    out = {}
    for (name, module), rank in zip(targets, ranks):
        a = max(lora_alpha, round(sum_alpha * score[name] / total))
        _, _, v = torch.linalg.svd(module.weight.data.float() @ cov[name].float())
        # update_layer: the scaling divides by the config's r; "full" keeps every row for other ranks
        out[name] = {"rank": rank, "scaling": a / r, "A": v[:rank], "full": v}
    return out


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """tr(P_a P_b) / r: 1 when the row spaces agree."""
    qa = torch.linalg.qr(a.double().T)[0]
    qb = torch.linalg.qr(b.double().T)[0]
    return (torch.linalg.matrix_norm(qa.T @ qb) ** 2 / a.shape[0]).item()
