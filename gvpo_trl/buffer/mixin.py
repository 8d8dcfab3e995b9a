"""The wiring of the mixed buffer into TRL: :class:`BufferMixin`, mixed into ``GroupTrainer`` (and usable with
``trl.GRPOTrainer`` itself, for a baseline). It overrides narrow seams of ``GRPOTrainer`` and calls ``super()`` in each:

- ``_generate(prompts)``: generates only the fresh rows (``super()._generate`` on that subset, with TRL's per-row tool
  and environment state narrowed to them: ``row_state``) and splices the stored completions (and external ones), with
  their tool masks and rollout-function fields, into the other rows, so the rest of TRL's pipeline (padding,
  θ'/reference log-probs under the pre-update policy, reward calls, metrics) runs unchanged on whole groups; this
  holds for every generator (HF ``generate``, continuous batching, vLLM colocate and server), tools, environments,
  ``rollout_func`` and image prompts (a prompt's images are part of its key, and every row keeps its own);
- ``_generate_single_turn``: asks the generator for one completion per fresh row (vLLM's server mode would otherwise
  generate ``num_generations`` per prompt);
- ``_calculate_rewards``: scores only the rows that need it, reusing the stored rewards of historical rows
  (``buffer_rescore=True`` scores them again);
- ``_generate_and_score_completions``: adds the columns of ``gvpo_trl.columns`` (behaviour log-probs, is_historical,
  is_external, staleness), stores the fresh samples (gathered from every process, so that the buffer is identical
  everywhere) and logs ``buffer/*`` metrics;
- ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``: save and restore the buffer with each checkpoint.

While TRL makes one generation batch, a :class:`~gvpo_trl.buffer.members.MixedBatch` holds its plan and one
``Member`` record per local row; the arithmetic lives in pure functions of ``members``, ``planning`` and ``accounting``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..checkpoint_integrity import check_buffer_state
from ..checkpoints import checkpoint_dir
from ..columns import BEHAVIOUR_LOGPS, IS_EXTERNAL, IS_HISTORICAL
from ..generation_checks import policy_vocab_size
from .accounting import STAT_NAMES, fresh_reward, generated_lengths, plan_metrics, signal_from_history
from .config import BufferArgs, buffer_enabled, check_buffer_config
from .members import (
    FRESH,
    HISTORICAL,
    MixedBatch,
    external_member,
    group_members,
    member_columns,
    member_drifts,
    splice_completions,
    splice_turn_fields,
)
from .persistence import load_buffer, save_buffer
from .planning import (
    SIGNAL_RULES,
    plan_groups,
    resolve_history_horizon,
    resolve_num_historical,
    scheduled_num_historical,
)
from .row_state import rows_of
from .step_size import ScaledSchedule, fresh_share, scale_schedule
from .store import SampleBuffer, prompt_key


class BufferMixin:
    """Mixed-buffer wiring for a ``trl.GRPOTrainer`` subclass: ``class T(BufferMixin, GRPOTrainer)``. Its ``args``
    must carry the :class:`BufferArgs` fields. Inert (apart from the ``buffer/generated_tokens*`` metrics and a small
    state file in checkpoints) unless ``buffer_history_per_group`` or ``external_completions_column`` is set."""

    #: Trainers whose loss weighs off-policy members by the behaviour policy (GSPO, GPG) set this: they refuse
    #: external completions that come without log-probs.
    needs_behaviour_logps: bool = False
    #: The generation batch being made with the buffer on (None outside one, and for a trainer built without
    #: ``__init__``, as TRL's own tests do).
    _mixed_batch: MixedBatch | None = None
    #: Counters of generated / reused rows; None for a trainer built without ``__init__`` (nothing is counted then).
    buffer_stats: dict[str, int] | None = None
    #: The schedule scaled by the fresh share (``buffer_scale_lr``), made with the scheduler.
    _lr_schedule: ScaledSchedule | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if not all(hasattr(self.args, f) for f in BufferArgs.__dataclass_fields__):
            raise TypeError(f"{name} needs a config with the mixed-buffer fields of gvpo_trl.buffer.BufferArgs.")
        check_buffer_config(self.args, name)
        self.history_per_group = resolve_num_historical(self.args.buffer_history_per_group, self.num_generations)
        self._buffer_enabled = buffer_enabled(self.args)
        self.sample_buffer = SampleBuffer(self.args.buffer_capacity)
        self.buffer_stats = dict.fromkeys(STAT_NAMES, 0)
        if self._buffer_enabled:
            self._check_buffer_support()

    def _check_buffer_support(self) -> None:
        name, args = type(self).__name__, self.args
        if self.environment_factories and args.buffer_rescore:
            raise ValueError(
                f"{name}: buffer_rescore=True cannot rescore historical members with environment_factory: their "
                "rewards depend on the environment state of the rollout that generated them, and a historical "
                "member's environment in this batch never ran that rollout. Leave buffer_rescore=False (the stored "
                "rewards are reused)."
            )
        column, logps_column = args.external_completions_column, args.external_logps_column
        if column and self.needs_behaviour_logps and not logps_column:
            raise ValueError(
                f"{name} weighs each off-policy group member by its behaviour policy's log-probs, so external "
                f"completions (external_completions_column={column!r}) need them too: set external_logps_column to "
                "a column with one log-prob per completion token (the completion column then holds token ids). "
                "GVPOTrainer accepts external completions without log-probs."
            )
        if self.history_per_group and self.needs_behaviour_logps and args.buffer_selection in SIGNAL_RULES:
            warnings.warn(
                f"{name}: buffer_selection={args.buffer_selection!r} chooses historical members by their reward, so "
                "they are no longer samples of the policy that generated them, and this trainer's importance weights "
                "(pi_theta / pi_b) do not correct for that choice: the update is biased towards the chosen rewards. "
                "GVPO needs no such weights (its Theorem 2 allows any sampling distribution); with this trainer "
                "prefer an age rule ('newest', 'oldest', 'uniform').",
                UserWarning,
                stacklevel=2,
            )
        names = getattr(self.train_dataset, "column_names", None)
        for col in (column, logps_column):
            if col and names is not None and col not in names:
                raise ValueError(f"{name}: the train dataset has no column {col!r} (columns: {names}).")

    def _tool_image_refusal(self) -> str:
        return (
            f"{type(self).__name__}: a tool returned images, which the mixed buffer does not store (a reused member "
            "would lose them). Turn the buffer off (buffer_history_per_group=0, no external_completions_column) for "
            "tools that return images."
        )

    # --- seams ---

    def _generate_and_score_completions(self, inputs):
        if not (self._buffer_enabled and self.model.training):
            return super()._generate_and_score_completions(inputs)
        self._mixed_batch = MixedBatch(inputs=inputs, step=self.state.global_step)
        try:
            output = super()._generate_and_score_completions(inputs)
            self._finish_mixed_batch(self._mixed_batch, output)
        finally:
            self._mixed_batch = None
        return output

    def _generate(self, prompts):
        batch = self._mixed_batch
        if batch is None:
            output = super()._generate(prompts)
            if self.model.training:
                self._count_generated(output[1], output[2])
            return output
        self._plan(batch, prompts)
        fresh = batch.rows(FRESH)
        with rows_of(self, fresh):
            output = super()._generate([prompts[i] for i in fresh])
        prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images = output
        if any(tool_images or []):
            raise ValueError(self._tool_image_refusal())
        # the images of the fresh rows only: None makes TRL take every row's images from its dataset row, and a
        # reused member's row is a row of its own prompt, whose images are part of the buffer key (prompt_key)
        images = None
        self._count_generated(completion_ids, tool_mask)
        prompt_ids, completion_ids, completions, logprobs = splice_completions(
            batch.members, prompt_ids, completion_ids, completions, logprobs, self.num_generations
        )
        tool_mask, extra_fields, tool_images = splice_turn_fields(batch.members, tool_mask, extra_fields, tool_images)
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        if self._mixed_batch is not None:
            num_generations = 1  # a group's fresh rows are fewer than num_generations: one completion per row
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        batch = self._mixed_batch
        has_history = batch is not None and batch.plan is not None and any(p.historical for p in batch.plan)
        if not has_history or self.args.buffer_rescore:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        else:
            # every process scores the same number of rows (plan_groups equalises), as TRL's tensor gather needs
            scored = [i for i, member in enumerate(batch.members) if member.kind != HISTORICAL]
            with rows_of(self, scored):  # reward functions get the scored rows' environments
                sub = super()._calculate_rewards(
                    [inputs[i] for i in scored],
                    [prompts[i] for i in scored],
                    [completions[i] for i in scored],
                    [completion_ids_list[i] for i in scored],
                )
            start = self.accelerator.process_index * len(scored)
            local = torch.empty(len(prompts), sub.size(1), dtype=sub.dtype, device=sub.device)
            local[scored] = sub[start : start + len(scored)]
            for i in batch.rows(HISTORICAL):
                stored = batch.members[i].rewards
                if len(stored) != sub.size(1):
                    raise RuntimeError(
                        f"a historical sample has {len(stored)} rewards but there are {sub.size(1)} reward functions: "
                        "the reward functions changed since it was stored. Set buffer_rescore=True."
                    )
                local[i] = torch.tensor(stored, dtype=sub.dtype, device=sub.device)
            rewards = self.accelerator.gather(local)
        if batch is not None:
            batch.rewards_per_func = rewards
        return rewards

    # --- checkpoints ---

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            save_buffer(checkpoint_dir(self, trial), self.sample_buffer, self.buffer_stats)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            vocab, funcs = policy_vocab_size(self.model), len(self.reward_funcs)

            def validate(state):  # bounded: token ids in the vocabulary, finite log-probs, one reward per function
                check_buffer_state(state, vocab, funcs)

            load_buffer(checkpoint, self.sample_buffer, self.buffer_stats, required=self._buffer_enabled,
                        name=type(self).__name__, validate=validate)  # fmt: skip

    def create_scheduler(self, num_training_steps, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.args.buffer_scale_lr and self._lr_schedule is None:
            self._lr_schedule = scale_schedule(scheduler, type(self).__name__)
        return scheduler

    # --- the steps of a mixed generation batch ---

    def _plan(self, batch: MixedBatch, prompts: list) -> None:
        """Plan every process's groups (the same plan everywhere) and build this process's members."""
        from accelerate.utils import gather_object

        k, n, name = self.num_generations, len(prompts), type(self).__name__
        if n % k:
            raise RuntimeError(f"{name}: {n} rows on this process are not whole groups of {k} (buffer on).")
        keys = [prompt_key(p) for p in prompts]
        for g in range(n // k):
            if len(set(keys[g * k : (g + 1) * k])) != 1:
                raise RuntimeError(f"{name}: rows {g * k}..{(g + 1) * k - 1} should be one group of the same prompt.")
        externals = [self._external(batch.inputs[g * k], keys[g * k], prompts[g * k]) for g in range(n // k)]
        all_groups = gather_object([(keys[g * k], ext is not None) for g, ext in enumerate(externals)])
        self.sample_buffer.evict_stale(batch.step, self.args.buffer_max_staleness)
        batch.num_historical = self._scheduled_history(batch.step)
        batch.plan = plan_groups(
            [key for key, _ in all_groups],
            [available for _, available in all_groups],
            self.sample_buffer,
            k=k,
            num_historical=batch.num_historical,
            step=batch.step,
            max_staleness=self.args.buffer_max_staleness,
            selection=self.args.buffer_selection,
            seed=self.args.seed,
            num_processes=self.accelerator.num_processes,
            reward_weights=tuple(self.reward_weights.tolist()),
        )
        start = self.accelerator.process_index * len(externals)
        for plan, ext in zip(batch.plan[start : start + len(externals)], externals, strict=True):
            batch.members += group_members(plan, k, ext, [self.sample_buffer[uid] for uid in plan.historical])

    def _scheduled_history(self, step: int) -> int:
        if not self.history_per_group or self.args.buffer_history_schedule == "constant":
            return self.history_per_group
        horizon = resolve_history_horizon(self.args.buffer_history_horizon, self.state.max_steps)
        return scheduled_num_historical(self.history_per_group, step, self.args.buffer_history_schedule, horizon)

    def _external(self, row: dict[str, Any], key: str, prompt: Any):
        if not self.args.external_completions_column:
            return None
        return external_member(
            row, key, column=self.args.external_completions_column, logps_column=self.args.external_logps_column,
            tokenizer=getattr(self.processing_class, "tokenizer", self.processing_class),
            max_completion_length=self.args.max_completion_length, conversational=not isinstance(prompt, str),
            name=type(self).__name__, vocab_size=policy_vocab_size(self.model),
        )  # fmt: skip

    def _finish_mixed_batch(self, batch: MixedBatch, output: dict[str, Any]) -> None:
        """Add the buffer columns, log, evict what drifted or was used up, store the fresh samples."""
        behaviour = self._generating_policy_logps(output)
        columns = member_columns(batch.members, behaviour, batch.step)
        output.update(columns)
        if "importance_sampling_ratio" in output:
            # TRL's vLLM correction is π_θ'/π_b on every row; a reused member is already weighted against its stored
            # π_b by the algorithm itself (GSPO's ratio, GPG's truncated weight; GVPO needs none): 1 there
            ratio = output["importance_sampling_ratio"]
            output["importance_sampling_ratio"] = ratio.masked_fill(
                (columns[IS_HISTORICAL] | columns[IS_EXTERNAL]).view(-1, *([1] * (ratio.dim() - 1))), 1.0
            )
        metrics, k = self._metrics["train"], self.num_generations
        if self.args.buffer_scale_lr:
            if self._lr_schedule is None:  # e.g. a DeepSpeed config that brings its own scheduler
                raise RuntimeError(
                    f"{type(self).__name__}: buffer_scale_lr=True, but the learning-rate schedule was not made by "
                    "Trainer.create_scheduler (a DeepSpeed config with its own 'scheduler'?). Remove that scheduler "
                    "from the DeepSpeed config (Trainer then makes it from lr_scheduler_type), or set "
                    "buffer_scale_lr=False."
                )
            self._lr_schedule.set_scale(fresh_share(batch.plan, k))
            metrics["buffer/lr_scale"].append(self._lr_schedule.scale)
        for key, value in plan_metrics(batch.plan, k, batch.step, self.sample_buffer).items():
            if key != "buffer/external_share" or self.args.external_completions_column:
                metrics[key].append(value)
        if self.history_per_group:
            metrics["buffer/history_per_group"].append(float(batch.num_historical))
        metrics["buffer/fresh_reward"].append(fresh_reward(batch.plan, k, batch.rewards_per_func, self.reward_weights))
        if any(p.num_fresh(k) < k for p in batch.plan):
            metrics["buffer/signal_from_history"].append(
                signal_from_history(batch.plan, k, batch.rewards_per_func, self.reward_weights)
            )
        self.buffer_stats["historical_rows"] += sum(len(p.historical) for p in batch.plan)
        self.buffer_stats["external_rows"] += sum(int(p.external) for p in batch.plan)
        if any(p.historical for p in batch.plan):
            current = output.get("old_per_token_logps")  # θ', the pre-update policy (TRL's, with vLLM always)
            current = behaviour if current is None else current.detach().float()  # on-policy: θ' generated it
            self._evict_drifted_and_overused(batch, current, columns)
        if self.history_per_group:
            self._store_fresh(batch, columns)

    def _generating_policy_logps(self, output: dict[str, Any]) -> torch.Tensor:
        """Per-token log-probs of the policy that generated this batch (TRL's sampling or θ' log-probs)."""
        behaviour = output.get("sampling_per_token_logps")
        if behaviour is None:
            behaviour = output.get("old_per_token_logps")
        if behaviour is None:  # TRL skips them when the step is exactly on-policy: the generating policy is this one
            with torch.no_grad():
                behaviour, _, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
                    torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
                    output["completion_ids"].size(1),
                    batch_size=self.args.per_device_train_batch_size,
                )
        return behaviour.detach().float()

    def _evict_drifted_and_overused(self, batch: MixedBatch, current: torch.Tensor, columns: dict) -> None:
        """Measure each historical member's drift, count its use, and evict those over ``buffer_max_drift`` or
        ``buffer_max_reuse`` for later groups. The drifts are gathered so every process evicts the same."""
        from accelerate.utils import gather_object

        drifts = gather_object(member_drifts(batch.members, current, columns[BEHAVIOUR_LOGPS]))
        metrics, max_drift = self._metrics["train"], self.args.buffer_max_drift
        metrics["buffer/mean_drift"].append(sum(d for _, d in drifts) / len(drifts))
        drifted = self.sample_buffer.evict([uid for uid, d in drifts if max_drift and d > max_drift])
        used = [uid for p in batch.plan for uid in p.historical if uid in self.sample_buffer]
        overused = self.sample_buffer.record_uses(used, self.args.buffer_max_reuse)
        self.buffer_stats["drift_evicted"] += len(drifted)
        self.buffer_stats["reuse_evicted"] += len(overused)
        metrics["buffer/drift_evicted"].append(float(len(drifted)))
        metrics["buffer/reuse_evicted"].append(float(len(overused)))

    def _store_fresh(self, batch: MixedBatch, columns: dict) -> None:
        """Store the fresh samples of every process, in process order, so the buffer is the same everywhere."""
        from accelerate.utils import gather_object

        start = self.accelerator.process_index * len(batch.members)
        rewards, behaviour = batch.rewards_per_func.detach().cpu(), columns[BEHAVIOUR_LOGPS]
        records = [
            (member.key, member.completion_ids, member.completion, rewards[start + i].tolist(),
             behaviour[i, : len(member.completion_ids)].cpu(), member.tool_mask, member.extra)
            for i, member in enumerate(batch.members)
            if member.kind == FRESH
        ]  # fmt: skip
        for key, ids, completion, sample_rewards, logps, tool_mask, extra in gather_object(records):
            self.sample_buffer.add(key, ids, completion, sample_rewards, logps, batch.step, tool_mask, extra)
        self.sample_buffer.evict_over_capacity()
        self._metrics["train"]["buffer/size"].append(float(len(self.sample_buffer)))

    def _count_generated(self, completion_ids, tool_mask) -> None:
        """Log the tokens the policy generated in this call (all processes), and their running total."""
        if self.buffer_stats is None:
            return
        lengths = generated_lengths(completion_ids, tool_mask)
        local = torch.tensor([float(sum(lengths)), float(len(lengths))], device=self.accelerator.device)
        tokens, rows = self.accelerator.reduce(local, reduction="sum").tolist()
        self.buffer_stats["generated_tokens"] += int(tokens)
        self.buffer_stats["generated_rows"] += int(rows)
        metrics = self._metrics["train"]
        metrics["buffer/generated_tokens"].append(tokens)
        metrics["buffer/generated_tokens_total"] = [float(self.buffer_stats["generated_tokens"])]
