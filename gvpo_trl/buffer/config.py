"""Configuration of the mixed buffer: the ``buffer_*`` / ``external_*`` fields every config here carries, and their
checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .planning import HISTORY_SCHEDULES, SELECTION_RULES, resolve_history_horizon, resolve_num_historical


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
            "help": "Which historical samples a group gets: by age, 'newest' first, 'oldest' first, or 'uniform' at "
            "random (seeded by the run seed, the step and the prompt, so every process draws the same); by signal, "
            "'contrast' (rewards farthest from the prompt's latest mean reward: reward variance in groups whose fresh "
            "members would agree) or 'highest' (best rewards first).",
            "choices": list(SELECTION_RULES),
        },
    )
    buffer_max_drift: float = field(
        default=0.0,
        metadata={
            "help": "Staleness in policy space: when a historical member is used, its drift (mean over its tokens of "
            "|log pi_theta'(y_t) - log pi_b(y_t)|, the pre-update policy against the one that generated it, in nats; "
            "free, from the log-probs TRL computes anyway) is measured, and a sample that drifted more than this is "
            "evicted for later groups. 0 (default) never evicts for drift."
        },
    )
    buffer_max_reuse: int = field(
        default=0,
        metadata={
            "help": "Most groups one stored sample may serve as a historical member; it is evicted after that many "
            "uses. 0 (default): no limit (staleness and drift limits still apply)."
        },
    )
    buffer_history_schedule: str = field(
        default="constant",
        metadata={
            "help": "How the historical members per group change over the run: 'constant' (always "
            "buffer_history_per_group), 'step' (all of them until buffer_history_horizon, then none), 'linear' "
            "(ceil(h * (1 - step / horizon)), reaching 0 at buffer_history_horizon).",
            "choices": list(HISTORY_SCHEDULES),
        },
    )
    buffer_history_horizon: float = field(
        default=1.0,
        metadata={
            "help": "Where a 'step' or 'linear' history schedule reaches 0: a fraction of max_steps (0 < x <= 1) or "
            "an optimizer step count (a whole number > 1)."
        },
    )
    buffer_scale_lr: bool = field(
        default=False,
        metadata={
            "help": "Multiply the learning rate by the fresh share of each generation batch (1 before any history "
            "exists, (k - h) / k when every group takes h): with history a run takes k / (k - h) optimizer steps per "
            "generated token, and this keeps the policy's movement per generated token that of fresh-only training, "
            "so the fresh-only learning rate can be kept. Needs a LambdaLR schedule (not reduce_lr_on_plateau)."
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
    drift = args.buffer_max_drift
    if isinstance(drift, bool) or not isinstance(drift, (int, float)) or not math.isfinite(drift) or drift < 0:
        raise ValueError(f"{name}: buffer_max_drift must be a number >= 0 (nats per token; 0 turns it off), got "
                         f"{drift!r}.")  # fmt: skip
    reuse = args.buffer_max_reuse
    if isinstance(reuse, bool) or not isinstance(reuse, int) or reuse < 0:
        raise ValueError(f"{name}: buffer_max_reuse must be an integer >= 0 (0: no limit), got {reuse!r}.")
    if args.buffer_history_schedule not in HISTORY_SCHEDULES:
        raise ValueError(f"{name}: buffer_history_schedule must be one of {HISTORY_SCHEDULES}, got "
                         f"{args.buffer_history_schedule!r}.")  # fmt: skip
    try:  # a fraction is checked again against max_steps when training starts
        resolve_history_horizon(args.buffer_history_horizon, 1)
    except ValueError as error:
        raise ValueError(f"{name}: {error}.") from None
    if not args.buffer_history_per_group:
        defaults = {"buffer_max_drift": 0, "buffer_max_reuse": 0, "buffer_history_schedule": "constant",
                    "buffer_scale_lr": False}  # fmt: skip
        tuned = [f for f, default in defaults.items() if getattr(args, f) != default]
        if tuned:
            raise ValueError(
                f"{name}: {', '.join(tuned)} has no effect with buffer_history_per_group=0 (no historical members). "
                "Set buffer_history_per_group, or leave them at their defaults."
            )
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if args.buffer_scale_lr and schedule == "reduce_lr_on_plateau":
        raise ValueError(f"{name}: buffer_scale_lr=True scales the factors of a LambdaLR schedule; "
                         "lr_scheduler_type='reduce_lr_on_plateau' has none. Use another schedule, or "
                         "buffer_scale_lr=False.")  # fmt: skip
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
    if getattr(args, "remove_unused_columns", False) and args.external_completions_column:
        raise ValueError(f"{name}: remove_unused_columns=True would drop the column "
                         f"{args.external_completions_column!r}; set remove_unused_columns=False.")  # fmt: skip
