"""The training step does not wait for the device: host reads of tensor values in the hot path.

On an accelerator every ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` or ``.tolist()`` on a
device tensor blocks the host until the device catches up. CUDA's sync debug mode cannot run on
this project's CPU machines, so the test counts those reads directly: it wraps the Tensor methods
that read a value into Python while one forward and backward pass runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pb_lightning as pb
import pb_lightning.engine.cascade as cascade_module
from pb_lightning.engine.layer import PerforatedLayer

_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    originals = {name: getattr(torch.Tensor, name) for name in _READS}
    calls: list[str] = []

    def counting(name: str):  # type: ignore[no-untyped-def]
        def read(self: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    for name in _READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    pb.perforate(model)
    x, y = torch.randn(16, 2, 6), torch.randint(0, 3, (16,))
    model(x)
    return model, x, y


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("chunked", [False, True], ids=["fused", "chunked"])
@pytest.mark.parametrize("accepted", [0, 2])
def test_a_neuron_phase_step_reads_nothing_from_the_device(
    accepted: int, chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunked:  # the accepted conv sets run one chunk per set (the path of wide conv layers)
        monkeypatch.setattr(cascade_module, "CHUNK_BYTES", 1)
    model, x, y = _model()
    for _ in range(accepted):
        pb.start_dendrite_phase(model)
        _step(model, x, y)
        with pytest.warns(UserWarning, match="no candidate learned anything"):
            pb.accept_dendrites(model)
    with host_reads() as calls:
        _step(model, x, y)
    assert calls == []


def test_a_dendrite_phase_step_reads_one_value_per_layer() -> None:
    """The one read left is the finiteness check of each layer's batch moments (a non-finite batch
    is skipped and diverged candidates restart: both branch on it)."""
    model, x, y = _model()
    pb.start_dendrite_phase(model)
    layers = [m for m in model.modules() if isinstance(m, PerforatedLayer)]
    for _ in range(3):  # past the warm-up, so the candidates' update runs too
        _step(model, x, y)
    with host_reads() as calls:
        _step(model, x, y)
    assert calls == ["__float__"] * len(layers)


def test_the_step_count_kept_on_the_host_follows_the_buffer_and_state_dict_loads() -> None:
    model, x, y = _model()
    pb.start_dendrite_phase(model)
    for _ in range(4):
        _step(model, x, y)
    stats = [m.candidates.statistics for m in model.modules() if isinstance(m, PerforatedLayer)]
    assert [s.num_steps for s in stats] == [int(s.steps) for s in stats] == [4, 4, 4]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        _step(model, x, y)
    assert [s.num_steps for s in stats] == [6, 6, 6]
    model.load_state_dict(state)  # back to 4 steps: the host copy must not keep saying 6
    stats = [m.candidates.statistics for m in model.modules() if isinstance(m, PerforatedLayer)]
    assert [s.num_steps for s in stats] == [4, 4, 4]
