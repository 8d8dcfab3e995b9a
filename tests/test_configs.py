"""What every trainer shares, checked for each of ``gvpo_trl.TRAINERS``: the refusals of ``GroupConfig``, the config
type check of ``GroupTrainer``, degenerate batches, and bit-for-bit resume (in the same and in a later epoch)."""

import math

import pytest
import torch
from trl import GRPOConfig

from gvpo_trl import TRAINERS
from gvpo_trl.demo.toy import repeat_letter_reward

from .helpers import flaky_reward, make_trainer, tiny_model_path

ALGORITHMS = sorted(TRAINERS)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_generations=1), r"num_generations \(the group size k\) must be at least 2"),
        (dict(entropy_coef=0.01), r"has no entropy bonus. Set entropy_coef=0"),
        (dict(use_adaptive_entropy=True), r"has no entropy bonus.*use_adaptive_entropy=False"),
        (dict(top_entropy_quantile=0.2), r"Set top_entropy_quantile=1.0"),
        (dict(off_policy_mask_threshold=0.5), r"off_policy_mask_threshold .* Leave it at None"),
        (dict(multi_objective_aggregation="normalize_then_sum"), r"Use 'sum_then_normalize'"),
        (dict(per_device_train_batch_size=6, steps_per_generation=2, num_generations=4), r"cannot span micro-steps"),
        (dict(buffer_history_per_group=4, num_generations=4), r"at most k - 1 = 3"),
        (dict(buffer_rescore=True), r"buffer_rescore=True has no effect"),
    ],
)
def test_shared_refusals(algorithm, kwargs, match):
    config_cls, _ = TRAINERS[algorithm]
    with pytest.raises(ValueError, match=rf"^{config_cls.__name__}: .*{match}"):
        config_cls(output_dir="x", bf16=False, **kwargs)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_trainer_refuses_a_plain_grpo_config(algorithm):
    config_cls, trainer_cls = TRAINERS[algorithm]
    with pytest.raises(TypeError, match=f"{trainer_cls.__name__} needs a {config_cls.__name__}"):
        trainer_cls(model=tiny_model_path(), reward_funcs=repeat_letter_reward, args=GRPOConfig("x", bf16=False))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "num_prompts, max_steps, resume_at",
    [
        (64, 8, 4),
        # 16 prompts, 8 per generation (2 per optimizer step, 4 steps per generation): an epoch is 8 steps. Resuming
        # at step 12 (epoch 2) must replay epoch 2's data order, not epoch 1's.
        (16, 16, 12),
    ],
    ids=["same-epoch", "later-epoch"],
)
def test_resume_from_checkpoint_continues_bit_for_bit(tmp_path, algorithm, num_prompts, max_steps, resume_at):
    common = dict(max_steps=max_steps, steps_per_generation=4, save_strategy="steps", save_steps=resume_at)
    full = make_trainer(algorithm, tmp_path / "full", num_prompts=num_prompts, **common)
    full.train()
    losses_full = [h["loss"] for h in full.state.log_history if "loss" in h]

    make_trainer(algorithm, tmp_path / "half", num_prompts=num_prompts, **common).train()
    resumed = make_trainer(algorithm, tmp_path / "half", num_prompts=num_prompts, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "half" / f"checkpoint-{resume_at}"))
    losses_resumed = [h["loss"] for h in resumed.state.log_history if "loss" in h]

    assert len(losses_full) == len(losses_resumed) == max_steps
    assert full.state.epoch == pytest.approx(max_steps * 2 / num_prompts)  # 2 prompts per step: 0.25 or 2 epochs
    assert any(abs(x) > 0 for x in losses_full[resume_at:])
    assert losses_resumed[resume_at:] == losses_full[resume_at:]  # exactly
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


# metrics each trainer must log finite values for, beside TRL's loss and grad_norm
DEGENERATE_METRICS = {
    "gvpo": ("gvpo/loss", "gvpo/mse", "gvpo/delta_mean"),
    "gpg": ("gpg/loss", "gpg/alpha"),
    "gspo": ("gspo/loss", "gspo/ratio_mean"),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_degenerate_batches_train_without_nan_and_show_in_metrics(tmp_path, algorithm):
    # flaky_reward: zero-variance groups, None and NaN rewards; mask_truncated_completions zeroes the mask of truncated
    # completions, so empty completions reach the loss. GPG: at most 2 extra rounds, so its threshold is often missed.
    extra = {"max_resample_rounds": 2} if algorithm == "gpg" else {}
    trainer = make_trainer(algorithm, tmp_path, reward=flaky_reward, mask_truncated_completions=True, max_steps=6,
                           steps_per_generation=2, num_generations=4, **extra)  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if f"{algorithm}/loss" in h]
    assert len(logs) == 6
    for h in logs:
        for key in ("loss", "grad_norm", *DEGENERATE_METRICS[algorithm]):
            assert h[key] is not None and math.isfinite(h[key]), (key, h)
    generation_logs = [h for h in logs if "groups/zero_variance_frac" in h]  # logged at generation steps
    assert len(generation_logs) == 3  # max_steps 6, steps_per_generation 2
    assert max(h["groups/zero_variance_frac"] for h in generation_logs) >= 0.5
    assert max(h["groups/unscorable_frac"] for h in generation_logs) > 0
    if algorithm == "gpg":
        assert max(h["dynamic_sampling/rounds"] for h in generation_logs) <= 2
        assert (
            min(h["dynamic_sampling/batch_valid_fraction"] for h in generation_logs) < 0.6
        )  # trained on what there was
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()
