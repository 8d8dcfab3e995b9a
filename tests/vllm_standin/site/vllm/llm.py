"""``LLM`` of the stand-in (colocate mode): one :class:`~tests.vllm_standin.engine.Engine` per process."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import torch

from tests.vllm_standin.engine import Engine

from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """Accepts the arguments TRL's ``VLLMGeneration`` passes; refuses those whose behaviour it does not implement."""

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, max_model_len: int | None = None, seed: int = 0,
                 logprobs_mode: str = "raw_logprobs", dtype: str = "auto", enable_sleep_mode: bool = False,
                 **ignored):  # fmt: skip
        if tensor_parallel_size != 1:
            raise NotImplementedError("the vLLM stand-in runs tensor_parallel_size=1 only")
        if logprobs_mode != "processed_logprobs":
            raise NotImplementedError("the vLLM stand-in reports processed log-probs only (TRL asks for them)")
        self.engine = Engine(model, dtype=dtype, max_model_len=max_model_len, seed=seed)
        self.enable_sleep_mode = enable_sleep_mode
        # the attribute path TRL's colocate weight sync and tool loop use
        self.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(max_model_len=self.engine.max_model_len),
            model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.engine))
            ),
        )

    def generate(self, prompts, sampling_params: SamplingParams | None = None, use_tqdm: bool = True):
        params = sampling_params or SamplingParams()
        outputs = []
        for prompt in prompts:
            if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
                raise NotImplementedError("the vLLM stand-in generates from {'prompt_token_ids': [...]} prompts only")
            if prompt.get("multi_modal_data") is not None:
                raise NotImplementedError("the vLLM stand-in does not take images")
            ids = list(prompt["prompt_token_ids"])
            sequences = self.engine.generate(ids, params)
            completions = [_completion(i, seq) for i, seq in enumerate(sequences)]
            outputs.append(RequestOutput(uuid.uuid4().hex, None, ids, completions))
        return outputs

    def reset_prefix_cache(self) -> bool:
        return True  # no prefix cache

    def sleep(self, level: int = 1) -> None:
        if level == 2:  # vLLM discards the weights: so does the stand-in, so that a missing re-sync shows
            with torch.no_grad():
                for param in self.engine.model.parameters():
                    param.zero_()

    def wake_up(self, tags=None) -> None:
        pass


def _completion(index: int, seq) -> CompletionOutput:
    logprobs = cumulative = None
    if seq.logprobs is not None:
        logprobs = [{tok: Logprob(lp, rank) for tok, (lp, rank) in pos.items()} for pos in seq.logprobs]
        cumulative = sum(pos[t][0] for pos, t in zip(seq.logprobs, seq.token_ids, strict=True))
    return CompletionOutput(index, "", seq.token_ids, cumulative, logprobs, seq.finish_reason)
