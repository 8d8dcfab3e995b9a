"""Mixed buffers: groups of k that hold h historical samples (reused from earlier steps) and k − h fresh ones.

Three layers, each usable alone:

- The data: :class:`Sample` and :class:`SampleBuffer`, a buffer keyed by prompt that stores, per completed sample, the
  completion token ids, the completion as the reward functions saw it, the reward of each reward function, the
  per-token log-probs of the policy that generated it (the behaviour policy) and the optimizer step it came from.
- The choices, as pure functions: which samples are stale or over capacity (:meth:`SampleBuffer.evict_stale`,
  :meth:`SampleBuffer.evict_over_capacity`), which historical samples a group gets (:func:`select_historical`, seeded
  by :func:`selection_seed` so that every process draws the same), and the plan of a whole generation batch
  (:func:`plan_groups`), which keeps the number of generated and of scored rows equal on every process
  (:func:`equalise_across_processes`), as TRL's cross-process gathers need.
- The wiring: :class:`BufferMixin`, mixed into ``GroupTrainer`` (and usable with ``trl.GRPOTrainer`` itself, for a
  baseline). It overrides three narrow seams of ``GRPOTrainer`` and calls ``super()`` in each:

  * ``_generate(prompts)``: generates only the fresh rows (``super()._generate`` on that subset) and splices the
    stored completions (and external ones) into the other rows, so the rest of TRL's pipeline (padding, θ'/reference
    log-probs under the pre-update policy, reward calls, metrics) runs unchanged on whole groups;
  * ``_calculate_rewards``: scores only the rows that need it, reusing the stored rewards of historical rows
    (``buffer_rescore=True`` scores them again);
  * ``_generate_and_score_completions``: adds the columns ``behaviour_per_token_logps``, ``is_historical``,
    ``is_external`` and ``staleness``, stores the fresh samples (gathered from every process, so that the buffer is
    identical everywhere) and logs ``buffer/*`` metrics;

  plus ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``, which save and restore the buffer with each checkpoint.

See ``docs/mixed_buffers.md`` for the semantics and for how a loss uses the columns.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from .groups import aggregate_rewards

#: File name of the buffer state inside a checkpoint folder.
BUFFER_STATE_NAME = "gvpo_trl_buffer.pt"

#: Selection rules for the historical members of a group.
SELECTION_RULES = ("newest", "oldest", "uniform")


# --- the data ------------------------------------------------------------------------------------------------------


def prompt_key(prompt: Any) -> str:
    """The buffer key of a prompt: the text itself, or a canonical JSON dump of a conversational prompt."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)


@dataclass
class Sample:
    """One completed sample. ``uid`` numbers samples in insertion order (the same on every process)."""

    uid: int
    key: str
    completion_ids: list[int]
    completion: Any  # what the reward functions saw: a string, or a list of messages
    rewards: list[float]  # one per reward function, NaN where a function returned None
    logps: torch.Tensor | None  # behaviour per-token log-probs, float32, shape (len(completion_ids),)
    step: int  # optimizer step (policy version) that generated it


class SampleBuffer:
    """Completed samples keyed by prompt, oldest first. Deterministic: the same calls give the same state anywhere."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._entries: dict[int, Sample] = {}  # uid -> sample, in insertion (= uid) order
        self._by_key: dict[str, list[int]] = {}
        self.next_uid = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, uid: int) -> bool:
        return uid in self._entries

    def __getitem__(self, uid: int) -> Sample:
        return self._entries[uid]

    def samples(self, key: str | None = None) -> list[Sample]:
        """All samples (or those of one prompt), oldest first."""
        if key is None:
            return list(self._entries.values())
        return [self._entries[uid] for uid in self._by_key.get(key, [])]

    def add(
        self,
        key: str,
        completion_ids: list[int],
        completion: Any,
        rewards: list[float],
        logps: torch.Tensor | None,
        step: int,
    ) -> Sample:
        """Store a sample (no eviction: call :meth:`evict_over_capacity` after a batch of ``add``)."""
        if logps is not None:
            logps = torch.as_tensor(logps, dtype=torch.float32).detach().cpu().reshape(-1)
            if logps.numel() != len(completion_ids):
                raise ValueError(f"{logps.numel()} log-probs for {len(completion_ids)} completion tokens")
        sample = Sample(self.next_uid, key, list(map(int, completion_ids)), completion, list(map(float, rewards)),
                        logps, int(step))  # fmt: skip
        self._entries[sample.uid] = sample
        self._by_key.setdefault(key, []).append(sample.uid)
        self.next_uid += 1
        return sample

    def _remove(self, uid: int) -> None:
        sample = self._entries.pop(uid)
        uids = self._by_key[sample.key]
        uids.remove(uid)
        if not uids:
            del self._by_key[sample.key]

    def evict_stale(self, step: int, max_staleness: int) -> list[int]:
        """Remove the samples older than ``max_staleness`` optimizer steps at ``step`` (``step − s > max``)."""
        stale = [uid for uid, s in self._entries.items() if step - s.step > max_staleness]
        for uid in stale:
            self._remove(uid)
        return stale

    def evict_over_capacity(self) -> list[int]:
        """Remove the oldest samples (first in, first out) until at most ``capacity`` remain."""
        excess = len(self._entries) - self.capacity
        oldest = list(self._entries)[: max(excess, 0)]
        for uid in oldest:
            self._remove(uid)
        return oldest

    def candidates(self, key: str, step: int, max_staleness: int, exclude: set[int] | frozenset = frozenset()):
        """The samples of prompt ``key`` usable at ``step`` (staleness ``step − s ≤ max_staleness``), oldest first."""
        return [
            s for s in self.samples(key) if s.uid not in exclude and 0 <= step - s.step <= max_staleness
        ]  # fmt: skip

    # --- persistence ---

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "capacity": self.capacity,
            "next_uid": self.next_uid,
            "samples": [
                {
                    "uid": s.uid,
                    "key": s.key,
                    "completion_ids": s.completion_ids,
                    "completion": s.completion,
                    "rewards": s.rewards,
                    "logps": s.logps,
                    "step": s.step,
                }
                for s in self._entries.values()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._entries.clear()
        self._by_key.clear()
        for d in state["samples"]:
            sample = Sample(d["uid"], d["key"], list(d["completion_ids"]), d["completion"], list(d["rewards"]),
                            d["logps"], d["step"])  # fmt: skip
            self._entries[sample.uid] = sample
            self._by_key.setdefault(sample.key, []).append(sample.uid)
        self.next_uid = int(state["next_uid"])
        # the capacity is configuration: keep this run's (evicting at once if it is smaller)
        self.evict_over_capacity()

    def digest(self) -> str:
        """SHA-256 of the exact content (bit-exact floats): equal digests mean equal buffers."""
        h = hashlib.sha256()
        h.update(f"{self.next_uid}".encode())
        for s in self._entries.values():
            h.update(json.dumps([s.uid, s.key, s.step, s.completion_ids, s.completion], default=str).encode())
            h.update(repr(s.rewards).encode())  # repr round-trips floats exactly (and shows NaN)
            h.update(b"-" if s.logps is None else s.logps.numpy().tobytes())
        return h.hexdigest()


# --- the choices (pure functions) ----------------------------------------------------------------------------------


def resolve_num_historical(value: float, k: int) -> int:
    """Members of each group of ``k`` taken from history: ``value`` ≥ 1 is a count, ``0 < value < 1`` a fraction of
    ``k`` (rounded down), 0 none. Raises ``ValueError`` unless 0 ≤ result ≤ k − 1 (a group keeps a fresh member)."""
    if value is None or value == 0:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"buffer_history_per_group must be a count >= 1 or a fraction in (0, 1), got {value!r}")
    if value >= 1:
        if value != int(value):
            raise ValueError(
                f"buffer_history_per_group={value}: a value >= 1 is a count of group members and must be a whole "
                "number; a fraction of the group must be < 1."
            )
        h = int(value)
    else:
        h = int(math.floor(value * k + 1e-9))
        if h == 0:
            raise ValueError(
                f"buffer_history_per_group={value} of a group of num_generations={k} is less than one member. "
                f"Use a fraction >= {1 / k:.3g} or a count."
            )
    if h > k - 1:
        raise ValueError(
            f"buffer_history_per_group={value} asks for {h} historical members in groups of num_generations={k}: at "
            f"most k - 1 = {k - 1}, so that every group gets at least one fresh generation (otherwise nothing new "
            "would ever be learned about its prompt)."
        )
    return h


def selection_seed(seed: int, step: int, key: str, occurrence: int = 0) -> int:
    """A seed for one group's draw that depends only on the run seed, the step, the prompt and which occurrence of
    that prompt in the batch it is: the same on every process and after a resume (Python's ``hash`` is not)."""
    digest = hashlib.sha256(f"{seed}\x00{step}\x00{occurrence}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def select_historical(candidates: list[Sample], n: int, rule: str, rng: random.Random | None = None) -> list[Sample]:
    """Up to ``n`` of ``candidates``: the ``newest`` or ``oldest`` (by step, then insertion), or ``uniform`` at random
    without replacement (``rng`` required)."""
    if n <= 0 or not candidates:
        return []
    if rule == "newest":
        return sorted(candidates, key=lambda s: (s.step, s.uid), reverse=True)[:n]
    if rule == "oldest":
        return sorted(candidates, key=lambda s: (s.step, s.uid))[:n]
    if rule == "uniform":
        if rng is None:
            raise ValueError("the 'uniform' rule needs an rng")
        pool = sorted(candidates, key=lambda s: s.uid)
        return rng.sample(pool, min(n, len(pool)))
    raise ValueError(f"unknown selection rule {rule!r}; expected one of {SELECTION_RULES}")


def equalise_across_processes(
    num_historical: list[int], external: list[bool], k: int, num_processes: int
) -> tuple[list[int], list[bool]]:
    """Make every process generate, and score, the same number of rows, by turning planned historical or external
    members into fresh ones (never the reverse: a prompt with too little history gets fresh generations).

    Groups are split contiguously over processes (``len // num_processes`` each). External members are cut first to
    the smallest per-process count (from each process's last groups), then historical members of the processes that
    generate fewer rows are cut (one at a time from the group holding the most, the last such group on ties) until
    they generate as many as the process that generates the most. TRL gathers rewards and completion lengths across
    processes with tensor gathers, which need equal shapes.
    """
    if len(num_historical) != len(external) or len(num_historical) % num_processes:
        raise ValueError(f"{len(num_historical)} groups cannot be split over {num_processes} processes")
    hist, ext = list(num_historical), list(external)
    per = len(hist) // num_processes
    spans = [range(p * per, (p + 1) * per) for p in range(num_processes)]
    min_ext = min(sum(ext[g] for g in span) for span in spans)
    for span in spans:
        surplus = sum(ext[g] for g in span) - min_ext
        for g in reversed(span):
            if surplus == 0:
                break
            if ext[g]:
                ext[g], surplus = False, surplus - 1
    fresh = [sum(k - hist[g] - ext[g] for g in span) for span in spans]
    target = max(fresh)
    for span, f in zip(spans, fresh):
        for _ in range(target - f):
            g = max(reversed(span), key=lambda i: hist[i])  # reversed + max keeps the last group on ties
            if hist[g] == 0:  # cannot happen: target <= rows - external on every process
                raise AssertionError("not enough historical members to equalise")
            hist[g] -= 1
    return hist, ext


@dataclass(frozen=True)
class GroupPlan:
    """How one group of k is filled: ``k − len(historical) − external`` fresh rows, then the external member (if
    any), then the historical samples ``historical`` (uids) in this order. ``wanted``: historical members asked for;
    ``cut``: members (historical or external) that were available but turned fresh by the equalisation across
    processes."""

    key: str
    historical: tuple[int, ...]
    external: bool
    wanted: int
    cut: int = 0

    def num_fresh(self, k: int) -> int:
        return k - len(self.historical) - int(self.external)


def plan_groups(
    keys: list[str],
    external_available: list[bool],
    buffer: SampleBuffer,
    *,
    k: int,
    num_historical: int,
    step: int,
    max_staleness: int,
    selection: str,
    seed: int,
    num_processes: int = 1,
) -> list[GroupPlan]:
    """The plan of a whole generation batch (all processes' groups, in process order), from the buffer as it is.

    Each group gets its external member when one is available, and ``min(num_historical, k − 1 − external)`` historical
    samples of its prompt that are at most ``max_staleness`` steps old, fewer when the buffer has fewer (then more
    fresh rows). A sample serves at most one group of the batch. :func:`equalise_across_processes` then evens out the
    per-process counts. A pure function of its arguments: every process computes the same plan.
    """
    used: set[int] = set()
    occurrences: dict[str, int] = {}
    chosen, wanted = [], []
    for key, ext in zip(keys, external_available):
        occurrence = occurrences.get(key, 0)
        occurrences[key] = occurrence + 1
        want = min(num_historical, k - 1 - int(ext))
        rng = random.Random(selection_seed(seed, step, key, occurrence)) if selection == "uniform" else None
        picks = select_historical(buffer.candidates(key, step, max_staleness, used), want, selection, rng)
        used.update(s.uid for s in picks)
        chosen.append(tuple(s.uid for s in picks))
        wanted.append(want)
    hist, ext = equalise_across_processes([len(c) for c in chosen], list(external_available), k, num_processes)
    return [
        GroupPlan(key, uids[:h], e, w, len(uids) - h + int(a) - int(e))
        for key, uids, h, e, w, a in zip(keys, chosen, hist, ext, wanted, external_available)
    ]


# --- configuration -------------------------------------------------------------------------------------------------


@dataclass
class BufferArgs:
    """Configuration fields of the mixed buffer, shared by every trainer here (``GroupConfig`` inherits them)."""

    buffer_history_per_group: float = field(
        default=0.0,
        metadata={
            "help": "Members of each group of num_generations taken from history (earlier samples of the same prompt) "
            "instead of being generated: a count (1, 2, ...) or a fraction of the group (0 < x < 1, rounded down). At "
            "most num_generations - 1. 0 (default) turns the buffer off. A prompt with too little history gets fresh "
            "generations instead, so a group always has num_generations members."
        },
    )
    buffer_max_staleness: int = field(
        default=64,
        metadata={
            "help": "Oldest a historical sample may be, in optimizer steps (policy versions); older samples are "
            "evicted. A prompt gets history only if it recurs within this many steps (e.g. across epochs)."
        },
    )
    buffer_selection: str = field(
        default="newest",
        metadata={
            "help": "Which historical samples a group gets: 'newest' first, 'oldest' first, or 'uniform' at random "
            "(seeded by the run seed, the step and the prompt, so every process draws the same).",
            "choices": list(SELECTION_RULES),
        },
    )
    buffer_capacity: int = field(
        default=65536,
        metadata={"help": "Most samples the buffer holds; the oldest are evicted first."},
    )
    buffer_rescore: bool = field(
        default=False,
        metadata={
            "help": "Score historical members again with the reward functions instead of reusing their stored rewards."
        },
    )
    external_completions_column: str | None = field(
        default=None,
        metadata={
            "help": "Dataset column holding, per prompt, a completion from elsewhere (a demonstration, a teacher "
            "model): a string, or a list of token ids. When set and not empty for a prompt, it takes one member slot "
            "of that prompt's group (one fewer generation). GSPO and GPG also need external_logps_column."
        },
    )
    external_logps_column: str | None = field(
        default=None,
        metadata={
            "help": "Dataset column with the per-token log-probs of the policy that produced each external completion "
            "(one float per token id of external_completions_column, which must then hold token ids)."
        },
    )


def buffer_enabled(args: Any) -> bool:
    """Whether groups may hold members that are not generated now (historical or external)."""
    return bool(getattr(args, "buffer_history_per_group", 0) or getattr(args, "external_completions_column", None))


def check_buffer_config(args: Any, name: str) -> None:
    """Raise ``ValueError`` for an inconsistent buffer configuration. Call after ``GRPOConfig.__post_init__`` (it reads
    ``steps_per_generation``)."""
    k = args.num_generations
    try:
        resolve_num_historical(args.buffer_history_per_group, k)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if not isinstance(args.buffer_max_staleness, int) or args.buffer_max_staleness < 1:
        raise ValueError(f"{name}: buffer_max_staleness must be an integer >= 1 (optimizer steps), got "
                         f"{args.buffer_max_staleness!r}.")  # fmt: skip
    if args.buffer_selection not in SELECTION_RULES:
        raise ValueError(f"{name}: buffer_selection must be one of {SELECTION_RULES}, got {args.buffer_selection!r}.")
    if not isinstance(args.buffer_capacity, int) or args.buffer_capacity < 1:
        raise ValueError(f"{name}: buffer_capacity must be an integer >= 1, got {args.buffer_capacity!r}.")
    if args.buffer_rescore and not args.buffer_history_per_group:
        raise ValueError(f"{name}: buffer_rescore=True has no effect with buffer_history_per_group=0 (no historical "
                         "members). Set buffer_history_per_group, or leave buffer_rescore=False.")  # fmt: skip
    if args.external_logps_column and not args.external_completions_column:
        raise ValueError(f"{name}: external_logps_column={args.external_logps_column!r} needs "
                         "external_completions_column (the completions those log-probs belong to).")  # fmt: skip
    if not buffer_enabled(args):
        return
    local_rows = args.per_device_train_batch_size * args.steps_per_generation
    if local_rows % k:
        raise ValueError(
            f"{name}: with the mixed buffer on, each process's generation batch (per_device_train_batch_size × "
            f"steps_per_generation = {args.per_device_train_batch_size} × {args.steps_per_generation} = {local_rows} "
            f"rows) must hold whole groups of num_generations={k}: the process that holds a group chooses its "
            "historical members. Make per_device_train_batch_size × steps_per_generation a multiple of num_generations."
        )
    if getattr(args, "use_vllm", False):
        raise ValueError(
            f"{name}: the mixed buffer does not support use_vllm=True yet (TRL's vLLM path generates "
            "num_generations completions per unique prompt, it cannot generate a subset of a group)."
        )
    if getattr(args, "remove_unused_columns", False) and args.external_completions_column:
        raise ValueError(f"{name}: remove_unused_columns=True would drop the column "
                         f"{args.external_completions_column!r}; set remove_unused_columns=False.")  # fmt: skip


# --- the wiring ----------------------------------------------------------------------------------------------------

FRESH, EXTERNAL, HISTORICAL = "fresh", "external", "historical"


@dataclass
class _External:
    completion_ids: list[int]
    completion: Any
    logps: list[float] | None


@dataclass
class _Round:
    """State of one call of ``_generate_and_score_completions`` in training, while TRL runs it."""

    inputs: list[dict[str, Any]]
    step: int
    plan: list[GroupPlan] | None = None  # global
    keys: list[str] = field(default_factory=list)  # local rows
    kinds: list[str] = field(default_factory=list)
    samples: list[Sample | None] = field(default_factory=list)
    externals: list[_External | None] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    completions: list[Any] = field(default_factory=list)
    rewards_per_func: torch.Tensor | None = None  # global rows

    def rows(self, kind: str) -> list[int]:
        return [i for i, x in enumerate(self.kinds) if x == kind]


class BufferMixin:
    """Mixed-buffer wiring for a ``trl.GRPOTrainer`` subclass: ``class T(BufferMixin, GRPOTrainer)``. Its ``args``
    must carry the :class:`BufferArgs` fields. Inert (apart from the ``buffer/generated_tokens*`` metrics and a small
    state file in checkpoints) unless ``buffer_history_per_group`` or ``external_completions_column`` is set."""

    #: Trainers whose loss weighs off-policy members by the behaviour policy (GSPO, GPG) set this: they refuse
    #: external completions that come without log-probs.
    needs_behaviour_logps: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if not all(hasattr(self.args, f) for f in BufferArgs.__dataclass_fields__):
            raise TypeError(f"{name} needs a config with the mixed-buffer fields of gvpo_trl.buffer.BufferArgs.")
        check_buffer_config(self.args, name)
        self.history_per_group = resolve_num_historical(self.args.buffer_history_per_group, self.num_generations)
        self._buffer_enabled = buffer_enabled(self.args)
        self.sample_buffer = SampleBuffer(self.args.buffer_capacity)
        self.buffer_stats = {"generated_tokens": 0, "generated_rows": 0, "historical_rows": 0, "external_rows": 0}
        self._buffer_round: _Round | None = None
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

    # --- seams ---

    def _generate_and_score_completions(self, inputs):
        if not (self._buffer_enabled and self.model.training):
            return super()._generate_and_score_completions(inputs)
        if "image" in inputs[0] or "images" in inputs[0]:
            raise NotImplementedError(f"{type(self).__name__}: the mixed buffer does not support image inputs yet.")
        self._buffer_round = _Round(inputs=inputs, step=self.state.global_step)
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
        for i, kind in enumerate(rnd.kinds):
            if kind == FRESH:
                continue
            all_prompt_ids[i] = all_prompt_ids[i - i % k]  # every group starts with a fresh row of the same prompt
            if kind == HISTORICAL:
                sample = rnd.samples[i]
                all_ids[i], all_completions[i] = list(sample.completion_ids), sample.completion
                logps = None if sample.logps is None else sample.logps.tolist()
            else:
                ext = rnd.externals[i]
                all_ids[i], all_completions[i], logps = list(ext.completion_ids), ext.completion, ext.logps
            if all_logprobs is not None:
                all_logprobs[i] = logps if logps is not None else [float("nan")] * len(all_ids[i])
        rnd.completion_ids, rnd.completions = all_ids, all_completions
        return all_prompt_ids, all_ids, tool_mask, all_completions, all_logprobs, extra_fields, images, tool_images

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rnd = self._buffer_round
        has_history = rnd is not None and rnd.plan is not None and any(p.historical for p in rnd.plan)
        if not has_history or self.args.buffer_rescore:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        else:
            # every process scores the same number of rows (plan_groups equalises), as TRL's tensor gather needs
            scored = [i for i, kind in enumerate(rnd.kinds) if kind != HISTORICAL]
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
                stored = rnd.samples[i].rewards
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
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), folder)
            torch.save(self.buffer_state_dict(), os.path.join(folder, BUFFER_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, BUFFER_STATE_NAME)
        if os.path.exists(path):
            self.load_buffer_state_dict(torch.load(path, weights_only=True))
        elif self._buffer_enabled:
            raise FileNotFoundError(
                f"{type(self).__name__}: the checkpoint {checkpoint} has no mixed-buffer state ({BUFFER_STATE_NAME}), "
                "so the run cannot continue as it would have. It was written without gvpo-trl's buffer (or by a "
                "process that could not write there)."
            )

    def buffer_state_dict(self) -> dict[str, Any]:
        return {"version": 1, "buffer": self.sample_buffer.state_dict(), "stats": dict(self.buffer_stats)}

    def load_buffer_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown mixed-buffer state version {state.get('version')!r}")
        self.sample_buffer.load_state_dict(state["buffer"])
        self.buffer_stats.update(state["stats"])

    # --- helpers ---

    def _count_generated(self, completion_ids, tool_mask) -> None:
        """Log the tokens the policy generated in this call (all processes), and their running total."""
        lengths = [sum(m) for m in tool_mask] if tool_mask is not None else [len(ids) for ids in completion_ids]
        local = torch.tensor([float(sum(lengths)), float(len(lengths))], device=self.accelerator.device)
        tokens, rows = self.accelerator.reduce(local, reduction="sum").tolist()
        self.buffer_stats["generated_tokens"] += int(tokens)
        self.buffer_stats["generated_rows"] += int(rows)
        metrics = self._metrics["train"]
        metrics["buffer/generated_tokens"].append(tokens)
        metrics["buffer/generated_tokens_total"] = [float(self.buffer_stats["generated_tokens"])]

    def _external_for(self, row: dict[str, Any], conversational: bool) -> _External | None:
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
        limit = self.args.max_completion_length
        if limit is not None and len(ids) > limit:
            ids, logps = ids[:limit], (None if logps is None else logps[:limit])
            text = tokenizer.decode(ids, skip_special_tokens=True)
        completion = [{"role": "assistant", "content": text}] if conversational else text
        return _External(ids, completion, logps)

    def _plan_round(self, rnd: _Round, prompts: list) -> None:
        k, n = self.num_generations, len(prompts)
        name = type(self).__name__
        if n % k:
            raise RuntimeError(f"{name}: {n} rows on this process are not whole groups of {k} (buffer on).")
        keys = rnd.keys = [prompt_key(p) for p in prompts]
        local_groups, local_externals = [], []
        for g in range(n // k):
            if len(set(keys[g * k : (g + 1) * k])) != 1:
                raise RuntimeError(f"{name}: rows {g * k}..{(g + 1) * k - 1} should be one group of the same prompt.")
            ext = None
            if self.args.external_completions_column:
                ext = self._external_for(rnd.inputs[g * k], conversational=not isinstance(prompts[g * k], str))
            local_groups.append((keys[g * k], ext is not None))
            local_externals.append(ext)
        from accelerate.utils import gather_object

        all_groups = gather_object(local_groups)
        self.sample_buffer.evict_stale(rnd.step, self.args.buffer_max_staleness)
        rnd.plan = plan_groups(
            [key for key, _ in all_groups],
            [ext for _, ext in all_groups],
            self.sample_buffer,
            k=k,
            num_historical=self.history_per_group,
            step=rnd.step,
            max_staleness=self.args.buffer_max_staleness,
            selection=self.args.buffer_selection,
            seed=self.args.seed,
            num_processes=self.accelerator.num_processes,
        )
        start = self.accelerator.process_index * len(local_groups)
        for plan, ext in zip(rnd.plan[start : start + len(local_groups)], local_externals):
            f = plan.num_fresh(k)
            rnd.kinds += [FRESH] * f + [EXTERNAL] * int(plan.external) + [HISTORICAL] * len(plan.historical)
            rnd.samples += [None] * (f + int(plan.external)) + [self.sample_buffer[uid] for uid in plan.historical]
            rnd.externals += [None] * f + ([ext] if plan.external else []) + [None] * len(plan.historical)

    def _finish_round(self, rnd: _Round, output: dict[str, Any]) -> None:
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
        lengths = torch.tensor([len(ids) for ids in rnd.completion_ids], device=device)
        behaviour[torch.arange(width, device=device).unsqueeze(0) >= lengths.unsqueeze(1)] = 0.0
        staleness = torch.zeros(n, dtype=torch.long, device=device)
        for i, kind in enumerate(rnd.kinds):
            if kind == HISTORICAL:
                sample = rnd.samples[i]
                staleness[i] = rnd.step - sample.step
                if sample.logps is None:
                    behaviour[i, : len(sample.completion_ids)] = float("nan")
                else:
                    behaviour[i, : sample.logps.numel()] = sample.logps.to(device)
            elif kind == EXTERNAL:
                ext = rnd.externals[i]
                logps = ext.logps if ext.logps is not None else [float("nan")] * len(ext.completion_ids)
                behaviour[i, : len(logps)] = torch.tensor(logps, dtype=torch.float32, device=device)
        output["behaviour_per_token_logps"] = behaviour
        output["is_historical"] = torch.tensor([kind == HISTORICAL for kind in rnd.kinds], device=device)
        output["is_external"] = torch.tensor([kind == EXTERNAL for kind in rnd.kinds], device=device)
        output["staleness"] = staleness

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
        if num_hist:
            stale = [rnd.step - self.sample_buffer[uid].step for p in plan for uid in p.historical]
            metrics["buffer/mean_staleness"].append(sum(stale) / len(stale))
        total = aggregate_rewards(rnd.rewards_per_func.detach().float().cpu(), self.reward_weights.detach().cpu())
        fresh_global = torch.tensor([pos < p.num_fresh(k) for p in plan for pos in range(k)])
        metrics["buffer/fresh_reward"].append(torch.nanmean(total[fresh_global]).item())

        if self.history_per_group:  # store the fresh samples of every process, in process order
            from accelerate.utils import gather_object

            start = self.accelerator.process_index * n
            rewards = rnd.rewards_per_func.detach().cpu()
            records = [
                (rnd.keys[i], rnd.completion_ids[i], rnd.completions[i], rewards[start + i].tolist(),
                 behaviour[i, : len(rnd.completion_ids[i])].cpu())
                for i in rnd.rows(FRESH)
            ]  # fmt: skip
            for key, ids, completion, sample_rewards, logps in gather_object(records):
                self.sample_buffer.add(key, ids, completion, sample_rewards, logps, rnd.step)
            self.sample_buffer.evict_over_capacity()
            metrics["buffer/size"].append(float(len(self.sample_buffer)))


