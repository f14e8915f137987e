"""The training loop: data, model, policy, α controller, evaluation views, checkpoints.

``train(config, out_dir)`` runs one recipe end to end and returns its history.
Every epoch it evaluates the blended model and, for quantized runs, the
full-precision view (α = 0) and the quantized view (α = 1): Figure 4's curves.
Under ``torchrun`` it trains with DistributedDataParallel (gloo on CPU, NCCL on
GPU); α comes from the global step and EMA scales are broadcast from rank 0, so
ranks agree.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import __version__
from ..data import DataSpec, TensorLoader, load_dataset
from ..distill import Teacher, distillation_loss
from ..models import build_model
from ..transform import (
    AlphaController,
    alpha_view,
    blend_layers,
    calibrate,
    check_weights,
    convert,
    eval_mode,
    float_bias,
    freeze_batch_norms,
    get_alpha,
    prepare,
    set_alpha,
    telemetry,
)
from .checkpoint import load_checkpoint, remove_stale, save_checkpoint
from .config import TrainConfig
from .progress import Progress, write_metrics

__all__ = ["train", "calibrate_run", "evaluate", "evaluate_run", "build", "RunResult", "load_run",
           "load_run_model", "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class RunResult:
    history: list[dict]
    model: nn.Module
    out_dir: Path


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return _Dist(dist.get_rank(), dist.get_world_size())


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def _subset(x, y, n: int | None):
    return (x, y) if n is None or n >= len(y) else (x[:n], y[:n])


def make_loaders(cfg: TrainConfig, data: DataSpec, d: _Dist | None = None):
    """Train and test loaders of ``cfg`` on ``data`` (sharded by rank in a distributed
    run; ``d`` defaults to a single process)."""
    d = d or _Dist()
    if data.folder is not None:
        from ..data import FolderLoader, ImageFolder

        size = cfg.image_size or data.image_size
        train_ds = ImageFolder(data.folder / "train", size, train=True, seed=cfg.seed,
                               skip_bad=cfg.skip_bad_images)
        test_ds = ImageFolder(data.folder / "val", size, train=False,
                              skip_bad=cfg.skip_bad_images)
        return (FolderLoader(train_ds, cfg.batch_size, True, cfg.seed, d.rank, d.world_size,
                             cfg.workers, drop_last=True),
                FolderLoader(test_ds, cfg.batch_size, False, 0, d.rank, d.world_size,
                             cfg.workers))
    tx, ty = _subset(data.train_images, data.train_labels, cfg.train_subset)
    vx, vy = _subset(data.test_images, data.test_labels, cfg.test_subset)
    train = TensorLoader(tx, ty, cfg.batch_size, shuffle=True, augment=data.augment,
                         seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                         drop_last=len(ty) // d.world_size > cfg.batch_size)
    test = TensorLoader(vx, vy, max(cfg.batch_size, 256), rank=d.rank, world_size=d.world_size)
    return train, test


def data_shape(cfg: TrainConfig, data: DataSpec) -> dict:
    """What the model of ``cfg`` needs to know of its data (kept in checkpoints)."""
    return {"in_channels": data.in_channels, "num_classes": data.num_classes,
            "image_size": cfg.image_size or data.image_size}


def _float_model(cfg: TrainConfig, shape: dict) -> nn.Module:
    return build_model(cfg.model, **shape, **cfg.model_args)


def build(cfg: TrainConfig, shape: dict) -> nn.Module:
    """The model of a config, prepared when it quantizes (no weights loaded)."""
    model = _float_model(cfg, shape)
    return prepare(model, cfg.policy()) if cfg.quantize else model


def _load_float_weights(model: nn.Module, init_from: str) -> None:
    state = load_checkpoint(_checkpoint_path(init_from))["model"]
    if any(k.endswith(".alpha") or ".w_quant." in k or "weight_codes" in k for k in state):
        raise ValueError(f"init_from={init_from} holds a quantized model; start from a "
                         "float (quantize=false) run")
    model.load_state_dict(state)


def _checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def _lr_factor(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier: a pure function of the step (nothing to save)."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** (step // (cfg.lr_step_epochs * steps_per_epoch))
    if cfg.lr_schedule == "onecycle":  # linear up over 25 %, cosine down to 0
        peak = 0.25 * total
        if step < peak:
            return 0.04 + 0.96 * step / peak
        return 0.5 * (1 + math.cos(math.pi * (step - peak) / max(total - peak, 1)))
    progress = (step - warm) / max(total - warm, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _autocast(cfg: TrainConfig, device: torch.device):
    use = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, cfg: TrainConfig,
             desc: str = "eval", progress: bool = False) -> dict:
    """Loss and top-1 accuracy (%) over a loader, summed across ranks."""
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for x, y in Progress(loader, len(loader), desc, progress):
        x, y = x.to(device), y.to(device)
        with _autocast(cfg, device):
            logits = model(x).float()
        totals += torch.tensor([nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                                (logits.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    return {"loss": loss / max(count, 1), "acc": 100.0 * correct / max(count, 1)}


def _evaluate_views(model: nn.Module, loader, device, cfg: TrainConfig, progress: bool) -> dict:
    if not cfg.quantize:
        with eval_mode(model):
            r = evaluate(model, loader, device, cfg, "eval", progress)
        return {"test_loss": r["loss"], "test_acc": r["acc"]}
    out = {}
    views = [("", None), ("fp_", 0.0), ("q_", 1.0)] if cfg.eval_views else [("", None)]
    current = get_alpha(model)
    for prefix, alpha in views:
        if alpha == current:  # the blended model is this view already: no second pass
            out[f"{prefix}test_loss"], out[f"{prefix}test_acc"] = out["test_loss"], out["test_acc"]
            continue
        with alpha_view(model, alpha):
            r = evaluate(model, loader, device, cfg, f"eval {prefix or 'blend_'}"[:-1], progress)
        out[f"{prefix}test_loss"], out[f"{prefix}test_acc"] = r["loss"], r["acc"]
    return out


def _environment(cfg: TrainConfig, device: torch.device, d: _Dist) -> dict:
    env = {"blendq": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "world_size": d.world_size, "seed": cfg.seed,
           "command": " ".join(sys.argv), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN statistics, EMA scales, cached codes)."""
    if dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, 0)


@dataclass
class _Run:
    """Everything one training run holds while it runs."""

    cfg: TrainConfig
    out_dir: Path
    device: torch.device
    dist: _Dist
    model: nn.Module
    net: nn.Module  # the model, wrapped for DDP in a distributed run
    compiled: nn.Module  # ``net`` compiled (``cfg.compile``), used after the first step
    optimizer: torch.optim.Optimizer
    train_loader: object
    test_loader: object
    controller: AlphaController | None
    teacher: Teacher | None
    freeze_at: int | None
    channels_last: bool
    progress: bool
    data_shape: dict
    history: list = field(default_factory=list)
    start_epoch: int = 0
    step: int = 0
    codes: dict | None = None  # the last epoch's weight codes (telemetry)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch


def train(cfg: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
          progress: bool = True, max_steps: int | None = None) -> RunResult:
    """Run ``cfg``; metrics, config and checkpoints go to ``out_dir``.

    ``resume`` continues from ``out_dir/checkpoint.pt`` (written at the end of
    every epoch); the resumed run ends with the same weights and metrics as an
    uninterrupted one (bit for bit on CPU). ``max_steps`` stops the run after that many
    optimizer steps in all, without finishing the epoch (as a crash would).
    """
    run = _setup(cfg, Path(out_dir), progress)
    if resume:
        _resume(run)
    _write_run_files(run)
    for epoch in range(run.start_epoch, cfg.epochs):
        row = _train_epoch(run, epoch, max_steps)
        if row is None:  # stopped at max_steps
            return RunResult(run.history, run.model, run.out_dir)
        _end_epoch(run, epoch, row)
    if run.dist.main and cfg.quantize and get_alpha(run.model) >= 1.0:
        _save_converted(run.model, run.out_dir)
    return RunResult(run.history, run.model, run.out_dir)


def calibrate_run(cfg: TrainConfig, out_dir: str | os.PathLike, batches: int = 16,
                  progress: bool = True) -> RunResult:
    """Post-training quantization of ``cfg``'s float run (``cfg.init_from``): the model
    prepared with ``cfg``'s policy and calibrated (:func:`~blendq.calibrate`) on ``batches``
    training batches (``cfg.batch_size`` images each, drawn with ``cfg.seed``, not
    augmented), no optimizer step. The run directory it writes (``checkpoint.pt`` with
    one history row, ``converted.pt``, ``config.json``, ``metrics.jsonl``) is what
    ``blendq eval``, ``export`` and ``verify`` read, like a trained run's.

    Raises:
        ValueError: no ``init_from`` (a random model calibrates to nothing useful), a
            float config, or ``batches`` < 1.
    """
    if not cfg.quantize:
        raise ValueError("calibrate quantizes a model: the config has quantize=false")
    if not cfg.init_from:
        raise ValueError("calibrate needs the trained float model to quantize: pass "
                         "init_from (--init-from RUN)")
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    out_dir = Path(out_dir)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.data_root)
    shape = data_shape(cfg, data)
    model = _float_model(cfg, shape)
    _load_float_weights(model, cfg.init_from)
    model = prepare(model, cfg.policy()).to(device)
    train_loader, test_loader = make_loaders(cfg, data)
    if hasattr(train_loader, "augment"):
        train_loader.augment = False  # calibration sees the images as they are
    t0 = time.perf_counter()
    taken = (x.to(device) for x, _ in _first(train_loader, batches))
    used = calibrate(model, Progress(taken, batches, "calibrate", progress))
    row = {"epoch": 0, "step": 0, "alpha": 1.0, "calibration_batches": used,
           "calibration_images": used * cfg.batch_size,
           "calibration_time_s": round(time.perf_counter() - t0, 3)}
    t1 = time.perf_counter()
    row.update(_evaluate_views(model, test_loader, device, cfg, progress))
    row["eval_time_s"] = round(time.perf_counter() - t1, 3)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    d = _Dist()
    (out_dir / "env.json").write_text(json.dumps(_environment(cfg, device, d), indent=2))
    state = {"model": model.state_dict(), "epoch": 0, "step": 0, "history": [row],
             "config": cfg.to_dict(), "data_shape": shape, "calibrated": used}
    save_checkpoint(state, out_dir / CHECKPOINT)
    write_metrics([row], out_dir)
    _save_converted(model, out_dir)
    return RunResult([row], model, out_dir)


def _first(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


def _setup(cfg: TrainConfig, out_dir: Path, progress: bool) -> _Run:
    """Device, process group, data, model (float weights from ``init_from``, then
    prepared), optimizer, α controller."""
    device = _device(cfg.device)
    d = _init_distributed(device)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.data_root)
    train_loader, test_loader = make_loaders(cfg, data, d)
    shape = data_shape(cfg, data)
    model = _float_model(cfg, shape)
    if cfg.init_from:
        _load_float_weights(model, cfg.init_from)
    teacher = Teacher(model, copy=True).to(device) if cfg.distill is not None else None
    if cfg.quantize:
        model = prepare(model, cfg.policy())
    model = model.to(device)
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto"
                                                  and device.type == "cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if d.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    # compiled after the first step, which decides the activation grids on the host; with
    # no host synchronisation left in a step, "reduce-overhead" can capture CUDA graphs
    compiled = torch.compile(net, mode=cfg.compile_mode) if cfg.compile else net
    total = cfg.epochs * len(train_loader)
    controller = (AlphaController(model, cfg.alpha(total), after=cfg.ab_after)
                  if cfg.quantize else None)
    return _Run(cfg, out_dir, device, d, model, net, compiled, _optimizer(cfg, model),
                train_loader, test_loader, controller, teacher, cfg.freeze_step(total),
                channels_last, progress, shape)


def _resume(run: _Run) -> None:
    """Continue from the checkpoint: model, optimizer, RNG, history, step; temporary
    files a crash left are removed and the metrics rewritten from the history."""
    ckpt_path = run.out_dir / CHECKPOINT
    if not ckpt_path.exists():
        if run.dist.main:
            print(f"no checkpoint in {run.out_dir}; starting from scratch", file=sys.stderr)
        return
    # loaded on the CPU whatever the device: load_state_dict moves tensors to the model's
    # and the optimizer's devices, and RNG states must be CPU byte tensors
    state = load_checkpoint(ckpt_path, map_location="cpu")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    _match_optimizer_state(run.optimizer)
    _restore_rng(state)
    run.history, run.start_epoch = list(state["history"]), int(state["epoch"])
    run.step = run.start_epoch * run.steps_per_epoch
    run.codes = state.get("codes")
    if run.dist.main:
        write_metrics(run.history, run.out_dir)  # consistent with the checkpoint


def _match_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Per-parameter optimizer state saved with another shape of the same size (an LSQ
    activation step was a scalar before it held one element) reshaped to its parameter's
    shape, so a run saved then resumes."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and key != "step" and \
                        value.shape != p.shape and value.numel() == p.numel():
                    optimizer.state[p][key] = value.reshape(p.shape)


def _write_run_files(run: _Run) -> None:
    if run.dist.main:
        remove_stale(run.out_dir / CHECKPOINT)  # a crash while saving left these
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / "config.json").write_text(json.dumps(run.cfg.to_dict(), indent=2) + "\n")
        (run.out_dir / "env.json").write_text(
            json.dumps(_environment(run.cfg, run.device, run.dist), indent=2))


def _train_epoch(run: _Run, epoch: int, max_steps: int | None) -> dict | None:
    """One epoch of optimizer steps; its metrics row, or ``None`` if ``max_steps`` came."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    run.train_loader.set_epoch(epoch)
    model.train()
    if run.freeze_at is not None and run.step >= run.freeze_at:
        freeze_batch_norms(model)
    t0, loss_sum, seen = time.perf_counter(), torch.zeros((), device=run.device), 0
    bar = Progress(run.train_loader, run.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}",
                   run.progress and run.dist.main)
    alpha = 0.0
    for x, y in bar:
        if max_steps is not None and run.step >= max_steps:
            return None
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        if run.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        alpha = run.controller.step(run.step) if run.controller else 0.0
        if run.step == run.freeze_at:
            freeze_batch_norms(model)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(cfg, run.step, run.total_steps,
                                              run.steps_per_epoch)
        step_fn = run.compiled if run.step > 0 or not cfg.quantize else run.net
        with _autocast(cfg, run.device):
            logits = step_fn(x)
            loss = nn.functional.cross_entropy(logits, y)
            if run.teacher is not None:  # the float model's logits on the same batch
                loss = distillation_loss(loss, logits, run.teacher(x), cfg.distill,
                                         cfg.distill_temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.clip_latent:
            _clip_latent(model)
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        run.step += 1
        if run.step % 20 == 0 and bar.enabled:  # .item() waits for the device: only to show
            bar.postfix = f"loss {loss.item():.3f} alpha {alpha:.3f}"
    train_time = time.perf_counter() - t0
    if cfg.quantize:
        check_weights(model)  # the deferred NaN/inf check: once an epoch, names layers
    _sync_buffers(model)
    return {"epoch": epoch + 1, "step": run.step,
            "alpha": get_alpha(model) if cfg.quantize else 0.0,
            "lr": optimizer.param_groups[0]["lr"], "train_loss": float(loss_sum) / max(seen, 1),
            "epoch_time_s": round(train_time, 3)}


def _end_epoch(run: _Run, epoch: int, row: dict) -> None:
    """Telemetry, evaluation, checkpoint and metrics of a finished epoch."""
    cfg = run.cfg
    if cfg.quantize:  # AB telemetry: distance to the grid, codes moved, inputs clipped
        quant_row, run.codes = telemetry(run.model, run.codes)
        row.update(quant_row)
    skipped = getattr(run.train_loader, "skipped", 0)
    if skipped:
        row["skipped_images"] = skipped
        print(f"blendq: skipped {skipped} unreadable training images this epoch",
              file=sys.stderr)
    rng = _rng_state()  # as after training: evaluation draws nothing a resume needs
    t1 = time.perf_counter()
    try:
        row.update(_evaluate_views(run.model, run.test_loader, run.device, cfg,
                                   run.progress and run.dist.main))
    except BaseException:  # never lose a finished epoch of training to its evaluation
        if run.dist.main:
            _save_epoch(run, rng, epoch, [*run.history, row])
        raise
    row["eval_time_s"] = round(time.perf_counter() - t1, 3)
    _restore_rng(rng)  # the next epoch starts from the state a resume starts from
    run.history.append(row)
    if run.dist.main:
        if run.progress:
            print(_format_row(row), file=sys.stderr)
        _save_epoch(run, rng, epoch, run.history)


def _rng_state() -> dict:
    state = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    """The CPU generator, and every CUDA generator that was saved (as CPU byte tensors,
    whatever device the checkpoint was mapped to)."""
    torch.set_rng_state(state["rng"].to("cpu", torch.uint8))
    cuda = state.get("cuda_rng")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to("cpu", torch.uint8) for t in cuda])


def _save_epoch(run: _Run, rng: dict, epoch: int, history: list) -> None:
    """The checkpoint holds what resuming needs and what rebuilding the model needs
    without the dataset (``data_shape``)."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), **rng,
             "epoch": epoch + 1, "step": run.step, "history": history,
             "config": run.cfg.to_dict(), "data_shape": run.data_shape}
    if run.codes is not None:  # this epoch's weight codes: the next one's codes_changed
        state["codes"] = run.codes
    save_checkpoint(state, run.out_dir / CHECKPOINT)
    write_metrics(history, run.out_dir)


def _clip_latent(model: nn.Module) -> None:
    """BinaryNet's latent-weight clipping to [-1, 1] for 1-bit layers (Hubara et al.)."""
    with torch.no_grad():
        for _, layer in blend_layers(model):
            if layer.w_quant.spec.bits == 1:
                layer.float_weight.clamp_(-1.0, 1.0)


def _save_converted(model: nn.Module, out_dir: Path) -> None:
    converted = convert(model)
    save_checkpoint({"model": converted.state_dict()}, out_dir / "converted.pt")


def _format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}", f"alpha {row['alpha']:.3f}"]
    for key, label in (("test_acc", "acc"), ("fp_test_acc", "fp"), ("q_test_acc", "quant")):
        if key in row:
            parts.append(f"{label} {row[key]:.2f}%")
    parts.append(f"{row['epoch_time_s']:.1f}s")
    return "  ".join(parts)


class LoadedRun(NamedTuple):
    model: nn.Module
    config: TrainConfig
    data: DataSpec | None
    shape: dict  # in_channels, num_classes, image_size


def load_run(run: str | os.PathLike, need_data: bool = True) -> LoadedRun:
    """The model of a run directory or checkpoint file, rebuilt and loaded (eval mode);
    the dataset is loaded only when ``need_data`` or the checkpoint predates
    ``data_shape``."""
    state = load_checkpoint(_checkpoint_path(run))
    cfg = TrainConfig.from_dict(state["config"]).replace(init_from=None)
    shape, data = state.get("data_shape"), None
    if shape is None or need_data:
        data = load_dataset(cfg.data, cfg.data_root)
        shape = data_shape(cfg, data)
    model = build(cfg, shape)
    model.load_state_dict(state["model"])
    return LoadedRun(model.eval(), cfg, data, shape)


def load_run_model(run: str | os.PathLike):
    """``(model, config, data)`` rebuilt from a run directory or checkpoint file."""
    loaded = load_run(run)
    return loaded.model, loaded.config, loaded.data


def evaluate_run(run: str | os.PathLike, test_subset: int | None = None,
                 progress: bool = False, float_biases: bool = False,
                 views: bool = True, alpha: float | None = None) -> dict:
    """Test loss and accuracy of a saved run: blended, full-precision and quantized views
    (``views=False``: the blended model only). ``float_biases``: without rounding the
    biases to accumulator units (what the rounding costs, against the default).
    ``alpha``: the blended model at this α (1.0: as deployed) instead of the run's last."""
    model, cfg, data = load_run_model(run)
    if alpha is not None:
        set_alpha(model, alpha)
    cfg = cfg.replace(eval_views=views and cfg.eval_views)
    if test_subset:
        cfg = cfg.replace(test_subset=test_subset)
    _, test = make_loaders(cfg, data, _Dist())
    device = _device(cfg.device)
    context = float_bias(model) if float_biases else contextlib.nullcontext()
    with context:
        return _evaluate_views(model.to(device), test, device, cfg, progress)
