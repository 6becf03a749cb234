"""What float64-exact factorisation costs: 0.1's float32 path against today's, side by side in one run.

Two cases (issue: "the time it costs on SmolLM2 and on one 7B-shaped module"):
- SmolLM2-135M: every target module's A from a real calibration (the built-in model and math set,
  centred covariance), at the ranks `tlora init --budget-rank 8` gives. 0.1 took a float32 SVD of the
  float32 product W C; today the product and its SVD are float64.
- One Llama-2-7B-shaped down_proj (4096 x 11008) with a covariance whose spectrum spans 1e6, at
  r = 16 and 128. 0.1 ran float64 subspace iteration stopped by a residual relative to sigma_1^2;
  today the stop looks at the gap at r. The full float32 and float64 SVDs are timed beside them.

Each A is compared with the float64 SVD of the same product: the similarity tr(P_a P_ref) / r.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import BENCH_DIR, append_results, load_average, markdown_table, tlora_script

from tlora_cli.calib.folder import load_calibration
from tlora_cli.factorisation import top_right_singular_vectors
from tlora_cli.model.builtin import builtin_model_path
from tlora_cli.model.checkpoint import Checkpoint


def similarity(a: torch.Tensor, reference: torch.Tensor) -> float:
    q = torch.linalg.qr(a.double().T)[0]
    return (torch.linalg.matrix_norm(reference.double() @ q) ** 2 / len(reference)).item()


def old_iteration(matrix: torch.Tensor, rank: int, tol: float = 1e-12, max_iter: int = 100) -> torch.Tensor:
    """0.1's subspace iteration (float64), stopped when the residual is below tol * sigma_1^2."""
    block = 2 * rank + 16
    m = matrix.double()
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(m.T @ (m @ torch.randn(m.shape[1], block, generator=generator, dtype=m.dtype)))[0]
    for _ in range(max_iter):
        image = m @ basis
        _, values, vh = torch.linalg.svd(image, full_matrices=False)
        ritz = basis @ vh[:rank].T
        residual = torch.linalg.vector_norm(m.T @ (image @ vh[:rank].T) - ritz * values[:rank] ** 2, dim=0).max()
        if residual <= tol * values[0] ** 2:
            return ritz.T
        basis = torch.linalg.qr(m.T @ image)[0]
    return torch.linalg.svd(m, full_matrices=False)[2][:rank]


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def smollm2(
    cache: Path, num_samples: int, seq_len: int, calib: Path | None
) -> tuple[list[list[object]], list[str], str]:
    """Every module at its rank; `calib` reuses a calibration of the built-in model (any centring)."""
    commands = []
    if calib is None:
        calib = cache / "calibration"
        command = [tlora_script(), "calibrate", "--num-samples", str(num_samples), "--seq-len", str(seq_len)]
        command += ["--device", "cpu", "--quiet", "--overwrite", "-o", str(calib)]
        subprocess.run(command, check=True)
        commands.append(" ".join(["tlora", *command[1:]]))
    center = "--center" if load_calibration(calib).settings.get("center") else "--no-center"
    adapter = cache / "adapter"
    init = [tlora_script(), "init", "--calibration", str(calib), center, "--budget-rank", "8", "--device", "cpu"]
    init += ["--quiet", "--overwrite", "-o", str(adapter)]
    subprocess.run(init, check=True)
    commands.append(" ".join(["tlora", *init[1:]]))

    ranks = {m["name"]: m["rank"] for m in json.loads((adapter / "tlora_metadata.json").read_text())["modules"]}
    stats = load_calibration(calib).stats
    checkpoint = Checkpoint(builtin_model_path())
    old_s = new_s = 0.0
    old_sim, new_sim = [], []
    for name, rank in ranks.items():
        if not rank:
            continue
        weight, cov = checkpoint.get(f"{name}.weight").float(), stats.covariances[stats.input_of[name]]
        old, seconds = timed(lambda w=weight, c=cov, r=rank: torch.linalg.svd(w @ c, full_matrices=False)[2][:r])
        old_s += seconds
        new, seconds = timed(lambda w=weight, c=cov, r=rank: top_right_singular_vectors(w.double() @ c.double(), r))
        new_s += seconds
        reference = torch.linalg.svd(weight.double() @ cov.double(), full_matrices=False)[2][:rank]
        old_sim.append(similarity(old, reference))
        new_sim.append(similarity(new, reference))
    n = len(old_sim)
    case = f"SmolLM2-135M, {n} modules, {center}"
    rows = [
        [case, "0.1: float32 product + float32 SVD", f"{old_s:.2f}", f"{min(old_sim):.6f}",
         sum(s < 0.9999 for s in old_sim), f"{statistics.median(old_sim):.8f}"],
        [case, "now: float64 product + float64 SVD", f"{new_s:.2f}", f"{min(new_sim):.6f}",
         sum(s < 0.9999 for s in new_sim), f"{statistics.median(new_sim):.8f}"],
    ]  # fmt: skip
    return rows, commands, center


def llama_down_proj(ranks: list[int]) -> list[list[object]]:
    """W Gaussian; C as real inputs' covariances look: 1024 strong directions spanning 1e4, a floor 1e6 below."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 4096, 11008
    weight = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).float()
    basis = torch.linalg.qr(torch.randn(in_f, 1024, generator=g, dtype=torch.float64))[0]
    cov = (basis * torch.logspace(0, -4, 1024, dtype=torch.float64)) @ basis.T
    cov = (cov + torch.diag(1e-6 * torch.rand(in_f, generator=g, dtype=torch.float64))).float()
    product = weight.double() @ cov.double()
    rows = []
    reference_all, full64 = timed(lambda: torch.linalg.svd(product, full_matrices=False)[2])
    full32, full32_s = timed(lambda: torch.linalg.svd((weight @ cov), full_matrices=False)[2])
    for rank in ranks:
        reference = reference_all[:rank]
        old, old_s = timed(lambda r=rank: old_iteration(weight @ cov, r))
        new, new_s = timed(lambda r=rank: top_right_singular_vectors(product, r))
        for how, a, seconds in [
            ("float32 full SVD", full32[:rank], full32_s),
            ("float64 full SVD", reference, full64),
            ("0.1: float64 iteration, residual < 1e-12 sigma_1^2", old, old_s),
            ("now: float64 iteration, gap-aware stop", new, new_s),
        ]:
            case = f"7B down_proj 4096x11008, r={rank}"
            rows.append([case, how, f"{seconds:.1f}", f"{similarity(a, reference):.6f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--calibration", type=Path, nargs="*", default=[], help="Reuse these calibrations.")
    parser.add_argument("--skip-7b", action="store_true", help="Only the SmolLM2 modules.")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS-speed.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    load = load_average()
    small, commands = [], []
    with tempfile.TemporaryDirectory(prefix="tlora-factorisation-") as folder:
        for calib in args.calibration or [None]:
            rows, run, _ = smollm2(Path(folder), args.num_samples, args.seq_len, calib)
            small += rows
            commands += run
    large = [] if args.skip_7b else llama_down_proj(args.ranks)
    append_results(
        args.results,
        "Factorisation: float32 (0.1) against float64-exact (now), CPU, 2 threads",
        [
            markdown_table(
                ["case", "how", "seconds", "smallest similarity", "modules < 0.9999", "median similarity"], small
            ),
            *([markdown_table(["case", "how", "seconds", "similarity to the float64 SVD"], large)] if large else []),
        ],
        commands,
        f"Load average at the start: {load:.2f}. Similarity: tr(P_A P_ref)/r against a float64 SVD of the same "
        "product (for 0.1's float32 path, the product of the same float32 inputs taken in float64).",
    )


if __name__ == "__main__":
    main()
