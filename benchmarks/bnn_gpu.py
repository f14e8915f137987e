"""BinaryNet W1A1 on CIFAR-10: the baselines and AB variants side by side on one GPU.

    python ../shared/data/cifar10/make_cifar10_batches.py /tmp/cifar10   # once, ~10 s
    python benchmarks/bnn_gpu.py --data-root /tmp/cifar10 --out runs/bnn-gpu
    python benchmarks/bnn_gpu.py --smoke --device cpu --data digits       # checks the script

The recipe is ``binarynet_cifar10`` (40 epochs, Adam one-cycle 2e-3, batch 256, bf16 on a
GPU, seed 0); each run changes it as the Fashion-MNIST study's W1A1 variant of the same
name does (``benchmarks/ab_study.py``: STE with BinaryNet's latent clipping, LSQ, AB,
AB with clipping, the hybrid, ...). The runs train in parallel processes on the one
device (at 95d90a3 four runs side by side on an H100 logged 311 s of training and 104 s
of evaluation per quantized run; this script's own time is not measured yet), so their
epoch times are not clean timings. Each run writes its ``metrics.jsonl`` every epoch (a
stopped run resumes with ``blendq train --resume``); the script writes
``summary.json`` with every run's per-epoch test accuracy and final figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

from ab_study import slug, variants

from blendq.engine import TrainConfig, load_recipe, train

# the baselines, AB with the library's α window (reaching 1 at the end of the run) and
# the hybrid, the study's best AB variants at W1A1 under Adam
DEFAULT_RUNS = ["STE", "LSQ", "AB, α = 1 at 100 %", "AB, then STE at α = 1"]


def _train(args: tuple[dict, str]) -> tuple[str, list[dict], float]:
    config, out = args
    t0 = time.perf_counter()
    history = train(TrainConfig.from_dict(config), out, progress=False).history
    return out, history, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bnn-gpu")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                   help="variant names of benchmarks/ab_study.py (W1A1)")
    p.add_argument("--data-root")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--device", default="cuda")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny runs: checks the script")
    args = p.parse_args()
    recipe = TrainConfig.from_dict(load_recipe("binarynet_cifar10")).replace(
        data=args.data, data_root=args.data_root, device=args.device, seed=args.seed)
    if args.smoke:
        recipe = recipe.replace(epochs=1, train_subset=256, test_subset=64, batch_size=64,
                                model_args={"width": 0.125})
    if args.epochs:
        recipe = recipe.replace(epochs=args.epochs)
    steps = recipe.epochs * 50000 // recipe.batch_size
    table = {name: changes for name, changes, warm in variants("W1A1", steps) if not warm}
    unknown = [r for r in args.runs if r not in table]
    if unknown:
        raise SystemExit(f"bnn_gpu: unknown runs {unknown}; known: {sorted(table)}")
    out = Path(args.out)
    jobs = []
    for name in args.runs:
        config = {**recipe.to_dict(), **table[name]}
        TrainConfig.from_dict(config)  # a bad variant fails before anything trains
        jobs.append((config, str(out / slug(name))))
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")  # CUDA needs spawned workers
    with ctx.Pool(len(jobs)) as pool:
        results = pool.map(_train, jobs)
    summary = {"recipe": recipe.to_dict(), "wall_s": time.perf_counter() - t0, "runs": []}
    for name, (run_dir, history, seconds) in zip(args.runs, results, strict=True):
        curve = [r.get("q_test_acc", r.get("test_acc")) for r in history]
        summary["runs"].append({"variant": name, "dir": run_dir, "seconds": seconds,
                                "final": curve[-1], "curve": curve})
        print(f"{name:28s} {curve[-1]:6.2f}%  ({seconds:.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wall {summary['wall_s']:.0f} s; {out / 'summary.json'}")


if __name__ == "__main__":
    main()
