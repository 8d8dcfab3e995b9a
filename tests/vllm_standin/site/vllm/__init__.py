"""The vLLM stand-in of gvpo-trl's tests: NOT vLLM. See ``tests/vllm_standin/__init__.py``.

Only the names TRL 1.16 imports exist. The version string makes TRL's ``is_vllm_available`` true and selects its
vLLM >= 0.28 code paths; the ``+standin`` local label says what this is.
"""

from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.30.0+standin"
__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
