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
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._trl_compat import MULTIMODAL_FORWARD_KEYS
from .columns import BEHAVIOUR_LOGPS, GROUP_ID, IS_EXTERNAL, IS_HISTORICAL, REWARDS, STALENESS
from .groups import zero_variance_groups
from .prompt_stream import ExtraPromptStream, is_stream
from .rows import concat_generation_outputs, loss_token_count, merge_images, split_images, take_rows

#: File name of the dynamic-sampling state (the carried groups) inside a checkpoint folder.
STATE_NAME = "gvpo_trl_dynamic_sampling.pt"


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
    dynamic_sampling_carry_over: bool = field(
        default=True,
        metadata={
            "help": "Keep the valid groups a generation batch had no room for (at most one batch) for the next "
            "generation batch, where they count as valid before any extra round is generated, trained as off-policy "
            "members (GVPO needs no weights; GPG and GSPO weigh them by the policy that generated them). Unused ones "
            "are dropped then. Not with image inputs. False discards them (dynamic_sampling/discarded_valid_groups)."
        },
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


def surplus_groups(rounds: list[GenerationRound], chosen: list[tuple[int, torch.Tensor]],
                   num_groups: int) -> list[tuple[int, torch.Tensor]]:  # fmt: skip
    """``(round, rows)`` of the valid groups not ``chosen``, earliest first, at most ``num_groups``."""
    taken = {(r, int(rows[0])) for r, rows in chosen}
    valid = [(r, rows) for r, rnd in enumerate(rounds) for rows in rnd.valid if (r, int(rows[0])) not in taken]
    return valid[:num_groups]


def with_off_policy_columns(batch: dict[str, Any], off_policy: bool, behaviour: torch.Tensor | None = None) -> dict:
    """``batch`` with the columns a loss reads for rows of an older policy (``gvpo_trl.columns``): when
    ``off_policy``, every row is flagged historical with ``behaviour`` as its behaviour log-probs and one more step of
    staleness, and TRL's vLLM importance ratio 1 (their behaviour log-probs are already the sampler's); else the columns
    are added where missing (zeros, not flagged), so that batches can be stacked."""
    rows, device = batch[GROUP_ID].numel(), batch[GROUP_ID].device
    out = dict(batch)
    if off_policy:
        out[BEHAVIOUR_LOGPS] = behaviour.detach().float()
        out[IS_HISTORICAL] = torch.ones(rows, dtype=torch.bool, device=device)
        out[STALENESS] = out.get(STALENESS, torch.zeros(rows, dtype=torch.long, device=device)) + 1
        if "importance_sampling_ratio" in out:  # the behaviour log-probs are the sampler's own: no second correction
            out["importance_sampling_ratio"] = torch.ones_like(out["importance_sampling_ratio"])
    else:
        out.setdefault(BEHAVIOUR_LOGPS, torch.zeros_like(batch["completion_mask"], dtype=torch.float32))
        out.setdefault(IS_HISTORICAL, torch.zeros(rows, dtype=torch.bool, device=device))
        out.setdefault(STALENESS, torch.zeros(rows, dtype=torch.long, device=device))
    out.setdefault(IS_EXTERNAL, torch.zeros(rows, dtype=torch.bool, device=device))
    return out


def _on(batch: dict[str, Any], device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


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
        self._carried: dict[str, Any] | None = None  # surplus valid groups of the last generation batch (this process)

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

    def _global_counts(self, rounds: list[GenerationRound], fresh: list[int], num_groups: int) -> tuple[int, int]:
        """Valid groups the batch would hold over all processes (``Σ_p min(valid_p, groups per process)``), and
        valid groups generated in the ``fresh`` rounds (not carried over) over all processes."""
        valid = sum(len(rnd.valid) for rnd in rounds)
        generated = sum(len(rounds[i].valid) for i in fresh)
        local = torch.tensor([min(valid, num_groups), generated], device=self.trainer.accelerator.device)
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
        rounds, fresh, generated = [GenerationRound.of(first)], [0], batch_groups
        carried = self._take_carried(first, first_id=batch_groups, num_groups=local_groups)
        if carried is not None:  # used before any extra round: they count as valid at once
            rounds.append(GenerationRound.of(carried))
        next_id = 2 * batch_groups  # group ids stay unique across rounds (the carried ones use the second block)
        kept, valid_seen = self._global_counts(rounds, fresh, local_groups)
        source = None
        while kept < target and len(fresh) - 1 < args.max_resample_rounds:
            size = round_size(target - kept, valid_seen, generated, num_processes, batch_groups)
            source = source or self.extra_prompts(batch_groups)
            output = generate_round([{key: ex[key] for key in columns} for ex in source.take(size)])
            output[GROUP_ID] = output[GROUP_ID] + next_id
            fresh.append(len(rounds))
            rounds.append(GenerationRound.of(output))
            generated, next_id = generated + size, next_id + size
            kept, valid_seen = self._global_counts(rounds, fresh, local_groups)
        chosen = choose_groups(rounds, local_groups)
        surplus = self._keep_surplus(rounds, fresh, chosen, local_groups)
        self._log(rounds, fresh, chosen, kept, generated - batch_groups, batch_groups, carried is not None, surplus)
        # one decision for all processes (the token count below gathers): carried groups may sit on one process only
        joined = torch.tensor([float(len(rounds) > 1)], device=trainer.accelerator.device)
        if trainer.accelerator.reduce(joined, reduction="sum").item() == 0:
            return first
        if carried is not None:  # the other rounds get the off-policy columns too, unflagged, to stack with them
            rounds = [rnd if i == 1 else GenerationRound(with_off_policy_columns(rnd.output, False), rnd.valid,
                                                         rnd.zero) for i, rnd in enumerate(rounds)]  # fmt: skip
        batch = join_groups(rounds, chosen, self._pad_token_id)
        batch["num_items_in_batch"] = trainer.accelerator.gather(loss_token_count(batch)).sum()
        return batch

    # --- carry-over ---

    def _carry_enabled(self, output: dict[str, Any]) -> bool:
        """Carry-over is on, and the batch has no image tensors (whose rows are not kept across steps)."""
        keys = set(MULTIMODAL_FORWARD_KEYS) - {"token_type_ids"}
        return self.trainer.args.dynamic_sampling_carry_over and not keys & set(output)

    @property
    def _pad_token_id(self) -> int:
        return getattr(self.trainer.processing_class, "tokenizer", self.trainer.processing_class).pad_token_id

    def _keep_surplus(self, rounds, fresh: list[int], chosen, num_groups: int) -> int:
        """Keep the valid groups of the fresh rounds that the batch had no room for, with the log-probs of the policy
        that generated them (computed now, before the optimizer step changes it)."""
        self._carried = None
        if not self._carry_enabled(rounds[0].output):
            return 0
        fresh_rounds = [rounds[i] for i in fresh]
        chosen_fresh = [(fresh.index(r), rows) for r, rows in chosen if r in fresh]
        parts = [take_rows(fresh_rounds[r].output, rows) for r, rows in surplus_groups(fresh_rounds, chosen_fresh,
                                                                                        num_groups)]  # fmt: skip
        rows = None
        if parts:
            rows = concat_generation_outputs(parts, self._pad_token_id) if len(parts) > 1 else parts[0]
        # with the buffer on, its behaviour column already holds the generating policy's log-probs of every row
        behaviour = rows.get(BEHAVIOUR_LOGPS) if rows is not None else None
        if BEHAVIOUR_LOGPS not in rounds[0].output:
            behaviour = self._policy_logps(rows, rounds[0].output)
        if rows is not None:
            self._carried = {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
                             for key, value in with_off_policy_columns(rows, True, behaviour).items()}  # fmt: skip
        return len(parts)

    def _policy_logps(self, rows: dict[str, Any] | None, placeholder: dict[str, Any]) -> torch.Tensor | None:
        """The current policy's per-token log-probs of ``rows``, computed on every process when any process has rows
        (a forward pass may be collective, as under ZeRO-3): a process without rows runs one row of
        ``placeholder``."""
        need = torch.tensor([float(rows is not None)], device=self.trainer.accelerator.device)
        if self.trainer.accelerator.reduce(need, reduction="sum").item() == 0:
            return None
        logps = self.trainer._generating_policy_logps(
            rows if rows is not None else take_rows(placeholder, torch.tensor([0]))
        )
        return logps if rows is not None else None

    def _take_carried(self, first: dict[str, Any], first_id: int, num_groups: int) -> dict[str, Any] | None:
        """The groups carried over from the previous generation batch, fitted to this one: unique group ids, and
        TRL's rollout log-probs recomputed under the current policy (the reference model's are unchanged)."""
        carried, self._carried = self._carried, None
        fits = carried is not None and self._carry_enabled(first)
        if fits and set(carried) - {"num_items_in_batch"} != set(with_off_policy_columns(first, False)) - {
            "num_items_in_batch"
        }:
            fits = False  # another layout (a changed configuration): not used
        carried = _on(carried, first[GROUP_ID].device) if fits else None
        if carried is not None:
            local = torch.arange(carried[GROUP_ID].numel(), device=carried[GROUP_ID].device) // self.trainer.group_size
            carried[GROUP_ID] = first_id + self.trainer.accelerator.process_index * num_groups + local
        if "old_per_token_logps" in first:  # the same on every process: each runs the forward pass if any needs it
            strip = ("old_per_token_logps", "sampling_per_token_logps")
            logps = self._policy_logps(
                None if carried is None else {key: v for key, v in carried.items() if key not in strip},
                {key: v for key, v in first.items() if key not in strip},
            )
            if carried is not None:
                carried["old_per_token_logps"] = logps
        return carried

    def save(self, folder: str) -> None:
        """Write the carried groups into a checkpoint folder, so that a resumed run uses them as this one would."""
        torch.save({"version": 1, "carried": self._carried}, os.path.join(folder, STATE_NAME))

    def load(self, checkpoint: str) -> None:
        """Restore the carried groups from a checkpoint (none when it has no state file: written without carry-over,
        or by an older gvpo-trl); a damaged file is refused naming it."""
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.exists(path):
            self._carried = None
            return
        try:
            state = torch.load(path, weights_only=True)
            if not isinstance(state, dict) or state.get("version") != 1:
                raise ValueError(
                    f"unknown layout (version {state.get('version') if isinstance(state, dict) else None})"
                )
        except Exception as error:
            raise ValueError(
                f"{type(self.trainer).__name__}: the dynamic-sampling state {path} cannot be read "
                f"({type(error).__name__}: {str(error).strip()[:160]}); the file is damaged. Resume from an earlier "
                "checkpoint, or start fresh (no resume_from_checkpoint, or a new output_dir)."
            ) from error
        self._carried = state["carried"]

    def _log(self, rounds, fresh, chosen, kept: int, extra_groups: int, batch_groups: int, has_carried: bool,
             surplus: int) -> None:  # fmt: skip
        valid_generated = sum(len(rounds[i].valid) for i in fresh)
        used_carried = sum(1 for r, _ in chosen if has_carried and r == 1)
        local = torch.tensor([valid_generated, used_carried, surplus], device=self.trainer.accelerator.device)
        valid_generated, used_carried, surplus = self.trainer.accelerator.reduce(local, reduction="sum").tolist()
        metrics = self.trainer._metrics["train"]
        metrics["dynamic_sampling/rounds"].append(float(len(fresh) - 1))
        metrics["dynamic_sampling/extra_groups"].append(float(extra_groups))
        metrics["dynamic_sampling/batch_valid_fraction"].append(kept / batch_groups)
        metrics["dynamic_sampling/carried_groups"].append(float(used_carried))
        kept_fresh = kept - used_carried
        metrics["dynamic_sampling/discarded_valid_groups"].append(float(valid_generated - kept_fresh - surplus))
