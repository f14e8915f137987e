"""4-bit block-quantized weights on a small GPT-2 or Llama: perplexity against
post-training quantization, file size, ONNX Runtime speed.

    python benchmarks/lm_int4.py train --device cuda --out runs/lm-int4   # the table
    python benchmarks/lm_int4.py deploy --out runs/lm-int4                 # CPU: ORT
    python benchmarks/lm_int4.py train --smoke --device cpu --out /tmp/lm  # checks it runs

Data: the Python standard library's own source files (``*.py`` under this interpreter's
``sysconfig`` stdlib path, site-packages left out) as bytes, split by file into train
and validation (a file is validation when ``crc32(relative path) % 10 == 0``): real
text every machine has and nobody here wrote. Model: Hugging Face ``GPT2LMHeadModel``
from a config (byte vocabulary, 4 layers, width 256, 4 heads, context 128, no dropout), or
with ``--arch llama`` a ``LlamaForCausalLM`` of the same width and depth (RMSNorm, rotary
positions, SwiGLU MLP of 8/3 the width, grouped-query attention with half the heads'
keys and values).

``train``: the float model first (AdamW, cosine schedule), then, from it, weight-only
quantization of every block (``a_bits=None``; the tied embedding / ``lm_head`` and the
norms stay float) at each ``--settings`` (W4 group 32, W4 group 128, W4 per-channel,
W3 group 32, W2 group 32; "W4 g32 int8 matmul": W4 group 32 trained for an int8
matmul, ``QuantPolicy(int8_matmul=True)``, where LSQ is refused and skipped; "W4 g32,
lm_head too": the tied ``lm_head`` quantized as well), each by
every ``--variants``: PTQ (``blendq.calibrate``, no
training: the baseline), AB, STE and LSQ with and without distillation from the float
model (``+ KD``: ``(1 - 0.5)·CE + 0.5·KD`` at temperature 2, :mod:`blendq.distill`), and
LoRA-QAT (peft LoRA, rank 16, on every block's matmuls, the base frozen, STE on the
merged weight ``W + s·B·A``, adapters at 5× the learning rate), seeds 0-2: same data
order per seed, steps, optimizer and schedule for every trained variant; AB's α rises
linearly over the whole run (``AlphaWindow(0, 1)`` semantics), STE and LSQ quantize
from the first step. Validation perplexity of the α = 1 model (what ``convert``
stores) on fixed windows, and the share of PTQ's loss each recovers,
``(PTQ − QAT) / (PTQ − float)``, paired by seed. Jobs run in ``--workers`` processes.
Rows go to ``OUT/lm_int4.json``; the float weights and the converted W4 g32 AB seed-0
model to ``OUT``.

``deploy`` (CPU): the fp32 ONNX file (``torch.onnx.export``) and the W4 g32 file
(``blendq.export.export_onnx``: ``MatMulNBits``) at accuracy level 0 (as trained) and 4
(int8 activations inside the kernel), and at level 4 with the same weights under
``int8_block_inputs`` (the α = 1 model rounds its inputs as the kernel does; these
weights were not retrained with it): file size, ORT latency for 1 token and 128 tokens
(median of alternating runs, default session options, spinning off), and agreement of
ORT with the α = 1 model on validation windows (next-token top-1 against the α = 1
model's, max |logit difference|, and that in output steps, ``max |logit| / 127`` as
``blendq verify`` counts them), and each file's perplexity on those windows. The fp32
row compares the float model with it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import dataclasses
import json
import math
import statistics
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
from torch import nn

CONTEXT = 128
SETTINGS = {  # name -> (w_bits, group_size or None for per-channel)
    "W4 g32": (4, 32), "W4 g128": (4, 128), "W4 per-channel": (4, None), "W3 g32": (3, 32),
    "W2 g32": (2, 32), "W4 g32 int8 matmul": (4, 32),  # QuantPolicy(int8_matmul)
    "W4 g32, lm_head too": (4, 32)}  # the tied lm_head quantized as well (skip=())
METHODS = ("ab", "ste", "lsq")
VARIANTS = {  # name -> (method, distillation, LoRA); "ptq": calibrate only; "float": no
    # quantization, the same fine-tuning steps (what the steps alone buy)
    "Float, same steps": ("float", False, False), "PTQ": ("ptq", False, False),
    "AB": ("ab", False, False), "STE": ("ste", False, False),
    "LSQ": ("lsq", False, False), "AB + KD": ("ab", True, False),
    "STE + KD": ("ste", True, False), "LSQ + KD": ("lsq", True, False),
    "LoRA-QAT (STE)": ("ste", False, True)}
LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"]}
KD_WEIGHT, KD_TEMPERATURE, LORA_LR = 0.5, 2.0, 5.0


def corpus(limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, validation bytes, provenance) from the standard library's sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for path in files:
        rel = path.relative_to(root).as_posix()
        parts[zlib.crc32(rel.encode()) % 10 == 0].append(path.read_bytes() + b"\0")
    train, val = (torch.frombuffer(bytearray(b"".join(parts[v])), dtype=torch.uint8)
                  for v in (False, True))
    if limit:
        train, val = train[:limit], val[:limit // 10]
    info = {"stdlib": str(root), "python": sys.version.split()[0], "files": len(files),
            "train_bytes": train.numel(), "val_bytes": val.numel()}
    return train.long(), val.long(), info


class Logits(nn.Module):
    """``GPT2LMHeadModel`` returning the logits tensor alone (what export captures)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids, use_cache=False).logits


def gpt2(width: int, layers: int) -> Logits:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 64), resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return Logits(GPT2LMHeadModel(config))


def llama(width: int, layers: int) -> Logits:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    heads = max(2, width // 64)
    config = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=8 * width // 3,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=0)
    return Logits(LlamaForCausalLM(config))


def build(arch: str, width: int, layers: int) -> Logits:
    return llama(width, layers) if arch == "llama" else gpt2(width, layers)


def batches(data: torch.Tensor, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, data.numel() - CONTEXT - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + CONTEXT + 1] for s in start.tolist()])


def loss_of(model: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(chunk[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 256).float(),
                                       chunk[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, val: torch.Tensor, windows: int, device: str) -> float:
    model.eval()
    starts = torch.linspace(0, val.numel() - CONTEXT - 2, windows).long().tolist()
    total = 0.0
    for i in range(0, windows, 32):
        chunk = torch.stack([val[s:s + CONTEXT + 1] for s in starts[i:i + 32]]).to(device)
        total += float(loss_of(model, chunk)) * chunk.shape[0]
    return math.exp(total / windows)


def train(model: nn.Module, data: torch.Tensor, steps: int, lr: float, batch: int, seed: int,
          device: str, controller=None, teacher=None, progress: str | None = None) -> None:
    from blendq.distill import distillation_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    model.train()
    stream = batches(data, batch, seed)
    for step in range(steps):
        if controller is not None:
            controller.step(step)
        chunk = next(stream).to(device)
        if teacher is None:
            loss = loss_of(model, chunk)
        else:  # the float model's logits on the same batch
            logits = model(chunk[:, :-1])
            task = nn.functional.cross_entropy(logits.reshape(-1, 256).float(),
                                               chunk[:, 1:].reshape(-1))
            loss = distillation_loss(task, logits, teacher(chunk[:, :-1]), KD_WEIGHT,
                                     KD_TEMPERATURE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and (step + 1) % max(1, steps // 10) == 0:
            print(f"{progress}: step {step + 1}/{steps}, loss {float(loss.detach()):.4f}",
                  flush=True)


def policy(setting: str, method: str):
    import blendq

    bits, group = SETTINGS[setting]
    return blendq.QuantPolicy(w_bits=bits, a_bits=None, per_channel=group is None,
                              group_size=group, method=method,
                              skip=() if setting.endswith("lm_head too") else ("*lm_head",),
                              int8_matmul=setting.endswith("int8 matmul"))


def qat_job(job: dict) -> dict:
    """One quantization-aware run from the float weights (runs in a worker process)."""
    import warnings

    import blendq
    from blendq.distill import Teacher

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    train_data, val, _ = corpus(job["limit"])
    model = build(job["arch"], job["width"], job["layers"])
    model.load_state_dict(torch.load(job["float"], map_location="cpu"))
    model = model.to(job["device"])
    method, distill, lora = VARIANTS[job["variant"]]
    teacher = Teacher(model, copy=True) if distill else None
    lr = job["lr"]
    if lora:  # peft LoRA on every block's matmuls: only the adapters train
        import peft

        model.m = peft.get_peft_model(model.m, peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS[job["arch"]],
            fan_in_fan_out=job["arch"] == "gpt2"))
        lr *= LORA_LR
    if method != "float":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Hugging Face forwards torch.fx cannot capture
            model = blendq.prepare(model, policy(job["setting"],
                                                 "ste" if method == "ptq" else method))
    controller = None
    if method != "float" and blendq.transform.get_alpha(model) < 1:  # AB: α from 0 to 1
        controller = blendq.AlphaController(model, blendq.linear(0, job["steps"] - 1))
    t0 = time.perf_counter()
    if method == "ptq":  # the baseline: the float weights projected, no training
        stream = batches(train_data, job["batch"], job["seed"] + 1)
        blendq.calibrate(model, [next(stream)[:, :-1].to(job["device"]) for _ in range(4)])
    else:
        train(model, train_data, job["steps"], lr, job["batch"], job["seed"] + 1,
              job["device"], controller, teacher)
    row = {k: job[k] for k in ("setting", "variant", "seed", "steps", "qat_lr")}
    row["method"] = method
    row["alpha_end"] = None if method == "float" else blendq.transform.get_alpha(model)
    row["val_ppl"] = perplexity(model, val, job["windows"], job["device"])
    row["train_s"] = time.perf_counter() - t0
    if job.get("save"):
        converted = blendq.convert(model.cpu())
        torch.save(converted.state_dict(), job["save"])
    return row


CONFIG_KEYS = ("arch", "width", "layers", "batch", "lr", "float_steps", "limit")
RUN_KEYS = ("setting", "variant", "seed", "steps", "qat_lr")


def float_model(args, out: Path, train_data: torch.Tensor, val: torch.Tensor) -> tuple[Path, float]:
    """The float model every run starts from: trained once, then read back (its config is
    kept beside it, so a changed size or schedule trains a new one)."""
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    path, meta = out / f"{args.arch}_float.pt", out / f"{args.arch}_float.json"
    if path.exists() and meta.exists():
        saved = json.loads(meta.read_text())
        if saved["config"] == config:
            print(f"float: {path} (val perplexity {saved['val_ppl']:.4f})", flush=True)
            return path, saved["val_ppl"]
    model = build(args.arch, args.width, args.layers).to(args.device)
    t0 = time.perf_counter()
    train(model, train_data, args.float_steps, args.lr, args.batch, 0, args.device,
          progress="float")
    ppl = perplexity(model, val, args.windows, args.device)
    torch.save(model.cpu().state_dict(), path)
    meta.write_text(json.dumps({"config": config, "val_ppl": ppl,
                                "seconds": time.perf_counter() - t0, "commit": _commit()}))
    print(f"float: val perplexity {ppl:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return path, ppl


def cmd_train(args) -> None:
    """Runs every (setting, variant, seed) not yet in ``OUT/rows.jsonl``, appending each row
    as it finishes (a killed table goes on where it stopped), then writes ``lm_int4.json``
    and the table from the rows of this configuration."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train_data, val, info = corpus(args.limit)
    print(f"corpus: {info}", flush=True)
    float_path, float_ppl = float_model(args, out, train_data, val)
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    rows_path = out / "rows.jsonl"
    done = [row for row in _read_rows(rows_path) if row.get("config") == config]
    have = {tuple(row[k] for k in RUN_KEYS) for row in done}
    jobs = [dict(setting=s, variant=v, seed=seed, steps=args.qat_steps, qat_lr=args.qat_lr,
                 lr=args.qat_lr, batch=args.batch, width=args.width, layers=args.layers,
                 limit=args.limit, windows=args.windows, device=args.device,
                 float=str(float_path), threads=args.threads, arch=args.arch,
                 save=str(out / "gpt2_w4g32_ab_s0.pt")
                 if (s, v, seed, args.arch) == ("W4 g32", "AB", 0, "gpt2") else None)
            for seed in args.seeds for s in args.settings for v in args.variants
            if (VARIANTS[v][0] != "float" or s == args.settings[0])  # float: once a seed
            and not (VARIANTS[v][0] == "lsq" and s.endswith("int8 matmul"))]  # (refused)
    jobs = [j for j in jobs if tuple(j[k] for k in RUN_KEYS) not in have]
    print(f"{len(jobs)} runs to do ({len(have)} done), {args.workers} at a time; rows in "
          f"{rows_path}", flush=True)
    ctx = torch.multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        futures = [pool.submit(qat_job, job) for job in jobs]
        for i, future in enumerate(cf.as_completed(futures), 1):
            row = future.result()
            row.update(config=config, commit=_commit(), device=_device_name(args.device))
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
            print(f"[{i}/{len(jobs)}, {time.perf_counter() - t0:.0f} s] {row['setting']} "
                  f"{row['variant']} seed {row['seed']}: perplexity {row['val_ppl']:.4f} "
                  f"({row['train_s']:.0f} s)", flush=True)
    wanted = {(j["setting"], j["variant"], j["seed"]) for j in jobs} | {
        (r["setting"], r["variant"], r["seed"]) for r in done if r["variant"] in args.variants
        and r["seed"] in args.seeds and r["setting"] in args.settings}
    rows = [r for r in done if (r["setting"], r["variant"], r["seed"]) in wanted]
    result = {"corpus": info, "device": _device_name(args.device), "torch": torch.__version__,
              "commit": _commit(), "args": vars(args), "float_val_ppl": float_ppl,
              "rows": rows}
    (out / "lm_int4.json").write_text(json.dumps(result, indent=1))
    table(result)


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def recovery(result: dict, row: dict, reference: str | None = None) -> float | None:
    """The share of PTQ's perplexity loss a run recovers, ``(PTQ − QAT) / (PTQ − float)``,
    against PTQ of the same setting and seed; the float perplexity is the float model's, or
    with ``reference`` that variant's run of the same seed (``None``: a row missing, or PTQ
    lost nothing)."""
    def of(variant: str, setting: str | None) -> float | None:
        got = [r["val_ppl"] for r in result["rows"] if r["variant"] == variant
               and r["seed"] == row["seed"] and setting in (None, r["setting"])]
        return got[0] if got else None

    ptq = of("PTQ", row["setting"])
    float_ppl = result["float_val_ppl"] if reference is None else of(reference, None)
    if ptq is None or float_ppl is None or ptq - float_ppl <= 0:
        return None
    return 100.0 * (ptq - row["val_ppl"]) / (ptq - float_ppl)


def table(result: dict) -> None:
    def ms(values, digits):
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"

    same = "Float, same steps"
    print(f"\nvalidation perplexity, mean ± sd over seeds (float model: "
          f"{result['float_val_ppl']:.4f}); recovery of PTQ's loss against the float model "
          f"and against the float model fine-tuned for the same steps ({same!r}), paired by "
          f"seed")
    print(f"{'setting':16s} {'variant':18s} {'perplexity':>18s} {'recovery %':>14s} "
          f"{'vs same steps %':>16s}")
    for setting in SETTINGS:
        for variant in VARIANTS:
            rows = [r for r in result["rows"] if r["variant"] == variant
                    and (r["setting"] == setting or variant == same)]
            if not rows or (variant == same and setting != result["args"]["settings"][0]):
                continue
            cells = ["", ""]
            if variant not in ("PTQ", same):
                for i, ref in enumerate((None, same)):
                    got = [v for v in (recovery(result, r, ref) for r in rows) if v is not None]
                    cells[i] = ms(got, 1)
            label = "(all)" if variant == same else setting
            print(f"{label:16s} {variant:18s} {ms([r['val_ppl'] for r in rows], 4):>18s} "
                  f"{cells[0]:>14s} {cells[1]:>16s}")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    from _harness import cpu_name

    return f"CPU {cpu_name()}, {torch.get_num_threads()} threads"


def _commit() -> str:
    import os
    import subprocess

    if os.environ.get("BLENDQ_COMMIT"):  # a copy of the tree without its .git
        return os.environ["BLENDQ_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cmd_deploy(args) -> None:
    import blendq
    from blendq.export import export_onnx
    from blendq.export.verify import output_step

    out = Path(args.out)
    _, val, info = corpus(args.limit)
    base = build(args.arch, args.width, args.layers).eval()
    base.load_state_dict(torch.load(out / "gpt2_float.pt", map_location="cpu"))
    trained = out / "gpt2_w4g32_ab_s0.pt"
    models = {}  # label -> (converted model, accuracy level)
    for label, level, int8_inputs in (("W4 g32 level 0", 0, False), ("W4 g32 level 4", 4, False),
                                      ("W4 g32 level 4, int8 in", 4, True)):
        rules = dataclasses.replace(policy("W4 g32", "ab"), int8_block_inputs=int8_inputs)
        quant = blendq.prepare(copy.deepcopy(base), rules)
        blendq.set_alpha(quant, 1.0)
        converted = blendq.convert(quant)
        if trained.exists():  # the trained W4 g32 model (its 4-bit codes stored packed)
            converted.load_state_dict(torch.load(trained, map_location="cpu"))
        models[label] = (converted, level)
    files = {}
    for tokens in (1, CONTEXT):
        ids = val[:tokens].reshape(1, tokens)
        files[("fp32", tokens)] = out / f"gpt2_fp32_{tokens}.onnx"
        torch.onnx.export(base, (ids,), str(files[("fp32", tokens)]), dynamo=True,
                          external_data=False, optimize=True, verbose=False)
        for i, (label, (converted, level)) in enumerate(models.items()):
            path = out / f"gpt2_w4g32_{i}_{tokens}.onnx"
            files[(label, tokens)] = path
            export_onnx(converted, path, ids, dynamic_batch=False, accuracy_level=level)
    sessions = {key: _session(path) for key, path in files.items()}
    times: dict = {key: [] for key in files}
    for _ in range(args.repeats):
        for key, session in sessions.items():
            ids = val[:key[1]].reshape(1, -1).numpy()
            name = session.get_inputs()[0].name
            session.run(None, {name: ids})
            t0 = time.perf_counter()
            for _ in range(args.inner):
                session.run(None, {name: ids})
            times[key].append((time.perf_counter() - t0) / args.inner)
    starts = torch.linspace(0, val.numel() - CONTEXT - 2, args.agree_windows).long().tolist()
    chunks = torch.stack([val[s:s + CONTEXT] for s in starts])
    targets = torch.stack([val[s + 1:s + CONTEXT + 1] for s in starts])
    with torch.no_grad():  # each file against the α = 1 model it was exported from
        refs = {label: torch.cat([m(chunks[i:i + 1]) for i in range(len(starts))])
                for label, (m, _) in models.items()}
    ref = refs["W4 g32 level 0"]

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(float(nn.functional.cross_entropy(logits.reshape(-1, 256).double(),
                                                          targets.reshape(-1))))

    for label, logits in refs.items():
        print(f"alpha=1 model for {label!r} (torch): perplexity {ppl(logits):.4f}")
    rows = []
    print(f"\n{'file':24s} {'MB':>7s} {'x fp32':>7s} {'1 token ms':>11s} {'128 tok ms':>11s} "
          f"{'top-1 = a=1 %':>14s} {'max |dlogit|':>13s} {'steps':>9s} {'ppl':>8s}")
    for label in ("fp32", *models):
        size = files[(label, CONTEXT)].stat().st_size
        ms = [statistics.median(times[(label, t)]) * 1e3 for t in (1, CONTEXT)]
        session = sessions[(label, CONTEXT)]
        name = session.get_inputs()[0].name
        got = torch.cat([torch.from_numpy(session.run(None, {name: chunks[i:i + 1].numpy()})[0])
                         for i in range(len(starts))])
        own = refs.get(label, ref)
        agree = float((got.argmax(-1) == own.argmax(-1)).float().mean()) * 100
        diff = float((got - own).abs().max())
        steps = diff / output_step(own)
        fp32_size = files[("fp32", CONTEXT)].stat().st_size
        rows.append({"file": label, "bytes": size, "size_ratio": size / fp32_size,
                     "ms_1_token": ms[0], "ms_128_tokens": ms[1], "top1_agree_pct": agree,
                     "max_abs_logit_diff": diff, "max_output_steps": steps,
                     "val_ppl": ppl(got)})
        print(f"{label:24s} {size / 1e6:7.2f} {size / fp32_size:7.3f} {ms[0]:11.3f} "
              f"{ms[1]:11.3f} {agree:14.3f} {diff:13.2e} {steps:9.3f} {ppl(got):8.4f}")
    result = {"corpus": info, "machine": _device_name("cpu"), "commit": _commit(),
              "trained_w4g32": trained.exists(),
              "alpha_one_val_ppl": {label: ppl(logits) for label, logits in refs.items()},
              "rows": rows,
              "args": vars(args)}
    (out / "lm_int4_deploy.json").write_text(json.dumps(result, indent=1))


def cmd_anchor(args) -> None:
    """blendq's 4-bit files beside ONNX Runtime's own int8 tool at both ends of a request:
    GPT-2 small from its config (12 layers × 768, vocabulary 50,257; random weights, seed
    0), batch 1, no KV cache, one token and a 128-token prompt. The anchor is
    ``onnxruntime.quantization.quantize_dynamic`` (int8 per channel, what ORT recommends
    for transformers) of the float ONNX file; blendq's is W4 group 32 (PTQ: speed does not
    depend on training) at ``MatMulNBits`` level 0 and 4, ``lm_head`` float (``--groups``:
    other block sizes beside 32; ``--openvino``: the first group's standard-ONNX file in
    OpenVINO, with its CPU defaults and in exact float32); for the first group also with
    the ``lm_head`` quantized at level 4 (as converted, and under
    ``int8_block_inputs``, rounding its inputs as the kernel does) and the two
    ``int8_matmul`` files (``lm_head`` float / quantized, ``MatMulInteger``). Times:
    medians of ``--repeats`` alternating blocks of ``--inner`` calls (spinning off), then
    ORT's profile per operator type at 128 tokens and at one; agreement of each file with its own
    reference (the float model for fp32 and the anchor, the α = 1 model for blendq's)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    import blendq
    from blendq.export import export_onnx
    from blendq.export.verify import output_step

    hf_logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = (GPT2Config(n_positions=1024, bos_token_id=0, eos_token_id=0) if not args.smoke
              else GPT2Config(vocab_size=512, n_positions=256, n_embd=64, n_layer=1, n_head=2))
    vocab = config.vocab_size
    base = Logits(GPT2LMHeadModel(config)).eval()
    def ptq(**changes):
        rules = dataclasses.replace(policy("W4 g32", "ste"), **changes)
        quant = blendq.prepare(copy.deepcopy(base), rules)
        blendq.calibrate(quant, [torch.randint(0, vocab, (1, 16))])
        return blendq.convert(quant)

    converted = {group: ptq(group_size=group) for group in args.groups}  # group -> model
    # the lm_head quantized too (by default it stays float): at level 4 from the same
    # weights, and trained to round its inputs as the level-4 kernel does
    # (QuantPolicy(int8_block_inputs=True): the file computes the alpha = 1 model)
    g = args.groups[0]
    quantized_head = {f"blendq W4 g{g} level 4, lm_head too": ptq(group_size=g, skip=()),
                      f"blendq W4 g{g} int8 block inputs, lm_head too":
                      ptq(group_size=g, skip=(), int8_block_inputs=True)}
    # trained for ORT's int8 matmul (QuantPolicy(int8_matmul=True)), stored as INT4 codes
    # and multiples (ORT folds them into int8 weights at load)
    integer = {f"blendq W4 g{g} int8 matmul": ptq(group_size=g, int8_matmul=True),
               f"blendq W4 g{g} int8 matmul, lm_head too":
               ptq(group_size=g, int8_matmul=True, skip=())}
    lengths = (1, CONTEXT)
    files: dict = {}
    # --dynamic: one file per row, its sequence length dynamic (batch 1), exported once
    # and timed at both lengths, as a server would run it
    seq = {1: torch.export.Dim("seq", min=1, max=config.n_positions)}
    shape = {"dynamic_shapes": (seq,)} if args.dynamic else {}
    for tokens in lengths[-1:] if args.dynamic else lengths:
        ids = torch.randint(0, vocab, (1, tokens))
        fp32 = out / f"anchor_fp32_{tokens}.onnx"
        torch.onnx.export(base, (ids,), str(fp32), dynamo=True, external_data=False,
                          optimize=True, verbose=False, **shape)
        files[("fp32", tokens)] = fp32
        files[("ORT quantize_dynamic int8", tokens)] = out / f"anchor_dyn_{tokens}.onnx"
        quantize_dynamic(str(fp32), str(files[("ORT quantize_dynamic int8", tokens)]),
                         per_channel=True, weight_type=QuantType.QInt8)
        # like with like: embeddings float as in blendq's files (by default their tables
        # are int8, and the lm_head's weight, tied to the token table, is dequantized
        # again at every call)
        head = out / f"anchor_dyn_head_{tokens}.onnx"
        quantize_dynamic(str(fp32), str(head), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=_nodes(fp32, "Gather"))
        files[("ORT quantize_dynamic, embeddings float", tokens)] = head
        for group, model in converted.items():
            for level in (0, 4):
                path = out / f"anchor_w4g{group}_{level}_{tokens}.onnx"
                export_onnx(model, path, ids, dynamic_batch=False, accuracy_level=level,
                            **shape)
                files[(f"blendq W4 g{group} level {level}", tokens)] = path
        for label, model in quantized_head.items():
            path = out / f"anchor_head{len(files)}_{tokens}.onnx"
            export_onnx(model, path, ids, dynamic_batch=False, accuracy_level=4, **shape)
            files[(label, tokens)] = path
        for label, model in integer.items():
            path = out / f"anchor_int8mm{len(files)}_{tokens}.onnx"
            export_onnx(model, path, ids, dynamic_batch=False, weights="int4", **shape)
            files[(label, tokens)] = path
        if args.openvino:  # the float file, for what OpenVINO's own float path gives
            files[("fp32 in OpenVINO, its defaults", tokens)] = fp32
        if args.openvino:  # standard ONNX (INT4 DequantizeLinear in blocks) for OpenVINO
            path = out / f"anchor_w4g{args.groups[0]}_std_{tokens}.onnx"
            export_onnx(converted[args.groups[0]], path, ids, dynamic_batch=False,
                        accuracy_level=None, weights="int4", **shape)
            for label in OPENVINO_MODES:
                files[(f"blendq W4 g{args.groups[0]} {label}", tokens)] = path
    if args.dynamic:  # the same file at every length
        files.update({(label, t): path for (label, _), path in list(files.items())
                      for t in lengths})
    labels = list(dict.fromkeys(label for label, _ in files))
    rng = torch.Generator().manual_seed(1)
    feeds = {t: torch.randint(0, vocab, (1, t), generator=rng) for t in lengths}
    sessions = {key: _runner(path, key[0]) for key, path in files.items()}
    times: dict = {key: [] for key in files}
    for _ in range(args.repeats):  # alternating blocks: no file gets a quiet machine alone
        for key, run in sessions.items():
            feed = feeds[key[1]].numpy()
            run(feed)
            t0 = time.perf_counter()
            for _ in range(args.inner):
                run(feed)
            times[key].append((time.perf_counter() - t0) / args.inner * 1e3)
    prompts = torch.randint(0, vocab, (args.agree_windows, CONTEXT), generator=rng)
    with torch.no_grad():
        refs = {"float": torch.cat([base(x[None]) for x in prompts])}
        for group, model in converted.items():
            refs[group] = torch.cat([model(x[None]) for x in prompts])
        for label, model in {**quantized_head, **integer}.items():
            refs[label] = torch.cat([model(x[None]) for x in prompts])
        # each reference's own sensitivity: its logits when the position table moves by
        # one ulp (what any runtime's other float rounding can do to it)
        models = {"float": base, **converted, **quantized_head, **integer}
        jitter = {key: _one_ulp_apart(model, prompts, refs[key]) for key, model in models.items()}
    rows = []
    for label in labels:
        key = label if label in refs else \
            int(label.split()[2][1:]) if label.startswith("blendq") else "float"
        ref = refs[key]
        run = sessions[(label, CONTEXT)]
        got = torch.cat([torch.from_numpy(run(x[None].numpy())) for x in prompts])
        top1 = float((got[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).float().mean()) * 100
        row = {"file": label, "bytes": files[(label, CONTEXT)].stat().st_size,
               "reference": "alpha=1 model" if label.startswith("blendq") else "float model",
               "next_token_top1_pct": top1,
               "max_output_steps": float((got - ref).abs().max()) / output_step(ref),
               "reference_one_ulp_steps": jitter[key][0],
               "reference_one_ulp_top1_pct": jitter[key][1]}
        for tokens in lengths:
            row[f"ms_{tokens}"] = statistics.median(times[(label, tokens)])
        rows.append(row)
    anchor = rows[labels.index("ORT quantize_dynamic int8")]
    for row in rows:
        for tokens in lengths:
            row[f"speedup_vs_anchor_{tokens}"] = anchor[f"ms_{tokens}"] / row[f"ms_{tokens}"]
    profile = {label: _profile(files[(label, CONTEXT)], feeds[CONTEXT], args.inner)
               for label in labels if not label.endswith(tuple(OPENVINO_MODES))}
    profile_1 = {label: _profile(files[(label, 1)], feeds[1], 10 * args.inner)
                 for label in profile}
    print(f"\n{'file':48s} {'MB':>7s} {'1 token ms':>11s} {'x anchor':>9s} "
          f"{'128 tok ms':>11s} {'x anchor':>9s} {'top-1 %':>8s} {'steps':>7s} "
          f"{'ref 1-ulp steps':>16s}")
    for r in rows:
        print(f"{r['file']:48s} {r['bytes'] / 1e6:7.1f} {r['ms_1']:11.2f} "
              f"{r['speedup_vs_anchor_1']:9.2f} {r[f'ms_{CONTEXT}']:11.2f} "
              f"{r[f'speedup_vs_anchor_{CONTEXT}']:9.2f} {r['next_token_top1_pct']:8.2f} "
              f"{r['max_output_steps']:7.3f} {r['reference_one_ulp_steps']:16.3f}")
    for tokens, table in ((CONTEXT, profile), (1, profile_1)):
        print(f"\nORT profile at {tokens} tokens, ms per call by operator type (profiling "
              f"slows small operators):")
        for label, ops in table.items():
            print(f"  {label}: " + ", ".join(f"{op} {ms:.2f}" for op, ms in list(ops.items())[:6])
                  + f"; all {sum(ops.values()):.2f}")
    result = {"machine": _device_name("cpu"), "commit": _commit(), "onnxruntime": ort.__version__,
              "config": {k: getattr(config, k) for k in ("vocab_size", "n_embd", "n_layer")},
              "rows": rows, "profile_ms": profile, "profile_ms_1": profile_1, "args": vars(args)}
    (out / "lm_anchor.json").write_text(json.dumps(result, indent=1))


def _one_ulp_apart(model: nn.Module, prompts: torch.Tensor, ref: torch.Tensor
                   ) -> tuple[float, float]:
    """``(max output steps, next-token top-1 %)`` of ``model`` against its own logits
    ``ref`` when its position table is multiplied by ``1 ± 2^-23`` (one ulp, signs at
    random, seed 0): how far the float rounding of another runtime alone can move it. A
    model that rounds its activations at run time moves where a value crosses a rounding
    tie; one computing in float moves by float rounding."""
    model = copy.deepcopy(model)
    table = next(m.weight for name, m in model.named_modules() if name.endswith("wpe"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        table.mul_(1 + 2.0 ** -23 * torch.randn(table.shape, generator=g).sign())
        got = torch.cat([model(x[None]) for x in prompts])
    from blendq.export.verify import output_step

    top1 = float((got[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).float().mean()) * 100
    return float((got - ref).abs().max()) / output_step(ref), top1


OPENVINO_MODES = {  # label -> OpenVINO CPU properties
    "in OpenVINO, its defaults": {},  # bf16 where the CPU has it, int8 activation groups
    "in OpenVINO, f32 exact": {"INFERENCE_PRECISION_HINT": "f32",
                               "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}}


def _runner(path: Path, label: str):
    """``run(ids) -> logits`` for one file: an ONNX Runtime session (default options,
    spinning off), or OpenVINO's CPU plugin in the mode the label names (2 threads)."""
    mode = next((m for m in OPENVINO_MODES if label.endswith(m)), None)
    if mode is None:
        session = _session(path)
        name = session.get_inputs()[0].name
        return lambda ids: session.run(None, {name: ids})[0]
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": 2, **OPENVINO_MODES[mode]}
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
    return lambda ids: request.infer({0: ids})[0]


def _nodes(path: Path, op_type: str) -> list[str]:
    """The names of an ONNX file's nodes of ``op_type``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == op_type]


def _profile(path: Path, ids: torch.Tensor, runs: int) -> dict[str, float]:
    """ONNX Runtime's own profile of ``runs`` calls: milliseconds per call by operator type,
    largest first."""
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: ids.numpy()}
    session.run(None, feed)
    session.end_profiling()  # the warm-up call's events go with that file
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    trace = session.end_profiling()
    totals: dict[str, float] = {}
    for event in json.loads(Path(trace).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3 / runs
    os.remove(trace)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("train", "deploy", "anchor"))
    p.add_argument("--out", default="runs/lm-int4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--qat-lr", type=float, default=2e-4)
    p.add_argument("--float-steps", type=int, default=3000)
    p.add_argument("--qat-steps", type=int, default=400)
    p.add_argument("--windows", type=int, default=512, help="validation windows")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["W4 g32", "W3 g32"],
                   choices=list(SETTINGS))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--limit", type=int, default=None, help="train bytes used (val: a tenth)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--agree-windows", type=int, default=128)
    p.add_argument("--groups", type=int, nargs="+", default=[32],
                   help="anchor: blendq's block sizes")
    p.add_argument("--openvino", action="store_true",
                   help="anchor: blendq's W4 file in OpenVINO as well")
    p.add_argument("--dynamic", action="store_true",
                   help="anchor: one file per row with a dynamic sequence length, timed at "
                        "both lengths (default: a file per length)")
    args = p.parse_args()
    if args.smoke:
        for key, value in dict(width=32, layers=1, batch=4, float_steps=4, qat_steps=3,
                               windows=8, seeds=[0], settings=["W4 g32"], limit=200_000,
                               repeats=1, inner=1, agree_windows=2).items():
            setattr(args, key, value)
        if args.variants == list(VARIANTS):  # the smoke run: one of each kind
            args.variants = ["PTQ", "AB", "STE + KD", "LoRA-QAT (STE)"]
    {"train": cmd_train, "deploy": cmd_deploy, "anchor": cmd_anchor}[args.command](args)


if __name__ == "__main__":
    main()
