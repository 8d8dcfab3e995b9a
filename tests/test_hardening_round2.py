"""Hardening, round 2 (issue 19, docs/hardening.md): checkpoints that survive a crash, settings that would train
nothing or something else in silence, generation settings and data checked up front, environments and mixed image
batches that TRL supports, and non-finite stops that name their cause. Each test fails on the code before it."""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from gvpo_trl import TRAINERS
from gvpo_trl.buffer import BUFFER_STATE_NAME
from gvpo_trl.checkpoint_integrity import MARKER, checkpoint_files
from gvpo_trl.checkpoints import RUN_FILE
from gvpo_trl.demo.toy import build_dataset, repeat_letter_reward

from .helpers import cpu_args, make_trainer
from .test_hardening import remark

ALGORITHMS = sorted(TRAINERS)


def _config(algorithm, **kwargs):
    config_cls, _ = TRAINERS[algorithm]
    return config_cls(output_dir="x", bf16=False, **{"num_generations": 4, "per_device_train_batch_size": 8, **kwargs})


class StepRecorder(TrainerCallback):
    """The optimizer steps a ``train()`` call runs (a resume continues after the checkpoint's step)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def _unchanged(before, trainer):
    return all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


# --- checkpoints and crashes -----------------------------------------------------------------------------------------

RUN = dict(max_steps=4, save_strategy="steps", save_steps=2, steps_per_generation=2)


def _two_checkpoints(tmp_path, **overrides):
    """A 4-step run that saves checkpoint-2 and checkpoint-4 (16 prompts recurring, so a buffer fills)."""
    dataset = Dataset.from_dict({"prompt": list(build_dataset(4)["prompt"]) * 8})
    settings = {**RUN, **overrides}
    make_trainer("gvpo", tmp_path, dataset=dataset, **settings).train()
    return dataset, settings


def _resumed(tmp_path, dataset, settings, **overrides):
    trainer = make_trainer("gvpo", tmp_path, dataset=dataset, **{**settings, "max_steps": 6, **overrides})
    recorder = StepRecorder()
    trainer.add_callback(recorder)
    return trainer, recorder


def test_every_checkpoint_is_marked_complete_last_with_its_files_and_optimizer(tmp_path):
    _two_checkpoints(tmp_path, buffer_history_per_group=2, buffer_selection="uniform")
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        marker = json.loads((folder / MARKER).read_text())
        assert marker["step"] == step and marker["optim"].startswith("adamw_torch") and marker["optimizer"] == "AdamW"
        assert marker["files"] == checkpoint_files(str(folder))  # every file, with its size, written before it
        for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", RUN_FILE, BUFFER_STATE_NAME):
            assert marker["files"][name] == (folder / name).stat().st_size > 0
        assert not (folder / f"{MARKER}.tmp").exists()


# what a process killed during the save of checkpoint-4 leaves behind (files in the order transformers writes them)
CUT_SHORT = {
    "after-the-model": lambda folder: [
        p.unlink() for p in folder.iterdir() if not p.name.startswith(("model", "config", "generation"))
    ],
    "in-the-optimizer": lambda folder: [
        (folder / "optimizer.pt").write_bytes((folder / "optimizer.pt").read_bytes()[:1000]),
        *[(folder / n).unlink() for n in ("scheduler.pt", "trainer_state.json", RUN_FILE, MARKER, "rng_state.pth")],
    ],
}


@pytest.mark.parametrize("cut", CUT_SHORT)
def test_resume_true_skips_a_checkpoint_cut_short_and_says_which_it_takes(tmp_path, cut, caplog):
    dataset, settings = _two_checkpoints(tmp_path)
    CUT_SHORT[cut](tmp_path / "checkpoint-4")
    trainer, recorder = _resumed(tmp_path, dataset, settings)
    with pytest.warns(
        UserWarning,
        match=r"skips checkpoint-4 \(.*checkpoint-4/.*\), and resumes from .*checkpoint-2, "
        r"the newest complete checkpoint",
    ):
        trainer.train(resume_from_checkpoint=True)
    assert recorder.steps == [3, 4, 5, 6]  # continued from step 2, with its optimizer
    assert any("resuming from" in r.getMessage() and r.getMessage().endswith(f"in {tmp_path})") for r in caplog.records)


def test_resume_true_refuses_when_no_checkpoint_is_complete(tmp_path):
    dataset, settings = _two_checkpoints(tmp_path)
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}" / "optimizer.pt").unlink()
    trainer, _ = _resumed(tmp_path, dataset, settings)
    before = _params(trainer)
    with pytest.raises(ValueError, match=r"no checkpoint in .* is complete: .*checkpoint-4/optimizer.pt is missing"):
        trainer.train(resume_from_checkpoint=True)
    assert _unchanged(before, trainer)


def _random_bytes_same_size(path):
    path.write_bytes(os.urandom(path.stat().st_size))


DAMAGE = {  # damage -> (what to do to checkpoint-4, the file the refusal names and what it says)
    "optimizer-missing": (
        lambda f: (f / "optimizer.pt").unlink(),
        r"optimizer.pt is missing \(the checkpoint listed it",
    ),
    "optimizer-missing-unmarked": (
        lambda f: [(f / "optimizer.pt").unlink(), (f / MARKER).unlink()],
        r"optimizer.pt is missing: resuming would restart the optimizer and the "
        r"learning-rate schedule silently",
    ),
    "optimizer-random-bytes": (
        lambda f: _random_bytes_same_size(f / "optimizer.pt"),
        r"optimizer.pt cannot be read \(",
    ),
    "scheduler-random-bytes": (lambda f: _random_bytes_same_size(f / "scheduler.pt"), r"scheduler.pt cannot be read"),
    "trainer-state-corrupted": (
        lambda f: [(f / "trainer_state.json").write_text('{"global_step": 4, "log_hi'), remark(f)],
        r"trainer_state.json cannot be read \(JSONDecodeError",
    ),
    "trainer-state-a-list": (
        lambda f: [(f / "trainer_state.json").write_text("[4]"), remark(f)],
        r"trainer_state.json cannot be read \(ValueError: not a JSON object",
    ),
    "trainer-state-truncated": (
        lambda f: (f / "trainer_state.json").write_text("{}"),
        r"trainer_state.json has 2 bytes, \d+ when it was saved \(truncated",
    ),
    "model-truncated": (lambda f: (f / "model.safetensors").write_bytes(b"\0" * 64), r"model.safetensors has 64 bytes"),
    "marker-garbage": (lambda f: (f / MARKER).write_bytes(os.urandom(64)), rf"{MARKER} cannot be read"),
    "marker-a-list": (lambda f: (f / MARKER).write_text("[]"), rf"{MARKER} cannot be read \(ValueError: not a JSON"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_complete_one(tmp_path, damage):
    dataset, settings = _two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoint-4"
    act, says = DAMAGE[damage]
    act(folder)
    trainer, recorder = _resumed(tmp_path, dataset, settings)
    before = _params(trainer)
    with pytest.raises(
        ValueError,
        match=rf"refusing to resume from {folder}: {folder}/{says}.*resume from "
        rf"{tmp_path / 'checkpoint-2'} \(complete\), or start fresh",
    ):
        trainer.train(resume_from_checkpoint=str(folder))
    assert _unchanged(before, trainer) and recorder.steps == []  # refused before anything was loaded


def test_resuming_with_another_optimizer_is_refused_before_loading(tmp_path):
    dataset, settings = _two_checkpoints(tmp_path)
    trainer, _ = _resumed(tmp_path, dataset, settings, optim="sgd")
    before = _params(trainer)
    with pytest.raises(
        ValueError,
        match=r"optimizer.pt holds the state of optim='(adamw_torch\w*)' \(AdamW\), this "
        r"run uses optim='sgd'; resume with optim='\1'",
    ):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert _unchanged(before, trainer)


def test_another_optimizers_state_without_a_marker_is_refused_at_its_load(tmp_path):
    dataset, settings = _two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-4" / MARKER).unlink()  # an older checkpoint: only the load can tell
    trainer, recorder = _resumed(tmp_path, dataset, settings, optim="sgd")
    with pytest.raises(
        ValueError,
        match=r"checkpoint-4/optimizer.pt / scheduler.pt of .*checkpoint-4 holds the state "
        r"of another optimizer \(its parameter groups lack \[.*'momentum'",
    ):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert recorder.steps == []


class FillDiskAt(TrainerCallback):
    """From optimizer step ``step`` on, no file may grow past ``limit`` bytes (``RLIMIT_FSIZE``: writes fail with
    ``EFBIG``, as on a full disk). The limit is lifted again by the test."""

    def __init__(self, step, limit):
        self.step, self.limit = step, limit

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_disk_that_fills_during_the_save_names_the_folder_and_resume_falls_back(tmp_path):
    dataset = Dataset.from_dict({"prompt": list(build_dataset(4)["prompt"]) * 8})
    trainer = make_trainer("gvpo", tmp_path, dataset=dataset, **RUN)
    # the model file (~0.2 MB) is written, the optimizer state (twice its size) is not
    model_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    trainer.add_callback(FillDiskAt(4, int(model_bytes * 1.5)))
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with pytest.raises(
            OSError,
            match=r"writing the checkpoint .*checkpoint-4 failed \(.*\); the folder is "
            rf"incomplete \(it has no {MARKER}\), so resume_from_checkpoint=True will "
            r"skip it.*Free disk space",
        ):
            trainer.train()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert (tmp_path / "checkpoint-4" / "model.safetensors").exists() and not (
        tmp_path / "checkpoint-4" / MARKER
    ).exists()
    resumed, recorder = _resumed(tmp_path, dataset, RUN)
    with pytest.warns(UserWarning, match=r"skips checkpoint-4 .*resumes from .*checkpoint-2"):
        resumed.train(resume_from_checkpoint=True)
    assert recorder.steps == [3, 4, 5, 6]


RUN_FILE_TAMPERED = {  # content of gvpo_trl_run.json -> what the refusal says
    "a-list": ("[1, 2]", r"a JSON list, not an object of settings"),
    "null": ("null", r"a JSON NoneType, not an object of settings"),
    "deeply-nested": ("[" * 100_000 + "]" * 100_000, r"RecursionError|more than a run identity holds"),
    "nested-value": ('{"algorithm": {"a": [1]}}', r"the setting 'algorithm' holds a dict of nested values"),
    "megabytes": ('{"algorithm": "' + "x" * 5_000_000 + '"}', r"5000017 bytes, more than a run identity holds"),
    "not-json": ("{algorithm: gvpo", r"JSONDecodeError"),
}


@pytest.mark.parametrize("tampered", RUN_FILE_TAMPERED)
def test_a_tampered_run_identity_is_refused_with_a_bounded_message(tmp_path, tampered):
    dataset, settings = _two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoint-4"
    content, says = RUN_FILE_TAMPERED[tampered]
    (folder / RUN_FILE).write_text(content)
    remark(folder)  # the marker agrees: only the content is wrong
    trainer, recorder = _resumed(tmp_path, dataset, settings)
    with pytest.raises(
        ValueError, match=rf"cannot read {folder / RUN_FILE} \(.*({says}).*the checkpoint is damaged"
    ) as error:
        trainer.train(resume_from_checkpoint=str(folder))
    assert len(str(error.value)) < 700 and recorder.steps == []


def test_a_long_setting_in_the_run_identity_gives_a_bounded_difference(tmp_path):
    dataset, settings = _two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoint-4"
    identity = json.loads((folder / RUN_FILE).read_text())
    (folder / RUN_FILE).write_text(json.dumps({**identity, "algorithm": "y" * 60_000}))
    remark(folder)
    trainer, _ = _resumed(tmp_path, dataset, settings)
    with pytest.raises(ValueError, match=r"algorithm: checkpoint 'yyy+\.\.\., now 'gvpo'") as error:
        trainer.train(resume_from_checkpoint=str(folder))
    assert len(str(error.value)) < 1000


BUFFERED = dict(buffer_history_per_group=2, buffer_selection="uniform", buffer_max_staleness=4)

BUFFER_TAMPERED = {  # what is done to the first stored sample -> what the refusal says
    "id-beyond-vocab": (
        lambda s: s["completion_ids"].__setitem__(0, 10_000),
        r"sample 0 has token id\(s\) \[10000\] "
        r"outside the vocabulary \[0, \d+\)",
    ),
    "negative-id": (lambda s: s["completion_ids"].__setitem__(0, -3), r"token id\(s\) \[-3\] outside the vocabulary"),
    "nan-logps": (lambda s: s["logps"].__setitem__(0, float("nan")), r"sample 0 has behaviour log-probs that are NaN"),
    "positive-logps": (lambda s: s["logps"].fill_(2.0), r"log-probs that are NaN, infinite or > 0"),
    "logps-length": (lambda s: s.__setitem__("logps", s["logps"][:1]), r"one value per token"),
    "infinite-reward": (lambda s: s.__setitem__("rewards", [float("inf")]), r"a reward that is not a finite number"),
    "rewards-count": (lambda s: s.__setitem__("rewards", [0.0, 1.0]), r"one reward per reward function \(1\)"),
    "no-ids": (lambda s: s.__setitem__("completion_ids", []), r"not a non-empty list of token ids"),
    "uid-negative": (lambda s: s.__setitem__("uid", -1), r"uids must be distinct integers"),
}


@pytest.mark.parametrize("tampered", BUFFER_TAMPERED)
def test_a_buffer_state_with_impossible_samples_is_refused_naming_the_file(tmp_path, tampered):
    dataset, settings = _two_checkpoints(tmp_path, **BUFFERED)
    folder = tmp_path / "checkpoint-4"
    path = folder / BUFFER_STATE_NAME
    state = torch.load(path, weights_only=True)
    BUFFER_TAMPERED[tampered][0](state["buffer"]["samples"][0])
    torch.save(state, path)
    remark(folder)
    trainer, recorder = _resumed(tmp_path, dataset, settings)
    with pytest.raises(
        ValueError,
        match=rf"mixed-buffer state {path} cannot be read \(ValueError: .*"
        rf"{BUFFER_TAMPERED[tampered][1]}.*Resume from an earlier checkpoint",
    ):
        trainer.train(resume_from_checkpoint=str(folder))
    assert recorder.steps == []


# --- settings that train nothing, or something else, in silence -----------------------------------------------------

SILENT_SETTINGS = [
    (dict(num_iterations=0), r"num_iterations must be an integer >= 1 .*0 trains nothing\), got 0"),
    (dict(num_iterations=-2), r"num_iterations must be an integer >= 1"),
    (dict(max_steps=0), r"max_steps=0 is not a step count: transformers would train one step for 0"),
    (dict(max_steps=-7), r"max_steps=-7 is not a step count"),
    (dict(num_train_epochs=0), r"num_train_epochs=0 with max_steps=-1 trains nothing"),
    (dict(save_strategy="steps", save_steps=0), r"save_steps=0 with save_strategy='steps' would never act on a step"),
    (dict(save_strategy="steps", save_steps=-1), r"save_steps=-1 with save_strategy='steps'"),
    (dict(logging_steps=0), r"logging_steps=0 with logging_strategy='steps'"),
    (dict(eval_strategy="steps", eval_steps=0), r"eval_steps=0 with eval_strategy='steps'"),
    (dict(top_k=1), r"top_k=1 keeps only the most likely token \(greedy\)"),
    (dict(generation_kwargs={"do_sample": False}), r"generation_kwargs\['do_sample'\]=False decodes greedily"),
    (dict(generation_kwargs={"top_k": 1}), r"generation_kwargs\['top_k'\]=1 keeps only the most likely token"),
    (dict(min_p=1.0), r"min_p=1.0 is outside \[0, 1\) .*1 is greedy"),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kwargs, match", SILENT_SETTINGS)
def test_settings_that_would_train_nothing_are_refused_at_construction(algorithm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(algorithm, **kwargs)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("num_prompts", [1, 3])
def test_a_dataset_smaller_than_one_generation_batch_is_refused(tmp_path, algorithm, num_prompts):
    # 8 rows per micro-step, groups of 4, 2 micro-steps per generation: 16 rows, 4 distinct prompts
    with pytest.raises(
        ValueError,
        match=rf"the train dataset has {num_prompts} prompt\(s\), but one generation batch "
        r"draws 4 distinct prompts .*would train 0 steps",
    ):
        make_trainer(algorithm, tmp_path, num_prompts=num_prompts, steps_per_generation=2)


def test_a_dataset_of_exactly_one_generation_batch_trains(tmp_path):
    trainer = make_trainer("gvpo", tmp_path, num_prompts=4, steps_per_generation=2, max_steps=2)
    recorder = StepRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.steps == [1, 2]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_near_greedy_sampling_warns_once_and_shows_identical_groups(tmp_path, algorithm):
    trainer = make_trainer(algorithm, tmp_path, temperature=1e-4, max_steps=2, steps_per_generation=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "hold identical completions" in str(w.message)]
    assert len(ours) == 1 and "temperature=0.0001" in str(ours[0].message)
    logged = [h["groups/identical_frac"] for h in trainer.state.log_history if "groups/identical_frac" in h]
    assert logged and all(v == 1.0 for v in logged)


def test_sampled_groups_are_not_flagged_identical(tmp_path):
    trainer = make_trainer("gvpo", tmp_path, max_steps=2, steps_per_generation=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "hold identical completions" in str(w.message)]
    logged = [h["groups/identical_frac"] for h in trainer.state.log_history if "groups/identical_frac" in h]
    assert logged and all(v < 1.0 for v in logged)


def test_identical_groups_compares_whole_completions_under_the_mask():
    from gvpo_trl.generation_checks import identical_groups

    ids = torch.tensor([[5, 6, 0], [5, 6, 9], [5, 6, 0], [5, 7, 0], [3, 0, 0], [3, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]])
    # group 0: rows 0, 1 (same under the mask); group 1: rows 2, 3 (differ in token 2); group 2: rows 4, 5
    assert identical_groups(ids, mask, torch.tensor([0, 0, 1, 1, 2, 2])).tolist() == [True, False, True]
    mask[1, 2] = 1  # row 1 is one token longer
    assert identical_groups(ids, mask, torch.tensor([0, 0, 1, 1, 2, 2])).tolist() == [False, False, True]


# --- generation settings, checked up front ---------------------------------------------------------------------------

GENERATION_SETTINGS = [
    (dict(generation_kwargs={"temperature": 0.0}), r"generation_kwargs\['temperature'\]=0.0 is not > 0"),
    (dict(generation_kwargs={"temperature": -0.5}), r"generation_kwargs\['temperature'\]=-0.5 is not > 0"),
    (dict(generation_kwargs='{"temperature": 0}'), r"generation_kwargs\['temperature'\]=0 is not > 0"),
    (
        dict(generation_kwargs={"num_return_sequences": 2}),
        r"generation_kwargs\['num_return_sequences'\]=2 would "
        r"return several completions per row.*set num_generations",
    ),
    (dict(top_k=-1), r"top_k=-1 is not an integer >= 0 .*Set top_k=0 to turn top-k filtering off"),
    (dict(generation_kwargs={"top_k": -1}), r"generation_kwargs\['top_k'\]=-1 is not an integer >= 0"),
    (dict(generation_kwargs={"top_k": 2.5}), r"generation_kwargs\['top_k'\]=2.5 is not an integer >= 0"),
    (dict(repetition_penalty=0.0), r"repetition_penalty=0.0 is not a finite number > 0"),
    (dict(generation_kwargs={"repetition_penalty": -1.0}), r"generation_kwargs\['repetition_penalty'\]=-1.0 is not"),
    (dict(min_p=2.0), r"min_p=2.0 is outside \[0, 1\)"),
    (dict(generation_kwargs={"min_p": -0.1}), r"generation_kwargs\['min_p'\]=-0.1 is outside \[0, 1\)"),
    (dict(generation_kwargs={"top_p": 0.0}), r"generation_kwargs\['top_p'\]=0.0 is outside \(0, 1\]"),
    (dict(generation_kwargs={"max_new_tokens": 0}), r"generation_kwargs\['max_new_tokens'\]=0 is not an integer >= 1"),
    (dict(steps_per_generation=0), r"steps_per_generation must be an integer >= 1 .*got 0"),
    (dict(steps_per_generation=-2), r"steps_per_generation must be an integer >= 1 .*got -2"),
    (dict(gradient_accumulation_steps=0), r"gradient_accumulation_steps must be an integer >= 1 .*got 0"),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kwargs, match", GENERATION_SETTINGS)
def test_generation_settings_are_checked_at_construction(algorithm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(algorithm, **kwargs)


def test_valid_generation_kwargs_are_accepted():
    config = _config("gvpo", generation_kwargs={"temperature": 0.7, "top_k": 50, "min_p": 0.05}, top_k=0)
    assert config.generation_kwargs["top_k"] == 50


def _rollout_returning(completions):
    """A ``rollout_func`` (TRL's custom generation hook) whose row i completes with ``completions[i % len]``."""

    def rollout(prompts, trainer):
        prompt_ids = trainer.processing_class(text=prompts)["input_ids"]
        ids = [list(completions[i % len(completions)]) for i in range(len(prompts))]
        return {"prompt_ids": prompt_ids, "completion_ids": ids, "logprobs": [[-1.0] * len(c) for c in ids]}

    return rollout


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "completions, match",
    [
        ([[5, 6, 2], []], r"rollout_func returned a completion of zero tokens \(row 1\).*End each completion with"),
        ([[5, 2], [7, 10_000]], r"rollout_func returned token id\(s\) \[10000\] that are not ids of the vocabulary"),
        ([[5, 2], [-1, 2]], r"rollout_func returned token id\(s\) \[-1\]"),
    ],
    ids=["zero-tokens", "beyond-vocab", "negative"],
)
def test_a_rollout_funcs_impossible_completions_are_refused(tmp_path, monkeypatch, algorithm, completions, match):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    config_cls, trainer_cls = TRAINERS[algorithm]
    trainer = trainer_cls(
        model=make_trainer(algorithm, tmp_path).model,
        reward_funcs=repeat_letter_reward,
        args=cpu_args(config_cls, tmp_path, max_steps=1),
        train_dataset=build_dataset(16),
        rollout_func=_rollout_returning(completions),
    )
    before = _params(trainer)
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert _unchanged(before, trainer)


def test_a_rollout_func_with_real_completions_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    config_cls, trainer_cls = TRAINERS["gvpo"]
    trainer = trainer_cls(
        model=make_trainer("gvpo", tmp_path).model,
        reward_funcs=repeat_letter_reward,
        args=cpu_args(config_cls, tmp_path, max_steps=2),
        train_dataset=build_dataset(16),
        rollout_func=_rollout_returning([[4, 4, 2], [5, 2], [4, 2], [6, 7, 8, 2]]),
    )
    trainer.train()
    assert len([h for h in trainer.state.log_history if "gvpo/loss" in h]) == 2


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny GPT-2 (learned position embeddings: 16 positions) with the toy tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gvpo_trl.demo.toy import build_tokenizer

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = build_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=16,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _gpt2_trainer(path, tmp_path, algorithm="gvpo", dataset=None, **overrides):
    config_cls, trainer_cls = TRAINERS[algorithm]
    return trainer_cls(
        model=path,
        reward_funcs=repeat_letter_reward,
        train_dataset=dataset or build_dataset(16),
        args=cpu_args(config_cls, tmp_path, **{"max_steps": 1, **overrides}),
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_completions_longer_than_the_models_positions_are_refused_before_training(tiny_gpt2, tmp_path, algorithm):
    trainer = _gpt2_trainer(tiny_gpt2, tmp_path, algorithm, max_completion_length=16)
    before = _params(trainer)
    with pytest.raises(
        ValueError,
        match=r"max_completion_length=16 does not fit the model, which embeds at most 16 "
        r"positions .*Set max_completion_length below 16",
    ):
        trainer.train()
    assert _unchanged(before, trainer)


def test_a_prompt_that_leaves_no_room_for_the_completion_is_refused_at_its_batch(tiny_gpt2, tmp_path):
    prompts = list(build_dataset(16)["prompt"])
    prompts[3] = "abcdefghijkl:"  # 13 tokens + 8 completion tokens > 16 positions
    trainer = _gpt2_trainer(tiny_gpt2, tmp_path, dataset=Dataset.from_dict({"prompt": prompts}), shuffle_dataset=False)
    with pytest.raises(
        ValueError,
        match=r"a prompt of 13 tokens \(row \d+ of this batch\) plus max_completion_length=8"
        r" exceeds the model's 16 positions. Shorten or filter such prompts \(at most "
        r"8 tokens\)",
    ):
        trainer.train()


def test_prompts_that_fit_the_model_train(tiny_gpt2, tmp_path):
    trainer = _gpt2_trainer(tiny_gpt2, tmp_path, max_steps=2)
    trainer.train()
    assert len([h for h in trainer.state.log_history if "gvpo/loss" in h]) == 2


# --- data the tokenizer or the reward call meets -------------------------------------------------------------------

MALFORMED_PROMPTS = {
    "ints": ([1, 2, 3, 4], r"a malformed prompt \(\d\): a int, not a string or a conversation"),
    "floats": ([0.5, 1.5, 2.5, 3.5], r"a malformed prompt \(\d.5\): a float"),
    "bytes": ([b"abc:", b"bcd:"], r"a malformed prompt \(b'abc:'\): a bytes"),
    "single-message": (
        [{"role": "user", "content": "abc:"}] * 2,
        r"a single message \(a dict\): a conversation is a "
        r"list of messages",
    ),
    "no-role": ([[{"content": "abc:"}]] * 2, r"message 0 has no 'role'"),
    "nested-lists": ([[[{"role": "user", "content": "abc:"}]]] * 2, r"a list of lists \(message 0 is a list\)"),
    "strings-in-a-list": ([["abc:", "bcd:"]] * 2, r"message 0 is a str, not a dict with 'role' and 'content'"),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", MALFORMED_PROMPTS)
def test_prompts_that_are_not_text_or_a_conversation_are_refused_at_construction(tmp_path, algorithm, case):
    prompts, says = MALFORMED_PROMPTS[case]
    with pytest.raises(
        ValueError, match=rf"row 0 of the train dataset has .*{says}.*must be a string or a conversation"
    ):
        make_trainer(algorithm, tmp_path, dataset=Dataset.from_dict({"prompt": prompts}))


@pytest.mark.parametrize("case", ["ints", "no-role", "nested-lists"])
def test_malformed_prompts_in_a_stream_are_refused_at_their_batch(tmp_path, case):
    prompts, says = MALFORMED_PROMPTS[case]
    stream = Dataset.from_dict({"prompt": prompts * 8}).to_iterable_dataset()
    trainer = make_trainer("gvpo", tmp_path, dataset=stream, max_steps=1, steps_per_generation=1)
    with pytest.raises(ValueError, match=rf"a batch holds .*{says}"):
        trainer.train()


def test_content_blocks_count_by_their_text(tmp_path):
    def blocks(text):
        return [{"role": "user", "content": [{"type": "text", "text": text}]}]

    with pytest.raises(ValueError, match=r"row 1 of the train dataset has an empty prompt"):  # blank text blocks
        make_trainer("gvpo", tmp_path, dataset=Dataset.from_dict({"prompt": [blocks("abc:"), blocks("  ")]}))
    from gvpo_trl.validation import is_empty_prompt, prompt_problem

    assert prompt_problem(blocks("abc:")) is None and prompt_problem("abc:") is None
    assert prompt_problem([{"role": "user", "content": [{"type": "image"}]}]) is None  # an image is content
    assert is_empty_prompt([{"role": "system", "content": None}, {"role": "user", "content": ""}])
    assert not is_empty_prompt([[{"role": "user", "content": "abc:"}]])  # malformed, not "empty"


def test_a_stream_without_a_prompt_column_names_the_columns(tmp_path):
    stream = Dataset.from_dict({"question": list(build_dataset(16)["prompt"])}).to_iterable_dataset()
    trainer = make_trainer("gvpo", tmp_path, dataset=stream, max_steps=1, steps_per_generation=1)
    with pytest.raises(
        ValueError,
        match=r"a batch of the dataset has no 'prompt' column \(columns: \['question'\]\)"
        r".*rename_column\('question', 'prompt'\)",
    ):
        trainer.train()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "column", ["completions", "prompts", "trainer_state", "completion_ids", "log_metric", "log_extra", "environments"]
)
def test_columns_named_like_reward_keywords_are_refused_at_construction(tmp_path, algorithm, column):
    data = build_dataset(16).add_column(column, ["x"] * 16)
    with pytest.raises(
        ValueError,
        match=rf"the train dataset has column\(s\) \['{column}'\] named like the keyword "
        rf"arguments TRL passes to every reward function.*rename_column",
    ):
        make_trainer(algorithm, tmp_path, dataset=data)


def test_a_reward_keyword_column_in_a_stream_is_refused_at_its_batch(tmp_path):
    stream = build_dataset(16).add_column("trainer_state", ["x"] * 16).to_iterable_dataset()
    trainer = make_trainer("gvpo", tmp_path, dataset=stream, max_steps=1, steps_per_generation=1)
    with pytest.raises(ValueError, match=r"the dataset has column\(s\) \['trainer_state'\] named like"):
        trainer.train()


def test_other_columns_still_reach_the_reward_function(tmp_path):
    seen = []

    def reward(prompts, completions, answer, trainer_state, **kwargs):
        seen.append((answer[0], trainer_state.global_step))
        return repeat_letter_reward(prompts, completions)

    data = build_dataset(16).add_column("answer", ["a"] * 16)
    make_trainer("gvpo", tmp_path, dataset=data, reward=reward, max_steps=1, steps_per_generation=1).train()
    assert seen == [("a", 0)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("bad", [10_000, -1, 32], ids=["beyond", "negative", "vocab-size"])
def test_external_token_ids_outside_the_vocabulary_are_refused(tmp_path, algorithm, bad):
    data = build_dataset(4)
    data = data.add_column("demo", [[5, 2], [6, bad, 2], [7, 2], [8, 2]])
    data = data.add_column("lp", [[-0.5] * len(ids) for ids in data["demo"]])
    trainer = make_trainer(
        algorithm,
        tmp_path,
        dataset=data,
        max_steps=1,
        steps_per_generation=1,
        shuffle_dataset=False,
        external_completions_column="demo",
        external_logps_column="lp",
    )
    before = _params(trainer)
    with pytest.raises(
        ValueError,
        match=rf"the external completion column 'demo' returned token id\(s\) \[{bad}\] "
        r"that are not ids of the vocabulary \[0, 32\)",
    ):
        trainer.train()
    assert _unchanged(before, trainer)


# --- environments fill empty prompts (TRL's own environment tests, under our trainers) ------------------------------


def _environment_trainer(algorithm, tmp_path, environment, dataset=None, **overrides):
    from trl.chat_template_utils import qwen3_chat_template

    from .test_trl_parity import TOOL_RUNS, _length_reward
    from .tiny_models import build_tiny_moe

    config_cls, trainer_cls = TRAINERS[algorithm]
    args = cpu_args(
        config_cls,
        tmp_path,
        max_steps=2,
        num_generations=4,
        max_completion_length=64,
        learning_rate=0.1,
        **{**TOOL_RUNS[algorithm], **overrides},
    )
    return trainer_cls(
        model=build_tiny_moe(chat_template=qwen3_chat_template),
        reward_funcs=_length_reward,
        args=args,
        train_dataset=dataset,
        environment_factory=environment,
    )


class OwnsTheData:
    """TRL's test_train_with_environment_owned_data: ``reset()`` returns the prompt."""

    def reset(self, **kwargs):
        return "Guess the 5-letter word."


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_environment_that_owns_the_data_trains_without_a_dataset(tmp_path, monkeypatch, algorithm):
    from unittest.mock import patch

    from .test_trl_parity import _fake_generate

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    trainer = _environment_trainer(algorithm, tmp_path, OwnsTheData)  # TRL builds rows of empty user turns
    assert all(p == [{"role": "user", "content": ""}] for p in trainer.train_dataset["prompt"])
    before = _params(trainer)
    answers = ["Done!<|im_end|>", "DoneDone!<|im_end|>", "DoneDoneDone!<|im_end|>", "No.<|im_end|>"]
    with patch.object(trainer.model, "generate", side_effect=_fake_generate(trainer.processing_class, answers)):
        trainer.train()
    logs = [h for h in trainer.state.log_history if f"{algorithm}/loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert not _unchanged(before, trainer)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_environment_factory_trains_on_a_dataset_of_empty_user_turns(tmp_path, monkeypatch, algorithm):
    """TRL's test_train_with_environment_factory: the environment's tools, prompts left empty."""
    from unittest.mock import patch

    from .test_trl_parity import CounterEnvironment, _fake_generate, _tool_call

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    empty = Dataset.from_dict({"prompt": [[{"role": "user", "content": ""}]] * 8})
    trainer = _environment_trainer(algorithm, tmp_path, CounterEnvironment, dataset=empty)
    before = _params(trainer)
    first = [
        _tool_call("increment", {"step": 1}),
        _tool_call("decrement", {"step": 2}),
        "No.<|im_end|>",
        "Hm.<|im_end|>",
    ]
    with patch.object(trainer.model, "generate", side_effect=_fake_generate(trainer.processing_class, first)):
        trainer.train()
    assert len([h for h in trainer.state.log_history if f"{algorithm}/loss" in h]) == 2
    assert not _unchanged(before, trainer)


def test_with_an_environment_a_malformed_prompt_is_still_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    bad = Dataset.from_dict({"prompt": [[{"content": "hi"}]] * 8})
    with pytest.raises(ValueError, match=r"row 0 of the train dataset has a malformed prompt .*has no 'role'"):
        _environment_trainer("gvpo", tmp_path, OwnsTheData, dataset=bad)


# --- a generation batch mixing image and text-only prompts (TRL's test_train_vlm_multi_image) -----------------------


def _mixed_image_dataset(num_prompts=8):
    from PIL import Image

    from .test_trl_parity import COLOURS

    images = [
        [Image.new("RGB", (16, 16), COLOURS[i % len(COLOURS)])] * (1 + i % 3 // 2) if i % 3 else []
        for i in range(num_prompts)
    ]
    prompts = [[{"role": "user", "content": f"colour {i}?"}] for i in range(num_prompts)]
    return Dataset.from_dict({"prompt": prompts, "images": images})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_generation_batches_mixing_image_and_text_only_prompts_train(tmp_path, algorithm):
    from .test_trl_parity import _colour_of, _recording, _varied_reward
    from .tiny_models import build_tiny_qwen2_vl, tiny_qwen2_vl_processor

    path = build_tiny_qwen2_vl()
    config_cls, trainer_cls = TRAINERS[algorithm]
    recording = _recording(trainer_cls)
    # 2 rows per micro-step, groups of 2; GVPO and GSPO default to 4 micro-steps per generation (4 prompts), GPG to 1
    rows = dict(per_device_train_batch_size=4) if algorithm == "gpg" else dict(per_device_train_batch_size=2)
    args = cpu_args(config_cls, tmp_path, max_steps=2, num_generations=2, max_completion_length=6, **rows)
    assert args.per_device_train_batch_size * args.steps_per_generation // 2 >= 2  # a batch draws several prompts
    dataset = _mixed_image_dataset()
    trainer = recording(
        model=path,
        reward_funcs=_varied_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tiny_qwen2_vl_processor(path),
    )
    before = _params(trainer)
    trainer.train()
    assert not _unchanged(before, trainer)
    logs = [h for h in trainer.state.log_history if f"{algorithm}/loss" in h]
    assert logs and all(math.isfinite(h["loss"]) for h in logs)
    tokenizer = trainer.processing_class.tokenizer
    counts = {i: len(images) for i, images in enumerate(dataset["images"])}
    seen = []
    for inputs in recording.seen:  # each row keeps its own number of images (0 for a text-only prompt)
        colours = [_colour_of(p) for p in tokenizer.batch_decode(inputs["prompt_ids"], skip_special_tokens=True)]
        assert inputs["num_images"] == [counts[c] for c in colours]
        seen += inputs["num_images"]
    assert 0 in seen and max(seen) >= 1  # text-only and image prompts of one generation batch were trained on


# --- class-level defaults for a trainer built without __init__ (TRL's rollout-dispatch tests) -----------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_generate_dispatches_to_a_rollout_func_on_a_trainer_built_without_init(algorithm):
    """As TRL's TestGRPORolloutDispatch builds a GRPOTrainer: attributes set by hand, small stand-ins owned here."""
    from types import SimpleNamespace

    _, trainer_cls = TRAINERS[algorithm]
    trainer = object.__new__(trainer_cls)
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, gather=lambda t: t)
    trainer.args = SimpleNamespace(report_to=[])
    trainer.model = SimpleNamespace(training=True)
    trainer.state = SimpleNamespace(global_step=2, num_input_tokens_seen=0)
    trainer._last_loaded_step, trainer.use_vllm, trainer.use_transformers_continuous_batching = 1, False, False
    trainer.processing_class = SimpleNamespace(batch_decode=lambda ids, **kwargs: ["decoded"] * len(ids))
    trainer._tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    trainer.eos_token_ids = [2]  # read by TRL 1.16's _generate
    trainer.tools = None
    lengths = [
        "mean_length",
        "min_length",
        "max_length",
        "clipped_ratio",
        "mean_terminated_length",
        "min_terminated_length",
        "max_terminated_length",
    ]
    trainer._metrics = {"train": {"num_tokens": [], **{f"completions/{k}": [] for k in lengths}}}
    calls = []

    def rollout(prompts, trainer_):
        calls.append((prompts, trainer_))
        return {"prompt_ids": [[1]], "completion_ids": [[2]], "logprobs": [[-0.1]], "env_mask": [[1]]}

    trainer.rollout_func = rollout
    result = trainer._generate(["prompt"])
    assert result[0] == [[1]] and result[1] == [[2]] and result[2] == [[1]]  # prompt ids, completion ids, env mask
    assert calls == [(["prompt"], trainer)]


# --- messages that name the cause ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, names",
    [
        (dict(reward_weights=[1e30]), r"reward_weights=\[1e\+30\] is so large that the loss or its gradient overflows"),
        (dict(gvpo_beta=1e30), r"gvpo_beta=1e\+30 is so large"),
        (dict(gvpo_beta=1e25, learning_rate=1e7), r"gvpo_beta=1e\+25, learning_rate=10000000.0 are so large"),
    ],
)
def test_a_nonfinite_stop_names_the_extreme_setting(tmp_path, overrides, names):
    trainer = make_trainer("gvpo", tmp_path, max_steps=3, steps_per_generation=2, **overrides)
    before = _params(trainer)
    with pytest.raises(FloatingPointError, match=rf"stopping before it reaches the parameters. Likely cause: {names}"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    if "learning_rate" not in overrides:
        assert _unchanged(before, trainer)


class PoisonBufferAt(TrainerCallback):
    """After optimizer step ``step``, every stored sample's behaviour log-probs become NaN (a damaged buffer)."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for sample in self.trainer.sample_buffer.samples():
                sample.logps = torch.full_like(sample.logps, float("nan"))


@pytest.mark.parametrize("algorithm", ["gspo", "gpg"])
def test_nan_behaviour_logps_of_stored_samples_are_named_not_the_rewards(tmp_path, algorithm):
    dataset = Dataset.from_dict({"prompt": list(build_dataset(4)["prompt"]) * 8})
    trainer = make_trainer(
        algorithm,
        tmp_path,
        dataset=dataset,
        max_steps=4,
        steps_per_generation=2,
        per_device_train_batch_size=8,
        **BUFFERED,
    )
    trainer.add_callback(PoisonBufferAt(trainer, 2))
    with pytest.raises(
        FloatingPointError,
        match=r"Likely cause: \d+ stored mixed-buffer sample\(s\) in this batch "
        r"\(staleness \[.*\] steps\) have NaN or infinite behaviour log-probs",
    ):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _reward_models():
    from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

    from .helpers import tiny_model_path

    causal = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    two_labels = LlamaForSequenceClassification(causal.config.__class__(**{**causal.config.to_dict(), "num_labels": 2}))
    return {
        "causal-lm": (causal, ValueError, r"reward_funcs\[0\] \(LlamaForCausalLM\) is a language model"),
        "bare-module": (
            torch.nn.Linear(4, 1),
            TypeError,
            r"reward_funcs\[0\] \(Linear\) is a torch module without a "
            r"transformers config",
        ),
        "two-labels": (two_labels, ValueError, r"has num_labels=2; TRL reads one logit per completion"),
    }


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind", ["causal-lm", "bare-module", "two-labels"])
def test_a_reward_model_that_is_not_a_one_label_classifier_is_refused_at_construction(tmp_path, algorithm, kind):
    model, error, says = _reward_models()[kind]
    with pytest.raises(error, match=rf"{says}.*AutoModelForSequenceClassification.*num_labels=1"):
        make_trainer(algorithm, tmp_path, reward=model)


def test_a_one_label_reward_model_is_accepted(tmp_path):
    from transformers import AutoConfig, LlamaForSequenceClassification

    from .helpers import tiny_model_path

    config = AutoConfig.from_pretrained(tiny_model_path(), num_labels=1)
    trainer = make_trainer("gvpo", tmp_path, reward=LlamaForSequenceClassification(config), max_steps=1)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


@pytest.mark.distributed
def test_with_two_processes_checkpoints_are_marked_after_both_wrote_and_resume_falls_back(tmp_path):
    from pathlib import Path

    from .distributed.harness import launch, launch_env

    worker = Path(__file__).with_name("distributed") / "checkpoint_worker.py"
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, steps_per_generation=2, per_device_train_batch_size=4)
    spec = {"args": args}
    env = launch_env({"ACCELERATE_USE_CPU": "true"})
    run = launch("checkpoint-2proc", spec, tmp_path, 2, "cpu_ddp_2proc.yaml", env, timeout=600, script=worker)
    ranks = [json.loads((run.out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert {"optimizer.pt", "trainer_state.json", RUN_FILE, "rng_state_0.pth", "rng_state_1.pth"} <= set(
            r["marker_files"]
        )  # both processes' RNG states were written before the marker
        assert r["steps"] == [3, 4, 5, 6]  # resumed from checkpoint-2 on both processes
        assert len(r["skipped"]) == 1 and "skips checkpoint-4" in r["skipped"][0]
