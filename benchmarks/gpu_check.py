"""One-GPU check: step time and peak GPU memory of each gvpo-trl trainer against TRL's ``GRPOTrainer`` on identical
settings, with and without the mixed buffer. Prepared for a lent GPU machine; nothing in CI needs it.

No hub, no vLLM, no SmolLM2: it builds a randomly initialised Llama of about 0.5B parameters (1024 hidden, 26 layers,
4608 MLP) in bf16 with the toy character tokenizer of ``gvpo_trl.demo.toy`` in a local folder, and trains each arm on
the toy task from the same weights: ``--batch`` completions per micro-step (``--batch / --k`` prompts × k),
``steps_per_generation=2``, ``--steps`` optimizer steps, HF ``generate`` of up to ``--max_completion_length``
tokens. Per arm (all in this process, one after another): mean seconds per optimizer step after the first
generation (``--warmup`` steps left out), seconds in generation, completion tokens generated, and
``torch.cuda.max_memory_allocated`` (reset before each arm). Buffer arms: ``buffer_history_per_group=0.5`` on
``--num_train`` distinct prompts, so that each generation after the first reuses history.

About 2-4 minutes on one H200 (estimated, not yet run: the sessions so far had no GPU). The device machine lacks
TRL and datasets and has an older transformers: carry them as wheels (from the repository root, here)::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        trl==1.16.0 transformers==5.23.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18

then run there (``carry: [".whl"]``; ``--cpu_smoke --layers 2 --hidden 64 --mlp 128 --batch 8 --k 4
--max_completion_length 8`` is a dry run of the same code on a CPU)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

ARMS = [("grpo", False), ("gvpo", False), ("gvpo", True), ("gpg", False), ("gpg", True), ("gspo", False),
        ("gspo", True)]  # fmt: skip
BUFFER = dict(buffer_history_per_group=0.5, buffer_max_staleness=64)


def build_model(path: Path, layers: int, hidden: int, mlp: int) -> int:
    """A random bf16 Llama with the toy tokenizer, saved to ``path``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gvpo_trl.demo.toy import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def run_arm(name: str, buffer: bool, model_path: str, args) -> dict:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import gvpo_trl
    from gvpo_trl.demo.toy import build_dataset, repeat_letter_reward

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if name == "grpo" else gvpo_trl.TRAINERS[name]
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args_, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter())

    class Timed(trainer_cls):
        generation_seconds, generated_tokens = 0.0, 0

        def _generate_single_turn(self, *a, **kw):
            sync()
            start = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            sync()
            self.generation_seconds += time.perf_counter() - start
            self.generated_tokens += sum(len(ids) for ids in completion_ids)
            return completion_ids, logprobs

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = config_cls(
            output_dir=out, per_device_train_batch_size=args.batch, num_generations=args.k, steps_per_generation=2,
            max_completion_length=args.max_completion_length, learning_rate=1e-6, max_steps=args.steps,
            logging_steps=1, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False, save_strategy="no",
            report_to=[], disable_tqdm=True, seed=0, **(BUFFER if buffer else {}),
        )  # fmt: skip
        trainer = Timed(
            model=model_path, reward_funcs=repeat_letter_reward, args=config,
            train_dataset=build_dataset(args.num_train), callbacks=[times],
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    steps = [b - a for a, b in zip([start, *times.times], times.times, strict=False)][args.warmup :]
    result = {
        "arm": f"{name}{' + buffer' if buffer else ''}",
        "seconds_per_step": sum(steps) / max(len(steps), 1),
        "train_seconds": total,
        "generation_seconds": trainer.generation_seconds,
        "generated_tokens": trainer.generated_tokens,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
    }
    del trainer
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first optimizer steps left out of s/step")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=128)
    parser.add_argument("--num_train", type=int, default=8)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=4608)
    parser.add_argument("--output", default=None, help="also write the results (JSON) here")
    parser.add_argument("--cpu_smoke", action="store_true", help="run without a GPU (pass tiny sizes): a dry run")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("gpu_check.py needs a CUDA GPU (CPU figures: benchmarks/generators.py).")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        params = build_model(Path(folder), args.layers, args.hidden, args.mlp)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run)"
        print(f"random Llama: {params / 1e6:.0f}M parameters, bf16, on {device}", flush=True)
        results = []
        for name, buffer in ARMS:
            results.append(run_arm(name, buffer, folder, args))
            print(json.dumps(results[-1]), flush=True)
    base = results[0]
    print(f"\nbatch {args.batch} (k={args.k}), max_completion_length {args.max_completion_length}, {args.steps} steps, "
          f"steps_per_generation 2; {time.perf_counter() - start:.0f} s in all\n")  # fmt: skip
    print("| arm | s / step | vs GRPO | generation s | generated tokens | peak GPU memory (GiB) | vs GRPO |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['arm']} | {r['seconds_per_step']:.3f} | {r['seconds_per_step'] / base['seconds_per_step']:.2f}× | "
              f"{r['generation_seconds']:.1f} | {r['generated_tokens']} | {r['peak_gib']:.2f} | "
              f"{r['peak_gib'] / base['peak_gib']:.2f}× |")  # fmt: skip
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
