"""Helpers shared by the benchmark scripts: timing on a shared machine and command-line plumbing.

``timing`` needs only the standard library, so that ``_reference_worker.py`` can use it from the
reference package's own environment (which has no pb_lightning and no Lightning).
"""
