"""Configuration of the mixed buffer: the ``buffer_*`` / ``external_*`` fields every config here carries, and their
checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .planning import SELECTION_RULES, resolve_num_historical


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
    if getattr(args, "use_vllm", False):
        raise ValueError(
            f"{name}: the mixed buffer does not support use_vllm=True yet (TRL's vLLM path generates "
            "num_generations completions per unique prompt, it cannot generate a subset of a group)."
        )
    if getattr(args, "remove_unused_columns", False) and args.external_completions_column:
        raise ValueError(f"{name}: remove_unused_columns=True would drop the column "
                         f"{args.external_completions_column!r}; set remove_unused_columns=False.")  # fmt: skip
