"""Everything that imports Lightning: the callback, the module, the run recorder and the CLI.

This is the top layer; :mod:`pb_lightning.engine` and :mod:`pb_lightning.cycle` never import it.
"""
