"""Every trainer on transformers' continuous batching (``use_transformers_continuous_batching=True``), TRL's other
fast generator, which runs on a CPU: for real, with HF ``generate`` made to fail so that the run proves which
generator it used. (vLLM: ``tests/test_vllm_generation.py``.)"""

from __future__ import annotations

from collections import Counter

import pytest
from transformers import GenerationMixin

from tests.helpers import make_trainer

#: a paged cache sized for these batches: the default sizes it from free memory, which takes seconds per call on a CPU
CB = dict(
    use_transformers_continuous_batching=True,
    transformers_continuous_batching_config={"page_size": 16, "num_blocks": 16, "max_batch_tokens": 256},
)
RUNS = {"gvpo": dict(max_steps=4), "gspo": dict(max_steps=4), "gpg": dict(max_steps=2)}  # one or two generations


def recording(cls):
    class Recording(cls):
        def _compute_loss(self, model, inputs):
            self.seen.append({key: inputs[key].tolist() for key in ("group_id", "completion_mask")})
            return super()._compute_loss(model, inputs)

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            self.generated.append(sum(len(ids) for ids in completion_ids))
            return completion_ids, logprobs

    return Recording


@pytest.fixture
def continuous_batching_only(monkeypatch):
    """Count ``generate_batch`` calls; any HF ``generate`` call fails the test."""
    calls = []
    original = GenerationMixin.generate_batch

    def generate_batch(self, *args, **kwargs):
        calls.append(len(args[0]))
        return original(self, *args, **kwargs)

    def no_generate(self, *args, **kwargs):
        raise AssertionError("HF generate was called with use_transformers_continuous_batching=True")

    monkeypatch.setattr(GenerationMixin, "generate_batch", generate_batch)
    monkeypatch.setattr(GenerationMixin, "generate", no_generate)
    return calls


@pytest.mark.parametrize("algorithm", list(RUNS))
def test_every_trainer_trains_on_continuous_batching(tmp_path, algorithm, continuous_batching_only):
    from gvpo_trl import TRAINERS

    trainer = make_trainer(algorithm, tmp_path, cls=recording(TRAINERS[algorithm][1]), **CB, **RUNS[algorithm])
    trainer.seen, trainer.generated = [], []
    trainer.train()
    rows = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation
    assert continuous_batching_only[0] == rows and all(n % 4 == 0 for n in continuous_batching_only)  # whole groups
    logs = trainer.state.log_history
    # buffer/generated_tokens_total (every trainer logs it) counts exactly what the generator produced
    totals = [e["buffer/generated_tokens_total"] for e in logs if "buffer/generated_tokens_total" in e]
    assert totals[-1] == sum(trainer.generated) == trainer.buffer_stats["generated_tokens"]
    assert len(trainer.seen) == RUNS[algorithm]["max_steps"]
    for inputs in trainer.seen:
        assert set(Counter(inputs["group_id"]).values()) == {4}  # whole groups in every micro-step
        assert any(any(row) for row in inputs["completion_mask"])
    if algorithm == "gpg":  # β_th resampling rounds generate through continuous batching too
        rounds = sum(e["dynamic_sampling/rounds"] for e in logs if "dynamic_sampling/rounds" in e)
        assert len(continuous_batching_only) == RUNS["gpg"]["max_steps"] + rounds
