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
from .base import GroupConfig, GroupTrainer
from .columns import behaviour_logps
from .groups import group_centered, group_std, sequence_sum, zero_variance_groups
from .model_card import PAPERS, tag_names
from .rows import concat_generation_outputs, merge_images, split_images, take_rows

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


# --- extra prompts from a stream ---------------------------------------------------------------------------------


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is a streaming dataset (no ``len``, no indexing): ``datasets.IterableDataset`` or a torch
    ``IterableDataset``."""
    from datasets import IterableDataset as HFIterableDataset

    return isinstance(dataset, (HFIterableDataset, torch.utils.data.IterableDataset))


class ExtraPromptStream:
    """A second, independent pass over a streaming dataset, for GPG's extra generation rounds.

    ``position`` counts the examples read since the start, across passes: when the stream ends, the next pass starts
    (with ``shuffle``, a ``datasets.IterableDataset`` is reshuffled with ``seed + 1 + pass``, TRL's buffered shuffle;
    the main training pass uses ``seed``). ``seek(p)`` reads forward to position ``p`` (from the start if ``p`` lies
    behind), so the examples at a position depend on the position alone: identical on every process, and after a
    resume. Reading forward costs one read per skipped example (image columns are decoded).
    """

    def __init__(self, dataset: Any, seed: int, shuffle: bool):
        self.dataset, self.seed, self.shuffle = dataset, int(seed), shuffle
        self._restart()

    def _restart(self) -> None:
        self.position, self.passes, self._read_in_pass = 0, 0, 0
        self._iterator = self._open()

    def _open(self):
        dataset = self.dataset
        from datasets import IterableDataset as HFIterableDataset

        if self.shuffle and isinstance(dataset, HFIterableDataset):
            dataset = dataset.shuffle(seed=self.seed + 1 + self.passes)
        return iter(dataset)

    def next(self) -> dict[str, Any]:
        try:
            example = next(self._iterator)
        except StopIteration:
            if self._read_in_pass == 0:
                raise ValueError("GPGTrainer: the streaming train_dataset yields no examples.") from None
            self.passes, self._read_in_pass = self.passes + 1, 0
            self._iterator = self._open()
            return self.next()
        self.position += 1
        self._read_in_pass += 1
        return example

    def seek(self, position: int) -> None:
        if position < self.position:
            self._restart()
        while self.position < position:
            self.next()


# --- configuration -------------------------------------------------------------------------------------------------


@dataclass
class GPGConfig(GroupConfig):
    r"""Configuration for [`GPGTrainer`]: every [`~trl.GRPOConfig`] field, plus the ones below.

    Defaults follow the paper's best setting (Table 1): ``F_norm = 1`` (``scale_rewards='none'``), ``α = B/(B−M)``
    (``use_age``) and the valid-group threshold ``β_th = 0.6`` (``min_valid_fraction``) with up to 20 generation rounds.
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
            "help": "β_th: when fewer than this fraction of the generation batch's groups have a non-zero reward "
            "variance, generate further prompts until it is reached (at most max_resample_rounds more rounds), keep "
            "the valid groups and fill up with zero-variance groups of the last round. 0 disables it."
        },
    )
    max_resample_rounds: int = field(
        default=20,
        metadata={"help": "Most extra generation rounds per generation batch for min_valid_fraction (authors: 20)."},
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
        if not 0.0 <= self.min_valid_fraction <= 1.0:
            raise ValueError(
                f"GPGConfig: min_valid_fraction must be in [0, 1] (the paper uses 0.5-0.8; 0 disables resampling), "
                f"got {self.min_valid_fraction}."
            )
        if self.min_valid_fraction > 0 and self.max_resample_rounds < 1:
            raise ValueError(
                f"GPGConfig: max_resample_rounds must be >= 1, got {self.max_resample_rounds}. To disable "
                "resampling, set min_valid_fraction=0."
            )
        if not self.importance_weight_cap > 0:
            raise ValueError(f"GPGConfig: importance_weight_cap must be > 0, got {self.importance_weight_cap}.")

    def whole_group_needs(self):
        needs = super().whole_group_needs()
        if self.min_valid_fraction > 0:
            needs.append(
                ("min_valid_fraction > 0 (valid groups are counted per process)", "or set min_valid_fraction=0")
            )
        return needs


# --- trainer -------------------------------------------------------------------------------------------------------


class GPGTrainer(GroupTrainer):
    """Trainer for GPG. Used exactly like ``trl.GRPOTrainer``, with a [`GPGConfig`].

    Loss per micro-step: ``α · Σ_{i,t} −log π_θ(y_i,t) · Â_i / N_tokens`` (Eq. 5-8), ``N_tokens`` the completion
    tokens of the micro-step over all processes (divided by the number of processes, which DDP averages over), so N
    processes compute the loss of one. Rows generated by an older policy (off-policy settings, vLLM, or members reused
    by the mixed buffer, against their stored log-probs) are weighted by ``min(π_θ(y)/π_old(y), cap)``, ``cap`` =
    ``importance_weight_cap``.

    Threshold β_th (``min_valid_fraction``): the extra prompts come from the trainer's own sampler over
    ``train_dataset``, seeded by ``(seed, global_step)`` and identical on every process, so every process takes the
    same number of rounds and a resumed run draws the same prompts. For a streaming ``train_dataset``
    (``datasets.IterableDataset`` or a torch ``IterableDataset``), they come from a second pass over the stream
    (:class:`ExtraPromptStream`), at a position fixed by ``global_step``: the same on every process and after a resume.
    Image columns (vision-language models) travel with their rows.

    Logged metrics (besides TRL's): ``gpg/loss``, ``gpg/alpha`` (α of the micro-step), ``gpg/valid_fraction`` ((B−M)/B
    of the micro-step), ``gpg/resample_rounds`` (extra generation rounds), ``gpg/batch_valid_fraction`` (valid groups
    in the generation batch that is trained on), ``gpg/importance_weight_mean`` (off-policy only),
    ``groups/zero_variance_frac`` and ``groups/unscorable_frac`` (per generation round). TRL's ``reward`` is averaged
    over every round generated.
    """

    config_class = GPGConfig
    metric_prefix = "gpg"
    _name, _paper, _tag_names = "GPG", PAPERS["gpg"], tag_names("gpg")  # the model card
    needs_behaviour_logps = True  # mixed buffer: a reused member is weighted against its stored log-probs

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._extra_stream: ExtraPromptStream | None = None  # streaming train_dataset: built at the first round

    def compute_advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return gpg_advantages(rewards, group_ids, std_normalize=self.args.scale_rewards == "group")

    def group_loss(
        self, inputs: dict[str, Any], per_token_logps: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        all_ids, num_groups = self.micro_step_groups(inputs["group_id"], self.group_size)
        all_rewards = self.gather_rows(inputs["rewards"])
        zero_variance = zero_variance_groups(all_rewards, all_ids)
        num_zero = int(torch.unique(all_ids[zero_variance]).numel())
        alpha = age_alpha(num_groups, num_zero) if self.args.use_age else 1.0

        advantages = inputs["advantages"].to(per_token_logps.dtype)
        if "importance_sampling_ratio" in inputs:  # TRL's vLLM sampling correction, (B, T) or (B, 1)
            advantages = advantages.unsqueeze(1) * inputs["importance_sampling_ratio"].to(per_token_logps.dtype)
        metrics = {}
        weights = None
        old, off_policy = behaviour_logps(inputs, per_token_logps)
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
            token_normalizer=num_tokens / self.accelerator.num_processes,
        )
        metrics["gpg/alpha"] = alpha
        metrics["gpg/valid_fraction"] = (num_groups - num_zero) / max(num_groups, 1)
        return loss, metrics

    # --- β_th: generate further prompts until enough groups have a reward variance ---------------------------------

    def _generate_and_score_completions(self, inputs):
        columns = list(inputs[0]) if inputs else []  # before super(), which may add fields to the rows
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training or self.args.min_valid_fraction <= 0:
            return output
        return self._fill_valid_groups(inputs, columns, output)

    def _valid_and_zero_groups(self, output: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Row indices of each valid and each zero-variance group of a local output (which holds whole groups)."""
        ids = output["group_id"]
        zero = zero_variance_groups(output["rewards"], ids)
        valid, empty = [], []
        for gid in torch.unique(ids):
            rows = (ids == gid).nonzero(as_tuple=True)[0]
            (empty if zero[rows[0]] else valid).append(rows)
        return valid, empty

    def _extra_prompts(self, num_global_groups: int):
        """Yields, per round, this process's examples of ``num_global_groups`` fresh prompts, each repeated k times.

        Map-style ``train_dataset``: a permutation of it seeded by ``(seed, global_step)``, the same on every process
        and for a resumed run; a new permutation starts when one is used up. Streaming ``train_dataset``: the next
        examples of :class:`ExtraPromptStream` from position ``global_step × max_resample_rounds × num_global_groups``
        (a window no generation batch can overrun), read identically by every process.
        """
        if self.train_dataset is None:
            raise ValueError("GPGTrainer: min_valid_fraction > 0 needs a train_dataset to draw extra prompts from.")
        k = self.group_size
        local_groups = num_global_groups // self.accelerator.num_processes
        first = self.accelerator.process_index * local_groups
        if is_stream(self.train_dataset):
            if self._extra_stream is None:
                self._extra_stream = ExtraPromptStream(self.train_dataset, self.args.seed, self.args.shuffle_dataset)
            stream = self._extra_stream
            stream.seek(int(self.state.global_step) * self.args.max_resample_rounds * num_global_groups)
            while True:
                chosen = [stream.next() for _ in range(num_global_groups)]
                yield [example for example in chosen[first : first + local_groups] for _ in range(k)]
        size = len(self.train_dataset)
        generator = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + int(self.state.global_step) + 1)
        order: list[int] = []
        while True:
            while len(order) < num_global_groups:
                order += torch.randperm(size, generator=generator).tolist()
            chosen, order = order[:num_global_groups], order[num_global_groups:]
            yield [self.train_dataset[int(i)] for i in chosen[first : first + local_groups] for _ in range(k)]

    def _fill_valid_groups(self, inputs, columns, first: dict[str, Any]) -> dict[str, Any]:
        k = self.group_size
        local_groups = len(inputs) // k
        global_groups = local_groups * self.accelerator.num_processes
        target = math.ceil(self.args.min_valid_fraction * global_groups - 1e-9)
        device = first["rewards"].device

        def global_kept(count: int) -> int:  # valid groups the assembled batch would hold, over all processes
            return int(self.accelerator.reduce(torch.tensor(min(count, local_groups), device=device), "sum").item())

        valid, zero = self._valid_and_zero_groups(first)
        kept = [(0, rows) for rows in valid]
        reached = global_kept(len(kept))
        rounds, last, outputs = 0, first, [first]
        if reached < target:
            source = self._extra_prompts(global_groups)
            while reached < target and rounds < self.args.max_resample_rounds:
                rounds += 1
                examples = next(source)
                last = super()._generate_and_score_completions([{key: ex[key] for key in columns} for ex in examples])
                last["group_id"] = last["group_id"] + rounds * global_groups  # unique across rounds
                outputs.append(last)
                valid, zero = self._valid_and_zero_groups(last)
                kept += [(rounds, rows) for rows in valid]
                reached = global_kept(len(kept))
        mode = "train"
        self._metrics[mode]["gpg/resample_rounds"].append(float(rounds))
        self._metrics[mode]["gpg/batch_valid_fraction"].append(reached / global_groups)
        if rounds == 0:
            return first
        # valid groups first (at most the batch size), then zero-variance groups of the last round to fill up; the
        # last round always has enough: the kept valid groups include its own
        kept = kept[:local_groups]
        fill = [(rounds, rows) for rows in zero[: local_groups - len(kept)]]
        # image tensors as per-row lists, so that each row's images travel with it
        outputs = [split_images(output) for output in outputs]
        parts = [take_rows(outputs[r], rows) for r, rows in kept + fill]
        pad_id = getattr(self.processing_class, "tokenizer", self.processing_class).pad_token_id
        batch = merge_images(concat_generation_outputs(parts, pad_id))
        loss_mask = batch["completion_mask"] * batch["tool_mask"] if "tool_mask" in batch else batch["completion_mask"]
        batch["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        return batch
