"""An independent, deliberately naive TLoRA computation in float64 to hold the tool against.

It shares no code with tlora_cli: its own hooks, its own loss, one covariance per module (no
sharing), plain torch.autograd.grad, eigh instead of SVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


@dataclass
class Reference:
    names: list[str]
    covariances: dict[str, torch.Tensor]
    scores: dict[str, float]
    weights: dict[str, torch.Tensor]
    tokens: int
    mean_grads: dict[str, torch.Tensor]
    output_grad_sq: dict[str, torch.Tensor]


def reference_statistics(
    model_dir: Path, samples: list[tuple[list[int], list[int]]], suffixes: tuple[str, ...], center: bool = False
) -> Reference:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in suffixes
    }
    captured: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def capture(module, args, out, name):
        captured[name] = args[0].detach()[0]
        outputs[name] = out

    for n, m in linears.items():
        m.register_forward_hook(lambda mod, args, out, n=n: capture(mod, args, out, n))
        m.weight.requires_grad_(True)
    mean_grads = {n: torch.zeros_like(m.weight) for n, m in linears.items()}
    out_sq = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in linears.items()}
    cov = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
    scores = dict.fromkeys(linears, 0.0)
    tokens = 0
    for ids, labels in samples:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        target = torch.tensor(labels[1:])
        keep = target != -100
        log_probs = torch.log_softmax(logits[:-1][keep], dim=-1)
        loss = -log_probs.gather(1, target[keep][:, None]).mean()
        grads = torch.autograd.grad(loss, [m.weight for m in linears.values()] + [outputs[n] for n in linears])
        weight_grads, output_grads = grads[: len(linears)], grads[len(linears) :]
        for (n, m), g, go in zip(linears.items(), weight_grads, output_grads):
            scores[n] += (m.weight * g).abs().mean().item() / len(samples)
            mean_grads[n] += g / len(samples)
            out_sq[n] += (go[0] ** 2).sum(0)
            x = captured[n]
            if center:
                x = x - x.mean(0)
            cov[n] += x.T @ x
        tokens += len(ids)
    return Reference(
        names=list(linears),
        covariances={n: c / tokens for n, c in cov.items()},
        scores=scores,
        weights={n: m.weight.detach().clone() for n, m in linears.items()},
        tokens=tokens,
        mean_grads=mean_grads,
        output_grad_sq={n: v / tokens for n, v in out_sq.items()},
    )


def top_right_singular(weight: torch.Tensor, cov: torch.Tensor, r: int) -> torch.Tensor:
    m = weight @ cov
    vals, vecs = torch.linalg.eigh(m.T @ m)
    return vecs[:, vals.argsort(descending=True)[:r]].T


def rel_err(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()
