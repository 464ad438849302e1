"""The models people train, each through a whole cycle: dendrites must run in every mode.

For every model: perforate → dendrite phase → accept → give the output weights non-zero values
→ each layer's dendrites change the output under ``train()``, ``eval()`` + ``no_grad`` and
``inference_mode``; ``to_inference`` and a ``weights_only`` checkpoint round trip give the same
outputs; and a capacity test inside ``trainer.fit`` accepts dendrite sets and finds no problem.
The references are the plain eager outputs of the same model, computed in the test.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos import Transformer as DemoTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import pb_lightning as pb
from tests.helpers import fast_trainer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

D, HEADS, FF, B, T = 8, 2, 16, 6, 5


class EncoderStack(nn.Module):
    """A 2-layer ``nn.TransformerEncoder`` with a padding mask: its nested-tensor fast path applies."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        return self.encoder(x, src_key_padding_mask=padding).masked_fill(padding.unsqueeze(-1), 0.0)


class DecoderBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        return self.decoder(tgt, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[1]))


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` with the settings of its own fast path (batch-first self-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class ResidualBlock(nn.Module):
    """torchvision's BasicBlock layout: the norms are attributes, the block calls them in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)) + x)
        return self.head(out.mean((2, 3)))


class DemoLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lm = DemoTransformer(vocab_size=11, ninp=D, nhead=HEADS, nhid=FF, nlayers=1, dropout=0.0)

    def forward(self, inputs: Tensor, target: Tensor) -> Tensor:
        return self.lm(inputs, target).view(inputs.shape[0], inputs.shape[1], -1)  # it flattens the batch


class TinyBert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(
            vocab_size=20,
            hidden_size=D,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            intermediate_size=FF,
            max_position_embeddings=T,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=2,
            initializer_range=0.3,  # BERT's 0.02 leaves attention nearly uniform: q/k barely matter
        )
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.bert(input_ids=ids, attention_mask=mask).logits


def _padding() -> Tensor:
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[:, -2:] = True  # left-aligned: what the nested-tensor path needs
    return padding


def _bert_mask() -> Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    mask[:, -1] = 0
    return mask


#: name → (build the model, make its inputs, perforate() options)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Tensor, ...]], dict[str, Any]]] = {
    "encoder_layer": (
        lambda: nn.Sequential(nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)),
        lambda: (torch.randn(B, T, D),),
        {},
    ),
    "encoder_stack": (EncoderStack, lambda: (torch.randn(B, T, D), _padding()), {}),
    "decoder_layer": (DecoderBlock, lambda: (torch.randn(B, T, D), torch.randn(B, T + 1, D)), {}),
    "multihead_attention": (SelfAttention, lambda: (torch.randn(B, T, D),), {}),
    "demo_transformer": (DemoLM, lambda: (torch.randint(0, 11, (B, T)), torch.randint(0, 11, (B, T))), {}),
    "hf_bert": (TinyBert, lambda: (torch.randint(0, 20, (B, T)), _bert_mask()), {}),
    "lstm": (lambda: Recurrent(nn.LSTM), lambda: (torch.randn(B, T, 4),), {"include": [nn.LSTM, nn.Linear]}),
    "gru": (lambda: Recurrent(nn.GRU), lambda: (torch.randn(B, T, 4),), {"include": [nn.GRU, nn.Linear]}),
    "residual_block": (
        ResidualBlock,
        lambda: (torch.randn(B, 3, 4, 4),),
        {"with_norm": {"conv1": "bn1", "conv2": "bn2"}},
    ),
    "conv1d_batchnorm": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * T, 3)
        ),
        lambda: (torch.randn(B, 2, T),),
        {"with_norm": True},
    ),
}

MODES = ("train", "eval + no_grad", "inference_mode")


def _outputs(model: nn.Module, inputs: tuple[Tensor, ...], mode: str) -> Tensor:
    """The model's output in ``mode``, leaving its buffers (batch-norm statistics) as they were."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    model.train(mode == "train")
    if mode == "inference_mode":
        with torch.inference_mode():
            out = model(*inputs).clone()
    else:
        with torch.set_grad_enabled(mode == "train"):
            out = model(*inputs).detach()
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    return out


def _grown(name: str) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The model of case ``name`` after one dendrite phase and an acceptance, with w = 0.3."""
    build, make_inputs, options = CASES[name]
    model = pb.perforate(build(), config=pb.DendriteConfig(num_candidates=2, warmup_steps=0), **options)
    inputs = make_inputs()
    model.train()
    model(*inputs)
    pb.start_dendrite_phase(model)
    optimizer = torch.optim.SGD(pb.trainable_parameters(model), lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        model(*inputs).square().mean().backward()
        optimizer.step()
    pb.accept_dendrites(model)
    assert all(layer.num_dendrites == 1 for layer in pb.perforated_layers(model))
    return model, inputs


@pytest.mark.parametrize("name", list(CASES))
def test_every_layers_dendrites_change_the_output_in_every_mode(name: str) -> None:
    model, inputs = _grown(name)
    layers = pb.perforated_layers(model)
    assert len(layers) >= 2
    for mode in MODES:
        base = _outputs(model, inputs, mode)
        for layer in layers:
            with torch.no_grad():
                layer.output_weight.fill_(0.3)
            changed = _outputs(model, inputs, mode)
            with torch.no_grad():
                layer.output_weight.zero_()
            assert not torch.allclose(changed, base, rtol=0, atol=1e-6), f"{layer.name} is dead in {mode}"


def _with_weights(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for layer in pb.perforated_layers(model):
            layer.output_weight.fill_(0.3)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_to_inference_and_a_checkpoint_round_trip_give_the_same_outputs(name: str) -> None:
    model, inputs = _grown(name)
    _with_weights(model)
    expected = _outputs(model, inputs, "eval + no_grad")
    deployed = pb.to_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(deployed(*inputs), expected, rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, pb.PerforatedLayer) for m in deployed.modules())

    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "perforation": pb.perforation_state(model)}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    build, _, options = CASES[name]
    torch.manual_seed(1)  # different initial weights: everything must come from the checkpoint
    fresh = pb.perforate(build(), config=pb.DendriteConfig(num_candidates=2), **options)
    fresh.load_state_dict(saved["state_dict"])
    pb.load_perforation_state(fresh, saved["perforation"])
    torch.testing.assert_close(_outputs(fresh, inputs, "eval + no_grad"), expected, rtol=0, atol=0)


class ZooModule(pb.PerforatedModule):
    """One case of the zoo as a LightningModule, regressing a fixed random target."""

    def __init__(self, name: str) -> None:
        _, _, options = CASES[name]
        super().__init__(
            dendrite_config=pb.DendriteConfig(num_candidates=2),
            perforate_include=options.get("include"),
            with_norm=options.get("with_norm", False) is True,
        )
        self.save_hyperparameters()
        self.net = CASES[name][0]()
        self._pairs = options.get("with_norm") if isinstance(options.get("with_norm"), dict) else None

    def configure_model(self) -> None:
        if self._pairs is not None and not self.perforated_layers():
            pb.perforate(self.net, with_norm=self._pairs, config=self.dendrite_config)
        super().configure_model()

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.net(*inputs)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        *inputs, target = batch
        return nn.functional.mse_loss(self(*inputs), target)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        *inputs, target = batch
        self.log("val_loss", nn.functional.mse_loss(self(*inputs), target))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.dendrite_parameter_groups(), lr=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_the_capacity_test_inside_fit_accepts_dendrites_and_finds_no_problem(name: str, tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = ZooModule(name)
    inputs = CASES[name][1]()
    with torch.no_grad():
        target = torch.randn_like(copy.deepcopy(model.net).eval()(*inputs))
    loader = DataLoader(TensorDataset(*inputs, target), batch_size=B // 2)
    callback = pb.PerforatedCallback("val_loss", "min", capacity_test=True)
    trainer = fast_trainer(tmp_path, [callback], max_epochs=7, limit_val_batches=1)
    trainer.fit(model, loader, loader)
    assert callback.capacity_problems == []
    assert all(layer.num_dendrites >= 1 for layer in model.perforated_layers())


def test_bert_gets_dendrites_on_its_attention_projections_and_feed_forward() -> None:
    model = pb.perforate(TinyBert())
    names = {layer.name.removeprefix("bert.bert.encoder.layer.0.") for layer in pb.perforated_layers(model)}
    assert {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    } <= names
    summary = pb.perforation_summary(model)
    assert "bert.bert.embeddings.word_embeddings" in summary
    assert "embedding (a lookup table" in summary
