"""What a ``GRPOTrainer`` user relies on keeps working under GVPOTrainer, GPGTrainer and GSPOTrainer
(docs/trl_parity.md): positional ``output_dir`` and the no-``args`` default, TRL loss options that our losses would
ignore (refused), the Mixture-of-Experts router loss, vision-language models (images through the group-preserving
split and GPG's extra generation rounds), GPG on a streaming dataset, tools and environments. Models are built
locally (tests/tiny_models.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from unittest.mock import patch

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from gvpo_trl import TRAINERS, GPGConfig, GPGTrainer, GVPOConfig, GVPOTrainer
from gvpo_trl.demo.toy import build_dataset, repeat_letter_reward
from gvpo_trl.prompt_stream import ExtraPromptStream

from .helpers import cpu_args, make_trainer, tiny_model_path
from .tiny_models import build_tiny_moe, build_tiny_qwen2_vl, tiny_qwen2_vl_processor

ALGORITHMS = sorted(TRAINERS)

# --- configuration --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_output_dir_is_positional_as_in_grpo_config(algorithm):
    config_cls, _ = TRAINERS[algorithm]
    assert [f.name for f in fields(config_cls)][:2] == [f.name for f in fields(GRPOConfig)][:2]
    assert config_cls("run", bf16=False).output_dir == "run"
    second = fields(GRPOConfig)[1].name  # per_device_train_batch_size in TRL 1.16
    assert getattr(config_cls("run", 16, bf16=False), second) == 16


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_trainer_without_args_gets_a_config_named_like_trls(tmp_path, monkeypatch, algorithm):
    # Without `args`, TRL builds GRPOConfig(f"{model}-GRPO"), whose default bf16=True makes transformers refuse a
    # machine without a bf16 GPU (TRL's own GRPOTrainer fails the same way here). Pretend the GPU is there, as on the
    # machines TRL's default targets; the model is only built, never run in bf16.
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.chdir(tmp_path)
    config_cls, trainer_cls = TRAINERS[algorithm]
    reference = GRPOTrainer(model=tiny_model_path(), reward_funcs=repeat_letter_reward, train_dataset=build_dataset(8))
    assert reference.args.output_dir == "tiny-llama-GRPO"
    trainer = trainer_cls(model=tiny_model_path(), reward_funcs=repeat_letter_reward, train_dataset=build_dataset(8))
    assert type(trainer.args) is config_cls
    assert trainer.args.output_dir == f"tiny-llama-{algorithm.upper()}"
    assert trainer.args.bf16 is True  # TRL's default, as for GRPOTrainer
    assert trainer.args.steps_per_generation == (1 if algorithm == "gpg" else 4)  # the algorithm's own defaults


# TRL's policy-loss options: GVPO and GPG replace that loss, so any non-default value would be silently ignored.
LOSS_OPTIONS = [
    dict(loss_type="grpo"),
    dict(loss_type="dr_grpo"),
    dict(epsilon=0.3),
    dict(epsilon_high=0.28),
    dict(delta=1.5),
    dict(importance_sampling_level="sequence"),
]


@pytest.mark.parametrize("algorithm", ["gvpo", "gpg"])
@pytest.mark.parametrize("option", LOSS_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_trl_loss_options_that_the_loss_ignores_are_refused(algorithm, option):
    config_cls, _ = TRAINERS[algorithm]
    (name, value), = option.items()  # fmt: skip
    match = rf"^{config_cls.__name__}: {name}={value!r}: .*silently ignored. Leave it at TRL's default"
    with pytest.raises(ValueError, match=match):
        config_cls("x", bf16=False, **option)
    config_cls("x", bf16=False)  # TRL's defaults pass


def test_gspo_uses_the_clipping_options_and_refuses_delta():
    args = TRAINERS["gspo"][0]("x", bf16=False, epsilon=0.01, epsilon_high=0.02)
    assert (args.epsilon, args.epsilon_high) == (0.01, 0.02)  # used by its loss (tests/test_gspo_trainer.py)
    with pytest.raises(ValueError, match=r"^GSPOConfig: delta=1.5: .*silently ignored"):
        TRAINERS["gspo"][0]("x", bf16=False, delta=1.5)


# --- Mixture-of-Experts: the router's load-balancing loss -------------------------------------------------------------


def _moe_trainer(algorithm, output_dir, coef):
    config_cls, trainer_cls = TRAINERS[algorithm]
    args = cpu_args(config_cls, output_dir, max_steps=1, router_aux_loss_coef=coef, learning_rate=1e-3)
    return trainer_cls(model=build_tiny_moe(), reward_funcs=repeat_letter_reward, args=args,
                       train_dataset=build_dataset(16))  # fmt: skip


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_moe_router_aux_loss_is_added_and_logged(tmp_path, algorithm):
    coef = 0.5
    trainer = _moe_trainer(algorithm, tmp_path / "aux", coef)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == coef
    trainer.train()
    logged = [h["aux_loss"] for h in trainer.state.log_history if "aux_loss" in h]
    assert len(logged) == 1 and math.isfinite(logged[0]) and logged[0] > 0

    # the same micro-batch without the router term: the loss differs by exactly coef × aux_loss / accumulation steps
    plain = _moe_trainer(algorithm, tmp_path / "plain", 0.0)
    assert not plain.aux_loss_enabled
    torch.manual_seed(0)
    plain.model.train()
    inputs = plain._prepare_inputs(next(iter(plain.get_train_dataloader())))
    trainer = _moe_trainer(algorithm, tmp_path / "aux2", coef)  # the same initial weights as `plain`
    trainer.model.train()
    for t in (trainer, plain):
        t.current_gradient_accumulation_steps = 2
    with_aux = trainer._compute_loss(trainer.model, inputs)
    without = plain._compute_loss(plain.model, inputs)
    aux = trainer._metrics["train"]["aux_loss"][-1]
    assert "aux_loss" not in plain._metrics["train"]
    assert aux > 0
    assert (with_aux - without).item() == pytest.approx(coef * aux / 2, rel=1e-4)


# --- vision-language models -------------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (40, 40, 40),
           (255, 255, 255)]  # fmt: skip


def _image_dataset(num_prompts=8):
    from PIL import Image

    # prompts of different lengths, so that generation rounds have different prompt widths
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"colour {i}?" + "!" * i}] for i in range(num_prompts)],
            "image": [Image.new("RGB", (16, 16), COLOURS[i % len(COLOURS)]) for i in range(num_prompts)],
        }
    )


def _colour_of(prompt) -> int:
    """The colour index named by a decoded prompt, or by a conversational prompt (whose content TRL turned into
    blocks)."""
    if not isinstance(prompt, str):
        content = prompt[-1]["content"]
        prompt = content if isinstance(content, str) else "".join(b.get("text", "") for b in content)
    return int(prompt.split("colour ")[1].split("?")[0])


def _varied_reward(completions, **kwargs):
    return [float(sum(map(ord, c[0]["content"])) % 5) for c in completions]


def _odd_colours_constant(prompts, completions, **kwargs):
    """Zero reward variance for odd colours (GPG then generates extra rounds), a varied reward for even ones."""
    varied = _varied_reward(completions)
    return [0.0 if _colour_of(p) % 2 else r for p, r in zip(prompts, varied, strict=True)]


def _recording(trainer_cls):
    class Recording(trainer_cls):
        seen: list

        def _compute_loss(self, model, inputs):
            self.seen.append({key: (value.clone() if isinstance(value, torch.Tensor) else value)
                              for key, value in inputs.items()})  # fmt: skip
            return super()._compute_loss(model, inputs)

    Recording.seen = []
    return Recording


def _check_rows_keep_their_images(trainer, micro_batches, k):
    """Whole groups in every micro-step, each row's pixel_values the image of its own prompt, and the image token
    types aligned with the image tokens."""
    processor = trainer.processing_class
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    from PIL import Image

    def pixels(colour):
        image = Image.new("RGB", (16, 16), colour)
        return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]

    expected = {i: pixels(colour) for i, colour in enumerate(COLOURS)}
    for inputs in micro_batches:
        ids = inputs["group_id"].tolist()
        assert sorted(ids.count(g) for g in set(ids)) == [k] * len(set(ids))  # whole groups
        assert inputs["num_images"] == [1] * len(ids)
        rows_per_image = inputs["image_grid_thw"].prod(-1).tolist()
        pixel_rows = torch.split(inputs["pixel_values"], rows_per_image)
        prompts = tokenizer.batch_decode(inputs["prompt_ids"], skip_special_tokens=True)
        colours = [_colour_of(p) for p in prompts]
        for row, colour in enumerate(colours):
            torch.testing.assert_close(pixel_rows[row], expected[colour % len(COLOURS)])
        for g in set(ids):  # a group is one prompt
            assert len({c for c, i in zip(colours, ids, strict=True) if i == g}) == 1
        full = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1).bool()
        assert torch.equal(inputs["mm_token_type_ids"].bool() & mask, (full == image_token) & mask)


def test_vlm_gvpo_regroup_keeps_each_rows_images(tmp_path, monkeypatch):
    import gvpo_trl.trainer

    scattered = []
    regroup = gvpo_trl.trainer.regroup_batches

    def watching(batches):  # TRL's shuffled split, before the group-preserving one
        scattered.append(any(len(set(b["group_id"].tolist())) > 1 for b in batches))
        return regroup(batches)

    monkeypatch.setattr(gvpo_trl.trainer, "regroup_batches", watching)
    path = build_tiny_qwen2_vl()
    trainer_cls = _recording(GVPOTrainer)
    args = cpu_args(GVPOConfig, tmp_path, max_steps=4, per_device_train_batch_size=4, steps_per_generation=2,
                    num_generations=2, max_completion_length=6)  # fmt: skip
    trainer = trainer_cls(model=path, reward_funcs=_varied_reward, args=args, train_dataset=_image_dataset(),
                          processing_class=tiny_qwen2_vl_processor(path))  # fmt: skip
    trainer.train()
    assert len(trainer_cls.seen) == 4 and len(scattered) == 2 and any(scattered)
    _check_rows_keep_their_images(trainer, trainer_cls.seen, k=2)
    losses = [h["loss"] for h in trainer.state.log_history if "gvpo/loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_vlm_gpg_extra_rounds_keep_each_rows_images(tmp_path):
    path = build_tiny_qwen2_vl()
    trainer_cls = _recording(GPGTrainer)
    args = cpu_args(GPGConfig, tmp_path, max_steps=3, per_device_train_batch_size=8, num_generations=2,
                    max_completion_length=6, max_resample_rounds=3)  # fmt: skip
    trainer = trainer_cls(model=path, reward_funcs=_odd_colours_constant, args=args, train_dataset=_image_dataset(),
                          processing_class=tiny_qwen2_vl_processor(path))  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "gpg/loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert max(h["dynamic_sampling/rounds"] for h in logs) >= 1  # rows of several rounds were joined
    _check_rows_keep_their_images(trainer, trainer_cls.seen, k=2)
    # some trained batches joined rows of extra rounds (group ids of round r start at r × 4 groups)
    assert any(b["group_id"].max() >= 4 for b in trainer_cls.seen)


# --- GPG on a streaming dataset ---------------------------------------------------------------------------------------


def _letters_a_to_d_constant(prompts, completions, **kwargs):
    real = repeat_letter_reward(prompts, completions)
    return [0.5 if p[0] in "abcd" else r for p, r in zip(prompts, real, strict=True)]


def test_gpg_resamples_from_a_streaming_dataset(tmp_path):
    stream = build_dataset(32).to_iterable_dataset()
    # TRL: a stream has no length, so max_steps is required; TRL sets dispatch_batches=False and 0 workers
    trainer = make_trainer("gpg", tmp_path, dataset=stream, reward=_letters_a_to_d_constant, max_steps=4,
                           per_device_train_batch_size=16, max_resample_rounds=3)  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "gpg/loss" in h]
    assert len(logs) == 4 and all(math.isfinite(h["loss"]) for h in logs)
    assert sum(h["dynamic_sampling/rounds"] for h in logs) >= 1
    assert trainer.dynamic_sampling._stream is not None and trainer.dynamic_sampling._stream.position > 0
    assert trainer.args.accelerator_config.dispatch_batches is False


def test_extra_prompt_stream_position_alone_fixes_the_examples():
    stream = build_dataset(10).to_iterable_dataset()
    a = ExtraPromptStream(stream, seed=0, shuffle=True)
    first = [a.next()["prompt"] for _ in range(25)]  # 2.5 passes over 10 examples
    assert sorted(first[:10]) == sorted(build_dataset(10)["prompt"])  # a pass is a permutation of the stream
    assert first[:10] != first[10:20]  # each pass reshuffled (seed + 1 + pass)
    b = ExtraPromptStream(stream, seed=0, shuffle=True)  # another process, or a resumed run
    b.seek(17)
    assert [b.next()["prompt"] for _ in range(8)] == first[17:]
    a.seek(3)  # behind: read again from the start
    assert a.next()["prompt"] == first[3]
    with pytest.raises(ValueError, match="yields no examples"):
        ExtraPromptStream(_Empty(), 0, False).next()


class _Empty(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([])


def test_gpg_stream_extra_prompts_depend_on_the_step_only(tmp_path):
    # a resumed run (fresh trainer at global_step 3) draws the same extra prompts as the run that got there
    kwargs = dict(dataset=build_dataset(12).to_iterable_dataset(), max_steps=4, per_device_train_batch_size=8)
    run = make_trainer("gpg", tmp_path / "run", **kwargs)
    for step in range(4):
        run.state.global_step = step
        drawn = [ex["prompt"] for ex in run.dynamic_sampling.extra_prompts(2).take(2)]
    resumed = make_trainer("gpg", tmp_path / "resumed", **kwargs)
    resumed.state.global_step = 3
    assert [ex["prompt"] for ex in resumed.dynamic_sampling.extra_prompts(2).take(2)] == drawn
    assert len(drawn) == 8 and drawn[0] == drawn[3] != drawn[4]  # 2 prompts, k = 4 rows each


# --- tools and environments -------------------------------------------------------------------------------------------


def multiply_tool(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


class CounterEnvironment:
    def reset(self, **kwargs):
        self.count = 0

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.count += step
        return self.count


def _tool_call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call><|im_end|>"


def _fake_generate(tokenizer, first_turn: list[str]):
    """``model.generate`` as in TRL's own tool tests: the first turn of row i is ``first_turn[i % len]`` (a random
    tiny model would never produce a tool call), every later turn (after a tool response) is ``Done!``."""
    tool_response = tokenizer.convert_tokens_to_ids("<tool_response>")

    def generate(input_ids, **kwargs):
        if (input_ids == tool_response).any():
            texts = ["Done!<|im_end|>"] * input_ids.size(0)
        else:
            texts = [first_turn[i % len(first_turn)] for i in range(input_ids.size(0))]
        ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        width = max(map(len, ids))
        completion = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
        return torch.cat([input_ids, completion.to(input_ids.device)], dim=-1)

    return generate


def _length_reward(completions, **kwargs):
    return [float(len(str(c)) % 7) for c in completions]


TOOL_RUNS = {  # per trainer: 8 rows per generation batch (2 groups of 4), whole groups per micro-step
    "gvpo": dict(per_device_train_batch_size=4, steps_per_generation=2),
    "gpg": dict(per_device_train_batch_size=8),
    "gspo": dict(per_device_train_batch_size=4, steps_per_generation=2),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind", ["tools", "environment_factory"])
def test_tool_and_environment_runs_train_with_whole_groups(tmp_path, monkeypatch, algorithm, kind):
    from trl.chat_template_utils import qwen3_chat_template

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    config_cls, trainer_cls = TRAINERS[algorithm]
    recording = _recording(trainer_cls)
    args = cpu_args(config_cls, tmp_path, max_steps=2, num_generations=4, max_completion_length=128,
                    learning_rate=1e-3, **TOOL_RUNS[algorithm])  # fmt: skip
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in build_dataset(16)["prompt"]]})
    if kind == "tools":
        extra, name, valid = {"tools": [multiply_tool]}, "multiply_tool", {"a": 3, "b": 4}
        invalid = {"a": 3, "c": 4}  # a wrong argument name: the call fails
    else:
        extra, name, valid = {"environment_factory": CounterEnvironment}, "increment", {"step": 1}
        invalid = {"stride": 2}
    trainer = recording(model=build_tiny_moe(chat_template=qwen3_chat_template), reward_funcs=_length_reward,
                        args=args, train_dataset=dataset, **extra)  # fmt: skip
    # per group of 4: one valid tool call, one failing call, two plain answers
    first_turn = [_tool_call(name, valid), _tool_call(name, invalid), "No tool.<|im_end|>", "Hm.<|im_end|>"]
    with patch.object(trainer.model, "generate", side_effect=_fake_generate(trainer.processing_class, first_turn)):
        trainer.train()

    logs = [h for h in trainer.state.log_history if f"{algorithm}/loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    generation_logs = [h for h in logs if "tools/call_frequency" in h]
    assert generation_logs
    for h in generation_logs:
        assert h["tools/call_frequency"] == pytest.approx(0.5)
        assert h["tools/failure_frequency"] == pytest.approx(0.5)
    assert len(recording.seen) == 2
    for inputs in recording.seen:
        ids = inputs["group_id"].tolist()
        assert sorted(ids.count(g) for g in set(ids)) == [4] * len(set(ids))  # whole groups
        assert "tool_mask" in inputs and (inputs["tool_mask"] * inputs["completion_mask"] == 0).any()
    if kind == "environment_factory":
        assert sum(env.count for env in trainer.environments) == 2  # one valid call per group of the last batch


# --- row operations on image batches (gvpo_trl.rows) ------------------------------------------------------------------
