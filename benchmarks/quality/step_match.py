"""The opt-in remedy tried for issue 21: scalings that make one Adam step move each module's output as far as
uniform LoRA's would, from C and A alone.

Adam moves every entry of B by about the learning rate per step, so a step moves a module's output by about
s * ||A x|| (analyse.py's step scale). LoRA's Kaiming-uniform A has entries U(-1/sqrt(in), 1/sqrt(in)) of
variance 1/(3 in), so E||A x||^2 = r tr(M) / (3 in) with M = E[x x^T]; TLoRA's A gives tr(A M A^T). Each
module's alpha is multiplied by the ratio of the two square roots: its rank and its share of the budget stay
what the allocation gave, only the step size is LoRA's at that rank and alpha. M is the uncentred second
moment, since a step's change of the output sees the inputs' mean as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tlora_cli.calib.folder import load_calibration


def step_match(adapter: Path, uncentred_calibration: Path) -> dict[str, float]:
    """Rewrite the adapter's alpha_pattern in place (every module explicit); returns each module's factor."""
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    stats = load_calibration(uncentred_calibration).stats
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    weights = load_file(adapter / "adapter_model.safetensors")
    ranks, alphas = config.get("rank_pattern", {}), config.get("alpha_pattern", {})
    factors, pattern = {}, {}
    for key, a in weights.items():
        if not key.endswith(suffix):
            continue
        name = key[len(prefix) : -len(suffix)]
        moment = stats.covariances[stats.input_of[name]].double()
        a = a.double()
        rank, in_features = a.shape
        lora = (rank * torch.trace(moment) / (3 * in_features)).sqrt()
        factors[name] = (lora / torch.trace(a @ moment @ a.T).sqrt()).item()
        pattern[name] = alphas.get(name, config["lora_alpha"]) * factors[name]
        assert ranks.get(name, config["r"]) == rank, name
    config["alpha_pattern"] = pattern
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return factors
