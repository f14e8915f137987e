"""ONNX Runtime: int8 QDQ model against the fp32 ONNX model of the same network.

The int8 file is ``blendq.export_onnx`` of the converted model; the fp32 file is
``torch.onnx`` of the same network with float layers (the prepared model's latent
weights; speed does not depend on the values).

    python benchmarks/onnx_speed.py [--run RUN_DIR] [--batch 256] [--repeats 20]

Without ``--run`` it uses fmnist_cnn with W8A8 per-channel, its activation scales
calibrated on random inputs (speed does not depend on the weights). Both models
are timed in one process, alternating, on ONNX Runtime's CPU provider with its
default optimisations; prints median milliseconds per batch and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import blendq
from blendq.export import export_onnx, onnx_session
from blendq.layers import FOLDED_BN_MAP, BlendMixin, rebuild
from blendq.models import build_model


def _model(run: str | None):
    """``(prepared model at alpha = 1, input shape, label)``."""
    if run:
        from blendq.engine.trainer import load_run_model

        model, cfg, data = load_run_model(run)
        size = cfg.image_size or data.image_size
        return model, (data.in_channels, size, size), run
    torch.manual_seed(0)
    model = blendq.prepare(build_model("fmnist_cnn", in_channels=1, image_size=28),
                           blendq.QuantPolicy(w_bits=8, a_bits=8, per_channel=True))
    model.train()
    for _ in range(3):
        model(torch.randn(64, 1, 28, 28))
    blendq.set_alpha(model.eval(), 1.0)
    return model, (1, 28, 28), "fmnist_cnn W8A8 per-channel (random weights)"


def _float_twin(prepared: torch.nn.Module) -> torch.nn.Module:
    """The same network with plain float layers and batch norms."""
    model = copy.deepcopy(prepared).eval()
    plain = {v: k for k, v in FOLDED_BN_MAP.items()}
    for name, m in list(model.named_modules()):
        new = m.to_float() if isinstance(m, BlendMixin) else \
            rebuild(m, plain[type(m)]) if type(m) in plain else None
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model


def _fp32_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,), strict=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    onnx.save(torch.onnx.export(program, (example,), dynamo=True, verbose=False).model_proto,
              str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    prepared, shape, label = _model(args.run)
    x = np.random.default_rng(0).standard_normal((args.batch, *shape)).astype(np.float32)
    example = torch.from_numpy(x[:2])
    times = {"fp32": [], "int8": []}
    with tempfile.TemporaryDirectory() as tmp:
        _fp32_onnx(_float_twin(prepared), example, Path(tmp) / "fp32.onnx")
        export_onnx(blendq.convert(prepared), Path(tmp) / "int8.onnx", example)
        sessions = {name: onnx_session(Path(tmp) / f"{name}.onnx") for name in times}
        for _ in range(3):  # warm up
            for s in sessions.values():
                s.run(None, {s.get_inputs()[0].name: x})
        for _ in range(args.repeats):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {s.get_inputs()[0].name: x})
                times[name].append(time.perf_counter() - t0)
    fp, q = (statistics.median(times[k]) * 1e3 for k in ("fp32", "int8"))
    print(f"model: {label}; batch {args.batch}; onnxruntime {ort.__version__}; "
          f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"fp32 ONNX   {fp:8.2f} ms/batch")
    print(f"int8 QDQ    {q:8.2f} ms/batch")
    print(f"speed-up    {fp / q:8.2f}x (fp32 time / int8 time, medians of {args.repeats})")


if __name__ == "__main__":
    main()
