"""GSPO: Group Sequence Policy Optimization (arXiv 2507.18071): the loss as plain tensor functions, then
``GSPOConfig`` and ``GSPOTrainer`` (a ``GroupTrainer``, i.e. a TRL ``GRPOTrainer`` subclass).

One length-normalised importance ratio per completion against the behaviour policy, clipped PPO-style and averaged
over SEQUENCES (paper §4.1: objective J_GSPO, group advantage Â_i, ratio s_i), plus the GSPO-token variant for
per-token advantages (§4.3). Plain GSPO matches TRL 1.16's ``importance_sampling_level="sequence"``,
``loss_type="grpo"`` (before its division by the gradient-accumulation steps), whose log-ratio is not bounded.

Shapes: ``B`` rows (completions), ``T`` completion positions; ``mask`` is 1 on completion tokens, 0 on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .columns import ADVANTAGES, behaviour_logps
from .config import GroupConfig
from .groups import group_centred, group_std, sequence_mean, zero_variance_groups
from .model_card import PAPERS, tag_names
from .trainer import GroupTrainer

# --- math (pure functions) ---

#: Bound on the per-token-MEAN log-ratio before ``exp``: |mean log π_θ/π_old| ≤ 20 nats, so ``s_i ∈ [e^-20, e^20]``
#: (≈ [2e-9, 4.9e8]), finite in fp32/bf16. Far outside any clip range (ε ~ 1e-3), so inside the bound the loss equals
#: the unbounded one; outside it the ratio is held constant (zero gradient through the bound).
LOG_RATIO_BOUND = 20.0


def gspo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``Â_i = (R_i − R̄) / (std + eps)``, group ``nanmean`` and unbiased ``nanstd`` (as TRL); NaN → 0. ``(B,)``."""
    return torch.nan_to_num(group_centred(rewards, group_ids) / (group_std(rewards, group_ids) + eps), nan=0.0)


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
    per_token_weights: torch.Tensor | None = None,
    token_level: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (§4.1): ``−(1/B) Σ_i min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i)``, a mean over the ``B`` sequences;
    with ``token_level``, GSPO-token (§4.3).

    Both are computed in GSPO-token's form: ``s_i,t = sg(s_i) · π_θ(y_i,t) / sg(π_θ(y_i,t))`` equals ``s_i`` in value,
    and its gradient ``s_i ∇log π_θ(y_i,t)`` averaged over the sequence's tokens is the gradient of ``s_i``; so for a
    per-sequence advantage, the token mean of the per-token terms is GSPO's per-sequence term, in value and gradient
    (also where the log-ratio bound is hit: no gradient there in either). An empty completion contributes 0 but still
    counts in ``B`` (as TRL).

    ``advantages``: ``(B,)``, or per token ``(B, T)`` with ``token_level``. ``per_token_weights`` (optional, detached,
    ``(B, T)`` or ``(B, 1)``; TRL's vLLM ``importance_sampling_ratio``) multiplies each token's term (for GSPO: each
    sequence's term by the sequence mean of its weights, as TRL does). ``stats`` (detached): ``ratio`` = s_i ``(B,)``;
    ``is_low_clipped`` (s_i < 1−ε_low and Â < 0) and ``is_high_clipped`` (s_i > 1+ε_high and Â > 0), TRL's
    definitions, per sequence ``(B,)`` for GSPO and per token ``(B, T)`` (False on padding) for GSPO-token.
    """
    if not token_level and advantages.dim() != 1:
        raise ValueError(f"gspo_loss takes per-sequence advantages (B,), got shape {tuple(advantages.shape)}")
    per_token_advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    raw = sequence_mean(per_token_logps - old_per_token_logps, mask)
    log_s = raw.clamp(min=-bound, max=bound)
    # log s_i,t = sg(log s_i) + log π_θ − sg(log π_θ); padding may hold anything, so zero it before the exp. Where the
    # bound is hit, s_i has no gradient (clamp), so the live term is switched off there too.
    inside = ((raw.detach() >= -bound) & (raw.detach() <= bound)).to(per_token_logps.dtype).unsqueeze(1)
    live = torch.where(mask.bool(), per_token_logps, torch.zeros_like(per_token_logps))
    ratio = torch.exp(log_s.detach().unsqueeze(1) + inside * (live - live.detach()))
    per_token, is_low, is_high = _clipped_objective(ratio, per_token_advantages, epsilon_low, epsilon_high)
    if per_token_weights is not None:
        per_token = per_token * per_token_weights.detach().to(per_token.dtype)
    loss = sequence_mean(per_token, mask).mean()
    on = mask.bool()
    is_low, is_high = is_low & on, is_high & on
    if not token_level:  # one ratio and one advantage per sequence: its tokens agree
        is_low, is_high = is_low.any(dim=1), is_high.any(dim=1)
    return loss, {"ratio": torch.exp(log_s.detach()), "is_low_clipped": is_low, "is_high_clipped": is_high}


def gspo_kl(
    per_token_logps: torch.Tensor,
    ref_per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    bias_correction: bool,
) -> torch.Tensor:
    """The mean over sequences of the sequence mean of TRL's k3 estimate ``exp(ref − logπ) − (ref − logπ) − 1``,
    times the differentiable ``s_i`` under TRL's ``use_bias_correction_kl``; a scalar (added as ``beta × kl``)."""
    diff = ref_per_token_logps - per_token_logps
    per_token_kl = torch.exp(diff) - diff - 1
    if bias_correction:
        per_token_kl = per_token_kl * torch.exp(
            sequence_log_ratio(per_token_logps, old_per_token_logps, mask)
        ).unsqueeze(1)
    return sequence_mean(per_token_kl, mask).mean()


def clip_counts(stats: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``[low, high, low + high, total]`` clipped counts of :func:`gspo_loss`'s ``stats``: of sequences (GSPO, as TRL
    counts them) or of completion tokens (GSPO-token); sum them over processes, then divide by the total."""
    low, high = stats["is_low_clipped"].float(), stats["is_high_clipped"].float()
    weight = mask.float() if low.dim() == 2 else torch.ones_like(low)
    return torch.stack([(low * weight).sum(), (high * weight).sum(), ((low + high) * weight).sum(), weight.sum()])


# --- configuration -------------------------------------------------------------------------------------------------


@dataclass
class GSPOConfig(GroupConfig):
    r"""Configuration for [`GSPOTrainer`]: every [`~trl.GRPOConfig`] field, with GSPO's defaults, plus ``gspo_token``.

    Defaults follow the paper: clip range ``ε_low = 3e-4`` (``epsilon``), ``ε_high = 4e-4`` (``epsilon_high``), no KL
    (``beta = 0``), std-normalised group advantages (``scale_rewards='group'``), a mean over sequences
    (``loss_type='grpo'``, ``importance_sampling_level='sequence'``, the only values accepted), and each rollout split
    into four minibatches: ``steps_per_generation = 4 × gradient_accumulation_steps`` when neither it nor
    ``generation_batch_size`` is set (on-policy GSPO is GRPO).
    """

    epsilon: float = field(default=3e-4, metadata={"help": "ε_low: lower clip range of s_i (paper: 3e-4)."})
    epsilon_high: float | None = field(
        default=4e-4, metadata={"help": "ε_high: upper clip range of s_i (paper: 4e-4). None means = epsilon."}
    )
    importance_sampling_level: str = field(
        default="sequence",
        metadata={"help": "Must stay 'sequence' (GSPO's ratio is per sequence); see gspo_token for the token variant."},
    )
    loss_type: str = field(
        default="grpo", metadata={"help": "Must stay 'grpo': GSPO averages over sequences, never over tokens."}
    )
    scale_rewards: str = field(
        default="group", metadata={"help": "Must stay 'group': Â_i = (R_i − R̄) / (group std + 1e-4)."}
    )
    gspo_token: bool = field(
        default=False,
        metadata={
            "help": "Use GSPO-token (§4.3): per-token ratios s_i,t = sg(s_i)·π_θ(y_t)/sg(π_θ(y_t)), aggregated "
            "seq-mean-token-mean; for per-token advantages. Equals GSPO for per-sequence advantages."
        },
    )

    updates_per_rollout = 4  # the paper's four minibatches per rollout

    def validate(self):
        if self.importance_sampling_level != "sequence":
            raise ValueError(
                f"GSPOConfig: importance_sampling_level={self.importance_sampling_level!r}: GSPO's importance ratio "
                "is per sequence. Leave it at 'sequence'; for the GSPO-token variant set gspo_token=True."
            )
        if self.loss_type != "grpo":
            raise ValueError(
                f"GSPOConfig: loss_type={self.loss_type!r}: GSPO averages its per-sequence loss over sequences "
                "(TRL's 'grpo'); token-weighted aggregations weight sequences by their length. Set loss_type='grpo'."
            )
        if self.scale_rewards != "group":
            raise ValueError(
                f"GSPOConfig: scale_rewards={self.scale_rewards!r}: GSPO's advantage is normalised by the group std. "
                "Set scale_rewards='group'."
            )
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if not (0 < self.epsilon < 1 and self.epsilon_high > 0):
            raise ValueError(
                f"GSPOConfig: need 0 < epsilon < 1 and epsilon_high > 0 (paper: 3e-4 and 4e-4), got "
                f"epsilon={self.epsilon}, epsilon_high={self.epsilon_high}."
            )
        if self.beta < 0:
            raise ValueError(f"GSPOConfig: beta (the KL coefficient) must be >= 0, got {self.beta}. GSPO uses 0.")
        if self.delta is not None:
            raise ValueError(
                f"GSPOConfig: delta={self.delta!r}: delta (two-sided clipping) is not part of GSPO, so the value would "
                "be silently ignored. Leave it at TRL's default (delta=None)."
            )


# --- trainer -------------------------------------------------------------------------------------------------------


class GSPOTrainer(GroupTrainer):
    """Trainer for GSPO. Used exactly like ``trl.GRPOTrainer``, with a [`GSPOConfig`].

    Loss per micro-step: ``−(1/B) Σ_i min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i)`` (paper §4.1) with
    ``log s_i`` the token mean of ``log π_θ − log π_old`` bounded to ±``LOG_RATIO_BOUND`` before the exp; π_old is the
    rollout policy (TRL's ``old_per_token_logps``, or the detached current policy when TRL leaves them out because
    training is exactly on-policy; for a member reused by the mixed buffer, its stored behaviour log-probs). With
    ``beta > 0``, ``beta ×`` the sequence mean of TRL's k3 KL estimate is added (times s_i under TRL's
    ``use_bias_correction_kl``). With ``gspo_token`` the GSPO-token loss (§4.3) is used instead. Inside the bound,
    equal in value and gradient to TRL's ``importance_sampling_level="sequence"``, ``loss_type="grpo"``.

    Logged metrics (besides TRL's): ``gspo/loss``, ``gspo/ratio_mean`` and ``gspo/ratio_std`` (s_i over all processes),
    ``gspo/clip_ratio/low``, ``gspo/clip_ratio/high``, ``gspo/clip_ratio/region`` (fraction of sequences, or of tokens
    with ``gspo_token``, clipped), ``gspo/kl`` (when ``beta > 0``), ``groups/zero_variance_frac``,
    ``groups/unscorable_frac``.
    """

    config_class = GSPOConfig
    metric_prefix = "gspo"
    _name, _paper, _tag_names = "GSPO", PAPERS["gspo"], tag_names("gspo")  # the model card
    needs_behaviour_logps = True  # mixed buffer: s_i of a reused member is taken against its stored log-probs

    def compute_advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        advantages = gspo_advantages(rewards, group_ids)
        # a constant group gives (R − R̄)/1e-4: exactly 0, unless R̄ has a rounding residue that 1e4 would amplify
        return torch.where(zero_variance_groups(rewards, group_ids), torch.zeros_like(advantages), advantages)

    def group_loss(
        self, inputs: dict[str, Any], per_token_logps: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        old, _ = behaviour_logps(inputs, per_token_logps)
        loss, stats = gspo_loss(
            per_token_logps,
            old,
            inputs[ADVANTAGES].to(per_token_logps.dtype),
            mask,
            epsilon_low=self.args.epsilon,
            epsilon_high=self.args.epsilon_high,
            per_token_weights=inputs.get("importance_sampling_ratio"),  # TRL's vLLM sampling correction
            token_level=self.args.gspo_token,
        )
        metrics = {}
        if self.args.beta != 0:
            ref = inputs["ref_per_token_logps"].to(per_token_logps.dtype)
            kl = gspo_kl(per_token_logps, ref, old, mask, self.args.use_bias_correction_kl)
            loss = loss + self.args.beta * kl
            metrics["gspo/kl"] = self.gather_rows(kl).mean().item()
        ratios = self.gather_rows(stats["ratio"])
        counts = self.accelerator.reduce(clip_counts(stats, mask), reduction="sum")
        total = counts[3].clamp(min=1)
        metrics.update(
            {
                "gspo/ratio_mean": ratios.mean().item(),
                "gspo/ratio_std": ratios.std().item() if ratios.numel() > 1 else 0.0,
                "gspo/clip_ratio/low": (counts[0] / total).item(),
                "gspo/clip_ratio/high": (counts[1] / total).item(),
                "gspo/clip_ratio/region": (counts[2] / total).item(),
            }
        )
        return loss, metrics
