"""The columns gvpo-trl adds to TRL's generation output (one value per row), named once, and the behaviour policy
a loss reads from them."""

from __future__ import annotations

from typing import Any

import torch

#: Group (prompt occurrence) of each row: rows with the same id form one group of k.
GROUP_ID = "group_id"
#: Raw reward of each row (weighted sum over reward functions; NaN = unscorable), gathered over processes.
REWARDS = "rewards"
#: TRL's column, holding the algorithm's own advantage here.
ADVANTAGES = "advantages"
#: Mixed buffer: per-token log-probs of the policy that generated each row, ``(B, T)``.
BEHAVIOUR_LOGPS = "behaviour_per_token_logps"
#: Mixed buffer: whether a row was reused from the buffer / came from the dataset's external column.
IS_HISTORICAL = "is_historical"
IS_EXTERNAL = "is_external"
#: Mixed buffer: optimizer steps since the row was generated (0 for fresh rows).
STALENESS = "staleness"


def behaviour_logps(inputs: dict[str, Any], per_token_logps: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Per-token log-probs of the policy each row was sampled from (π_old), detached, and whether any row may be
    off-policy.

    π_old is TRL's ``old_per_token_logps`` (the rollout policy), or the detached ``per_token_logps`` when TRL leaves
    them out because training is exactly on-policy. On rows that the mixed buffer took from its store or from a
    dataset (:data:`IS_HISTORICAL` / :data:`IS_EXTERNAL`) it is the stored :data:`BEHAVIOUR_LOGPS` instead, never the
    current policy. The flag is False only when every row is exactly on-policy (π_old = π_θ).
    """
    old = inputs.get("old_per_token_logps")
    off_policy = old is not None
    old = per_token_logps.detach() if old is None else old.detach().to(per_token_logps.dtype)
    behaviour = inputs.get(BEHAVIOUR_LOGPS)
    if behaviour is not None:
        rows = torch.zeros(old.size(0), dtype=torch.bool, device=old.device)
        for key in (IS_HISTORICAL, IS_EXTERNAL):
            if key in inputs:
                rows = rows | inputs[key].to(device=old.device, dtype=torch.bool)
        if rows.any():
            old = torch.where(rows.unsqueeze(1), behaviour.detach().to(old), old)
            off_policy = True
    return old, off_policy
