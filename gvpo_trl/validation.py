"""Input validation: what may reach a run, checked early with a message that names our settings.

The policy (``docs/hardening.md``): a configuration value that is NaN or infinite is refused at construction (∞ only
where it means "no limit"); a reward function's output must be one real number (or ``None``) per completion, else
the run stops before anything is trained, naming the function and what it returned; a reward of ±∞ or NaN counts as
unscorable (like ``None``: a zero centred reward, shown in ``groups/nonfinite_reward_frac`` and warned about once);
a dataset must have a ``prompt`` column of strings or conversations, none empty (unless an environment fills it), and
no column named like a reward-function keyword.
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
    """Raise ``ValueError`` for a completion length that transformers would reject deep inside."""
    if config.max_completion_length is not None and config.max_completion_length < 1:
        raise ValueError(
            f"{name}: max_completion_length must be >= 1 (tokens generated per completion), got "
            f"{config.max_completion_length}. Set max_completion_length to a positive number, or None for the model's "
            "own limit."
        )
    # the sampling settings (temperature, top_p, ...) are checked with generation_kwargs: gvpo_trl.generation_checks


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


def check_reward_models(reward_funcs: Any, name: str) -> None:
    """Raise ``TypeError``/``ValueError`` for a reward model that TRL would call as a sequence classifier but is not
    one: a bare ``torch.nn.Module`` (no config), a causal LM (its logits are next-token scores over the vocabulary), or
    a classifier with more than one label (TRL would take the first class's logit in silence)."""
    import torch

    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    for i, func in enumerate(funcs):
        if not isinstance(func, torch.nn.Module):
            continue
        config = getattr(func, "config", None)
        what = f"reward_funcs[{i}] ({type(func).__name__})"
        fix = ("A reward model must be a transformers sequence-classification model with one label "
               "(AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)); to score with another "
               "module, wrap it in a reward function (prompts, completions, **kwargs) -> list of floats.")  # fmt: skip
        if config is None or not hasattr(config, "_name_or_path"):
            raise TypeError(f"{name}: {what} is a torch module without a transformers config. {fix}")
        if type(func).__name__.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")):
            raise ValueError(
                f"{name}: {what} is a language model: its logits are next-token scores over the "
                f"vocabulary, not one reward per completion. {fix}"
            )
        if getattr(config, "num_labels", 1) != 1:
            raise ValueError(
                f"{name}: {what} has num_labels={config.num_labels}; TRL reads one logit per completion as the "
                f"reward and would take the first label's in silence. {fix}"
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

#: Keyword arguments TRL passes to every reward function itself: a dataset column of that name would collide with them
#: (``prompts``/``completions``: "got multiple values"; the others are overwritten and never reach the function).
RESERVED_REWARD_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                          "environments")  # fmt: skip


def prompt_problem(prompt: Any) -> tuple[str, str] | None:
    """``("empty", why)``, ``("malformed", why)`` or None for a prompt: a non-blank string, or a conversation (a list
    of ``{"role": ..., "content": ...}`` messages) with some content."""
    if isinstance(prompt, str):
        return ("empty", "an empty or blank string") if not prompt.strip() else None
    if prompt is None:
        return "empty", "None"
    if isinstance(prompt, dict):
        return "malformed", "a single message (a dict): a conversation is a list of messages, e.g. [{'role': 'user', " \
            "'content': ...}]"  # fmt: skip
    if not isinstance(prompt, (list, tuple)):
        return "malformed", f"a {type(prompt).__name__}, not a string or a conversation (a list of messages)"
    for i, message in enumerate(prompt):
        if isinstance(message, (list, tuple)):
            return "malformed", f"a list of lists (message {i} is a list): one prompt is one conversation, a flat " \
                "list of messages"  # fmt: skip
        if not isinstance(message, dict):
            return "malformed", f"a list whose message {i} is a {type(message).__name__}, not a dict with 'role' " \
                "and 'content'"  # fmt: skip
        if not isinstance(message.get("role"), str):
            return "malformed", f"a conversation whose message {i} has no 'role' (a string such as 'user')"
    if not any(_has_content(m.get("content")) for m in prompt):
        return "empty", "a conversation without content"
    return None


def _has_content(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, list):  # content blocks: text, or anything else (an image) counts as content
        return any(not isinstance(b, dict) or b.get("type") != "text" or _has_content(b.get("text")) for b in content)
    return content is not None


def is_empty_prompt(prompt: Any) -> bool:
    """An empty or blank string, None, or a conversation with no message content."""
    problem = prompt_problem(prompt)
    return problem is not None and problem[0] == "empty"


def _column_problem(columns: list[str], name: str, where: str) -> None:
    clashing = [c for c in columns if c in RESERVED_REWARD_KWARGS]
    if clashing:
        raise ValueError(
            f"{name}: {where} has column(s) {clashing} named like the keyword arguments TRL passes to every reward "
            f"function itself ({', '.join(RESERVED_REWARD_KWARGS)}): the reward call would fail or the column would "
            f"never reach the function. Rename them, e.g. dataset.rename_column({clashing[0]!r}, "
            f"'{clashing[0]}_column')."
        )


def _refuse_prompt(problem: tuple[str, str], prompt: Any, where: str, name: str) -> None:
    kind, why = problem
    if kind == "empty":
        raise ValueError(f"{name}: {where} an empty prompt ({_describe(prompt)}). Remove or fill such rows of the "
                         "dataset, e.g. dataset.filter(lambda x: len(x['prompt']) > 0).")  # fmt: skip
    raise ValueError(f"{name}: {where} a malformed prompt ({_describe(prompt)}): {why}. Each prompt must be a string "
                     "or a conversation, a list of {'role': ..., 'content': ...} messages.")  # fmt: skip


def check_dataset(dataset: Any, split: str, name: str, prompt_filled: bool = False) -> None:
    """Raise ``ValueError`` for a map-style dataset without a ``prompt`` column, with no rows, with a column named like
    a reward-function keyword, or with an empty or malformed prompt (naming the row). With ``prompt_filled`` (an
    ``environment_factory``, whose ``reset()`` supplies the observation) an empty or missing prompt is legitimate.
    Streaming datasets are checked batch by batch (:func:`check_prompts`)."""
    columns = getattr(dataset, "column_names", None)
    if columns is None or not hasattr(dataset, "__len__"):
        return
    _column_problem(columns, name, f"the {split} dataset")
    if "prompt" not in columns:
        if prompt_filled:
            return
        raise ValueError(
            f"{name}: the {split} dataset has no 'prompt' column (columns: {columns}). Rename the column that holds "
            "the prompts to 'prompt' (e.g. dataset.rename_column('question', 'prompt'))."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name}: the {split} dataset is empty: there is nothing to train or evaluate on.")
    for row, prompt in enumerate(dataset["prompt"]):
        problem = prompt_problem(prompt)
        if problem is not None and not (prompt_filled and problem[0] == "empty"):
            _refuse_prompt(problem, prompt, f"row {row} of the {split} dataset has", name)


def check_prompts(rows: list[dict[str, Any]], name: str, prompt_filled: bool = False) -> None:
    """The data-time twin of :func:`check_dataset`, for a batch of rows (streams show their columns only here)."""
    _column_problem(list(rows[0]) if rows else [], name, "the dataset")
    for row in rows:
        if "prompt" not in row:
            if prompt_filled:
                continue
            raise ValueError(
                f"{name}: a batch of the dataset has no 'prompt' column (columns: {list(row)}). Rename the column "
                "that holds the prompts to 'prompt' (e.g. dataset.rename_column('question', 'prompt'))."
            )
        problem = prompt_problem(row["prompt"])
        if problem is not None and not (prompt_filled and problem[0] == "empty"):
            _refuse_prompt(problem, row["prompt"], "a batch holds", name)
