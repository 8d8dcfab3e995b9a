"""GSPO: Group Sequence Policy Optimization (arXiv 2507.18071), the loss as plain tensor functions.

One length-normalised importance ratio per completion against the behaviour policy, clipped PPO-style and averaged
over SEQUENCES (paper §4.1: objective J_GSPO, group advantage Â_i, ratio s_i), plus the GSPO-token variant for
per-token advantages (§4.3). Plain GSPO matches TRL 1.16's ``importance_sampling_level="sequence"``,
``loss_type="grpo"`` (before its division by the gradient-accumulation steps), whose log-ratio is not bounded.

Shapes: ``B`` rows (completions), ``T`` completion positions; ``mask`` is 1 on completion tokens, 0 on padding.
"""

from __future__ import annotations

import torch

from .groups import group_centered, group_std, sequence_mean

# --- math (pure functions) ---

#: Bound on the per-token-MEAN log-ratio before ``exp``: |mean log π_θ/π_old| ≤ 20 nats, so ``s_i ∈ [e^-20, e^20]``
#: (≈ [2e-9, 4.9e8]), finite in fp32/bf16. Far outside any clip range (ε ~ 1e-3), so inside the bound the loss equals
#: the unbounded one; outside it the ratio is held constant (zero gradient through the bound).
LOG_RATIO_BOUND = 20.0


def gspo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``Â_i = (R_i − R̄) / (std + eps)``, group ``nanmean`` and unbiased ``nanstd`` (as TRL); NaN → 0. ``(B,)``."""
    return torch.nan_to_num(group_centered(rewards, group_ids) / (group_std(rewards, group_ids) + eps), nan=0.0)


def sequence_log_ratio(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    bound: float = LOG_RATIO_BOUND,
) -> torch.Tensor:
    """``log s_i = (1/|y_i|) Σ_t (log π_θ − log π_old)``, clamped to ``[−bound, bound]`` (before any exp). ``(B,)``.

    An empty completion gives 0 (``s_i = 1``). Differentiable w.r.t. ``per_token_logps`` inside the bound.
    """
    return sequence_mean(per_token_logps - old_per_token_logps, mask).clamp(min=-bound, max=bound)


def _clipped_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per element ``−min(r·Â, clip(r, 1−ε_low, 1+ε_high)·Â)`` and TRL's low/high clip flags."""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    is_low = (ratio < 1 - epsilon_low) & (advantages < 0)
    is_high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return loss, is_low.detach(), is_high.detach()


def gspo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
    bound: float = LOG_RATIO_BOUND,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``−(1/B) Σ_i min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i)``, a mean over the ``B`` sequences given.

    ``advantages`` is ``(B,)``. As in TRL, an empty completion contributes 0 but still counts in ``B``.
    ``stats`` (all detached, per sequence, shape ``(B,)``): ``ratio`` = s_i, ``is_low_clipped`` = s_i < 1−ε_low and
    Â_i < 0, ``is_high_clipped`` = s_i > 1+ε_high and Â_i > 0 (TRL's definitions).
    """
    if advantages.dim() != 1:
        raise ValueError(f"gspo_loss takes per-sequence advantages (B,), got shape {tuple(advantages.shape)}")
    ratio = torch.exp(sequence_log_ratio(per_token_logps, old_per_token_logps, mask, bound))
    per_seq, is_low, is_high = _clipped_objective(ratio, advantages, epsilon_low, epsilon_high)
    nonempty = (mask.sum(-1) > 0).to(per_seq.dtype)
    loss = (per_seq * nonempty).mean()
    stats = {"ratio": ratio.detach(), "is_low_clipped": is_low, "is_high_clipped": is_high}
    return loss, stats


def gspo_token_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
    bound: float = LOG_RATIO_BOUND,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token (§4.3): ``s_i,t = sg(s_i) · π_θ(y_i,t) / sg(π_θ(y_i,t))``, same clip, seq-mean-token-mean.

    ``advantages`` is ``(B,)`` or per token ``(B, T)``. ``s_i,t`` equals ``s_i`` in value and its gradient is
    ``s_i ∇log π_θ(y_i,t)``, so with a per-sequence advantage value and gradient equal :func:`gspo_loss` (also where
    the log-ratio bound is hit: no gradient there in either).
    ``stats``: ``ratio`` = s_i ``(B,)``; ``is_low_clipped`` / ``is_high_clipped`` per token ``(B, T)``, False on pads.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    raw = sequence_mean(per_token_logps - old_per_token_logps, mask).detach()
    log_s = raw.clamp(min=-bound, max=bound)
    # log s_i,t = sg(log s_i) + log π_θ − sg(log π_θ); padding may hold anything, so zero it before the exp. Where the
    # bound is hit, GSPO's s_i has no gradient (clamp), so the live term is switched off there too to stay equal.
    inside = ((raw >= -bound) & (raw <= bound)).to(per_token_logps.dtype).unsqueeze(1)
    live = torch.where(mask.bool(), per_token_logps, torch.zeros_like(per_token_logps))
    ratio = torch.exp(log_s.unsqueeze(1) + inside * (live - live.detach()))
    per_token, is_low, is_high = _clipped_objective(ratio, advantages, epsilon_low, epsilon_high)
    loss = sequence_mean(per_token, mask).mean()
    on = mask.bool()
    stats = {"ratio": torch.exp(log_s), "is_low_clipped": is_low & on, "is_high_clipped": is_high & on}
    return loss, stats
