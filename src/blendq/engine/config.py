"""Training configuration: one frozen dataclass, loadable from TOML recipes.

A recipe may name a ``base`` recipe and list only what differs (variants as
deltas). Bundled recipes live in ``blendq/recipes/``; ``--config NAME`` finds
them by name, ``--config PATH`` reads a file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import methods
from ..functional import NONE_WORDS
from ..policy import QuantPolicy
from ..schedules import Schedule, cubic, exponential, linear
from ..transform import AFTER_ALPHA

__all__ = ["TrainConfig", "load_recipe", "recipe_names", "RECIPE_DIR"]

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
_OPTIMIZERS = ("sgd", "adam")
_LR_SCHEDULES = ("cosine", "step", "constant", "onecycle")
_ALPHA_SCHEDULES = ("cubic", "linear", "exponential")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; written to ``config.json`` in the run directory.

    ``alpha_window``: ``[T0, T1]`` of the α ramp (eq. 6) — fractions of the total
    steps when both are <= 1, else steps. Default ``[0, 1]``: α reaches 1 at the last
    step, which beat ending at 0.75 or 0.5 of the run in the Fashion-MNIST study
    (docs/results.md §6). ``method="ste"`` and ``"lsq"``
    quantize at once from ``T0`` (α jumps to 1 there); ``quantize=False`` trains fp32.
    ``ab_after``: what AB's weights do once α = 1: ``"freeze"`` (the paper; their
    gradient ``1 - α`` is zero) or ``"ste"`` (go on training them straight-through).
    ``distill``: the weight of a distillation loss from the float model (``init_from``,
    frozen, eval mode, on the same batch; :mod:`blendq.distill`) mixed with the labels'
    cross-entropy as ``(1 - distill)·CE + distill·KD`` at ``distill_temperature``;
    ``None``: labels only.
    ``bn_freeze``: from this point of a quantized run (a fraction of the total steps when
    <= 1, else a step) batch norms use and keep their running statistics, so the last
    part of training computes what the integer model computes; ``None``: never.
    """

    model: str = "digits_cnn"
    model_args: dict = field(default_factory=dict)
    data: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    quantize: bool = True
    w_bits: int = 4
    a_bits: int | None = 8
    per_channel: bool = False
    group_size: int | None = None
    scale: str = "ppq"
    method: str = "ab"
    act_method: str = "ste"
    binary_scale: bool = True
    first_layer: Any = None
    depthwise: Any = None
    last_layer: Any = None
    overrides: dict = field(default_factory=dict)
    skip: tuple = ()
    alpha_schedule: str = "cubic"
    alpha_window: tuple = (0.0, 1.0)
    alpha_every: int = 1
    alpha_rate: float = 1e-3
    ab_after: str = "freeze"
    quant_every: int = 1
    embedding: int | None = None
    clip_latent: bool = False
    bn_freeze: float | None = 0.9
    distill: float | None = None
    distill_temperature: float = 2.0
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    lr_step_epochs: int = 30
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    train_subset: int | None = None
    test_subset: int | None = None
    init_from: str | None = None
    eval_views: bool = True
    workers: int = 0
    skip_bad_images: bool = False

    def __post_init__(self) -> None:
        # TOML has no null: "none" stands for float activations (a_bits None).
        object.__setattr__(self, "a_bits", _none(self.a_bits))
        object.__setattr__(self, "embedding", _none(self.embedding))
        for name in ("first_layer", "depthwise", "last_layer"):
            object.__setattr__(self, name, _none(getattr(self, name)))
        object.__setattr__(self, "overrides", {k: _none(v) for k, v in self.overrides.items()})
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "alpha_window", tuple(self.alpha_window))
        object.__setattr__(self, "bn_freeze", _none(self.bn_freeze))
        if self.bn_freeze is not None and (isinstance(self.bn_freeze, bool) or not isinstance(
                self.bn_freeze, int | float) or self.bn_freeze < 0):
            raise ValueError(f"bn_freeze must be a number >= 0 or none, got {self.bn_freeze!r}")
        _choice("optimizer", self.optimizer, _OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, _LR_SCHEDULES)
        _choice("alpha_schedule", self.alpha_schedule, _ALPHA_SCHEDULES)
        _choice("ab_after", self.ab_after, AFTER_ALPHA)
        _choice("amp", self.amp, ("auto", "bf16", "off"))
        _choice("compile_mode", self.compile_mode, ("default", "reduce-overhead",
                                                    "max-autotune"))
        _choice("channels_last", str(self.channels_last), ("auto", "on", "off"))
        for name in ("epochs", "batch_size", "alpha_every", "quant_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if len(self.alpha_window) != 2 or not 0 <= self.alpha_window[0] <= self.alpha_window[1]:
            raise ValueError(f"alpha_window must be [T0, T1] with 0 <= T0 <= T1, "
                             f"got {list(self.alpha_window)}")
        for name in ("lr", "momentum", "weight_decay", "alpha_rate", "lr_gamma", "warmup_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer or none, got {value!r}")
        object.__setattr__(self, "distill", _none(self.distill))
        if self.distill is not None:
            if isinstance(self.distill, bool) or not isinstance(self.distill, int | float) \
                    or not 0 <= self.distill <= 1:
                raise ValueError(f"distill must be a weight in [0, 1] or none, got "
                                 f"{self.distill!r}")
            if not self.init_from:
                raise ValueError("distill learns from the float model: it needs init_from "
                                 "(--init-from FLOAT_RUN), the teacher")
        if not (isinstance(self.distill_temperature, int | float)
                and self.distill_temperature > 0):
            raise ValueError(f"distill_temperature must be > 0, got "
                             f"{self.distill_temperature!r}")
        if self.quantize:
            self.policy()  # validates bits, methods, rules

    def policy(self) -> QuantPolicy:
        """The :class:`QuantPolicy` of this run: every policy field this config holds
        (same names), so a field added to the policy needs one line here, its default."""
        own = {f.name for f in dataclasses.fields(self)}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(QuantPolicy)
                  if f.name in own}
        values["overrides"] = {k: _tuple(v) for k, v in values["overrides"].items()}
        for name in ("first_layer", "depthwise", "last_layer"):
            values[name] = _tuple(values[name])
        return QuantPolicy(**values)

    def window_steps(self, total_steps: int) -> tuple[int, int]:
        """The α window in steps; a window given as fractions ends by the run's last step
        (``T1 = 1.0``: α reaches exactly 1 there, so the run ends quantized)."""
        t0, t1 = self.alpha_window
        if t1 <= 1:  # fractions of the run
            last = max(total_steps - 1, 0)
            end = min(round(t1 * total_steps), last)
            return min(round(t0 * total_steps), end), end
        return int(t0), int(t1)

    def freeze_step(self, total_steps: int) -> int | None:
        """The step from which batch norms are frozen (``None``: never, or fp32)."""
        if not self.quantize or self.bn_freeze is None:
            return None
        f = self.bn_freeze
        return round(f * total_steps) if f <= 1 else int(f)

    def alpha(self, total_steps: int) -> Schedule:
        """The α schedule of this run (STE: a jump to 1 at ``T0``)."""
        t0, t1 = self.window_steps(total_steps)
        if not methods.get(self.method).blends:
            return cubic(t0, t0)
        if self.alpha_schedule == "exponential":
            return exponential(self.alpha_rate, t0, self.alpha_every)
        make = cubic if self.alpha_schedule == "cubic" else linear
        return make(t0, t1, self.alpha_every)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - {"base", "description", "target"})
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _none(value):
    if isinstance(value, str) and value.lower() in NONE_WORDS:
        return None
    if isinstance(value, list | tuple):
        return [_none(v) for v in value]
    return value


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"recipe {path}: TOML syntax error: {err}") from None


def _find_recipe(name: str | Path, relative_to: Path | None = None) -> Path:
    path = Path(name)
    candidates = [path, RECIPE_DIR / f"{name}.toml"]
    if relative_to is not None:
        candidates.insert(0, relative_to / path)
        candidates.insert(1, relative_to / f"{name}.toml")
    for c in candidates:
        if c.is_file():
            return c
    raise ValueError(f"config {str(name)!r} not found: give a TOML file or one of the bundled "
                     f"recipes: {', '.join(recipe_names())}")


def load_recipe(name: str | Path, _seen: tuple = ()) -> dict:
    """The merged key/values of a recipe and its ``base`` chain (base first)."""
    path = _find_recipe(name)
    if path in _seen:
        raise ValueError(f"recipe {path} includes itself through 'base'")
    values = _read_toml(path)
    base = values.pop("base", None)
    if base is None:
        return values
    merged = load_recipe(_find_recipe(base, path.parent), (*_seen, path))
    merged.update(values)
    return merged
