"""The wiring of the mixed buffer into TRL: :class:`BufferMixin`, mixed into ``GroupTrainer`` (and usable with
``trl.GRPOTrainer`` itself, for a baseline). It overrides narrow seams of ``GRPOTrainer`` and calls ``super()`` in each:

- ``_generate(prompts)``: generates only the fresh rows (``super()._generate`` on that subset) and splices the stored
  completions (and external ones) into the other rows, so the rest of TRL's pipeline (padding, θ'/reference log-probs
  under the pre-update policy, reward calls, metrics) runs unchanged on whole groups;
- ``_calculate_rewards``: scores only the rows that need it, reusing the stored rewards of historical rows
  (``buffer_rescore=True`` scores them again);
- ``_generate_and_score_completions``: adds the columns of ``gvpo_trl.columns`` (behaviour log-probs, is_historical,
  is_external, staleness), stores the fresh samples (gathered from every process, so that the buffer is identical
  everywhere) and logs ``buffer/*`` metrics;
- ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``: save and restore the buffer with each checkpoint.

While TRL runs one ``_generate_and_score_completions`` call, a :class:`Round` holds its plan and one :class:`Member`
record per local row.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint_integrity import check_buffer_state
from ..checkpoints import checkpoint_dir
from ..columns import BEHAVIOUR_LOGPS, IS_EXTERNAL, IS_HISTORICAL, STALENESS
from ..generation_checks import check_completion_ids, policy_vocab_size
from ..groups import aggregate_rewards
from .config import BufferArgs, buffer_enabled, check_buffer_config
from .planning import (
    GroupPlan,
    plan_groups,
    resolve_history_horizon,
    resolve_num_historical,
    scheduled_num_historical,
)
from .store import SampleBuffer, prompt_key

#: File name of the buffer state inside a checkpoint folder.
BUFFER_STATE_NAME = "gvpo_trl_buffer.pt"

FRESH, EXTERNAL, HISTORICAL = "fresh", "external", "historical"


@dataclass
class Member:
    """One local row of a round: a group member, its kind and its completion.

    Fresh members get their completion from the generation; historical ones from their stored sample (``sample_uid``,
    ``step`` and ``rewards`` as stored); external ones from the dataset. ``logps``: the behaviour policy's per-token
    log-probs when known before scoring (stored or external), else None.
    """

    key: str
    kind: str
    completion_ids: list[int] | None = None
    completion: Any = None
    logps: list[float] | None = None
    step: int | None = None
    rewards: list[float] | None = None
    sample_uid: int | None = None


@dataclass
class Round:
    """State of one call of ``_generate_and_score_completions`` in training, while TRL runs it."""

    inputs: list[dict[str, Any]]
    step: int
    plan: list[GroupPlan] | None = None  # global, identical on every process
    num_historical: int = 0  # historical members per group asked for at this step (the schedule's value)
    members: list[Member] = field(default_factory=list)  # local rows
    rewards_per_func: torch.Tensor | None = None  # global rows

    def rows(self, kind: str) -> list[int]:
        return [i for i, member in enumerate(self.members) if member.kind == kind]


class BufferMixin:
    """Mixed-buffer wiring for a ``trl.GRPOTrainer`` subclass: ``class T(BufferMixin, GRPOTrainer)``. Its ``args``
    must carry the :class:`BufferArgs` fields. Inert (apart from the ``buffer/generated_tokens*`` metrics and a small
    state file in checkpoints) unless ``buffer_history_per_group`` or ``external_completions_column`` is set."""

    #: Trainers whose loss weighs off-policy members by the behaviour policy (GSPO, GPG) set this: they refuse
    #: external completions that come without log-probs.
    needs_behaviour_logps: bool = False
    # what _generate reads, defined for a trainer built without __init__ (as TRL's own rollout tests build one)
    _buffer_round: Round | None = None
    _buffer_enabled: bool = False
    history_per_group: int = 0
    buffer_stats: dict[str, int] | None = None  # None: not initialised, nothing is counted

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if not all(hasattr(self.args, f) for f in BufferArgs.__dataclass_fields__):
            raise TypeError(f"{name} needs a config with the mixed-buffer fields of gvpo_trl.buffer.BufferArgs.")
        check_buffer_config(self.args, name)
        self.history_per_group = resolve_num_historical(self.args.buffer_history_per_group, self.num_generations)
        self._buffer_enabled = buffer_enabled(self.args)
        self.sample_buffer = SampleBuffer(self.args.buffer_capacity)
        self.buffer_stats = {"generated_tokens": 0, "generated_rows": 0, "historical_rows": 0, "external_rows": 0,
                             "drift_evicted": 0, "reuse_evicted": 0}  # fmt: skip
        self._buffer_round: Round | None = None
        if not self._buffer_enabled:
            return
        unsupported = [what for what, on in (("tools", self.tools), ("rollout_func", self.rollout_func),
                                             ("environment_factory", self.environment_factories)) if on]  # fmt: skip
        if unsupported:
            raise ValueError(f"{name}: the mixed buffer does not support {', '.join(unsupported)} yet: a stored "
                             "completion cannot replay a tool or environment interaction.")  # fmt: skip
        column, logps_column = self.args.external_completions_column, self.args.external_logps_column
        if column and self.needs_behaviour_logps and not logps_column:
            raise ValueError(
                f"{name} weighs each off-policy group member by its behaviour policy's log-probs, so external "
                f"completions (external_completions_column={column!r}) need them too: set external_logps_column to "
                "a column with one log-prob per completion token (the completion column then holds token ids). "
                "GVPOTrainer accepts external completions without log-probs."
            )
        names = getattr(self.train_dataset, "column_names", None)
        for col in (column, logps_column):
            if col and names is not None and col not in names:
                raise ValueError(f"{name}: the train dataset has no column {col!r} (columns: {names}).")
        if names is not None and {"image", "images"} & set(names):
            raise ValueError(self._image_refusal())

    def _image_refusal(self) -> str:
        return (
            f"{type(self).__name__}: the mixed buffer does not support image inputs yet (a stored completion would "
            "have to be replayed with its images). Turn the buffer off (buffer_history_per_group=0, no "
            "external_completions_column) to train on images."
        )

    # --- seams ---

    def _generate_and_score_completions(self, inputs):
        if not (self._buffer_enabled and self.model.training):
            return super()._generate_and_score_completions(inputs)
        if "image" in inputs[0] or "images" in inputs[0]:  # a stream shows its columns only here
            raise ValueError(self._image_refusal())
        self._buffer_round = Round(inputs=inputs, step=self.state.global_step)
        try:
            output = super()._generate_and_score_completions(inputs)
            self._finish_round(self._buffer_round, output)
        finally:
            self._buffer_round = None
        return output

    def _generate(self, prompts):
        rnd = self._buffer_round
        if rnd is None:
            output = super()._generate(prompts)
            if self.model.training:
                self._count_generated(output[1], output[2])
            return output
        self._plan_round(rnd, prompts)
        fresh = rnd.rows(FRESH)
        output = super()._generate([prompts[i] for i in fresh])
        prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images = output
        if tool_mask is not None or extra_fields or images is not None:
            raise RuntimeError(f"{type(self).__name__}: unexpected tool/extra/image outputs with the mixed buffer on.")
        self._count_generated(completion_ids, None)
        n = len(prompts)
        all_prompt_ids, all_ids, all_completions = [None] * n, [None] * n, [None] * n
        all_logprobs = None if logprobs is None else [None] * n
        for j, i in enumerate(fresh):
            all_prompt_ids[i], all_ids[i], all_completions[i] = prompt_ids[j], completion_ids[j], completions[j]
            if logprobs is not None:
                all_logprobs[i] = logprobs[j]
        k = self.num_generations
        for i, member in enumerate(rnd.members):
            if member.kind == FRESH:
                member.completion_ids, member.completion = list(all_ids[i]), all_completions[i]
                continue
            all_prompt_ids[i] = all_prompt_ids[i - i % k]  # every group starts with a fresh row of the same prompt
            all_ids[i], all_completions[i] = list(member.completion_ids), member.completion
            if all_logprobs is not None:
                logps = member.logps
                all_logprobs[i] = logps if logps is not None else [float("nan")] * len(all_ids[i])
        return all_prompt_ids, all_ids, tool_mask, all_completions, all_logprobs, extra_fields, images, tool_images

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rnd = self._buffer_round
        has_history = rnd is not None and rnd.plan is not None and any(p.historical for p in rnd.plan)
        if not has_history or self.args.buffer_rescore:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        else:
            # every process scores the same number of rows (plan_groups equalises), as TRL's tensor gather needs
            scored = [i for i, member in enumerate(rnd.members) if member.kind != HISTORICAL]
            sub = super()._calculate_rewards(
                [inputs[i] for i in scored],
                [prompts[i] for i in scored],
                [completions[i] for i in scored],
                [completion_ids_list[i] for i in scored],
            )
            start = self.accelerator.process_index * len(scored)
            local = torch.empty(len(prompts), sub.size(1), dtype=sub.dtype, device=sub.device)
            local[scored] = sub[start : start + len(scored)]
            for i in rnd.rows(HISTORICAL):
                stored = rnd.members[i].rewards
                if len(stored) != sub.size(1):
                    raise RuntimeError(
                        f"a historical sample has {len(stored)} rewards but there are {sub.size(1)} reward functions: "
                        "the reward functions changed since it was stored. Set buffer_rescore=True."
                    )
                local[i] = torch.tensor(stored, dtype=sub.dtype, device=sub.device)
            rewards = self.accelerator.gather(local)
        if rnd is not None:
            rnd.rewards_per_func = rewards
        return rewards

    # --- checkpoints ---

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            torch.save(self.buffer_state_dict(), os.path.join(checkpoint_dir(self, trial), BUFFER_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        name = type(self).__name__
        path = os.path.join(checkpoint, BUFFER_STATE_NAME)
        if os.path.exists(path):
            try:
                self.load_buffer_state_dict(torch.load(path, weights_only=True))
            except Exception as error:  # a truncated or foreign file: unpickling errors name neither the file nor a fix
                raise ValueError(
                    f"{name}: the mixed-buffer state {path} cannot be read ({type(error).__name__}: "
                    f"{str(error).strip().splitlines()[0][:160] if str(error).strip() else ''}); the file "
                    "is damaged (e.g. a write cut short). Resume from an earlier checkpoint, or start fresh (no "
                    "resume_from_checkpoint, or a new output_dir)."
                ) from error
        elif self._buffer_enabled:
            raise FileNotFoundError(
                f"{name}: the checkpoint {checkpoint} has no mixed-buffer state ({BUFFER_STATE_NAME}), "
                "so the run cannot continue as it would have. It was written without gvpo-trl's buffer (or by a "
                "process that could not write there)."
            )

    def buffer_state_dict(self) -> dict[str, Any]:
        return {"version": 1, "buffer": self.sample_buffer.state_dict(), "stats": dict(self.buffer_stats)}

    def load_buffer_state_dict(self, state: dict[str, Any]) -> None:
        check_buffer_state(state, policy_vocab_size(self.model), len(self.reward_funcs))  # bounded, in the vocabulary
        if state.get("version") != 1:
            raise ValueError(f"unknown mixed-buffer state version {state.get('version')!r}")
        self.sample_buffer.load_state_dict(state["buffer"])
        self.buffer_stats.update(state["stats"])

    # --- helpers ---

    def _evict_drifted_and_overused(self, rnd: Round, current: torch.Tensor, behaviour: torch.Tensor) -> None:
        """After a round with historical members: measure each one's drift (mean |log π_θ' − log π_b| over its
        tokens), count its use, and evict those over ``buffer_max_drift`` or ``buffer_max_reuse`` for later groups.
        Each member is measured on the process that holds it; the values are gathered so every process evicts the
        same."""
        from accelerate.utils import gather_object

        local = []
        for i in rnd.rows(HISTORICAL):
            n = len(rnd.members[i].completion_ids)
            drift = (current[i, :n] - behaviour[i, :n]).abs().mean().item() if n else 0.0
            local.append((rnd.members[i].sample_uid, drift))
        drifts = gather_object(local)
        metrics, max_drift = self._metrics["train"], self.args.buffer_max_drift
        metrics["buffer/mean_drift"].append(sum(d for _, d in drifts) / len(drifts))
        drifted = self.sample_buffer.evict([uid for uid, d in drifts if max_drift and d > max_drift])
        used = [uid for p in rnd.plan for uid in p.historical if uid in self.sample_buffer]
        overused = self.sample_buffer.record_uses(used, self.args.buffer_max_reuse)
        self.buffer_stats["drift_evicted"] += len(drifted)
        self.buffer_stats["reuse_evicted"] += len(overused)
        metrics["buffer/drift_evicted"].append(float(len(drifted)))
        metrics["buffer/reuse_evicted"].append(float(len(overused)))

    def _count_generated(self, completion_ids, tool_mask) -> None:
        """Log the tokens the policy generated in this call (all processes), and their running total."""
        if self.buffer_stats is None:
            return
        lengths = [sum(m) for m in tool_mask] if tool_mask is not None else [len(ids) for ids in completion_ids]
        local = torch.tensor([float(sum(lengths)), float(len(lengths))], device=self.accelerator.device)
        tokens, rows = self.accelerator.reduce(local, reduction="sum").tolist()
        self.buffer_stats["generated_tokens"] += int(tokens)
        self.buffer_stats["generated_rows"] += int(rows)
        metrics = self._metrics["train"]
        metrics["buffer/generated_tokens"].append(tokens)
        metrics["buffer/generated_tokens_total"] = [float(self.buffer_stats["generated_tokens"])]

    def _external_for(self, row: dict[str, Any], key: str, conversational: bool) -> Member | None:
        value = row.get(self.args.external_completions_column)
        if value is None or (isinstance(value, (str, list)) and len(value) == 0):
            return None
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        logps = None
        if isinstance(value, str):
            if self.args.external_logps_column:
                raise ValueError(
                    f"external_logps_column is set, so {self.args.external_completions_column!r} must hold token ids "
                    "(one log-prob per token id); it holds text."
                )
            ids = tokenizer(text=value, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            text = value
        elif isinstance(value, list) and all(isinstance(x, int) for x in value):
            ids = list(value)
            check_completion_ids([ids], policy_vocab_size(self.model), type(self).__name__,
                                 f"the external completion column {self.args.external_completions_column!r}")  # fmt: skip
            text = tokenizer.decode(ids, skip_special_tokens=True)
        else:
            raise ValueError(
                f"external completion column {self.args.external_completions_column!r}: expected a string or a list "
                f"of token ids, got {type(value).__name__}."
            )
        if self.args.external_logps_column:
            logps = row.get(self.args.external_logps_column)
            if logps is None or len(logps) != len(ids):
                raise ValueError(
                    f"external completion of prompt {row.get('prompt')!r}: {self.args.external_logps_column!r} must "
                    f"hold one log-prob per token id ({len(ids)}), got "
                    f"{'none' if logps is None else len(logps)}. {type(self).__name__} cannot use it without them."
                )
            logps = [float(x) for x in logps]
            if not all(math.isfinite(x) and x <= 0 for x in logps):
                raise ValueError(
                    f"external completion of prompt {row.get('prompt')!r}: {self.args.external_logps_column!r} holds a "
                    f"value that is not a log-probability (NaN, infinite or > 0): {logps}. Fix or drop that row."
                )
        limit = self.args.max_completion_length
        if limit is not None and len(ids) > limit:
            ids, logps = ids[:limit], (None if logps is None else logps[:limit])
            text = tokenizer.decode(ids, skip_special_tokens=True)
        completion = [{"role": "assistant", "content": text}] if conversational else text
        return Member(key, EXTERNAL, ids, completion, logps)

    def _plan_round(self, rnd: Round, prompts: list) -> None:
        k, n = self.num_generations, len(prompts)
        name = type(self).__name__
        if n % k:
            raise RuntimeError(f"{name}: {n} rows on this process are not whole groups of {k} (buffer on).")
        keys = [prompt_key(p) for p in prompts]
        local_groups, local_externals = [], []
        for g in range(n // k):
            if len(set(keys[g * k : (g + 1) * k])) != 1:
                raise RuntimeError(f"{name}: rows {g * k}..{(g + 1) * k - 1} should be one group of the same prompt.")
            ext = None
            if self.args.external_completions_column:
                ext = self._external_for(
                    rnd.inputs[g * k], keys[g * k], conversational=not isinstance(prompts[g * k], str)
                )
            local_groups.append((keys[g * k], ext is not None))
            local_externals.append(ext)
        from accelerate.utils import gather_object

        all_groups = gather_object(local_groups)
        self.sample_buffer.evict_stale(rnd.step, self.args.buffer_max_staleness)
        rnd.num_historical = self.history_per_group
        if self.history_per_group and self.args.buffer_history_schedule != "constant":
            horizon = resolve_history_horizon(self.args.buffer_history_horizon, self.state.max_steps)
            rnd.num_historical = scheduled_num_historical(
                self.history_per_group, rnd.step, self.args.buffer_history_schedule, horizon
            )
        rnd.plan = plan_groups(
            [key for key, _ in all_groups],
            [ext for _, ext in all_groups],
            self.sample_buffer,
            k=k,
            num_historical=rnd.num_historical,
            step=rnd.step,
            max_staleness=self.args.buffer_max_staleness,
            selection=self.args.buffer_selection,
            seed=self.args.seed,
            num_processes=self.accelerator.num_processes,
        )
        start = self.accelerator.process_index * len(local_groups)
        for plan, ext in zip(rnd.plan[start : start + len(local_groups)], local_externals, strict=False):
            f = plan.num_fresh(k)
            rnd.members += [Member(plan.key, FRESH) for _ in range(f)] + ([ext] if plan.external else [])
            for uid in plan.historical:
                sample = self.sample_buffer[uid]
                logps = None if sample.logps is None else sample.logps.tolist()
                rnd.members.append(
                    Member(plan.key, HISTORICAL, list(sample.completion_ids), sample.completion, logps, sample.step,
                           list(sample.rewards), uid)
                )  # fmt: skip

    def _finish_round(self, rnd: Round, output: dict[str, Any]) -> None:
        """Add the buffer columns, store the fresh samples (of every process, in process order), log."""
        completion_ids, device = output["completion_ids"], output["completion_ids"].device
        n, width = completion_ids.shape
        behaviour = output.get("sampling_per_token_logps")
        if behaviour is None:
            behaviour = output.get("old_per_token_logps")
        if behaviour is None:  # TRL skips them when the step is exactly on-policy: the generating policy is this one
            with torch.no_grad():
                behaviour, _, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    torch.cat([output["prompt_ids"], completion_ids], dim=1),
                    torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
                    width,
                    batch_size=self.args.per_device_train_batch_size,
                )
        behaviour = behaviour.detach().float().clone()
        current = behaviour.clone()  # the pre-update policy θ' on every row (no vLLM here, so not π_sampling)
        lengths = torch.tensor([len(member.completion_ids) for member in rnd.members], device=device)
        behaviour[torch.arange(width, device=device).unsqueeze(0) >= lengths.unsqueeze(1)] = 0.0
        staleness = torch.zeros(n, dtype=torch.long, device=device)
        for i, member in enumerate(rnd.members):
            if member.kind == FRESH:
                continue
            if member.kind == HISTORICAL:
                staleness[i] = rnd.step - member.step
            logps = member.logps if member.logps is not None else [float("nan")] * len(member.completion_ids)
            behaviour[i, : len(logps)] = torch.tensor(logps, dtype=torch.float32, device=device)
        output[BEHAVIOUR_LOGPS] = behaviour
        output[IS_HISTORICAL] = torch.tensor([member.kind == HISTORICAL for member in rnd.members], device=device)
        output[IS_EXTERNAL] = torch.tensor([member.kind == EXTERNAL for member in rnd.members], device=device)
        output[STALENESS] = staleness

        # metrics, from the global plan (identical on every process), before the buffer changes
        k, plan = self.num_generations, rnd.plan
        rows = len(plan) * k
        num_hist = sum(len(p.historical) for p in plan)
        num_ext = sum(int(p.external) for p in plan)
        self.buffer_stats["historical_rows"] += num_hist
        self.buffer_stats["external_rows"] += num_ext
        metrics = self._metrics["train"]
        metrics["buffer/historical_share"].append(num_hist / rows)
        if self.args.external_completions_column:
            metrics["buffer/external_share"].append(num_ext / rows)
        metrics["buffer/equalised_members"].append(float(sum(p.cut for p in plan)))
        if self.history_per_group:
            metrics["buffer/history_per_group"].append(float(rnd.num_historical))
        if num_hist:
            stale = [rnd.step - self.sample_buffer[uid].step for p in plan for uid in p.historical]
            metrics["buffer/mean_staleness"].append(sum(stale) / len(stale))
            self._evict_drifted_and_overused(rnd, current, behaviour)
        total = aggregate_rewards(rnd.rewards_per_func.detach().float().cpu(), self.reward_weights.detach().cpu())
        fresh_global = torch.tensor([pos < p.num_fresh(k) for p in plan for pos in range(k)])
        metrics["buffer/fresh_reward"].append(torch.nanmean(total[fresh_global]).item())

        if self.history_per_group:  # store the fresh samples of every process, in process order
            from accelerate.utils import gather_object

            start = self.accelerator.process_index * n
            rewards = rnd.rewards_per_func.detach().cpu()
            records = [
                (member.key, member.completion_ids, member.completion, rewards[start + i].tolist(),
                 behaviour[i, : len(member.completion_ids)].cpu())
                for i, member in enumerate(rnd.members)
                if member.kind == FRESH
            ]  # fmt: skip
            for key, ids, completion, sample_rewards, logps in gather_object(records):
                self.sample_buffer.add(key, ids, completion, sample_rewards, logps, rnd.step)
            self.sample_buffer.evict_over_capacity()
            metrics["buffer/size"].append(float(len(self.sample_buffer)))
