"""What restructuring a model mid-fit asks of the Lightning strategy, in one adapter.

After every change of the trainable parameter set the model must be converted to the precision
plugin's dtype, re-wrapped under DDP (its reducer knows only the parameters that required grad
when it was built), given a new optimizer from the user's ``configure_optimizers`` (schedulers
included; the :class:`~pb_lightning.cycle.driver.CycleDriver` carries optimizer state over on
request), and checked: every trainable parameter must be in that optimizer. Which strategies can
do this at all, and the process group the candidates' statistics are reduced over, are strategy
questions too. Keeping them here, in the spirit of finetuning-scheduler's strategy adapters,
leaves the callback a thin map from Lightning's hooks onto the driver.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from pb_lightning.cycle.driver import CycleDriver, missing_from_optimizers
from pb_lightning.engine.transitions import in_dendrite_phase, set_loss_scale, set_statistics_group
from pb_lightning.errors import PerforationError

#: The strategies whose parameters can grow mid-training (every rank holds the whole model).
SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)


class StrategyAdapter:
    """Checks the strategy at setup and rebuilds what it wraps after each restructure."""

    def __init__(self) -> None:
        self.statistics_group: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At ``setup("fit")``: refuse what cannot restructure, and make the statistics group."""
        strategy = trainer.strategy
        if not isinstance(strategy, SUPPORTED_STRATEGIES):
            raise PerforationError(
                f"PerforatedCallback supports single-device and DDP strategies; got {type(strategy).__name__}. "
                "Strategies that shard parameters (FSDP, DeepSpeed) cannot grow them mid-training."
            )
        if not pl_module.automatic_optimization:
            raise PerforationError(
                "PerforatedCallback needs automatic optimization (`automatic_optimization = True`): it "
                "rebuilds the optimizer from `configure_optimizers` after every restructure."
            )
        # Lightning has no public accessor for a DDP strategy's start method (2.6: only the
        # constructor argument, stored as `_start_method`), so it is read from there.
        start_method = getattr(strategy, "_start_method", "popen")
        if start_method != "popen":
            raise PerforationError(
                f"PerforatedCallback does not support strategy='ddp_{start_method}': after fit, "
                "Lightning copies the workers' weights back into the main process with "
                "load_state_dict(strict=False) and drops state it does not expect. Use strategy='ddp', "
                "which launches one process per device by re-running your script."
            )
        if isinstance(strategy, DDPStrategy) and trainer.world_size > 1 and self.statistics_group is None:
            # A group of its own for the candidates' statistics: its all-reduce runs inside the
            # backward pass, and must not queue up behind DDP's gradient buckets on the default group.
            self.statistics_group = torch.distributed.new_group()

    def fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, driver: CycleDriver) -> None:
        """At fit start: the first optimizer must hold every trainable parameter too."""
        self.check_optimizer_coverage(trainer, pl_module)
        driver.carrier.track(pl_module, trainer.optimizers)
        if self.statistics_group is not None:
            set_statistics_group(pl_module, self.statistics_group)

    def restructure(self, trainer: pl.Trainer, module: pl.LightningModule, driver: CycleDriver) -> None:
        """After the trainable parameters changed: dtype, DDP wrapper, optimizers, schedulers."""
        strategy = trainer.strategy
        # New parameters must take the precision plugin's dtype (bf16-true / 16-true); identity otherwise.
        trainer.precision_plugin.convert_module(module)
        if isinstance(strategy, DDPStrategy):
            # DDP's reducer only knows the parameters that required grad when it was built: re-wrap.
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()

        def build() -> tuple[list[torch.optim.Optimizer], list[Any]]:
            strategy.setup_optimizers(trainer)  # the user's configure_optimizers, schedulers included
            return trainer.optimizers, _schedulers(trainer)

        driver.rebuild_optimizers(module, (trainer.optimizers, _schedulers(trainer)), build)
        self.check_optimizer_coverage(trainer, module)

    @staticmethod
    def where(trainer: pl.Trainer) -> dict[str, Any]:
        """The driver's ``epoch``, ``global_step`` and ``share``: every rank takes rank 0's inputs,
        so that all ranks take the same decision."""

        def share(value: Any) -> Any:
            return trainer.strategy.broadcast(value, src=0)

        return {"epoch": trainer.current_epoch, "global_step": trainer.global_step, "share": share}

    @staticmethod
    def before_backward(trainer: pl.Trainer, module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and in_dendrite_phase(module):
            # 16-mixed: the errors reaching the candidates carry the GradScaler's scale.
            set_loss_scale(module, scaler.get_scale())

    @staticmethod
    def check_optimizer_coverage(trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Every trainable parameter must be in an optimizer, or it would silently never train."""
        missing = missing_from_optimizers(module, trainer.optimizers)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise PerforationError(
                f"After restructuring, {len(missing)} trainable parameters are not in any optimizer: {shown}. "
                "`configure_optimizers` must build a new optimizer from the module's current parameters "
                "(e.g. `self.parameters()` or `self.dendrite_parameter_groups()`). With LightningCLI, do not "
                "use `--optimizer`/`--lr_scheduler` (the CLI builds the optimizer once); take "
                "`optimizer: OptimizerCallable` in your module's __init__ and call it in configure_optimizers."
            )

    @staticmethod
    def rewrite_last_checkpoints(trainer: pl.Trainer) -> None:
        """Make ``last.ckpt`` hold the model the run leaves, after the trainer's limits ended it mid-cycle.

        The last checkpoint was written at the end of the last epoch, before the final restore
        dropped an unfinished cycle's dendrites or candidates: resuming from it, or loading it,
        would give a different model than the one ``fit`` returned. Rewritten here, it holds the
        final model and a finished phase machine, so a resume from it trains nothing.
        """
        for callback in trainer.checkpoint_callbacks:
            path = getattr(callback, "last_model_path", "")
            if getattr(callback, "save_last", None) and path:
                trainer.save_checkpoint(path, weights_only=bool(getattr(callback, "save_weights_only", False)))


def _schedulers(trainer: pl.Trainer) -> list[Any]:
    return [config.scheduler for config in trainer.lr_scheduler_configs]
