"""Attention blocks, recurrent layers and the dead-dendrite check (issue 13, defects 1–4 and 11).

Every dendrite must run in every mode, or ``perforate()`` must refuse; the capacity test must
notice when a parent module bypasses a perforated child.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import pb_lightning as pb
from pb_lightning.cycle.capacity import CapacityProbe
from pb_lightning.engine.layer import PerforatedLayer
from tests.helpers import fast_trainer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _grow(model: nn.Module, *inputs: Any) -> nn.Module:
    """One dendrite phase (a forward/backward) and an acceptance."""
    model.train()
    model(*inputs)
    pb.start_dendrite_phase(model)
    out = model(*inputs)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    pb.accept_dendrites(model)
    return model


def _change(model: nn.Module, layer: PerforatedLayer, inputs: tuple[Any, ...], mode: str) -> float:
    """How much giving ``layer``'s dendrites an output weight of 0.5 moves the output in ``mode``."""

    def run() -> Tensor:
        model.train(mode == "train")
        if mode == "inference_mode":
            with torch.inference_mode():
                return model(*inputs).clone()
        with torch.set_grad_enabled(mode in ("train", "eval")):
            return model(*inputs).detach()

    saved = layer.output_weight.detach().clone()
    with torch.no_grad():
        layer.output_weight.zero_()
    before = run()
    with torch.no_grad():
        layer.output_weight.fill_(0.5)
    after = run()
    with torch.no_grad():
        layer.output_weight.copy_(saved)
    return float((after - before).abs().max())


# ---------------------------------------------------------------------------------------- defect 1
def test_encoder_layer_dendrites_run_in_eval_without_gradients() -> None:
    """The issue's reproduction: the fast path bypassed linear1 in eval + no_grad and inference_mode."""
    enc = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    x = torch.randn(4, 5, 8)
    _grow(pb.perforate(enc), x)
    modes = ("train", "eval", "no_grad", "inference_mode")
    changes = {mode: _change(enc, enc[0].linear1, (x,), mode) for mode in modes}
    assert all(c > 1e-3 for c in changes.values()), changes
    assert changes["no_grad"] == pytest.approx(changes["train"], rel=1e-5)


_MHA_SETTINGS = {
    "packed batch_first": ({"batch_first": True}, {}),
    "seq first with masks": ({}, {"mask": True}),
    "kdim/vdim": ({"kdim": 6, "vdim": 5}, {}),
    "bias_kv and zero_attn": ({"add_bias_kv": True, "add_zero_attn": True}, {"mask": True}),
    "no bias": ({"bias": False, "batch_first": True}, {}),
    "causal without weights": ({"batch_first": True}, {"causal": True, "need_weights": False}),
    "unbatched": ({}, {"unbatched": True}),
    "per-head weights": ({"batch_first": True}, {"average": False, "mask": True}),
}


@pytest.mark.parametrize("setting", list(_MHA_SETTINGS))
@pytest.mark.parametrize("mode", ["train", "eval + no_grad"])
def test_the_converted_attention_computes_what_torch_computes(setting: str, mode: str) -> None:
    from pb_lightning.engine.attention import PerforatableMultiheadAttention

    options, call = _MHA_SETTINGS[setting]
    original = nn.MultiheadAttention(8, 2, **options)
    converted = copy.deepcopy(original)
    PerforatableMultiheadAttention.convert(converted)
    assert {n for n, _ in converted.named_children()} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    b, t, s = 3, 4, 6
    shape = (
        (lambda n, e: (n, e))
        if call.get("unbatched")
        else ((lambda n, e: (b, n, e)) if original.batch_first else (lambda n, e: (n, b, e)))
    )
    q = torch.randn(*shape(t, 8))
    k = torch.randn(*shape(s, original.kdim))
    v = torch.randn(*shape(s, original.vdim))
    if call.get("causal"):
        k = v = q = torch.randn(*shape(t, 8))
    kwargs: dict[str, Any] = {"need_weights": call.get("need_weights", True)}
    if call.get("mask"):
        kwargs["key_padding_mask"] = torch.zeros(b, s, dtype=torch.bool)
        kwargs["key_padding_mask"][:, -1] = True
        kwargs["attn_mask"] = torch.randn(t, s)
    if call.get("causal"):
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(t)
        kwargs["is_causal"] = True
    if "average" in call:
        kwargs["average_attn_weights"] = call["average"]
    for m in (original, converted):
        m.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        expected, expected_weights = original(q, k, v, **kwargs)
        got, got_weights = converted(q, k, v, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if expected_weights is None:
        assert got_weights is None
    else:
        torch.testing.assert_close(got_weights, expected_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_the_converted_attention_takes_an_empty_batch_as_torch_does(need_weights: bool, batch_first: bool) -> None:
    # torch returns empty outputs for a batch of 0; the converted path inferred a -1 from no elements.
    original = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    model = pb.perforate(nn.Sequential(copy.deepcopy(original)))
    x = torch.randn(0, 3, 8) if batch_first else torch.randn(3, 0, 8)
    expected, expected_weights = original(x, x, x, need_weights=need_weights)
    got, got_weights = model[0](x, x, x, need_weights=need_weights)
    assert got.shape == expected.shape
    assert (got_weights is None) == (expected_weights is None)
    if got_weights is not None:
        assert got_weights.shape == expected_weights.shape


def test_a_converted_encoder_takes_an_empty_sequence_with_a_padding_mask_as_torch_does() -> None:
    # Eval without gradients: torch's fast path returns an empty output, so the converted layer must too.
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False
    ).eval()
    model = pb.perforate(nn.Sequential(copy.deepcopy(encoder))).eval()
    x, mask = torch.randn(2, 0, 8), torch.zeros(2, 0, dtype=torch.bool)
    with torch.no_grad():
        assert model[0](x, src_key_padding_mask=mask).shape == encoder(x, src_key_padding_mask=mask).shape


@pytest.mark.parametrize("options", [{}, {"kdim": 6, "vdim": 5}])
def test_a_state_dict_of_the_unconverted_attention_still_loads(options: dict[str, int]) -> None:
    from pb_lightning.engine.attention import PerforatableMultiheadAttention

    original = nn.MultiheadAttention(8, 2, **options)
    converted = nn.MultiheadAttention(8, 2, **options)  # other weights
    PerforatableMultiheadAttention.convert(converted)
    converted.load_state_dict(original.state_dict())  # packed (or separate) projection weights
    model = pb.perforate(nn.Sequential(converted))
    q, kv = torch.randn(4, 2, 8), torch.randn(5, 2, original.kdim)
    v = torch.randn(5, 2, original.vdim)
    with torch.no_grad():
        for m in (original, model):
            m.eval()
        torch.testing.assert_close(model[0](q, kv, v)[0], original(q, kv, v)[0], rtol=1e-5, atol=1e-6)


def test_an_encoder_over_converted_layers_keeps_its_outputs_and_skips_nested_tensors() -> None:
    from pb_lightning.engine.attention import PerforatableTransformerEncoderLayer

    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    original = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    model = pb.perforate(nn.Sequential(copy.deepcopy(original)))
    assert all(type(m) is PerforatableTransformerEncoderLayer for m in model[0].layers)
    assert model[0].use_nested_tensor is False
    x, padding = torch.randn(3, 5, 8), torch.zeros(3, 5, dtype=torch.bool)
    padding[:, -1] = True
    original.eval()
    model.eval()
    with torch.no_grad():
        expected = original(x, src_key_padding_mask=padding).masked_fill(padding.unsqueeze(-1), 0)
        got = model[0](x, src_key_padding_mask=padding).masked_fill(padding.unsqueeze(-1), 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- defect 2
def test_to_inference_of_an_encoder_layer_forwards_attributes() -> None:
    enc = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    x = torch.randn(4, 5, 8)
    _grow(pb.perforate(enc), x)
    with torch.no_grad():
        enc[0].linear1.output_weight.fill_(0.5)
    deployed = pb.to_inference(enc)
    layer = deployed[0].linear1
    assert isinstance(layer, pb.DendriteInferenceLayer)
    assert layer.weight is layer.module.weight
    assert layer.out_features == 16
    with pytest.raises(AttributeError, match="no_such_thing"):
        layer.no_such_thing
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), enc(x))


# ---------------------------------------------------------------------------------------- defect 3
def test_include_linear_gives_attention_out_proj_dendrites_that_run() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))

    class Self(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = model[0]

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, x, x)[0]

    net = pb.perforate(Self(), include=[nn.Linear])
    x = torch.randn(3, 4, 8)
    _grow(net, x)
    for mode in ("train", "no_grad", "inference_mode"):
        assert _change(net, net.attn.out_proj, (x,), mode) > 1e-3, mode


class _OwnAttention(nn.MultiheadAttention):
    """A user subclass that inherits torch's weight-reading forward: it cannot be converted."""


class _HoldsOwnAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _OwnAttention(8, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(x, x, x)[0])


@pytest.mark.parametrize("include", [[nn.Linear], ["*out_proj"]])
def test_naming_a_child_read_by_weight_is_refused(include: list[Any]) -> None:
    with pytest.raises(pb.PerforationError, match=r"`attn.out_proj`.*parent `attn`.*_OwnAttention"):
        pb.perforate(_HoldsOwnAttention(), include=include)


class _OwnEncoderLayer(nn.TransformerEncoderLayer):
    """Inherits torch's forward, fast path included."""


def test_an_encoder_layer_subclass_with_the_fast_path_keeps_its_children_unwrapped() -> None:
    model = nn.Sequential(_OwnEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 2))
    pb.perforate(model)
    assert [layer.name for layer in pb.perforated_layers(model)] == ["1"]
    assert type(model[0].self_attn) is nn.MultiheadAttention  # left as it is
    assert "_OwnEncoderLayer inherits TransformerEncoderLayer.forward" in pb.perforation_summary(model)
    with pytest.raises(pb.PerforationError, match=r"`0.linear1` matched `include`.*fast path"):
        pb.perforate(nn.Sequential(_OwnEncoderLayer(8, 2, 16, batch_first=True)), include=["*linear1"])


def test_excluding_the_attention_but_including_its_projection_is_refused() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(pb.PerforationError, match=r"`0.out_proj`.*functional kernel"):
        pb.perforate(model, include=["*out_proj"], exclude=[nn.MultiheadAttention])


def test_a_child_read_by_weight_is_skipped_by_default_and_the_summary_says_why() -> None:
    model = pb.perforate(_HoldsOwnAttention())
    assert [layer.name for layer in pb.perforated_layers(model)] == ["head"]
    summary = pb.perforation_summary(model)
    assert "attn.out_proj" in summary
    assert "_OwnAttention inherits MultiheadAttention.forward" in summary


# ---------------------------------------------------------------------- the dead-dendrite check
class _WeightReader(nn.Module):
    """A parent that uses its child's weights instead of calling it (what torch's fast paths do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(F.linear(x, self.lin.weight, self.lin.bias)))


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
    problems = _probed_cycle(pb.perforate(_WeightReader()), torch.randn(6, 4))
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


# ---------------------------------------------------------------------------------------- defect 4
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
    _grow(model, x)
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
    assert _change(model, layer, (x,), "no_grad") > 1e-3


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
        _grow(model, x)
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


# ------------------------------------------------------------------------ Lightning: 4, 11, check
class _RecurrentModule(pb.PerforatedModule):
    def __init__(self, weight_reader: bool = False) -> None:
        super().__init__(
            dendrite_config=pb.DendriteConfig(num_candidates=2),
            perforate_include=None if weight_reader else [nn.LSTM, nn.Linear],
        )
        self.save_hyperparameters()
        self.embed = nn.Embedding(10, 4)
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.reader = _WeightReader() if weight_reader else None
        self.head = nn.Linear(6, 4)

    def forward(self, ids: Tensor) -> Tensor:
        out = self.head(self.norm(self.rnn(self.embed(ids))[0][:, -1]))
        return self.reader(out) if self.reader is not None else out[:, :2]

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        ids, y = batch
        self.log("val_loss", F.cross_entropy(self(ids), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.dendrite_parameter_groups(), lr=1e-2)


def _capacity_fit(model: pl.LightningModule, tmp_path: Path) -> pb.PerforatedCallback:
    ids, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 2, (8,))
    loader = DataLoader(TensorDataset(ids, y), batch_size=4)
    callback = pb.PerforatedCallback("val_loss", "min", capacity_test=True)
    trainer = fast_trainer(tmp_path, [callback], max_epochs=7)
    trainer.fit(model, loader, loader)
    return callback


@pytest.mark.slow
def test_an_lstm_classifier_goes_through_the_capacity_test_and_the_summary_is_shown(
    tmp_path: Path, caplog: Any
) -> None:
    pl.seed_everything(0)
    model = _RecurrentModule()
    with caplog.at_level(logging.INFO):
        callback = _capacity_fit(model, tmp_path)
    assert callback.capacity_problems == []
    assert [layer.num_dendrites for layer in model.perforated_layers()] == [3, 3]
    assert "pb_lightning: 2 perforated modules" in caplog.text
    assert "dendrites added to output[0]" in caplog.text
    assert "embedding (a lookup table" in caplog.text
    assert "normalisation layer" in caplog.text


@pytest.mark.slow
# The problem the test provokes is also reported as a warning at the end of the fit.
@pytest.mark.filterwarnings("ignore:pb_lightning capacity test found problems:UserWarning")
def test_the_capacity_test_reports_a_layer_whose_parent_reads_its_weights(tmp_path: Path, caplog: Any) -> None:
    pl.seed_everything(0)
    model = _RecurrentModule(weight_reader=True)
    with caplog.at_level(logging.INFO):
        callback = _capacity_fit(model, tmp_path)
    assert callback.capacity_problems
    assert all("`reader.lin`" in p for p in callback.capacity_problems)
    assert "recurrent layer (not perforated by default" in caplog.text
