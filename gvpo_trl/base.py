"""What the three trainers share: configuration checks, group ids, raw rewards, whole-group micro-steps, the loss seam.

``GroupTrainer`` subclasses TRL's ``GRPOTrainer`` and overrides only narrow seams (listed in ``_trl_compat``), each
calling ``super()`` and post-processing its result:

- ``_calculate_rewards``: keeps the raw, process-gathered rewards that TRL computes.
- ``_generate_and_score_completions``: adds ``group_id`` and ``rewards`` columns and replaces ``advantages`` with the
  algorithm's own (``compute_advantages``) computed from the raw rewards over whole groups.
- ``_prepare_inputs``: TRL shuffles rows of the generation batch before splitting it into micro-steps, which scatters
  groups; the split is redone so that every micro-step holds whole groups.
- ``_compute_loss``: computes the policy's per-token log-probs and hands them to the algorithm's ``group_loss``.

``BufferMixin`` (``gvpo_trl/buffer/``, configured by the ``buffer_*`` fields) adds the mixed buffer through the seams
``_generate``, ``_calculate_rewards``, ``_generate_and_score_completions`` and the checkpoint hooks: see
``docs/mixed_buffers.md``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.utils.data import Sampler
from trl import GRPOConfig, GRPOTrainer

from . import checkpoints
from ._trl_compat import MULTIMODAL_FORWARD_KEYS
from .buffer import BufferArgs, BufferMixin, buffer_enabled, check_buffer_config
from .columns import ADVANTAGES, GROUP_ID, REWARDS
from .groups import aggregate_rewards, count_groups, group_sizes, zero_variance_groups
from .model_card import ModelCardMixin
from .rows import regroup_batches
from .validation import check_dataset, check_finite_fields, check_lengths, check_prompts, checked_reward_function


def check_whole_groups_per_process(args: Any, name: str, needed_by: str, remedy: str) -> None:
    """Raise ``ValueError`` unless each process's generation batch (``per_device_train_batch_size ×
    steps_per_generation`` rows) holds whole groups of ``num_generations``, which ``needed_by`` requires. TRL only
    checks the global batch, which differs from the local one with several processes."""
    rows = args.per_device_train_batch_size * args.steps_per_generation
    if rows % args.num_generations:
        raise ValueError(
            f"{name}: {needed_by} needs each process's generation batch (per_device_train_batch_size × "
            f"steps_per_generation = {args.per_device_train_batch_size} × {args.steps_per_generation} = {rows} rows) "
            f"to hold whole groups of num_generations={args.num_generations}. Make it a multiple of num_generations, "
            f"{remedy}."
        )


@dataclass
class GroupConfig(BufferArgs, GRPOConfig):
    """``GRPOConfig`` plus the checks and defaults every group-based trainer here shares, and the mixed-buffer fields
    (``buffer_*``, ``external_*``: see ``gvpo_trl.buffer.BufferArgs``). Not used directly: a subclass adds its fields,
    its own checks in :meth:`validate`, and sets :attr:`updates_per_rollout`."""

    #: Optimizer steps per rollout when neither ``steps_per_generation`` nor ``generation_batch_size`` is set:
    #: ``steps_per_generation = updates_per_rollout × gradient_accumulation_steps``. None keeps TRL's default (1).
    updates_per_rollout: ClassVar[int | None] = None

    def validate(self) -> None:
        """The algorithm's own checks (raise ``ValueError`` saying what to change); run before ``GRPOConfig``'s, with
        ``scale_rewards`` already normalised to a string."""

    def whole_group_needs(self) -> list[tuple[str, str]]:
        """``(what, remedy)`` for each setting that needs every process's generation batch to hold whole groups."""
        if buffer_enabled(self):
            return [("the mixed buffer (the process that holds a group chooses its historical members)",
                     "or turn the buffer off")]  # fmt: skip
        return []

    def __post_init__(self):
        name = type(self).__name__
        # TRL accepts booleans for scale_rewards (True = "group"); the checks here compare strings
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if self.num_generations is not None and self.num_generations < 2:
            raise ValueError(
                f"{name}: num_generations (the group size k) must be at least 2, got {self.num_generations}: a group "
                "statistic needs two members. Set num_generations >= 2."
            )
        check_finite_fields(self, name)
        check_lengths(self, name)
        self.validate()
        algorithm = name.removesuffix("Config")
        # GRPOTrainer's own loss terms that GroupTrainer's loss seam does not carry over
        if self.entropy_coef != 0 or self.use_adaptive_entropy:
            raise ValueError(
                f"{name}: {algorithm} has no entropy bonus. Set entropy_coef=0 and use_adaptive_entropy=False."
            )
        if self.top_entropy_quantile < 1.0:
            raise ValueError(
                f"{name}: top_entropy_quantile < 1 masks tokens out of the loss, which {algorithm} defines on whole "
                "completions. Set top_entropy_quantile=1.0."
            )
        if self.off_policy_mask_threshold is not None:
            raise ValueError(
                f"{name}: off_policy_mask_threshold (TRL's off-policy sequence masking) is not part of {algorithm}; "
                "off-policy samples are handled by the algorithm itself (see docs/mixed_buffers.md). Leave it at None."
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"{name}: multi_objective_aggregation={self.multi_objective_aggregation!r} is not supported: the "
                "trainers here compute their own advantages from the weighted sum of the reward functions. Use "
                "'sum_then_normalize'."
            )
        if self.updates_per_rollout and self.steps_per_generation is None and self.generation_batch_size is None:
            self.steps_per_generation = self.updates_per_rollout * self.gradient_accumulation_steps
        super().__post_init__()
        if self.steps_per_generation > 1 and self.per_device_train_batch_size % self.num_generations != 0:
            raise ValueError(
                f"{name}: per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}) when steps_per_generation ({self.steps_per_generation}) "
                "> 1: each micro-step must hold whole groups, and a group cannot span micro-steps. Raise "
                "per_device_train_batch_size, or set steps_per_generation=1 (then a group may span processes)."
            )
        for needed_by, remedy in self.whole_group_needs():
            check_whole_groups_per_process(self, name, needed_by, remedy)
        check_buffer_config(self, name)


class EpochSeededSampler(Sampler):
    """Wraps TRL's ``RepeatSampler`` and reseeds its shuffle with ``seed + epoch`` when the Trainer calls
    ``set_epoch``. TRL's sampler draws every epoch's order from one running generator, so a run resumed in epoch
    e > 0 would replay epoch 0's order; with this, epoch e's order depends on e alone and resuming is exact.
    Epoch 0's order is TRL's own."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self):
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if getattr(self.sampler, "shuffle", False) and self.sampler.seed is not None:
            self.sampler.generator.manual_seed(self.sampler.seed + epoch)


class GroupTrainer(ModelCardMixin, BufferMixin, GRPOTrainer):
    """Base of ``GVPOTrainer``, ``GPGTrainer`` and ``GSPOTrainer``. Subclasses set ``config_class`` and implement
    ``compute_advantages`` and ``group_loss``; ``metric_prefix`` names their metrics in the logs."""

    config_class: type[GroupConfig] = GroupConfig
    metric_prefix: str = "group"

    def __init__(self, model, reward_funcs=None, args=None, *extra, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = self.config_class(f"{str(model_name).split('/')[-1]}-{self.metric_prefix.upper()}")
        if not isinstance(args, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__} (its defaults and checks are part of the "
                f"algorithm), got {type(args).__name__}. Build one with {self.config_class.__name__}(...)."
            )
        self._rewards_per_func: torch.Tensor | None = None
        super().__init__(model, reward_funcs, args, *extra, **kwargs)
        name = type(self).__name__
        check_dataset(self.train_dataset, "train", name)
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}
        for split, dataset in evals.items():
            check_dataset(dataset, split, name)
        # a malformed reward output must name its function, not fail inside TRL's tensor conversion
        self.reward_funcs = [
            func if isinstance(func, torch.nn.Module) else checked_reward_function(func, func_name)
            for func, func_name in zip(self.reward_funcs, self.reward_func_names, strict=True)
        ]
        self._warned_nonfinite_reward = False

    # --- to implement ----------------------------------------------------------------------------------------------

    def compute_advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """Per-row advantage from the raw rewards (NaN = unscorable) of the whole, gathered generation batch."""
        raise NotImplementedError

    def group_loss(
        self, inputs: dict[str, Any], per_token_logps: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-step (before gradient-accumulation scaling) and metrics to log."""
        raise NotImplementedError

    # --- seams -----------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint:
            checkpoints.check_resume(str(checkpoint), checkpoints.run_identity(self), type(self).__name__)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            checkpoints.write_run_identity(checkpoints.checkpoint_dir(self, trial), checkpoints.run_identity(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # every process learns whether any loss is non-finite, so that all stop together, before the backward
        bad = self.accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), reduction="sum")
        if bad.item() > 0:
            world = self.accelerator.num_processes
            self._stop_nonfinite(
                "loss", loss.detach().item(), f"non-finite on {int(bad.item())} of {world} process(es)"
            )
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        value = float(grad_norm.item() if hasattr(grad_norm, "item") else grad_norm) if grad_norm is not None else 0.0
        if not math.isfinite(value):  # the norm is global: every process sees the same value
            self._stop_nonfinite("gradient norm", value, str(value))
        return grad_norm

    def _stop_nonfinite(self, what: str, value: float, state: str) -> None:
        """Log the non-finite value and stop: HF's logging_nan_inf_filter would show it as a plausible loss."""
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self.log({f"nonfinite/{what.replace(' ', '_')}": value})
        raise FloatingPointError(
            f"{type(self).__name__}: the {what} is {state} (this process: {value}) at step {self.state.global_step} "
            f"({mode}); stopping before it reaches the parameters. Look at the last logged metrics "
            "(groups/nonfinite_reward_frac, the reward functions' outputs, the learning rate) and resume from the last "
            "checkpoint with a fix."
        )

    def _get_train_sampler(self, dataset=None):
        return EpochSeededSampler(super()._get_train_sampler(dataset))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # ±inf (or NaN) counts as unscorable, like None: centred against ±inf, every other member would get ±inf
        nonfinite = ~torch.isfinite(rewards)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["groups/nonfinite_reward_frac"].append(nonfinite.float().mean().item())
        if torch.isinf(rewards).any():
            if not self._warned_nonfinite_reward:
                self._warned_nonfinite_reward = True
                warnings.warn(
                    f"{type(self).__name__}: a reward function returned ±inf; such rewards count as unscorable (like "
                    "None) and show in groups/nonfinite_reward_frac. Warned once per run.",
                    stacklevel=2,
                )
            rewards = rewards.masked_fill(nonfinite, float("nan"))
        self._rewards_per_func = rewards
        return rewards

    def _generate_and_score_completions(self, inputs):
        check_prompts([row["prompt"] for row in inputs], type(self).__name__)
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        k = self.group_size
        rewards = aggregate_rewards(self._rewards_per_func, self.reward_weights)
        # rows arrive in sampler order: the generation batch of all processes holds consecutive groups of k rows
        group_ids = torch.arange(rewards.numel(), device=rewards.device) // k
        advantages = self.compute_advantages(rewards, group_ids)
        local = self._local_slice(len(inputs))
        output.update({REWARDS: rewards[local], GROUP_ID: group_ids[local], ADVANTAGES: advantages[local]})
        self._metrics[mode]["groups/zero_variance_frac"].append(
            zero_variance_groups(rewards, group_ids).float().mean().item()
        )
        self._metrics[mode]["groups/unscorable_frac"].append(torch.isnan(rewards).float().mean().item())
        return output

    def _prepare_inputs(self, generation_batch):
        before = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self.model.training and self._buffered_inputs is not before and len(self._buffered_inputs) > 1:
            # image tensors (vision-language models) move with their rows: see rows.split_images
            self._buffered_inputs = regroup_batches(self._buffered_inputs)
            inputs = self._buffered_inputs[self._step % self.args.steps_per_generation]
        return inputs

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,  # MoE: the router's load-balancing loss, as TRL
            **{key: inputs.get(key) for key in MULTIMODAL_FORWARD_KEYS},  # vision-language models, as TRL
        )
        loss, metrics = self.group_loss(inputs, per_token_logps.float(), mask)
        mode = "train" if self.model.training else "eval"
        metrics[f"{self.metric_prefix}/loss"] = self.accelerator.gather(loss.detach()).mean().item()
        entropy = self.accelerator.reduce(
            torch.stack([(entropies.float() * mask).sum(), mask.sum().float()]).detach(), reduction="sum"
        )
        metrics["entropy"] = (entropy[0] / entropy[1].clamp(min=1)).item()
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss
            metrics["aux_loss"] = self.accelerator.gather(aux_loss.detach()).mean().item()
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        # GRPOTrainer tells the HF Trainer that its loss is already scaled for gradient accumulation (the aux term too)
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1)

    # --- helpers for group_loss ------------------------------------------------------------------------------------

    @property
    def group_size(self) -> int:
        """k of the current mode (TRL's ``num_generations`` in training, ``num_generations_eval`` in evaluation)."""
        return self.num_generations if self.model.training else self.num_generations_eval

    def _local_slice(self, num_local_rows: int) -> slice:
        start = self.accelerator.process_index * num_local_rows
        return slice(start, start + num_local_rows)

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (detached) of every process's rows in this micro-step, in process order."""
        return self.accelerator.gather(values.detach().contiguous())

    def micro_step_groups(self, group_ids: torch.Tensor, expected_size: int | None = None) -> tuple[torch.Tensor, int]:
        """Group ids of all processes' rows in this micro-step, and the number of groups in it.

        Fails loudly if a group is not whole (has other than ``expected_size`` rows) across the processes.
        """
        all_ids = self.gather_rows(group_ids)
        if expected_size is not None:
            sizes = group_sizes(all_ids)
            if (sizes != expected_size).any():
                raise RuntimeError(
                    f"{type(self).__name__}: a micro-step holds a partial group (group sizes "
                    f"{sizes.unique().tolist()}, expected {expected_size}); the group statistic would be wrong. This "
                    "is a bug in gvpo-trl's "
                    "group-preserving split: please report it with your batch-size settings."
                )
        return all_ids, count_groups(all_ids)
