"""``trainer_init`` as TRL's ``VLLMClient`` calls it (vLLM >= 0.28): here it opens the gloo channel of the stand-in."""

from tests.vllm_standin.channel import WeightChannel, join


def trainer_init(init_info: dict) -> WeightChannel:
    return join(init_info, rank=0)
