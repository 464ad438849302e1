"""``torch.compile`` for the engine's elementwise-and-reduction functions, with a logged eager fallback.

The correlation statistics of a dendrite phase (:mod:`pb_lightning.engine.correlation`) are a
handful of reductions and elementwise products over the candidates' outputs, issued as some 20
small eager ops per layer and step. Each op is a full pass over memory, and on small layers each
costs its dispatch overhead (benchmarks/README.md, issue 16 item 1). Inductor fuses them into a
few loops; the functions stay plain PyTorch, so the eager path is the same code and the numerical
tests cover both.

Compilation is opt-in (``DendriteConfig(compile_statistics=True)``): it costs some seconds per
layer variant on the first step and needs a working inductor backend (a C++ compiler on CPU,
Triton on CUDA). Where compilation fails, the function runs eagerly from then on and says so once
in the log: it computes the same thing either way, so this changes speed, never results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, ParamSpec, TypeVar

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class CompiledOrEager(Generic[P, R]):
    """``fn`` through ``torch.compile(dynamic=True)`` when asked for, else (or after a failure) eagerly.

    ``dynamic=True`` compiles one graph per rank and dtype of the inputs rather than one per
    shape, so a network's layers of different widths share a graph and stay well under dynamo's
    recompile limit.
    """

    def __init__(self, fn: Callable[P, R]) -> None:
        self.fn = fn
        self._compiled: Callable[P, R] | None = None
        self.failed = False

    def __call__(self, enabled: bool, *args: P.args, **kwargs: P.kwargs) -> R:
        if not enabled or self.failed:
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as error:  # a missing compiler, an unsupported backend or device
            self.failed = True
            log.warning(
                "pb_lightning: torch.compile of %s failed (%s: %s); it runs eagerly from now on, with the same "
                "results. Set DendriteConfig(compile_statistics=False) to skip the attempt.",
                self.fn.__qualname__,
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            return self.fn(*args, **kwargs)

    def reset(self) -> None:
        """Forget the compiled function and any failure (for tests, and after ``torch._dynamo.reset``)."""
        self._compiled, self.failed = None, False


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule runs through ``torch.compile`` (in place, or as an ``OptimizedModule``)."""
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or isinstance(m, OptimizedModule) for m in model.modules()
    )


def drop_stale_graphs(model: nn.Module) -> bool:
    """After a restructure of a compiled ``model``: drop dynamo's graphs (``torch.compiler.reset()``).

    Why: dynamo keeps every graph it compiled for a code object, and the guards of a perforated
    model's graphs name its structure (how many dendrite sets, whether candidates are attached).
    Each restructure adds graphs for the new structure (train and eval) beside the dead ones, so
    after about four restructures the forward reaches dynamo's recompile limit (8) and every
    later phase runs eagerly. The old structure's graphs can only run again after a roll-back,
    which then compiles once more. The reset is process-wide: other compiled functions recompile
    at their next call (time, not results). Returns whether it reset.
    """
    if not is_compiled(model):
        return False
    torch.compiler.reset()
    log.info("pb_lightning: reset torch.compile's caches after restructuring a compiled model.")
    return True


def compiled_or_eager(fn: Callable[P, R]) -> CompiledOrEager[P, R]:
    """Decorator form of :class:`CompiledOrEager`: call the result as ``f(enabled, *args)``."""
    return CompiledOrEager(fn)


__all__ = ["CompiledOrEager", "compiled_or_eager", "drop_stale_graphs", "is_compiled"]
