"""GVPO: Group Variance Policy Optimization (Zhang et al., arXiv 2504.19599, NeurIPS 2025).

For a prompt x with a group of k completions y_1..y_k, rewards R_i and the implicit reward
``r_θ(x, y_i) = β · (log π_θ(y_i|x) − log π_θ'(y_i|x))`` (log-probs summed over completion tokens), GVPO minimises

    L_group = 1/(k−1) · Σ_i ½ · [ (r_θ,i − mean_j r_θ,j) − (R_i − R̄) ]²          (paper Eq. 8, MSE form)

with the group mean of r_θ detached, averaged over the groups of the batch. θ' is the policy the step aligns to:
the rollout policy π_old (the authors' default) or the frozen initial model π_ref (Theorem 1: the unique minimiser
is then π* ∝ π_ref · exp(R/β)). Its gradient equals that of the weight form

    loss = −β/(k−1) · Σ_i stopgrad(w_i) · log π_θ(y_i),   w_i = (R_i − R̄) − β · (Δ_i − mean_j Δ_j)

with Δ_i = log π_θ(y_i) − log π_θ'(y_i). No ratio, no clipping, no KL term, no importance weights: by Theorem 2 the
optimum is the same for any sampling distribution that covers π_θ's support, so off-policy samples need no weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .columns import GROUP_ID, REWARDS
from .config import GroupConfig
from .groups import count_groups, group_centred, group_mean, group_sizes, sequence_sum
from .model_card import PAPERS, tag_names
from .trainer import GroupTrainer

# --- math (pure functions) ---------------------------------------------------------------------------------------


def gvpo_loss(
    seq_logps: torch.Tensor,
    ref_seq_logps: torch.Tensor,
    centred_rewards: torch.Tensor,
    delta_group_mean: torch.Tensor,
    group_size: torch.Tensor,
    beta: float,
    num_groups: float,
) -> torch.Tensor:
    """Eq. 8 averaged over groups: ``Σ_i ½ [β(Δ_i − Δ̄) − (R_i − R̄)]² / (k − 1)``, divided by ``num_groups``.

    ``seq_logps`` (Σ_t log π_θ) carries the gradient; ``ref_seq_logps`` (θ') and the group statistics are constants.
    The statistics (``centred_rewards`` R_i − R̄, ``delta_group_mean`` Δ̄ under the current θ, ``group_size`` k, per
    row) span whole groups, which may be spread over processes: compute them over all rows
    (:func:`gvpo_group_statistics` for a batch that holds whole groups) and pass this process's rows. Rows of groups
    of size < 2 give 0. ``num_groups`` is the number of groups the loss averages over (divided by the number of
    processes when DDP averages gradients over them).
    """
    delta = seq_logps - ref_seq_logps.detach()
    error = beta * (delta - delta_group_mean.detach()) - centred_rewards.detach()
    k = group_size.to(seq_logps.dtype)
    rows = torch.where(group_size > 1, 0.5 * error**2 / (k - 1).clamp(min=1), torch.zeros_like(error))
    return rows.sum() / num_groups


def gvpo_group_statistics(
    seq_logps: torch.Tensor, ref_seq_logps: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor
) -> dict[str, Any]:
    """The group statistics :func:`gvpo_loss` takes, for rows that hold whole groups: R_i − R̄ (NaN rewards give 0),
    Δ̄ of each row's group, its size, and the number of groups."""
    delta = (seq_logps - ref_seq_logps).detach()
    return {
        "centred_rewards": group_centred(rewards, group_ids),
        "delta_group_mean": group_mean(delta, group_ids),
        "group_size": group_sizes(group_ids),
        "num_groups": count_groups(group_ids),
    }


def gvpo_metrics(delta: torch.Tensor, statistics: dict[str, Any], beta: float) -> dict[str, float]:
    """Logged diagnostics over all rows, from their Δ and :func:`gvpo_group_statistics`: ``gvpo/mse`` (mean of
    ``[β(Δ_i − Δ̄) − (R_i − R̄)]²``), the mean and std of Δ, and the groups of fewer than 2 members."""
    error = beta * (delta - statistics["delta_group_mean"]) - statistics["centred_rewards"]
    small = statistics["group_size"] < 2
    return {
        "gvpo/mse": (error**2).mean().item(),
        "gvpo/delta_mean": delta.mean().item(),
        "gvpo/delta_std": delta.std().item() if delta.numel() > 1 else 0.0,
        "gvpo/skipped_groups": float(small.sum().item()),  # a group of fewer than 2 has one row
    }


def gvpo_weights(
    seq_logps: torch.Tensor, ref_seq_logps: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor, beta: float
) -> torch.Tensor:
    """``w_i = (R_i − R̄) − β (Δ_i − Δ̄)`` (detached), the per-sequence weight of the policy gradient."""
    delta = (seq_logps - ref_seq_logps).detach()
    return group_centred(rewards, group_ids) - beta * (delta - group_mean(delta, group_ids))


def gvpo_weight_loss(
    seq_logps: torch.Tensor, ref_seq_logps: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor, beta: float
) -> torch.Tensor:
    """The weight form ``−β/(k−1) Σ_i w_i log π_θ(y_i)`` averaged over groups: same gradient as ``gvpo_loss``."""
    w = gvpo_weights(seq_logps, ref_seq_logps, rewards, group_ids, beta)
    k = group_sizes(group_ids).to(seq_logps.dtype)
    rows = torch.where(k > 1, -beta / (k - 1).clamp(min=1) * w * seq_logps, torch.zeros_like(seq_logps))
    return rows.sum() / count_groups(group_ids)


# --- configuration -------------------------------------------------------------------------------------------------


@dataclass
class GVPOConfig(GroupConfig):
    r"""Configuration for [`GVPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the ones below.

    Defaults follow the authors' released setup: β = 0.1, k = 4, θ' = the rollout policy, several optimizer steps per
    rollout (``steps_per_generation = 4 × gradient_accumulation_steps``, so Δ ≠ 0 after the first), rewards
    mean-centred and never divided by the std. TRL's ``loss_type``, ``epsilon``, ``epsilon_high``, ``delta`` and
    ``importance_sampling_level`` are not used and must keep TRL's defaults.
    """

    gvpo_beta: float = field(
        default=0.1,
        metadata={"help": "β of GVPO: scale of the implicit reward β·(log π_θ − log π_θ'). Must be > 0."},
    )
    gvpo_reference: str = field(
        default="rollout",
        metadata={
            "help": "The policy θ' the step aligns to: 'rollout' (the policy that generated the batch, the authors' "
            "default; no reference model is loaded) or 'initial' (a frozen copy of the initial model, Theorem 1; with "
            "PEFT, the model with its adapter disabled).",
            "choices": ["rollout", "initial"],
        },
    )
    num_generations: int | None = field(
        default=4, metadata={"help": "Group size k: completions per prompt (the authors' script uses 4)."}
    )
    scale_rewards: str = field(
        default="none",
        metadata={"help": "Must stay 'none': GVPO mean-centres rewards within a group and never divides by the std."},
    )

    updates_per_rollout = 4  # the authors' 4 optimizer steps per rollout

    def validate(self):
        from ._trl_compat import GRPO_LOSS_FIELDS, refuse_unused_grpo_fields

        refuse_unused_grpo_fields(
            self, GRPO_LOSS_FIELDS, "GVPO replaces TRL's clipped policy loss by its own (no ratio, clipping, loss_type)"
        )
        if self.gvpo_beta <= 0:
            raise ValueError(f"GVPOConfig: gvpo_beta must be > 0 (the authors use 0.1), got {self.gvpo_beta}.")
        if self.gvpo_reference not in ("rollout", "initial"):
            raise ValueError(f"GVPOConfig: gvpo_reference must be 'rollout' or 'initial', got {self.gvpo_reference!r}.")
        if self.beta < 0:
            raise ValueError(f"GVPOConfig: beta must not be negative, got {self.beta}. Leave it at 0.")
        if self.gvpo_reference == "rollout" and self.beta != 0:
            raise ValueError(
                f"GVPOConfig: beta={self.beta} (TRL's KL coefficient) must be 0: GVPO adds no KL term, its "
                "regularisation strength is gvpo_beta. To align to a frozen reference model instead of the rollout "
                "policy, set gvpo_reference='initial'."
            )
        if self.gvpo_reference == "initial":
            if self.beta not in (0.0, self.gvpo_beta):
                raise ValueError(
                    f"GVPOConfig: with gvpo_reference='initial', leave beta at 0 (it is set to gvpo_beta so that TRL "
                    f"loads the reference model); got beta={self.beta}, gvpo_beta={self.gvpo_beta}."
                )
            # TRL loads the reference model (or disables the PEFT adapter) and computes its log-probs iff beta != 0;
            # the GVPO loss replaces TRL's, so no KL term is ever added.
            self.beta = self.gvpo_beta
        if self.scale_rewards != "none":
            raise ValueError(
                f"GVPOConfig: scale_rewards={self.scale_rewards!r}: GVPO mean-centres rewards and never divides by "
                "the std (that would change the optimum). Set scale_rewards='none'."
            )


# --- trainer -------------------------------------------------------------------------------------------------------


class GVPOTrainer(GroupTrainer):
    """Trainer for GVPO. Used exactly like ``trl.GRPOTrainer``, with a [`GVPOConfig`].

    Logged metrics (besides TRL's): ``gvpo/loss``, ``gvpo/mse`` (mean over rows of
    ``[(r_i − r̄) − (R_i − R̄)]²``), ``gvpo/delta_mean`` and ``gvpo/delta_std`` (the log-ratio Δ), ``gvpo/skipped_groups``
    (groups of fewer than 2 members), ``groups/zero_variance_frac`` and ``groups/unscorable_frac``.
    """

    config_class = GVPOConfig
    metric_prefix = "gvpo"
    _name, _paper, _tag_names = "GVPO", PAPERS["gvpo"], tag_names("gvpo")  # the model card

    def compute_advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return group_centred(rewards, group_ids)

    def group_loss(
        self, inputs: dict[str, Any], per_token_logps: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        beta = self.args.gvpo_beta
        seq_logps = sequence_sum(per_token_logps, mask)
        key = "ref_per_token_logps" if self.args.gvpo_reference == "initial" else "old_per_token_logps"
        # TRL leaves out the rollout log-probs when each rollout gets exactly one optimizer step: then θ' = θ.
        reference = inputs.get(key)
        ref_seq_logps = seq_logps.detach() if reference is None else sequence_sum(reference.float(), mask)

        # the micro-step's groups are whole over all processes: their statistics are computed on every row
        all_ids, _ = self.micro_step_groups(inputs[GROUP_ID], self.group_size)
        all_seq, all_ref = self.gather_rows(seq_logps), self.gather_rows(ref_seq_logps)
        stats = gvpo_group_statistics(all_seq, all_ref, self.gather_rows(inputs[REWARDS]), all_ids)
        local = self._local_slice(seq_logps.numel())
        # each process holds its share of the micro-step's groups; DDP averages gradients over processes
        loss = gvpo_loss(
            seq_logps,
            ref_seq_logps,
            stats["centred_rewards"][local],
            stats["delta_group_mean"][local],
            stats["group_size"][local],
            beta,
            stats["num_groups"] / self.accelerator.num_processes,
        )
        return loss, gvpo_metrics(all_seq - all_ref, stats, beta)
