"""When does AB beat STE? A seeded study of AB's levers against STE and LSQ.

    python benchmarks/ab_study.py --out runs/ab-study --jobs 2      # the study (resumable)
    python benchmarks/ab_study.py --out runs/ab-study --report      # its tables again

Protocol (every run of a setting shares it; only the named lever changes): Fashion-MNIST,
a fixed random 10,000-image training subset (the run's seed picks it), 5 epochs from
scratch, batch 128, Adam at 2e-3 with a cosine schedule, batch norms frozen for the last
10 % (the library default), the deployed (rounded) bias in training and evaluation.
Accuracy is that of the model as deployed, on all 10,000 test images, after the last
epoch (α = 1 in every run). Settings: W4A4 and W2A2 on ``fmnist_cnn`` at width 16, W1A1
on BinaryNet at width 1/8 with a float input to the first layer (BinaryNet-style).

Variants: STE; LSQ (learned steps for weights and activations); AB as the library's
defaults were when the study ran (cubic α over the first 75 % of the run, α every
step); AB with α reaching 1 at 50 % or 100 % of the run (100 % is the default since);
AB with α raised in a staircase of 10 steps (the paper's ``f``); AB going on
straight-through once α = 1 (``ab_after="ste"``, a hybrid); STE and AB under SGD
(momentum 0.9, lr 0.05); STE and AB from a float warm start (a float run of the same
protocol, then the same 5 epochs at lr 2e-4); at W1A1 STE and AB with and without
BinaryNet's latent clipping to [-1, 1] (STE's recipe has it, AB's did not).
A convergence check trains STE twice as long (10 epochs): if it gains little, the
5-epoch budget has let STE converge on this subset.

Each finished run is one line of ``rows.jsonl`` (run again to go on after a stop); the
report gives mean ± sd over seeds and each variant's paired difference to STE.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PROTOCOL = {"data": "fashion-mnist", "train_subset": 10000, "test_subset": 2000,
            "epochs": 5, "batch_size": 128, "optimizer": "adam", "lr": 2e-3,
            "lr_schedule": "cosine", "eval_views": False}
FULL_TEST = 10000  # the final figure is measured on the whole test set
SETTINGS = {
    "W4A4": {"model": "fmnist_cnn", "model_args": {"width": 16}, "w_bits": 4, "a_bits": 4},
    "W2A2": {"model": "fmnist_cnn", "model_args": {"width": 16}, "w_bits": 2, "a_bits": 2},
    "W1A1": {"model": "binarynet", "model_args": {"width": 0.125}, "w_bits": 1, "a_bits": 1,
             "first_layer": [1, None]},
}
SGD = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}
WARM_LR = 2e-4
STAIRS = 10


def variants(setting: str, steps: int, epochs: int = PROTOCOL["epochs"]
             ) -> list[tuple[str, dict, bool]]:
    """``(name, config changes, float warm start)`` of each run of ``setting``; ``steps``:
    the run's optimizer steps (the staircase's ``f`` is a tenth of the α window);
    ``epochs``: the run's epochs (the convergence check trains STE twice as long)."""
    clip = setting == "W1A1"  # BinaryNet's STE recipe clips 1-bit latent weights
    ste = {"method": "ste", "clip_latent": clip}
    rows = [
        ("STE", ste, False),
        ("LSQ", {"method": "lsq", "act_method": "lsq"}, False),
        ("AB", {"method": "ab", "alpha_window": [0.0, 0.75]}, False),
        ("AB, α = 1 at 50 %", {"method": "ab", "alpha_window": [0.0, 0.5]}, False),
        ("AB, α = 1 at 100 %", {"method": "ab", "alpha_window": [0.0, 1.0]}, False),
        (f"AB, staircase f = {max(1, round(0.75 * steps / STAIRS))}",
         {"method": "ab", "alpha_every": max(1, round(0.75 * steps / STAIRS))}, False),
        ("AB, then STE at α = 1", {"method": "ab", "ab_after": "ste"}, False),
        ("STE, SGD", {**ste, **SGD}, False),
        ("AB, SGD", {"method": "ab", **SGD}, False),
        ("STE, float start", {**ste, "lr": WARM_LR}, True),
        ("AB, float start", {"method": "ab", "lr": WARM_LR}, True),
    ]
    rows.append(("STE, twice the epochs (convergence check)", {**ste, "epochs": 2 * epochs},
                 False))
    if clip:
        rows += [("STE, no latent clipping", {"method": "ste"}, False),
                 ("AB, latent clipping", {"method": "ab", "clip_latent": True}, False)]
    return rows


def slug(text: str) -> str:
    """A folder name for a variant: ASCII letters and digits, runs of others as one '-'."""
    kept = "".join(c if c.isascii() and c.isalnum() else " " for c in text.lower())
    return "-".join(kept.split())


def _run_one(job: dict) -> dict:
    """Train one run (or reuse its finished checkpoint) and measure it; runs in a worker."""
    import torch

    torch.set_num_threads(job["threads"])
    from _harness import finished_history

    from blendq.engine import TrainConfig, evaluate_run, train

    cfg = TrainConfig.from_dict(job["config"])
    out = Path(job["dir"])
    t0 = time.perf_counter()
    history = finished_history(cfg, out)
    if history is None:
        history = train(cfg, out, progress=False).history
    seconds = time.perf_counter() - t0
    last = history[-1]
    # as deployed: at α = 1 (a window ending with the run leaves α a hair below 1)
    final = evaluate_run(out, test_subset=job["full_test"], views=False,
                         alpha=1.0 if cfg.quantize else None)
    acc = final["test_acc"]
    row = {k: job[k] for k in ("setting", "variant", "seed", "warm")}
    row.update(acc=acc, alpha=1.0 if cfg.quantize else 0.0, last_alpha=last["alpha"],
               seconds=round(seconds, 1),
               curve=[r["test_acc"] for r in history], dir=str(out),
               codes_changed_curve=[r.get("codes_changed") for r in history])
    for key in ("w_rel_dist", "codes_changed", "act_clipped"):  # telemetry, last epoch
        if key in last:
            row[key] = last[key]
    return row


def _jobs(args, done: set) -> tuple[list[dict], list[dict]]:
    """The float runs the warm starts need, then every study run not yet in ``done``."""
    from blendq.engine import TrainConfig

    floats, runs = [], []
    out = Path(args.out)
    for seed in args.seeds:  # seed-major: a stopped study has whole seeds
        for setting in args.settings:
            base = {**PROTOCOL, **SETTINGS[setting], "seed": seed,
                    **({"data": args.data} if args.data else {}), **args.protocol}
            steps = base["epochs"] * -(-base["train_subset"] // base["batch_size"])
            fp_dir = out / setting.lower() / f"s{seed}" / "fp32"
            fp = {**base, "quantize": False}
            common = {"setting": setting, "seed": seed, "threads": args.threads,
                      "full_test": args.full_test}
            chosen = [(name, changes, warm) for name, changes, warm
                      in variants(setting, steps, base["epochs"])
                      if (not args.only or any(o in name for o in args.only))
                      and (not args.variants or name in args.variants)]
            if (setting, "fp32", seed) not in done and (
                    any(warm for *_, warm in chosen) or not (args.only or args.variants)):
                floats.append({**common, "variant": "fp32", "warm": False, "config": fp,
                               "dir": str(fp_dir)})
            for name, changes, warm in chosen:
                if (setting, name, seed) in done:
                    continue
                config = {**base, **changes, **({"init_from": str(fp_dir)} if warm else {})}
                TrainConfig.from_dict(config)  # a bad variant fails here, not an hour in
                runs.append({**common, "variant": name, "warm": warm, "config": config,
                             "dir": str(fp_dir.parent / slug(name))})
    return floats, runs


def report(rows: list[dict], settings: list[str]) -> str:
    """Markdown: accuracy mean ± sd per variant and setting with the paired (same seed)
    difference to STE; then each AB variant's paired difference to AB as the library's
    defaults. * marks a difference whose 95 % t-interval excludes zero."""
    from _harness import mean_sd as _ms
    from _harness import paired_difference

    def _paired(by, setting, name, ref):
        return "–" if name == "fp32" else paired_difference(by, setting, name, ref)

    by = {(r["setting"], r["variant"], r["seed"]): r["acc"] for r in rows}
    names = list(dict.fromkeys(r["variant"] for r in rows))
    settings = [s for s in settings if any(r["setting"] == s for r in rows)]
    lines = ["| variant | " + " | ".join(f"{s} top-1 | {s} − STE" for s in settings) + " |",
             "|---|" + "---|---|" * len(settings)]
    for name in names:
        cells = []
        for s in settings:
            accs = [a for (s2, v, _), a in by.items() if (s2, v) == (s, name)]
            cells += [_ms(accs) if accs else "–", _paired(by, s, name, "STE")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| AB variant − AB | " + " | ".join(settings) + " |",
              "|---|" + "---|" * len(settings)]
    for name in names:
        if name.startswith("AB,"):
            lines.append(f"| {name} | " + " | ".join(_paired(by, s, name, "AB")
                                                      for s in settings) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ab-study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--only", nargs="+", help="run only variants whose name contains one of "
                                             "these texts")
    p.add_argument("--variants", nargs="+", help="run only the variants of these exact names")
    p.add_argument("--epochs", type=int, help="another budget (the study: 5 epochs)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--data", help="another dataset (the smoke test uses digits)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny protocol that checks the script, not the method")
    p.add_argument("--report", action="store_true", help="print the tables of rows.jsonl")
    args = p.parse_args()
    args.protocol, args.full_test = {}, FULL_TEST
    if args.epochs:
        args.protocol["epochs"] = args.epochs
    if args.smoke:
        args.protocol = {"train_subset": 128, "test_subset": 64, "epochs": 1,
                         "batch_size": 64}
        args.full_test = 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] \
        if rows_path.exists() else []
    if not args.report:
        done = {(r["setting"], r["variant"], r["seed"]) for r in rows}
        floats, runs = _jobs(args, done)
        print(f"{len(floats)} float runs, then {len(runs)} study runs, {args.jobs} at a time "
              f"({args.threads} thread(s) each); rows in {rows_path}", flush=True)
        t0 = time.perf_counter()
        from _harness import commit, cpu_name  # torch loads after OMP_NUM_THREADS is set

        meta = {"commit": commit(), "machine": cpu_name(),
                "threads": args.threads, "jobs": args.jobs}
        with ProcessPoolExecutor(args.jobs) as pool, rows_path.open("a") as sink:
            for batch in (floats, runs):  # warm starts need their float runs first
                for row in pool.map(_run_one, batch):
                    row.update(meta)
                    rows.append(row)
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    elapsed = (time.perf_counter() - t0) / 60
                    print(f"{row['setting']} seed {row['seed']} {row['variant']:28s} "
                          f"{row['acc']:6.2f}%  {row['seconds']:5.0f}s  "
                          f"({elapsed:.1f} min in)", flush=True)
    print(report(rows, list(SETTINGS)))
    commits = sorted({r.get("commit", "?") for r in rows})
    print(f"\n{len(rows)} runs; commit(s) {', '.join(commits)}; seeds "
          f"{sorted({r['seed'] for r in rows})}; * = the paired difference's 95 % "
          "t-interval excludes 0")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
