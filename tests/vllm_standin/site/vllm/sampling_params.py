"""``SamplingParams`` of the stand-in: the engine's :class:`Sampling`, refusing what the stand-in does not do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.vllm_standin.engine import Sampling


@dataclass
class StructuredOutputsParams:
    regex: str | None = None


@dataclass
class SamplingParams(Sampling):
    structured_outputs: Any = None

    def __post_init__(self):
        if self.structured_outputs is not None:
            raise NotImplementedError("the vLLM stand-in of the tests does not implement structured outputs")
