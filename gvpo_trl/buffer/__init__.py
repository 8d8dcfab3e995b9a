"""Mixed buffers: groups of k that hold h historical samples (reused from earlier steps) and k − h fresh ones.

One module per concept: ``store`` (the samples, keyed by prompt), ``planning`` (which samples a group gets: pure
functions), ``members`` (one record per row of a mixed generation batch, and the pure functions over them),
``accounting`` (what is counted and logged), ``step_size`` (the learning rate scaled by the fresh share),
``persistence`` (the buffer in a checkpoint), ``config`` (the
``buffer_*`` fields and their checks) and ``mixin`` (the TRL wiring).
See ``docs/mixed_buffers.md`` for the semantics and for how a loss uses the columns it adds.
"""

from .config import BufferArgs, buffer_enabled, check_buffer_config
from .members import EXTERNAL, FRESH, HISTORICAL, Member, MixedBatch
from .mixin import BufferMixin
from .persistence import BUFFER_STATE_NAME
from .planning import (
    HISTORY_SCHEDULES,
    SELECTION_RULES,
    SIGNAL_RULES,
    GroupPlan,
    equalise_across_processes,
    plan_groups,
    resolve_history_horizon,
    resolve_num_historical,
    sample_reward,
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
    "SIGNAL_RULES",
    "BufferArgs",
    "BufferMixin",
    "GroupPlan",
    "Member",
    "MixedBatch",
    "Sample",
    "SampleBuffer",
    "buffer_enabled",
    "check_buffer_config",
    "equalise_across_processes",
    "plan_groups",
    "prompt_key",
    "resolve_history_horizon",
    "resolve_num_historical",
    "sample_reward",
    "scheduled_num_historical",
    "select_historical",
    "selection_seed",
]
