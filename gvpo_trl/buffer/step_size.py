"""The learning rate under history: the step scaled by the share of each generation batch that is fresh.

With h of each group of k taken from history, a run takes k / (k − h) optimizer steps per generated token where a
fresh-only run takes one, so at the same learning rate its policy moves k / (k − h) times as far per token of
evidence, and its stored samples' rewards describe it less well (docs/mixed_buffers.md). ``buffer_scale_lr=True``
multiplies the schedule's learning rate by the measured fresh share of the current generation batch
(:func:`fresh_share`): 1 while no history exists yet, (k − h) / k once every group takes h; the user keeps the
learning rate that is best for fresh-only training. :func:`scale_schedule` applies it to any ``LambdaLR`` (every
schedule of ``transformers.get_scheduler`` but ``reduce_lr_on_plateau``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .planning import GroupPlan


def fresh_share(plan: list[GroupPlan], k: int) -> float:
    """Generated rows of a plan (all processes) over its rows."""
    return sum(p.num_fresh(k) for p in plan) / (len(plan) * k) if plan else 1.0


class ScaledSchedule:
    """A ``LambdaLR`` whose every factor is multiplied by ``scale`` (set with :meth:`set_scale`, which also sets the
    optimizer's learning rates at once, so that the next optimizer step uses it)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.scheduler, self.scale = scheduler, 1.0
        scheduler.lr_lambdas = [self._scaled(f) for f in scheduler.lr_lambdas]

    def _scaled(self, factor: Callable[[int], float]) -> Callable[[int], float]:
        return lambda step: factor(step) * self.scale

    def set_scale(self, scale: float) -> None:
        self.scale = float(scale)
        step, sched = self.scheduler.last_epoch, self.scheduler
        lrs = [base * factor(step) for base, factor in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs  # what Trainer logs as learning_rate


def scale_schedule(scheduler, name: str) -> ScaledSchedule:
    """Wrap ``scheduler`` (or the ``LambdaLR`` inside accelerate's wrapper); refuses other schedulers."""
    inner = getattr(scheduler, "scheduler", scheduler)
    if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(
            f"{name}: buffer_scale_lr=True scales a LambdaLR schedule (every lr_scheduler_type of transformers but "
            f"'reduce_lr_on_plateau'), got {type(inner).__name__}. Use such a schedule, or buffer_scale_lr=False."
        )
    return ScaledSchedule(inner)
