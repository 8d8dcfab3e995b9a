"""Input validation: what may reach a run, checked early with a message that names our settings.

The policy (``docs/hardening.md``): a configuration value that is NaN or infinite is refused at construction (∞ only
where it means "no limit"); a reward function's output must be one real number (or ``None``) per completion, else
the run stops before anything is trained, naming the function and what it returned; a reward of ±∞ or NaN counts as
unscorable (like ``None``: a zero centred reward, shown in ``groups/nonfinite_reward_frac`` and warned about once);
a dataset must have a non-empty ``prompt`` column with no empty prompt.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Any

#: Float fields where +∞ means "no limit" (every other float field must be finite; NaN is refused everywhere).
UNBOUNDED_FIELDS = frozenset(
    {"importance_weight_cap", "max_grad_norm", "vllm_importance_sampling_cap", "vllm_importance_sampling_clip_max"}
)


def _is_nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def check_finite_fields(config: Any, name: str) -> None:
    """Raise ``ValueError`` for a NaN or infinite float among the dataclass fields of ``config`` (or a NaN/∞ element of
    a list field such as ``reward_weights``); +∞ is accepted in :data:`UNBOUNDED_FIELDS`."""
    from dataclasses import fields

    for f in fields(config):
        value = getattr(config, f.name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if not _is_nonfinite(item):
                continue
            if item == math.inf and f.name in UNBOUNDED_FIELDS:
                continue
            raise ValueError(
                f"{name}: {f.name}={value!r} is not a finite number; a NaN or infinite value would turn the "
                f"parameters non-finite or be ignored by a comparison. Set {f.name} to a finite value"
                + (" (or inf for no limit)." if f.name in UNBOUNDED_FIELDS else ".")
            )


def check_lengths(config: Any, name: str) -> None:
    """Raise ``ValueError`` for generation settings that transformers or TRL would reject deep inside (or misuse)."""
    if config.max_completion_length is not None and config.max_completion_length < 1:
        raise ValueError(
            f"{name}: max_completion_length must be >= 1 (tokens generated per completion), got "
            f"{config.max_completion_length}. Set max_completion_length to a positive number, or None for the model's "
            "own limit."
        )
    if not config.temperature > 0:
        raise ValueError(
            f"{name}: temperature must be > 0 (completions are sampled; a group needs different completions), got "
            f"{config.temperature}."
        )
    if not 0 < config.top_p <= 1:
        raise ValueError(f"{name}: top_p must be in (0, 1], got {config.top_p}.")


# --- reward functions ----------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_reward_output(func_name: str, output: Any, num_completions: int) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``func_name`` unless ``output`` is a list-like of ``num_completions``
    values, each ``None`` or a real number (bool, int, float, numpy or 0-d torch number)."""
    if isinstance(output, (str, bytes, dict)) or not hasattr(output, "__len__") or not hasattr(output, "__iter__"):
        raise TypeError(
            f"The reward function {func_name!r} returned {_describe(output)} ({type(output).__name__}); it must return "
            f"a list with one reward per completion ({num_completions} here), a float or None each."
        )
    if len(output) != num_completions:
        raise ValueError(
            f"The reward function {func_name!r} returned {len(output)} values for {num_completions} completions "
            f"({_describe(output)}); it must return exactly one reward per completion."
        )
    for i, value in enumerate(output):
        if value is None:
            continue
        if getattr(value, "ndim", 0) == 0 and hasattr(value, "item"):  # numpy scalar or 0-d tensor
            value = value.item()
        if isinstance(value, numbers.Real):
            continue
        raise TypeError(
            f"The reward function {func_name!r} returned {_describe(output[i])} ({type(output[i]).__name__}) for "
            f"completion {i}; each reward must be a real number, or None when the completion cannot be scored."
        )


def checked_reward_function(func, name: str):
    """``func`` wrapped so that its output is checked by :func:`check_reward_output` (name and signature kept)."""
    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)):  # noqa: B004

        @functools.wraps(func)
        async def async_checked(*args, prompts, **kwargs):
            output = await func(*args, prompts=prompts, **kwargs)
            check_reward_output(name, output, len(prompts))
            return output

        return async_checked

    @functools.wraps(func)
    def checked(*args, prompts, **kwargs):
        output = func(*args, prompts=prompts, **kwargs)
        check_reward_output(name, output, len(prompts))
        return output

    return checked


# --- data ----------------------------------------------------------------------------------------------------------


def is_empty_prompt(prompt: Any) -> bool:
    """An empty or blank string, or a conversation with no message content."""
    if isinstance(prompt, str):
        return not prompt.strip()
    if isinstance(prompt, list):
        return not any(str(m.get("content") or "").strip() for m in prompt if isinstance(m, dict))
    return prompt is None


def check_dataset(dataset: Any, split: str, name: str) -> None:
    """Raise ``ValueError`` for a map-style dataset without a ``prompt`` column, with no rows, or with an empty prompt
    (naming the row). Streaming datasets are checked batch by batch (:func:`check_prompts`)."""
    columns = getattr(dataset, "column_names", None)
    if columns is None or not hasattr(dataset, "__len__"):
        return
    if "prompt" not in columns:
        raise ValueError(
            f"{name}: the {split} dataset has no 'prompt' column (columns: {columns}). Rename the column that holds "
            "the prompts to 'prompt' (e.g. dataset.rename_column('question', 'prompt'))."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name}: the {split} dataset is empty: there is nothing to train or evaluate on.")
    for row, prompt in enumerate(dataset["prompt"]):
        if is_empty_prompt(prompt):
            raise ValueError(
                f"{name}: row {row} of the {split} dataset has an empty prompt ({prompt!r}). Remove or fill such "
                "rows, e.g. dataset.filter(lambda x: len(x['prompt']) > 0)."
            )


def check_prompts(prompts: list[Any], name: str) -> None:
    """Raise ``ValueError`` for an empty prompt in a batch (the data-time twin of :func:`check_dataset`)."""
    for prompt in prompts:
        if is_empty_prompt(prompt):
            raise ValueError(
                f"{name}: a batch holds an empty prompt ({prompt!r}). Remove or fill such rows of the dataset."
            )
