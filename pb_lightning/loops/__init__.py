"""Plain PyTorch training loops: :class:`~pb_lightning.loops.tracker.PerforatedTracker`."""
