"""The learning rate scaled by the fresh share (gvpo_trl/buffer/step_size.py, ``buffer_scale_lr``): the pure share,
the wrapped schedule, and the learning rate each optimizer step of a real run actually used."""

import pytest
import torch
from transformers import TrainerCallback, get_scheduler

from gvpo_trl import GVPOConfig, GVPOTrainer
from gvpo_trl.buffer.planning import GroupPlan
from gvpo_trl.buffer.step_size import fresh_share, scale_schedule

from .helpers import cpu_args, make_trainer


def test_fresh_share_counts_generated_rows_of_all_groups():
    plan = [GroupPlan("a", (1, 2), False, 2), GroupPlan("b", (3,), True, 2), GroupPlan("c", (), False, 2)]
    assert fresh_share(plan, 4) == (2 + 2 + 4) / 12
    assert fresh_share([GroupPlan("a", (), False, 0)], 4) == 1.0 and fresh_share([], 4) == 1.0


def test_scaled_schedule_multiplies_every_factor_and_sets_the_next_step_at_once():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = get_scheduler("linear", optimizer=opt, num_warmup_steps=2, num_training_steps=10)
    scaled = scale_schedule(sched, "T")
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 7 / 8)  # linear: (10 - 3) / (10 - 2)
    scaled.set_scale(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 7 / 8 * 0.5) == sched.get_last_lr()[0]
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 6 / 8 * 0.5)
    state = sched.state_dict()
    assert "lr_lambdas" not in state or state["lr_lambdas"] == [None]  # closures are not saved: resumable
    with pytest.raises(ValueError, match="reduce_lr_on_plateau"):
        scale_schedule(get_scheduler("reduce_lr_on_plateau", optimizer=opt), "T")


class UsedLR(TrainerCallback):
    """The learning rate each optimizer step used (read before the scheduler steps)."""

    def __init__(self):
        self.lrs = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


class ShareProbeGVPOTrainer(GVPOTrainer):
    def _finish_mixed_batch(self, batch, output):
        self.shares.append(fresh_share(batch.plan, self.num_generations))
        super()._finish_mixed_batch(batch, output)


@pytest.mark.parametrize("scale", [False, True])
def test_each_optimizer_step_uses_the_schedule_times_the_fresh_share_of_its_generation(tmp_path, scale):
    trainer = make_trainer("gvpo", tmp_path, cls=ShareProbeGVPOTrainer, num_prompts=4, steps_per_generation=1,
                           max_steps=8, learning_rate=1e-2, lr_scheduler_type="linear", buffer_history_per_group=2,
                           buffer_max_staleness=8, buffer_scale_lr=scale)  # fmt: skip
    trainer.shares, used = [], UsedLR()
    trainer.add_callback(used)
    trainer.train()
    assert trainer.shares[:2] == [1.0, 1.0] and 0.5 in trainer.shares  # no history yet, then 2 of 4 from it
    for step, (lr, share) in enumerate(zip(used.lrs, trainer.shares, strict=True)):
        assert lr == pytest.approx(1e-2 * (8 - step) / 8 * (share if scale else 1.0)), step
    logged = [h["buffer/lr_scale"] for h in trainer.state.log_history if "buffer/lr_scale" in h]
    assert logged == (trainer.shares if scale else [])


def test_scaling_the_rate_needs_history_and_a_lambda_schedule(tmp_path):
    with pytest.raises(ValueError, match="buffer_scale_lr has no effect with buffer_history_per_group=0"):
        cpu_args(GVPOConfig, tmp_path, buffer_scale_lr=True)
    with pytest.raises(ValueError, match="reduce_lr_on_plateau"):
        cpu_args(GVPOConfig, tmp_path, buffer_history_per_group=2, buffer_scale_lr=True,
                 lr_scheduler_type="reduce_lr_on_plateau")  # fmt: skip
