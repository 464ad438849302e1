"""What a PerforatedCallback run leaves behind: logger metrics, the history file, the plot, the report.

The history itself is the driver's (:class:`~pb_lightning.reporting.recorder.HistoryRecorder`,
the same for the tracker); this module publishes it the Lightning way. Everything here runs on
global rank 0 only, and writes files only into the run's logger directory (or an explicit
``output_dir``): a run without a logger writes no files.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from pb_lightning.cycle.decision import ACCEPT, CONTINUE, Decision, Verdict
from pb_lightning.cycle.driver import Outcome
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.engine.params import parameter_counts
from pb_lightning.engine.transitions import in_dendrite_phase
from pb_lightning.lightning.module import PerforatedModule
from pb_lightning.reporting.history import final_report, format_report, save_history
from pb_lightning.reporting.plot import PLOT_FILE, matplotlib_available, plot_history

log = logging.getLogger(__name__)


class RunRecorder:
    """Publishes the history rows: logger metrics, ``pb_history.json``, the plot and the report.

    Args:
        monitor: the monitored metric's name (for labels and the report).
        mode: ``"min"`` or ``"max"`` (a minimised positive score is plotted on a log scale).
        metric_kind: ``"accuracy"``, ``"error"`` or ``"other"`` (for the remaining-error reduction).
        output_dir: where to write ``pb_history.json``, ``pb_report.json`` and ``pb_history.png``;
            default: the trainer's logger directory.
    """

    def __init__(self, monitor: str, mode: str, metric_kind: str, output_dir: str | None) -> None:
        self.monitor = monitor
        self.mode = mode
        self.metric_kind = metric_kind
        self.output_dir = output_dir
        self._said_no_plot = False

    # ------------------------------------------------------------------ where
    def directory(self, trainer: pl.Trainer) -> Path | None:
        """The run's output directory, or None when there is no logger and no ``output_dir``."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        if trainer.logger is None:
            return None
        return Path(trainer.log_dir) if trainer.log_dir is not None else None

    # ------------------------------------------------------------------ recording
    def start(
        self, trainer: pl.Trainer, module: PerforatedModule, settings: dict[str, Any], schedule: PhaseSchedule
    ) -> None:
        """At fit start: send the callback's settings to the loggers.

        The loggers' hparams: ``settings`` (the callback's own), the schedule and the module's
        dendrite configuration, under ``pb_lightning/``.
        """
        hparams = {f"pb_lightning/{k}": v for k, v in settings.items()}
        hparams.update({f"pb_lightning/schedule/{k}": v for k, v in asdict(schedule).items()})
        config = getattr(module, "dendrite_config", None)
        if config is not None:
            hparams.update({f"pb_lightning/dendrites/{k}": v for k, v in config.to_dict().items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(hparams)

    def announce(self, trainer: pl.Trainer, outcome: Outcome) -> None:
        """Say every decision that changes something at INFO (on rank 0), every one at DEBUG."""
        decision, score = cast(Decision, outcome.decision), cast(float, outcome.score)
        if decision.action != CONTINUE:
            rank_zero_info(
                f"pb_lightning epoch {trainer.current_epoch}: {decision.action} — {decision.reason} "
                f"({self.monitor}={score:.6g})"
            )
        log.debug("epoch %d: %s (%s)", trainer.current_epoch, decision.action, decision.reason)

    @staticmethod
    def show_progress(trainer: pl.Trainer, module: pl.LightningModule, machine: PhaseMachine) -> None:
        """Put the phase and the dendrite count on the progress bar, through ``LightningModule.log``.

        Logged at the end of each training epoch, after the decision: the bar shows them from
        then through the next epoch, which runs in that state. Not sent to the loggers (the
        ``pb/`` metrics carry the same numbers there).
        """
        if trainer.progress_bar_callback is None:
            return
        shown = {"dendrite_phase": in_dendrite_phase(module), "dendrites": machine.state.dendrites}
        for name, value in shown.items():
            module.log(name, float(value), prog_bar=True, logger=False, on_epoch=True, sync_dist=True, batch_size=1)

    def record(
        self,
        trainer: pl.Trainer,
        module: PerforatedModule,
        machine: PhaseMachine,
        outcome: Outcome,
        rows: list[dict[str, Any]],
    ) -> None:
        """Log the metrics of one decision, and on a restructure rewrite the files from ``rows``.

        With them, per layer, the mean and max over neurons of the best candidate correlation
        (``outcome.candidates``, empty outside dendrite phases).
        """
        decision = cast(Decision, outcome.decision)
        metrics = self._metrics(module, machine, decision)
        for name, (mean, best) in outcome.candidates.items():
            metrics[f"pb/candidate_correlation_mean/{name}"] = mean
            metrics[f"pb/candidate_correlation_max/{name}"] = best
        self._log_metrics(trainer, metrics)
        if decision.action != CONTINUE:
            self.write(trainer, rows)

    def finish(self, trainer: pl.Trainer, rows: list[dict[str, Any]], extra: list[str]) -> dict:
        """At fit end (after the final restore and the closing row): the report, logged and written."""
        report = final_report(rows, monitor=self.monitor, metric_kind=self.metric_kind, mode=self.mode)
        rank_zero_info("\n".join([format_report(report), *extra]))
        numbers = {
            f"pb/report/{key}": float(value)
            for key, value in report.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None
        }
        self._log_metrics(trainer, numbers)
        self.write(trainer, rows, report)
        return report

    @staticmethod
    def _metrics(module: PerforatedModule, machine: PhaseMachine, decision: Decision) -> dict[str, float]:
        counts = parameter_counts(module)
        layers = module.perforated_layers()
        metrics = {
            "pb/dendrite_phase": float(module.in_dendrite_phase),
            "pb/dendrites_total": float(sum(layer.num_dendrites for layer in layers)),
            "pb/parameters_original": float(counts["original"]),
            "pb/parameters_dendrites": float(counts["dendrites"]),
            "pb/parameters_total": float(counts["total"]),
        }
        for layer in layers:
            metrics[f"pb/dendrites/{layer.name}"] = float(layer.num_dendrites)
        # Events: 1 at the epoch where dendrites were accepted, or where a cycle was rejected
        # (from the decision's verdict, never from its reason text).
        metrics["pb/event/dendrites_accepted"] = float(decision.action == ACCEPT)
        metrics["pb/event/cycle_rejected"] = float(decision.verdict == Verdict.REJECTED)
        return metrics

    @staticmethod
    def _log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ files
    def write(self, trainer: pl.Trainer, rows: list[dict[str, Any]], report: dict[str, Any] | None = None) -> None:
        """Write the history (and report) and redraw the plot, on rank 0, if there is a directory."""
        directory = self.directory(trainer)
        if directory is None or not trainer.is_global_zero:
            return
        save_history(directory, rows, report)
        if not matplotlib_available():
            if not self._said_no_plot:
                rank_zero_warn(
                    "pb_lightning: matplotlib is not installed, so no history plot is drawn "
                    "(pip install 'pb_lightning[plot]'); the history is in pb_history.json."
                )
                self._said_no_plot = True
            return
        plot_history(rows, directory / PLOT_FILE, monitor=self.monitor, mode=self.mode)
        log.debug("Wrote the history and plot to %s", directory)
