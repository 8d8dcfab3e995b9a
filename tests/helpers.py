"""Small shared builders for the tests (plain functions; pytest fixtures live in conftest.py)."""

from __future__ import annotations

import os
import tempfile

import torch

from gvpo_trl import TRAINERS
from gvpo_trl.demo.toy import build_dataset, build_tiny_model, repeat_letter_reward

_MODEL_DIR = os.path.join(tempfile.gettempdir(), "gvpo_trl_tests", "tiny-llama")


def tiny_model_path() -> str:
    """The toy model, built once per machine (same seed -> same weights)."""
    return build_tiny_model(_MODEL_DIR)


#: Settings of every CPU test run: no bf16 or checkpointing, no reporting, quiet, seeded.
CPU_SETTINGS = dict(bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], disable_tqdm=True, seed=0)


def cpu_args(config_cls, output_dir, **overrides):
    """A config for fast CPU runs on the toy task; ``overrides`` win."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        **CPU_SETTINGS,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def make_trainer(
    algorithm, output_dir, *, cls=None, reward=repeat_letter_reward, dataset=None, num_prompts=64, **overrides
):
    """A trainer of ``algorithm`` (a key of ``gvpo_trl.TRAINERS``, or a ``(config class, trainer class)`` pair) on
    the toy model and task: ``cls`` replaces the trainer class (a probing subclass), ``dataset`` the toy dataset of
    ``num_prompts`` prompts, ``overrides`` the config fields of :func:`cpu_args`."""
    config_cls, trainer_cls = TRAINERS[algorithm] if isinstance(algorithm, str) else algorithm
    return (cls or trainer_cls)(
        model=tiny_model_path(),
        reward_funcs=reward,
        args=cpu_args(config_cls, output_dir, **overrides),
        train_dataset=build_dataset(num_prompts) if dataset is None else dataset,
    )


def flaky_reward(prompts, completions, **kwargs):
    """Constant for letters a-d (zero-variance groups), None for e-f (unscorable), NaN for g, real for h."""
    out = []
    for p, c in zip(prompts, completions, strict=False):
        if p[0] in "abcd":
            out.append(1.0)
        elif p[0] in "ef":
            out.append(None)
        elif p[0] == "g":
            out.append(float("nan"))
        else:
            out.append(repeat_letter_reward([p], [c])[0])
    return out


def filled_buffer(steps_per_key: dict[str, list[int]], capacity: int = 1000):
    """A buffer with one sample per listed step of each prompt key (uids in insertion order)."""
    from gvpo_trl.buffer import SampleBuffer

    buf = SampleBuffer(capacity)
    for key, steps in steps_per_key.items():
        for i, step in enumerate(steps):
            buf.add(key, [i + 5, 2], f"{key}{i}", [float(i)], torch.tensor([-1.0, -0.5]), step)
    return buf
