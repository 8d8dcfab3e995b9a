"""The members of a mixed generation batch, one record per local row, and the pure functions over them.

While TRL makes one generation batch with the buffer on, a :class:`MixedBatch` holds the global plan and one
:class:`Member` per local row: a fresh member gets its completion from the generator, a historical one from its stored
sample, an external one from the dataset's column (:func:`external_member`). :func:`splice_completions` puts the
generated and the given completions back into row order; :func:`member_columns` gives the columns a loss reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..columns import BEHAVIOUR_LOGPS, IS_EXTERNAL, IS_HISTORICAL, STALENESS
from ..generation_checks import check_completion_ids
from .planning import GroupPlan
from .store import Sample

FRESH, EXTERNAL, HISTORICAL = "fresh", "external", "historical"


@dataclass
class Member:
    """One local row: a group member, its kind and its completion.

    ``logps``: the behaviour policy's per-token log-probs when known before scoring (stored or external), else None;
    ``step``, ``rewards`` and ``sample_uid`` as stored, for historical members; ``tool_mask`` (tools, environments)
    and ``extra`` (a rollout function's extra fields) as generated or stored, None when there are none.
    """

    key: str
    kind: str
    completion_ids: list[int] | None = None
    completion: Any = None
    logps: list[float] | None = None
    step: int | None = None
    rewards: list[float] | None = None
    sample_uid: int | None = None
    tool_mask: list[int] | None = None
    extra: dict[str, Any] | None = None


def historical_member(sample: Sample) -> Member:
    logps = None if sample.logps is None else sample.logps.tolist()
    return Member(key=sample.key, kind=HISTORICAL, completion_ids=list(sample.completion_ids),
                  completion=sample.completion, logps=logps, step=sample.step, rewards=list(sample.rewards),
                  sample_uid=sample.uid, tool_mask=sample.tool_mask, extra=sample.extra)  # fmt: skip


def group_members(plan: GroupPlan, k: int, external: Member | None, samples: list[Sample]) -> list[Member]:
    """The ``k`` members of one planned group, in the plan's order: fresh, then external, then historical."""
    members = [Member(key=plan.key, kind=FRESH) for _ in range(plan.num_fresh(k))]
    if plan.external:
        members.append(external)
    return members + [historical_member(sample) for sample in samples]


@dataclass
class MixedBatch:
    """The state of one buffered generation batch (a call of ``_generate_and_score_completions`` in training)."""

    inputs: list[dict[str, Any]]
    step: int
    plan: list[GroupPlan] | None = None  # global, identical on every process
    num_historical: int = 0  # historical members per group asked for at this step (the schedule's value)
    members: list[Member] = field(default_factory=list)  # local rows
    rewards_per_func: torch.Tensor | None = None  # global rows

    def rows(self, kind: str) -> list[int]:
        return [i for i, member in enumerate(self.members) if member.kind == kind]


def splice_completions(members: list[Member], prompt_ids: list, completion_ids: list, completions: list,
                       logprobs: list | None, k: int) -> tuple[list, list, list, list | None]:  # fmt: skip
    """Row-ordered ``(prompt_ids, completion_ids, completions, logprobs)`` from the generator's outputs for the fresh
    members (in order) and the given completions of the others. A fresh member gets its completion recorded. Every
    group starts with a fresh row, whose prompt ids serve the group's other rows."""
    fresh = iter(range(len(completion_ids)))
    out_prompts, out_ids, out_completions, out_logprobs = [], [], [], [] if logprobs is not None else None
    for i, member in enumerate(members):
        if member.kind == FRESH:
            j = next(fresh)
            member.completion_ids, member.completion = list(completion_ids[j]), completions[j]
            out_prompts.append(prompt_ids[j])
            logps = None if logprobs is None else logprobs[j]
        else:
            out_prompts.append(out_prompts[i - i % k])
            logps = member.logps if member.logps is not None else [math.nan] * len(member.completion_ids)
        out_ids.append(list(member.completion_ids))
        out_completions.append(member.completion)
        if out_logprobs is not None:
            out_logprobs.append(logps)
    return out_prompts, out_ids, out_completions, out_logprobs


def splice_turn_fields(members: list[Member], tool_mask: list | None, extra_fields: dict[str, Any],
                       tool_images: list) -> tuple[list | None, dict[str, Any], list]:  # fmt: skip
    """Row-ordered ``(tool_mask, extra_fields, tool_images)`` from the generator's outputs for the fresh members (in
    order) and the stored values of the others; call after :func:`splice_completions`.

    With tools or environments, a row without a stored mask (an external member) is all generated (ones). A rollout
    function's extra fields are per-row lists (spliced) or one value for the batch (kept); a fresh member gets its
    mask and fields recorded, so that they are stored with it.
    """
    fresh = [i for i, member in enumerate(members) if member.kind == FRESH]
    per_row = {key: value for key, value in extra_fields.items() if isinstance(value, list)}
    for j, i in enumerate(fresh):
        if tool_mask is not None:
            members[i].tool_mask = list(tool_mask[j])
        if per_row:
            members[i].extra = {key: value[j] for key, value in per_row.items()}
    masks = None
    if tool_mask is not None or any(member.tool_mask is not None for member in members):
        masks = [m.tool_mask if m.tool_mask is not None else [1] * len(m.completion_ids) for m in members]
    spliced = dict(extra_fields)
    for key in per_row:
        missing = [i for i, member in enumerate(members) if member.extra is None or key not in member.extra]
        if missing:
            raise ValueError(
                f"the rollout function returned the extra field {key!r}, which group member {missing[0]} (not "
                "generated in this batch) does not have: a stored or external completion carries only the fields "
                "it was generated with. Return the same fields on every call (and no external completions)."
            )
        spliced[key] = [member.extra[key] for member in members]
    images = list(tool_images) if tool_images else []
    if images:
        images = [[] for _ in members]
        for j, i in enumerate(fresh):
            images[i] = tool_images[j]
    return masks, spliced, images


def member_columns(members: list[Member], behaviour: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """The buffer's columns (``gvpo_trl.columns``) of a batch: behaviour log-probs (the generating policy's
    ``behaviour`` on fresh rows, the stored or external ones elsewhere, NaN where unknown, 0 on padding), kinds and
    staleness."""
    device = behaviour.device
    behaviour = behaviour.clone()
    lengths = torch.tensor([len(member.completion_ids) for member in members], device=device)
    behaviour[torch.arange(behaviour.size(1), device=device).unsqueeze(0) >= lengths.unsqueeze(1)] = 0.0
    staleness = torch.zeros(len(members), dtype=torch.long, device=device)
    for i, member in enumerate(members):
        if member.kind == FRESH:
            continue
        if member.kind == HISTORICAL:
            staleness[i] = step - member.step
        logps = member.logps if member.logps is not None else [math.nan] * len(member.completion_ids)
        behaviour[i, : len(logps)] = torch.tensor(logps, dtype=torch.float32, device=device)
    return {
        BEHAVIOUR_LOGPS: behaviour,
        IS_HISTORICAL: torch.tensor([member.kind == HISTORICAL for member in members], device=device),
        IS_EXTERNAL: torch.tensor([member.kind == EXTERNAL for member in members], device=device),
        STALENESS: staleness,
    }


def member_drifts(members: list[Member], current: torch.Tensor, behaviour: torch.Tensor) -> list[tuple[int, float]]:
    """``(sample uid, drift)`` of each historical member: mean over its generated tokens (tool output left out) of
    ``|log π_θ' − log π_b|``."""
    drifts = []
    for i, member in enumerate(members):
        if member.kind != HISTORICAL:
            continue
        n = len(member.completion_ids)
        keep = torch.ones(n, dtype=torch.bool, device=current.device)
        if member.tool_mask is not None:
            keep = torch.tensor(member.tool_mask, device=current.device).bool()
        gap = (current[i, :n] - behaviour[i, :n]).abs()[keep]
        drifts.append((member.sample_uid, gap.mean().item() if gap.numel() else 0.0))
    return drifts


def external_member(row: dict[str, Any], key: str, *, column: str, logps_column: str | None, tokenizer,
                    max_completion_length: int | None, conversational: bool, name: str,
                    vocab_size: int | None = None) -> Member | None:  # fmt: skip
    """The external member of a dataset ``row`` (``column`` holds a string or token ids, ``logps_column`` one
    log-prob per token id), truncated to ``max_completion_length``; None when the row has none."""
    value = row.get(column)
    if value is None or (isinstance(value, (str, list)) and len(value) == 0):
        return None
    if isinstance(value, str):
        if logps_column:
            raise ValueError(
                f"external_logps_column is set, so {column!r} must hold token ids (one log-prob per token id); it "
                "holds text."
            )
        ids = tokenizer(text=value, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        text = value
    elif isinstance(value, list) and all(isinstance(x, int) for x in value):
        ids = list(value)
        check_completion_ids([ids], vocab_size, name, f"the external completion column {column!r}")
        text = tokenizer.decode(ids, skip_special_tokens=True)
    else:
        raise ValueError(
            f"external completion column {column!r}: expected a string or a list of token ids, got "
            f"{type(value).__name__}."
        )
    logps = external_logps(row, logps_column, len(ids), name) if logps_column else None
    if max_completion_length is not None and len(ids) > max_completion_length:
        ids, logps = ids[:max_completion_length], (None if logps is None else logps[:max_completion_length])
        text = tokenizer.decode(ids, skip_special_tokens=True)
    completion = [{"role": "assistant", "content": text}] if conversational else text
    return Member(key=key, kind=EXTERNAL, completion_ids=ids, completion=completion, logps=logps)


def external_logps(row: dict[str, Any], column: str, num_tokens: int, name: str) -> list[float]:
    """The external completion's per-token log-probs from ``row[column]``, checked: one per token, finite, ≤ 0."""
    logps = row.get(column)
    if logps is None or len(logps) != num_tokens:
        raise ValueError(
            f"external completion of prompt {row.get('prompt')!r}: {column!r} must hold one log-prob per token id "
            f"({num_tokens}), got {'none' if logps is None else len(logps)}. {name} cannot use it without them."
        )
    logps = [float(x) for x in logps]
    if not all(math.isfinite(x) and x <= 0 for x in logps):
        raise ValueError(
            f"external completion of prompt {row.get('prompt')!r}: {column!r} holds a value that is not a "
            f"log-probability (NaN, infinite or > 0): {logps}. Fix or drop that row."
        )
    return logps
