"""The phase cycle: the schedule, the state machine that turns validation scores into decisions,
and the controller that applies them to a model through :mod:`pb_lightning.engine`.

Plain Python and torch, no Lightning: the same cycle drives the Lightning callback and
:class:`~pb_lightning.loops.tracker.PerforatedTracker`.
"""
