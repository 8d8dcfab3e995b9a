"""Dynamic sampling: refill a generation batch with groups that carry a reward signal, generating only what it needs.

A group whose rewards are all equal (zero variance) has a zero advantage for every member: it teaches nothing and
dilutes the batch. GPG's threshold β_th (arXiv 2504.02546, §3.3; ``min_valid_fraction``) asks that at least
``β_th · B`` of the ``B`` groups of a generation batch have a reward variance; when fewer do, further prompts are
generated until enough valid groups are found (at most ``max_resample_rounds`` extra rounds). The batch then holds
the valid groups (at most ``B``) and is filled up to ``B`` with zero-variance groups, earliest round first. DAPO calls
this "dynamic sampling".

Frugal: each extra round generates only as many groups as the still-missing valid groups need at the valid rate seen
so far in this generation batch (:func:`round_size`), not a whole batch. All counts are global (reduced over
processes), so every process takes the same decisions; they depend on this generation batch alone, so a resumed run
takes the same ones. Extra prompts come from the trainer's own data (:class:`ExtraPrompts`), at positions fixed by
``global_step``.

Composed with the mixed buffer: every round goes through the buffer, so a group made informative by its historical
members counts as valid without generating more, and extra prompts get history too (``docs/dynamic_sampling.md``).

What it changes in each objective (on by default for GPG, as in its paper; opt-in for the others):

- GPG: ``α = B/(B − M)`` undoes the dilution by the ``M`` zero-variance groups that remain; β_th bounds ``M``.
- GVPO: a zero-variance group's centred rewards are 0, so it only adds the regulariser ``½[β(Δ_i − Δ̄)]²`` to the mean
  over groups; replacing it puts more of each step on the reward signal. Each group's own loss and optimum are
  unchanged; the batch over-represents prompts that are neither always solved nor never.
- GSPO: a zero-variance group's advantages are exactly 0 and only dilute the mean over sequences; refilling removes
  the dilution (the DAPO recipe), at the same prompt-distribution shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .columns import GROUP_ID, REWARDS
from .groups import zero_variance_groups
from .prompt_stream import ExtraPromptStream, is_stream
from .rows import concat_generation_outputs, loss_token_count, merge_images, split_images, take_rows


@dataclass
class DynamicSamplingArgs:
    """Configuration fields of dynamic sampling, shared by every trainer here (``GroupConfig`` inherits them)."""

    min_valid_fraction: float = field(
        default=0.0,
        metadata={
            "help": "β_th of dynamic sampling: when fewer than this fraction of the generation batch's groups have a "
            "non-zero reward variance, generate further prompts (each round only as many as the missing valid groups "
            "need at the valid rate seen so far) until it is reached or max_resample_rounds extra rounds are spent; "
            "keep the valid groups and fill up with zero-variance ones. 0 (default; GPG: 0.6) turns it off."
        },
    )
    max_resample_rounds: int = field(
        default=20,
        metadata={"help": "Most extra generation rounds per generation batch for min_valid_fraction (GPG: 20)."},
    )


def dynamic_sampling_enabled(args: Any) -> bool:
    return getattr(args, "min_valid_fraction", 0.0) > 0


def check_dynamic_sampling_config(args: Any, name: str) -> None:
    """Raise ``ValueError`` for dynamic-sampling settings no run can use, saying what to change."""
    if not 0.0 <= args.min_valid_fraction <= 1.0:
        raise ValueError(
            f"{name}: min_valid_fraction must be in [0, 1] (GPG's paper uses 0.5-0.8; 0 disables dynamic sampling), "
            f"got {args.min_valid_fraction}."
        )
    if args.min_valid_fraction > 0 and args.max_resample_rounds < 1:
        raise ValueError(
            f"{name}: max_resample_rounds must be >= 1, got {args.max_resample_rounds}. To disable dynamic sampling, "
            "set min_valid_fraction=0."
        )


# --- decisions (pure) ----------------------------------------------------------------------------------------------


def valid_target(min_valid_fraction: float, num_groups: int) -> int:
    """Valid groups a batch of ``num_groups`` must hold: ``⌈β_th · B⌉``."""
    return math.ceil(min_valid_fraction * num_groups - 1e-9)


def round_size(missing: int, valid_seen: int, groups_seen: int, num_processes: int, max_groups: int) -> int:
    """Global groups the next round generates to find ``missing`` valid groups: ``⌈missing / p̂⌉`` at the valid rate
    ``p̂ = (valid_seen + 1) / (groups_seen + 2)`` (so that a round with no valid group still gives a finite size),
    rounded up to a multiple of ``num_processes`` (each process generates the same number) and kept within
    ``[num_processes, max_groups]`` (``max_groups``, a generation batch, rounded down to that multiple)."""
    if missing <= 0:
        return 0
    rate = (valid_seen + 1) / (groups_seen + 2)
    groups = math.ceil(missing / rate - 1e-9)
    groups = -(-groups // num_processes) * num_processes
    cap = max(num_processes, max_groups // num_processes * num_processes)
    return min(max(groups, num_processes), cap)


def group_rows(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Row indices of each valid and of each zero-variance group (in order of group id) of rows holding whole
    groups."""
    zero = zero_variance_groups(rewards, group_ids)
    valid, empty = [], []
    for gid in torch.unique(group_ids):
        rows = (group_ids == gid).nonzero(as_tuple=True)[0]
        (empty if zero[rows[0]] else valid).append(rows)
    return valid, empty


@dataclass
class GenerationRound:
    """One generation round of this process: its output and the row indices of its valid and zero-variance groups."""

    output: dict[str, Any]
    valid: list[torch.Tensor]
    zero: list[torch.Tensor]

    @classmethod
    def of(cls, output: dict[str, Any]) -> GenerationRound:
        return cls(output, *group_rows(output[REWARDS], output[GROUP_ID]))


def choose_groups(rounds: list[GenerationRound], num_groups: int) -> list[tuple[int, torch.Tensor]]:
    """``(round, rows)`` of the ``num_groups`` groups a batch keeps: valid groups first (earliest round first), then
    zero-variance groups to fill up (earliest round first)."""
    valid = [(r, rows) for r, rnd in enumerate(rounds) for rows in rnd.valid]
    zero = [(r, rows) for r, rnd in enumerate(rounds) for rows in rnd.zero]
    chosen = (valid + zero)[:num_groups]
    if len(chosen) < num_groups:
        raise RuntimeError(f"{len(chosen)} groups generated for a batch of {num_groups}: a round lost groups.")
    return chosen


def join_groups(rounds: list[GenerationRound], chosen: list[tuple[int, torch.Tensor]], pad_token_id: int) -> dict:
    """The batch of the ``chosen`` groups, re-padded across rounds; image tensors travel with their rows. Its
    ``num_items_in_batch`` is the first round's: the caller recounts it over all processes."""
    outputs = [split_images(rnd.output) for rnd in rounds]
    return merge_images(concat_generation_outputs([take_rows(outputs[r], rows) for r, rows in chosen], pad_token_id))


# --- where extra prompts come from -----------------------------------------------------------------------------------


class ExtraPrompts:
    """The extra prompts of one generation batch, drawn identically on every process and after a resume.

    Map-style ``dataset``: a permutation of it seeded by ``(seed, step)``; a new permutation starts when one is used
    up. Streaming ``dataset``: the examples of ``stream`` from position ``step × max_rounds × max_groups`` on (a window
    no generation batch can overrun, since a round takes at most ``max_groups``). :meth:`take` returns this process's
    share of the next ``num_global_groups`` prompts, each repeated ``k`` times.
    """

    def __init__(self, dataset, *, seed: int, step: int, k: int, num_processes: int, process_index: int,
                 max_rounds: int, max_groups: int, stream: ExtraPromptStream | None = None):  # fmt: skip
        self.dataset, self.k = dataset, k
        self.num_processes, self.process_index = num_processes, process_index
        self.stream = stream
        if stream is not None:
            stream.seek(int(step) * max_rounds * max_groups)
        self.generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) + 1)
        self.order: list[int] = []

    def _next_examples(self, n: int) -> list[dict[str, Any]]:
        if self.stream is not None:
            return [self.stream.next() for _ in range(n)]
        while len(self.order) < n:
            self.order += torch.randperm(len(self.dataset), generator=self.generator).tolist()
        chosen, self.order = self.order[:n], self.order[n:]
        return [self.dataset[int(i)] for i in chosen]

    def take(self, num_global_groups: int) -> list[dict[str, Any]]:
        examples = self._next_examples(num_global_groups)
        local = num_global_groups // self.num_processes
        first = self.process_index * local
        return [example for example in examples[first : first + local] for _ in range(self.k)]


# --- the step ------------------------------------------------------------------------------------------------------


class DynamicSampling:
    """Dynamic sampling for one trainer (a ``GroupTrainer``): :meth:`refill` turns a scored generation batch into one
    that meets ``min_valid_fraction``, calling ``generate_round`` (TRL's generation and scoring plus the group columns)
    for each extra round. Logs ``dynamic_sampling/*``."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._stream: ExtraPromptStream | None = None  # streaming train_dataset: opened at the first extra round

    def extra_prompts(self, num_global_groups: int) -> ExtraPrompts:
        trainer, args = self.trainer, self.trainer.args
        dataset = trainer.train_dataset
        if dataset is None:
            raise ValueError(
                f"{type(trainer).__name__}: min_valid_fraction > 0 needs a train_dataset to draw extra prompts from."
            )
        if is_stream(dataset) and self._stream is None:
            self._stream = ExtraPromptStream(dataset, args.seed, args.shuffle_dataset)
        accelerator = trainer.accelerator
        return ExtraPrompts(
            dataset, seed=args.seed, step=trainer.state.global_step, k=trainer.group_size,
            num_processes=accelerator.num_processes, process_index=accelerator.process_index,
            max_rounds=args.max_resample_rounds, max_groups=num_global_groups, stream=self._stream,
        )  # fmt: skip

    def _global_counts(self, rounds: list[GenerationRound], num_groups: int) -> tuple[int, int]:
        """Valid groups the batch would hold over all processes (``Σ_p min(valid_p, groups per process)``), and
        valid groups generated over all processes."""
        valid = sum(len(rnd.valid) for rnd in rounds)
        local = torch.tensor([min(valid, num_groups), valid], device=self.trainer.accelerator.device)
        kept, seen = self.trainer.accelerator.reduce(local, reduction="sum").tolist()
        return int(kept), int(seen)

    def refill(
        self, first: dict[str, Any], inputs: list[dict[str, Any]], columns: list[str],
        generate_round: Callable[[list[dict[str, Any]]], dict[str, Any]],
    ) -> dict[str, Any]:  # fmt: skip
        trainer, args = self.trainer, self.trainer.args
        k, num_processes = trainer.group_size, trainer.accelerator.num_processes
        local_groups = len(inputs) // k
        batch_groups = local_groups * num_processes
        target = valid_target(args.min_valid_fraction, batch_groups)
        rounds, generated = [GenerationRound.of(first)], batch_groups
        kept, valid_seen = self._global_counts(rounds, local_groups)
        source = None
        while kept < target and len(rounds) <= args.max_resample_rounds:
            size = round_size(target - kept, valid_seen, generated, num_processes, batch_groups)
            source = source or self.extra_prompts(batch_groups)
            output = generate_round([{key: ex[key] for key in columns} for ex in source.take(size)])
            output[GROUP_ID] = output[GROUP_ID] + generated  # unique across rounds
            rounds.append(GenerationRound.of(output))
            generated += size
            kept, valid_seen = self._global_counts(rounds, local_groups)
        self._log(rounds, kept, valid_seen, generated - batch_groups, batch_groups)
        if len(rounds) == 1:
            return first
        pad_id = getattr(trainer.processing_class, "tokenizer", trainer.processing_class).pad_token_id
        batch = join_groups(rounds, choose_groups(rounds, local_groups), pad_id)
        batch["num_items_in_batch"] = trainer.accelerator.gather(loss_token_count(batch)).sum()
        return batch

    def _log(self, rounds, kept: int, valid_seen: int, extra_groups: int, batch_groups: int) -> None:
        metrics = self.trainer._metrics["train"]
        metrics["dynamic_sampling/rounds"].append(float(len(rounds) - 1))
        metrics["dynamic_sampling/extra_groups"].append(float(extra_groups))
        metrics["dynamic_sampling/batch_valid_fraction"].append(kept / batch_groups)
        metrics["dynamic_sampling/discarded_valid_groups"].append(float(valid_seen - kept))
