"""Where a deployed model and its α = 1 model part: ONNX Runtime at each graph
optimisation level against the α = 1 model and the exact integer engine, with the
kernels each level runs.

    python benchmarks/ort_levels.py RUN_DIR [--images 256]

For a run directory (``blendq train`` / ``benchmarks/paper_tables.py``): the converted
model is captured and exported as ``blendq export`` does; ONNX Runtime runs the first
``--images`` test images at ``disable`` (every QuantizeLinear, DequantizeLinear and
convolution as written: float convolutions on dequantized values), ``basic``,
``extended`` and ``all`` (int8 kernels where ORT fuses them); each row gives the share
of images whose every logit is within one output step (``max |logit| / 127``) of the
α = 1 model's and of the engine's, and the operators ORT runs at that level.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import torch

LEVELS = ("disable", "basic", "extended", "all")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--images", type=int, default=256)
    args = p.parse_args()
    import onnx
    import onnxruntime as ort

    from blendq.engine.trainer import load_run, make_loaders
    from blendq.export import IntegerEngine, capture, to_onnx
    from blendq.transform import convert, quantized

    model, cfg, data, shape = load_run(args.run)
    _, test = make_loaders(cfg.replace(test_subset=args.images, batch_size=args.images), data)
    x, _ = next(iter(test))
    example = torch.zeros(2, shape["in_channels"], shape["image_size"], shape["image_size"])
    program = capture(convert(model), example)
    with torch.no_grad(), quantized(model) as alpha_one:
        ref = alpha_one(x).float()
        engine = IntegerEngine(program)(x).float()
    step = float(ref.abs().max()) / 127

    def within(out: torch.Tensor, against: torch.Tensor) -> float:
        return 100.0 * float(((out - against).abs().amax(-1) <= step).double().mean())

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    print(f"{args.run}: {args.images} images; engine within one step of the α = 1 model "
          f"{within(engine, ref):.2f} %")
    print(f"{'ORT level':10s} {'vs α = 1':>9s} {'vs engine':>10s}  operators")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(to_onnx(program, example), str(path))
        for name in LEVELS:
            options = ort.SessionOptions()
            options.graph_optimization_level = levels[name]
            options.optimized_model_filepath = str(Path(tmp) / f"{name}.onnx")
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
            out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name:
                                                      x.numpy()})[0]).float()
            kernels = collections.Counter(
                n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
            top = ", ".join(f"{k} {v}" for k, v in kernels.most_common(6))
            print(f"{name:10s} {within(out, ref):8.2f} % {within(out, engine):9.2f} %  {top}")


if __name__ == "__main__":
    main()
