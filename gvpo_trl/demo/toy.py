"""A tiny, offline causal LM and a verifiable task for quickstarts, tests and benchmarks.

Nothing here downloads anything: the tokenizer is a character-level ``PreTrainedTokenizerFast`` and the model a
randomly initialised 2-layer Llama (about 80k parameters), both written to a local folder so that TRL can re-load
them by path (it does so for the reference model when ``beta != 0``).

The task ("repeat the letter"): the prompt is ``"<letters>:"``; the completion earns, for each of its characters,
credit when it equals the prompt's first letter, up to ``TARGET_LENGTH`` characters, and stops at ``</s>``. A random
policy scores about 1/|vocab| with a real spread across a group, so group-relative methods get a signal at once.
"""

from __future__ import annotations

import os
import random

from .model_folder import build_model_folder, cache_root

LETTERS = "abcdefgh"
TARGET_LENGTH = 8
MARKER = "gvpo_trl_toy.json"
_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
_CHARS = list(LETTERS) + list("ijklmnop") + list(":0123456789 ")


def build_tokenizer():
    """A character-level tokenizer: one token per character, ``</s>`` as EOS, ``<pad>`` as PAD."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL + _CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("</s>|<s>|<pad>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_model(path: str | os.PathLike, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> str:
    """Write a randomly initialised tiny Llama and its tokenizer to ``path`` (once, atomically) and return the path.

    The same ``seed`` always gives the same weights, so runs that start from this folder are reproducible.
    """
    spec = {"seed": seed, "hidden_size": hidden_size, "num_layers": num_layers, "version": 1}

    def write(folder):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = build_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return build_model_folder(path, MARKER, spec, write)


def default_model_path() -> str:
    """Where the tiny model lives unless told otherwise: ``$GVPO_TRL_CACHE/tiny-llama`` (``model_folder``)."""
    return build_tiny_model(cache_root() / "tiny-llama")


def make_prompt(letter: str, rng: random.Random) -> str:
    """``"<letter><two distractor letters>:"``: the letter to repeat comes first."""
    return letter + "".join(rng.choice(LETTERS) for _ in range(2)) + ":"


def build_dataset(num_prompts: int = 256, seed: int = 0):
    """A ``datasets.Dataset`` with a ``prompt`` column (standard, non-conversational format)."""
    from datasets import Dataset

    rng = random.Random(seed)
    prompts = [make_prompt(LETTERS[i % len(LETTERS)], rng) for i in range(num_prompts)]
    return Dataset.from_dict({"prompt": prompts})


def repeat_letter_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Fraction of the first ``TARGET_LENGTH`` completion characters equal to the prompt's first letter."""
    return [
        sum(c == p[0] for c in comp[:TARGET_LENGTH]) / TARGET_LENGTH
        for p, comp in zip(prompts, completions, strict=False)
    ]
