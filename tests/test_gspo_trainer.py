"""GSPOTrainer on the real TRL stack (1 process): defaults and refused configs, equality with TRL 1.16's own
sequence-level GRPOTrainer (loss, gradient, clip metrics), GSPO-token = GSPO, extreme ratios, learning."""

import math
from functools import partial

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from gvpo_trl import GSPOConfig, GSPOTrainer
from gvpo_trl.demo.toy import build_dataset, repeat_letter_reward
from gvpo_trl.gspo import LOG_RATIO_BOUND

from .helpers import cpu_args, make_trainer, tiny_model_path

# --- configuration -------------------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    args = GSPOConfig(output_dir="x", bf16=False, gradient_accumulation_steps=2, per_device_train_batch_size=8)
    assert (args.epsilon, args.epsilon_high, args.beta) == (3e-4, 4e-4, 0.0)
    assert args.importance_sampling_level == "sequence" and args.loss_type == "grpo" and args.scale_rewards == "group"
    assert args.steps_per_generation == 8  # four minibatches per rollout × 2 accumulation steps
    assert args.gspo_token is False
    # an explicit generation size is respected, and epsilon_high=None means "= epsilon" as in TRL
    args = GSPOConfig(
        output_dir="x", bf16=False, per_device_train_batch_size=8, steps_per_generation=1, epsilon_high=None
    )
    assert args.steps_per_generation == 1 and args.epsilon_high == 3e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(importance_sampling_level="token"), r"GSPO's importance ratio is per sequence.*gspo_token=True"),
        (dict(loss_type="dapo"), r"loss_type='dapo'.*Set loss_type='grpo'"),
        (dict(loss_type="luspo"), r"Set loss_type='grpo'"),
        (dict(scale_rewards="none"), r"normalised by the group std. Set scale_rewards='group'"),
        (dict(scale_rewards="batch"), r"Set scale_rewards='group'"),
        (dict(epsilon=0.0), r"need 0 < epsilon < 1 and epsilon_high > 0"),
        (dict(epsilon_high=-1.0), r"need 0 < epsilon < 1 and epsilon_high > 0"),
        (dict(beta=-0.1), r"beta \(the KL coefficient\) must be >= 0"),
        (dict(delta=2.0), r"delta \(two-sided clipping\) is not part of GSPO"),
        (dict(per_device_train_batch_size=6, num_generations=4), r"must be a multiple of num_generations \(4\)"),
    ],
)
def test_refused_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GSPOConfig(output_dir="x", bf16=False, **{"per_device_train_batch_size": 8, **kwargs})


# --- equality with TRL's sequence-level GRPO -----------------------------------------------------------------------

# per-row shift of the mean log-ratio log s_i and the sign of the advantage: inside the clip range [1−3e-4, 1+4e-4],
# clipped on the high side (Â > 0), clipped on the low side (Â < 0), and outside on the side where the min keeps the
# unclipped term (still a gradient)
SHIFTS = [0.0, 1e-4, -2e-4, 3e-3, 0.2, -3e-3, -0.2, 3e-3, -3e-3, 0.0, 1e-4, 5e-2, -5e-2, 0.3, 0.0, -0.1]
SIGNS = [1, -1, 1, 1, 1, -1, -1, -1, 1, -1, 1, 1, -1, -1, 1, 1]


def _batch(trainer, seed=0):
    """A fixed micro-batch of 16 rows: variable prompt lengths (left-padded), variable and one empty completion."""
    tok = trainer.processing_class
    g = torch.Generator().manual_seed(seed)
    prompts = ["a:", "bcd:", "efgh:", "ab:"] * 4
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    lengths = torch.tensor([7, 3, 1, 7, 5, 2, 7, 4, 6, 7, 0, 3, 7, 2, 5, 6])
    width = 7
    letters = torch.tensor(tok.convert_tokens_to_ids(list("abcdefgh")))
    completion_ids = letters[torch.randint(0, 8, (16, width), generator=g)]
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tok.pad_token_id)
    advantages = torch.tensor(SIGNS, dtype=torch.float32) * (0.5 + torch.rand(16, generator=g))
    return {
        "prompt_ids": enc["input_ids"],
        "prompt_mask": enc["attention_mask"],
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "rewards": advantages.clone(),
        "group_id": torch.arange(16) // 4,
        "num_items_in_batch": completion_mask.sum(),
    }


def _current_logps(trainer, inputs):
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, att, ids.size(1) - inputs["prompt_ids"].size(1)
        )
    return logps


def _with_old_logps(trainer, inputs, shifts, seed=1):
    """old = current − (zero-mean per-token noise + a per-row shift): the row's mean log-ratio is exactly the shift."""
    logps = _current_logps(trainer, inputs)
    mask = inputs["completion_mask"].float()
    noise = 0.05 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(seed)) * mask
    noise = noise - (noise.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)) * mask
    inputs = dict(inputs, old_per_token_logps=logps - noise - torch.tensor(shifts)[:, None] * mask)
    return inputs


def _loss_and_grads(trainer, inputs, accumulation=2):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _grpo_and_gspo(tmp_path, beta=0.0, **gspo_kwargs):
    common = dict(per_device_train_batch_size=16, steps_per_generation=1, beta=beta)
    trl = GRPOTrainer(
        model=tiny_model_path(),
        reward_funcs=repeat_letter_reward,
        args=cpu_args(
            GRPOConfig,
            tmp_path / "trl",
            importance_sampling_level="sequence",
            loss_type="grpo",
            epsilon=3e-4,
            epsilon_high=4e-4,
            **common,
        ),
        train_dataset=build_dataset(16),
    )
    ours = GSPOTrainer(
        model=tiny_model_path(),
        reward_funcs=repeat_letter_reward,
        args=cpu_args(GSPOConfig, tmp_path / "ours", **common, **gspo_kwargs),
        train_dataset=build_dataset(16),
    )
    for a, b in zip(trl.model.parameters(), ours.model.parameters(), strict=False):
        assert torch.equal(a, b)  # identical weights
    return trl, ours


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_gradient_and_clip_metrics_equal_trl_sequence_level_grpo(tmp_path, beta):
    trl, ours = _grpo_and_gspo(tmp_path, beta=beta)
    inputs = _with_old_logps(ours, _batch(ours), SHIFTS)
    if beta:
        logps = _current_logps(ours, inputs)
        inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(
            logps.shape, generator=torch.Generator().manual_seed(5)
        )
    loss_trl, grads_trl = _loss_and_grads(trl, inputs)
    loss_ours, grads_ours = _loss_and_grads(ours, inputs)
    assert loss_trl.abs() > 1e-3  # a real value, not 0 = 0
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-7)
    assert grads_ours.keys() == grads_trl.keys() and len(grads_ours) > 10
    for name in grads_trl:
        torch.testing.assert_close(grads_ours[name], grads_trl[name], rtol=1e-4, atol=1e-7, msg=name)
    assert sum(g.abs().sum() for g in grads_ours.values()) > 1e-3
    # the clip fractions mean the same as TRL's (fraction of sequences), and both sides really clip here:
    # high: rows 3, 4, 11 (s > 1+4e-4, Â > 0) → 3/16; low: rows 5, 6, 12 (s < 1−3e-4, Â < 0) → 3/16
    m_trl, m_ours = trl._metrics["train"], ours._metrics["train"]
    assert m_ours["gspo/clip_ratio/high"][-1] == pytest.approx(3 / 16) == m_trl["clip_ratio/high_mean"][-1]
    assert m_ours["gspo/clip_ratio/low"][-1] == pytest.approx(3 / 16) == m_trl["clip_ratio/low_mean"][-1]
    assert m_ours["gspo/clip_ratio/region"][-1] == pytest.approx(6 / 16)
    s = torch.exp(torch.tensor(SHIFTS, dtype=torch.float64))
    s[10] = 1.0  # the empty completion
    assert m_ours["gspo/ratio_mean"][-1] == pytest.approx(s.mean().item(), rel=1e-5)
    assert m_ours["gspo/ratio_std"][-1] == pytest.approx(s.std().item(), rel=1e-4)
    if beta:  # k3 estimate × s_i (TRL's default use_bias_correction_kl), mean over sequences of token means
        logps, ref, mask = _current_logps(ours, inputs), inputs["ref_per_token_logps"], inputs["completion_mask"]
        kl = (torch.exp(ref - logps) - (ref - logps) - 1) * torch.exp(torch.tensor(SHIFTS))[:, None] * mask
        expected = (kl.sum(-1) / mask.sum(-1).clamp(min=1)).mean().item()
        assert expected > 1e-3 and m_ours["gspo/kl"][-1] == pytest.approx(expected, rel=1e-4)


def test_exactly_on_policy_uses_the_detached_current_policy(tmp_path):
    trl, ours = _grpo_and_gspo(tmp_path)
    inputs = _batch(ours)  # no old_per_token_logps, as TRL leaves them out on-policy
    loss_trl, grads_trl = _loss_and_grads(trl, inputs, accumulation=1)
    loss_ours, grads_ours = _loss_and_grads(ours, inputs, accumulation=1)
    # s_i = 1 everywhere: loss = −mean_i Â_i over the non-empty rows (row 10 is empty)
    adv = inputs["advantages"].clone()
    adv[10] = 0
    assert loss_ours.item() == pytest.approx(-adv.mean().item(), rel=1e-5)
    torch.testing.assert_close(loss_ours, loss_trl)
    for name in grads_trl:
        torch.testing.assert_close(grads_ours[name], grads_trl[name], rtol=1e-4, atol=1e-7)
    assert ours._metrics["train"]["gspo/ratio_mean"][-1] == 1.0


def test_reused_members_are_weighed_against_their_stored_logps(tmp_path):
    # the mixed buffer marks reused rows and supplies their behaviour log-probs; the other rows are on-policy. TRL given
    # old_per_token_logps = (stored on reused rows, current elsewhere) must compute the same loss and gradient.
    trl, ours = _grpo_and_gspo(tmp_path)
    inputs = _batch(ours)
    stored = _with_old_logps(ours, inputs, SHIFTS)["old_per_token_logps"]
    reused = torch.tensor([i % 3 == 0 for i in range(16)])
    old = torch.where(reused[:, None], stored, _current_logps(ours, inputs))
    loss_trl, grads_trl = _loss_and_grads(trl, dict(inputs, old_per_token_logps=old))
    mixed = dict(
        inputs, behaviour_per_token_logps=stored, is_historical=reused, is_external=torch.zeros(16, dtype=torch.bool)
    )
    loss_ours, grads_ours = _loss_and_grads(ours, mixed)
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-7)
    for name in grads_trl:
        torch.testing.assert_close(grads_ours[name], grads_trl[name], rtol=1e-4, atol=1e-7, msg=name)
    # reused rows 3 (high), 6 (low), 12 (low) are clipped: 1/16 and 2/16
    assert ours._metrics["train"]["gspo/clip_ratio/high"][-1] == pytest.approx(1 / 16)
    assert ours._metrics["train"]["gspo/clip_ratio/low"][-1] == pytest.approx(2 / 16)


_gspo = partial(make_trainer, "gspo", per_device_train_batch_size=16, num_prompts=16)


def test_gspo_token_equals_gspo_in_value_and_gradient(tmp_path):
    seq, tok = _gspo(tmp_path / "s"), _gspo(tmp_path / "t", gspo_token=True)
    inputs = _with_old_logps(seq, _batch(seq), SHIFTS)
    loss_seq, grads_seq = _loss_and_grads(seq, inputs)
    loss_tok, grads_tok = _loss_and_grads(tok, inputs)
    assert loss_seq.abs() > 1e-3
    torch.testing.assert_close(loss_tok, loss_seq, rtol=1e-5, atol=1e-7)
    for name in grads_seq:
        torch.testing.assert_close(grads_tok[name], grads_seq[name], rtol=1e-4, atol=1e-7, msg=name)
    # GSPO-token counts clipped TOKENS: rows 3, 4, 11 high (7 + 5 + 3 tokens), rows 5, 6, 12 low (2 + 7 + 7 tokens)
    tokens = inputs["completion_mask"].sum().item()
    assert tok._metrics["train"]["gspo/clip_ratio/high"][-1] == pytest.approx(15 / tokens)
    assert tok._metrics["train"]["gspo/clip_ratio/low"][-1] == pytest.approx(16 / tokens)


def test_extreme_log_ratio_gives_no_inf_or_nan(tmp_path):
    ours = _gspo(tmp_path)
    shifts = [1e4 if i % 2 else -1e4 for i in range(16)]
    shifts[3] = 0.0  # one row in range keeps a gradient
    inputs = _with_old_logps(ours, _batch(ours), shifts)
    inputs["old_per_token_logps"][0, :] = float("-inf")  # would be exp(inf) in an unbounded ratio
    loss, grads = _loss_and_grads(ours, inputs, accumulation=1)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum() for g in grads.values()) > 0
    m = ours._metrics["train"]
    assert math.isfinite(m["gspo/ratio_mean"][-1]) and math.isfinite(m["gspo/ratio_std"][-1])
    assert m["gspo/ratio_mean"][-1] > math.exp(LOG_RATIO_BOUND) / 4  # the bound, not inf


def test_vllm_sampling_correction_weights_each_sequence(tmp_path):
    # TRL's `importance_sampling_ratio` (vLLM path) multiplies the per-token loss before the sequence mean
    ours = _gspo(tmp_path)
    inputs = _batch(ours)
    loss, _ = _loss_and_grads(ours, inputs, accumulation=1)
    weights = torch.ones(16, 7)
    weights[0] = 3.0  # row 0 (7 tokens) counts three times
    weights[1, :3] = torch.tensor([0.0, 0.0, 3.0])  # row 1 (3 tokens): sequence mean 1, unchanged
    weighted, _ = _loss_and_grads(ours, dict(inputs, importance_sampling_ratio=weights), accumulation=1)
    expected = loss.item() - 2 * inputs["advantages"][0].item() / 16  # s_i = 1: row 0's term −Â_0/16 three times
    assert weighted.item() == pytest.approx(expected, rel=1e-5)


# --- learning ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_seeded_run_raises_the_reward(tmp_path):
    trainer = GSPOTrainer(
        tiny_model_path(),
        repeat_letter_reward,
        args=cpu_args(
            GSPOConfig, tmp_path, per_device_train_batch_size=16, max_completion_length=10, max_steps=120
        ),  # learning_rate 1e-2 (the best of 3e-3 ... 1e-1 on this task)
        train_dataset=build_dataset(256),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "gspo/loss" in h]
    assert len(logs) == 120 and trainer.args.learning_rate == 1e-2
    rewards = [h["reward"] for h in logs if "reward" in h]  # logged at the 30 generation steps
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.06 and last > first + 0.06, rewards
    # the 2nd-4th minibatches of a rollout are off-policy: their ratios move and many clip
    off_policy = [h for h in logs if "reward" not in h]
    assert max(h["gspo/ratio_std"] for h in off_policy) > 1e-3
    assert max(h["gspo/clip_ratio/region"] for h in off_policy) > 0.2
    assert all(h["gspo/ratio_mean"] == 1.0 for h in logs if "reward" in h)  # 1st minibatch: π_old = π_θ
