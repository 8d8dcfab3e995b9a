"""GPG: Group Policy Gradient (arXiv 2504.02546): the loss as plain tensor functions, then ``GPGConfig`` and
``GPGTrainer`` (a ``GroupTrainer``, i.e. a TRL ``GRPOTrainer`` subclass).

Plain REINFORCE with a group-mean baseline: no ratio, no clipping, no reference model, no KL (paper Eq. 5–6), scaled
by the accurate-gradient-estimate factor ``α = B / (B − M)`` (Eq. 7–8) that undoes the dilution by zero-variance
groups. Authors' code: AMAP-ML/GPG ``open-r1/src/open_r1/gpg_trainer.py`` (a TRL 0.16 subclass).

Shapes: ``B`` rows (completions), ``T`` completion positions; ``mask`` is 1 on completion tokens, 0 on padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ._trl_compat import GRPO_LOSS_FIELDS, refuse_unused_grpo_fields
from .columns import ADVANTAGES, GROUP_ID, REWARDS, behaviour_logps
from .config import GroupConfig
from .groups import group_centred, group_std, sequence_sum, zero_variance_groups
from .model_card import PAPERS, tag_names
from .trainer import GroupTrainer

# --- math (pure functions) ---


def gpg_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, std_normalise: bool = False, eps: float = 1e-4
) -> torch.Tensor:
    """``Â_i = (R_i − R̄) / F_norm`` (Eq. 6), shape ``(B,)``.

    ``R̄`` is the group ``nanmean``; ``F_norm = 1`` (default, the paper's best) or, with ``std_normalise``, the
    unbiased group std ``+ eps`` (authors: ``.std(dim=1)`` then ``+ 1e-4``). A NaN reward gives 0, and every row of a
    zero-variance group (all equal, or fewer than 2 valid rewards) gives exactly 0, never NaN or a rounding residue.
    """
    advantages = group_centred(rewards, group_ids)
    if std_normalise:
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
    token_normaliser: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``α · Σ_{i,t} −log π_θ(y_i,t) · Â_i · w_i · mask_i,t / Σ_{i,t} mask_i,t`` (Eq. 5 and 8), a scalar.

    ``advantages`` is ``(B,)`` (or ``(B, T)``); ``importance_weights`` an optional ``(B,)`` per-sequence weight (for
    off-policy rows, see :func:`truncated_sequence_importance_weight`), always detached here.

    Token mean: the authors take it over the LOCAL micro-batch of one process
    (``(per_token_loss * completion_mask).sum() / completion_mask.sum()``, gpg_trainer.py:303), so with several
    processes or uneven lengths it is not the global token mean. By default this function does the same (local
    ``Σ mask``). ``token_normaliser``, when given, replaces that denominator: pass the global token count of the batch
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
    if token_normaliser is None:
        denominator = mask.sum().to(per_token_logps.dtype)
    else:
        denominator = torch.as_tensor(token_normaliser, dtype=per_token_logps.dtype, device=per_token_logps.device)
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


# --- configuration -------------------------------------------------------------------------------------------------


@dataclass
class GPGConfig(GroupConfig):
    r"""Configuration for [`GPGTrainer`]: every [`~trl.GRPOConfig`] field, plus the ones below.

    Defaults follow the paper's best setting (Table 1): ``F_norm = 1`` (``scale_rewards='none'``), ``α = B/(B−M)``
    (``use_age``) and the valid-group threshold ``β_th = 0.6`` (``min_valid_fraction``, dynamic sampling) with up to 20
    extra generation rounds (``max_resample_rounds``).
    GPG is on-policy REINFORCE: ``steps_per_generation`` keeps TRL's default (one generation per optimizer step).
    TRL's ``loss_type``, ``epsilon``, ``epsilon_high``, ``delta`` and ``importance_sampling_level`` are not used and
    must keep TRL's defaults.
    """

    scale_rewards: str = field(
        default="none",
        metadata={
            "help": "F_norm of Â = (R − R̄)/F_norm: 'none' (F_norm = 1, the paper's default and best) or 'group' "
            "(the group's std + 1e-4). 'batch' is not supported.",
        },
    )
    use_age: bool = field(
        default=True,
        metadata={
            "help": "Scale the loss by the accurate-gradient-estimate factor α = B/(B−M) (Eq. 7), B groups of which M "
            "have zero reward variance, counted over all processes in each micro-step. False gives α = 1."
        },
    )
    min_valid_fraction: float = field(
        default=0.6,
        metadata={
            "help": "β_th (dynamic sampling, gvpo_trl.dynamic_sampling): when fewer than this fraction of the "
            "generation batch's groups have a non-zero reward variance, generate further prompts, only as many as "
            "the missing valid groups need, until it is reached (at most max_resample_rounds more rounds), keep the "
            "valid groups and fill up with zero-variance ones. The paper's best: 0.6. 0 disables it."
        },
    )
    importance_weight_cap: float = field(
        default=2.0,
        metadata={
            "help": "Only used off-policy (steps_per_generation > gradient_accumulation_steps, num_iterations > 1, "
            "vLLM, or samples reused by the mixed buffer): each such sequence is weighted by min(π_θ(y)/π_old(y), "
            "cap), truncated importance sampling. Must be > 0."
        },
    )

    def validate(self):
        refuse_unused_grpo_fields(
            self,
            GRPO_LOSS_FIELDS,
            "GPG replaces TRL's clipped policy loss by plain REINFORCE (no ratio, clipping or loss_type; off-policy "
            "rows get GPG's own truncated sequence weight, importance_weight_cap)",
        )
        if self.scale_rewards not in ("none", "group"):
            raise ValueError(
                f"GPGConfig: scale_rewards={self.scale_rewards!r} is not supported. Use 'none' (F_norm = 1, the "
                "paper's default) or 'group' (F_norm = the group's std)."
            )
        if self.beta != 0:
            raise ValueError(
                f"GPGConfig: beta={self.beta} must be 0: GPG has no reference model and no KL term. Set beta=0."
            )
        if not self.importance_weight_cap > 0:
            raise ValueError(f"GPGConfig: importance_weight_cap must be > 0, got {self.importance_weight_cap}.")


# --- trainer -------------------------------------------------------------------------------------------------------


class GPGTrainer(GroupTrainer):
    """Trainer for GPG. Used exactly like ``trl.GRPOTrainer``, with a [`GPGConfig`].

    Loss per micro-step: ``α · Σ_{i,t} −log π_θ(y_i,t) · Â_i / N_tokens`` (Eq. 5-8), ``N_tokens`` the completion
    tokens of the micro-step over all processes (divided by the number of processes, which DDP averages over), so N
    processes compute the loss of one. Rows generated by an older policy (off-policy settings, vLLM, or members reused
    by the mixed buffer, against their stored log-probs) are weighted by ``min(π_θ(y)/π_old(y), cap)``, ``cap`` =
    ``importance_weight_cap``.

    Threshold β_th (``min_valid_fraction``, on by default): dynamic sampling (``gvpo_trl.dynamic_sampling``) refills
    the generation batch with groups that have a reward variance, generating only as many extra prompts as needed.

    Logged metrics (besides TRL's): ``gpg/loss``, ``gpg/alpha`` (α of the micro-step), ``gpg/valid_fraction`` ((B−M)/B
    of the micro-step), ``gpg/importance_weight_mean`` (off-policy only), ``dynamic_sampling/*`` (see there),
    ``groups/zero_variance_frac`` and ``groups/unscorable_frac`` (per generation round). TRL's ``reward`` is averaged
    over every round generated.
    """

    config_class = GPGConfig
    metric_prefix = "gpg"
    _name, _paper, _tag_names = "GPG", PAPERS["gpg"], tag_names("gpg")  # the model card
    needs_behaviour_logps = True  # mixed buffer: a reused member is weighted against its stored log-probs

    def compute_advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return gpg_advantages(rewards, group_ids, std_normalise=self.args.scale_rewards == "group")

    def group_loss(
        self, inputs: dict[str, Any], per_token_logps: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        all_ids, num_groups = self.micro_step_groups(inputs[GROUP_ID], self.group_size)
        all_rewards = self.gather_rows(inputs[REWARDS])
        zero_variance = zero_variance_groups(all_rewards, all_ids)
        num_zero = int(torch.unique(all_ids[zero_variance]).numel())
        alpha = age_alpha(num_groups, num_zero) if self.args.use_age else 1.0

        advantages = inputs[ADVANTAGES].to(per_token_logps.dtype)
        if "importance_sampling_ratio" in inputs:  # TRL's vLLM sampling correction, (B, T) or (B, 1)
            advantages = advantages.unsqueeze(1) * inputs["importance_sampling_ratio"].to(per_token_logps.dtype)
        metrics = {}
        weights = None
        old, off_policy = behaviour_logps(inputs, per_token_logps)
        # one decision for all processes (the metric below gathers): one may hold reused or carried rows, another not
        off_policy = self.accelerator.reduce(torch.tensor([float(off_policy)], device=old.device), "sum").item() > 0
        if off_policy:  # TRL computes old_per_token_logps only when rows may be off-policy; or mixed-buffer rows
            weights = truncated_sequence_importance_weight(per_token_logps, old, mask, self.args.importance_weight_cap)
            metrics["gpg/importance_weight_mean"] = self.gather_rows(weights).mean().item()
        num_tokens = self.accelerator.reduce(mask.sum().detach().to(per_token_logps.dtype), reduction="sum")
        loss = gpg_loss(
            per_token_logps,
            advantages,
            mask,
            alpha,
            importance_weights=weights,
            token_normaliser=num_tokens / self.accelerator.num_processes,
        )
        metrics["gpg/alpha"] = alpha
        metrics["gpg/valid_fraction"] = (num_groups - num_zero) / max(num_groups, 1)
        return loss, metrics
