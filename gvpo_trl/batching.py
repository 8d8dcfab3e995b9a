"""Generation outputs as plain dicts: assembling one batch from several calls of ``_generate_and_score_completions``,
and the per-row behaviour policy a loss weighs off-policy rows against.

Each call returns a dict of per-row tensors (TRL's layout, listed in ``_trl_compat``): ``prompt_*`` tensors are
LEFT-padded to that call's longest prompt, completion-aligned ``(B, T)`` tensors (``completion_ids``,
``completion_mask``, ``old_per_token_logps``, ...) are RIGHT-padded to that call's longest completion, 1-D tensors
(``advantages``, ``rewards``, ``group_id``) hold one value per row and 0-D tensors (``num_items_in_batch``) describe
the whole batch. Different calls have different widths, so rows taken from several calls must be re-padded before
they can be stacked.
"""

from __future__ import annotations

from typing import Any

import torch

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
    "behaviour_per_token_logps": 0.0,  # gvpo_trl.buffer's column
    "importance_sampling_ratio": 1.0,  # (B, T) in TRL's token modes, (B, 1) in its sequence modes
}

#: ``(B, T)`` keys padded on the left (the prompt side); every other known ``(B, T)`` key is padded on the right.
LEFT_PADDED = frozenset({"prompt_ids", "prompt_mask"})


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


def pad_to_width(value: torch.Tensor, width: int, pad_value: float, left: bool) -> torch.Tensor:
    """Widen a ``(B, T)`` tensor to ``(B, width)`` with ``pad_value`` on the left or right side."""
    missing = width - value.size(1)
    if missing < 0:
        raise ValueError(f"cannot pad a tensor of width {value.size(1)} to the smaller width {width}")
    if missing == 0:
        return value
    padding = torch.full((value.size(0), missing), pad_value, dtype=value.dtype, device=value.device)
    return torch.cat([padding, value] if left else [value, padding], dim=1)


def concat_generation_outputs(parts: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack the rows of several generation outputs into one, re-padding ``(B, T)`` tensors to a common width.

    Prompt tensors are re-padded on the left and completion-aligned tensors on the right (see ``PAD_VALUES``), so
    every row keeps its tokens at the positions TRL's loss expects. 1-D tensors and lists are concatenated; a 0-D
    tensor is taken from the first part (the caller recomputes batch-level scalars such as ``num_items_in_batch``).
    Raises ``ValueError`` for a key missing from some part, or a ``(B, T)`` key of unknown padding (e.g. image
    tensors), rather than guess.
    """
    if not parts:
        raise ValueError("nothing to concatenate")
    keys = list(parts[0])
    for part in parts[1:]:
        if set(part) != set(keys):
            raise ValueError(f"generation outputs have different keys: {sorted(keys)} vs {sorted(part)}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [part[key] for part in parts]
        first = values[0]
        if isinstance(first, torch.Tensor) and first.ndim == 0:
            out[key] = first
        elif isinstance(first, torch.Tensor) and first.ndim == 1:
            out[key] = torch.cat(values, dim=0)
        elif isinstance(first, torch.Tensor) and first.ndim == 2 and key in PAD_VALUES:
            pad_value = pad_token_id if PAD_VALUES[key] == "pad_token" else PAD_VALUES[key]
            width = max(value.size(1) for value in values)
            left = key in LEFT_PADDED
            out[key] = torch.cat([pad_to_width(value, width, pad_value, left) for value in values], dim=0)
        elif isinstance(first, list):
            out[key] = [item for value in values for item in value]
        elif first is None or isinstance(first, (bool, int, float, str)):
            out[key] = first
        else:
            shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
            raise ValueError(
                f"cannot concatenate the generation output {key!r} ({shape}) across generation rounds: its padding "
                "is unknown (image inputs are not supported there)."
            )
    return out


def behaviour_logps(inputs: dict[str, Any], per_token_logps: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Per-token log-probs of the policy each row was sampled from (π_old), detached, and whether any row may be
    off-policy.

    π_old is TRL's ``old_per_token_logps`` (the rollout policy), or the detached ``per_token_logps`` when TRL leaves
    them out because training is exactly on-policy. On rows that ``gvpo_trl.buffer`` took from its store or from a
    dataset (``is_historical`` / ``is_external``) it is the stored ``behaviour_per_token_logps`` instead, never the
    current policy. The flag is False only when every row is exactly on-policy (π_old = π_θ).
    """
    old = inputs.get("old_per_token_logps")
    off_policy = old is not None
    old = per_token_logps.detach() if old is None else old.detach().to(per_token_logps.dtype)
    behaviour = inputs.get("behaviour_per_token_logps")
    if behaviour is not None:
        rows = torch.zeros(old.size(0), dtype=torch.bool, device=old.device)
        for key in ("is_historical", "is_external"):
            if key in inputs:
                rows = rows | inputs[key].to(device=old.device, dtype=torch.bool)
        if rows.any():
            old = torch.where(rows.unsqueeze(1), behaviour.detach().to(old), old)
            off_policy = True
    return old, off_policy
