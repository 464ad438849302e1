"""A tracker's state saved by an earlier version keeps loading, and resumes with the same decisions."""

from __future__ import annotations

import torch

from tests.fixtures import make_format_v1 as v1


def test_a_tracker_resumes_from_the_format_1_fixture_with_the_same_decisions_and_outputs() -> None:
    # Written by tests/fixtures/make_format_v1.py before the cycle driver: the machine kept the
    # history itself, with no version and no recorder rows.
    expected = torch.load(v1.EXPECTED, weights_only=True)["tracker"]
    got = v1.resume_tracker(torch.load(v1.TRACKER_STATE, weights_only=True))
    assert got["decisions"] == expected["decisions"]
    assert got["done"] == expected["done"]
    torch.testing.assert_close(got["output"], expected["output"], rtol=1e-5, atol=1e-6)
