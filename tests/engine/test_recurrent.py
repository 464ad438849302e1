"""Recurrent layers and other modules vmap cannot batch: neuron axes, output selectors, fallbacks."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import pb_lightning as pb
from tests.helpers import dendrite_change, grow_one_set

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _Classifier(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_the_suggested_neuron_axes_for_a_recurrent_layer_work(kind: type[nn.RNNBase]) -> None:
    model = _Classifier(kind)
    plain = copy.deepcopy(model.rnn)
    pb.perforate(model, include=[kind, nn.Linear], neuron_axes={kind: -1})
    x = torch.randn(5, 7, 4)
    grow_one_set(model, x)
    layer = model.rnn
    with torch.no_grad():
        layer.output_weight.fill_(0.5)
    model.eval()
    with torch.no_grad():
        out, hidden = layer(x)
        ref_out, ref_hidden = plain(x)
        # The reference: one dendrite, a fresh copy of the layer, through the sigmoid, weighted by w.
        params = {n: p[0] for n, p in zip(layer.dendrites._names, layer.dendrites.stacked().values(), strict=True)}
        dendrite = torch.func.functional_call(plain, params, (x,))[0]
    torch.testing.assert_close(out, ref_out + 0.5 * torch.sigmoid(dendrite))
    torch.testing.assert_close(hidden, ref_hidden)  # the rest of the output passes through
    assert dendrite_change(model, layer, (x,), "no_grad") > 1e-3


class _Wrapped(nn.Module):
    """An LSTM behind a tensor-returning module: vmap over its copies has no batching rule."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.lstm(x)[0]

    def reset_parameters(self) -> None:
        self.lstm.reset_parameters()


def test_a_module_vmap_cannot_batch_runs_its_copies_one_after_another(caplog: Any) -> None:
    model = nn.Sequential(_Wrapped(), nn.Linear(6, 2))
    pb.perforate(model, include=[_Wrapped], neuron_axes={_Wrapped: -1})
    x = torch.randn(3, 5, 4)
    with caplog.at_level(logging.INFO, logger="pb_lightning.engine.banks"):
        grow_one_set(model, x)
        model(x).sum().backward()
        model.eval()
        with torch.no_grad():
            model(x)
    assert model[0].num_dendrites == 1
    messages = [r.getMessage() for r in caplog.records if "one after another" in r.getMessage()]
    assert len(messages) == 1
    assert "vmap cannot batch _Wrapped" in messages[0]


def test_bad_output_selectors_are_named() -> None:
    with pytest.raises(pb.PerforationError, match=r"`output_selectors\[<class '.*LSTM'>\]` must be an int"):
        pb.perforate(_Classifier(nn.LSTM), include=[nn.LSTM], output_selectors={nn.LSTM: 1.5})
    model = pb.perforate(_Classifier(nn.LSTM), include=[nn.LSTM], output_selectors={nn.LSTM: 3})
    with pytest.raises(pb.PerforationError, match=r"Layer `rnn`: output_selectors gives 3.*tuple of 2 entries"):
        model(torch.randn(2, 3, 4))
