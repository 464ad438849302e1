"""Attention blocks: every dendrite runs in every mode, or ``perforate()`` refuses.

``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` read their projections' weights on
their fast paths; the converted blocks call them (and compute what torch computes), the deployed
form forwards their attributes, and a child whose parent reads its weights is never wrapped
silently.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import pb_lightning as pb
from tests.helpers import dendrite_change, grow_one_set

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_encoder_layer_dendrites_run_in_eval_without_gradients() -> None:
    """The issue's reproduction: the fast path bypassed linear1 in eval + no_grad and inference_mode."""
    enc = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    x = torch.randn(4, 5, 8)
    grow_one_set(pb.perforate(enc), x)
    modes = ("train", "eval", "no_grad", "inference_mode")
    changes = {mode: dendrite_change(enc, enc[0].linear1, (x,), mode) for mode in modes}
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


def test_to_inference_of_an_encoder_layer_forwards_attributes() -> None:
    enc = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    x = torch.randn(4, 5, 8)
    grow_one_set(pb.perforate(enc), x)
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
    grow_one_set(net, x)
    for mode in ("train", "no_grad", "inference_mode"):
        assert dendrite_change(net, net.attn.out_proj, (x,), mode) > 1e-3, mode


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
