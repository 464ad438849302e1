"""What a PerforatedCallback run leaves behind: logger metrics, the history file, the plot, the report.

Kept out of the callback so that the callback only decides and restructures. Everything here
runs on global rank 0 only, and writes files only into the run's logger directory (or an
explicit ``output_dir``): a run without a logger writes no files.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from pb_lightning.cycle.decision import ACCEPT, CONTINUE, Decision, Verdict
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.phase_state import HISTORY_KEYS
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.engine.params import parameter_counts
from pb_lightning.engine.transitions import candidate_scores, in_dendrite_phase
from pb_lightning.lightning.module import PerforatedModule
from pb_lightning.reporting.history import END, final_report, format_report, save_history
from pb_lightning.reporting.plot import PLOT_FILE, matplotlib_available, plot_history

log = logging.getLogger(__name__)


class RunRecorder:
    """Collects one history row per decision and publishes them.

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
        self.rows: list[dict[str, Any]] = []
        self.initial_parameters: int | None = None
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
        """At fit start: remember the initial size and send the callback's settings to the loggers.

        The loggers' hparams: ``settings`` (the callback's own), the schedule and the module's
        dendrite configuration, under ``pb_lightning/``.
        """
        if self.initial_parameters is None:
            self.initial_parameters = parameter_counts(module)["total"]
        hparams = {f"pb_lightning/{k}": v for k, v in settings.items()}
        hparams.update({f"pb_lightning/schedule/{k}": v for k, v in asdict(schedule).items()})
        config = getattr(module, "dendrite_config", None)
        if config is not None:
            hparams.update({f"pb_lightning/dendrites/{k}": v for k, v in config.to_dict().items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(hparams)

    def announce(self, trainer: pl.Trainer, decision: Decision, score: float) -> None:
        """Say every decision that changes something at INFO (on rank 0), every one at DEBUG."""
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
        decision: Decision,
        candidates: dict[str, tuple[float, float]],
    ) -> None:
        """Append the row of one decision, log its metrics, and on a restructure redraw the files.

        ``candidates`` holds, per layer, the mean and max over neurons of the best candidate
        correlation (empty outside dendrite phases).
        """
        entry = machine.state.history[-1]
        self.rows.append(self._row(trainer, module, machine, entry, decision.action.value, decision.reason))
        metrics = self._metrics(module, machine, decision)
        for name, (mean, best) in candidates.items():
            metrics[f"pb/candidate_correlation_mean/{name}"] = mean
            metrics[f"pb/candidate_correlation_max/{name}"] = best
        self._log_metrics(trainer, metrics)
        if decision.action != CONTINUE:
            self.write(trainer)

    def finish(self, trainer: pl.Trainer, module: PerforatedModule, machine: PhaseMachine, extra: list[str]) -> dict:
        """At fit end (after the final restore): the closing row, the report, the files."""
        end = {
            "validation": machine.state.validations,
            "global_step": trainer.global_step,
            "phase": "neuron",
            "score": machine.state.global_best,
        }
        self.rows.append(self._row(trainer, module, machine, end, END, "training ended"))
        report = final_report(self.rows, monitor=self.monitor, metric_kind=self.metric_kind, mode=self.mode)
        rank_zero_info("\n".join([format_report(report), *extra]))
        numbers = {
            f"pb/report/{key}": float(value)
            for key, value in report.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None
        }
        self._log_metrics(trainer, numbers)
        self.write(trainer, report)
        return report

    def _row(
        self,
        trainer: pl.Trainer,
        module: PerforatedModule,
        machine: PhaseMachine,
        entry: dict[str, Any],
        action: str,
        reason: str,
    ) -> dict[str, Any]:
        s = machine.state
        return {
            "epoch": trainer.current_epoch,
            "validation": entry["validation"],
            "global_step": entry.get("global_step"),
            "phase": entry["phase"],
            "score": entry["score"],
            "candidate_score": entry.get("candidate_score"),
            "action": action,
            "reason": reason,
            "dendrites": s.dendrites,
            "dendrites_per_layer": {layer.name: layer.num_dendrites for layer in module.perforated_layers()},
            "parameters": parameter_counts(module)["total"],
            "parameters_before": self.initial_parameters,
            "global_best": s.global_best,
            "cycles_accepted": s.accepted_cycles,
            "cycles_rejected": s.rejected_cycles,
        }

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
    def write(self, trainer: pl.Trainer, report: dict[str, Any] | None = None) -> None:
        """Write the history (and report) and redraw the plot, on rank 0, if there is a directory."""
        directory = self.directory(trainer)
        if directory is None or not trainer.is_global_zero:
            return
        save_history(directory, self.rows, report)
        if not matplotlib_available():
            if not self._said_no_plot:
                rank_zero_warn(
                    "pb_lightning: matplotlib is not installed, so no history plot is drawn "
                    "(pip install 'pb_lightning[plot]'); the history is in pb_history.json."
                )
                self._said_no_plot = True
            return
        plot_history(self.rows, directory / PLOT_FILE, monitor=self.monitor, mode=self.mode)
        log.debug("Wrote the history and plot to %s", directory)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "initial_parameters": self.initial_parameters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state.get("rows", []))
        self.initial_parameters = state.get("initial_parameters")


def candidate_scores_by_layer(module: PerforatedModule) -> dict[str, tuple[float, float]]:
    """Per layer: mean and max over neurons of each neuron's best candidate score (empty outside dendrite phases)."""
    if not in_dendrite_phase(module):
        return {}
    return {name: (float(s.mean()), float(s.max())) for name, s in candidate_scores(module).items()}


def machine_history(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The phase machine's per-validation history, rebuilt from the recorder's rows.

    One row is recorded right after each decision, so the machine's history is a projection of
    the rows: checkpoints store it once, as the rows (the closing ``end`` row is not a decision).
    """
    return [{key: row.get(key) for key in HISTORY_KEYS} for row in rows if row.get("action") != END]
