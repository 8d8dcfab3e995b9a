"""GPG: Group Policy Gradient (arXiv 2504.02546), the loss as plain tensor functions.

Plain REINFORCE with a group-mean baseline: no ratio, no clipping, no reference model, no KL (paper Eq. 5–6), scaled
by the accurate-gradient-estimate factor ``α = B / (B − M)`` (Eq. 7–8) that undoes the dilution by zero-variance
groups. Authors' code: AMAP-ML/GPG ``open-r1/src/open_r1/gpg_trainer.py`` (a TRL 0.16 subclass).

Shapes: ``B`` rows (completions), ``T`` completion positions; ``mask`` is 1 on completion tokens, 0 on padding.
"""

from __future__ import annotations

import math

import torch

from .groups import group_centered, group_std, sequence_sum, zero_variance_groups

# --- math (pure functions) ---


def gpg_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, std_normalize: bool = False, eps: float = 1e-4
) -> torch.Tensor:
    """``Â_i = (R_i − R̄) / F_norm`` (Eq. 6), shape ``(B,)``.

    ``R̄`` is the group ``nanmean``; ``F_norm = 1`` (default, the paper's best) or, with ``std_normalize``, the
    unbiased group std ``+ eps`` (authors: ``.std(dim=1)`` then ``+ 1e-4``). A NaN reward gives 0, and every row of a
    zero-variance group (all equal, or fewer than 2 valid rewards) gives exactly 0, never NaN or a rounding residue.
    """
    advantages = group_centered(rewards, group_ids)
    if std_normalize:
        advantages = advantages / (group_std(rewards, group_ids) + eps)
    advantages = torch.where(zero_variance_groups(rewards, group_ids), torch.zeros_like(advantages), advantages)
    return torch.nan_to_num(advantages, nan=0.0)


def age_alpha(num_groups: int, num_zero_variance_groups: int) -> float:
    """``α = B / (B − M)`` (Eq. 7) with ``B`` groups of which ``M`` have zero reward variance, both counted globally.

    When every group is zero-variance (``M == B``, including ``B == 0``) all advantages are 0 and so is the gradient;
    α is then defined as 1.0 rather than dividing by zero. (The authors' code divides the loss by
    ``inverse_alpha = (B − M)/B`` and would give 0/0 = NaN there; in training it asserts before reaching it.)
    """
    b, m = int(num_groups), int(num_zero_variance_groups)
    if b < 0 or m < 0 or m > b:
        raise ValueError(f"need 0 <= num_zero_variance_groups <= num_groups, got M={m}, B={b}")
    if m == b:
        return 1.0
    return b / (b - m)


def gpg_loss(
    per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    alpha: float | torch.Tensor,
    importance_weights: torch.Tensor | None = None,
    token_normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``α · Σ_{i,t} −log π_θ(y_i,t) · Â_i · w_i · mask_i,t / Σ_{i,t} mask_i,t`` (Eq. 5 and 8), a scalar.

    ``advantages`` is ``(B,)`` (or ``(B, T)``); ``importance_weights`` an optional ``(B,)`` per-sequence weight (for
    off-policy rows, see :func:`truncated_sequence_importance_weight`), always detached here.

    Token mean: the authors take it over the LOCAL micro-batch of one process
    (``(per_token_loss * completion_mask).sum() / completion_mask.sum()``, gpg_trainer.py:303), so with several
    processes or uneven lengths it is not the global token mean. By default this function does the same (local
    ``Σ mask``). ``token_normalizer``, when given, replaces that denominator: pass the global token count of the batch
    the gradient is meant to average over (divided by the world size if DDP averages gradients over processes) to make
    N processes equal one. Either denominator is clamped to ≥ 1, so an all-empty batch gives 0, not NaN.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    coef = advantages
    if importance_weights is not None:
        coef = coef * importance_weights.detach().unsqueeze(1)
    per_token_loss = -per_token_logps * coef
    total = sequence_sum(per_token_loss, mask).sum()
    if token_normalizer is None:
        denominator = mask.sum().to(per_token_logps.dtype)
    else:
        denominator = torch.as_tensor(token_normalizer, dtype=per_token_logps.dtype, device=per_token_logps.device)
    return alpha * total / denominator.clamp(min=1.0)


def truncated_sequence_importance_weight(
    per_token_logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """``w_i = min(π_θ(y_i) / π_b(y_i), cap) = exp(min(Σ_t (log π_θ − log π_b), log cap))``, shape ``(B,)``, detached.

    The sequence log-ratio (a SUM, not length-normalised: the true likelihood ratio of the whole completion) is
    bounded above by ``log cap`` BEFORE the exp, so extreme ratios give ``cap`` (or 0 from below), never inf/NaN.
    An empty completion gets weight ``min(1, cap)``. ``cap`` must be > 0; ``cap = inf`` bounds at dtype max / e.
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    log_ratio = sequence_sum(per_token_logps.detach() - behaviour_logps.detach(), mask)
    # 1 nat below the dtype's max: rounding log(max) to the dtype can overflow exp (fp32 gives inf otherwise)
    upper = min(math.log(cap), math.log(torch.finfo(log_ratio.dtype).max) - 1.0)
    return torch.exp(log_ratio.clamp(max=upper)).clamp(max=cap)
