"""``pb-lightning`` (and ``python -m pb_lightning``): a LightningCLI for perforated training runs.

Run ``pb-lightning fit --config configs/digits.yaml``. Models and data modules are chosen by
``class_path`` in the YAML; any :class:`~pb_lightning.module.PerforatedModule` works.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` defaults to ``sys.argv[1:]``)."""
    # overwrite=True: re-running a config into the same log directory must not fail on the saved
    # config.yaml (LIGHTNING_NOTES.md §5).
    return LightningCLI(save_config_kwargs={"overwrite": True}, args=args)


def console() -> None:
    """Entry point of the ``pb-lightning`` command (returns nothing, so the exit status is 0)."""
    main()
