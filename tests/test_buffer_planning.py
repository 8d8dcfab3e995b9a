"""The choices of a mixed buffer (gvpo_trl/buffer/planning.py), pure functions: how many members come from
history, schedules, selection rules, the plan of a generation batch and its equalisation across processes."""

import random

import pytest
import torch

from gvpo_trl.buffer import (
    equalise_across_processes,
    plan_groups,
    resolve_history_horizon,
    resolve_num_historical,
    scheduled_num_historical,
    select_historical,
    selection_seed,
)

from .helpers import filled_buffer


def test_num_historical_from_a_count_or_a_fraction():
    assert resolve_num_historical(0, 4) == 0
    assert resolve_num_historical(2, 4) == 2
    assert resolve_num_historical(0.5, 4) == 2
    assert resolve_num_historical(0.5, 8) == 4
    assert resolve_num_historical(0.3, 8) == 2  # rounded down
    assert resolve_num_historical(3.0, 4) == 3
    for bad, match in [(4, "at most k - 1 = 3"), (0.1, "less than one member"), (1.5, "whole number"), (-1, ">= 1")]:
        with pytest.raises(ValueError, match=match):
            resolve_num_historical(bad, 4)


def test_history_schedules_and_their_horizon():
    assert [scheduled_num_historical(2, s, "constant", 4) for s in range(6)] == [2] * 6
    assert [scheduled_num_historical(2, s, "step", 4) for s in range(6)] == [2, 2, 2, 2, 0, 0]
    assert [scheduled_num_historical(2, s, "linear", 4) for s in range(6)] == [2, 2, 1, 1, 0, 0]  # ceil(2 (1 - s/4))
    assert [scheduled_num_historical(3, s, "linear", 6) for s in range(7)] == [3, 3, 2, 2, 1, 1, 0]
    assert scheduled_num_historical(0, 0, "linear", 4) == 0
    assert resolve_history_horizon(0.5, 801) == 401 and resolve_history_horizon(1.0, 10) == 10  # a fraction, rounded up
    assert resolve_history_horizon(300, 10) == 300  # a count, whatever max_steps
    for bad, match in [(0, "fraction in"), (2.5, "whole number"), (float("nan"), "fraction in")]:
        with pytest.raises(ValueError, match=match):
            resolve_history_horizon(bad, 10)
    with pytest.raises(ValueError, match="not known"):
        resolve_history_horizon(0.5, -1)
    with pytest.raises(ValueError, match="unknown history schedule"):
        scheduled_num_historical(2, 0, "cosine", 4)


def test_selection_rules_are_deterministic_and_seeded_by_step_and_prompt():
    buf = filled_buffer({"a": [1, 4, 2, 4, 3]})  # uids 0..4
    cands = buf.candidates("a", 5, 10)
    assert [s.uid for s in select_historical(cands, 2, "newest")] == [3, 1]  # step 4 (uid 3, then 1)
    assert [s.uid for s in select_historical(cands, 3, "oldest")] == [0, 2, 4]
    assert select_historical(cands, 0, "newest") == [] and len(select_historical(cands, 9, "newest")) == 5

    def draw(seed, step, key="a"):
        return [s.uid for s in select_historical(cands, 2, "uniform", random.Random(selection_seed(seed, step, key)))]

    assert draw(0, 5) == draw(0, 5)  # same seed, step and prompt: same draw (on any process, after a resume)
    assert len({tuple(draw(0, step)) for step in range(30)}) > 3  # the step changes it
    assert len({tuple(draw(seed, 5)) for seed in range(30)}) > 3  # the run seed changes it
    assert selection_seed(0, 5, "a") != selection_seed(0, 5, "b") != selection_seed(0, 5, "a", occurrence=1)
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_historical(cands, 1, "fifo")


def test_plan_takes_history_when_available_and_generates_the_rest():
    buf = filled_buffer({"a": [1, 1, 2], "b": [2], "c": [0]})  # c is stale at step 3 with max_staleness 2
    plan = plan_groups(["a", "b", "c", "d", "a"], [False, False, False, True, True], buf, k=4, num_historical=2,
                       step=3, max_staleness=2, selection="newest", seed=0)  # fmt: skip
    assert [p.historical for p in plan] == [(2, 1), (3,), (), (), (0,)]  # 2nd "a" gets what the 1st left
    assert [p.num_fresh(4) for p in plan] == [2, 3, 4, 3, 2]  # the external member takes a slot
    assert [p.wanted for p in plan] == [2, 2, 2, 2, 2] and all(p.cut == 0 for p in plan)
    # h + external <= k - 1: a group always keeps a fresh member
    plan = plan_groups(["a"], [True], buf, k=4, num_historical=3, step=3, max_staleness=2, selection="oldest", seed=0)
    assert plan[0].historical == (0, 1) and plan[0].num_fresh(4) == 1
    plan = plan_groups(["c", "b"], [False, False], buf, k=4, num_historical=2, step=3, max_staleness=2,
                       selection="newest", seed=0, num_processes=2)  # fmt: skip
    assert [p.historical for p in plan] == [(), ()] and [p.cut for p in plan] == [0, 1]  # equalised away


def test_equalisation_gives_every_process_the_same_counts_and_never_adds_history():
    # process 0 has history for both groups, process 1 for none: process 0 must generate as much as process 1
    assert equalise_across_processes([2, 2, 0, 0], [False] * 4, k=4, num_processes=2) == ([0, 0, 0, 0], [False] * 4)
    assert equalise_across_processes([3, 1, 1, 1], [False] * 4, k=4, num_processes=2) == ([1, 1, 1, 1], [False] * 4)
    ext = [True, True, False, True]
    assert equalise_across_processes([1, 1, 0, 1], ext, 4, 2) == ([1, 0, 0, 1], [True, False, False, True])
    rng = random.Random(0)
    for _ in range(500):
        k, procs, per = rng.randint(2, 6), rng.randint(1, 4), rng.randint(1, 3)
        ext = [rng.random() < 0.3 for _ in range(procs * per)]
        hist = [rng.randint(0, k - 1 - e) for e in ext]
        new_hist, new_ext = equalise_across_processes(hist, ext, k, procs)
        spans = [range(p * per, (p + 1) * per) for p in range(procs)]
        assert len({sum(k - new_hist[g] - new_ext[g] for g in s) for s in spans}) == 1  # same generated rows
        assert len({sum(new_ext[g] for g in s) for s in spans}) == 1  # same scored rows
        assert all(0 <= n <= o for n, o in zip(new_hist, hist, strict=False)) and all(
            n <= o for n, o in zip(new_ext, ext, strict=False)
        )
        if procs == 1:
            assert (new_hist, new_ext) == (hist, ext)


def _scored_buffer(rows):
    """A buffer of ``(key, step, rewards)`` rows (uids in order)."""
    from gvpo_trl.buffer import SampleBuffer

    buf = SampleBuffer(100)
    for i, (key, step, rewards) in enumerate(rows):
        buf.add(key, [i + 5, 2], f"{key}{i}", list(rewards), torch.tensor([-1.0, -0.5]), step)
    return buf


def test_signal_rules_choose_the_samples_that_give_a_group_reward_variance():
    # all-failing recently (latest step 3: rewards 0, 0), one past success at step 1
    buf = _scored_buffer([("a", 1, [1.0]), ("a", 2, [0.25]), ("a", 3, [0.0]), ("a", 3, [0.0])])
    cands = buf.candidates("a", 4, 10)
    assert [s.uid for s in select_historical(cands, 2, "newest")] == [3, 2]
    assert [s.uid for s in select_historical(cands, 2, "contrast")] == [0, 1]  # |1 - 0| = 1, then |0.25 - 0|
    assert [s.uid for s in select_historical(cands, 2, "highest")] == [0, 1]
    # all-correct recently: contrast brings the past failure, highest does not
    buf = _scored_buffer([("b", 1, [0.0]), ("b", 2, [1.0]), ("b", 3, [1.0]), ("b", 3, [0.5])])
    cands = buf.candidates("b", 4, 10)  # latest mean (1.0 + 0.5) / 2 = 0.75
    assert [s.uid for s in select_historical(cands, 2, "contrast")] == [0, 3]  # |0 - .75| = .75, then .25 (newest)
    assert [s.uid for s in select_historical(cands, 2, "highest")] == [2, 1]  # reward 1.0 twice, newest first
    # no contrast to gain (every candidate equally far from the latest mean): contrast is newest
    buf = _scored_buffer([("c", 1, [0.0]), ("c", 2, [1.0]), ("c", 3, [0.0]), ("c", 3, [1.0])])
    cands = buf.candidates("c", 4, 10)
    assert select_historical(cands, 3, "contrast") == select_historical(cands, 3, "newest")


def test_signal_rules_weigh_reward_functions_as_trl_does():
    from gvpo_trl.buffer.planning import sample_reward

    nan = float("nan")
    buf = _scored_buffer([("a", 1, [1.0, 0.0]), ("a", 2, [0.0, 1.0]), ("a", 3, [0.0, 0.0]), ("a", 3, [1.0, nan])])
    assert sample_reward(buf[3], (0.5, 2.0)) == 0.5  # NaN (a function returned None) counts 0
    assert sample_reward(buf[1]) == 1.0  # unweighted: weights 1
    cands = buf.candidates("a", 4, 10)  # latest step 3: totals [0, w0]; the rule's pick flips with the weights
    assert [s.uid for s in select_historical(cands, 1, "highest", reward_weights=(1.0, 0.0))] == [3]
    assert [s.uid for s in select_historical(cands, 1, "highest", reward_weights=(0.0, 1.0))] == [1]
    plan = plan_groups(["a"], [False], buf, k=4, num_historical=1, step=4, max_staleness=10, selection="highest",
                       seed=0, reward_weights=(0.0, 1.0))  # fmt: skip
    assert plan[0].historical == (1,)


def test_signal_from_history_counts_groups_whose_variance_comes_only_from_reused_members():
    from gvpo_trl.buffer.accounting import signal_from_history
    from gvpo_trl.buffer.planning import GroupPlan

    plan = [GroupPlan("a", (7, 8), False, 2), GroupPlan("b", (9,), True, 1), GroupPlan("c", (), False, 0),
            GroupPlan("d", (1, 2), False, 2)]  # fmt: skip
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0],  # fresh agree, history differs: counted
                            [0.0, 1.0, 1.0, 1.0],  # fresh already differ: not counted
                            [0.0, 0.0, 0.0, 0.0],  # no reused members: not counted
                            [1.0, 1.0, 1.0, 1.0]]).view(-1, 1)  # agree with history too: not counted  # fmt: skip
    assert signal_from_history(plan, 4, rewards, torch.ones(1)) == 0.25
    rewards[4:7] = 0.0  # group b: fresh [0, 0], external 0, historical 1: now counted
    assert signal_from_history(plan, 4, rewards, torch.ones(1)) == 0.5
    rewards[7] = float("nan")  # its historical reward unscorable: left out, the rest agree
    assert signal_from_history(plan, 4, rewards, torch.ones(1)) == 0.25
