"""GPGTrainer on the real TRL stack (1 process): defaults and refused configs, α = B/(B−M) and the loss of a
constructed micro-batch against hand values, off-policy weights, the β_th resampling loop (re-padding, group ids,
rounds logged), degenerate batches, learning."""

import math
import random
from functools import partial

import pytest
import torch
from datasets import Dataset, IterableDataset

from gvpo_trl import GPGConfig
from gvpo_trl.demo.toy import LETTERS, build_dataset
from gvpo_trl.gpg import gpg_advantages
from gvpo_trl.groups import zero_variance_groups

from .helpers import make_trainer

NAN = float("nan")


_trainer = partial(make_trainer, "gpg", per_device_train_batch_size=16)

# --- configuration -------------------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    args = GPGConfig(output_dir="x", bf16=False, gradient_accumulation_steps=2, per_device_train_batch_size=8)
    assert args.scale_rewards == "none" and args.use_age and args.beta == 0.0
    assert args.min_valid_fraction == 0.6 and args.max_resample_rounds == 20
    assert args.steps_per_generation == 2  # TRL's default: on-policy, one generation per optimizer step
    assert GPGConfig(output_dir="x", bf16=False, scale_rewards=True).scale_rewards == "group"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scale_rewards="batch"), r"scale_rewards='batch' is not supported. Use 'none'"),
        (dict(beta=0.04), r"beta=0.04 must be 0: GPG has no reference model"),
        (dict(min_valid_fraction=1.5), r"min_valid_fraction must be in \[0, 1\]"),
        (dict(min_valid_fraction=-0.1), r"min_valid_fraction must be in \[0, 1\]"),
        (dict(max_resample_rounds=0), r"max_resample_rounds must be >= 1.*min_valid_fraction=0"),
        (dict(importance_weight_cap=0.0), r"importance_weight_cap must be > 0"),
    ],
)
def test_refused_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPGConfig(output_dir="x", bf16=False, **{"per_device_train_batch_size": 8, "num_generations": 4, **kwargs})


def test_resampling_needs_whole_groups_on_each_process(monkeypatch):
    # 2 processes × 6 rows = 12 = 3 groups of 4 (fine for TRL), but a group would span the two processes
    monkeypatch.setattr(GPGConfig, "world_size", property(lambda self: 2))
    common = dict(output_dir="x", bf16=False, per_device_train_batch_size=6, num_generations=4)
    with pytest.raises(
        ValueError,
        match=r"\(per_device_train_batch_size × steps_per_generation = 6 × 1 = 6 rows\) to "
        r"hold whole groups of num_generations=4. .*or set min_valid_fraction=0",
    ):
        GPGConfig(**common)
    assert GPGConfig(**common, min_valid_fraction=0).generation_batch_size == 12  # fine without resampling


def test_resampling_accepts_a_streaming_dataset(tmp_path):
    # extra prompts come from a second pass over the stream (tests/test_trl_parity.py trains on one)
    stream = IterableDataset.from_generator(lambda: iter({"prompt": p} for p in build_dataset(16)["prompt"]))
    trainer = _trainer(tmp_path, dataset=stream, max_steps=1)
    trainer.state.global_step = 0
    rows = trainer.dynamic_sampling.extra_prompts(4).take(4)
    assert len(rows) == 16 and {row["prompt"] for row in rows} <= set(build_dataset(16)["prompt"])


# --- the loss of one micro-step -------------------------------------------------------------------------------------

# 4 groups of 4. Rewards of a group with variance, and its advantages R − R̄ (F_norm = 1) by hand:
VARIED = {
    0: ([1.0, 0.0, 0.0, 0.0], [0.75, -0.25, -0.25, -0.25]),
    1: ([0.5, NAN, 0.0, 1.0], [0.0, 0.0, -0.5, 0.5]),  # an unscorable row: out of the mean, advantage 0
    2: ([0.0, 0.5, 0.25, 0.25], [-0.25, 0.25, 0.0, 0.0]),
    3: ([0.125, 0.125, 0.125, 0.625], [-0.125, -0.125, -0.125, 0.375]),
}
# ... and the same group made zero-variance (advantages all 0)
CONSTANT = {0: [0.0] * 4, 1: [0.5, NAN, 0.5, 0.5], 2: [0.25] * 4, 3: [1.0] * 4}


def _micro_batch(trainer, zero_groups, seed=0):
    tok = trainer.processing_class
    g = torch.Generator().manual_seed(seed)
    enc = tok(["a:", "bcd:", "efgh:", "ab:"] * 4, padding=True, padding_side="left", return_tensors="pt")
    lengths = torch.tensor([7, 3, 1, 7, 5, 2, 7, 4, 6, 7, 0, 3, 7, 2, 5, 6])  # row 10: an empty completion
    letters = torch.tensor(tok.convert_tokens_to_ids(list(LETTERS)))
    completion_mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    completion_ids = letters[torch.randint(0, 8, (16, 7), generator=g)].masked_fill(
        completion_mask == 0, tok.pad_token_id
    )
    rewards = sum((CONSTANT[i] if i in zero_groups else VARIED[i][0] for i in range(4)), [])
    expected_adv = sum(([0.0] * 4 if i in zero_groups else VARIED[i][1] for i in range(4)), [])
    rewards, group_id = torch.tensor(rewards), torch.arange(16) // 4
    return {
        "prompt_ids": enc["input_ids"],
        "prompt_mask": enc["attention_mask"],
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "rewards": rewards,
        "group_id": group_id,
        "advantages": trainer.compute_advantages(rewards, group_id),
        "num_items_in_batch": completion_mask.sum(),
    }, torch.tensor(expected_adv)


def _independent_logps(model, inputs):
    """Per-token log-probs of the completion by a plain forward pass (not TRL's helper)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.float()
    width = inputs["completion_ids"].size(1)
    logps = logits[:, -width - 1 : -1].log_softmax(-1)
    return logps.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize(
    "zero_groups, alpha", [((), 1.0), ((3,), 4 / 3), ((2, 3), 2.0), ((1, 2, 3), 4.0), ((0, 1, 2, 3), 1.0)]
)
def test_alpha_and_loss_of_a_micro_batch_equal_hand_values(tmp_path, zero_groups, alpha):
    trainer = _trainer(tmp_path)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs, expected_adv = _micro_batch(trainer, zero_groups)
    torch.testing.assert_close(inputs["advantages"], expected_adv, rtol=0, atol=1e-7)

    loss = trainer._compute_loss(trainer.model, inputs)
    metrics = trainer._metrics["train"]
    assert metrics["gpg/alpha"][-1] == alpha  # B = 4, M = len(zero_groups); α = 1 when M = B
    assert metrics["gpg/valid_fraction"][-1] == (4 - len(zero_groups)) / 4

    mask = inputs["completion_mask"]
    logps = _independent_logps(trainer.model, inputs)
    seq_logps = (logps * mask).sum(-1)
    expected = alpha * (-(expected_adv * seq_logps).sum() / mask.sum())  # token mean over 72 tokens
    assert mask.sum() == 72
    if len(zero_groups) < 4:
        assert abs(expected) > 1e-2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert metrics["gpg/loss"][-1] == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)

    # without AGE the same batch gives α = 1 and the loss divided by α
    plain = _trainer(tmp_path / "plain", use_age=False)
    plain.model.train()
    plain.current_gradient_accumulation_steps = 2  # and the loss is scaled for gradient accumulation
    assert plain._compute_loss(plain.model, inputs).item() == pytest.approx(
        expected.item() / alpha / 2, rel=1e-5, abs=1e-7
    )
    assert plain._metrics["train"]["gpg/alpha"][-1] == 1.0


def test_std_normalised_advantages(tmp_path):
    trainer = _trainer(tmp_path, scale_rewards="group")
    inputs, _ = _micro_batch(trainer, zero_groups=(3,))
    # group 0 = [1, 0, 0, 0]: std 0.5 → F_norm 0.5001; group 3 constant → exactly 0
    assert inputs["advantages"][0].item() == pytest.approx(0.75 / 0.5001, rel=1e-6)
    assert inputs["advantages"][12:].tolist() == [0.0] * 4


def test_off_policy_rows_get_truncated_importance_weights(tmp_path):
    trainer = _trainer(tmp_path, importance_weight_cap=2.0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs, adv = _micro_batch(trainer, zero_groups=(2, 3))
    logps = _independent_logps(trainer.model, inputs)
    mask = inputs["completion_mask"].float()
    # sequence log-ratio Σ_t (log π_θ − log π_old) per row: log 0.5 on row 0, log 8 on row 2 (capped at 2), 0 elsewhere
    shift = torch.zeros(16)
    shift[0], shift[2] = math.log(0.5), math.log(8.0)
    old = logps - (shift / mask.sum(-1).clamp(min=1))[:, None] * mask
    weights = torch.ones(16)
    weights[0], weights[2] = 0.5, 2.0
    expected = 2.0 * (-(weights * adv * (logps * mask).sum(-1)).sum() / mask.sum())  # α = 2

    loss = trainer._compute_loss(trainer.model, dict(inputs, old_per_token_logps=old))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert trainer._metrics["train"]["gpg/importance_weight_mean"][-1] == pytest.approx(weights.mean().item(), rel=1e-5)

    # a member reused by the mixed buffer is weighted against its STORED behaviour log-probs, the others stay on-policy
    reused = torch.zeros(16, dtype=torch.bool)
    reused[0] = True
    mixed = dict(
        inputs, behaviour_per_token_logps=old, is_historical=reused, is_external=torch.zeros(16, dtype=torch.bool)
    )
    weights[2] = 1.0
    expected = 2.0 * (-(weights * adv * (logps * mask).sum(-1)).sum() / mask.sum())
    assert trainer._compute_loss(trainer.model, mixed).item() == pytest.approx(expected.item(), rel=1e-5)


# --- β_th: resampling until enough groups have a reward variance ----------------------------------------------------

LIVE = "gh"  # 2 of the 8 letters: a quarter of the prompts


def live_or_constant_reward(prompts, completions, **kwargs):
    """Constant 0.5 for prompts starting with a-f (always a zero-variance group); a hash of the completion for g-h
    (four sampled completions practically never tie)."""
    return [
        sum((j + 1) * ord(c) for j, c in enumerate(comp)) % 1009 / 1009 if p[0] in LIVE else 0.5
        for p, comp in zip(prompts, completions, strict=False)
    ]


def _varied_length_dataset(num_prompts=64):
    """Live prompts of 2 to 10 characters, dead ones of 2: each round's prompt width depends on its live prompts."""
    rng = random.Random(0)
    lengths = [i % 9 if LETTERS[i % 8] in LIVE else 0 for i in range(num_prompts)]
    prompts = [
        LETTERS[i % 8] + "".join(rng.choice(LETTERS) for _ in range(lengths[i])) + ":" for i in range(num_prompts)
    ]
    return Dataset.from_dict({"prompt": prompts})


def test_resampling_reaches_the_threshold_with_whole_re_padded_groups(tmp_path):
    dataset = _varied_length_dataset()
    trainer = _trainer(tmp_path, reward=live_or_constant_reward, dataset=dataset, min_valid_fraction=1.0)
    trainer.model.train()
    dead = [row for row in dataset if row["prompt"][0] not in LIVE][:4]
    inputs = [row for row in dead for _ in range(4)]  # the first round has no valid group at all
    out = trainer._generate_and_score_completions(inputs)

    metrics = trainer._metrics["train"]
    rounds = metrics["dynamic_sampling/rounds"][-1]
    assert 1 <= rounds <= 20 and metrics["dynamic_sampling/batch_valid_fraction"][-1] == 1.0
    assert len(metrics["groups/zero_variance_frac"]) == 1 + rounds  # one generation per round
    assert metrics["groups/zero_variance_frac"][0] == 1.0

    ids = out["group_id"]
    assert ids.numel() == 16 and all((ids == g).sum() == 4 for g in ids.unique())  # whole groups
    assert ids.unique().numel() == 4 and ids.min() >= 4  # unique across rounds; none from the dead first round
    assert len({g // 4 for g in ids.tolist()}) >= 2  # round r has ids 4r..4r+3: rows of several rounds were joined
    valid = ~zero_variance_groups(out["rewards"], ids)
    assert valid.all()  # 4 of 4 groups
    torch.testing.assert_close(out["advantages"], gpg_advantages(out["rewards"], ids))
    assert out["num_items_in_batch"].item() == out["completion_mask"].sum().item()

    tok = trainer.processing_class
    widths = set()
    for i in range(16):
        pm, cm = out["prompt_mask"][i], out["completion_mask"][i]
        n, m = int(pm.sum()), int(cm.sum())
        assert pm[-n:].all() and not pm[:-n].any()  # left-padded
        assert cm[:m].all() and not cm[m:].any()  # right-padded
        widths.add(n)
        prompt = tok.decode(out["prompt_ids"][i, -n:])
        completion = tok.decode(out["completion_ids"][i, :m], skip_special_tokens=True)
        # every row still carries its own prompt, completion and reward after re-padding
        assert out["rewards"][i].item() == pytest.approx(live_or_constant_reward([prompt], [completion])[0])
        assert (prompt[0] in LIVE) == bool(valid[i])
    assert len(widths) > 1  # prompts of several lengths were really re-padded


def test_resampling_in_the_training_loop_logs_rounds(tmp_path):
    trainer = _trainer(tmp_path, reward=live_or_constant_reward, dataset=_varied_length_dataset(), max_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "gpg/loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["dynamic_sampling/rounds"] >= 1 and h["dynamic_sampling/batch_valid_fraction"] >= 0.6
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"])


# --- degenerate data, learning -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_seeded_run_raises_the_reward(tmp_path):
    # lr 3e-3: at 1e-2 the policy collapses within ~100 steps on this task (every completion alike, no valid group)
    trainer = _trainer(
        tmp_path, learning_rate=3e-3, max_completion_length=10, max_steps=120, dataset=build_dataset(256)
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "gpg/loss" in h]
    rewards = [h["reward"] for h in logs]
    assert len(rewards) == 120
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert first < 0.06 and last > first + 0.06, rewards
    assert min(h["gpg/alpha"] for h in logs) >= 1.0 and max(h["gpg/alpha"] for h in logs) > 1.0
    assert max(h["dynamic_sampling/rounds"] for h in logs) >= 1
