"""Naming what made a loss or gradient non-finite, where it can be known from the batch and the configuration: a stored
or external behaviour log-prob, a weighted reward sum that overflowed, or a configuration value so large that the
loss or its gradient overflows float32 (docs/hardening.md). Used by the non-finite stop's message."""

from __future__ import annotations

import math
from typing import Any

import torch

from .columns import ADVANTAGES, BEHAVIOUR_LOGPS, IS_EXTERNAL, IS_HISTORICAL, REWARDS, STALENESS

#: Configuration values that scale the loss, its gradient or the update (the largest float32 is 3.4e38).
SCALE_FIELDS = ("reward_weights", "gvpo_beta", "beta", "learning_rate", "epsilon", "epsilon_high")
#: A scale of this size or more is named as a likely cause.
EXTREME = 1e6


def _flag(inputs: dict[str, Any], key: str, rows: int) -> torch.Tensor:
    value = inputs.get(key)
    return torch.zeros(rows, dtype=torch.bool) if value is None else value.detach().bool().cpu().reshape(-1)


def nonfinite_cause(args: Any, inputs: dict[str, Any] | None) -> str | None:
    """A sentence naming the likely cause (the setting or the stored sample), or None when none is visible."""
    causes = []
    if inputs:
        behaviour, mask = inputs.get(BEHAVIOUR_LOGPS), inputs.get("completion_mask")
        if behaviour is not None and mask is not None:
            bad_rows = (~torch.isfinite(behaviour.detach().float()) & mask.bool()).any(1).cpu()
            historical = _flag(inputs, IS_HISTORICAL, bad_rows.numel())
            external = _flag(inputs, IS_EXTERNAL, bad_rows.numel())
            if (bad_rows & historical).any():
                stale = inputs.get(STALENESS)
                ages = sorted({int(s) for s in stale[bad_rows & historical].tolist()}) if stale is not None else []
                causes.append(
                    f"{int((bad_rows & historical).sum())} stored mixed-buffer sample(s) in this batch (staleness "
                    f"{ages} steps) have NaN or infinite behaviour log-probs: the buffer state was damaged. Resume "
                    "from an earlier checkpoint, or turn the buffer off (buffer_history_per_group=0)"
                )
            if (bad_rows & external).any():
                causes.append(
                    f"external completions in this batch have NaN or infinite log-probs "
                    f"(external_logps_column={getattr(args, 'external_logps_column', None)!r}): fix or drop those rows"
                )
        rewards = inputs.get(REWARDS)
        if rewards is not None and torch.isinf(rewards.detach().float()).any():
            causes.append(
                f"the weighted reward sum is infinite although every reward function returned finite values: "
                f"reward_weights={list(getattr(args, 'reward_weights', None) or [])} overflow float32 (3.4e38) with "
                "these rewards. Use smaller reward_weights"
            )
        advantages = inputs.get(ADVANTAGES)
        if not causes and advantages is not None and not torch.isfinite(advantages.detach().float()).all():
            causes.append("the advantages of this batch are non-finite (see the reward metrics)")
    extreme = []
    for field in SCALE_FIELDS:
        value = getattr(args, field, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, (int, float)) and math.isfinite(v) and abs(v) >= EXTREME for v in values):
            extreme.append(f"{field}={value!r}")
    if extreme:
        causes.append(
            f"{', '.join(extreme)} {'is' if len(extreme) == 1 else 'are'} so large that the loss or its gradient "
            f"overflows float32 (values >= {EXTREME:g} scale it). Use a value of ordinary size"
        )
    return "; ".join(causes) + "." if causes else None
