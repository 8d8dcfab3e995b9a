"""A stand-in for vLLM that the tests own. It is NOT vLLM and makes no claim to vLLM's speed or numerics.

vLLM cannot be installed on the CPU machines this project is tested on, yet TRL's vLLM code path
(``trl/generation/vllm_generation.py``, ``vllm_client.py``) is what a GPU user runs. This package implements the small
surface of vLLM that TRL 1.16 touches, so that TRL's own code runs unchanged against it:

- ``site/vllm/``: the importable ``vllm`` package (put ``tests/vllm_standin/site`` on ``sys.path`` / ``PYTHONPATH`` of
  a test's subprocess only, never of the pytest process): ``LLM`` (colocate mode, with the weight-loading call TRL's
  sync makes), ``SamplingParams``, ``RequestOutput``, ``get_ip`` and the weight-transfer helpers ``VLLMClient``
  imports. Its version string is ``0.30.0+standin`` (TRL picks its vLLM >= 0.28 code paths).
- ``engine.py``: the generator behind both modes: a transformers causal LM, sampled token by token with vLLM's
  sampling parameters, returning the log-probs of the processed distribution each token was drawn from
  (``logprobs_mode="processed_logprobs"``, as TRL asks for).
- ``server.py``: ``python -m tests.vllm_standin.server --model PATH --port P``: an HTTP server on 127.0.0.1 answering
  the requests ``VLLMClient`` sends to ``vllm serve`` (``/health``, ``/v1/models``, ``/server_info``,
  ``/get_world_size``, ``/v1/completions``, the weight-update and prefix-cache endpoints), plus ``/standin/weights``
  for tests to read its weights.
- ``channel.py``: the CPU replacement for the NCCL weight-update group: a gloo process group of two ranks (trainer 0,
  server 1) on its own TCP store, independent of the trainer's default process group.

The one thing the tests change in TRL's behaviour: ``VLLMClient.init_communicator`` refuses any device but CUDA
(vLLM's weight transfer is NCCL). :func:`allow_cpu_weight_transfer` passes it the device name ``"cuda"`` (no index, so
nothing is moved or selected); every line of TRL's method then runs as written, against the gloo channel.
"""

from __future__ import annotations

from pathlib import Path

#: The folder to put on ``sys.path`` for ``import vllm`` to find the stand-in.
SITE = Path(__file__).resolve().parent / "site"


def allow_cpu_weight_transfer() -> None:
    """Let TRL's ``VLLMClient.init_communicator`` run on a CPU trainer: it is called with ``device="cuda"``."""
    from trl.generation.vllm_client import VLLMClient

    original = VLLMClient.init_communicator
    if getattr(original, "_standin", False):
        return

    def init_communicator(self, device=0):
        return original(self, device="cuda")

    init_communicator._standin = True
    VLLMClient.init_communicator = init_communicator
