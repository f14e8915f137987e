"""The experiment protocol behind ``blendq compare`` and ``blendq demo``: a float run,
then each method from its weights with the same recipe, over seeds."""

from __future__ import annotations

import time
from pathlib import Path

from ..transform import size_bytes
from .config import TrainConfig
from .trainer import train

__all__ = ["compare_methods"]


def compare_methods(base: TrainConfig, out: Path, seeds: list[int],
                    float_epochs: int | None = None, progress: bool = True,
                    methods: tuple[str, ...] = ("ste", "ab")) -> dict:
    """The comparison protocol: per seed, a float run of ``float_epochs`` (default: the
    recipe's), then one run per method from its weights with the same recipe. Returns
    test top-1 (quantized model) per method and seed, sizes, the first seed's
    histories and wall times."""

    rows = {"fp32": [], **{m: [] for m in methods}}
    histories, sizes, times = {}, {}, {}
    for seed in seeds:
        fp_cfg = base.replace(quantize=False, seed=seed, epochs=float_epochs or base.epochs,
                              init_from=None)
        t0 = time.perf_counter()
        fp = train(fp_cfg, out / f"fp32-s{seed}", progress=progress)
        times.setdefault("fp32", []).append(time.perf_counter() - t0)
        rows["fp32"].append(fp.history[-1]["test_acc"])
        print(f"  seed {seed} fp32: {rows['fp32'][-1]:.2f}%", flush=True)
        sizes["fp32"] = size_bytes(fp.model)
        histories.setdefault("fp32", fp.history)
        for method in methods:
            cfg = base.replace(method=method, seed=seed, init_from=str(out / f"fp32-s{seed}"))
            t0 = time.perf_counter()
            run = train(cfg, out / f"{method}-s{seed}", progress=progress)
            times.setdefault(method, []).append(time.perf_counter() - t0)
            rows[method].append(run.history[-1]["q_test_acc"])
            print(f"  seed {seed} {method}: {rows[method][-1]:.2f}%", flush=True)
            sizes[method] = size_bytes(run.model)
            histories.setdefault(method, run.history)
    return {"acc": rows, "size": sizes, "histories": histories, "time": times}
