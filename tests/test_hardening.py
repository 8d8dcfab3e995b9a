"""Hostile but realistic inputs (docs/hardening.md): each is refused early with a message that names our setting, or
trains on without poisoning the parameters and shows in the metrics, or stops the run before it reaches them."""

import math
import os
import warnings

import pytest
import torch
from datasets import Dataset

from gvpo_trl import TRAINERS
from gvpo_trl.buffer import BUFFER_STATE_NAME
from gvpo_trl.checkpoints import RUN_FILE
from gvpo_trl.demo.toy import build_dataset, repeat_letter_reward

from .helpers import make_trainer

ALGORITHMS = sorted(TRAINERS)
NAN, INF = float("nan"), float("inf")


def _config(algorithm, **kwargs):
    config_cls, _ = TRAINERS[algorithm]
    return config_cls(output_dir="x", bf16=False, **{"num_generations": 4, "per_device_train_batch_size": 8, **kwargs})


# --- non-finite and out-of-range configuration ----------------------------------------------------------------------

SHARED_NONFINITE = [
    dict(learning_rate=NAN),
    dict(learning_rate=INF),
    dict(weight_decay=INF),
    dict(max_grad_norm=NAN),
    dict(temperature=INF),
    dict(top_p=NAN),
    dict(adam_epsilon=NAN),
    dict(buffer_history_per_group=NAN),
    dict(buffer_history_per_group=INF),
    dict(reward_weights=[NAN]),
    dict(reward_weights=[1.0, -INF]),
    dict(warmup_steps=NAN),
]
OWN_NONFINITE = {
    "gvpo": [dict(gvpo_beta=NAN), dict(gvpo_beta=INF), dict(gvpo_beta=-INF)],
    "gpg": [dict(min_valid_fraction=NAN), dict(importance_weight_cap=NAN), dict(importance_weight_cap=-INF)],
    "gspo": [dict(epsilon=NAN), dict(epsilon_high=INF), dict(beta=NAN)],
}
NONFINITE_CASES = [(a, kw) for a in ALGORITHMS for kw in SHARED_NONFINITE + OWN_NONFINITE[a]]


@pytest.mark.parametrize("algorithm, kwargs", NONFINITE_CASES)
def test_nonfinite_config_values_are_refused_at_construction(algorithm, kwargs):
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{field}=.* is not a finite number.*Set {field} to a finite value"):
        _config(algorithm, **kwargs)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_infinity_is_accepted_where_it_means_no_limit(algorithm):
    assert _config(algorithm, max_grad_norm=INF).max_grad_norm == INF
    if algorithm == "gpg":
        assert _config(algorithm, importance_weight_cap=INF).importance_weight_cap == INF


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_completion_length=0), r"max_completion_length must be >= 1 .*got 0"),
        (dict(max_completion_length=-5), r"max_completion_length must be >= 1 .*got -5"),
        (dict(temperature=0.0), r"temperature=0.0 is not > 0: completions are sampled"),
        (dict(temperature=-1.0), r"temperature=-1.0 is not > 0"),
        (dict(top_p=0.0), r"top_p=0.0 is outside \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 is outside \(0, 1\]"),
    ],
)
def test_out_of_range_generation_settings_name_our_fields(algorithm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(algorithm, **kwargs)


# --- malformed reward-function output -----------------------------------------------------------------------------


def _returning(value_for):
    def bad_reward(prompts, completions, **kwargs):
        return value_for(len(prompts))

    return bad_reward


MALFORMED = [
    (lambda n: 0.5, TypeError, r"0.5 \(float\); it must return a list"),
    (lambda n: "1.0", TypeError, r"'1.0' \(str\)"),
    (lambda n: None, TypeError, r"None \(NoneType\)"),
    (lambda n: {"reward": 1.0}, TypeError, r"\(dict\)"),
    (lambda n: [1.0] * (n - 1), ValueError, r"\d+ values for \d+ completions"),
    (lambda n: [1.0] * (n + 3), ValueError, r"\d+ values for \d+ completions"),
    (lambda n: ["good"] * n, TypeError, r"'good' \(str\) for completion 0; each reward must be a real"),
    (lambda n: [[1.0]] * n, TypeError, r"\[1.0\] \(list\) for completion 0"),
    (lambda n: [1.0] * (n - 1) + [object()], TypeError, r"\(object\) for completion \d+"),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("value_for, error, match", MALFORMED)
def test_malformed_reward_output_names_the_function_before_any_update(tmp_path, algorithm, value_for, error, match):
    trainer = make_trainer(algorithm, tmp_path, reward=_returning(value_for), max_steps=1, num_prompts=8)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(error, match=rf"reward function 'bad_reward' returned .*{match}"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_well_formed_outputs_of_other_types_are_accepted(tmp_path):
    import numpy as np

    def mixed_types(prompts, completions, **kwargs):
        kinds = [np.float32(0.25), torch.tensor(0.5), True, 1, None, 0.75]
        return [kinds[i % len(kinds)] for i in range(len(prompts))]

    trainer = make_trainer("gvpo", tmp_path, reward=mixed_types, max_steps=1, num_prompts=8)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


# --- non-finite rewards ---------------------------------------------------------------------------------------------


def infinite_reward(prompts, completions, **kwargs):
    """+inf for prompts starting with a, -inf with b, NaN with c, the real reward otherwise."""
    special = {"a": INF, "b": -INF, "c": NAN}
    return [special.get(p[0], repeat_letter_reward([p], [c])[0]) for p, c in zip(prompts, completions, strict=True)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_infinite_rewards_count_as_unscorable_warn_once_and_train_on(tmp_path, algorithm):
    trainer = make_trainer(algorithm, tmp_path, reward=infinite_reward, max_steps=4, steps_per_generation=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "returned ±inf" in str(w.message)]
    assert len(ours) == 1  # once per run
    logs = [h for h in trainer.state.log_history if "groups/nonfinite_reward_frac" in h]
    assert logs and max(h["groups/nonfinite_reward_frac"] for h in logs) > 0
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert all(math.isfinite(h["reward"]) for h in logs)  # TRL's reward mean leaves the unscorable rows out
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()


def test_infinite_reward_leaves_the_other_members_centred_rewards_finite(tmp_path):
    trainer = make_trainer("gvpo", tmp_path, reward=infinite_reward, max_steps=1, num_prompts=8)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    with pytest.warns(UserWarning, match="a reward function returned ±inf"):
        out = trainer._generate_and_score_completions(batch)
    assert torch.isfinite(out["advantages"]).all() and out["advantages"].abs().max() <= 1.0
    first = [row["prompt"][0] for row in batch]
    for i, letter in enumerate(first):
        if letter in "abc":
            assert torch.isnan(out["rewards"][i]) and out["advantages"][i] == 0


def test_nonfinite_external_logps_are_refused(tmp_path):
    data = build_dataset(4)
    tokenizer_ids = [[5, 2], [6, 2], [7, 2], [8, 2]]
    data = data.add_column("demo", tokenizer_ids).add_column("lp", [[-0.1, NAN], [-0.1, -0.2], [-1.0, INF], [-1, -1]])
    trainer = make_trainer("gspo", tmp_path, dataset=data, max_steps=1, steps_per_generation=1, shuffle_dataset=False,
                           external_completions_column="demo", external_logps_column="lp")  # fmt: skip
    with pytest.raises(ValueError, match=r"'lp' holds a value that is not a log-probability \(NaN, infinite or > 0\)"):
        trainer.train()


# --- data -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "dataset, match",
    [
        (Dataset.from_dict({"question": ["abc:", "bcd:"]}), r"the train dataset has no 'prompt' column.*'question'"),
        (Dataset.from_dict({"prompt": []}), r"the train dataset is empty"),
        (Dataset.from_dict({"prompt": ["abc:", "", "bcd:"]}), r"row 1 of the train dataset has an empty prompt \(''\)"),
        (Dataset.from_dict({"prompt": ["abc:", "bcd:", "  \n"]}), r"row 2 of the train dataset has an empty prompt"),
        (
            Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": ""}]]}),
            r"row 1 of the train dataset has an empty prompt",
        ),
    ],
    ids=["no-prompt-column", "empty", "empty-string", "blank", "empty-conversation"],
)
def test_bad_datasets_are_refused_at_construction(tmp_path, algorithm, dataset, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(algorithm, tmp_path, dataset=dataset)


def test_bad_eval_dataset_is_refused_at_construction(tmp_path):
    config_cls, trainer_cls = TRAINERS["gvpo"]
    with pytest.raises(ValueError, match=r"row 0 of the eval dataset has an empty prompt"):
        trainer_cls(model=make_trainer("gvpo", tmp_path).model, reward_funcs=repeat_letter_reward,
                    args=config_cls(str(tmp_path), bf16=False, use_cpu=True, report_to=[]),
                    train_dataset=build_dataset(8), eval_dataset=Dataset.from_dict({"prompt": [""]}))  # fmt: skip


def test_empty_prompt_in_a_stream_is_refused_at_its_batch(tmp_path):
    stream = Dataset.from_dict({"prompt": ["abc:", "bcd:", "", "def:"] * 4}).to_iterable_dataset()
    trainer = make_trainer("gvpo", tmp_path, dataset=stream, max_steps=4, steps_per_generation=1)
    with pytest.raises(ValueError, match=r"a batch holds an empty prompt \(''\)"):
        trainer.train()


# --- checkpoints ----------------------------------------------------------------------------------------------------


def remark(checkpoint):
    """Rewrite the completion marker's file sizes to the folder's current ones (a tampering that keeps them)."""
    import json

    from gvpo_trl.checkpoint_integrity import MARKER, checkpoint_files

    marker = json.loads((checkpoint / MARKER).read_text())
    (checkpoint / MARKER).write_text(json.dumps({**marker, "files": checkpoint_files(str(checkpoint))}))


BUFFERED = dict(buffer_history_per_group=2, buffer_selection="uniform", buffer_max_staleness=4, steps_per_generation=2)


def _checkpointed(tmp_path, algorithm="gvpo", **overrides):
    """A run of 2 steps that saves checkpoint-2 (4 prompts recurring, so the buffer fills)."""
    dataset = Dataset.from_dict({"prompt": list(build_dataset(4)["prompt"]) * 8})
    common = dict(max_steps=2, save_strategy="steps", save_steps=2, **BUFFERED, **overrides)
    make_trainer(algorithm, tmp_path, dataset=dataset, **common).train()
    return dataset, common, tmp_path / "checkpoint-2"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-content"])
def test_damaged_buffer_file_names_the_file_and_what_to_do(tmp_path, damage):
    dataset, common, checkpoint = _checkpointed(tmp_path)
    path = checkpoint / BUFFER_STATE_NAME
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(256))
    else:
        torch.save({"version": 1, "buffer": {"samples": "?"}}, path)
    remark(checkpoint)  # sizes as saved: only the content is wrong (the size check is tested in test_hardening_round2)
    resumed = make_trainer("gvpo", tmp_path, dataset=dataset, **{**common, "max_steps": 4})
    with pytest.raises(ValueError, match=rf"mixed-buffer state {path} cannot be read .*Resume from an earlier"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize(
    "algorithm, overrides, differs",
    [
        ("gspo", {}, r"algorithm: checkpoint 'gvpo', now 'gspo'"),
        ("gpg", {"min_valid_fraction": 0.0}, r"algorithm: checkpoint 'gvpo', now 'gpg'"),
        ("gvpo", {"num_generations": 2, "buffer_history_per_group": 1}, r"num_generations: checkpoint 4, now 2"),
        ("gvpo", {"buffer_history_per_group": 1}, r"buffer_history_per_group: checkpoint 2, now 1"),
        ("gvpo", {"buffer_history_per_group": 0}, r"buffer_history_per_group: checkpoint 2, now 0"),
        ("gvpo", {"buffer_selection": "newest"}, r"buffer_selection: checkpoint 'uniform', now 'newest'"),
        ("gvpo", {"buffer_max_drift": 0.2}, r"buffer_max_drift: checkpoint 0.0, now 0.2"),
        ("gvpo", {"buffer_max_reuse": 2}, r"buffer_max_reuse: checkpoint 0, now 2"),
        ("gvpo", {"per_device_train_batch_size": 4}, r"generation_batch_size: checkpoint 16, now 8"),
        ("gvpo", {"reward": "other"}, r"reward_functions: checkpoint \['repeat_letter_reward'\], now \['other_r"),
        ("gvpo", {"reward_weights": [2.0]}, r"reward_weights: checkpoint \[1.0\], now \[2.0\]"),
    ],
)
def test_resume_with_other_settings_is_refused_and_says_what_differs(tmp_path, algorithm, overrides, differs):
    dataset, common, checkpoint = _checkpointed(tmp_path / "run")
    settings = {**common, "max_steps": 4, **overrides}
    if settings.pop("reward", None) == "other":

        def other_reward(prompts, completions, **kwargs):
            return repeat_letter_reward(prompts, completions)

        settings["reward"] = other_reward
    resumed = make_trainer(algorithm, tmp_path / "run", dataset=dataset, **settings)
    before = [p.detach().clone() for p in resumed.model.parameters()]
    with pytest.raises(ValueError, match=rf"refusing to resume from .*checkpoint-2.*{differs}.*start fresh"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(before, resumed.model.parameters(), strict=True))  # nothing loaded


def test_resume_true_checks_the_latest_checkpoint_and_a_foreign_checkpoint_warns(tmp_path):
    dataset, common, checkpoint = _checkpointed(tmp_path)
    with pytest.raises(ValueError, match="buffer_history_per_group: checkpoint 2, now 1"):
        make_trainer("gvpo", tmp_path, dataset=dataset, **{**common, "buffer_history_per_group": 1}).train(
            resume_from_checkpoint=True
        )
    from gvpo_trl.checkpoint_integrity import MARKER

    (checkpoint / RUN_FILE).unlink()  # as written by TRL's own GRPOTrainer, or an older gvpo-trl (neither marks)
    (checkpoint / MARKER).unlink()
    resumed = make_trainer("gvpo", tmp_path, dataset=dataset, **{**common, "max_steps": 3})
    with pytest.warns(UserWarning, match=rf"has no {RUN_FILE}, so gvpo-trl cannot check"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3


# --- a non-finite loss or gradient stops the run --------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nonfinite_loss_stops_the_run_before_the_parameters_change(tmp_path, algorithm):
    trainer = make_trainer(algorithm, tmp_path, max_steps=2, logging_nan_inf_filter=True)
    # NaN logits in the loss's forward only (generation and log-prob passes run without grad and stay finite)
    trainer.model.model.norm.register_forward_hook(lambda m, i, out: out * NAN if torch.is_grad_enabled() else out)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(
        FloatingPointError,
        match=r"the loss is non-finite on 1 of 1 process\(es\) \(this process: nan\) at step 0 .*stopping before",
    ):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert any("nonfinite/loss" in h and math.isnan(h["nonfinite/loss"]) for h in trainer.state.log_history)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # 0: no clipping, the norm is still computed and checked
def test_nonfinite_gradient_stops_the_run_before_the_optimizer_step(tmp_path, max_grad_norm):
    trainer = make_trainer("gvpo", tmp_path, max_steps=2, max_grad_norm=max_grad_norm)
    trainer.model.lm_head.weight.register_hook(lambda grad: grad * INF)  # finite loss, infinite gradient
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(
        FloatingPointError, match=r"the gradient norm is (inf|nan) \(this process: (inf|nan)\) at step 0"
    ):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.distributed
def test_a_nonfinite_loss_on_one_process_stops_every_process(tmp_path):
    import json
    from pathlib import Path

    from .distributed.harness import launch, launch_env

    worker = Path(__file__).with_name("distributed") / "nonfinite_worker.py"
    spec = {"args": {"max_steps": 2, "steps_per_generation": 2, "gradient_accumulation_steps": 2}}
    run = launch("nonfinite-2proc", spec, tmp_path, 2, "cpu_ddp_2proc.yaml", launch_env({"ACCELERATE_USE_CPU": "true"}),
                 timeout=300, script=worker)  # fmt: skip
    ranks = [json.loads((run.out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:  # rank 0's own loss was finite: it stops because rank 1's was not
        assert r["error"] is not None and "the loss is non-finite on 1 of 2 process(es)" in r["error"]
        assert r["unchanged"] and r["step"] == 0
