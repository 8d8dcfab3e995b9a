"""The store of a mixed buffer: completed samples keyed by prompt (:class:`Sample`, :class:`SampleBuffer`).

Each sample keeps the completion token ids, the completion as the reward functions saw it, the reward of each reward
function, the per-token log-probs of the policy that generated it (the behaviour policy) and the optimizer step it
came from. Deterministic: the same calls give the same state on every process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch


def prompt_key(prompt: Any) -> str:
    """The buffer key of a prompt: the text itself, or a canonical JSON dump of a conversational prompt, in which an
    image (a PIL image in a content block, as TRL puts a row's images into its prompt) stands for its pixels' digest:
    two prompts with the same text and different images have different keys, the same image always the same one."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=_value_key)


def _value_key(value: Any) -> str:
    if all(hasattr(value, attr) for attr in ("mode", "size", "tobytes")):  # a PIL image
        digest = hashlib.sha256(f"{value.mode}{value.size}".encode() + value.tobytes()).hexdigest()
        return f"<image {value.mode} {value.size[0]}x{value.size[1]} sha256:{digest}>"
    return str(value)


@dataclass
class Sample:
    """One completed sample. ``uid`` numbers samples in insertion order (the same on every process)."""

    uid: int
    key: str
    completion_ids: list[int]
    completion: Any  # what the reward functions saw: a string, or a list of messages
    rewards: list[float]  # one per reward function, NaN where a function returned None
    logps: torch.Tensor | None  # behaviour per-token log-probs, float32, shape (len(completion_ids),)
    step: int  # optimizer step (policy version) that generated it
    uses: int = 0  # groups it has served as a historical member
    tool_mask: list[int] | None = None  # TRL's tool mask (1 = generated, 0 = tool output), with tools or environments
    extra: dict[str, Any] | None = None  # the rollout function's extra fields of this row


class SampleBuffer:
    """Completed samples keyed by prompt, oldest first. Deterministic: the same calls give the same state anywhere."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._entries: dict[int, Sample] = {}  # uid -> sample, in insertion (= uid) order
        self._by_key: dict[str, list[int]] = {}
        self.next_uid = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, uid: int) -> bool:
        return uid in self._entries

    def __getitem__(self, uid: int) -> Sample:
        return self._entries[uid]

    def samples(self, key: str | None = None) -> list[Sample]:
        """All samples (or those of one prompt), oldest first."""
        if key is None:
            return list(self._entries.values())
        return [self._entries[uid] for uid in self._by_key.get(key, [])]

    def add(
        self,
        key: str,
        completion_ids: list[int],
        completion: Any,
        rewards: list[float],
        logps: torch.Tensor | None,
        step: int,
        tool_mask: list[int] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Sample:
        """Store a sample (no eviction: call :meth:`evict_over_capacity` after a batch of ``add``)."""
        if logps is not None:
            logps = torch.as_tensor(logps, dtype=torch.float32).detach().cpu().reshape(-1)
            if logps.numel() != len(completion_ids):
                raise ValueError(f"{logps.numel()} log-probs for {len(completion_ids)} completion tokens")
        sample = Sample(
            uid=self.next_uid,
            key=key,
            completion_ids=list(map(int, completion_ids)),
            completion=completion,
            rewards=list(map(float, rewards)),
            logps=logps,
            step=int(step),
            tool_mask=None if tool_mask is None else list(map(int, tool_mask)),
            extra=None if extra is None else dict(extra),
        )
        if sample.tool_mask is not None and len(sample.tool_mask) != len(sample.completion_ids):
            raise ValueError(f"{len(sample.tool_mask)} tool-mask entries for {len(completion_ids)} completion tokens")
        self._entries[sample.uid] = sample
        self._by_key.setdefault(key, []).append(sample.uid)
        self.next_uid += 1
        return sample

    def _remove(self, uid: int) -> None:
        sample = self._entries.pop(uid)
        uids = self._by_key[sample.key]
        uids.remove(uid)
        if not uids:
            del self._by_key[sample.key]

    def evict(self, uids) -> list[int]:
        """Remove the given samples (those not in the buffer are ignored); returns the removed uids in order."""
        removed = [uid for uid in dict.fromkeys(uids) if uid in self._entries]
        for uid in removed:
            self._remove(uid)
        return removed

    def record_uses(self, uids, max_reuse: int = 0) -> list[int]:
        """Count one more use of each sample in ``uids``; with ``max_reuse`` > 0, evict those used that many times."""
        for uid in uids:
            self._entries[uid].uses += 1
        if max_reuse <= 0:
            return []
        return self.evict([uid for uid in uids if uid in self._entries and self._entries[uid].uses >= max_reuse])

    def evict_stale(self, step: int, max_staleness: int) -> list[int]:
        """Remove the samples older than ``max_staleness`` optimizer steps at ``step`` (``step − s > max``)."""
        return self.evict([uid for uid, s in self._entries.items() if step - s.step > max_staleness])

    def evict_over_capacity(self) -> list[int]:
        """Remove the oldest samples (first in, first out) until at most ``capacity`` remain."""
        excess = len(self._entries) - self.capacity
        return self.evict(list(self._entries)[: max(excess, 0)])

    def candidates(self, key: str, step: int, max_staleness: int, exclude: set[int] | frozenset = frozenset()):
        """The samples of prompt ``key`` usable at ``step`` (staleness ``step − s ≤ max_staleness``), oldest first."""
        return [
            s for s in self.samples(key) if s.uid not in exclude and 0 <= step - s.step <= max_staleness
        ]  # fmt: skip

    # --- persistence ---

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only (loadable with ``torch.load(weights_only=True)``), use counts included."""
        return {
            "capacity": self.capacity,
            "next_uid": self.next_uid,
            "samples": [
                {
                    "uid": s.uid,
                    "key": s.key,
                    "completion_ids": s.completion_ids,
                    "completion": s.completion,
                    "rewards": s.rewards,
                    "logps": s.logps,
                    "step": s.step,
                    "uses": s.uses,
                    "tool_mask": s.tool_mask,
                    "extra": s.extra,
                }
                for s in self._entries.values()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._entries.clear()
        self._by_key.clear()
        for d in state["samples"]:
            sample = Sample(uid=d["uid"], key=d["key"], completion_ids=list(d["completion_ids"]),
                            completion=d["completion"], rewards=list(d["rewards"]), logps=d["logps"], step=d["step"],
                            uses=int(d.get("uses", 0)), tool_mask=d.get("tool_mask"), extra=d.get("extra"))  # fmt: skip
            self._entries[sample.uid] = sample
            self._by_key.setdefault(sample.key, []).append(sample.uid)
        self.next_uid = int(state["next_uid"])
        # the capacity is configuration: keep this run's (evicting at once if it is smaller)
        self.evict_over_capacity()

    def digest(self) -> str:
        """SHA-256 of the exact content (bit-exact floats): equal digests mean equal buffers."""
        h = hashlib.sha256()
        h.update(f"{self.next_uid}".encode())
        for s in self._entries.values():
            h.update(json.dumps([s.uid, s.key, s.step, s.uses, s.completion_ids, s.completion], default=str).encode())
            h.update(repr(s.rewards).encode())  # repr round-trips floats exactly (and shows NaN)
            h.update(b"-" if s.logps is None else s.logps.numpy().tobytes())
            if s.tool_mask is not None or s.extra is not None:
                h.update(json.dumps([s.tool_mask, s.extra], sort_keys=True, default=str).encode())
        return h.hexdigest()
