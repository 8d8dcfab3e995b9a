"""A conversational task for real chat models, generated locally (nothing downloaded): small additions and chain sums.

Each prompt is one user message, ``"What is 7 + 5? Reply with only the number."`` (operands 1..``MAX_OPERAND``;
with ``terms=3``, a chain sum: ``"What is 7 + 5 + 2? Reply with only the number."``), and the reward
(:func:`addition_reward`, in [0, 1]) grades the assistant's reply:

- 1.0: the reply is exactly the right number (whitespace and a trailing period aside);
- 0.5: the right number appears in the reply among other text (``"7 + 5 = 12"``);
- 0.25: the reply is just a number, a wrong one;
- 0.0: anything else.

SmolLM2-135M-Instruct, sampled at temperature 1, starts at a mean reward of about 0.2 with rewards that differ
inside most groups (it rambles, sometimes says the sum, sometimes answers with a bare wrong number), so
group-relative methods get a signal from the first step; see docs/real_model.md.
"""

from __future__ import annotations

import itertools
import random
import re

MAX_OPERAND = 9
TEMPLATE = "What is {terms}? Reply with only the number."
_NUMBER = re.compile(r"-?\d+")


def addition_pairs(seed: int = 0, max_operand: int = MAX_OPERAND, terms: int = 2) -> list[tuple[int, ...]]:
    """All ordered tuples of ``terms`` operands in ``1..max_operand``, shuffled with ``seed``."""
    if terms < 2:
        raise ValueError(f"a sum needs at least 2 terms, got terms={terms}")
    pairs = list(itertools.product(range(1, max_operand + 1), repeat=terms))
    random.Random(seed).shuffle(pairs)
    return pairs


def make_prompt(*operands: int) -> list[dict[str, str]]:
    """The conversational prompt (one user turn) for ``a + b (+ c ...)``."""
    return [{"role": "user", "content": TEMPLATE.format(terms=" + ".join(map(str, operands)))}]


def build_datasets(num_eval: int = 32, seed: int = 0, max_operand: int = MAX_OPERAND, terms: int = 2):
    """``(train, eval)`` ``datasets.Dataset``s with a conversational ``prompt`` column and an ``answer`` column
    (the sum, as a string). The ``num_eval`` held-out sums never occur in the training set."""
    from datasets import Dataset

    pairs = addition_pairs(seed, max_operand, terms)
    if not 0 < num_eval < len(pairs):
        raise ValueError(f"num_eval must be between 1 and {len(pairs) - 1}")

    def dataset(rows):
        return Dataset.from_dict({"prompt": [make_prompt(*r) for r in rows], "answer": [str(sum(r)) for r in rows]})

    return dataset(pairs[num_eval:]), dataset(pairs[:num_eval])


def grade(reply: str, answer: str) -> float:
    """The reward of one reply (see the module docstring)."""
    text = reply.strip().rstrip(".").strip()
    numbers = _NUMBER.findall(reply)
    if _NUMBER.fullmatch(text):
        return 1.0 if int(text) == int(answer) else 0.25
    return 0.5 if answer in numbers else 0.0


def addition_reward(completions, answer, **kwargs) -> list[float]:
    """TRL reward function: conversational completions (lists of messages) or plain strings, graded by :func:`grade`."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [grade(text, ans) for text, ans in zip(texts, answer, strict=False)]
