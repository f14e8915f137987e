"""Model surgery: ``prepare``, α control, evaluation views, ``convert``, summary."""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from .converted import QuantMixin, QuantSite, quant_class
from .layers import (
    FOLDED_BN_MAP,
    BiasRounding,
    BlendMixin,
    BlendSite,
    LoraDelta,
    blend_class,
    is_lora,
    layer_kind,
    linked_producer,
    lora_part,
    merged_lora_class,
    rebuild,
)
from .placement import place_sites, sites
from .policy import QuantPolicy
from .quantizers import ActQuantizer, ActStatistics, WeightGroup, WeightQuantizer
from .schedules import Schedule

__all__ = [
    "prepare",
    "calibrate",
    "merge_lora",
    "set_alpha",
    "get_alpha",
    "AlphaController",
    "alpha_view",
    "full_precision",
    "float_bias",
    "freeze_batch_norms",
    "quantized",
    "convert",
    "summary",
    "format_summary",
    "blend_layers",
    "check_weights",
    "link_batch_norms",
    "telemetry",
    "AFTER_ALPHA",
]

# What AB's latent weights do once α reaches 1: "freeze" (the paper: the gradient 1 - α is
# zero) or "ste" (a hybrid that goes on training them straight-through).
AFTER_ALPHA = ("freeze", "ste")


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` inside ``model``; returns the (possibly new) root."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def prepare(model: nn.Module, policy: QuantPolicy) -> nn.Module:
    """Swap every layer the policy quantizes for its blended twin, in place, and (with
    ``policy.placement == "graph"``) place the activation sites apart from weight layers
    (:mod:`blendq.placement`).

    The blended layers share the original Parameters (an optimizer built before
    still works). Where the policy blends (``method`` or ``act_method`` is ``"ab"``)
    they start at α = 0, where they compute what the float layers computed, bit for
    bit, and α follows a schedule (:class:`AlphaController`); where nothing blends (STE,
    LSQ) α starts at 1: the model is quantized from its first forward and
    :func:`convert` works on it as it is. Returns the model (a new object only when the
    model itself is a single Linear/Conv layer).
    """
    if any(isinstance(m, BlendMixin | QuantMixin) for m in model.modules()):
        raise ValueError("model is already prepared or converted; prepare a float model")
    for plan in policy.resolve(model):
        module = model.get_submodule(plan.name)
        blended = blend_class(module).from_float(
            module, plan.w_spec, plan.a_spec, name=plan.name or type(module).__name__
        )
        model = _replace(model, plan.name, blended)
    _merge_adapters(model)
    site_spec = policy.site_spec()
    if site_spec is not None:
        place_sites(model, site_spec)
    link_batch_norms(model)
    if not policy.blends:  # STE / LSQ: quantized from the first forward, as in torch.ao QAT
        for holder in _alpha_holders(model):
            holder.alpha.fill_(1.0)
    return model


def lora_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, wrapper)`` of every LoRA wrapper (peft's ``LoraLayer``) in ``model``."""
    return [(n, m) for n, m in model.named_modules() if is_lora(m)]


def _merge_adapters(model: nn.Module) -> None:
    """Each LoRA wrapper whose base layer is quantized: the base layer's quantizer acts on
    the merged weight ``W + s·B·A`` (``LoraDelta``), and the wrapper's forward becomes its
    base layer's, so what trains is one quantized weight per adapted layer: what
    ``merge_and_unload`` and ``convert`` deploy.

    Raises:
        ValueError: an adapter variant (DoRA's magnitude vector and the like) whose
            output is not ``x·(W + s·B·A)``.
    """
    dropped = []
    for name, wrapper in lora_wrappers(model):
        base = wrapper.base_layer
        if not isinstance(base, BlendMixin):
            continue  # a float base layer: the adapters stay as peft runs them
        variants = [a for a in getattr(wrapper, "lora_variant", {}) or {}]
        if variants or getattr(wrapper, "use_dora", {}) and any(wrapper.use_dora.values()):
            raise ValueError(f"{name}: LoRA variant adapters ({', '.join(variants) or 'DoRA'}) "
                             "do not compute x·(W + s·B·A), the merged weight blendq "
                             "quantizes; use plain LoRA adapters on quantized layers")
        if len(getattr(wrapper, "lora_embedding_A", {}) or {}):
            raise ValueError(f"{name}: LoRA adapters on an embedding table are not "
                             "supported on a quantized table yet; keep the table float "
                             "(QuantPolicy(embedding=None)) or skip it")
        if any(getattr(d, "p", 0) > 0 for d in getattr(wrapper, "lora_dropout", {}).values()):
            dropped.append(name)
        base.__dict__["weight_delta"] = LoraDelta(wrapper)
        wrapper.__class__ = merged_lora_class(type(wrapper))
    if dropped:
        warnings.warn(f"blendq: lora_dropout is not applied on {', '.join(dropped[:4])}"
                      f"{', ...' if len(dropped) > 4 else ''}: the adapters train through "
                      "the merged weight W + s·B·A, where no dropout on their input can "
                      "act", stacklevel=3)


def _unwrap_adapters(model: nn.Module) -> nn.Module:
    """Every merged LoRA wrapper replaced by its base layer (which holds the merged
    weight); returns the (possibly new) root."""
    for name, wrapper in reversed(lora_wrappers(model)):
        if getattr(wrapper, "_blendq_merged", False):
            model = _replace(model, name, wrapper.base_layer)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every quantized layer's LoRA adapters into its weight (``W ← W + s·B·A``) and
    replace each wrapper by its base layer, in place: the model computes what it computed
    (the quantizer saw the merged weight all along), with one weight per layer, as peft's
    ``merge_and_unload`` leaves a float model. Returns the model (a new object only when
    the model itself was a wrapper)."""
    for _, wrapper in lora_wrappers(model):
        if getattr(wrapper, "_blendq_merged", False):
            wrapper.merge()  # the delta into the base layer's Parameter (layers._merged_merge)
    return _unwrap_adapters(model)


class _LinkTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BlendMixin | QuantMixin | BlendSite | QuantSite |
                          nn.modules.batchnorm._BatchNorm) or \
            super().is_leaf_module(m, qualname)


def link_batch_norms(model: nn.Module) -> int:
    """Link every batch norm whose input is a quantized layer's output, and that layer's
    only consumer, to the layer (the pairs export folds together): evaluation then
    rounds the folded bias to whole accumulator units, as int8 runtimes do. Called by
    :func:`prepare` and :func:`convert`; returns the number of links.

    The model is traced with ``torch.fx``. Where a module cannot be traced (a forward
    with data-dependent control flow, shape arithmetic), its children are tried in
    turn, and inside a module that still cannot be traced a batch norm registered right
    after a quantized layer, with as many channels as the layer has outputs, is linked
    as a candidate: export folds a candidate only after the captured graph shows that
    the layer's output goes to that batch norm alone, and otherwise exports the linked
    pair exactly as evaluation computes it."""
    return _link_within(model, model, "")


def _holds_quantized(m: nn.Module) -> bool:
    return any(isinstance(x, BlendMixin | QuantMixin) for x in m.modules())


def _link_within(root: nn.Module, module: nn.Module, prefix: str) -> int:
    """Links inside ``module`` (named ``prefix`` in ``root``)."""
    if isinstance(module, BlendMixin | QuantMixin) or not _holds_quantized(module):
        return 0
    try:
        graph = _LinkTracer().trace(module)
    except Exception:  # torch.fx cannot trace it: its children, then registration order
        links = 0
        children = list(module.named_children())
        for name, child in children:
            links += _link_within(root, child, f"{prefix}.{name}" if prefix else name)
        for (_, layer), (name, bn) in zip(children, children[1:], strict=False):
            if _linkable(layer, bn):
                links += _link(root, layer, f"{prefix}.{name}" if prefix else name, bn, False)
        return links
    links = 0
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        layer = module.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(layer, BlendMixin | QuantMixin):
            continue
        if calls[node.target] > 1:  # a layer called twice: no single batch norm follows it
            layer.bias_folded = False
            continue
        users = list(node.users)
        target = users[0].target if len(users) == 1 and users[0].op == "call_module" else None
        bn = module.get_submodule(target) if target is not None else None
        if bn is not None and calls.get(target, 0) > 1:
            bn = None  # a batch norm called twice normalises more than this layer's output
        if _linkable(layer, bn):
            links += _link(root, layer, f"{prefix}.{target}" if prefix else target, bn, True)
        elif not isinstance(bn, _FOLDED):
            layer.bias_folded = False
    return links


_FOLDED = tuple(FOLDED_BN_MAP.values())


def _linkable(layer: nn.Module, bn: nn.Module | None) -> bool:
    if not isinstance(layer, BlendMixin | QuantMixin) or not layer._kind.integer_bias:
        return False
    if type(bn) not in FOLDED_BN_MAP and not isinstance(bn, _FOLDED):
        return False
    if bn.running_mean is None:  # batch statistics in evaluation too: nothing to fold
        return False
    out_channels = getattr(layer, "out_channels", getattr(layer, "out_features", None))
    return bn.num_features == out_channels


def _link(root: nn.Module, layer: nn.Module, bn_name: str, bn: nn.Module, proven: bool) -> int:
    """Make ``bn`` (at ``bn_name`` in ``root``) a folded batch norm linked to ``layer``;
    ``proven``: the traced graph shows ``layer``'s output goes to ``bn`` alone."""
    if type(bn) in FOLDED_BN_MAP:
        bn = rebuild(bn, FOLDED_BN_MAP[type(bn)])
        _replace(root, bn_name, bn)
    bn.link(layer, proven)
    return 1


def check_weights(model: nn.Module) -> None:
    """Raise if a training projection saw NaN or inf in a weight since the last check,
    naming the layers; one host synchronisation for the whole model (the trainer checks
    at the end of every epoch, so steps never wait for it).

    Raises:
        ValueError: names each layer whose weight held NaN or inf.
    """
    layers = list(blend_layers(model))
    if not layers:
        return
    flags = torch.stack([m.w_quant.nonfinite for _, m in layers])
    if not bool(flags.any()):
        return
    bad = [name or type(m).__name__ for (name, m), f in zip(layers, flags.tolist(),
                                                              strict=True) if f]
    for _, m in layers:
        m.w_quant.nonfinite.zero_()
    raise ValueError(f"weights hold NaN or inf in layer(s) {', '.join(bad)}: training "
                     "diverged (lower the learning rate, or check the data)")


@torch.no_grad()
def telemetry(model: nn.Module, previous: dict[str, torch.Tensor] | None = None
              ) -> tuple[dict, dict[str, torch.Tensor]]:
    """What quantization does to the model now, for per-epoch metrics, and the weight
    codes to compare with next time:

    - ``w_rel_dist``: ``||w - P(w)|| / ||w||`` over all blended weights together
      (how far the latent weights are from their projection);
    - ``codes_changed``: the fraction of weight codes that differ from ``previous``
      (omitted without it);
    - ``act_clipped``: the fraction of training inputs at the ends of their grids since
      the last call (the counters are reset).
    """
    settle(model)
    dist2 = norm2 = changed = total = clipped = seen = 0.0
    codes_now = {}
    for name, m in blend_layers(model):
        w = m.latent_weight().detach()  # with LoRA adapters: the merged weight
        codes, scale = m.w_quant.eval_projection(w)
        scale = m.w_quant.per_element(scale, tuple(w.shape))
        dist2 += float((w - scale * codes).double().square().sum())
        norm2 += float(w.double().square().sum())
        codes_now[name] = codes.to(torch.int8).cpu()
        if previous is not None and name in previous:
            changed += float((previous[name] != codes_now[name]).sum())
            total += codes_now[name].numel()
    for a in _act_quantizers(model):
        clipped, seen = clipped + float(a.clipped), seen + float(a.seen)
        a.clipped.zero_()
        a.seen.zero_()
    out = {"w_rel_dist": (dist2 / norm2) ** 0.5 if norm2 > 0 else 0.0}
    if total:
        out["codes_changed"] = changed / total
    if seen:
        out["act_clipped"] = clipped / seen
    return out, codes_now


def settle(model: nn.Module) -> None:
    """Bring every activation quantizer's scale and counters up to date with the
    batches it has quantized (after a forward of a part of the model, statistics wait:
    :class:`~blendq.quantizers.ActStatistics`); ``eval()``, ``state_dict()`` and
    ``model.to()`` do so themselves. Under DDP, every rank calls it (it averages over
    the ranks)."""
    for a in _act_quantizers(model):
        a.settle()


def _act_quantizers(model: nn.Module) -> list:
    """Every activation quantizer once (a layer reading a site shares the site's)."""
    found = {id(m.a_quant): m.a_quant for m in model.modules()
             if isinstance(m, BlendMixin | BlendSite) and m.a_quant is not None}
    return list(found.values())


def _alpha_holders(model: nn.Module) -> list[nn.Module]:
    """Blended layers and sites: everything that holds an α."""
    return [m for m in model.modules() if isinstance(m, BlendMixin | BlendSite)]


def blend_layers(model: nn.Module) -> Iterator[tuple[str, BlendMixin]]:
    """``(name, layer)`` of every blended layer."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, BlendMixin))


def _require_blend(model: nn.Module) -> list[BlendMixin]:
    layers = [m for _, m in blend_layers(model)]
    if not layers:
        raise ValueError("model has no blended layers; call blendq.prepare(model, policy) first")
    return layers


def set_alpha(model: nn.Module, alpha: float) -> None:
    """Set α (0 = full precision, 1 = quantized) in every blended layer."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _require_blend(model)
    for holder in _alpha_holders(model):
        holder.alpha.fill_(alpha)


def get_alpha(model: nn.Module) -> float:
    """The smallest α over the blended layers and sites."""
    _require_blend(model)
    return min(float(m.alpha) for m in _alpha_holders(model))


class AlphaController:
    """Applies a schedule at each global step: α, and stale weight codes every ``f`` steps.

    Call ``controller.step(step)`` before the forward pass of ``step``; it holds
    no counter of its own, so a resumed run passes the step it resumes at.

    ``group``: weight refreshes of like layers run as one projection
    (:class:`~blendq.quantizers.WeightGroup`). ``defer_statistics``: each training
    batch's activation statistics enter the EMAs together when the model's forward
    returns (:class:`~blendq.quantizers.ActStatistics`); ``False`` updates each EMA
    where its batch is quantized, as a model without a controller does.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, group: bool = True,
                 after: str = "freeze", defer_statistics: bool = True) -> None:
        if after not in AFTER_ALPHA:
            raise ValueError(f"after must be one of {AFTER_ALPHA}, got {after!r}")
        self.layers = _require_blend(model)
        self.holders = _alpha_holders(model)  # layers and sites
        self.schedule = schedule
        self.after = after
        self.alpha: float | None = None  # last α applied; None: nothing applied yet
        self.groups = _weight_groups(self.layers) if group else []
        # activation statistics of a forward computed together as it returns (eager)
        self.act_stats = None
        self.bias_rounding = None  # the folded batch norms' rounding, once a step
        if defer_statistics:
            self.act_stats = ActStatistics(_act_quantizers(model), model)
            self.bias_rounding = BiasRounding([m for m in model.modules()
                                               if linked_producer(m) is not None])
        else:
            for a in _act_quantizers(model):  # as a model without a controller
                if a._stats is not None:
                    a._stats.close()

    def step(self, step: int) -> float:
        """Apply α of ``step`` and refresh the weight codes that are due: every layer of a
        group in one flat projection (the count of operations does not grow with depth),
        the others at their forward. First, activation statistics still kept (from
        forwards of a part of the model: a whole forward settles them as it returns)
        enter their EMAs, all at once (:class:`~blendq.quantizers.ActStatistics`)."""
        if self.act_stats is not None:
            self.act_stats.settle()
        alpha = self.schedule(step)
        if alpha != self.alpha:
            alphas = [m.alpha for m in self.holders]  # read now: a module move replaces them
            torch._foreach_mul_(alphas, 0.0)  # fill every α in two operations
            torch._foreach_add_(alphas, alpha)
            self.alpha = alpha
            if alpha >= 1.0 and self.after == "ste":
                _straight_through_weights(self.layers)
        for layer in self.layers:
            q = layer.w_quant
            q.__dict__["_trained"] = q.__dict__.get("_trained", 0) + 1  # eval's cache key
            if step % q.spec.quant_every == 0:
                q.stale = True
        for group in self.groups:
            if all(q.stale for q in group.quantizers):
                group.project()
        if self.bias_rounding is not None:  # computed at the forward's first batch norm
            self.bias_rounding.due()
        return alpha


def _call(model: nn.Module, batch):
    """A batch as the model takes it: a tensor, a dict of keyword inputs, or a tuple or
    list whose first element is the input (a loader's ``(x, y)``)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(batch[0])
    return model(batch)


def _shapes(batch) -> str:
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {_shapes(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, tuple | list):
        return _shapes(batch[0]) if batch else "an empty sequence"
    return str(tuple(batch.shape)) if isinstance(batch, torch.Tensor) else type(batch).__name__


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable,
              forward: Callable[[nn.Module, object], object] | None = None) -> int:
    """Post-training quantization: make a prepared model the quantized model from a few
    batches of data, with no training step.

    Every α is set to 1; weights are projected as they are (the policy's scale source:
    PPQ's least-squares scale, or ``max|w|`` with ``scale="minmax"``); each activation
    scale is computed from the batches: the mean of the batches' PPQ scales, or with
    ``scale="minmax"`` the largest batch range (what ONNX Runtime's MinMax calibration
    takes). Batch norms use their running statistics and nothing else changes. The
    result converts, exports and verifies like a trained model, and a training run may
    start from it.

    Args:
        model: a model :func:`prepare` quantized (float weights, e.g. a trained model).
        batches: an iterable of batches: a tensor (the input), a dict (keyword inputs) or
            a tuple/list whose first element is the input (as a loader yields ``(x, y)``).
        forward: ``forward(model, batch)`` for batches of another form.

    Returns:
        The number of batches used.

    Raises:
        ValueError: the model was not prepared (nothing to quantize), no batch was
            given, or a batch does not fit the model (its shapes named).
    """
    _require_blend(model)
    forward = forward or _call
    quantizers = _act_quantizers(model)
    settle(model)
    holders = _alpha_holders(model)
    # put back if a batch fails: α, and every quantizer's state (scales, LSQ steps, ...)
    owners = [m for m in model.modules() if isinstance(m, WeightQuantizer | ActQuantizer)]
    before = ([m.alpha.clone() for m in holders],
              [copy.deepcopy(q.state_dict(keep_vars=False)) for q in owners])
    stats: list[list[torch.Tensor]] = [[] for _ in quantizers]
    count = 0
    with eval_mode(model):  # modes put back after, whatever happens
        for q in quantizers:  # only the activation quantizers learn their scale
            q.train()
        set_alpha(model, 1.0)
        for count, batch in enumerate(batches, 1):
            for q in quantizers:  # each batch's own scale (the EMA starts anew)
                q.initialized.fill_(False)
                q._initialized = False
                q.__dict__.pop("_lsq_started", None)
            try:
                forward(model, batch)
            except (RuntimeError, TypeError, IndexError) as err:
                for m, alpha in zip(holders, before[0], strict=True):
                    m.alpha.copy_(alpha)
                for q, state in zip(owners, before[1], strict=True):
                    q.load_state_dict(state, strict=False)
                raise ValueError(f"calibration batch {count} ({_shapes(batch)}) does not fit "
                                 f"the model: {type(err).__name__}: {err}; the model is as "
                                 "it was") from err
            for q, seen in zip(quantizers, stats, strict=True):
                if bool(q.initialized):  # a quantizer this batch did not reach keeps none
                    seen.append(q.scale.clone())
    if count == 0:
        raise ValueError("calibrate needs at least one batch of data; got none")
    for q, seen in zip(quantizers, stats, strict=True):
        if not seen:
            raise ValueError(f"activation quantizer {q.name or '<unnamed>'} saw no batch: "
                             "the calibration batches never reach it")
        scales = torch.stack(seen)
        scale = q.source.calibrated(scales)  # PPQ: the mean; min/max: the largest
        q.scale.copy_(scale)
        q.initialized.fill_(True)
        q._initialized = True
        if q.source.learned:
            q.step.copy_(scale.reshape(q.step.shape))
            q._lsq_started = True
    return count


def _straight_through_weights(layers: list[BlendMixin]) -> None:
    """Switch AB layers' weights (and biases) to straight-through gradients. At α = 1 the
    forward value is the same (the quantized weight); AB's gradient ``1 - α`` is zero
    there, the straight-through one keeps training the latent weights."""
    for layer in layers:  # the spec stays as prepared: the method object changes mode
        layer.w_quant.method = layer.w_quant.method.at_alpha_one("ste")


def _weight_groups(layers: list[BlendMixin]) -> list[WeightGroup]:
    """The blended layers' weight quantizers grouped by bit width, granularity and
    method (groups of two or more)."""
    by_key: dict[tuple, list[BlendMixin]] = {}
    for layer in layers:
        key = WeightGroup.key(layer.w_quant)
        if key is not None and "weight_delta" not in layer.__dict__:  # LoRA: merged per step
            by_key.setdefault(key, []).append(layer)
    return [WeightGroup([m.w_quant for m in ms], functools.partial(_float_weights, ms))
            for ms in by_key.values() if len(ms) > 1]


def _float_weights(layers: list[BlendMixin]) -> list[torch.Tensor]:
    """The layers' weight Parameters as they are now (FSDP2 replaces them when it shards)."""
    return [m.float_weight for m in layers]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients inside; every module's train/eval mode put back after."""
    saved_modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, mode in saved_modes:
            m.training = mode


@contextlib.contextmanager
def alpha_view(model: nn.Module, alpha: float | None = None) -> Iterator[nn.Module]:
    """Evaluate at ``alpha`` (``None``: the current blend) in eval mode, then put back
    α and train/eval modes. Training state (EMA scales, cached codes) is untouched."""
    _require_blend(model)
    layers = _alpha_holders(model)
    saved_alpha = [m.alpha.clone() for m in layers]
    try:
        with eval_mode(model):
            if alpha is not None:
                set_alpha(model, alpha)
            yield model
    finally:
        for m, a in zip(layers, saved_alpha, strict=True):
            m.alpha.copy_(a)


@contextlib.contextmanager
def float_bias(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, biases are not rounded to accumulator units (neither a layer's own nor a
    folded batch norm's): the float-bias view, to measure what the rounding costs."""
    layers = [m for m in model.modules() if isinstance(m, BlendMixin | QuantMixin)]
    try:
        for m in layers:
            m.round_bias = False
        yield model
    finally:
        for m in layers:
            m.__dict__.pop("round_bias", None)


def freeze_batch_norms(model: nn.Module, frozen: bool = True) -> int:
    """Batch norms use (and stop updating) their running statistics in training when
    ``frozen``: late in quantization-aware training, so the rescale and the folded,
    rounded bias the integer model uses are what training optimises. The model's
    ``train()`` unfreezes them; the trainer freezes them again from its freeze step.
    Returns the number of batch norms."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.train(model.training and not frozen)
    return len(norms)


def full_precision(model: nn.Module):
    """View at α = 0: the full-precision weights (Figure 4's first curve)."""
    return alpha_view(model, 0.0)


def quantized(model: nn.Module):
    """View at α = 1: the quantized model (Figure 4's second curve)."""
    return alpha_view(model, 1.0)


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Freeze a model at α = 1 into integer codes (int8 storage) and float scales.

    The result computes exactly what the model computes in eval mode at α = 1.

    Raises:
        ValueError: a layer's α is below 1, an activation scale was never
            calibrated, or the model has no blended layers.
    """
    layers = list(blend_layers(model))
    if not layers:
        raise ValueError("model has no blended layers; call blendq.prepare(model, policy) first")
    settle(model)
    for name, layer in layers:
        if float(layer.alpha) < 1.0:
            raise ValueError(
                f"layer {name} has alpha={float(layer.alpha):.4g}; convert needs "
                "alpha = 1 (finish the alpha schedule or call set_alpha(model, 1.0))"
            )
        if layer.a_quant is not None and not bool(layer.a_quant.initialized):
            raise ValueError(
                f"layer {name}: activation scale never calibrated; run training "
                "(or forward passes in train mode) before convert"
            )
    for name, site in sites(model):
        if float(site.alpha) < 1.0 or not bool(site.a_quant.initialized):
            raise ValueError(
                f"quantization site {name} has alpha={float(site.alpha):.4g}"
                + ("" if bool(site.a_quant.initialized) else " and was never calibrated")
                + "; convert needs alpha = 1 and a calibrated scale (set_alpha(model, 1.0) "
                "after training forwards)")
    if not inplace:
        model = copy.deepcopy(model)
    for name, layer in list(blend_layers(model)):
        model = _replace(model, name, quant_class(layer).from_blend(layer))
    for name, site in sites(model):
        model = _replace(model, name, QuantSite.from_blend(site))
    model = _unwrap_adapters(model)  # the adapters are inside the converted weights
    link_batch_norms(model)
    return model.eval()


@dataclass(frozen=True)
class LayerRow:
    name: str
    type: str
    w_bits: int | None
    a_bits: int | None
    granularity: str
    method: str
    alpha: float | None
    params: int
    fate: str = "quantized"  # "quantized", "float (policy)" or "float: <why>"
    # the training path of the input's activation quantizer on the layer's device
    # (ActQuantizer.path: "fused", "cpu-native", "eager", "lsq", "sign"); "" where none
    path: str = ""


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _float_fate(m: nn.Module) -> str:
    kind = layer_kind(m)
    if not isinstance(kind, str):
        return "float (policy)"
    if isinstance(m, _NORMS) or "Norm" in type(m).__name__:
        return "float: normalisation (folded into the layer before it where possible)"
    params = ", ".join(n for n, _ in m.named_parameters(recurse=False))
    return f"float: {kind} (holds {params})"


def _granularity(per_channel: bool, group_size: int | None, scale: torch.Tensor) -> str:
    """``"layer"``, ``"channel"``, ``"group G"``, or where every row fits one block,
    ``"channel (rows <= group G)"``: block scales that are per-channel scales."""
    if group_size is None:
        return "channel" if per_channel else "layer"
    if scale.dim() == 2 and scale.shape[1] == 1:
        return f"channel (rows <= group {group_size})"
    return f"group {group_size}"


def summary(model: nn.Module) -> list[LayerRow]:
    """One row per module that holds parameters of its own: quantized (blended or
    converted), float by policy, or float because blendq does not quantize it (why)."""
    rows = []
    wrappers = [n for n, _ in lora_wrappers(model)]
    merged = {f"{n}.base_layer" for n, m in lora_wrappers(model)
              if getattr(m, "_blendq_merged", False)}
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, BlendMixin):
            w, a = m.w_quant.spec, m.a_quant
            gran = _granularity(w.per_channel, w.group_size, m.w_quant.scale) + \
                (", int8 matmul" if w.int8_matmul else "")
            method = w.method + ("" if a is None else f"/{a.spec.method}")
            fate = "quantized: the merged weight W + s·B·A (LoRA)" if name in merged \
                else "quantized"
            rows.append(LayerRow(name, type(m).__name__, w.bits, a and a.spec.bits, gran,
                                 method, float(m.alpha), sum(p.numel() for p in own), fate,
                                 _act_path(a, m.float_weight)))
        elif own and wrappers and lora_part(name, wrappers):
            owner = next(w for w in wrappers if lora_part(name, [w]))
            fate = ("float: LoRA adapter, trained through the quantized merged weight"
                    if f"{owner}.base_layer" in merged else
                    "float: LoRA adapter of a layer the policy leaves float")
            rows.append(LayerRow(name, type(m).__name__, None, None, "-", "float", None,
                                 sum(p.numel() for p in own), fate))
        elif isinstance(m, QuantMixin):
            gran = _granularity(m.per_channel, m.group_size, m.weight_scale) + \
                (", int8 matmul" if m.int8_matmul else "")
            params = m.weight_codes.numel() + sum(p.numel() for p in own)
            rows.append(
                LayerRow(name, type(m).__name__, m.w_bits, m.a_bits, gran, "int", 1.0, params)
            )
        elif isinstance(m, BlendSite | QuantSite):
            bits = m.a_quant.spec.bits if isinstance(m, BlendSite) else m.a_bits
            method = m.a_quant.spec.method if isinstance(m, BlendSite) else "int"
            rows.append(LayerRow(name, type(m).__name__, None, bits, "tensor", method,
                                 float(getattr(m, "alpha", 1.0)), 0,
                                 "quantized (activation site)",
                                 _act_path(getattr(m, "a_quant", None), m.alpha)
                                 if isinstance(m, BlendSite) else ""))
        elif own:
            rows.append(LayerRow(name, type(m).__name__, None, None, "-", "float", None,
                                 sum(p.numel() for p in own), _float_fate(m)))
    return rows


def size_bytes(model: nn.Module) -> int:
    """Deployed size: quantized weights packed at their bit width (``ceil(bits·n/8)``)
    plus float32 scales, and every other parameter and BN statistic in float32."""
    total = 0
    packed = set()
    for m in model.modules():
        if isinstance(m, BlendMixin):
            bits, w, n_scales = m.w_quant.spec.bits, m.float_weight, m.w_quant.scale.numel()
        elif isinstance(m, QuantMixin):
            bits, w, n_scales = m.w_bits, m.weight_codes, m.weight_scale.numel()
        else:
            continue
        total += -(-bits * w.numel() // 8) + 4 * n_scales
        packed.add(id(w))
    for p in model.parameters():
        total += 0 if id(p) in packed else 4 * p.numel()
    for name, b in model.named_buffers():
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "act_scale"):
            total += 4 * b.numel()
        elif name.endswith("a_quant.scale"):
            total += 4
    return total


def _act_path(quantizer, on: torch.Tensor) -> str:
    """The training path of ``quantizer`` for a float32 batch on ``on``'s device
    (``""``: no activation quantizer; ``"?"``: the execution policy refuses it)."""
    if quantizer is None:
        return ""
    try:
        return quantizer.path(on.device, torch.float32,
                              deferred=quantizer.defers_statistics())
    except ValueError:
        return "? (refused: see ActQuantizer.path)"


def format_summary(model: nn.Module) -> str:
    """:func:`summary` as a fixed-width text table."""
    head = ("layer", "type", "w_bits", "a_bits", "scale", "method", "act path", "alpha",
            "params", "fate")
    body = [
        (
            r.name or "<root>",
            r.type,
            _s(r.w_bits, "fp32"),
            _s(r.a_bits, "fp32"),
            r.granularity,
            r.method,
            r.path or "-",
            _s(r.alpha and round(r.alpha, 4), "-"),
            f"{r.params:,}",
            r.fate,
        )
        for r in summary(model)
    ]
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        for row in [head, *body]
    ]
    return "\n".join(lines)


def _s(value, none: str) -> str:
    return none if value is None else str(value)
