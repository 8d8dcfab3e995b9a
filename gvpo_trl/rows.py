"""Generation outputs as plain dicts of per-row values: taking rows, stacking them, and the group-preserving split.

Each call of ``_generate_and_score_completions`` returns a dict of per-row tensors (TRL's layout, listed in
``_trl_compat``): ``prompt_*`` tensors are LEFT-padded to that call's longest prompt, completion-aligned ``(B, T)``
tensors (``completion_ids``, ``completion_mask``, ``old_per_token_logps``, ...) are RIGHT-padded to that call's
longest completion, 1-D tensors (``advantages``, ``rewards``, ``group_id``) hold one value per row and 0-D tensors
(``num_items_in_batch``) describe the whole batch. Slices of one call share its widths (:func:`concat_rows`); rows
taken from several calls must be re-padded before they can be stacked (:func:`concat_generation_outputs`).

Vision-language batches also hold TRL's image tensors, flat over the images of all rows (``pixel_values``,
``image_grid_thw``, ...; see ``_trl_compat.MULTIMODAL_FORWARD_KEYS``). :func:`split_images` turns them into per-row
lists with TRL's own ``split_pixel_values_by_grid`` and :func:`merge_images` back (``unsplit_pixel_values_by_grid``),
so that row operations move each row's images with it; ``token_type_ids`` / ``mm_token_type_ids`` span prompt and
completion (``(B, P + C)``) and are re-padded on both sides.
"""

from __future__ import annotations

from typing import Any

import torch

from .columns import BEHAVIOUR_LOGPS, GROUP_ID

#: Padding value of each known ``(B, T)`` key when widened; ``"pad_token"`` means the tokenizer's pad id.
PAD_VALUES: dict[str, Any] = {
    "prompt_ids": "pad_token",
    "prompt_mask": 0,
    "completion_ids": "pad_token",
    "completion_mask": 0,
    "tool_mask": 1,  # TRL pads it with 1 (it only ever multiplies completion_mask)
    "old_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    BEHAVIOUR_LOGPS: 0.0,
    "importance_sampling_ratio": 1.0,  # (B, T) in TRL's token modes, (B, 1) in its sequence modes
}

#: ``(B, T)`` keys padded on the left (the prompt side); every other known ``(B, T)`` key is padded on the right.
LEFT_PADDED = frozenset({"prompt_ids", "prompt_mask"})

#: ``(B, P + C)`` keys spanning the (left-padded) prompt and the (right-padded) completion: padded with 0 on both sides.
PROMPT_COMPLETION_KEYS = frozenset({"token_type_ids", "mm_token_type_ids"})


def split_images(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with its flat image tensors as per-row lists (TRL's ``split_pixel_values_by_grid``; unchanged
    without images), checked to hold one entry per row (:func:`check_per_row`), so that rows can be moved."""
    from trl.trainer.utils import split_pixel_values_by_grid

    batch = split_pixel_values_by_grid(batch)
    check_per_row(batch, batch[GROUP_ID].numel())
    return batch


def merge_images(batch: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_images` (TRL's ``unsplit_pixel_values_by_grid``)."""
    from trl.trainer.utils import unsplit_pixel_values_by_grid

    return unsplit_pixel_values_by_grid(batch)


def check_per_row(batch: dict[str, Any], num_rows: int) -> None:
    """Raise ``ValueError`` for a tensor or list of ``batch`` that does not hold one entry per row: moving rows would
    then silently separate it from its rows (e.g. image tensors of a layout :func:`split_images` does not know)."""
    for key, value in batch.items():
        if isinstance(value, list) or (isinstance(value, torch.Tensor) and value.ndim > 0):
            length = len(value)
        else:
            continue
        if length != num_rows:
            raise ValueError(
                f"gvpo-trl moves whole groups of rows between micro-steps and generation rounds, but the batch entry "
                f"{key!r} has {length} entries for {num_rows} rows (an image layout TRL's split_pixel_values_by_grid "
                "does not split per row?). Please report the model type; a text-only model avoids it."
            )


def loss_token_count(batch: dict[str, Any]) -> torch.Tensor:
    """This process's tokens in the loss: ``Σ completion_mask × tool_mask`` (TRL's ``num_items_in_batch`` is its sum
    over processes)."""
    mask = batch["completion_mask"]
    return (mask * batch["tool_mask"] if "tool_mask" in batch else mask).sum()


def take_rows(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """The rows ``index`` of every per-row entry of ``batch``; 0-D tensors and other values are kept as they are."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list):
            out[key] = [value[i] for i in index.tolist()]
        else:
            out[key] = value
    return out


def concat_rows(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the rows of slices of ONE generation output (equal widths): per-row tensors and lists are
    concatenated; 0-D tensors and other values are taken from the first slice."""
    out = {}
    for key, first in parts[0].items():
        values = [part[key] for part in parts]
        if isinstance(first, torch.Tensor) and first.ndim > 0:
            out[key] = torch.cat(values, dim=0)
        elif isinstance(first, list):
            out[key] = [item for value in values for item in value]
        else:
            out[key] = first
    return out


def pad_to_width(value: torch.Tensor, width: int, pad_value: float, left: bool) -> torch.Tensor:
    """Widen a ``(B, T)`` tensor to ``(B, width)`` with ``pad_value`` on the left or right side."""
    missing = width - value.size(1)
    if missing < 0:
        raise ValueError(f"cannot pad a tensor of width {value.size(1)} to the smaller width {width}")
    if missing == 0:
        return value
    padding = torch.full((value.size(0), missing), pad_value, dtype=value.dtype, device=value.device)
    return torch.cat([padding, value] if left else [value, padding], dim=1)


def _widen_prompt_completion(parts: list[dict[str, Any]], key: str) -> list[torch.Tensor]:
    """A ``(B, P + C)`` key of several generation outputs re-padded to common widths: the prompt part (``P`` = the
    part's ``prompt_ids`` width) on the left, the completion part on the right, both with 0."""
    halves = []
    for part in parts:
        value, width = part[key], part["prompt_ids"].size(1)
        if value.size(1) != width + part["completion_ids"].size(1):
            raise ValueError(
                f"cannot concatenate {key!r} across generation rounds: width {value.size(1)} is not prompt + "
                f"completion ({width} + {part['completion_ids'].size(1)})."
            )
        halves.append((value[:, :width], value[:, width:]))
    prompt_width = max(p.size(1) for p, _ in halves)
    completion_width = max(c.size(1) for _, c in halves)
    return [torch.cat([pad_to_width(p, prompt_width, 0, True), pad_to_width(c, completion_width, 0, False)], 1)
            for p, c in halves]  # fmt: skip


def concat_generation_outputs(parts: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack the rows of several generation outputs into one, re-padding ``(B, T)`` tensors to a common width.

    Prompt tensors are re-padded on the left and completion-aligned tensors on the right (see ``PAD_VALUES``), so
    every row keeps its tokens at the positions TRL's loss expects; ``PROMPT_COMPLETION_KEYS`` on both sides. The
    widened parts are then stacked by :func:`concat_rows` (1-D tensors and lists, also the per-row image lists of
    :func:`split_images`: pass split parts and merge the result; a 0-D tensor is taken from the first part, so the
    caller recomputes batch-level scalars such as ``num_items_in_batch``). Raises ``ValueError`` for a key missing
    from some part, or a tensor of unknown padding (e.g. image tensors padded per batch), rather than guess.
    """
    if not parts:
        raise ValueError("nothing to concatenate")
    keys = list(parts[0])
    for part in parts[1:]:
        if set(part) != set(keys):
            raise ValueError(f"generation outputs have different keys: {sorted(keys)} vs {sorted(part)}")
    widened = [dict(part) for part in parts]
    for key in keys:
        values = [part[key] for part in parts]
        first = values[0]
        if isinstance(first, torch.Tensor) and first.ndim == 2 and key in PROMPT_COMPLETION_KEYS:
            values = _widen_prompt_completion(parts, key)
        elif isinstance(first, torch.Tensor) and first.ndim == 2 and key in PAD_VALUES:
            pad_value = pad_token_id if PAD_VALUES[key] == "pad_token" else PAD_VALUES[key]
            width = max(value.size(1) for value in values)
            values = [pad_to_width(value, width, pad_value, key in LEFT_PADDED) for value in values]
        elif (
            isinstance(first, torch.Tensor)
            and first.ndim > 1
            or not (isinstance(first, (torch.Tensor, list, bool, int, float, str)) or first is None)
        ):
            shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
            raise ValueError(
                f"cannot concatenate the generation output {key!r} ({shape}) across generation rounds: its padding "
                "is unknown (image tensors that TRL pads per batch, as for Idefics-style models, are not supported "
                "there). Set min_valid_fraction=0 to train GPG without extra generation rounds."
            )
        for part, value in zip(widened, values, strict=True):
            part[key] = value
    return concat_rows(widened)


def regroup_batches(batches: list[dict[str, Any]], generator: torch.Generator | None = None) -> list[dict[str, Any]]:
    """Re-split ``len(batches)`` micro-batches so that each holds whole groups, in a random order of groups.

    ``batches`` are slices of one shuffled batch (as TRL's ``_prepare_inputs`` leaves them); rows of a group may sit in
    different slices. The result has the same number of slices and rows per slice; each slice holds whole groups
    (which requires rows-per-slice to be a multiple of the group size), the groups in a random order. Image tensors
    move with their rows (:func:`split_images`); an entry that is not per row raises ``ValueError``.
    """
    batches = [split_images(batch) for batch in batches]
    merged = concat_rows(batches)
    group_ids = merged[GROUP_ID]
    num_slices = len(batches)
    unique = torch.unique(group_ids)
    order = unique[torch.randperm(unique.numel(), generator=generator)]
    # rank of each row's group in the random order, then a stable sort keeps each group's rows together
    rank = torch.empty_like(unique)
    rank[torch.searchsorted(unique, order)] = torch.arange(unique.numel(), device=unique.device)
    row_rank = rank[torch.searchsorted(unique, group_ids)]
    index = torch.sort(row_rank, stable=True).indices
    rows = group_ids.numel()
    if rows % num_slices:
        raise ValueError(f"{rows} rows cannot be split into {num_slices} equal micro-batches")
    per_slice = rows // num_slices
    return [merge_images(take_rows(merged, index[s * per_slice : (s + 1) * per_slice])) for s in range(num_slices)]
