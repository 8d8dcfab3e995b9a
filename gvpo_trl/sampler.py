"""``EpochSeededSampler``: TRL's prompt sampler, reseeded per epoch so that a resumed run replays the same order."""

from __future__ import annotations

from torch.utils.data import Sampler


class EpochSeededSampler(Sampler):
    """Wraps TRL's ``RepeatSampler`` and reseeds its shuffle with ``seed + epoch`` when the Trainer calls
    ``set_epoch``. TRL's sampler draws every epoch's order from one running generator, so a run resumed in epoch
    e > 0 would replay epoch 0's order; with this, epoch e's order depends on e alone and resuming is exact.
    Epoch 0's order is TRL's own."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self):
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if getattr(self.sampler, "shuffle", False) and self.sampler.seed is not None:
            self.sampler.generator.manual_seed(self.sampler.seed + epoch)
