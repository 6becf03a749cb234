"""Why an arm trains better or worse: how much of the full fine-tuning gradient each frozen A lets B follow.

With A frozen, W can only move inside A's row space: the gradient of B at B = 0 is s * G Aᵀ, G = dL/dW. So
the share of G's energy in that space, ||G Q||² / ||G||² with Q an orthonormal basis of Aᵀ, is how much of a
full fine-tuning step the adapter can express at all; the top-r singular values of G are the best any rank-r
A could do. The same basis also shows how much input energy A sees, tr(Qᵀ C Q) / tr(C): TLoRA picks A for
that, so if it sees much more input energy but reaches less gradient, the directions the task needs are not
the high-energy ones. G is measured on the first batches of run.py's seed-0 data order.

Adam moves every entry of B by about the learning rate per step whatever its gradient's size, so how far
one step moves a module's output is set by s * ||A x|| (s = alpha / r): `step_scale_vs_lora` is
s * sqrt(tr(A C Aᵀ)) per module, median per module type, divided by the same for LoRA's random A. At one
learning rate, an arm whose ratio is 10 takes steps ten times as large as LoRA's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from run import QUALITY_DIR, collate, encode, fresh_base, make_splits
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tlora_cli.model.builtin import builtin_model_path

ADAPTERS = ["lora-s0", "w-svd", "tlora-init", "tlora"]


def gradients(model: torch.nn.Module, batches: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """dL/dW of every target weight for the mean loss over `batches` (the base model, nothing trained)."""
    modules = dict(model.named_modules())
    model.requires_grad_(False)
    for name in names:
        modules[name].weight.requires_grad_(True)
    for batch in batches:
        (model(**batch).loss / len(batches)).backward()
    return {name: modules[name].weight.grad for name in names}


def adapter_a(folder: Path) -> dict[str, torch.Tensor]:
    weights = load_file(folder / "adapter_model.safetensors")
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    return {k[len(prefix) : -len(suffix)]: v.float() for k, v in weights.items() if k.endswith(suffix)}


def scalings(folder: Path) -> dict[str, float]:
    """alpha / r per module, from adapter_config.json's patterns (full module names) and its defaults."""
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks, alphas = config.get("rank_pattern", {}), config.get("alpha_pattern", {})
    names = set(ranks) | set(alphas)
    return {n: alphas.get(n, config["lora_alpha"]) / ranks.get(n, config["r"]) for n in names} | {
        "": config["lora_alpha"] / config["r"]
    }


def covariance(calibration: Path, key: str) -> torch.Tensor:
    with safe_open(calibration / "covariances" / f"{key}.safetensors", "pt") as f:
        return f.get_tensor("covariance").float()


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path("/work/bench-cache/quality"))
    parser.add_argument("--results", type=Path, default=QUALITY_DIR / "results.json")
    parser.add_argument("--out", type=Path, default=QUALITY_DIR / "analysis.json")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--adapters", nargs="+", default=ADAPTERS, help="Adapter folders under WORK_DIR/adapters.")
    parser.add_argument(
        "--calibration", type=Path, help="Whose covariance C measures input energy and step size. Default: "
        "WORK_DIR/calibration. The uncentred second moment E[xxᵀ] is what a step's output change sees.",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(2)
    base_path = builtin_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    protocol = json.loads(args.results.read_text())["protocol"]
    train_set, _, _, _ = make_splits(protocol["num_train"], protocol.get("num_valid", 0), protocol["num_test"])
    encoded = encode(train_set, tokenizer, protocol["seq_len"])
    order = random.Random(0).sample(range(len(encoded)), args.batches * args.batch_size)
    batches = [
        collate([encoded[j] for j in order[i : i + args.batch_size]], tokenizer.pad_token_id)
        for i in range(0, len(order), args.batch_size)
    ]
    calibration = args.calibration or args.work_dir / "calibration"
    manifest = json.loads((calibration / "calibration.json").read_text())
    input_of = {m["name"]: m["input"] for m in manifest["modules"]}
    grads = gradients(fresh_base(base_path), batches, list(input_of))
    adapters = {key: adapter_a(args.work_dir / "adapters" / key) for key in args.adapters}
    scaling = {key: scalings(args.work_dir / "adapters" / key) for key in args.adapters}

    # per (adapter or optimum, module type): summed captured gradient energy, summed total, input-energy shares
    captured: dict[tuple[str, str], float] = defaultdict(float)
    input_share: dict[tuple[str, str], list[float]] = defaultdict(list)
    total: dict[str, float] = defaultdict(float)
    top_eigen: dict[str, list[float]] = defaultdict(list)
    step_scale: dict[tuple[str, str], list[float]] = defaultdict(list)
    for name, grad in grads.items():
        kind = module_type(name)
        cov = covariance(calibration, input_of[name])
        eigen = torch.linalg.eigvalsh(cov)
        top_eigen[kind].append((eigen[-1] / eigen.sum()).item())
        energy = grad.pow(2).sum().item()
        total[kind] += energy
        singular = torch.linalg.svdvals(grad).pow(2)
        for key, a_of in adapters.items():
            q, _ = torch.linalg.qr(a_of[name].T) if name in a_of else (torch.zeros(cov.shape[0], 0), None)
            captured[key, kind] += (grad @ q).pow(2).sum().item()
            input_share[key, kind].append((torch.trace(q.T @ cov @ q) / torch.trace(cov)).item())
            if name in a_of:
                s = scaling[key].get(name, scaling[key][""])
                step_scale[key, kind].append(s * torch.trace(a_of[name] @ cov @ a_of[name].T).sqrt().item())
            if key in ("tlora-init", "tlora"):
                label = "best A, uniform ranks" if key == "tlora-init" else "best A, TLoRA's ranks"
                captured[label, kind] += singular[: q.shape[1]].sum().item()

    kinds = list(total)
    report = {"gradient_energy_share": {}, "input_energy_share": {}, "top_eigenvalue_share_of_C": {}}
    for key in {k for k, _ in captured}:
        shares = {kind: captured[key, kind] / total[kind] for kind in kinds}
        shares["all"] = sum(captured[key, kind] for kind in kinds) / sum(total.values())
        report["gradient_energy_share"][key] = shares
    for key in adapters:
        report["input_energy_share"][key] = {
            kind: sum(input_share[key, kind]) / len(input_share[key, kind]) for kind in kinds
        }
    report["top_eigenvalue_share_of_C"] = {kind: sum(v) / len(v) for kind, v in top_eigen.items()}
    report["step_scale_vs_lora"] = {
        key: {
            kind: statistics.median(step_scale[key, kind]) / statistics.median(step_scale["lora-s0", kind])
            for kind in kinds
        }
        for key in adapters
    }
    report["gradient_energy_by_type"] = {kind: total[kind] / sum(total.values()) for kind in kinds}
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
