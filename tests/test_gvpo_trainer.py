"""GVPOTrainer on the real TRL stack (1 process): refused configs, whole groups per micro-step with TRL's shuffling,
the frozen-reference switch, degenerate batches, learning, and bit-for-bit checkpoint resume."""

from functools import partial

import pytest
import torch

from gvpo_trl import GVPOConfig, GVPOTrainer
from gvpo_trl.groups import sequence_sum
from gvpo_trl.gvpo import gvpo_group_statistics, gvpo_loss

from .helpers import make_trainer


class RecordingGVPOTrainer(GVPOTrainer):
    """Records each micro-step's group ids (a test probe; the loss itself is the real one)."""

    def _compute_loss(self, model, inputs):
        self.seen_groups.append((self._step, self.state.global_step, inputs["group_id"].tolist()))
        return super()._compute_loss(model, inputs)


_trainer = partial(make_trainer, "gvpo")

# --- configuration -------------------------------------------------------------------------------------------------


def test_defaults_are_the_authors():
    args = GVPOConfig(output_dir="x", bf16=False, gradient_accumulation_steps=2, per_device_train_batch_size=8)
    assert args.gvpo_beta == 0.1 and args.num_generations == 4 and args.gvpo_reference == "rollout"
    assert args.scale_rewards == "none" and args.beta == 0.0 and args.learning_rate == 1e-6
    assert args.max_grad_norm == 1.0
    assert args.steps_per_generation == 8  # 4 optimizer steps per rollout


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gvpo_beta=0.0), r"gvpo_beta must be > 0"),
        (dict(gvpo_beta=-0.1), r"gvpo_beta must be > 0"),
        (dict(beta=-0.01), r"beta must not be negative"),
        (dict(beta=0.04), r"beta=0.04 \(TRL's KL coefficient\) must be 0"),
        (dict(gvpo_reference="initial", beta=0.3), r"with gvpo_reference='initial', leave beta at 0"),
        (dict(gvpo_reference="sft"), r"gvpo_reference must be 'rollout' or 'initial'"),
        (dict(scale_rewards="group"), r"never divides by the std"),
        (dict(scale_rewards="batch"), r"never divides by the std"),
        (dict(per_device_train_batch_size=6), r"must be a multiple of num_generations \(4\) when steps_per_gen"),
        (dict(per_device_train_batch_size=3, steps_per_generation=1), r"must be divisible by num_generations"),
    ],
)
def test_refused_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GVPOConfig(output_dir="x", bf16=False, **kwargs)


def test_frozen_reference_mirrors_beta_so_trl_loads_the_reference():
    args = GVPOConfig(output_dir="x", bf16=False, gvpo_reference="initial", gvpo_beta=0.2)
    assert args.beta == 0.2


# --- groups --------------------------------------------------------------------------------------------------------


def test_every_micro_step_holds_whole_groups_with_shuffling_on(tmp_path):
    # 4 micro-steps per generation (2 optimizer steps × 2 accumulation), 2 groups of 4 per micro-step
    trainer = _trainer(
        tmp_path,
        cls=RecordingGVPOTrainer,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        max_steps=4,
        shuffle_dataset=True,
    )
    trainer.seen_groups = []
    trainer.train()
    assert len(trainer.seen_groups) == 8
    for generation in range(2):
        steps = trainer.seen_groups[generation * 4 : (generation + 1) * 4]
        all_ids = []
        for _, _, ids in steps:
            assert len(ids) == 8 and all(ids.count(g) == 4 for g in set(ids)), ids
            all_ids += sorted(set(ids))
        assert sorted(all_ids) == list(range(8))  # each of the 8 groups in exactly one micro-step


# --- the loss wiring -----------------------------------------------------------------------------------------------


def _fixed_inputs(trainer, old_shift=0.0, ref_shift=0.0):
    """A generated batch with θ' log-probs shifted by known amounts from the current policy's."""
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()  # as in the training loop (from_pretrained leaves the model in eval mode)
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._generate_and_score_completions(batch)
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, att, inputs["completion_ids"].size(1)
        )
    g = torch.Generator().manual_seed(3)
    inputs["old_per_token_logps"] = logps + old_shift * torch.rand(logps.shape, generator=g)
    inputs["ref_per_token_logps"] = logps + ref_shift * torch.rand(logps.shape, generator=g)
    return inputs, logps


@pytest.mark.parametrize("reference, key", [("rollout", "old_per_token_logps"), ("initial", "ref_per_token_logps")])
def test_trainer_loss_equals_the_pure_function_and_uses_the_chosen_reference(tmp_path, reference, key):
    trainer = _trainer(tmp_path, gvpo_reference=reference, gvpo_beta=0.5, steps_per_generation=1)
    assert (trainer.ref_model is not None) == (reference == "initial")
    inputs, logps = _fixed_inputs(trainer, old_shift=0.7, ref_shift=-0.4)
    loss = trainer._compute_loss(trainer.model, inputs)
    mask = inputs["completion_mask"]

    def float64_loss(reference_key):
        seq, ref = sequence_sum(logps.double(), mask), sequence_sum(inputs[reference_key].double(), mask)
        statistics = gvpo_group_statistics(seq, ref, inputs["rewards"].double(), inputs["group_id"])
        return gvpo_loss(seq, ref, beta=0.5, **statistics)

    expected = float64_loss(key)
    assert abs(loss.item() - expected.item()) < 1e-5 * max(1.0, expected.item())
    wrong = float64_loss("ref_per_token_logps" if key == "old_per_token_logps" else "old_per_token_logps")
    assert abs(wrong.item() - expected.item()) > 1e-3  # the two references really differ here


def test_loss_is_scaled_for_gradient_accumulation(tmp_path):
    trainer = _trainer(tmp_path, steps_per_generation=1)
    inputs, _ = _fixed_inputs(trainer, old_shift=0.5)
    one = trainer._compute_loss(trainer.model, inputs).item()
    trainer.current_gradient_accumulation_steps = 4
    assert abs(trainer._compute_loss(trainer.model, inputs).item() - one / 4) < 1e-7


# --- degenerate data -----------------------------------------------------------------------------------------------


# --- learning -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_seeded_run_raises_the_reward(tmp_path):
    trainer = _trainer(
        tmp_path,
        per_device_train_batch_size=16,
        max_completion_length=10,
        max_steps=240,
        num_prompts=256,
        learning_rate=3e-3,
        logging_steps=10,
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 24
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.1 and last > first + 0.15, rewards
