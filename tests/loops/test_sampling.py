"""EpochShuffleSampler: each epoch's order is a function of the seed and the epoch alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import pb_lightning as pb


def test_the_order_depends_only_on_seed_and_epoch() -> None:
    a, b = pb.EpochShuffleSampler(range(50), seed=7), pb.EpochShuffleSampler(range(50), seed=7)
    torch.manual_seed(123)  # the global generator plays no part
    orders = []
    for epoch in (0, 1, 2):
        a.set_epoch(epoch)
        orders.append(list(a))
    b.set_epoch(2)  # a resumed run starts at a later epoch with a fresh sampler
    assert list(b) == orders[2]
    assert orders[0] != orders[1]
    assert sorted(orders[1]) == list(range(50))
    assert len(a) == 50


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"data_source": iter(range(3))}, r"`data_source` must be a dataset with a length"),
        ({"data_source": range(3), "seed": -1}, r"`seed` must be an int >= 0; got -1"),
        ({"data_source": range(3), "seed": 1.5}, r"`seed` must be an int >= 0; got 1.5"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(pb.PerforationError, match=pattern):
        pb.EpochShuffleSampler(**kwargs)


def test_a_bad_epoch_is_named() -> None:
    with pytest.raises(pb.PerforationError, match=r"`epoch` must be an int >= 0; got -2"):
        pb.EpochShuffleSampler(range(3)).set_epoch(-2)
