"""What plain LoRA learned, and how much of it a frozen A could have expressed.

analyse.py asks what each A can follow at step 0; this asks the same of the finished fine-tune. Take the
weight update of the selected LoRA run, dW = s B A (A trained too), and measure it where it matters, on the
module's inputs: its output energy is tr(dW C dWᵀ) (C the calibration covariance). With a frozen A the best
any B can do is the least-squares fit B* = dW C Aᵀ (A C Aᵀ)⁻¹, which keeps tr(dW C Aᵀ (A C Aᵀ)⁻¹ A C dWᵀ) of
it: `output_share` per A. C's top eigenvalue holds 26-60 % of its trace, so this share is mostly about
that one direction; `weight_share`, ||dW Q||² / ||dW||² (Q an orthonormal basis of Aᵀ), weighs every input
direction alike. If TLoRA's A keeps most of LoRA's update, the frozen subspace is not what holds
TLoRA back; if it keeps little, LoRA's gain comes from directions TLoRA's A does not contain.

The same comparison with the selected TLoRA run's own update (`tlora_vs_lora`): the norm of its output
change relative to LoRA's, and the cosine between the two output changes, tr(dW_t C dW_lᵀ) / norms.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from analyse import adapter_a, covariance, module_type, scalings
from run import QUALITY_DIR, run_key, trained_file
from safetensors.torch import load_file

FROZEN = ("lora-s0", "w-svd", "tlora-init", "tlora")


def updates(trained: Path, scaling: dict[str, float]) -> dict[str, torch.Tensor]:
    """dW = s B A per module, from a run's saved LoRA weights."""
    weights = load_file(trained)
    prefix, a_suffix, b_suffix = "base_model.model.", ".lora_A.default.weight", ".lora_B.default.weight"
    out = {}
    for key, a in weights.items():
        if key.endswith(a_suffix):
            name = key[len(prefix) : -len(a_suffix)]
            b = weights[prefix + name + b_suffix]
            out[name] = scaling.get(name, scaling[""]) * b.double() @ a.double()
    return out


def kept(dw_cov: torch.Tensor, a: torch.Tensor, cov: torch.Tensor) -> float:
    """Output energy of dW that a frozen A keeps under the best B: tr(P K⁺ Pᵀ), P = dW C Aᵀ, K = A C Aᵀ."""
    p = dw_cov @ a.T
    return torch.trace(p @ torch.linalg.pinv(a @ cov @ a.T, hermitian=True) @ p.T).item()


def weight_kept(dw: torch.Tensor, a: torch.Tensor) -> float:
    """||dW Q||², Q an orthonormal basis of A's row space."""
    q, _ = torch.linalg.qr(a.T)
    return (dw @ q).pow(2).sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path("/work/bench-cache/quality"))
    parser.add_argument("--results", type=Path, default=QUALITY_DIR / "results-tuned.json")
    parser.add_argument("--out", type=Path, default=QUALITY_DIR / "learned.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = json.loads(args.results.read_text())
    runs = {}
    for arm in ("lora", "tlora"):
        key = run_key(arm, results["selected"][arm], args.seed)
        runs[arm] = (key, results["runs"][key]["init"])
    adapters = args.work_dir / "adapters"
    trained = {
        arm: updates(trained_file(args.work_dir, key), scalings(adapters / init)) for arm, (key, init) in runs.items()
    }
    a_of = {key: adapter_a(adapters / key) for key in FROZEN}
    generator = torch.Generator().manual_seed(1)
    calibration = args.work_dir / "calibration"
    input_of = {m["name"]: m["input"] for m in json.loads((calibration / "calibration.json").read_text())["modules"]}

    energy: dict[str, float] = defaultdict(float)
    weight_energy: dict[str, float] = defaultdict(float)
    kept_by: dict[tuple[str, str], float] = defaultdict(float)
    weight_kept_by: dict[tuple[str, str], float] = defaultdict(float)
    cross: dict[str, float] = defaultdict(float)
    tlora_energy: dict[str, float] = defaultdict(float)
    for name, dw in trained["lora"].items():
        kind = module_type(name)
        cov = covariance(calibration, input_of[name]).double()
        dw_cov = dw @ cov
        energy[kind] += (dw_cov * dw).sum().item()
        bound = 1 / math.sqrt(dw.shape[1])  # PEFT's Kaiming-uniform A, another draw than LoRA's own
        fresh = (torch.rand(a_of["lora-s0"][name].shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        weight_energy[kind] += dw.pow(2).sum().item()
        for key, a in [("random A (fresh draw)", fresh), *((k, v[name].double()) for k, v in a_of.items())]:
            kept_by[key, kind] += kept(dw_cov, a, cov)
            weight_kept_by[key, kind] += weight_kept(dw, a)
        dw_t = trained["tlora"].get(name)
        if dw_t is not None:
            cross[kind] += (dw_t * dw_cov).sum().item()  # tr(dW_t C dWᵀ), C symmetric
            tlora_energy[kind] += (dw_t @ cov * dw_t).sum().item()

    kinds = list(energy)
    total = sum(energy.values())
    report = {
        "runs": {arm: key for arm, (key, _) in runs.items()},
        "output_share": {
            key: {kind: kept_by[key, kind] / energy[kind] for kind in kinds}
            | {"all": sum(kept_by[key, kind] for kind in kinds) / total}
            for key in dict.fromkeys(k for k, _ in kept_by)
        },
        "weight_share": {
            key: {kind: weight_kept_by[key, kind] / weight_energy[kind] for kind in kinds}
            | {"all": sum(weight_kept_by[key, kind] for kind in kinds) / sum(weight_energy.values())}
            for key in dict.fromkeys(k for k, _ in weight_kept_by)
        },
        "tlora_vs_lora": {
            kind: {
                "norm_ratio": math.sqrt(tlora_energy[kind] / energy[kind]),
                "cosine": cross[kind] / math.sqrt(tlora_energy[kind] * energy[kind]),
            }
            for kind in kinds
        },
        "lora_output_energy_by_type": {kind: energy[kind] / total for kind in kinds},
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
