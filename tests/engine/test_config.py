"""DendriteConfig validates every field at construction, with messages that name the fix."""

from __future__ import annotations

from typing import Any

import pytest

from pb_lightning import DendriteConfig, PerforationError


def test_defaults_are_the_documented_ones() -> None:
    config = DendriteConfig()
    assert config.num_candidates == 4
    assert config.activation == "sigmoid"
    assert config.learning == "correlation"
    assert config.normalization == "pearson"  # robust to the loss scale
    assert config.perforation is True
    assert config.train_accepted_dendrites is False
    assert config.to_dict()["warmup_steps"] == config.warmup_steps


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("num_candidates", 0, "an int >= 1"),
        ("num_candidates", 2.0, "an int >= 1"),
        ("num_candidates", True, "an int >= 1"),
        ("activation", "gelu", "'sigmoid', 'tanh', 'relu'"),
        ("learning", "backprop", "'correlation', 'gradient'"),
        ("normalization", "zscore", "'pearson', 'error_energy', 'raw'"),
        ("perforation", 1, "a bool"),
        ("cascade", "yes", "a bool"),
        ("train_accepted_dendrites", None, "a bool"),
        ("init_scale", 0.0, "a finite float > 0"),
        ("init_scale", float("nan"), "a finite float > 0"),
        ("statistics_momentum", 1.0, "a float in [0, 1)"),
        ("statistics_momentum", -0.1, "a float in [0, 1)"),
        ("warmup_steps", -1, "an int >= 0"),
        ("eps", 0, "a finite float > 0"),
    ],
)
def test_invalid_fields_are_refused_with_a_named_message(field: str, value: Any, valid: str) -> None:
    with pytest.raises(PerforationError) as info:
        DendriteConfig(**{field: value})
    message = str(info.value)
    assert f"DendriteConfig.{field}" in message
    assert valid in message
    assert repr(value) in message


def test_gradient_learning_needs_a_single_candidate() -> None:
    with pytest.raises(PerforationError, match=r"num_candidates.*1 when learning='gradient'"):
        DendriteConfig(learning="gradient", num_candidates=4)
    assert DendriteConfig(learning="gradient", num_candidates=1).learning == "gradient"


def test_config_is_immutable() -> None:
    config = DendriteConfig()
    with pytest.raises(AttributeError):
        config.num_candidates = 2  # type: ignore[misc]


def test_every_declared_activation_has_an_implementation() -> None:
    # The Literal alias is the one list of choices (validation reads it); the forward must cover it.
    from pb_lightning.engine.cascade import ACTIVATIONS
    from pb_lightning.engine.config import Activation
    from pb_lightning.errors import choices_of

    assert set(ACTIVATIONS) == set(choices_of(Activation))
