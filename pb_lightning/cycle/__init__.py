"""The phase cycle: the schedule, the state machine that turns validation scores into decisions,
the controller that applies them to a model's weights, and :class:`~pb_lightning.cycle.driver.CycleDriver`,
which runs all of it for any front end.

Plain Python and torch, no Lightning: the same driver runs under the Lightning callback and
:class:`~pb_lightning.loops.tracker.PerforatedTracker`.
"""
