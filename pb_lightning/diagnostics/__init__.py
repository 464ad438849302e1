"""Diagnostics that observe the cycle without deciding anything: the capacity test.

Each is a :class:`~pb_lightning.cycle.observers.CycleObserver` of the
:class:`~pb_lightning.cycle.driver.CycleDriver`, so it runs the same way under the Lightning
callback and the plain-PyTorch tracker. No Lightning here.
"""
