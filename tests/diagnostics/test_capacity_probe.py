"""The capacity test's dead-dendrite check: it names a perforated layer whose dendrites never reach
the model's output (a parent reading its weights), and leaves a sound model as it found it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import pb_lightning as pb
from pb_lightning.diagnostics.capacity import CapacityProbe
from pb_lightning.engine.layer import PerforatedLayer
from tests.helpers import WeightReader


def _probed_cycle(model: nn.Module, *inputs: Tensor) -> list[str]:
    probe = CapacityProbe()
    probe.start(model)
    model.train()
    model(*inputs)
    pb.start_dendrite_phase(model)
    out = model(*inputs).sum()
    if out.requires_grad:  # not where the bypassed layer held the only candidates
        out.backward()
    probe.checked_accept(pb.accept_dendrites)(model)
    probe.stop()
    return probe.problems


def test_the_probe_names_a_layer_whose_parent_reads_its_weights() -> None:
    problems = _probed_cycle(pb.perforate(WeightReader()), torch.randn(6, 4))
    assert len(problems) == 2
    assert all("`lin`" in p for p in problems)
    assert "train mode" in problems[0]
    assert "eval + no_grad mode" in problems[1]


def test_the_probe_names_the_old_encoder_layer_bypass() -> None:
    """Today's main: linear1 wrapped inside an unconverted encoder layer (the fast path reads it)."""
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc.linear1 = PerforatedLayer(
        enc.linear1, config=pb.DendriteConfig(), neuron_axis=-1, num_neurons=16, name="0.linear1"
    )
    problems = _probed_cycle(nn.Sequential(enc), torch.randn(4, 5, 8))
    assert problems == [
        "the dendrites of layer `0.linear1` do not change the output of the model in eval + no_grad mode "
        "(does a parent module read the wrapped module's weights instead of calling it?)"
    ]


def test_the_probe_names_the_old_attention_out_proj_bypass() -> None:
    """Today's main with include=[nn.Linear]: out_proj wrapped inside an unconverted attention."""
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    model[0].out_proj = PerforatedLayer(
        model[0].out_proj, config=pb.DendriteConfig(), neuron_axis=-1, num_neurons=8, name="0.out_proj"
    )

    class Self(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = model

        def forward(self, x: Tensor) -> Tensor:
            return self.block[0](x, x, x)[0]

    problems = _probed_cycle(Self(), torch.randn(4, 3, 8))
    assert "no perforated layer ran in training, so nothing could be checked" in problems
    assert [p.split(" (")[0] for p in problems if "dendrites of" in p] == [
        f"the dendrites of layer `0.out_proj` do not change the output of the model in {mode} mode"
        for mode in ("train", "eval + no_grad")
    ]


def test_the_probe_passes_converted_blocks_and_restores_weights_and_statistics() -> None:
    model = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True), nn.Flatten(), nn.BatchNorm1d(40)
    )
    pb.perforate(model)
    x = torch.randn(4, 5, 8)
    probe = CapacityProbe()
    probe.start(model)
    model.train()
    model(x)
    pb.start_dendrite_phase(model)
    model(x).sum().backward()
    pb.accept_dendrites(model)
    with torch.no_grad():
        model[0].linear2.output_weight.fill_(0.25)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    probe.check_dendrites_reach_output(model)
    assert probe.problems == []
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert model.training
