"""The generator behind the vLLM stand-in (test-owned, see ``tests/vllm_standin/__init__.py``): a transformers causal
LM sampled token by token with vLLM's sampling parameters.

Each token is drawn from the processed distribution (repetition penalty, then temperature, then top-k / top-p /
min-p, in vLLM's order) and reported with its log-probability under that same distribution, which is what vLLM
returns with ``logprobs_mode="processed_logprobs"`` (the mode TRL starts vLLM in). Weights are whatever was last
loaded: TRL's weight sync calls :meth:`Engine.load_weights` with the policy's tensors.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """The sampling parameters the engine honours (the subset of vLLM's ``SamplingParams`` TRL sets)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    logprobs: int | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class Sequence:
    """One sampled completion: its token ids, and per position ``{token_id: (logprob, rank)}`` (the sampled token, plus
    the top ``logprobs`` tokens when that is > 0), or None when log-probs were not asked for."""

    token_ids: list[int]
    logprobs: list[dict[int, tuple[float, int]]] | None
    finish_reason: str


def processed_logits(logits: torch.Tensor, history: torch.Tensor, params: Sampling) -> torch.Tensor:
    """``(n, V)`` float logits after vLLM's sampling transforms; filtered tokens are ``-inf``."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, history, True)
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.temperature > 0:
        logits = logits / params.temperature
    if params.top_k and 0 < params.top_k < logits.size(-1):
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


class Engine:
    """A causal LM loaded from ``model`` (a local folder), generating with :meth:`generate`."""

    def __init__(self, model: str, dtype: str = "auto", max_model_len: int | None = None, seed: int = 0):
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        config = AutoConfig.from_pretrained(model)
        self.max_model_len = max_model_len or config.max_position_embeddings
        eos = config.eos_token_id
        try:
            eos = GenerationConfig.from_pretrained(model).eos_token_id or eos
        except OSError:
            pass
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.generator = torch.Generator().manual_seed(seed)
        self.lock = threading.Lock()
        self.generated_tokens = 0  # completion tokens sampled so far (all requests)
        self.weight_loads = 0  # tensors loaded by load_weights

    # --- weights ---

    def load_weights(self, weights) -> None:
        """Copy ``(name, tensor)`` pairs (Hugging Face parameter names, as TRL sends them) into the model."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                if name not in params:
                    raise KeyError(f"vLLM stand-in: no parameter {name!r} in the served model")
                params[name].copy_(tensor.to(params[name].dtype))
                self.weight_loads += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().clone() for name, param in self.model.named_parameters()}

    # --- generation ---

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], params: Sampling) -> list[Sequence]:
        """``params.n`` completions of one prompt (token ids), sampled in one batch with a KV cache."""
        with self.lock:
            generator = self.generator if params.seed is None else torch.Generator().manual_seed(params.seed)
            n = params.n
            history = torch.tensor([list(prompt_ids)] * n, dtype=torch.long)
            budget = min(params.max_tokens, self.max_model_len - len(prompt_ids))
            stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
            out = self.model(input_ids=history, use_cache=True)
            tokens = [[] for _ in range(n)]
            logprobs = [[] for _ in range(n)]
            finished = [False] * n
            for _ in range(max(budget, 0)):
                logits = processed_logits(out.logits[:, -1], history, params)
                logp = logits.log_softmax(-1)
                if params.temperature > 0:
                    token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
                else:
                    token = logp.argmax(-1)
                for row in range(n):
                    if finished[row]:
                        continue
                    t = int(token[row])
                    tokens[row].append(t)
                    if params.logprobs is not None:
                        logprobs[row].append(_position_logprobs(logp[row], t, params.logprobs))
                    finished[row] = t in stops
                if all(finished):
                    break
                history = torch.cat([history, token.unsqueeze(1)], dim=1)
                out = self.model(input_ids=token.unsqueeze(1), past_key_values=out.past_key_values, use_cache=True)
            self.generated_tokens += sum(len(t) for t in tokens)
            return [
                Sequence(tokens[row], logprobs[row] if params.logprobs is not None else None,
                         "stop" if finished[row] else "length")
                for row in range(n)
            ]  # fmt: skip


def _position_logprobs(logp: torch.Tensor, token: int, top: int) -> dict[int, tuple[float, int]]:
    """``{token_id: (logprob, rank)}``: the sampled token and the ``top`` most probable ones (rank 1 = most)."""
    value = logp[token]
    entries = {token: (float(value), int((logp > value).sum()) + 1)}
    if top > 0:
        values, ids = logp.topk(top)
        for rank, (v, i) in enumerate(zip(values.tolist(), ids.tolist(), strict=True), start=1):
            entries.setdefault(i, (v, rank))
    return entries
