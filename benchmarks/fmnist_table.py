"""Fashion-MNIST table: fp32, and AB vs STE at W8A8, W4A8, W4A4 (per-layer and
per-channel), and W1A1 BinaryNet-style, all from the same fp32 start.

    python benchmarks/fmnist_table.py --out runs/fmnist-table [--seed 0]

Protocol (identical for AB and STE): a float network trained ``--float-epochs``
epochs; each quantized run starts from it and trains ``--qat-epochs`` more with
Adam, cosine LR from ``--lr``. AB raises α over the first half of the run (eq. 6);
STE quantizes from the first step. Activations use STE in both (the library
default). Both train with the deployed bias (rounded to accumulator units, blended
with α) and freeze batch norms for the last part of the run (``--bn-freeze``). Prints
a Markdown table of final test top-1 of the quantized model as deployed, and of the
same weights with float biases (no rounding: what the rounding costs).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from _harness import finished_history

from blendq.engine import TrainConfig, evaluate_run, train

SETTINGS = [  # (label, w_bits, a_bits, per_channel)
    ("W8A8 per-layer", 8, 8, False), ("W8A8 per-channel", 8, 8, True),
    ("W4A8 per-layer", 4, 8, False), ("W4A8 per-channel", 4, 8, True),
    ("W4A4 per-layer", 4, 4, False), ("W4A4 per-channel", 4, 4, True),
]


def run(cfg: TrainConfig, out: Path) -> tuple[dict, float]:
    """Train, or reuse a finished run of the same config (its recorded time), evaluated
    again by the current code (evaluation may have changed since it trained)."""
    history = finished_history(cfg, out)
    if history is not None:
        return evaluate_run(out), sum(r["epoch_time_s"] + r["eval_time_s"] for r in history)
    t0 = time.perf_counter()
    result = train(cfg, out, progress=False)
    return result.history[-1], time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fmnist-table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float-epochs", type=int, default=4)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--binary-epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--only", help="run only settings whose label contains this text")
    p.add_argument("--bn-freeze", type=float, default=0.9,
                   help="fraction of a quantized run after which batch norms are frozen "
                        "(negative: never)")
    args = p.parse_args()
    out = Path(args.out)
    base = TrainConfig(model="fmnist_cnn", data="fashion-mnist", seed=args.seed,
                       batch_size=128, lr=1e-3, alpha_window=(0.0, 0.5))
    table = out / "table.json"  # rows of settings not run this time are kept
    rows = json.loads(table.read_text()) if table.exists() else []

    def record(label, method, cfg, run_dir):
        last, seconds = run(cfg, run_dir)
        acc = last.get("q_test_acc", last.get("test_acc"))
        row = {"setting": label, "method": method, "acc": acc, "seconds": seconds,
               "epochs": cfg.epochs, "run": str(run_dir), "seed": cfg.seed}
        if cfg.quantize:  # the same weights with float biases: what the rounding costs
            row["acc_float_bias"] = evaluate_run(run_dir, float_biases=True,
                                                 views=False)["test_acc"]
        rows[:] = [r for r in rows if (r["setting"], r["method"]) != (label, method)]
        rows.append(row)
        extra = f"  float bias {row['acc_float_bias']:6.2f}%" if cfg.quantize else ""
        print(f"{label:22s} {method:5s} {acc:6.2f}%{extra}  {seconds:6.0f}s", flush=True)
        table.write_text(json.dumps(rows, indent=2))

    out.mkdir(parents=True, exist_ok=True)
    fp_dir = out / "fp32"
    record("fp32", "fp32", base.replace(quantize=False, epochs=args.float_epochs), fp_dir)
    qat = base.replace(epochs=args.qat_epochs, lr=args.lr, init_from=str(fp_dir),
                       bn_freeze=None if args.bn_freeze < 0 else args.bn_freeze)
    for label, w, a, pc in SETTINGS:
        if args.only and args.only not in label:
            continue
        for method in ("ste", "ab"):
            tag = label.replace(" ", "-").lower()
            record(label, method, qat.replace(w_bits=w, a_bits=a, per_channel=pc, method=method),
                   out / f"{tag}-{method}")
    if not args.only or "W1A1" in args.only:
        bnn = base.replace(model="binarynet", model_args={"width": 0.125}, lr=1e-3)
        bnn_fp = out / "binarynet-fp32"
        record("W1A1 BinaryNet-style", "fp32", bnn.replace(quantize=False,
                                                           epochs=args.float_epochs), bnn_fp)
        for method in ("ste", "ab"):
            cfg = bnn.replace(w_bits=1, a_bits=1, first_layer=(1, None), method=method,
                              epochs=args.binary_epochs, init_from=str(bnn_fp))
            record("W1A1 BinaryNet-style", method, cfg, out / f"w1a1-{method}")
    print(f"\nmachine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, seed {args.seed}")
    print("| setting | fp32 | STE | STE float bias | AB | AB float bias | AB - STE |\n"
          "|---|---|---|---|---|---|---|")
    by = {(r["setting"], r["method"]): r for r in rows}
    fp = by[("fp32", "fp32")]["acc"]
    for label in [s[0] for s in SETTINGS] + ["W1A1 BinaryNet-style"]:
        if (label, "ab") in by:
            f = by[(label, "fp32")]["acc"] if (label, "fp32") in by else fp
            ste, ab = by[(label, "ste")], by[(label, "ab")]
            print(f"| {label} | {f:.2f} | {ste['acc']:.2f} | {ste['acc_float_bias']:.2f} | "
                  f"{ab['acc']:.2f} | {ab['acc_float_bias']:.2f} | {ab['acc'] - ste['acc']:+.2f} |")


if __name__ == "__main__":
    main()
