"""The ``blendq`` command line: demo, train, eval, compare, toy, plot, recipes.

Bad input (bits out of range, unknown model, missing data, incompatible flags)
prints one ``blendq: error: ...`` line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

from .functional import SCALES
from .methods import METHODS

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UsageError(f"{message} (see {self.prog} --help)")


class UsageError(Exception):
    pass


def _bits(text: str) -> int | None:
    from .functional import NONE_WORDS

    if text.lower() in NONE_WORDS:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer in 1..8 or 'none', "
                                         f"got {text!r}") from None


def _add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by train and compare; each overrides the recipe (``--config``)."""
    p.add_argument("--config", help="a TOML recipe file or a bundled recipe name")
    p.add_argument("--model", help="model name (see `blendq recipes --models`)")
    p.add_argument("--data", help="digits, fashion-mnist, cifar10, or a dataset directory")
    p.add_argument("--data-root", help="directory of fashion-mnist/cifar10 files")
    p.add_argument("--w-bits", type=_bits, help="weight bits, 1..8")
    p.add_argument("--a-bits", type=_bits, help="activation bits, 1..8, or 'none'")
    p.add_argument("--per-channel", action="store_true",
                   help="one weight scale per output channel")
    p.add_argument("--group-size", type=int, metavar="G",
                   help="one weight scale per block of G inputs of each output channel")
    p.add_argument("--method", choices=tuple(METHODS), help="weight method")
    p.add_argument("--scale", choices=SCALES,
                   help="scale source: ppq (least squares, default) or minmax "
                        "(TensorFlow's QAT ranges)")
    p.add_argument("--act-method", choices=tuple(METHODS), help="activation method")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    p.add_argument("--alpha-window", type=float, nargs=2, metavar=("T0", "T1"),
                   help="α ramp window: fractions of the run if both <= 1, else steps")
    p.add_argument("--alpha-every", type=int, help="update α every f steps")
    p.add_argument("--ab-after", choices=("freeze", "ste"),
                   help="AB weights once α = 1: freeze (the paper) or keep training (STE)")
    p.add_argument("--quant-every", type=int, help="recompute weight codes every n steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=("auto", "bf16", "off"))
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--train-subset", type=int, help="train on the first N training images")
    p.add_argument("--test-subset", type=int, help="evaluate on the first N test images")
    p.add_argument("--init-from", help="float run (directory or checkpoint) to start from")
    p.add_argument("--set", action="append", metavar="KEY=JSON",
                   help="any config key, e.g. --set 'first_layer=[8,8]'")
    p.add_argument("--out", help="run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _flag_keys(args) -> list[str]:
    """The config keys given as flags: every flag whose name is a TrainConfig field
    (flags not given are absent: argument_default=SUPPRESS)."""
    import dataclasses

    from .engine.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return [k for k in vars(args) if k in fields]


def _config(args, **forced):
    from .engine.config import TrainConfig, load_recipe

    config = getattr(args, "config", None)
    values = load_recipe(config) if config else {}
    for key in _flag_keys(args):
        values[key] = getattr(args, key)
    for item in getattr(args, "set", []):
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            if not re.fullmatch(r"[A-Za-z_./~-][\w./~:-]*", raw.strip()):
                raise UsageError(f"--set {key.strip()}: {raw!r} is not valid JSON (strings "
                                 "without spaces or brackets may be given bare)") from None
            values[key.strip()] = raw.strip()  # a bare word: a string
    values.update(forced)
    return TrainConfig.from_dict(values)


# Flags that may differ from a resumed run's recipe (the rest is taken from the run).
_RESUME_FLAGS = {"epochs", "device", "quiet", "out", "resume", "overwrite", "workers"}


def _resume_config(args, out: Path):
    """The run's own recipe, ``--epochs`` extending it; a flag that contradicts the recipe
    is an error (it would silently change what the run trains)."""
    from .engine.checkpoint import load_checkpoint
    from .engine.config import TrainConfig

    saved = TrainConfig.from_dict(load_checkpoint(out / "checkpoint.pt")["config"])
    if getattr(args, "config", None) or getattr(args, "set", None) or getattr(args, "fp32",
                                                                              False):
        raise UsageError("--resume takes the recipe from the run; drop --config/--set/--fp32")
    clashes = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (run: {getattr(saved, k)!r})"
               for k in _flag_keys(args) if k not in _RESUME_FLAGS
               and _same(getattr(args, k)) != _same(getattr(saved, k))]
    if clashes:
        raise UsageError(f"--resume continues {out} with its own recipe; these flags "
                         f"contradict it: {'; '.join(clashes)}")
    epochs = getattr(args, "epochs", saved.epochs)
    if epochs < saved.epochs:
        raise UsageError(f"--epochs {epochs} is fewer than the run's {saved.epochs}")
    return saved.replace(epochs=epochs, **({"device": args.device} if hasattr(args, "device")
                                           else {}))


def _same(value):
    return list(value) if isinstance(value, tuple | list) else value


def default_out(cfg) -> Path:
    """``runs/{model}-{data}-{bits and method}``: runs of other recipes do not collide."""
    if not cfg.quantize:
        tag = "fp32"
    else:
        tag = f"w{cfg.w_bits}a{cfg.a_bits or 32}-{cfg.method}" + ("-pc" if cfg.per_channel
                                                                  else "")
        tag += f"-g{cfg.group_size}" if cfg.group_size else ""
        tag += "-minmax" if cfg.scale == "minmax" else ""
    return Path(f"runs/{cfg.model}-{Path(cfg.data).name}-{tag}")


def cmd_train(args) -> int:
    from .engine import train

    fp32, resume = getattr(args, "fp32", False), getattr(args, "resume", False)
    if fp32 and any(hasattr(args, k) for k in ("w_bits", "a_bits", "method", "per_channel",
                                                  "group_size")):
        raise UsageError("--fp32 trains without quantization; drop --w-bits/--a-bits/"
                         "--method/--per-channel/--group-size")
    if resume:
        if not hasattr(args, "out"):
            raise UsageError("--resume needs the --out of the run to continue")
        out = Path(args.out)
        if not (out / "checkpoint.pt").exists():
            raise UsageError(f"--resume: no checkpoint.pt in {out}; pass the --out of the run")
        cfg = _resume_config(args, out)
    else:
        cfg = _config(args, **({"quantize": False} if fp32 else {}))
        out = Path(getattr(args, "out", None) or default_out(cfg))
        existing = [n for n in ("checkpoint.pt", "config.json", "metrics.jsonl")
                    if (out / n).exists()]
        if existing and not getattr(args, "overwrite", False):
            raise UsageError(f"{out} already holds a run ({', '.join(existing)}): pass "
                             "--resume to continue it, --overwrite to replace it, or "
                             "another --out")
    result = train(cfg, out, resume=resume, progress=not getattr(args, "quiet", False))
    last = result.history[-1]
    print(f"run {out}: " + ", ".join(f"{k}={v:.2f}" for k, v in last.items() if "acc" in k))
    return 0


def cmd_calibrate(args) -> int:
    from .engine import calibrate_run

    cfg = _config(args, quantize=True)
    out = Path(getattr(args, "out", None) or f"{default_out(cfg)}-ptq")
    existing = [n for n in ("checkpoint.pt", "config.json") if (out / n).exists()]
    if existing and not getattr(args, "overwrite", False):
        raise UsageError(f"{out} already holds a run ({', '.join(existing)}): pass "
                         "--overwrite to replace it, or another --out")
    result = calibrate_run(cfg, out, batches=getattr(args, "batches", 16),
                           progress=not getattr(args, "quiet", False))
    row = result.history[-1]
    print(f"run {out}: calibrated on {row['calibration_images']} images in "
          f"{row['calibration_time_s']:.1f}s; " + ", ".join(
              f"{k}={v:.2f}" for k, v in row.items() if k.endswith("acc")))
    return 0


def cmd_eval(args) -> int:
    from .engine.trainer import evaluate_run

    result = evaluate_run(args.run, args.test_subset, progress=not args.quiet)
    for key, value in result.items():
        print(f"{key:14s} {value:.4f}")
    return 0


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _print_compare(base, result: dict, seeds: list[int]) -> str:
    bits = f"W{base.w_bits}A{base.a_bits or 32}" + (" per-channel" if base.per_channel else "")
    lines = [f"{'model':7s} {'bits':18s} {'test top-1 (%)':>16s} {'size':>10s} {'time/run':>9s}"]
    for name in ("fp32", "ste", "ab"):
        label = "W32A32" if name == "fp32" else bits
        lines.append(f"{name.upper():7s} {label:18s} {_mean_std(result['acc'][name]):>16s} "
                     f"{result['size'][name] / 1024:>8.1f}KB "
                     f"{statistics.mean(result['time'][name]):>8.1f}s")
    delta = [a - s for a, s in zip(result["acc"]["ab"], result["acc"]["ste"], strict=True)]
    lines.append(f"AB - STE: {_mean_std(delta)} points over seeds {seeds}")
    return "\n".join(lines)


def _write_compare(out: Path, base, result: dict, seeds: list[int], table: str) -> None:
    from .plots import plot_run, plot_runs

    out.mkdir(parents=True, exist_ok=True)
    summary = {"config": base.to_dict(), "seeds": seeds, "acc": result["acc"],
               "size_bytes": result["size"], "time_s": result["time"]}
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "compare.txt").write_text(table + "\n")
    float_epochs = len(result["histories"]["fp32"])
    plot_runs(result["histories"], out / "compare.png", f"{base.model} on {base.data}",
              start={"ste": float_epochs, "ab": float_epochs})
    plot_run(result["histories"]["ab"], out / "ab_curves.png", "AB run: Figure 4 views and α")


def cmd_compare(args) -> int:
    cfg = _config(args)
    seeds = getattr(args, "seeds", None) or [cfg.seed]
    out = Path(getattr(args, "out", None) or f"runs/compare-{cfg.model}")
    from .engine import compare_methods

    result = compare_methods(cfg, out, seeds, getattr(args, "float_epochs", None),
                             progress=not getattr(args, "quiet", False))
    table = _print_compare(cfg, result, seeds)
    _write_compare(out, cfg, result, seeds, table)
    print(table)
    print(f"written: {out}/compare.txt, compare.json, compare.png, ab_curves.png")
    return 0


def cmd_demo(args) -> int:
    """The main job on the bundled digits: fp32, then STE and AB at the same budget."""
    from .engine.config import TrainConfig

    t0 = time.perf_counter()
    cfg = TrainConfig(model="digits_cnn", data="digits", w_bits=args.w_bits, a_bits=args.a_bits,
                      per_channel=False, epochs=args.epochs, lr=1e-3, alpha_window=(0.0, 0.5))
    seeds = list(range(args.seeds))
    out = Path(args.out)
    print(f"blendq demo: digits_cnn on scikit-learn digits (1,437 train / 360 test images), "
          f"fp32 for {args.float_epochs} epochs, then STE and AB for {args.epochs} epochs "
          f"each at W{args.w_bits}A{args.a_bits}, seeds {seeds}", flush=True)
    from .engine import compare_methods

    result = compare_methods(cfg, out, seeds, args.float_epochs, progress=False)
    table = _print_compare(cfg, result, seeds)
    _write_compare(out, cfg, result, seeds, table)
    from .plots import plot_toy
    from .toy import toy_problem

    plot_toy(toy_problem(), out / "toy.png")
    print(table)
    print(f"converted model: {out}/ab-s0/converted.pt; plots: {out}/compare.png, "
          f"{out}/ab_curves.png, {out}/toy.png ({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_toy(args) -> int:
    from .toy import toy_problem

    trace = toy_problem(lr=args.lr, steps=args.steps)
    print(f"{'step':>4s} {'alpha':>8s} {'w':>10s} {'w_q':>5s} {'loss':>10s}")
    for t in trace:
        print(f"{t.step:4d} {t.alpha:8.4f} {t.w:10.6f} {t.wq:5.0f} {t.loss:10.6f}")
    if args.out:
        from .plots import plot_toy

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        print(f"plot: {plot_toy(trace, args.out)}")
    return 0


def cmd_plot(args) -> int:
    from .plots import plot_run

    run = Path(args.run)
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        raise UsageError(f"{metrics} not found: pass a run directory written by blendq train")
    try:
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise UsageError(f"{metrics} is not valid JSON lines ({err}); `blendq train --resume` "
                         "rewrites it from the checkpoint") from None
    if not history:
        raise UsageError(f"{metrics} holds no finished epoch yet: nothing to plot")
    out = Path(args.out) if args.out else run / "curves.png"
    print(f"plot: {plot_run(history, out, run.name)}")
    return 0


def _converted_run(run: str):
    import torch

    from .engine.trainer import load_run
    from .transform import convert

    model, cfg, _, shape = load_run(run, need_data=False)
    if not cfg.quantize:
        raise UsageError(f"{run} is a float (fp32) run: nothing to export as integers")
    converted = convert(model)
    size = shape["image_size"]
    example = torch.zeros(2, shape["in_channels"], size, size)
    return model, converted, example, cfg


def cmd_export(args) -> int:
    from .export import export_onnx, save_artifact

    model, converted, example, cfg = _converted_run(args.run)
    fp32_bytes = 4 * (sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))))
    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    out = Path(args.out or Path(args.run if Path(args.run).is_dir() else Path(args.run).parent)
               / f"model{suffix}")
    if args.format == "onnx":
        size = export_onnx(converted, out, example, weights=args.weights).stat().st_size
    else:
        size = save_artifact(converted, out, example)
    print(f"wrote {out}: {size:,} bytes, fp32 model {fp32_bytes:,} bytes "
          f"({fp32_bytes / size:.1f}x smaller; W{cfg.w_bits}A{cfg.a_bits or 32})")
    return 0


RUNTIME_CHOICES = {"ort": ("ort",), "openvino": ("openvino",), "all": ("ort", "openvino")}


def cmd_verify(args) -> int:
    from .data import load_dataset
    from .engine.trainer import make_loaders
    from .export import capture
    from .export.verify import verify_model
    from .transform import quantized

    model, converted, example, cfg = _converted_run(args.run)
    data = load_dataset(cfg.data, cfg.data_root)
    cfg = cfg.replace(test_subset=args.test_subset) if args.test_subset else cfg
    _, test = make_loaders(cfg, data)
    program = capture(converted, example)
    with quantized(model) as alpha_one:
        rows = verify_model(alpha_one, program, test, onnx=not args.no_onnx,
                            runtimes=RUNTIME_CHOICES[args.runtime])
    print(f"{args.run}: W{cfg.w_bits}A{cfg.a_bits or 32}; |Δ| in steps of max|logit|/127")
    for row in rows:
        print(row.row())
    return 0


def cmd_recipes(args) -> int:
    from .engine.config import load_recipe, recipe_names
    from .models import MODELS

    if args.models:
        print("\n".join(MODELS))
        return 0
    for name in recipe_names():
        values = load_recipe(name)
        print(f"{name:34s} {values.get('description', '')}")
    return 0


def _add_deploy_commands(sub) -> None:
    """``blendq export`` and ``blendq verify``."""
    ex = sub.add_parser("export", help="export a trained run: blendq artifact (torch.export "
                        "program, packed codes) or ONNX QDQ")
    ex.add_argument("run", help="run directory or checkpoint (alpha must have reached 1)")
    ex.add_argument("--format", choices=("blendq", "onnx"), default="blendq")
    ex.add_argument("--weights", choices=("int8", "int4"), default="int8",
                    help="ONNX storage of weights of 4 bits or fewer: int8 (runtimes fuse "
                         "int8 kernels from the file as it is) or int4 (half the size; "
                         "blendq's onnx_session expands it to int8 in memory)")
    ex.add_argument("--out", help="output file (default: RUN/model.pt2|.onnx)")
    ex.set_defaults(func=cmd_export)

    vf = sub.add_parser("verify", help="alpha=1 model vs integer engine vs ONNX Runtime "
                        "or OpenVINO")
    vf.add_argument("run", help="run directory or checkpoint")
    vf.add_argument("--test-subset", type=int, help="first N test images")
    vf.add_argument("--no-onnx", action="store_true", help="skip the runtimes")
    vf.add_argument("--runtime", choices=tuple(RUNTIME_CHOICES), default="ort",
                    help="ONNX Runtime (ort), OpenVINO (openvino, needs blendq[openvino]) "
                         "or both (all)")
    vf.set_defaults(func=cmd_verify)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="blendq", description="Low-precision training with alpha-blending.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="fp32 vs STE vs AB on the bundled digits (< 3 min)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--w-bits", type=int, default=2)
    demo.add_argument("--a-bits", type=int, default=4)
    demo.add_argument("--epochs", type=int, default=10, help="quantization epochs")
    demo.add_argument("--float-epochs", type=int, default=20)
    demo.add_argument("--seeds", type=int, default=3, help="number of seeds")
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="train one recipe", argument_default=argparse.SUPPRESS)
    _add_recipe_flags(tr)
    tr.add_argument("--fp32", action="store_true", help="train without quantization")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out with its own recipe (--epochs may extend it)")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace the run already in --out")
    tr.set_defaults(func=cmd_train)

    cal = sub.add_parser("calibrate", help="post-training quantization of a float run: "
                         "scales from a few batches, no training (--init-from FLOAT_RUN)",
                         argument_default=argparse.SUPPRESS)
    _add_recipe_flags(cal)
    cal.add_argument("--batches", type=int, help="calibration batches (default 16)")
    cal.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out")
    cal.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("eval", help="evaluate a run: blended, fp and quantized views")
    ev.add_argument("run", help="run directory or checkpoint")
    ev.add_argument("--test-subset", type=int)
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    cmp = sub.add_parser("compare", help="fp32, STE and AB with the same recipe, one table",
                         argument_default=argparse.SUPPRESS)
    _add_recipe_flags(cmp)
    cmp.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the recipe's)")
    cmp.add_argument("--float-epochs", type=int, help="epochs of the fp32 phase")
    cmp.set_defaults(func=cmd_compare)

    toy = sub.add_parser("toy", help="the paper's toy problem (Figure 3)")
    toy.add_argument("--out", help="PNG file for the trajectory plot")
    toy.add_argument("--lr", type=float, default=0.3)
    toy.add_argument("--steps", type=int, default=20)
    toy.set_defaults(func=cmd_toy)

    pl = sub.add_parser("plot", help="plot a run's curves (Figure 4 views and α)")
    pl.add_argument("run")
    pl.add_argument("--out")
    pl.set_defaults(func=cmd_plot)

    _add_deploy_commands(sub)
    rc = sub.add_parser("recipes", help="list bundled recipes (or --models)")
    rc.add_argument("--models", action="store_true")
    rc.set_defaults(func=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .engine.checkpoint import CheckpointError

    try:
        args = _parser().parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError, DataError, CheckpointError, FileNotFoundError, ImportError,
            RuntimeError) as err:
        if os.environ.get("BLENDQ_DEBUG"):
            raise
        print(f"blendq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blendq: interrupted (the last epoch's checkpoint is intact; use --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
