"""Settings that would train nothing, train something else in silence, or fail deep inside transformers or torch:
the sampling settings (config fields and ``generation_kwargs`` together), the step schedule, the size of the dataset
against one generation batch, and what a generation round returns (docs/hardening.md).

A group statistic needs different completions of one prompt: settings that make sampling deterministic (greedy
decoding) are refused; near-deterministic ones (a tiny temperature) are seen at run time, where
:func:`identical_groups` flags the groups whose members are all the same completion (``groups/identical_frac``).
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

import torch

#: Sampling settings that are both config fields and ``generation_kwargs`` keys (the latter override the former).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

#: ``generation_kwargs`` keys that change how many rows a generation returns or who owns the group size.
ROW_COUNT_KEYS = ("num_return_sequences",)


def generation_kwargs_of(config: Any) -> dict[str, Any]:
    """``config.generation_kwargs`` as a dict (a JSON string is parsed, as ``TrainingArguments`` does later)."""
    kwargs = getattr(config, "generation_kwargs", None)
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except ValueError:
            return {}  # transformers reports a malformed JSON string itself
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def effective_sampling(config: Any) -> dict[str, tuple[Any, str]]:
    """``{setting: (value, where)}``: the value generation will use and the name of the setting that gives it."""
    kwargs = generation_kwargs_of(config)
    out = {key: (getattr(config, key, None), key) for key in SAMPLING_FIELDS}
    for key in (*SAMPLING_FIELDS, "do_sample", "max_new_tokens"):
        if key in kwargs:
            out[key] = (kwargs[key], f"generation_kwargs[{key!r}]")
    return out


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling_settings(config: Any, name: str) -> None:
    """Raise ``ValueError`` for sampling settings that are greedy (every member of a group the same completion) or
    that transformers would reject only at the first generation."""
    sampling = effective_sampling(config)

    def refuse(key: str, why: str, fix: str) -> None:
        value, where = sampling[key]
        raise ValueError(f"{name}: {where}={value!r} {why}. {fix}")

    kwargs = generation_kwargs_of(config)
    for key in ROW_COUNT_KEYS:
        if key in kwargs and kwargs[key] != 1:
            raise ValueError(
                f"{name}: generation_kwargs[{key!r}]={kwargs[key]!r} would return several completions per row; the "
                "trainer already repeats each prompt num_generations times (the group size). Remove it from "
                "generation_kwargs and set num_generations instead."
            )
    if sampling.get("do_sample", (True, ""))[0] is False:
        refuse(
            "do_sample",
            "decodes greedily: every member of a group would be the same completion, so every group "
            "has zero variance and nothing is learned",
            "Remove do_sample from generation_kwargs (sampling is on).",
        )
    temperature = sampling["temperature"][0]
    if _number(temperature) and not temperature > 0:
        refuse(
            "temperature",
            "is not > 0: completions are sampled, and a group needs different completions",
            "Set a temperature > 0 (1.0 samples from the policy itself).",
        )
    top_p = sampling["top_p"][0]
    if _number(top_p) and not 0 < top_p <= 1:
        refuse("top_p", "is outside (0, 1]", "Set top_p in (0, 1]; 1.0 turns nucleus filtering off.")
    top_k = sampling["top_k"][0]
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        refuse(
            "top_k",
            "is not an integer >= 0 (transformers rejects it at the first generation)",
            "Set top_k=0 to turn top-k filtering off (vLLM's -1 means the same).",
        )
    if top_k == 1:
        refuse(
            "top_k",
            "keeps only the most likely token (greedy): every member of a group would be the same "
            "completion, so nothing is learned",
            "Set top_k=0 (off) or a value >= 2.",
        )
    min_p = sampling["min_p"][0]
    if min_p is not None and (not _number(min_p) or not 0 <= min_p < 1):
        refuse(
            "min_p",
            "is outside [0, 1) (a probability relative to the most likely token; 1 is greedy)",
            "Set min_p in [0, 1), typically 0.01-0.2, or None to turn it off.",
        )
    penalty = sampling["repetition_penalty"][0]
    if penalty is not None and (not _number(penalty) or not penalty > 0 or not math.isfinite(penalty)):
        refuse(
            "repetition_penalty",
            "is not a finite number > 0 (logits are divided by it)",
            "Set repetition_penalty > 0; 1.0 turns it off.",
        )
    if "max_new_tokens" in sampling:
        tokens = sampling["max_new_tokens"][0]
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            refuse("max_new_tokens", "is not an integer >= 1", "Set max_completion_length instead, >= 1.")


def check_schedule(config: Any, name: str) -> None:
    """Raise ``ValueError`` for step-schedule settings that would train nothing, train one step instead of none, save
    only at the end, or divide by zero in torch's sampler. Runs before ``GRPOConfig.__post_init__``."""

    def positive_int(field: str, value: Any, meaning: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {field} must be an integer >= 1 ({meaning}), got {value!r}.")

    positive_int("per_device_train_batch_size", config.per_device_train_batch_size, "rows per micro-step")
    positive_int("gradient_accumulation_steps", config.gradient_accumulation_steps, "micro-steps per optimizer step")
    if config.steps_per_generation is not None:
        positive_int(
            "steps_per_generation",
            config.steps_per_generation,
            "micro-steps per generation batch; None derives it from gradient_accumulation_steps",
        )
    positive_int("num_iterations", config.num_iterations, "optimization passes per generation batch; 0 trains nothing")
    if config.max_steps == 0 or (isinstance(config.max_steps, int) and config.max_steps < -1):
        raise ValueError(
            f"{name}: max_steps={config.max_steps} is not a step count: transformers would train one step for 0. Set "
            "max_steps >= 1, or -1 to train num_train_epochs epochs."
        )
    if (config.max_steps is None or config.max_steps < 0) and not config.num_train_epochs > 0:
        raise ValueError(
            f"{name}: num_train_epochs={config.num_train_epochs} with max_steps={config.max_steps} trains nothing. Set "
            "num_train_epochs > 0, or max_steps >= 1."
        )
    for strategy, steps in (
        ("save_strategy", "save_steps"),
        ("logging_strategy", "logging_steps"),
        ("eval_strategy", "eval_steps"),
    ):
        value = getattr(config, steps, None)
        if str(getattr(config, strategy, "")) in ("steps", "IntervalStrategy.STEPS", "SaveStrategy.STEPS") and (
            value is not None and not value > 0
        ):
            raise ValueError(
                f"{name}: {steps}={value!r} with {strategy}='steps' would never act on a step (transformers then "
                f"saves or logs only at the end). Set {steps} >= 1 (or a fraction of the run in (0, 1)), or another "
                f"{strategy}."
            )


def check_dataset_fills_a_generation_batch(dataset: Any, args: Any, num_generations: int, name: str) -> None:
    """Raise ``ValueError`` when a map-style train dataset holds fewer prompts than one generation batch draws: TRL's
    sampler then yields no batch and the run trains 0 steps without a word."""
    if dataset is None or not hasattr(dataset, "__len__") or getattr(dataset, "column_names", None) is None:
        return
    needed = args.generation_batch_size // num_generations
    if 0 < len(dataset) < needed:
        raise ValueError(
            f"{name}: the train dataset has {len(dataset)} prompt(s), but one generation batch draws {needed} "
            f"distinct prompts (generation_batch_size {args.generation_batch_size} / num_generations "
            f"{num_generations}); the run would train 0 steps. Add prompts, or lower per_device_train_batch_size, "
            "steps_per_generation or generation_batch_size."
        )


# --- what a generation round returns -------------------------------------------------------------------------------


def identical_groups(completion_ids: torch.Tensor, completion_mask: torch.Tensor, group_ids: torch.Tensor):
    """Per group (in order of first appearance of its id), whether all its members are the same completion (same
    tokens under the mask). Pure; rows of one group may be anywhere."""
    ids = completion_ids * completion_mask
    lengths = completion_mask.sum(1)
    out = []
    for g in dict.fromkeys(group_ids.tolist()):
        rows = (group_ids == g).nonzero().flatten()
        first = rows[0]
        same = (ids[rows] == ids[first]).all(1) & (lengths[rows] == lengths[first])
        out.append(bool(same.all()) and rows.numel() > 1)
    return torch.tensor(out, dtype=torch.bool)


def greedy_warning(name: str, config: Any, num_groups: int) -> str:
    sampling = ", ".join(f"{where}={value!r}" for value, where in effective_sampling(config).values())
    return (
        f"{name}: all {num_groups} groups of this generation batch hold identical completions (the sampling is "
        f"(near-)greedy: {sampling}), so every group has zero variance and nothing is learned from it. Raise the "
        "temperature (1.0 samples from the policy), or loosen top_k / top_p / min_p. Shown in groups/identical_frac; "
        "warned once per run."
    )


def _is_token_id(token: Any, vocab_size: int | None) -> bool:
    return isinstance(token, numbers.Integral) and not isinstance(token, bool) and 0 <= token < (vocab_size or math.inf)


def check_completion_ids(completion_ids: list, vocab_size: int | None, name: str, source: str) -> None:
    """Raise ``ValueError`` for a completion of zero tokens or a token id outside ``[0, vocab_size)``: TRL would fail
    deep inside (a zero-width tensor, an embedding ``IndexError``)."""
    for row, ids in enumerate(completion_ids):
        if len(ids) == 0:
            raise ValueError(
                f"{name}: {source} returned a completion of zero tokens (row {row}); every completion needs at least "
                "one token. End each completion with the EOS token (tokenizer.eos_token_id)."
            )
        bad = [t for t in ids if not _is_token_id(t, vocab_size)]
        if bad:
            raise ValueError(
                f"{name}: {source} returned token id(s) {bad[:5]} that are not ids of the vocabulary [0, "
                f"{vocab_size}) (row {row}). Return ids of the policy's tokenizer."
            )


def checked_rollout_func(func: Any, vocab_size: int | None, name: str):
    """``func`` (TRL's ``rollout_func(prompts, trainer) -> dict``) with its ``completion_ids`` checked by
    :func:`check_completion_ids` before TRL decodes them."""
    import functools

    @functools.wraps(func)
    def checked(prompts, trainer):
        output = func(prompts, trainer)
        if isinstance(output, dict) and "completion_ids" in output:
            check_completion_ids(output["completion_ids"], vocab_size, name, "rollout_func")
        return output

    return checked


def policy_vocab_size(model: Any) -> int | None:
    """Rows of the model's input embedding (the token ids it can embed), or None if unknown."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError):
        return None


def model_max_positions(model: Any) -> int | None:
    """The most positions the model embeds (``max_position_embeddings`` of its text config), or None if unknown."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_completion_length_fits(max_completion_length: int | None, max_positions: int | None, name: str) -> None:
    if max_completion_length is not None and max_positions is not None and max_completion_length >= max_positions:
        raise ValueError(
            f"{name}: max_completion_length={max_completion_length} does not fit the model, which embeds at most "
            f"{max_positions} positions (prompt and completion together). Set max_completion_length below "
            f"{max_positions}, leaving room for the prompt."
        )


def check_prompt_lengths(prompt_ids: list, max_completion_length: int | None, max_positions: int | None, name: str):
    """Raise ``ValueError`` when a prompt plus ``max_completion_length`` exceeds the model's positions (transformers
    would fail with an embedding ``IndexError`` mid-generation)."""
    if max_positions is None:
        return
    budget = max_positions - (max_completion_length or 0)
    for row, ids in enumerate(prompt_ids):
        if len(ids) > budget:
            raise ValueError(
                f"{name}: a prompt of {len(ids)} tokens (row {row} of this batch) plus max_completion_length="
                f"{max_completion_length} exceeds the model's {max_positions} positions. Shorten or filter such "
                f"prompts (at most {budget} tokens), or lower max_completion_length."
            )
