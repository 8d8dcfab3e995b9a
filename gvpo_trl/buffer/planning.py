"""The choices of a mixed buffer, as pure functions of the store and the configuration.

How many members of a group come from history (:func:`resolve_num_historical`), which samples a group gets
(:func:`select_historical`, seeded by :func:`selection_seed` so that every process draws the same), and the plan of a
whole generation batch (:func:`plan_groups`), which keeps the number of generated and of scored rows equal on every
process (:func:`equalise_across_processes`), as TRL's cross-process gathers need.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import torch

from ..groups import aggregate_rewards
from .store import Sample, SampleBuffer

#: Selection rules for the historical members of a group: by age (``newest``, ``oldest``, ``uniform``) or by the
#: signal a sample adds to its group (``contrast``, ``highest``; see :func:`select_historical`).
SELECTION_RULES = ("newest", "oldest", "uniform", "contrast", "highest")
#: The rules that choose by reward (exact for GVPO; a bias for importance-weighted losses).
SIGNAL_RULES = ("contrast", "highest")
#: Schedules of the historical members per group over a run.
HISTORY_SCHEDULES = ("constant", "linear", "step")


def resolve_num_historical(value: float, k: int) -> int:
    """Members of each group of ``k`` taken from history: ``value`` ≥ 1 is a count, ``0 < value < 1`` a fraction of
    ``k`` (rounded down), 0 none. Raises ``ValueError`` unless 0 ≤ result ≤ k − 1 (a group keeps a fresh member)."""
    if value is None or value == 0:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"buffer_history_per_group must be a count >= 1 or a fraction in (0, 1), got {value!r}")
    if value >= 1:
        if value != int(value):
            raise ValueError(
                f"buffer_history_per_group={value}: a value >= 1 is a count of group members and must be a whole "
                "number; a fraction of the group must be < 1."
            )
        h = int(value)
    else:
        h = int(math.floor(value * k + 1e-9))
        if h == 0:
            raise ValueError(
                f"buffer_history_per_group={value} of a group of num_generations={k} is less than one member. "
                f"Use a fraction >= {1 / k:.3g} or a count."
            )
    if h > k - 1:
        raise ValueError(
            f"buffer_history_per_group={value} asks for {h} historical members in groups of num_generations={k}: at "
            f"most k - 1 = {k - 1}, so that every group gets at least one fresh generation (otherwise nothing new "
            "would ever be learned about its prompt)."
        )
    return h


def resolve_history_horizon(value: float, max_steps: int) -> int:
    """The step at which a history schedule reaches 0: ``0 < value ≤ 1`` is a fraction of ``max_steps`` (rounded
    up), a whole ``value > 1`` a step count."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"buffer_history_horizon must be a fraction in (0, 1] or a step count > 1, got {value!r}")
    if value > 1:
        if value != int(value):
            raise ValueError(f"buffer_history_horizon={value}: a value > 1 is a step count and must be a whole number")
        return int(value)
    if max_steps is None or max_steps <= 0:
        raise ValueError(f"buffer_history_horizon={value} is a fraction of max_steps, which is not known; pass a count")
    return max(1, math.ceil(value * max_steps))


def scheduled_num_historical(h: int, step: int, schedule: str, horizon: int) -> int:
    """Historical members per group at optimizer step ``step``: ``constant`` keeps ``h``; ``step`` keeps ``h`` before
    ``horizon`` and 0 from it on; ``linear`` decays ``ceil(h · (1 − step/horizon))`` to 0 at ``horizon``."""
    if schedule == "constant" or h == 0:
        return h
    if schedule == "step":
        return h if step < horizon else 0
    if schedule == "linear":
        return max(0, math.ceil(h * (1 - step / horizon) - 1e-9))
    raise ValueError(f"unknown history schedule {schedule!r}; expected one of {HISTORY_SCHEDULES}")


def selection_seed(seed: int, step: int, key: str, occurrence: int = 0) -> int:
    """A seed for one group's draw that depends only on the run seed, the step, the prompt and which occurrence of
    that prompt in the batch it is: the same on every process and after a resume (Python's ``hash`` is not)."""
    digest = hashlib.sha256(f"{seed}\x00{step}\x00{occurrence}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sample_rewards(samples: list[Sample], weights: tuple[float, ...] | None = None) -> list[float]:
    """Stored samples' total rewards as the trainer sums them (:func:`gvpo_trl.groups.aggregate_rewards`: weighted over
    reward functions, a function's NaN (None) output ignored), a sample with no reward at all counting 0.
    ``weights`` default to 1 each."""
    rewards = torch.tensor([s.rewards for s in samples], dtype=torch.float64)
    weights = torch.ones(rewards.shape[1], dtype=torch.float64) if weights is None else torch.tensor(weights)
    return aggregate_rewards(rewards, weights).nan_to_num(0.0).tolist()


def sample_reward(sample: Sample, weights: tuple[float, ...] | None = None) -> float:
    """One stored sample's total reward (:func:`sample_rewards`)."""
    return sample_rewards([sample], weights)[0]


def select_historical(
    candidates: list[Sample],
    n: int,
    rule: str,
    rng: random.Random | None = None,
    reward_weights: tuple[float, ...] | None = None,
) -> list[Sample]:
    """Up to ``n`` of ``candidates`` (samples of one prompt).

    By age: the ``newest`` or ``oldest`` (by step, then insertion), or ``uniform`` at random without replacement
    (``rng`` required). By signal: ``contrast`` takes the samples whose reward is farthest from the mean reward of the
    prompt's newest candidates (those of the latest step: the best estimate of what its fresh members will score), so
    that a group whose fresh members are likely all to fail gets a past success and an all-correct one a past failure:
    reward variance, hence a gradient, without generating more; ``highest`` takes the best-rewarded samples (replaying
    successes). Both break ties newest first, so ``contrast`` is ``newest`` when every candidate is equally far.
    """
    if n <= 0 or not candidates:
        return []
    newest_first = sorted(candidates, key=lambda s: (s.step, s.uid), reverse=True)
    if rule == "newest":
        return newest_first[:n]
    if rule in SIGNAL_RULES:
        rewards = dict(zip((s.uid for s in candidates), sample_rewards(candidates, reward_weights), strict=True))
        if rule == "highest":
            return sorted(newest_first, key=lambda s: -rewards[s.uid])[:n]  # stable sort: ties stay newest first
        latest = [rewards[s.uid] for s in newest_first if s.step == newest_first[0].step]
        expected = sum(latest) / len(latest)
        return sorted(newest_first, key=lambda s: -abs(rewards[s.uid] - expected))[:n]
    if rule == "oldest":
        return sorted(candidates, key=lambda s: (s.step, s.uid))[:n]
    if rule == "uniform":
        if rng is None:
            raise ValueError("the 'uniform' rule needs an rng")
        pool = sorted(candidates, key=lambda s: s.uid)
        return rng.sample(pool, min(n, len(pool)))
    raise ValueError(f"unknown selection rule {rule!r}; expected one of {SELECTION_RULES}")


def equalise_across_processes(
    num_historical: list[int], external: list[bool], k: int, num_processes: int
) -> tuple[list[int], list[bool]]:
    """Make every process generate, and score, the same number of rows, by turning planned historical or external
    members into fresh ones (never the reverse: a prompt with too little history gets fresh generations).

    Groups are split contiguously over processes (``len // num_processes`` each). External members are cut first to
    the smallest per-process count (from each process's last groups), then historical members of the processes that
    generate fewer rows are cut (one at a time from the group holding the most, the last such group on ties) until
    they generate as many as the process that generates the most. TRL gathers rewards and completion lengths across
    processes with tensor gathers, which need equal shapes.
    """
    if len(num_historical) != len(external) or len(num_historical) % num_processes:
        raise ValueError(f"{len(num_historical)} groups cannot be split over {num_processes} processes")
    hist, ext = list(num_historical), list(external)
    per = len(hist) // num_processes
    spans = [range(p * per, (p + 1) * per) for p in range(num_processes)]
    min_ext = min(sum(ext[g] for g in span) for span in spans)
    for span in spans:
        surplus = sum(ext[g] for g in span) - min_ext
        for g in reversed(span):
            if surplus == 0:
                break
            if ext[g]:
                ext[g], surplus = False, surplus - 1
    fresh = [sum(k - hist[g] - ext[g] for g in span) for span in spans]
    target = max(fresh)
    for span, f in zip(spans, fresh, strict=False):
        for _ in range(target - f):
            g = max(reversed(span), key=lambda i: hist[i])  # reversed + max keeps the last group on ties
            if hist[g] == 0:  # cannot happen: target <= rows - external on every process
                raise AssertionError("not enough historical members to equalise")
            hist[g] -= 1
    return hist, ext


@dataclass(frozen=True)
class GroupPlan:
    """How one group of k is filled: ``k − len(historical) − external`` fresh rows, then the external member (if
    any), then the historical samples ``historical`` (uids) in this order. ``wanted``: historical members asked for;
    ``cut``: members (historical or external) that were available but turned fresh by the equalisation across
    processes."""

    key: str
    historical: tuple[int, ...]
    external: bool
    wanted: int
    cut: int = 0

    def num_fresh(self, k: int) -> int:
        return k - len(self.historical) - int(self.external)


def plan_groups(
    keys: list[str],
    external_available: list[bool],
    buffer: SampleBuffer,
    *,
    k: int,
    num_historical: int,
    step: int,
    max_staleness: int,
    selection: str,
    seed: int,
    num_processes: int = 1,
    reward_weights: tuple[float, ...] | None = None,
) -> list[GroupPlan]:
    """The plan of a whole generation batch (all processes' groups, in process order), from the buffer as it is.

    Each group gets its external member when one is available, and ``min(num_historical, k − 1 − external)`` historical
    samples of its prompt that are at most ``max_staleness`` steps old, fewer when the buffer has fewer (then more
    fresh rows), chosen by ``selection`` (signal rules weigh the reward functions by ``reward_weights``). A sample
    serves at most one group of the batch. :func:`equalise_across_processes` then evens out the per-process counts.
    A pure function of its arguments: every process computes the same plan.
    """
    used: set[int] = set()
    occurrences: dict[str, int] = {}
    chosen, wanted = [], []
    for key, ext in zip(keys, external_available, strict=False):
        occurrence = occurrences.get(key, 0)
        occurrences[key] = occurrence + 1
        want = min(num_historical, k - 1 - int(ext))
        rng = random.Random(selection_seed(seed, step, key, occurrence)) if selection == "uniform" else None
        candidates = buffer.candidates(key, step, max_staleness, used)
        picks = select_historical(candidates, want, selection, rng, reward_weights)
        used.update(s.uid for s in picks)
        chosen.append(tuple(s.uid for s in picks))
        wanted.append(want)
    hist, ext = equalise_across_processes([len(c) for c in chosen], list(external_available), k, num_processes)
    return [
        GroupPlan(key, uids[:h], e, w, len(uids) - h + int(a) - int(e))
        for key, uids, h, e, w, a in zip(keys, chosen, hist, ext, wanted, external_available, strict=False)
    ]
