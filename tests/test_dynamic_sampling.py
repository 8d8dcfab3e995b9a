"""Dynamic sampling (gvpo_trl/dynamic_sampling.py): the pure decisions (targets, round sizes, which groups a batch
keeps, where extra prompts come from), then every trainer on the real TRL stack, with and without the mixed buffer,
on a stream, across 2 processes and through a resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from gvpo_trl import TRAINERS
from gvpo_trl.columns import GROUP_ID, REWARDS
from gvpo_trl.demo.toy import build_dataset, repeat_letter_reward
from gvpo_trl.dynamic_sampling import (
    ExtraPrompts,
    GenerationRound,
    choose_groups,
    group_rows,
    round_size,
    valid_target,
)
from gvpo_trl.groups import zero_variance_groups

from .distributed.harness import launch, launch_env
from .helpers import make_trainer

ALGORITHMS = list(TRAINERS)

# --- decisions (pure) ----------------------------------------------------------------------------------------------


def test_valid_target_is_the_ceiling_of_beta_times_groups():
    assert [valid_target(0.6, 8), valid_target(0.5, 4), valid_target(1.0, 4), valid_target(0.6, 5)] == [5, 2, 4, 3]
    assert valid_target(0.3, 10) == 3  # 0.3 × 10 is 3.0000000000000004 in floats: still 3


@pytest.mark.parametrize(
    "missing, valid_seen, groups_seen, procs, max_groups, expected",
    [
        (1, 4, 8, 1, 8, 2),  # rate (4+1)/(8+2) = 0.5: 2 groups for 1 missing
        (3, 0, 8, 1, 8, 8),  # rate 0.1: 30, capped at a batch
        (1, 4, 8, 2, 8, 2),  # already a multiple of the 2 processes
        (1, 8, 8, 2, 8, 2),  # rate 0.9: 2 groups (1.11 → 2, at least one per process)
        (1, 8, 8, 1, 8, 2),  # 1/0.9 = 1.11 → 2
        (2, 6, 10, 4, 6, 4),  # rate 7/12: 3.43 → 4, a multiple of 4 processes, the cap rounded down to 4
        (0, 4, 8, 1, 8, 0),  # nothing missing: no round
    ],
)
def test_round_size_generates_what_the_missing_groups_need(
    missing, valid_seen, groups_seen, procs, max_groups, expected
):
    assert round_size(missing, valid_seen, groups_seen, procs, max_groups) == expected


def _round(rewards, k=2, offset=0):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    ids = torch.arange(rewards.numel()) // k + offset
    return GenerationRound.of({REWARDS: rewards, GROUP_ID: ids})


def test_group_rows_and_choose_groups_keep_valid_groups_first_then_fill_earliest_first():
    first = _round([1, 1, 0, 1, 2, 2, 0.5, float("nan")])  # groups 0 zero, 1 valid, 2 zero, 3 one valid reward: zero
    assert [rows.tolist() for rows in first.valid] == [[2, 3]]
    assert [rows.tolist() for rows in first.zero] == [[0, 1], [4, 5], [6, 7]]
    extra = _round([0, 1, 3, 3], offset=4)
    chosen = choose_groups([first, extra], 4)
    assert [(r, rows.tolist()) for r, rows in chosen] == [(0, [2, 3]), (1, [0, 1]), (0, [0, 1]), (0, [4, 5])]
    with pytest.raises(RuntimeError, match="lost groups"):
        choose_groups([extra], 3)
    valid, zero = group_rows(torch.tensor([1.0, 1.0]), torch.tensor([7, 7]))
    assert valid == [] and [rows.tolist() for rows in zero] == [[0, 1]]


def test_extra_prompts_depend_on_seed_and_step_and_split_over_processes():
    data = Dataset.from_dict({"prompt": [f"p{i}" for i in range(12)]})
    common = dict(seed=3, k=2, max_rounds=20, max_groups=4)
    one = ExtraPrompts(data, step=5, num_processes=1, process_index=0, **common)
    drawn = [row["prompt"] for row in one.take(4)] + [row["prompt"] for row in one.take(10)]
    assert len(drawn) == 28 and drawn[0] == drawn[1] and drawn[2] != drawn[0]  # k = 2 rows per prompt
    assert sorted(drawn[0:24:2]) == sorted(data["prompt"])  # the first 12 prompts are one permutation, then the next
    again = ExtraPrompts(data, step=5, num_processes=1, process_index=0, **common)  # another process, or a resume
    assert [row["prompt"] for row in again.take(4)] == drawn[:8]
    later = ExtraPrompts(data, step=6, num_processes=1, process_index=0, **common)
    assert [row["prompt"] for row in later.take(4)] != drawn[:8]
    halves = [ExtraPrompts(data, step=5, num_processes=2, process_index=p, **common).take(4) for p in range(2)]
    assert [row["prompt"] for half in halves for row in half] == drawn[:8]  # process p takes its contiguous share


# --- on the real TRL stack -----------------------------------------------------------------------------------------


def half_dead_reward(prompts, completions, **kwargs):
    """Constant for prompts of letters a-d (zero-variance groups), the task's reward for e-h (varied, mostly)."""
    real = repeat_letter_reward(prompts, completions)
    return [0.5 if p[0] in "abcd" else r for p, r in zip(prompts, real, strict=True)]


def _recording(trainer_cls):
    class Recording(trainer_cls):
        """Records, per generation batch, each of its rounds: rows and valid groups (this process)."""

        def _generate_and_score_completions(self, inputs):
            self.batches.append([])
            return super()._generate_and_score_completions(inputs)

        def _score_groups(self, inputs):
            output = super()._score_groups(inputs)
            valid = ~zero_variance_groups(output[REWARDS], output[GROUP_ID])
            self.batches[-1].append((len(inputs), int(torch.unique(output[GROUP_ID][valid]).numel())))
            return output

    Recording.__name__ = trainer_cls.__name__
    return Recording


@pytest.mark.parametrize("buffer", [False, True], ids=["fresh", "buffer"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_trainer_generates_only_what_the_missing_groups_need(tmp_path, algorithm, buffer):
    extra = dict(buffer_history_per_group=1, buffer_max_staleness=8) if buffer else {}
    # without carry-over, so that each round's size follows from the rounds recorded here alone
    trainer = make_trainer(algorithm, tmp_path, cls=_recording(TRAINERS[algorithm][1]), reward=half_dead_reward,
                           num_prompts=32, max_steps=4, per_device_train_batch_size=16, steps_per_generation=1,
                           min_valid_fraction=0.75, learning_rate=1e-3, dynamic_sampling_carry_over=False,
                           **extra)  # fmt: skip
    trainer.batches = []
    trainer.train()
    k, batch_groups = 4, 4
    target = valid_target(0.75, batch_groups)
    batches = trainer.batches
    assert len(batches) == 4
    logs = [h for h in trainer.state.log_history if "dynamic_sampling/rounds" in h]
    extra_rounds = 0
    for batch, log in zip(batches, logs, strict=True):
        kept, valid_seen, generated = min(batch[0][1], batch_groups), batch[0][1], batch_groups
        for rows, valid in batch[1:]:  # each extra round: exactly round_size's number of groups
            assert rows == k * round_size(target - kept, valid_seen, generated, 1, batch_groups)
            valid_seen, generated = valid_seen + valid, generated + rows // k
            kept = min(valid_seen, batch_groups)
        assert kept >= target or len(batch) - 1 == 20
        assert log["dynamic_sampling/rounds"] == len(batch) - 1
        assert log["dynamic_sampling/extra_groups"] == generated - batch_groups
        assert log["dynamic_sampling/batch_valid_fraction"] == kept / batch_groups
        extra_rounds += len(batch) - 1
    assert extra_rounds >= 2  # half the prompts are dead: the threshold needs extra rounds
    assert any(rows < batch_groups * k for batch in batches for rows, _ in batch[1:])  # never a whole batch blindly
    for h in trainer.state.log_history:
        if "loss" in h:
            assert math.isfinite(h["loss"])


def distinct_or_constant_reward(prompts, completions, **kwargs):
    """0.5 for prompts of letters a-d; for e-h a value that differs between almost any two completions."""
    return [0.5 if p[0] in "abcd" else sum((j + 1) * ord(c) for j, c in enumerate(comp)) % 1009 / 1009
            for p, comp in zip(prompts, completions, strict=True)]  # fmt: skip


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_surplus_valid_groups_are_carried_to_the_next_batch_as_off_policy_members(tmp_path, algorithm):
    live = Dataset.from_dict({"prompt": [f"{c}{d}:" for c in "efgh" for d in "abcd"]})  # extra prompts: all valid
    trainer = make_trainer(algorithm, tmp_path, reward=distinct_or_constant_reward, dataset=live,
                           per_device_train_batch_size=16, steps_per_generation=2, min_valid_fraction=1.0)  # fmt: skip
    trainer.model.train()
    k = 4
    first = [{"prompt": p} for p in ["ea:", "fb:", "ac:", "bd:"] for _ in range(k)]  # 2 valid, 2 dead groups
    trainer._generate_and_score_completions(first + first)  # 8 groups: 4 valid, 4 dead; 4 extra groups, all valid
    metrics = trainer._metrics["train"]
    assert metrics["dynamic_sampling/extra_groups"][-1] == 8  # rate (4+1)/(8+2): 8 groups for 4 missing
    carried = trainer.dynamic_sampling._carried
    assert carried is not None and carried["group_id"].numel() == 4 * k  # 12 valid for a batch of 8: 4 carried
    assert carried["is_historical"].all() and (carried["staleness"] == 1).all()
    assert metrics["dynamic_sampling/discarded_valid_groups"][-1] == 0
    behaviour = trainer._generating_policy_logps(
        {key: v for key, v in carried.items() if key not in ("old_per_token_logps", "sampling_per_token_logps")}
    )
    mask = carried["completion_mask"].bool()
    torch.testing.assert_close(carried["behaviour_per_token_logps"][mask], behaviour[mask])  # the generating policy

    with torch.no_grad():  # the policy moves before the next generation batch
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    dead = [{"prompt": p} for p in ["ab:", "bc:", "cd:", "da:"] for _ in range(k)] * 2  # no valid group at all
    out = trainer._generate_and_score_completions(dead)
    assert metrics["dynamic_sampling/carried_groups"][-1] == 4
    assert metrics["dynamic_sampling/extra_groups"][-1] == 8  # 4 missing at rate (0+1)/(8+2), capped at a batch
    rows = out["is_historical"]
    assert int(rows.sum()) == 4 * k and ((out["group_id"][rows] >= 8) & (out["group_id"][rows] < 16)).all()
    assert (out["staleness"][rows] == 1).all() and (out["staleness"][~rows] == 0).all()
    if "old_per_token_logps" in out:  # TRL's rollout log-probs of a carried row: recomputed under the moved policy
        now = trainer._generating_policy_logps(
            {key: v for key, v in out.items() if key not in ("old_per_token_logps", "sampling_per_token_logps")}
        )
        m = out["completion_mask"].bool() & rows.unsqueeze(1)
        torch.testing.assert_close(out["old_per_token_logps"][m], now[m])
        assert not torch.allclose(out["behaviour_per_token_logps"][m], now[m])  # their behaviour policy is the old one
    assert trainer.dynamic_sampling._carried is not None  # this batch's own surplus waits for the next


def stale_constant_reward(prompts, completions, trainer_state=None, **kwargs):
    """0.5 for prompts of letters a-d at step 0, 0.0 afterwards: a group of such a prompt is zero-variance when all
    its members are fresh, and has a variance when it holds a member stored at step 0."""
    value = 0.5 if trainer_state is None or trainer_state.global_step == 0 else 0.0
    real = repeat_letter_reward(prompts, completions)
    return [value if p[0] in "abcd" else r for p, r in zip(prompts, real, strict=True)]


@pytest.mark.parametrize("buffer", [False, True], ids=["fresh", "buffer"])
def test_a_group_made_informative_by_history_needs_no_new_generation(tmp_path, buffer):
    # 8 prompts, each recurring every 2 steps; a-d are dead once fresh, so without history the batch needs extra rounds
    extra = dict(buffer_history_per_group=1, buffer_max_staleness=8) if buffer else {}
    trainer = make_trainer("gvpo", tmp_path, cls=_recording(TRAINERS["gvpo"][1]), reward=stale_constant_reward,
                           num_prompts=8, max_steps=3, per_device_train_batch_size=16, steps_per_generation=1,
                           min_valid_fraction=1.0, max_resample_rounds=2, shuffle_dataset=False,
                           buffer_selection="oldest", **extra)  # fmt: skip
    trainer.batches = []
    trainer.train()
    logs = [h for h in trainer.state.log_history if "dynamic_sampling/rounds" in h]
    assert len(logs) == 3
    # step 2 re-uses the prompts of step 0, whose stored members were rewarded 0.5: with the buffer, every group of a
    # dead prompt holds a member that differs from its fresh ones
    if buffer:
        assert logs[2]["dynamic_sampling/rounds"] == 0 and logs[2]["dynamic_sampling/batch_valid_fraction"] == 1.0
        assert logs[2]["buffer/historical_share"] == 0.25
    else:
        assert logs[2]["dynamic_sampling/rounds"] >= 1


def test_dynamic_sampling_on_a_stream(tmp_path):
    stream = build_dataset(32).to_iterable_dataset()
    trainer = make_trainer("gspo", tmp_path, dataset=stream, reward=half_dead_reward, max_steps=4,
                           per_device_train_batch_size=16, steps_per_generation=1, min_valid_fraction=0.75,
                           max_resample_rounds=3)  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "gspo/loss" in h]
    assert len(logs) == 4 and all(math.isfinite(h["loss"]) for h in logs)
    assert sum(h["dynamic_sampling/rounds"] for h in logs) >= 1
    assert trainer.dynamic_sampling._stream is not None and trainer.dynamic_sampling._stream.position > 0


@pytest.mark.parametrize("algorithm", ["gvpo", "gspo"])
def test_off_by_default_for_gvpo_and_gspo(tmp_path, algorithm):
    trainer = make_trainer(algorithm, tmp_path, reward=half_dead_reward, max_steps=1, steps_per_generation=2)
    assert trainer.args.min_valid_fraction == 0.0
    trainer.train()
    assert not any("dynamic_sampling/rounds" in h for h in trainer.state.log_history)


@pytest.mark.slow
@pytest.mark.parametrize("buffer", [False, True], ids=["fresh", "buffer"])
def test_resume_with_dynamic_sampling_continues_bit_for_bit(tmp_path, buffer):
    extra = dict(buffer_history_per_group=1, buffer_max_staleness=8) if buffer else {}
    # resumed at a generation boundary (step 4 of 8, 2 steps per generation), as the shared resume test does
    common = dict(reward=half_dead_reward, num_prompts=16, max_steps=8, per_device_train_batch_size=8,
                  steps_per_generation=2, min_valid_fraction=0.75, save_strategy="steps", save_steps=4,
                  learning_rate=1e-3, **extra)  # fmt: skip
    full = make_trainer("gvpo", tmp_path / "full", **common)
    full.train()
    make_trainer("gvpo", tmp_path / "half", **common).train()
    resumed = make_trainer("gvpo", tmp_path / "half", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "half" / "checkpoint-4"))

    def history(trainer):
        return [(h["loss"], h.get("dynamic_sampling/rounds")) for h in trainer.state.log_history if "loss" in h]

    assert len(history(full)) == 8 and history(resumed)[4:] == history(full)[4:]
    assert sum(r or 0 for _, r in history(full)) >= 1
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


# --- 2 processes ---------------------------------------------------------------------------------------------------

WORKER = Path(__file__).with_name("distributed") / "dynamic_sampling_worker.py"


@pytest.mark.distributed
@pytest.mark.parametrize("algorithm", ["gvpo", "gpg"])
def test_two_processes_take_the_same_rounds(tmp_path, algorithm):
    prompts = list(build_dataset(32)["prompt"])
    spec = {"algorithm": algorithm, "prompts": prompts,
            "args": dict(max_steps=4, per_device_train_batch_size=8, steps_per_generation=1, min_valid_fraction=0.75,
                         buffer_history_per_group=1, buffer_max_staleness=8, learning_rate=1e-3)}  # fmt: skip
    run = launch(f"dynamic-sampling-{algorithm}", spec, tmp_path, 2, "cpu_ddp_2proc.yaml",
                 launch_env({"ACCELERATE_USE_CPU": "true"}), timeout=600, script=WORKER)  # fmt: skip
    ranks = [json.loads((run.out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    a, b = ranks[0], ranks[1]
    assert [rows for rows, _ in a["rounds"]] == [rows for rows, _ in b["rounds"]]  # the same decisions everywhere
    assert a["logs"] == b["logs"] and len(a["logs"]) == 4
    assert sum(log["dynamic_sampling/rounds"] for log in a["logs"]) >= 1
    for rank in ranks:  # every trained batch holds whole groups of 4 on each process
        assert all(sorted(set(sizes)) == [4] for sizes in rank["group_sizes"])
