"""Tiny, locally built models for the TRL-parity tests: a Mixture-of-Experts causal LM, a Qwen2-VL vision-language
model with its processor, and a chat tokenizer whose chat template TRL recognises for tool calling.

Nothing is downloaded. Every tokenizer here is character-level (one token per printable ASCII character) plus the
Qwen chat/vision special tokens, so any text a chat template renders, and any tool call a test fakes, is encodable.
Each builder writes its folder once (``gvpo_trl.demo.model_folder``: complete or absent) and returns the path.
"""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

from gvpo_trl.demo.model_folder import build_model_folder, is_built

ROOT = Path(tempfile.gettempdir()) / "gvpo_trl_tests"
MARKER = "gvpo_trl_tiny.json"

#: Special tokens (never split, skipped when decoding with skip_special_tokens) and plain added tokens (kept).
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]  # fmt: skip
ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
CHARS = sorted(set(string.printable))

#: A Qwen2-VL-style chat template (plain text or content blocks with images).
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _save(path, model_cls, config, tokenizer, spec, seed) -> str:
    """Build ``model_cls(config)`` under ``seed`` and save it with its tokenizer to ``path``, once and atomically."""

    def write(folder):
        import torch

        torch.manual_seed(seed)
        model_cls(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return build_model_folder(path, MARKER, spec, write)


def build_chat_tokenizer(chat_template: str | None = None):
    """A character-level tokenizer with Qwen's special tokens; ``<|im_end|>`` is EOS, ``<|endoftext|>`` PAD."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_moe(path: str | os.PathLike | None = None, seed: int = 0, chat_template: str | None = None) -> str:
    """A randomly initialised 2-layer Qwen3-MoE (4 experts, 2 per token; its config declares
    ``router_aux_loss_coef=0.001`` and ``output_router_logits``) with :func:`build_chat_tokenizer`. With
    ``chat_template`` (e.g. TRL's ``qwen3_chat_template``) the tokenizer can render tool-calling conversations."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    path = Path(path or ROOT / ("tiny-qwen3-moe" + ("-chat" if chat_template else "")))
    spec = {"kind": "qwen3-moe", "seed": seed, "template": chat_template is not None, "version": 1}
    if is_built(path, MARKER, spec):
        return str(path)
    tokenizer = build_chat_tokenizer(chat_template)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return _save(path, Qwen3MoeForCausalLM, config, tokenizer, spec, seed)


def _vl_processor_class():
    from transformers import Qwen2VLProcessor

    class TinyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor without its video processor, whose base class needs torchvision."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return TinyQwen2VLProcessor


def tiny_qwen2_vl_processor(path: str | os.PathLike):
    """The processor of :func:`build_tiny_qwen2_vl` (pass it as ``processing_class``: ``AutoProcessor`` would need
    torchvision for Qwen2-VL's video processor). Images are resized to 8×8 pixels with 4×4 patches: 4 rows of
    ``pixel_values`` per image, merged 2×2 into one ``<|image_pad|>`` token."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path)
    # TRL left-pads prompts; the processor's own outputs (mm_token_type_ids) must be padded the same way to align
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8, max_pixels=8 * 8
    )
    return _vl_processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=VLM_CHAT_TEMPLATE)


def build_tiny_qwen2_vl(path: str | os.PathLike | None = None, seed: int = 0) -> str:
    """A randomly initialised tiny Qwen2-VL (1 vision block, 2 text layers) and its tokenizer, written to ``path``;
    its processor is :func:`tiny_qwen2_vl_processor`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    path = Path(path or ROOT / "tiny-qwen2-vl")
    spec = {"kind": "qwen2-vl", "seed": seed, "version": 1}
    if is_built(path, MARKER, spec):
        return str(path)
    tokenizer = build_chat_tokenizer(VLM_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    rope = {"rope_type": "default", "mrope_section": [1, 1], "rope_theta": 10000.0}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_parameters": dict(rope),
            "layer_types": None,
            "bos_token_id": tokenizer.eos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 1,
            "embed_dim": 16,
            "hidden_size": 16,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    return _save(path, Qwen2VLForConditionalGeneration, config, tokenizer, spec, seed)
