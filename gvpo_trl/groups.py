"""Group statistics: plain tensor functions, no trainer in sight.

A batch is a flat list of rows (completions); ``group_ids`` (LongTensor, shape ``(B,)``) names the group (prompt)
each row belongs to. Rows of one group need not be adjacent, and a batch may hold only part of a group when the
group spans processes: callers gather the per-row values and ids first, then use these functions on the result.
"""

from __future__ import annotations

import torch


def _dense(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids to ``0..G-1`` (in order of first appearance is not needed: sorted unique)."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, unique.numel()


def group_sizes(group_ids: torch.Tensor) -> torch.Tensor:
    """Number of rows in each row's group, per row (shape ``(B,)``)."""
    inverse, num_groups = _dense(group_ids)
    counts = torch.zeros(num_groups, dtype=torch.long, device=group_ids.device).index_add_(
        0, inverse, torch.ones_like(inverse)
    )
    return counts[inverse]


def group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over each row's group, per row. NaN values are left out of the mean (``nanmean``)."""
    inverse, num_groups = _dense(group_ids)
    valid = ~torch.isnan(values)
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.where(valid, values, torch.zeros_like(values))
    )
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, valid.to(values.dtype)
    )
    means = sums / counts  # NaN for a group with no valid value
    return means[inverse]


def group_std(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel) standard deviation over each row's group, per row, ignoring NaN (NaN if < 2 valid)."""
    inverse, num_groups = _dense(group_ids)
    valid = ~torch.isnan(values)
    centred = torch.where(valid, values - group_mean(values, group_ids), torch.zeros_like(values))
    sq = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, centred**2)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, valid.to(values.dtype)
    )
    var = sq / (counts - 1)
    var = torch.where(counts > 1, var, torch.full_like(var, float("nan")))
    return var.sqrt()[inverse]


def group_centred(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``R_i − R̄`` with ``R̄`` the group's ``nanmean``; rows whose value is NaN get 0 (no signal, no NaN)."""
    return torch.nan_to_num(values - group_mean(values, group_ids), nan=0.0)


def zero_variance_groups(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per row: True when every valid value of its group is equal (std exactly 0) or it has < 2 valid values."""
    inverse, num_groups = _dense(group_ids)
    valid = ~torch.isnan(values)
    big = torch.finfo(values.dtype).max
    vmin = torch.full((num_groups,), big, dtype=values.dtype, device=values.device).scatter_reduce(
        0, inverse, torch.where(valid, values, torch.full_like(values, big)), reduce="amin"
    )
    vmax = torch.full((num_groups,), -big, dtype=values.dtype, device=values.device).scatter_reduce(
        0, inverse, torch.where(valid, values, torch.full_like(values, -big)), reduce="amax"
    )
    counts = torch.zeros(num_groups, dtype=torch.long, device=values.device).index_add_(0, inverse, valid.long())
    return ((vmax == vmin) | (counts < 2))[inverse]


def count_groups(group_ids: torch.Tensor) -> int:
    """Number of distinct groups in ``group_ids``."""
    return int(torch.unique(group_ids).numel())


def sequence_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_t x_t`` over completion tokens (``mask`` 1), per row. Padding never leaks in, even if it holds inf/NaN."""
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum(-1)


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1/|y|) Σ_t x_t`` per row; an empty completion (mask sum 0) gives 0, not NaN."""
    return sequence_sum(per_token, mask) / mask.sum(-1).clamp(min=1).to(per_token.dtype)


def aggregate_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions, ignoring a function's NaN (None) output; NaN when every one is NaN."""
    rewards = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))
