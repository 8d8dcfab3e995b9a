"""Mixed buffers: groups of k that hold h historical samples (reused from earlier steps) and k − h fresh ones.

One module per layer, each usable alone: ``store`` (the samples, keyed by prompt), ``planning`` (which samples a
group gets: pure functions), ``config`` (the ``buffer_*`` fields and their checks) and ``mixin`` (the TRL wiring).
See ``docs/mixed_buffers.md`` for the semantics and for how a loss uses the columns it adds.
"""

from .config import BufferArgs, buffer_enabled, check_buffer_config
from .mixin import BUFFER_STATE_NAME, EXTERNAL, FRESH, HISTORICAL, BufferMixin, Member, Round
from .planning import (
    HISTORY_SCHEDULES,
    SELECTION_RULES,
    GroupPlan,
    equalise_across_processes,
    plan_groups,
    resolve_history_horizon,
    resolve_num_historical,
    scheduled_num_historical,
    select_historical,
    selection_seed,
)
from .store import Sample, SampleBuffer, prompt_key

__all__ = [
    "BUFFER_STATE_NAME",
    "EXTERNAL",
    "FRESH",
    "HISTORICAL",
    "HISTORY_SCHEDULES",
    "SELECTION_RULES",
    "BufferArgs",
    "BufferMixin",
    "GroupPlan",
    "Member",
    "Round",
    "Sample",
    "SampleBuffer",
    "buffer_enabled",
    "check_buffer_config",
    "equalise_across_processes",
    "plan_groups",
    "prompt_key",
    "resolve_history_horizon",
    "resolve_num_historical",
    "scheduled_num_historical",
    "select_historical",
    "selection_seed",
]
