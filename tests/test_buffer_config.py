"""The mixed-buffer fields (gvpo_trl/buffer/config.py): refused values, and the whole groups each process needs."""

import pytest

from gvpo_trl import GVPOConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(buffer_history_per_group=4), r"at most k - 1 = 3"),
        (dict(buffer_history_per_group=0.1), r"less than one member"),
        (dict(buffer_history_per_group=2, buffer_max_staleness=0), r"buffer_max_staleness must be an integer >= 1"),
        (dict(buffer_history_per_group=2, buffer_selection="fifo"), r"buffer_selection must be one of"),
        (dict(buffer_history_per_group=2, buffer_capacity=0), r"buffer_capacity must be an integer >= 1"),
        (dict(buffer_rescore=True), r"buffer_rescore=True has no effect"),
        (dict(external_logps_column="lp"), r"needs external_completions_column"),
        (dict(buffer_history_per_group=2, buffer_max_drift=-0.1), r"buffer_max_drift must be a number >= 0"),
        (dict(buffer_history_per_group=2, buffer_max_drift=float("inf")), r"buffer_max_drift=inf is not a finite"),
        (dict(buffer_history_per_group=2, buffer_max_reuse=-1), r"buffer_max_reuse must be an integer >= 0"),
        (dict(buffer_history_per_group=2, buffer_max_reuse=1.5), r"buffer_max_reuse must be an integer"),
        (dict(buffer_history_per_group=2, buffer_history_schedule="cosine"), r"buffer_history_schedule must be one"),
        (dict(buffer_history_per_group=2, buffer_history_horizon=0), r"buffer_history_horizon must be a fraction"),
        (dict(buffer_history_per_group=2, buffer_history_horizon=12.5), r"step count and must be a whole number"),
        (dict(buffer_max_drift=0.5), r"buffer_max_drift has no effect with buffer_history_per_group=0"),
        (dict(buffer_max_reuse=1, buffer_history_schedule="step"), r"buffer_max_reuse, buffer_history_schedule has"),
    ],
)
def test_refused_buffer_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GVPOConfig(output_dir="x", bf16=False, **kwargs)


def test_each_process_must_hold_whole_groups():
    # 2 processes × 2 rows = 4 rows per generation pass TRL's check (global batch divisible by k), not ours
    from types import SimpleNamespace

    from gvpo_trl.buffer import check_buffer_config
    from gvpo_trl.config import check_whole_groups_per_process

    args = SimpleNamespace(num_generations=4, per_device_train_batch_size=2, steps_per_generation=1)
    with pytest.raises(ValueError, match=r"2 × 1 = 2 rows\) to hold whole groups of num_generations=4"):
        check_whole_groups_per_process(args, "GVPOConfig", "the mixed buffer", "or turn the buffer off")
    args.steps_per_generation = 2
    check_whole_groups_per_process(args, "GVPOConfig", "the mixed buffer", "or turn the buffer off")
    config = GVPOConfig(output_dir="x", bf16=False, buffer_history_per_group=2)
    assert [what for what, _ in config.whole_group_needs()] == [
        "the mixed buffer (the process that holds a group chooses its historical members)"
    ]
    config.use_vllm = True  # supported: tests/test_vllm_buffer.py
    check_buffer_config(config, "GVPOConfig")
