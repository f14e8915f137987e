"""Training engine: configuration, loop, checkpoints, metrics."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .compare import compare_methods
from .config import TrainConfig, load_recipe, recipe_names
from .trainer import RunResult, calibrate_run, evaluate, evaluate_run, load_run_model, train

__all__ = ["CheckpointError", "RunResult", "TrainConfig", "calibrate_run", "compare_methods",
           "evaluate",
           "evaluate_run",
           "load_checkpoint",
           "load_recipe", "load_run_model", "recipe_names", "save_checkpoint", "train"]
