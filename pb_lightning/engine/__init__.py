"""The engine: perforated layers at the ``nn.Module`` level, with no Lightning import.

Conversion (:mod:`~pb_lightning.engine.convert`), the layer and its dendrite banks, the candidate
pool and correlation learning of a dendrite phase, phase transitions on a model, parameter roles,
persistence and the inference form. Nothing here imports :mod:`pb_lightning.cycle` or Lightning.
"""
