"""What the mixed buffer counts and logs: generated tokens, and the make-up of each mixed generation batch."""

from __future__ import annotations

import torch

from ..groups import aggregate_rewards
from .planning import GroupPlan
from .store import SampleBuffer

#: Running totals kept with the buffer (and in its checkpoint file).
STAT_NAMES = ("generated_tokens", "generated_rows", "historical_rows", "external_rows", "drift_evicted",
              "reuse_evicted")  # fmt: skip


def generated_lengths(completion_ids: list, tool_mask: list | None) -> list[int]:
    """Tokens the policy generated per completion: all of them, or those ``tool_mask`` marks (not tool output)."""
    return [sum(m) for m in tool_mask] if tool_mask is not None else [len(ids) for ids in completion_ids]


def plan_metrics(plan: list[GroupPlan], k: int, step: int, store: SampleBuffer) -> dict[str, float]:
    """``buffer/*`` metrics of one global plan (identical on every process), before the store changes."""
    rows = len(plan) * k
    num_hist = sum(len(p.historical) for p in plan)
    metrics = {
        "buffer/historical_share": num_hist / rows,
        "buffer/external_share": sum(int(p.external) for p in plan) / rows,
        "buffer/equalised_members": float(sum(p.cut for p in plan)),
    }
    if num_hist:
        stale = [step - store[uid].step for p in plan for uid in p.historical]
        metrics["buffer/mean_staleness"] = sum(stale) / len(stale)
    return metrics


def fresh_reward(plan: list[GroupPlan], k: int, rewards_per_func: torch.Tensor, weights: torch.Tensor) -> float:
    """Mean reward of the fresh members of a plan (global rows), NaN rewards left out."""
    total = aggregate_rewards(rewards_per_func.detach().float().cpu(), weights.detach().cpu())
    fresh = torch.tensor([pos < p.num_fresh(k) for p in plan for pos in range(k)])
    return torch.nanmean(total[fresh]).item()


def signal_from_history(plan: list[GroupPlan], k: int, rewards_per_func: torch.Tensor, weights: torch.Tensor) -> float:
    """Share of a plan's groups whose rewards vary although their fresh members all scored the same: groups that
    have a gradient (group-centred rewards not all 0) only thanks to their historical or external members."""
    total = aggregate_rewards(rewards_per_func.detach().float().cpu(), weights.detach().cpu()).view(len(plan), k)
    gained = 0
    for p, rewards in zip(plan, total, strict=True):
        fresh, others = rewards[: p.num_fresh(k)], rewards[p.num_fresh(k) :]
        fresh, others = fresh[~fresh.isnan()], others[~others.isnan()]
        fresh_agree = fresh.unique().numel() <= 1
        gained += int(len(others) > 0 and fresh_agree and torch.cat([fresh, others]).unique().numel() > 1)
    return gained / len(plan)
