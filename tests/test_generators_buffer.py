"""The mixed buffer on TRL's other generation paths: continuous batching, tools, ``environment_factory`` and
``rollout_func`` (vLLM: ``tests/test_vllm_buffer.py``). In each, only the fresh members are generated (counted at the
generator), the historical members keep what the loss needs (their tool masks, their rollout fields, their behaviour
log-probs), and a resumed run continues exactly."""

from __future__ import annotations

import math
import os
from collections import Counter
from unittest.mock import patch

import pytest
import torch
from datasets import Dataset
from transformers import GenerationMixin

from gvpo_trl import TRAINERS
from gvpo_trl.buffer import FRESH, HISTORICAL
from gvpo_trl.demo.toy import repeat_letter_reward
from tests.helpers import cpu_args, make_trainer, tiny_model_path
from tests.test_generators import CB
from tests.test_trl_parity import CounterEnvironment, _fake_generate, _tool_call, multiply_tool
from tests.tiny_models import build_tiny_moe

#: 2 prompts × k = 4 per generation, one generation per step, the same 2 prompts every step: history from step 1 on
BUFFER = dict(per_device_train_batch_size=8, num_generations=4, steps_per_generation=1, buffer_history_per_group=2,
              buffer_max_staleness=8)  # fmt: skip
PROMPTS = ["abc:", "bcd:"]


def recording(cls):
    """``cls`` recording each mixed batch (its members, in row order, and TRL's tool mask and rewards of its rows)
    and each micro-step's inputs (rows shuffled by TRL)."""

    class Recording(cls):
        def _finish_mixed_batch(self, batch, output):
            super()._finish_mixed_batch(batch, output)
            self.batches.append({"kinds": [m.kind for m in batch.members], "members": list(batch.members),
                                 "tool_mask": output.get("tool_mask"), "rewards": batch.rewards_per_func[:, 0].tolist(),
                                 "is_historical": output["is_historical"].tolist()})  # fmt: skip

        def _compute_loss(self, model, inputs):
            self.seen.append({key: value.clone() if isinstance(value, torch.Tensor) else value
                              for key, value in inputs.items()})  # fmt: skip
            return super()._compute_loss(model, inputs)

    return Recording


def start(trainer):
    trainer.batches, trainer.seen = [], []
    return trainer


def fresh_per_batch(trainer) -> list[int]:
    return [kinds.count(FRESH) for kinds in (b["kinds"] for b in trainer.batches)]


# --- continuous batching --------------------------------------------------------------------------------------------


def test_continuous_batching_generates_only_the_fresh_members(tmp_path, monkeypatch):
    calls = []
    original = GenerationMixin.generate_batch

    def generate_batch(self, inputs, *args, **kwargs):
        out = original(self, inputs, *args, **kwargs)
        calls.append((len(inputs), sum(len(o.generated_tokens) for o in out.values())))
        return out

    monkeypatch.setattr(GenerationMixin, "generate_batch", generate_batch)
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    trainer = make_trainer("gvpo", tmp_path, cls=recording(TRAINERS["gvpo"][1]), dataset=dataset, max_steps=3,
                           **BUFFER, **CB)  # fmt: skip
    start(trainer)
    trainer.train()
    assert [rows for rows, _ in calls] == fresh_per_batch(trainer) == [8, 4, 4]  # 2 of each 4 from history after step 0
    assert trainer.buffer_stats["generated_tokens"] == sum(tokens for _, tokens in calls)
    for batch, inputs in zip(trainer.batches, trainer.seen, strict=True):
        assert set(Counter(inputs["group_id"].tolist()).values()) == {4}
        assert batch["is_historical"] == [kind == HISTORICAL for kind in batch["kinds"]]


# --- tools and environments -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tools", "environment_factory"])
def test_tools_and_environments_generate_only_fresh_members_and_keep_tool_masks(tmp_path, monkeypatch, kind):
    from trl.chat_template_utils import qwen3_chat_template

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    config_cls, trainer_cls = TRAINERS["gvpo"]
    args = cpu_args(config_cls, tmp_path, max_steps=3, max_completion_length=128, learning_rate=1e-3, **BUFFER)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    if kind == "tools":
        extra, name, valid = {"tools": [multiply_tool]}, "multiply_tool", {"a": 3, "b": 4}
    else:
        extra, name, valid = {"environment_factory": CounterEnvironment}, "increment", {"step": 1}
    trainer = start(recording(trainer_cls)(model=build_tiny_moe(chat_template=qwen3_chat_template),
                                           reward_funcs=lambda completions, **kw: [float(len(str(c)) % 7)
                                                                                   for c in completions],
                                           args=args, train_dataset=dataset, **extra))  # fmt: skip
    first_turn = [_tool_call(name, valid), "No tool.<|im_end|>"]  # fresh rows alternate: a tool call, a plain answer
    fake = _fake_generate(trainer.processing_class, first_turn)
    first_turn_rows = []

    def generate(input_ids, **kwargs):
        if not (input_ids == trainer.processing_class.convert_tokens_to_ids("<tool_response>")).any():
            first_turn_rows.append(input_ids.size(0))
        return fake(input_ids, **kwargs)

    with patch.object(trainer.model, "generate", side_effect=generate):
        trainer.train()
    assert first_turn_rows == fresh_per_batch(trainer) == [8, 4, 4]  # only the fresh rows reach the generator
    # every step, half the generated rows called the tool: TRL's frequency is over the fresh rows
    calls = [h["tools/call_frequency"] for h in trainer.state.log_history if "tools/call_frequency" in h]
    assert calls == [0.5, 0.5, 0.5]
    stored = {s.uid: s for s in trainer.sample_buffer.samples()}
    for batch in trainer.batches:
        for i, member in enumerate(batch["members"]):
            mask = batch["tool_mask"][i, : len(member.completion_ids)].tolist()
            assert mask == member.tool_mask  # historical members too: the mask stored with them
            if member.kind == HISTORICAL and member.sample_uid in stored:
                assert stored[member.sample_uid].tool_mask == mask
        assert any(0 in m.tool_mask for m in batch["members"] if m.kind == HISTORICAL) or batch is trainer.batches[0]
    if kind == "environment_factory":  # the environment of each fresh row ran that row's call, no other one did
        fresh = [i for i, k in enumerate(trainer.batches[-1]["kinds"]) if k == FRESH]
        expected = [0] * len(trainer.environments)
        for j, i in enumerate(fresh):
            expected[i] = int(j % 2 == 0)  # the generator's j-th row called the tool when j is even
        assert [env.count for env in trainer.environments] == expected and sum(expected) == 2


def test_rescoring_with_environments_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.chat_template_utils import qwen3_chat_template

    config_cls, trainer_cls = TRAINERS["gvpo"]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    with pytest.raises(ValueError, match="buffer_rescore=True cannot rescore historical members with environment"):
        trainer_cls(model=build_tiny_moe(chat_template=qwen3_chat_template), reward_funcs=repeat_letter_reward,
                    args=cpu_args(config_cls, tmp_path, buffer_rescore=True, **BUFFER), train_dataset=dataset,
                    environment_factory=CounterEnvironment)  # fmt: skip


# --- rollout_func ---------------------------------------------------------------------------------------------------


def traced_rollout(prompts, trainer):
    """TRL ``rollout_func``: a completion depending on the prompt and the optimizer step, an ``env_mask`` that marks
    its last token as environment output, and a per-row extra field ``trace`` that the reward reads."""
    tok = trainer.processing_class
    trainer.rollout_rows.append(len(prompts))
    step = trainer.state.global_step
    out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": [], "trace": []}
    for i, prompt in enumerate(prompts):
        ids = tok(prompt[0] * (1 + (step + i) % 5) + "x", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out["prompt_ids"].append(tok(prompt, add_special_tokens=False)["input_ids"])
        out["completion_ids"].append(ids)
        out["env_mask"].append([1] * (len(ids) - 2) + [0, 1])
        out["trace"].append(f"step{step}-row{i}")
    return out


def trace_reward(prompts, completions, trace, **kwargs):
    return [float(int(t.split("-")[0][4:]) + len(c)) for t, c in zip(trace, completions, strict=True)]


def rollout_trainer(output_dir, **overrides):
    config_cls, trainer_cls = TRAINERS["gvpo"]
    args = cpu_args(config_cls, output_dir, **{**BUFFER, "max_steps": 4, **overrides})
    trainer = recording(trainer_cls)(model=tiny_model_path(), reward_funcs=trace_reward, args=args,
                                     train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                     rollout_func=traced_rollout)  # fmt: skip
    trainer.rollout_rows = []
    return start(trainer)


def test_rollout_func_generates_only_fresh_members_and_historical_ones_keep_their_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    trainer = rollout_trainer(tmp_path, buffer_rescore=True)  # rescoring: the reward sees the stored trace
    trainer.train()
    assert trainer.rollout_rows == fresh_per_batch(trainer) == [8, 4, 4, 4]
    for step, batch in enumerate(trainer.batches):
        traces = [m.extra["trace"] for m in batch["members"]]
        for member, trace in zip(batch["members"], traces, strict=True):
            assert trace.startswith(f"step{step}-") == (member.kind == FRESH)  # historical: generated earlier
        for i, member in enumerate(batch["members"]):
            assert batch["tool_mask"][i, : len(member.completion_ids)].tolist() == member.tool_mask
            assert member.tool_mask[-2] == 0  # the env_mask of its own rollout, stored with it
        expected = [trace_reward(None, [m.completion], [m.extra["trace"]])[0] for m in batch["members"]]
        assert batch["rewards"] == pytest.approx(expected)  # rescored with each member's own trace
    # generated tokens count the model's tokens only (env_mask 0 left out), fresh rows only
    fresh_tokens = sum(sum(m.tool_mask) for b in trainer.batches for m in b["members"] if m.kind == FRESH)
    assert trainer.buffer_stats["generated_tokens"] == fresh_tokens


def test_rollout_func_with_the_buffer_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    full = rollout_trainer(tmp_path / "full")
    full.train()
    first = rollout_trainer(tmp_path / "cut", save_strategy="steps", save_steps=2)
    first.train()
    resumed = rollout_trainer(tmp_path / "cut", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "cut", "checkpoint-2"))
    assert resumed.sample_buffer.digest() == full.sample_buffer.digest()
    assert any(s.tool_mask and s.extra for s in resumed.sample_buffer.samples())  # stored fields came back
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h] == losses  # steps 1-2 from the checkpoint
    assert all(math.isfinite(x) for x in losses)
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


# --- image prompts ----------------------------------------------------------------------------------------------------


def test_prompt_key_tells_images_apart_by_their_pixels():
    from PIL import Image

    from gvpo_trl.buffer import prompt_key

    def prompt(colour):
        return [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (4, 4), colour)},
                                             {"type": "text", "text": "what colour?"}]}]  # fmt: skip

    assert prompt_key(prompt((255, 0, 0))) == prompt_key(prompt((255, 0, 0)))  # two objects, the same pixels
    assert prompt_key(prompt((255, 0, 0))) != prompt_key(prompt((0, 255, 0)))  # the same text, other pixels


def test_image_prompts_reuse_history_with_their_own_images(tmp_path):
    from tests.test_trl_parity import _check_rows_keep_their_images, _image_dataset, _varied_reward
    from tests.tiny_models import build_tiny_qwen2_vl, tiny_qwen2_vl_processor

    path = build_tiny_qwen2_vl()
    config_cls, trainer_cls = TRAINERS["gvpo"]
    args = cpu_args(config_cls, tmp_path, max_steps=4, per_device_train_batch_size=4, steps_per_generation=2,
                    num_generations=2, max_completion_length=6, buffer_history_per_group=1,
                    buffer_max_staleness=8)  # fmt: skip
    trainer = start(recording(trainer_cls)(model=path, reward_funcs=_varied_reward, args=args,
                                           train_dataset=_image_dataset(4),  # 4 groups per batch: all 4 prompts
                                           processing_class=tiny_qwen2_vl_processor(path)))  # fmt: skip
    trainer.train()
    assert fresh_per_batch(trainer) == [8, 4]  # the second batch reuses one member per group
    _check_rows_keep_their_images(trainer, trainer.seen, k=2)  # reused rows too carry their own prompt's image
    for batch in trainer.batches:
        for member in batch["members"]:
            assert "sha256:" in member.key  # the image is part of the key
