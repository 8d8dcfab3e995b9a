"""The mixed buffer on the real TRL stack (gvpo_trl/buffer/mixin.py and members.py): how many completions are
generated, the GVPO loss on a mixed group, external completions, agreement across 2
processes, and save / kill / resume."""

import json
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch

from gvpo_trl import GVPOTrainer
from gvpo_trl.buffer import (
    BUFFER_STATE_NAME,
    HISTORICAL,
    SampleBuffer,
)
from gvpo_trl.demo.toy import build_dataset, repeat_letter_reward

from .distributed.harness import launch, launch_env
from .helpers import cpu_args, make_trainer, tiny_model_path

# --- on the real TRL stack ---------------------------------------------------------------------------------------

K = 4


class ProbeGVPOTrainer(GVPOTrainer):
    """Records, per generation, what the buffer offered and what TRL's generation backend actually generated."""

    def _generate_and_score_completions(self, inputs):
        if self.model.training:
            step, maxs = self.state.global_step, self.args.buffer_max_staleness
            keys = [x["prompt"] for x in inputs[::K]]
            available = [len(self.sample_buffer.candidates(key, step, maxs)) for key in keys]
            self.probe.append({"step": step, "keys": keys, "generated": Counter(), "tokens": 0, "available": available})
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            assert len(self.sample_buffer) <= self.args.buffer_capacity
            assert all(step - s.step <= maxs for s in self.sample_buffer.samples() if s.step < step)
        return out

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        if self.model.training:
            decoded = self.processing_class.batch_decode(prompt_ids)
            self.probe[-1]["generated"].update(decoded)
            self.probe[-1]["tokens"] += sum(len(c) for c in completion_ids)
        return completion_ids, logprobs


_trainer = partial(make_trainer, "gvpo", steps_per_generation=1, num_prompts=4)


def test_only_the_fresh_members_are_generated(tmp_path):
    # 4 prompts, 2 per step; h = 3 of k = 4; capacity 5 and staleness 2 leave some prompts with too little history
    trainer = _trainer(tmp_path, cls=ProbeGVPOTrainer, max_steps=8, buffer_history_per_group=3, buffer_capacity=5,
                       buffer_max_staleness=2, shuffle_dataset=True)  # fmt: skip
    trainer.probe = []
    trainer.train()
    assert len(trainer.probe) == 8
    seen = set()
    for gen in trainer.probe:
        for key, available in zip(gen["keys"], gen["available"], strict=False):
            expected = K - min(3, available)
            assert gen["generated"][key] == expected, (gen, key)
            seen.add(min(available, 3))
    assert 0 in seen and 3 in seen and seen & {1, 2}  # none, too little, and enough history all occurred
    logs = [h for h in trainer.state.log_history if "buffer/generated_tokens" in h]
    assert [h["buffer/generated_tokens"] for h in logs] == [g["tokens"] for g in trainer.probe]
    assert logs[-1]["buffer/generated_tokens_total"] == sum(g["tokens"] for g in trainer.probe)
    shares = [h["buffer/historical_share"] for h in logs]
    assert shares == [(2 * K - sum(g["generated"].values())) / (2 * K) for g in trainer.probe]
    assert shares[0] == 0 and all(h["buffer/mean_staleness"] <= 2 for h in logs if h["buffer/historical_share"])


class DriftProbeGVPOTrainer(GVPOTrainer):
    """Measures each historical member's drift by hand (TRL's θ' log-probs against the stored ones) before the
    buffer does; with ``median_threshold``, sets ``buffer_max_drift`` to the round's median (midway between the two
    middle values) so that half the members are over it."""

    median_threshold = False

    def _finish_mixed_batch(self, rnd, output):
        stored = {s.uid: (s.logps.clone(), s.uses) for s in self.sample_buffer.samples()}
        mask, old = output["completion_mask"], output["old_per_token_logps"]
        drifts = {}
        for i, member in enumerate(rnd.members):
            if member.kind == HISTORICAL:
                n = int(mask[i].sum())
                drifts[member.sample_uid] = (old[i, :n].double() - stored[member.sample_uid][0]).abs().mean().item()
        if self.median_threshold and drifts:
            middle = sorted(drifts.values())[len(drifts) // 2 - 1 : len(drifts) // 2 + 1]
            self.args.buffer_max_drift = sum(middle) / 2
        super()._finish_mixed_batch(rnd, output)
        self.rec.append({"step": rnd.step, "h": rnd.num_historical, "drifts": drifts, "stored": stored,
                         "plan": [uid for p in rnd.plan for uid in p.historical],
                         "after": {s.uid: s.uses for s in self.sample_buffer.samples()}})  # fmt: skip


def test_members_that_drifted_too_far_are_evicted_for_later_groups(tmp_path):
    trainer = _trainer(tmp_path, cls=DriftProbeGVPOTrainer, max_steps=8, steps_per_generation=2,
                       buffer_history_per_group=2, buffer_max_staleness=8, buffer_max_drift=1.0)  # fmt: skip
    trainer.rec, trainer.median_threshold = [], True
    trainer.train()
    rounds = [r for r in trainer.rec if r["drifts"]]
    assert len(rounds) == 3 and all(len(r["drifts"]) == 8 for r in rounds)  # 4 groups x 2 historical, steps 2, 4, 6
    logs = [h for h in trainer.state.log_history if "buffer/mean_drift" in h]
    evicted_total = 0
    for r, log in zip(rounds, logs, strict=True):
        threshold = sum(sorted(r["drifts"].values())[3:5]) / 2
        over = {uid for uid, d in r["drifts"].items() if d > threshold}
        assert len(over) == 4
        assert not over & set(r["after"])  # evicted: no later group gets them
        assert all(r["after"][uid] == r["stored"][uid][1] + 1 for uid in set(r["drifts"]) - over)  # kept, counted
        assert abs(log["buffer/mean_drift"] - sum(r["drifts"].values()) / 8) < 1e-5
        assert log["buffer/drift_evicted"] == len(over)
        evicted_total += len(over)
    assert min(d for r in rounds for d in r["drifts"].values()) > 0  # lr 1e-2 moves the policy
    assert trainer.buffer_stats["drift_evicted"] == evicted_total


def test_reuse_cap_and_history_schedule(tmp_path):
    trainer = _trainer(tmp_path, cls=DriftProbeGVPOTrainer, max_steps=12, steps_per_generation=2,
                       buffer_history_per_group=2, buffer_max_staleness=12, buffer_max_reuse=2,
                       buffer_selection="oldest", buffer_history_schedule="step",
                       buffer_history_horizon=10)  # fmt: skip
    trainer.rec = []
    trainer.train()
    assert [r["h"] for r in trainer.rec] == [2, 2, 2, 2, 2, 0]  # generations at steps 0, 2, ..., 10
    uses = Counter(uid for r in trainer.rec for uid in r["plan"])
    assert max(uses.values()) == 2 and sum(r["plan"] != [] for r in trainer.rec) == 4  # oldest first: reused
    for r in trainer.rec:
        for uid in r["plan"]:
            if r["stored"][uid][1] == 1:  # its second use: evicted
                assert uid not in r["after"]
    logs = [h for h in trainer.state.log_history if "buffer/history_per_group" in h]
    assert [h["buffer/history_per_group"] for h in logs] == [2, 2, 2, 2, 2, 0]
    assert sum(h.get("buffer/reuse_evicted", 0) for h in logs) == trainer.buffer_stats["reuse_evicted"] > 0


class SelectionProbeGVPOTrainer(GVPOTrainer):
    """Records, per mixed generation, each prompt's candidates (uid, step, reward) and the plan the buffer made."""

    def _plan(self, batch, prompts):
        step, maxs = self.state.global_step, self.args.buffer_max_staleness
        keys = list(dict.fromkeys(prompts))
        cands = {k: self.sample_buffer.candidates(k, step, maxs) for k in keys}
        before = {k: [(s.uid, s.step, s.rewards[0]) for s in c] for k, c in cands.items()}
        super()._plan(batch, prompts)
        self.rec.append({"candidates": before, "plan": batch.plan})


def test_contrast_selection_gives_each_group_the_rewards_farthest_from_its_latest_mean(tmp_path):
    trainer = _trainer(tmp_path, cls=SelectionProbeGVPOTrainer, max_steps=10, buffer_history_per_group=2,
                       buffer_max_staleness=10, buffer_selection="contrast")  # fmt: skip
    trainer.rec = []
    trainer.train()
    checked = 0
    for r in trainer.rec:
        for plan in r["plan"]:
            cands = r["candidates"][plan.key]
            if not cands:
                continue
            latest = max(step for _, step, _ in cands)
            mean = sum(x for _, step, x in cands if step == latest) / sum(step == latest for _, step, _ in cands)
            # the oracle: by distance from the latest mean, then newest (step, then uid)
            order = sorted(cands, key=lambda c: (-abs(c[2] - mean), -c[1], -c[0]))
            assert list(plan.historical) == [uid for uid, _, _ in order[: len(plan.historical)]], (plan, cands)
            checked += 1
    assert checked >= 8
    logged = [h["buffer/signal_from_history"] for h in trainer.state.log_history if "buffer/signal_from_history" in h]
    assert len(logged) == sum(any(p.historical for p in r["plan"]) for r in trainer.rec) and max(logged) > 0


def _sequence_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Σ_t log π(y_t | x, y_<t) over completion tokens, by a plain forward pass (independent of TRL's helper)."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double()
    logps = logits[:, prompt_ids.size(1) - 1 : -1].log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1))[..., 0]
    return (logps * completion_mask).sum(1), logps


def _mixed_batch(trainer, calls):
    """Train 2 optimizer steps on one generation of the 4 prompts (every prompt then has 4 stored samples, staleness
    2), then generate the next batch: 2 of each group of 4 from history. Checks what is stored and reused."""
    trainer.train()
    stored = {s.uid: s for s in trainer.sample_buffer.samples()}
    assert len(stored) == 16 and {s.step for s in stored.values()} == {0}
    trainer.model.train()
    calls.clear()
    inputs = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    hist = inputs["is_historical"]
    assert hist.tolist() == [False, False, True, True] * 4 and calls == [8]  # only fresh rows were scored
    assert inputs["staleness"][hist].tolist() == [2] * 8
    mask = inputs["completion_mask"]
    for i in hist.nonzero()[:, 0].tolist():  # stored completion, reward and behaviour log-probs, as they were
        n = int(mask[i].sum())
        ids = inputs["completion_ids"][i, :n].tolist()
        match = [s for s in stored.values() if s.completion_ids == ids and s.key == inputs_prompt(trainer, inputs, i)]
        assert match, i
        assert inputs["rewards"][i].item() == match[0].rewards[0]
        assert torch.equal(inputs["behaviour_per_token_logps"][i, :n], match[0].logps)
    cur, _ = _sequence_logps(trainer.model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], mask)
    old = (inputs["old_per_token_logps"].double() * mask).sum(1)
    behaviour = (inputs["behaviour_per_token_logps"].double() * mask).sum(1)
    assert torch.allclose(old, cur, atol=1e-4)  # θ' / π_old: the pre-update policy, for fresh and historical alike
    assert torch.allclose(behaviour[~hist], old[~hist], atol=1e-5)  # fresh rows: generated by that policy
    assert (behaviour[hist] - old[hist]).abs().min() > 1e-3  # historical rows: generated by an older one

    # move the policy (as an optimizer step within the rollout would), so that π_θ, π_old and π_behaviour all differ
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    trainer.current_gradient_accumulation_steps = 1
    return inputs


def _counting_reward(calls):
    def counting_reward(prompts, completions, **kwargs):
        calls.append(len(completions))
        return repeat_letter_reward(prompts, completions)

    return counting_reward


def test_gvpo_loss_on_a_mixed_group_equals_the_hand_computed_value(tmp_path):
    calls = []
    trainer = _trainer(tmp_path, reward=_counting_reward(calls), max_steps=2, steps_per_generation=2, gvpo_beta=0.5,
                       buffer_history_per_group=0.5, learning_rate=0.05)  # fmt: skip
    inputs = _mixed_batch(trainer, calls)
    hist, mask = inputs["is_historical"], inputs["completion_mask"]
    loss = trainer._compute_loss(trainer.model, inputs).item()
    cur, _ = _sequence_logps(trainer.model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], mask)
    old = (inputs["old_per_token_logps"].double() * mask).sum(1)
    behaviour = (inputs["behaviour_per_token_logps"].double() * mask).sum(1)

    def by_hand(theta_prime):  # Eq. 8, every member unweighted
        beta, total = 0.5, 0.0
        rewards = inputs["rewards"].tolist()
        for g in range(4):
            rows = range(g * K, (g + 1) * K)
            delta = {i: cur[i].item() - theta_prime[i].item() for i in rows}
            mean_delta = sum(delta.values()) / K
            mean_r = sum(rewards[i] for i in rows) / K
            total += sum(0.5 * (beta * (delta[i] - mean_delta) - (rewards[i] - mean_r)) ** 2 for i in rows) / (K - 1)
        return total / 4

    expected = by_hand(old)
    assert abs(loss - expected) < 1e-5 * max(1.0, expected), (loss, expected)
    assert abs(by_hand(torch.where(hist, behaviour, old)) - expected) > 1e-3  # θ' must not be the stored policy


def test_gspo_ratio_of_a_historical_member_uses_its_stored_logps(tmp_path):
    from gvpo_trl import GSPOConfig, GSPOTrainer
    from gvpo_trl.gspo import gspo_loss

    calls = []
    args = cpu_args(
        GSPOConfig,
        tmp_path,
        max_steps=2,
        steps_per_generation=2,
        buffer_history_per_group=0.5,
        learning_rate=0.05,
        epsilon=0.5,
        epsilon_high=0.5,
    )  # a wide clip range: the ratio shows
    trainer = GSPOTrainer(model=tiny_model_path(), reward_funcs=_counting_reward(calls), args=args,
                          train_dataset=build_dataset(4))  # fmt: skip
    inputs = _mixed_batch(trainer, calls)
    hist, mask = inputs["is_historical"], inputs["completion_mask"]
    loss = trainer._compute_loss(trainer.model, inputs).item()
    _, cur_tok = _sequence_logps(trainer.model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                 mask)  # fmt: skip
    old, behaviour = inputs["old_per_token_logps"].double(), inputs["behaviour_per_token_logps"].double()
    advantages = inputs["advantages"].double()

    def gspo(reference):
        return gspo_loss(cur_tok, reference, advantages, mask, epsilon_low=0.5, epsilon_high=0.5)[0].item()

    expected = gspo(torch.where(hist.unsqueeze(1), behaviour, old))  # s_i against the stored behaviour log-probs
    current = gspo(old)  # s_i against the pre-update policy's log-probs of the historical completions
    assert abs(loss - expected) < 1e-5 * max(1.0, abs(expected)), (loss, expected)
    assert abs(current - expected) > 1e-3, (current, expected)


def inputs_prompt(trainer, inputs, row):
    n = int(inputs["prompt_mask"][row].sum())
    return trainer.processing_class.decode(inputs["prompt_ids"][row, -n:].tolist())


def test_external_completions_join_gvpo_groups_and_are_refused_without_logps_by_gspo_and_gpg(tmp_path):
    from gvpo_trl import GPGConfig, GPGTrainer, GSPOConfig, GSPOTrainer

    data = build_dataset(4)
    demos = [p[0] * 8 for p in data["prompt"]]  # a perfect answer
    data = data.add_column("demo", [d if i != 3 else None for i, d in enumerate(demos)])  # the last prompt has none
    trainer = _trainer(tmp_path, cls=ProbeGVPOTrainer, dataset=data, max_steps=2, shuffle_dataset=False,
                       max_completion_length=10, external_completions_column="demo")  # fmt: skip
    trainer.probe = []
    outputs = []
    original = trainer._generate_and_score_completions

    def record(inputs):
        out = original(inputs)
        outputs.append(out)
        return out

    trainer._generate_and_score_completions = record
    trainer.train()
    eos = trainer.processing_class.eos_token_id
    for gen, out in zip(trainer.probe, outputs, strict=False):
        for g, key in enumerate(gen["keys"]):
            has_demo = key != data["prompt"][3]
            assert gen["generated"][key] == K - has_demo
            rows = slice(g * K, (g + 1) * K)
            assert out["is_external"][rows].tolist() == [False] * (K - 1) + [has_demo]
            if has_demo:
                ids = out["completion_ids"][g * K + K - 1][:9].tolist()
                assert ids == trainer.processing_class(text=key[0] * 8)["input_ids"] + [eos]
                assert out["rewards"][g * K + K - 1].item() == 1.0  # scored, and in the group's statistic
                assert out["advantages"][g * K + K - 1].item() > 0
                assert torch.isnan(out["behaviour_per_token_logps"][g * K + K - 1, :9]).all()  # unknown: NaN
    logs = [h for h in trainer.state.log_history if "buffer/external_share" in h]
    assert [h["buffer/external_share"] for h in logs] == [2 / 8, 1 / 8]  # one member of each group with a demo
    assert len(trainer.sample_buffer) == 0  # no history asked for: nothing is stored
    for config_cls, trainer_cls in ((GSPOConfig, GSPOTrainer), (GPGConfig, GPGTrainer)):
        args = cpu_args(config_cls, tmp_path, external_completions_column="demo")
        with pytest.raises(ValueError, match="external_logps_column"):
            trainer_cls(model=tiny_model_path(), reward_funcs=repeat_letter_reward, args=args, train_dataset=data)


# --- agreement across 2 processes ----------------------------------------------------------------------------------

BUFFER_WORKER = Path(__file__).with_name("distributed") / "buffer_worker.py"


@pytest.mark.distributed
def test_two_processes_make_the_same_choices(tmp_path):
    # rank 0 gets prompts a, b; rank 1 gets c, d then e, f: at step 1 only rank 0 has history (so it must generate more)
    spec = {
        "prompts": ["abc:", "bcd:", "cde:", "def:", "abc:", "bcd:", "efg:", "fgh:"],
        "args": dict(
            max_steps=4,
            steps_per_generation=1,
            shuffle_dataset=False,
            buffer_history_per_group=2,
            buffer_selection="uniform",
            buffer_max_staleness=3,
        ),  # fmt: skip
    }
    run = launch("buffer-2proc", spec, tmp_path, 2, "cpu_ddp_2proc.yaml", launch_env({"ACCELERATE_USE_CPU": "true"}),
                 timeout=300, script=BUFFER_WORKER)  # fmt: skip
    ranks = [json.loads((run.out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    a, b = ranks[0]["rec"], ranks[1]["rec"]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=False):
        assert x["plan"] == y["plan"] and x["digest"] == y["digest"] and x["step"] == y["step"]
        assert x["kinds"].count("fresh") == y["kinds"].count("fresh")  # equal shapes for TRL's gathers
    # step 0: no history; step 1: rank 0 could take 4 historical members but generates like rank 1 (equalised);
    # steps 2-3: both ranks have history
    assert [sum(len(p[1]) for p in x["plan"]) for x in a] == [0, 0, 8, 8]
    assert sum(p[3] for p in a[1]["plan"]) == 4
    assert a[2]["hist_ids"] != b[2]["hist_ids"] and len(a[2]["hist_ids"]) == 4  # each rank holds its own groups


# --- save, kill, resume --------------------------------------------------------------------------------------------


def test_save_kill_resume_continues_bit_for_bit(tmp_path):
    from datasets import Dataset
    from transformers import TrainerCallback

    # 4 prompts recurring within one epoch of 64 rows: TRL's RepeatSampler does not restore its shuffle across an
    # epoch boundary on resume (no set_epoch), which would change the data order, buffer or not
    dataset = Dataset.from_dict({"prompt": list(build_dataset(4)["prompt"]) * 16})

    common = dict(max_steps=6, steps_per_generation=2, save_strategy="steps", save_steps=2, gvpo_beta=0.5,
                  buffer_history_per_group=2, buffer_selection="uniform", buffer_max_staleness=4)  # fmt: skip
    killed_dir = tmp_path / "killed"
    spec = {"prompts": list(dataset["prompt"]), "args": common, "kill_at": 4}
    with pytest.raises(
        AssertionError, match=r"launch failed \(exit code -9"
    ):  # the worker killed itself after saving step 4
        launch("buffer-killed", spec, killed_dir, 1, env=launch_env(), timeout=300, script=BUFFER_WORKER)
    killed_dir = killed_dir / "out1"  # the run's output_dir (the launcher's first attempt)

    class Digests(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.by_step = trainer, {}

        def on_step_end(self, args, state, control, **kwargs):
            self.by_step[state.global_step] = self.trainer.sample_buffer.digest()

    full = _trainer(tmp_path / "full", dataset=dataset, **{**common, "save_strategy": "no"})
    digests = Digests(full)
    full.add_callback(digests)
    full.train()
    checkpoint = killed_dir / "checkpoint-4"
    assert (checkpoint / BUFFER_STATE_NAME).exists() and not (killed_dir / "checkpoint-6").exists()

    saved = SampleBuffer(1000)
    saved.load_state_dict(torch.load(checkpoint / BUFFER_STATE_NAME, weights_only=True)["buffer"])
    assert saved.digest() == digests.by_step[4]  # the checkpoint holds the buffer as it was at step 4
    resumed = _trainer(killed_dir, dataset=dataset, **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.sample_buffer.digest() == full.sample_buffer.digest() == digests.by_step[6]
    assert len(full.sample_buffer) > 0
    history = lambda t, key: [h[key] for h in t.state.log_history if key in h and h["step"] > 4]  # noqa: E731
    assert len(history(full, "loss")) == 2
    assert history(resumed, "loss") == history(full, "loss")  # exactly
    assert history(resumed, "buffer/generated_tokens_total") == history(full, "buffer/generated_tokens_total")
    assert max(history(full, "buffer/historical_share")) > 0
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=False):
        assert torch.equal(p, q)


@pytest.mark.parametrize("algorithm", ["gspo", "gpg"])
def test_reward_based_selection_warns_where_importance_weights_cannot_correct_it(tmp_path, algorithm):
    with pytest.warns(UserWarning, match="biased towards the chosen rewards"):
        make_trainer(algorithm, tmp_path, buffer_history_per_group=2, buffer_selection="highest")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*biased towards the chosen rewards")
        make_trainer(algorithm, tmp_path, buffer_history_per_group=2, buffer_selection="newest")
        make_trainer("gvpo", tmp_path, buffer_history_per_group=2, buffer_selection="highest")  # exact for GVPO
