"""Quantization sites apart from weight layers, found in a ``torch.fx`` capture.

An int8 runtime keeps a tensor in integers where every reader of it is an integer
kernel: the inputs of a residual add (``QLinearAdd``), of a concatenation
(``QLinearConcat``) and of an average pool (``QLinearGlobalAveragePool``), besides
the inputs of convolutions and matrix products. A weight layer quantizes its own
input; :func:`place_sites` quantizes the others. Each module's own ``forward`` is
captured with ``torch.fx`` (its children as leaves, so the capture is local and
small), and wherever an add, a concatenation or an average pool reads a tensor that
is not quantized yet, a :class:`~blendq.layers.BlendSite` is inserted right after the
tensor's producer and every reader of the tensor reads the site's output: one
tensor, one quantization, one scale. A weight layer that reads a site's output
(directly, or through max pooling, flattening or reshaping, which keep the grid)
shares the site's quantizer instead of quantizing again.

The module keeps its class and its state-dict keys (the sites are added under
``quant_sites``); its ``forward`` becomes the captured one with the sites in it (a
subclass generated per instance). A module whose ``forward`` cannot be captured
(data-dependent control flow, or a capture that depends on ``self.training``) keeps
its ``forward``: its children are tried in turn, and one warning names the modules
where adds or concatenations may stay float.
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings

import torch
import torch.fx
from torch import nn
from torch.nn import functional as TF

from .converted import QuantMixin, QuantSite
from .layers import BlendMixin, BlendSite, runtime_add
from .quantizers import ActSpec

__all__ = ["place_sites", "sites", "SiteTracer"]

_ADDS = {operator.add, operator.iadd, torch.add, runtime_add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_POOL_FUNCTIONS = {TF.adaptive_avg_pool1d, TF.adaptive_avg_pool2d, TF.adaptive_avg_pool3d,
                   TF.avg_pool1d, TF.avg_pool2d, TF.avg_pool3d}
# operations that keep every value on its grid: a layer reading their output reads the grid
_KEEP_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity)
_KEEP_FUNCTIONS = {TF.max_pool1d, TF.max_pool2d, TF.max_pool3d, torch.flatten,
                   torch.reshape}
_KEEP_METHODS = {"flatten", "view", "reshape", "contiguous"}
_SHAPE_METHODS = {"size", "dim", "numel", "__len__"}
_QUANTIZED = (BlendMixin, BlendSite, QuantMixin, QuantSite)


class SiteTracer(torch.fx.Tracer):
    """Captures one module's own ``forward``: every child is a leaf."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.root_module = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.root_module


def sites(model: nn.Module) -> list[tuple[str, BlendSite | QuantSite]]:
    """``(name, site)`` of every quantization site apart from weight layers."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BlendSite | QuantSite)]


def place_sites(model: nn.Module, spec: ActSpec) -> int:
    """Insert a :class:`~blendq.layers.BlendSite` (quantizing with ``spec``) on every input
    of an add, a concatenation or an average pool that is not quantized yet, in every
    module whose ``forward`` ``torch.fx`` captures; returns the number of sites. An
    average-pool module that no capture showed (its parent's forward could not be
    captured) holds a site for its input, like a weight layer. Warns, naming them,
    about modules whose own ``forward`` could not be captured."""
    skipped: list[str] = []
    seen: set[int] = set()  # pool modules a capture showed
    count = _place_within(model, "", spec, skipped, seen)
    for name, m in list(model.named_modules()):
        parent = model.get_submodule(name.rpartition(".")[0]) if name else None
        if isinstance(m, _POOL_MODULES) and id(m) not in seen and parent is not None and \
                _holds_layers(parent):  # a pool among quantized layers, never captured
            count += _site_in_front(m, spec)
    if skipped:
        shown = "; ".join(skipped[:6]) + (f"; and {len(skipped) - 6} more"
                                          if len(skipped) > 6 else "")
        warnings.warn(f"blendq: the forward of these modules could not be captured with "
                      f"torch.fx, so residual adds or concatenations inside them (if any) "
                      f"keep weight-layer-input placement and stay float in the deployed "
                      f"graph: {shown}", stacklevel=3)
    return count


def _holds_layers(m: nn.Module) -> bool:
    return any(isinstance(x, BlendMixin) for x in m.modules())


def _place_within(module: nn.Module, prefix: str, spec: ActSpec, skipped: list[str],
                  seen: set[int]) -> int:
    if isinstance(module, _QUANTIZED) or not _holds_layers(module):
        return 0
    count = sum(_place_within(child, f"{prefix}.{name}" if prefix else name, spec, skipped,
                              seen) for name, child in module.named_children())
    if not isinstance(module, nn.Sequential) and \
            type(module).forward.__module__.startswith("torch."):
        return count  # a torch module (container, attention): nothing of its own to see
    if getattr(module, "_blendq_merged", False):
        return count  # a LoRA wrapper whose forward is its base layer's
    if isinstance(module, nn.Sequential):  # its elements keep their indices: sites go in front
        pools = [m for i, m in enumerate(module) if i > 0 and isinstance(m, _POOL_MODULES)]
        seen.update(id(m) for m in pools)
        return count + sum(_site_in_front(m, spec) for m in pools)
    graph, why = _capture(module)
    if graph is None:
        skipped.append(f"{prefix or '<root>'} ({type(module).__name__}: {why})")
        return count
    seen.update(id(module.get_submodule(n.target)) for n in graph.nodes
                if n.op == "call_module")
    return count + _rewrite(module, graph, spec)


def _site_in_front(pool: nn.Module, spec: ActSpec) -> int:
    """``pool`` quantizes its input with a site it holds (``pool.quant_site``), so a
    Sequential's indices and length stay as they were."""
    if "quant_site" in pool._modules:
        return 0
    pool.quant_site = BlendSite(spec, name=f"{type(pool).__name__}.input").to(_device(pool))
    pool.__class__ = _pool_class(type(pool))
    return 1


@functools.cache  # one class per pool class, shared by copies and unpickled models
def _pool_class(base: type) -> type:
    return type(base.__name__, (base,), {"forward": _site_then_forward, "_blendq_base": base,
                                         "__module__": base.__module__,
                                         "__reduce_ex__": _reduce_pool})


def _site_then_forward(self, input):
    return self._blendq_base.forward(self, self.quant_site(input))


def _reduce_pool(self, protocol):
    return (_make_pool, (type(self)._blendq_base,), self.__dict__)


def _make_pool(base: type) -> nn.Module:
    cls = _pool_class(base)
    return cls.__new__(cls)


def _capture(module: nn.Module) -> tuple[torch.fx.Graph | None, str]:
    """The graph of ``module``'s own forward, or ``None`` and why not. The rewritten
    forward must compute what the old one computes for every call, so a capture that
    changes with ``self.training`` or with the optional arguments (a branch on
    ``mask is None`` is taken once, at capture) is refused."""
    modes = [(m, m.training) for m in module.modules()]  # each module's own mode, restored
    optional = {name: p.default for name, p in
                inspect.signature(type(module).forward).parameters.items()
                if p.default is not inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:
        codes, shapes = [], []
        for mode, concrete in ((True, None), (False, None), (module.training, optional or None)):
            module.train(mode)
            graph = SiteTracer(module).trace(module, concrete_args=concrete)
            nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")
                     and "_assert_is_none" not in str(n.target)]
            shapes.append([(n.op, str(n.target)) for n in nodes])
            codes.append([(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in nodes])
        if codes[0] != codes[1]:  # a branch, or a value such as dropout's training=...
            return None, "its forward reads self.training"
        if shapes[2] != shapes[0]:
            return None, "its forward branches on an optional argument"
        for m, mode in modes:
            m.training = mode
        return SiteTracer(module).trace(module), ""
    except Exception as err:  # torch.fx's reason, in one line
        return None, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:120]}"
    finally:
        for m, mode in modes:
            m.training = mode


def _is_shape(n: torch.fx.Node) -> bool:
    """Whether an fx value is a size or a number computed from one, not a tensor."""
    if n.op == "call_method" and n.target in _SHAPE_METHODS:
        return True
    if n.op == "call_function" and n.target in (getattr, len):
        return True
    if n.op == "call_function" and n.target in (operator.getitem, operator.add, operator.mul,
                                                operator.sub, operator.floordiv):
        return any(isinstance(a, torch.fx.Node) and _is_shape(a) for a in n.args)
    return False


def _integer_inputs(module: nn.Module, n: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensors ``n`` reads that an int8 runtime wants quantized (none: not such an op)."""
    if (n.op == "call_function" and n.target in _ADDS) or \
            (n.op == "call_method" and n.target in _ADD_METHODS):
        args = n.args[:2]
        if len(args) == 2 and all(isinstance(a, torch.fx.Node) and not _is_shape(a)
                                  for a in args) and "alpha" not in n.kwargs and \
                any(_from_layers(module, a) for a in args):
            return list(args)
        return []
    if n.op == "call_function" and n.target in _CATS and n.args and \
            isinstance(n.args[0], list | tuple) and len(n.args[0]) > 1:
        parts = list(n.args[0])
        feature_maps = all(isinstance(a, torch.fx.Node) for a in parts) and \
            any(_from_layers(module, a) for a in parts)
        return parts if feature_maps else []
    if (n.op == "call_function" and n.target in _POOL_FUNCTIONS) or \
            (n.op == "call_module" and isinstance(module.get_submodule(n.target), _POOL_MODULES)):
        return [n.args[0]] if isinstance(n.args[0], torch.fx.Node) else []
    return []


# elementwise steps through which a feature map stays one (an attention score, a mask or
# a product of two activations is not one)
_FEATURE_FUNCTIONS = {TF.relu, torch.relu, TF.relu6, TF.gelu, TF.silu, TF.hardtanh,
                      TF.hardswish, TF.leaky_relu, TF.dropout, *_ADDS, *_CATS, *_KEEP_FUNCTIONS,
                      *_POOL_FUNCTIONS}
_FEATURE_METHODS = {"relu", "relu_", *_ADD_METHODS, *_KEEP_METHODS}


def _from_layers(module: nn.Module, n, depth: int = 0) -> bool:
    """Whether the value ``n`` is a feature map computed by quantized layers: a layer's
    (or a module holding layers', or a site's) output, through normalisations,
    activations, pooling, reshapes and adds. A residual add qualifies when one operand
    does; an attention mask added to scores does not (scores come from a matmul)."""
    if not isinstance(n, torch.fx.Node) or depth > 16:
        return False
    if n.op == "call_module":
        if str(n.target).startswith("quant_sites."):  # a site placed in this pass
            return True
        m = module.get_submodule(n.target)
        if isinstance(m, _QUANTIZED) or _holds_layers(m):
            return True
        return bool(n.args) and _from_layers(module, n.args[0], depth + 1)
    if (n.op == "call_function" and n.target in _FEATURE_FUNCTIONS) or \
            (n.op == "call_method" and n.target in _FEATURE_METHODS):
        args = [a for arg in n.args for a in (arg if isinstance(arg, list | tuple) else [arg])]
        return any(_from_layers(module, a, depth + 1) for a in args)  # cat: a list
    return False


def _keeps_grid(module: nn.Module, n: torch.fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(module.get_submodule(n.target), _KEEP_MODULES)
    if n.op == "call_function":
        return n.target in _KEEP_FUNCTIONS
    return n.op == "call_method" and n.target in _KEEP_METHODS


def _source(module: nn.Module, n: torch.fx.Node) -> torch.fx.Node:
    """Walk back from ``n`` across operations that keep the grid."""
    while _keeps_grid(module, n) and isinstance(n.args[0], torch.fx.Node):
        n = n.args[0]
    return n


def _rewrite(module: nn.Module, graph: torch.fx.Graph | None, spec: ActSpec) -> int:
    """Insert the sites into ``graph`` and make it ``module``'s forward."""
    if graph is None:
        return 0
    placed: dict[torch.fx.Node, BlendSite] = {}
    sites_dict = module._modules.get("quant_sites") or nn.ModuleDict()
    module.quant_sites = sites_dict  # registered first: the walks below resolve sites

    def place(value: torch.fx.Node) -> None:
        source = _source(module, value)
        if source in placed or value in placed or _site_of(module, source) is not None:
            return
        key = value.name + "_" if hasattr(nn.ModuleDict, value.name) else value.name
        placed[value] = BlendSite(spec, name=f"{type(module).__name__}.{key}").to(
            _device(module))
        sites_dict[key] = placed[value]
        with graph.inserting_after(value):
            node = graph.call_module(f"quant_sites.{key}", (value,))
        value.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)

    for n in list(graph.nodes):
        for value in _integer_inputs(module, n):
            place(value)
        readers = [u for u in n.users if u.op == "call_module" and u.args and u.args[0] is n
                   and _reads_like(module.get_submodule(u.target), spec)]
        if len(readers) > 1:  # one tensor, several quantized readers: one scale for all
            place(n)
    if not placed:
        if not len(sites_dict):
            del module.quant_sites
        return 0
    for n in graph.nodes:  # adds of quantized operands: evaluation rounds them as the runtime
        if n.op == "call_function" and n.target in (operator.add, torch.add) and \
                not n.kwargs and _integer_inputs(module, n):
            n.target = runtime_add
    _share_with_layers(module, graph)
    graph.lint()
    _install_forward(module, graph)
    return len(placed)


def _device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _site_of(module: nn.Module, n: torch.fx.Node) -> BlendSite | None:
    if n.op == "call_module" and str(n.target).startswith("quant_sites."):
        return module.get_submodule(n.target)
    return None


def _reads_like(m: nn.Module, spec: ActSpec) -> bool:
    """Whether ``m``'s first layer quantizes its input as a site would (so it can share
    the site's quantizer)."""
    layer = _first_layer(m)
    return layer is not None and layer.a_quant is not None and layer.a_quant.spec == spec


def _first_layer(m: nn.Module) -> BlendMixin | None:
    """The weight layer that first reads ``m``'s input (``m`` itself, or the first
    element of a Sequential)."""
    while isinstance(m, nn.Sequential) and len(m) > 0:
        m = m[0]
    return m if isinstance(m, BlendMixin) else None


def _share_with_layers(module: nn.Module, graph: torch.fx.Graph) -> None:
    """A weight layer whose input is a site's output (across grid-keeping operations)
    quantizes with the site's quantizer and does not quantize again."""
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    for n in graph.nodes:
        if n.op != "call_module" or calls[n.target] > 1 or not n.args or \
                not isinstance(n.args[0], torch.fx.Node):
            continue
        site = _site_of(module, _source(module, n.args[0]))
        reader = module.get_submodule(n.target)
        if site is not None and _reads_like(reader, site.a_quant.spec):
            layer = _first_layer(reader)
            layer.a_quant = site.a_quant  # the same quantizer object: one scale
            layer.input_from_site = True


def _install_forward(module: nn.Module, graph: torch.fx.Graph) -> None:
    """Make ``graph`` the forward of ``module`` (a subclass of its class per instance,
    so ``isinstance`` and the other methods hold)."""
    code = torch.fx.GraphModule(module, graph)
    for n in graph.nodes:  # constants the capture made (module attributes are already there)
        if n.op == "get_attr" and not _resolves(module, n.target):
            module.register_buffer(n.target, getattr(code, n.target), persistent=False)
    python = graph.python_code("self")
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    names = {k: v for k, v in python.globals.items() if not isinstance(v, str)}
    source = "\n".join([_format_import_block(names, sys_importer)] + [
        f"{k} = {v!r}" for k, v in python.globals.items() if isinstance(v, str)]
        + [python.src])
    base = type(module).__dict__.get("_blendq_base", type(module))
    module.__class__ = _sited_class(base, source)


@functools.cache  # compiled once per (class, source): deepcopy and unpickling reuse it
def _sited_class(base: type, source: str) -> type:
    """``base`` with the forward defined by ``source`` (fx-generated code plus imports)."""
    from torch.fx.graph_module import _forward_from_src

    return type(base.__name__, (base,), {
        "forward": _forward_from_src(source, {}), "_blendq_base": base,
        "_blendq_source": source, "__module__": base.__module__,
        "__reduce_ex__": _reduce_sited})


def _reduce_sited(self, protocol):
    """Pickle (and deepcopy) by the importable base class and the forward's source."""
    cls = type(self)
    return (_make_sited, (cls._blendq_base, cls._blendq_source), self.__dict__)


def _make_sited(base: type, source: str) -> nn.Module:
    cls = _sited_class(base, source)
    return cls.__new__(cls)


def _resolves(module: nn.Module, target: str) -> bool:
    obj = module
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
