"""blendq under ``lightning.Trainer``."""

from __future__ import annotations

try:
    import lightning
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("blendq.integrations.LightningCallback needs lightning: pip install "
                      "'blendq[lightning]'") from err

from .window import AlphaWindow

__all__ = ["LightningCallback"]


class LightningCallback(lightning.Callback):
    """Steps α from ``trainer.global_step`` over ``window`` (fractions of
    ``trainer.estimated_stepping_batches``), logs ``alpha`` every step and the telemetry
    (``blendq/w_rel_dist``, ``blendq/codes_changed``, ``blendq/act_clipped``) every epoch
    with the LightningModule's own ``self.log``.

        trainer = lightning.Trainer(max_epochs=3, callbacks=[LightningCallback()])
        trainer.fit(module)        # module holds a model prepared with blendq.prepare

    Raises (at the start of fitting):
        ValueError: the module holds no blendq layers, or the run's total step count is
            unknown (an iterable dataset without ``max_steps``).
    """

    def __init__(self, window: tuple[float, float] = (0.0, 1.0), schedule: str = "cubic",
                 after: str = "freeze") -> None:
        self.alpha = AlphaWindow(window, schedule, after)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.alpha.bind(pl_module, trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        alpha = self.alpha.step(trainer.global_step)
        pl_module.log("alpha", alpha, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.alpha.settle()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log_dict(self.alpha.epoch_metrics(), on_step=False, on_epoch=True,
                           sync_dist=True)  # averaged over ranks (one reduce an epoch)
