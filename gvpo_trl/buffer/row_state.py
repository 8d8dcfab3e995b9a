"""TRL's per-row state of a generation batch, narrowed to the rows the buffer generates or scores.

``GRPOTrainer._generate_and_score_completions`` builds, for the whole batch, one entry per row of: the environment
instance (``environments``, also passed to reward functions), its name (``_batch_environments``, which selects the
tool schema a prompt is rendered with) and the tool dicts the tool-call loop calls (``_sync_tool_dicts``,
``_async_tool_dicts``). TRL indexes them by row position; when the buffer hands TRL's ``_generate`` or
``_calculate_rewards`` a subset of the rows, :func:`rows_of` makes position ``j`` mean row ``rows[j]`` for the
duration of the call, and puts the batch's lists back afterwards (the environments keep what the calls did to them).
"""

from __future__ import annotations

from contextlib import contextmanager

from .._trl_compat import GRPO_ROW_STATE


@contextmanager
def rows_of(trainer, rows: list[int]):
    """Within the block, each per-row list of :data:`GRPO_ROW_STATE` on ``trainer`` holds only ``rows``."""
    saved = {}
    for name in GRPO_ROW_STATE:
        value = getattr(trainer, name, None)
        if isinstance(value, list) and value:
            saved[name] = value
            setattr(trainer, name, [value[i] for i in rows])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)
