"""A shuffling sampler whose order is a function of its seed and the epoch: resumable exactly.

``DataLoader(shuffle=True)`` draws each epoch's order from a generator that lives in the
DataLoader's ``RandomSampler`` and in no checkpoint: a run resumed with
``trainer.fit(ckpt_path=...)`` (or a plain loop restarted from a saved state) continues with other
batch orders than the uninterrupted run, so it ends at other weights. This sampler keeps nothing
between epochs: epoch ``e`` is always the same permutation, so the resumed run replays exactly the
batches the uninterrupted one would have seen. Lightning calls :meth:`set_epoch` at the start of
every training epoch, the resumed one included; a plain loop calls it itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

from pb_lightning.errors import invalid


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``data_source``'s indices with a permutation seeded by ``seed`` and the epoch.

    Pass it as ``DataLoader(dataset, batch_size=..., sampler=EpochShuffleSampler(dataset, seed=0))``
    (without ``shuffle=``). For single-device runs: under DDP, Lightning's own
    ``DistributedSampler`` (from ``shuffle=True``) already shuffles by seed and epoch, and it wraps
    a custom sampler in a way that no longer forwards :meth:`set_epoch`.

    Args:
        data_source: the dataset (anything with a length).
        seed: the seed of every epoch's permutation (epoch ``e`` uses ``seed + e``, as
            ``DistributedSampler`` does).

    Example::

        >>> sampler = EpochShuffleSampler(range(5), seed=3)
        >>> sampler.set_epoch(1)
        >>> first = list(sampler)
        >>> sampler.set_epoch(2)
        >>> sampler.set_epoch(1)
        >>> list(sampler) == first and sorted(first) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        if not isinstance(data_source, Sized):
            raise invalid("data_source", type(data_source).__name__, "a dataset with a length (a Sized)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise invalid("seed", seed, "an int >= 0")
        self.data_source = data_source
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning calls this at every training epoch start)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise invalid("epoch", epoch, "an int >= 0")
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.data_source)
