"""A second, independent pass over a streaming train dataset: where dynamic sampling draws its extra prompts from
when the dataset has no ``len`` (``gvpo_trl.dynamic_sampling``)."""

from __future__ import annotations

from typing import Any

import torch


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is a streaming dataset (no ``len``, no indexing): ``datasets.IterableDataset`` or a torch
    ``IterableDataset``."""
    from datasets import IterableDataset as HFIterableDataset

    return isinstance(dataset, (HFIterableDataset, torch.utils.data.IterableDataset))


class ExtraPromptStream:
    """A second, independent pass over a streaming dataset, for the extra generation rounds of dynamic sampling.

    ``position`` counts the examples read since the start, across passes: when the stream ends, the next pass starts
    (with ``shuffle``, a ``datasets.IterableDataset`` is reshuffled with ``seed + 1 + pass``, TRL's buffered shuffle;
    the main training pass uses ``seed``). ``seek(p)`` reads forward to position ``p`` (from the start if ``p`` lies
    behind), so the examples at a position depend on the position alone: identical on every process, and after a
    resume. Reading forward costs one read per skipped example (image columns are decoded).
    """

    def __init__(self, dataset: Any, seed: int, shuffle: bool):
        self.dataset, self.seed, self.shuffle = dataset, int(seed), shuffle
        self._restart()

    def _restart(self) -> None:
        self.position, self.passes, self._read_in_pass = 0, 0, 0
        self._iterator = self._open()

    def _open(self):
        dataset = self.dataset
        from datasets import IterableDataset as HFIterableDataset

        if self.shuffle and isinstance(dataset, HFIterableDataset):
            dataset = dataset.shuffle(seed=self.seed + 1 + self.passes)
        return iter(dataset)

    def next(self) -> dict[str, Any]:
        try:
            example = next(self._iterator)
        except StopIteration:
            if self._read_in_pass == 0:
                raise ValueError(
                    "the streaming train_dataset yields no examples: dynamic sampling (min_valid_fraction > 0) "
                    "draws its extra prompts from it. Give it examples, or set min_valid_fraction=0."
                ) from None
            self.passes, self._read_in_pass = self.passes + 1, 0
            self._iterator = self._open()
            return self.next()
        self.position += 1
        self._read_in_pass += 1
        return example

    def seek(self, position: int) -> None:
        if position < self.position:
            self._restart()
        while self.position < position:
            self.next()
