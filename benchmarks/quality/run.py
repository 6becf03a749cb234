"""Fine-tune SmolLM2-135M from each adapter arm on generated math word problems and score it on held-out ones.

The fine-tunes run on tlora's own trainer (tlora_cli.train, the one `tlora trial` runs; tests/test_trial.py holds it
to PEFT's training of the same adapters), with the adapter put on a base model loaded once.

Every arm gets the same rank budget, data order, optimizer, batch size and number of steps; only `tlora
init`'s flags and the learning rate differ. The learning rate is tuned per arm, because A's scale sets
how far one Adam step moves the output (analyse.py): each arm trains on seed 0 up a grid of rates
until the loss rises, then by factors of two past an edge while the edge is best, and the rate with
the lowest loss on a validation split (never the test split) is the arm's. Then the other seeds train at
that rate, and only the selected runs are scored on the test split. With one rate in `--lrs` this is
the plain shared-rate protocol.

Results go to a JSON file after every run, and the trained LoRA weights of every run to the work
folder, so an interrupted run resumes where it stopped: rerun the same command. On a machine without
the work folder, the calibration and adapters are made again (the same bytes) and only the runs in
the JSON are skipped. `report.py` turns the JSON into RESULTS-quality.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's tlora_cli, whichever pip installed
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

from common import machine
from math_problems import generate_problems
from step_match import step_match

from tlora_cli.data import EncodedSample, Sample, encode_sample
from tlora_cli.model.builtin import builtin_model_path
from tlora_cli.train.loop import Plan, Schedule, heldout_loss
from tlora_cli.train.loop import train as train_lora
from tlora_cli.train.lora import LoraWeights, Start, started
from tlora_cli.training.start import start_from_adapter

QUALITY_DIR = Path(__file__).resolve().parent
# Arm id -> (label, `tlora init` flags). The rank budget and alpha are added to every one.
ARMS: dict[str, tuple[str, list[str]]] = {
    "lora": ("LoRA (random A, A+B trained)", ["--method", "random", "--uniform"]),
    "w-svd": ("W-SVD (A frozen)", ["--method", "w-svd", "--uniform"]),
    "tlora-init": ("TLoRA init only (uniform, A frozen)", ["--uniform"]),
    "tlora-rank": ("+ rank allocation", ["--no-alpha-allocation"]),
    "tlora-alpha": ("+ alpha allocation", ["--no-rank-allocation"]),
    "tlora": ("full TLoRA", []),
    "tlora-no-center": ("full TLoRA, --no-center (0.1's default)", ["--no-center"]),
    "tlora-released": ("TLoRA --recipe released (A trained)", ["--recipe", "released"]),
    "tlora-train-a": ("full TLoRA, A trained", ["--train-a"]),
    "tlora-step-match": ("full TLoRA, scalings matched to LoRA's step (step_match.py)", []),
    "lora-da": ("LoRA-DA (A frozen)", ["--method", "lora-da", "--uniform"]),
    "lora-init": ("LoRA-Init (pre-launch, residual; A, B trained)", ["--method", "lora-init"]),
    "lora-dash": ("LoRA-Dash (pre-launch + 8 coefficients; A, B, dsigma trained)", ["--method", "lora-dash"]),
    "lora-tsd": ("LoRA-TSD (LoRA-Init + 8 coefficients)", ["--method", "lora-tsd"]),
    "lora-init-equal": ("LoRA-Init, pre-launch + fine-tune = LoRA's steps", ["--method", "lora-init"]),
    "lora-dash-equal": ("LoRA-Dash, pre-launch + fine-tune = LoRA's steps", ["--method", "lora-dash"]),
    "lora-tsd-equal": ("LoRA-TSD, pre-launch + fine-tune = LoRA's steps", ["--method", "lora-tsd"]),
}
# Arms whose adapter comes from a pre-launch on the training set (`tlora init --data`), not from the calibration.
PRELAUNCH_ARMS = {"lora-init", "lora-dash", "lora-tsd"}
# Arms that fine-tune fewer steps, so that pre-launch + fine-tune steps equal LoRA's; their rate is their parent's.
EQUAL_STEP_ARMS = {f"{arm}-equal": arm for arm in PRELAUNCH_ARMS}
# Only random A depends on --seed once the calibration is fixed; the other arms are initialised once.
SEEDED_ARMS = {"lora"}
# Arms that read the uncentred second moment (and lora-da's gradients) finish from a second calibration.
UNCENTRED_ARMS = {"tlora-no-center", "lora-da"}
CALIBRATION_SET_SEED, TRAIN_SEED, TEST_SEED, VALID_SEED = 0, 1, 2, 3  # seed 0 is the shipped calibration set
ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def prompt_of(problem: dict) -> str:
    return f"Question: {problem['question']}\nAnswer:"


def completion_of(problem: dict) -> str:
    return f" {problem['answer']}"


def make_splits(num_train: int, num_valid: int, num_test: int) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Train, validation and test sets from their own seeds, with every question also found elsewhere dropped.

    Questions of the shipped calibration set (seed 0) are dropped from all three, so that no split shares a
    question with another one or with the data the package ships.
    """
    shipped = {p["question"] for p in generate_problems(400, CALIBRATION_SET_SEED)}
    train_all = generate_problems(num_train, TRAIN_SEED)
    train = [p for p in train_all if p["question"] not in shipped]
    taken = shipped | {p["question"] for p in train}
    test_all = generate_problems(2 * num_test, TEST_SEED)
    test = [p for p in test_all if p["question"] not in taken][:num_test]
    taken |= {p["question"] for p in test}
    valid_all = generate_problems(2 * num_valid, VALID_SEED) if num_valid else []
    valid = [p for p in valid_all if p["question"] not in taken][:num_valid]
    sets = [{p["question"] for p in split} for split in (train, valid, test)] + [shipped]
    overlap = any(a & b for i, a in enumerate(sets) for b in sets[i + 1 :])
    if overlap or len(test) < num_test or len(valid) < num_valid:
        raise SystemExit("the splits overlap or a held-out set came out short: change the sizes")
    info = {
        "train_seed": TRAIN_SEED,
        "valid_seed": VALID_SEED,
        "test_seed": TEST_SEED,
        "train_generated": len(train_all),
        "train_dropped": len(train_all) - len(train),
        "test_generated": len(test_all),
        "test_dropped_overlap": sum(p["question"] in shipped or p["question"] in sets[0] for p in test_all),
        "train": len(train),
        "valid": len(valid),
        "test": len(test),
    }
    return train, valid, test, info


def write_jsonl(path: Path, problems: list[dict]) -> None:
    """The training format as prompt/completion records: what `tlora calibrate --data` reads."""
    lines = [json.dumps({"prompt": prompt_of(p), "completion": completion_of(p)}) for p in problems]
    path.write_text("\n".join(lines) + "\n")


def tlora(args: list[str]) -> list[str]:
    """`tlora ARGS` with this checkout's code."""
    return [sys.executable, "-m", "tlora_cli", *args]


REPO = Path(__file__).resolve().parents[2]


def tlora_env() -> dict[str, str]:
    """The environment of a `tlora` command: this repository's code, and the thread count main() set (read at the
    call: a copy taken at import missed it, and each command then ran one thread per core beside the trainer)."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_tlora(args: list[str]) -> tuple[float, str]:
    """One `tlora` command; returns its wall time and the command line as typed."""
    command = tlora(args)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=tlora_env())
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, " ".join(["tlora", *args])


def allocation_summary(adapter: Path) -> dict:
    """What the allocation did, from `tlora inspect --json`: how concentrated the ranks and scalings are."""
    done = subprocess.run(tlora(["inspect", str(adapter), "--json"]), capture_output=True, text=True, env=tlora_env())
    summary = json.loads(done.stdout)
    modules = sorted(summary["modules"], key=lambda m: -m["rank"])
    ranks = [m["rank"] for m in modules]
    scalings = sorted(m["scaling"] for m in modules)
    top = max(1, math.ceil(len(modules) / 10))
    return {
        "modules_with_adapter": len(modules),
        "total_rank": sum(ranks),
        "rank_min": min(ranks),
        "rank_max": max(ranks),
        "top10pct_rank_share": sum(ranks[:top]) / sum(ranks),
        "scaling_min": scalings[0],
        "scaling_median": scalings[len(scalings) // 2],
        "scaling_max": scalings[-1],
        "params_b": summary["totals"]["params_b"],
        "params_ab": summary["totals"]["params_ab"],
        "rank_share_by_type": {k: v["share_of_rank"] for k, v in summary["by_type"].items()},
        "modules": [{k: m[k] for k in ("name", "rank", "scaling")} for m in summary["modules"]],
    }


def encode(problems: list[dict], tokenizer, seq_len: int) -> list[EncodedSample]:
    """Exactly the tokens and loss mask `tlora calibrate` uses: prompt + completion + EOS, loss on the latter."""
    return [encode_sample(Sample(prompt=prompt_of(p), response=completion_of(p)), tokenizer, seq_len) for p in problems]


def fresh_base(path: Path) -> torch.nn.Module:
    """The bf16 checkpoint as a float32 model: every run starts from identical base weights."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).float()


def fine_tune(
    model: torch.nn.Module, parameters: list[torch.Tensor], batches: list[list[EncodedSample]], lr: float, warmup: int
) -> tuple[list[float], float, float]:
    """tlora's own trainer (tlora_cli.train, what `tlora trial` runs) on a model with an adapter `started` on it:
    AdamW, linear warm-up then linear decay to zero, gradients clipped at 1, the loss the mean over each batch's
    answer tokens, the whole batch at once.

    Returns per-step losses, wall seconds and CPU seconds (all threads): on a shared machine the CPU
    time is the figure that compares arms, since the wall time also counts whatever else ran.
    """
    schedule = Schedule(len(batches), lr, warmup, decay=True)
    plan = Plan(len(batches[0]), False, "each batch at once")
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = train_lora(model, parameters, batches, schedule, plan, clip=1.0)
    return losses, time.perf_counter() - start, time.process_time() - cpu_start


def parse_final(text: str) -> float | None:
    match = ANSWER.search(text)
    return float(match.group(1).replace(",", "")) if match else None


@torch.no_grad()
def exact_match(
    model: torch.nn.Module, tokenizer, problems: list[dict], batch_size: int, max_new_tokens: int
) -> tuple[float, list[float | None]]:
    """Greedy answers, batched with left padding; a match is the number after '####' equal to `final`."""
    model.eval()
    tokenizer.padding_side = "left"
    parsed: list[float | None] = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        inputs = tokenizer([prompt_of(p) for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        parsed += [parse_final(t) for t in texts]
    hits = sum(v is not None and abs(v - p["final"]) < 1e-6 for v, p in zip(parsed, problems))
    return hits / len(problems), parsed


def evaluate(model: torch.nn.Module, tokenizer, test: list[dict], test_encoded: list, args) -> dict:
    start = time.perf_counter()
    loss = heldout_loss(model, test_encoded)
    em, parsed = exact_match(model, tokenizer, test, args.gen_batch_size, args.max_new_tokens)
    return {"heldout_loss": loss, "exact_match": em, "parsed": parsed, "eval_s": time.perf_counter() - start}


def save(path: Path, results: dict) -> None:
    """Write through a temporary file so a crash mid-write never leaves half a JSON."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def run_key(arm: str, lr: float, seed: int) -> str:
    return f"{arm}/{lr:g}/{seed}"


def trained_file(work_dir: Path, key: str) -> Path:
    """Where a run's trained LoRA weights are kept."""
    return work_dir / "trained" / f"{key.replace('/', '_')}.safetensors"


def next_lr(lrs: list[float], val_loss: dict[float, float], extend: int) -> float | None:
    """The next rate to try: up the grid from its lowest rate until the validation loss rises, then down.

    Past an edge of the grid the rate goes by factors of two (at most `extend` per side) while that edge
    is best. Validation loss is taken to be unimodal in the rate, so a rate beyond one that was already
    worse than the best is not tried: a 6-minute run saved per skipped rate. None once the best rate
    has a worse one on each side, or the grid may grow no more.
    """
    if not val_loss:
        return min(lrs)
    tried = sorted(val_loss)
    best = min(tried, key=lambda lr: val_loss[lr])
    if best == tried[-1]:
        higher = [lr for lr in lrs if lr > best]
        if higher:
            return min(higher)
        if len([lr for lr in tried if lr > max(lrs)]) < extend:
            return best * 2
    if best == tried[0]:
        lower = [lr for lr in lrs if lr < best]
        if lower:
            return max(lower)
        if len([lr for lr in tried if lr < min(lrs)]) < extend:
            return best / 2
    return None


RATE_SELECTION = ("lrs", "extend", "sweep_seed")


def import_runs(results: dict, path: Path, arms: list[str], protocol: dict) -> None:
    """Finished runs of arms that a change did not touch, taken from an earlier results file as they are.

    Random A and W-SVD do not read the covariance, so the centring change leaves them as they were;
    each imported run keeps `imported_from`, so the report can say which figures were not rerun.
    """
    other = json.loads(path.read_text())
    # Settings added since (the pre-launch's) do not touch the arms an older file holds, nor does the grid its rates
    # were chosen from (each run keeps its own rate, its selection is imported with it); every other must match.
    ours = {k: v for k, v in protocol.items() if k in other["protocol"] and k not in RATE_SELECTION}
    if ours != {k: v for k, v in other["protocol"].items() if k not in RATE_SELECTION}:
        raise SystemExit(f"{path} was run under another protocol: its runs cannot be compared with these")
    results.setdefault("imported_protocol", {path.name: other["protocol"]})
    results.setdefault("baseline", other["baseline"])
    for key in ("calibration", "calibration_uncentred"):  # the same work folder's: calibrate() checks it is there
        if key in other:
            results.setdefault(key, other[key])
    for spec in arms:
        source, _, target = spec.partition(":")
        target = target or source
        for run in other["runs"].values():
            if run["arm"] == source:
                copied = {**run, "arm": target, "imported_from": path.name}
                copied["init"] = run["init"].replace(source, target, 1)
                results["runs"].setdefault(run_key(target, run["lr"], run["seed"]), copied)
        for key, init in other["inits"].items():
            if key == source or key.startswith(f"{source}-s"):
                results["inits"].setdefault(key.replace(source, target, 1), {**init, "imported_from": path.name})
        if source in other.get("selected", {}):
            results["selected"].setdefault(target, other["selected"][source])


class Experiment:
    """The fixed parts of a run: base model, tokenizer, splits, calibration, batches per seed, results file."""

    def __init__(self, args: argparse.Namespace, results: dict):
        self.args, self.results = args, results
        self.base_path = builtin_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        self.train_set, self.valid_set, self.test_set, results["splits"] = make_splits(
            args.num_train, args.num_valid, args.num_test
        )
        self.train_file = args.work_dir / "train.jsonl"
        write_jsonl(self.train_file, self.train_set)
        self.train_encoded = encode(self.train_set, self.tokenizer, args.seq_len)
        self.valid_encoded = encode(self.valid_set, self.tokenizer, args.seq_len)
        self.test_encoded = encode(self.test_set, self.tokenizer, args.seq_len)
        self.calibrations = {True: args.work_dir / "calibration", False: args.work_dir / "calibration-uncentred"}
        self.base = fresh_base(self.base_path)  # loaded once: every run puts its adapter on and takes it off again
        (args.work_dir / "trained").mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        save(self.args.results, self.results)

    def calibrate(self, centred: bool) -> Path:
        """The centred calibration (the default), or the uncentred one with the gradients lora-da reads."""
        folder = self.calibrations[centred]
        key = "calibration" if centred else "calibration_uncentred"
        if key in self.results and folder.is_dir():
            return folder
        a = self.args
        seconds, command = run_tlora(
            ["calibrate", "--data", str(self.train_file), "--num-samples", str(a.num_samples), "--seq-len",
             str(a.seq_len), "--seed", "0", "--device", "cpu", "--engine", "whole", "--quiet", "--overwrite",
             *([] if centred else ["--no-center", "--gradients"]), "-o", str(folder)]
        )  # fmt: skip
        self.results[key] = {"seconds": seconds, "command": command}
        self.save()
        return folder

    def baseline(self) -> None:
        """Every arm starts at the base model's output: one evaluation of the untouched model stands for all."""
        if "baseline" in self.results:
            return
        self.results["baseline"] = {
            "valid_loss": heldout_loss(self.base, self.valid_encoded),
            **evaluate(self.base, self.tokenizer, self.test_set, self.test_encoded, self.args),
        }
        self.save()

    def adapter(self, arm: str, seed: int) -> tuple[str, Path]:
        """The arm's adapter (one per seed for LoRA's random A), made once: with `tlora init --calibration`, or for
        the pre-launch methods with `tlora init --data` on the training set (an equal-steps arm shares its
        parent's adapter)."""
        a = self.args
        arm = EQUAL_STEP_ARMS.get(arm, arm)
        init_key = f"{arm}-s{seed}" if arm in SEEDED_ARMS else arm
        adapter = a.work_dir / "adapters" / init_key
        if init_key not in self.results["inits"] or not adapter.is_dir():  # the JSON may outlive the work folder
            flags = [*ARMS[arm][1], "--budget-rank", str(a.budget_rank), "--alpha", f"{a.alpha:g}"]
            if arm == "lora-da":  # its variance term needs N, the number of examples the fine-tune sees
                flags += ["--lora-da-population", str(a.steps * a.batch_size)]
            if arm in PRELAUNCH_ARMS:
                source = ["--data", str(self.train_file), "--seq-len", str(a.seq_len)]
                flags += ["--prelaunch-steps", str(a.prelaunch_steps), "--prelaunch-batch-size", str(a.batch_size)]
                flags += ["--prelaunch-lr", f"{a.prelaunch_lr:g}"]
            else:
                source = ["--calibration", str(self.calibrate(centred=arm not in UNCENTRED_ARMS))]
            seconds, command = run_tlora(
                ["init", *source, *flags, "--seed", str(seed), "--device", "cpu", "--quiet", "--overwrite",
                 "-o", str(adapter)]
            )  # fmt: skip
            if arm == "tlora-step-match":
                factors = step_match(adapter, self.calibrate(centred=False))
                command += f" && step_match.py (median factor {statistics.median(factors.values()):.3g})"
            self.results["inits"][init_key] = {"seconds": seconds, "command": command, **allocation_summary(adapter)}
            self.save()
        return init_key, adapter

    def batches(self, seed: int, arm: str) -> list[list[EncodedSample]]:
        """The seed's data order, the same for every arm and rate (an equal-steps arm takes its first steps)."""
        a = self.args
        order = random.Random(seed).sample(range(len(self.train_encoded)), a.steps * a.batch_size)
        steps = a.steps - a.prelaunch_steps if arm in EQUAL_STEP_ARMS else a.steps
        return [
            [self.train_encoded[j] for j in order[i : i + a.batch_size]] for i in range(0, len(order), a.batch_size)
        ][:steps]

    def start(self, adapter: Path, trained: Path | None = None) -> Start:
        """The adapter as tlora's trainer starts from it; with `trained`, its trained weights in place of its own."""
        start = start_from_adapter(adapter)
        if trained is not None:
            saved = load_file(trained)
            for name, w in start.weights.items():
                sigma = saved.get(f"{name}.dash_sigma")
                start.weights[name] = LoraWeights(
                    saved[f"{name}.A"], saved[f"{name}.B"], w.scaling, w.dash_u, w.dash_vh, sigma
                )
        return start

    def train(self, arm: str, lr: float, seed: int) -> dict:
        """Train one (arm, rate, seed) unless done; its LoRA weights are kept for a later test evaluation."""
        key = run_key(arm, lr, seed)
        if key in self.results["runs"]:
            return self.results["runs"][key]
        init_key, adapter = self.adapter(arm, seed)
        torch.manual_seed(seed)
        load_start = os.getloadavg()[0]
        with started(self.base, self.start(adapter)) as weights:
            parameters = [t for w in weights.values() for t in w.trained()]
            trainable = sum(t.numel() for t in parameters)
            losses, train_s, train_cpu_s = fine_tune(
                self.base, parameters, self.batches(seed, arm), lr, self.args.warmup
            )
            start = time.perf_counter()
            valid = heldout_loss(self.base, self.valid_encoded) if self.valid_set else None
            parts = {n: (("A", w.a), ("B", w.b), ("dash_sigma", w.dash_sigma)) for n, w in weights.items()}
            saved = {
                f"{n}.{part}": t.detach().contiguous() for n, ps in parts.items() for part, t in ps if t is not None
            }
        save_file(saved, trained_file(self.args.work_dir, key))
        run = {
            "arm": arm,
            "lr": lr,
            "seed": seed,
            "init": init_key,
            "trainable": trainable,
            "train_s": train_s,
            "train_cpu_s": train_cpu_s,
            "train_loss": losses,
            "valid_loss": valid,
            "valid_s": time.perf_counter() - start,
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
        }
        self.results["runs"][key] = run
        self.save()
        print(f"{key}: valid {valid} train {train_s:.0f}s", flush=True)
        return run

    def test(self, arm: str, lr: float, seed: int) -> None:
        """Score a finished run on the test split from its saved weights; retrained only where they are lost."""
        key = run_key(arm, lr, seed)
        run = self.results["runs"].get(key) or self.train(arm, lr, seed)  # a rate given, not swept: not trained yet
        if "heldout_loss" in run:
            return
        weights = trained_file(self.args.work_dir, key)
        if not weights.is_file():  # trained on a machine whose work folder is gone: train again
            del self.results["runs"][key]
            run = self.train(arm, lr, seed)
        with started(self.base, self.start(self.args.work_dir / "adapters" / run["init"], weights)):
            run.update(evaluate(self.base, self.tokenizer, self.test_set, self.test_encoded, self.args))
        self.save()
        print(f"{key}: test loss {run['heldout_loss']:.4f} em {run['exact_match']:.3f}", flush=True)

    def select_lr(self, arm: str) -> float:
        """Sweep the arm's rate on the sweep seed (`next_lr`); the lowest validation loss wins."""
        a = self.args
        if len(a.lrs) == 1:
            return a.lrs[0]
        val_loss: dict[float, float] = {}
        while True:
            for run in self.results["runs"].values():
                if run["arm"] == arm and run["seed"] == a.sweep_seed:
                    val_loss[run["lr"]] = run["valid_loss"]
            lr = next_lr(a.lrs, val_loss, a.extend)
            if lr is None:
                return min(val_loss, key=lambda lr: val_loss[lr])
            val_loss[lr] = self.train(arm, lr, a.sweep_seed)["valid_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path("/work/bench-cache/quality"))
    parser.add_argument("--results", type=Path, default=QUALITY_DIR / "results-tuned.json")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 1e-3, 2e-3, 4e-3])
    parser.add_argument("--extend", type=int, default=2, help="At most this many rates added past each edge.")
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--prelaunch-steps", type=int, default=50, help="The pre-launch arms' (batches as training).")
    parser.add_argument("--prelaunch-lr", type=float, default=2e-4)
    parser.add_argument("--budget-rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-valid", type=int, default=64)
    parser.add_argument("--num-test", type=int, default=64)
    parser.add_argument("--gen-batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--shared-lr",
        type=float,
        help="Also train and test every arm at this one rate on every seed (the shared-rate comparison).",
    )
    parser.add_argument("--only-shared", action="store_true", help="With --shared-lr: no sweep, only that rate.")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads; 1 runs faster on a machine whose other core is busy."
    )
    parser.add_argument("--import-from", type=Path, help="A results file under the same protocol to take runs from.")
    parser.add_argument(
        "--import-arms", nargs="+", default=[], metavar="ARM[:AS]",
        help="Arms whose finished runs (and baseline) are taken from --import-from, optionally renamed.",
    )  # fmt: skip
    args = parser.parse_args()
    if len(args.lrs) > 1 and not args.num_valid:
        parser.error("a learning-rate sweep needs a validation split: --num-valid > 0")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the `tlora` commands it runs
    (args.work_dir / "adapters").mkdir(parents=True, exist_ok=True)
    not_protocol = {"work_dir", "results", "arms", "seeds", "import_from", "import_arms", "threads"}
    not_protocol |= {"shared_lr", "only_shared"}
    protocol = {k: v for k, v in vars(args).items() if k not in not_protocol}
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if results.get("protocol", protocol) != protocol:
        raise SystemExit(f"{args.results} holds runs under another protocol: move it away or pass the same flags")
    results.update(protocol=protocol, machine=machine())
    results.setdefault("command", " ".join(["python", *sys.argv]))
    for key in ("inits", "runs", "selected"):
        results.setdefault(key, {})

    if args.import_from:
        import_runs(results, args.import_from, args.import_arms, protocol)
    experiment = Experiment(args, results)
    experiment.calibrate(centred=True)
    experiment.baseline()
    # Every arm's rate and its test score on the sweep seed first: a cut-off run still compares all arms on one seed.
    for arm in [] if args.only_shared else args.arms:
        parent = EQUAL_STEP_ARMS.get(arm)
        results["selected"][arm] = results["selected"][parent] if parent else experiment.select_lr(arm)
        experiment.save()
        experiment.test(arm, results["selected"][arm], args.sweep_seed)
    for seed in [] if args.only_shared else args.seeds:
        for arm in args.arms:
            experiment.train(arm, results["selected"][arm], seed)
            experiment.test(arm, results["selected"][arm], seed)
    if args.shared_lr is not None:  # arm by arm, so a cut-off run has whole arms at the shared rate
        for arm in args.arms:
            for seed in args.seeds:
                experiment.train(arm, args.shared_lr, seed)
                experiment.test(arm, args.shared_lr, seed)


if __name__ == "__main__":
    main()
