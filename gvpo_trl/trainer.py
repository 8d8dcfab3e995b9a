"""``GroupTrainer``: the TRL seams every trainer here shares, and how they compose.

``GroupTrainer(ModelCardMixin, NonFiniteGuards, BufferMixin, GRPOTrainer)`` overrides only narrow seams of TRL's
``GRPOTrainer``
(each listed in ``_trl_compat``), each calling ``super()`` and post-processing its result. A generation batch
(``_generate_and_score_completions``) is made like this, outermost first:

1. dynamic sampling (``gvpo_trl.dynamic_sampling``; training with ``min_valid_fraction > 0``): one round for the
   sampler's prompts, then extra rounds of only as many prompts as the missing valid groups need, joined into whole
   groups;
2. each round, ``_score_groups``: TRL's generation and scoring (steps 3 and 4), then the group columns: ``group_id``,
   the raw rewards, and the algorithm's ``compute_advantages`` over whole groups, replacing TRL's advantages;
3. the mixed buffer (``gvpo_trl.buffer.BufferMixin``; ``buffer_*`` fields): plans each group's historical and external
   members; TRL's ``_generate`` then generates the fresh members only, ``_calculate_rewards`` scores only new rows;
   afterwards the buffer columns are added and the fresh samples stored;
4. ``GRPOTrainer._generate_and_score_completions`` itself.

Rewards (``_calculate_rewards``): TRL's → the buffer's stored rewards for historical rows → the guards (±∞ counts as
unscorable, ``gvpo_trl.guards``) → kept raw here for step 2. Training: ``_prepare_inputs`` re-splits TRL's shuffled
generation batch so that every micro-step holds whole groups; ``_compute_loss`` computes the policy's per-token
log-probs and hands them to the algorithm's ``group_loss``; the guards stop on a non-finite loss or gradient norm.
Checkpoints: the run identity (``gvpo_trl.checkpoints``), the buffer state and the carried groups of dynamic sampling
are written beside TRL's files, inside ``checkpoint_integrity.saving`` (a completion marker written last); a resume
takes the newest complete checkpoint (``checkpoint_integrity.resolve_resume``). Inputs are checked where TRL would meet
them (``validation``, ``generation_checks``: prompts, prompt lengths, rollout outputs); batches mixing image and
text-only prompts get their log-probs chunk by chunk (``image_chunks``). The model card names the algorithm
(``model_card.ModelCardMixin``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from trl import GRPOTrainer

from . import checkpoint_integrity, checkpoints, generation_checks, image_chunks
from ._trl_compat import MULTIMODAL_FORWARD_KEYS
from .buffer import BufferMixin
from .columns import ADVANTAGES, GROUP_ID, REWARDS
from .config import GroupConfig
from .dynamic_sampling import DynamicSampling, dynamic_sampling_enabled
from .groups import aggregate_rewards, count_groups, group_sizes, zero_variance_groups
from .guards import NonFiniteGuards
from .model_card import ModelCardMixin
from .rows import regroup_batches
from .sampler import EpochSeededSampler
from .validation import check_dataset, check_prompts, check_reward_models, checked_reward_function


class GroupTrainer(ModelCardMixin, NonFiniteGuards, BufferMixin, GRPOTrainer):
    """Base of ``GVPOTrainer``, ``GPGTrainer`` and ``GSPOTrainer``. Subclasses set ``config_class`` and implement
    ``compute_advantages`` and ``group_loss``; ``metric_prefix`` names their metrics in the logs."""

    config_class: type[GroupConfig] = GroupConfig
    metric_prefix: str = "group"
    # read by the generation seams; class-level so that a trainer built without __init__ (TRL's tests) has them
    _max_positions: int | None = None
    _warned_greedy: bool = False

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
        check_reward_models(reward_funcs, type(self).__name__)  # before TRL reads a module's config
        super().__init__(model, reward_funcs, args, *extra, **kwargs)
        self.dynamic_sampling = DynamicSampling(self)
        name = type(self).__name__
        filled = self.environment_factories is not None  # reset() supplies the observation: an empty prompt is fine
        check_dataset(self.train_dataset, "train", name, prompt_filled=filled)
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}
        for split, dataset in evals.items():
            check_dataset(dataset, split, name, prompt_filled=filled)
        generation_checks.check_dataset_fills_a_generation_batch(self.train_dataset, self.args, self.num_generations,
                                                                 name)  # fmt: skip
        self._max_positions = generation_checks.model_max_positions(self.model)
        if self.rollout_func is not None:  # its completions must be checked before TRL decodes them
            self.rollout_func = generation_checks.checked_rollout_func(
                self.rollout_func, generation_checks.policy_vocab_size(self.model), name
            )
        # a malformed reward output must name its function, not fail inside TRL's tensor conversion
        self.reward_funcs = [
            func if isinstance(func, torch.nn.Module) else checked_reward_function(func, func_name)
            for func, func_name in zip(self.reward_funcs, self.reward_func_names, strict=True)
        ]

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
        generation_checks.check_completion_length_fits(self.args.max_completion_length, self._max_positions,
                                                       type(self).__name__)  # fmt: skip
        checkpoint = checkpoint_integrity.resolve_resume(resume_from_checkpoint, self)  # the newest complete one
        if checkpoint:
            checkpoints.check_resume(checkpoint, checkpoints.run_identity(self), type(self).__name__)
        return super().train(checkpoint or resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        folder = checkpoints.checkpoint_dir(self, trial)
        with checkpoint_integrity.saving(folder, self):  # complete-or-unmarked: the marker is written last
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                checkpoints.write_run_identity(folder, checkpoints.run_identity(self))
                self.dynamic_sampling.save(folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with checkpoint_integrity.loading_optimizer(checkpoint, self):  # a failure names the checkpoint's files
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.dynamic_sampling.load(checkpoint)

    def _get_train_sampler(self, dataset=None):
        return EpochSeededSampler(super()._get_train_sampler(dataset))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        check_prompts(inputs, type(self).__name__, prompt_filled=self.environment_factories is not None)
        columns = list(inputs[0]) if inputs else []  # before TRL, which may add fields to the rows
        output = self._score_groups(inputs)
        if self.model.training and dynamic_sampling_enabled(self.args):
            output = self.dynamic_sampling.refill(output, inputs, columns, self._score_groups)
        return output

    def _score_groups(self, inputs):
        """One generation round: TRL's generation and scoring (through the buffer), then the group columns."""
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
        self._record_identical_groups(output, group_ids[local], mode)
        return output

    def _record_identical_groups(self, output, local_group_ids, mode) -> None:
        """``groups/identical_frac``: groups whose members are all the same completion (greedy-like sampling); warned
        once when a whole generation batch is such."""
        gather = self.accelerator.gather
        ids = self.accelerator.pad_across_processes(output["completion_ids"], dim=1)
        mask = self.accelerator.pad_across_processes(output["completion_mask"], dim=1)
        same = generation_checks.identical_groups(gather(ids), gather(mask), gather(local_group_ids))
        self._metrics[mode]["groups/identical_frac"].append(same.float().mean().item())
        if mode == "train" and same.all() and not self._warned_greedy:
            self._warned_greedy = True
            warnings.warn(generation_checks.greedy_warning(type(self).__name__, self.args, same.numel()), stacklevel=2)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **image_inputs):  # fmt: skip
        compute = super()._get_per_token_logps_and_entropies
        options = dict(compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss)
        if not image_chunks.has_text_only_rows(image_inputs):
            return compute(model, input_ids, attention_mask, logits_to_keep, batch_size, **options, **image_inputs)
        # a chunk of text-only rows must get no image inputs (TRL would hand it empty ones)
        return image_chunks.logps_by_chunk(compute, model, input_ids, attention_mask, logits_to_keep, batch_size,
                                           image_inputs, **options)  # fmt: skip

    def _tokenize_prompts(self, prompts):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        if images is not None:  # a batch mixing image and text-only prompts: the processor takes [] for "no image"
            images = [row if row is not None else [] for row in images]
        generation_checks.check_prompt_lengths(prompt_ids, self.args.max_completion_length, self._max_positions,
                                               type(self).__name__)  # fmt: skip
        return prompt_ids, images, multimodal_fields

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
