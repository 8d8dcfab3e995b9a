"""Generation throughput and step time of TRL's two CPU generators, HF ``generate`` and transformers' continuous
batching (``use_transformers_continuous_batching``), for TRL's ``GRPOTrainer`` and each gvpo-trl trainer, plain and
with the mixed buffer, on SmolLM2-135M-Instruct (materialised offline by ``gvpo_trl.demo.smollm2``).

Every arm runs in this one process, in turn, from the same weights, on the same prompts and settings: ``--batch``
completions per step (``--batch / --k`` prompts × ``--k``), one generation per optimizer step
(``steps_per_generation=1`` for every arm, so that the arms generate equally often), ``--steps`` steps. The training
prompts are ``--num_train`` fixed additions, so that they recur and the buffer arms (half of each group from history,
``buffer_history_per_group=0.5``) have history after their first generation. Measured per arm: completion tokens the
policy generated and the seconds spent generating (both summed over TRL's ``_generate_single_turn`` calls), and
seconds per optimizer step (the whole step: generation, scoring, the loss and the update), each as wall time and as
this process's CPU time (one thread: on a shared machine the CPU time is what the arm itself cost, the wall time also
counts waiting for the core). Ratios are taken within one run.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/generators.py                 # about 5-10 min on 2 CPU cores
    python benchmarks/generators.py --trainers gvpo --generators hf cb --steps 2        # a shorter look

Prints a markdown table and writes it (and the raw numbers) to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

GENERATORS = {"hf": {}, "cb": {"use_transformers_continuous_batching": True}}
TRAINERS = ("grpo", "gvpo", "gpg", "gspo")
BUFFER = dict(buffer_history_per_group=0.5, buffer_max_staleness=32)


def timed_generation(cls):
    """``cls`` summing the wall time and the completion tokens of every ``_generate_single_turn`` call (TRL's call of
    the generator itself)."""

    class Timed(cls):
        generation_seconds = generation_cpu_seconds = 0.0
        generated_tokens = 0

        def _generate_single_turn(self, *args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
            self.generation_seconds += time.perf_counter() - start
            self.generation_cpu_seconds += time.process_time() - cpu
            self.generated_tokens += sum(len(ids) for ids in completion_ids)
            return completion_ids, logprobs

    return Timed


def run_arm(trainer_name: str, generator: str, buffer: bool, args) -> dict:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    import gvpo_trl
    from gvpo_trl.demo.chat_tasks import addition_reward, build_datasets
    from gvpo_trl.demo.smollm2 import materialize_smollm2

    if trainer_name == "grpo":
        config_cls, trainer_cls = GRPOConfig, GRPOTrainer
    else:
        config_cls, trainer_cls = gvpo_trl.TRAINERS[trainer_name]
    train, _ = build_datasets(num_eval=1, seed=args.seed)
    train = train.select(range(args.num_train))
    extra = dict(GENERATORS[generator])
    if generator == "cb":  # size the paged cache for this batch: the default sizes it from free memory (slow on CPU)
        extra["transformers_continuous_batching_config"] = dict(
            page_size=16, num_blocks=args.cb_blocks, max_batch_tokens=args.cb_batch_tokens
        )
    if buffer:
        extra.update(BUFFER)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        config = config_cls(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch,
            num_generations=args.k,
            steps_per_generation=1,
            max_completion_length=args.max_completion_length,
            temperature=1.0,
            learning_rate=1e-5,
            max_steps=args.steps,
            logging_steps=1,
            seed=args.seed,
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            **extra,
        )
        trainer = timed_generation(trainer_cls)(
            model=materialize_smollm2(), reward_funcs=addition_reward, args=config, train_dataset=train
        )
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    logs = trainer.state.log_history
    tokens = trainer.generated_tokens
    return {
        "trainer": trainer_name,
        "generator": generator,
        "buffer": buffer,
        "steps": trainer.state.global_step,
        "generated_tokens": tokens,
        "generation_seconds": trainer.generation_seconds,
        "tokens_per_second": tokens / max(trainer.generation_seconds, 1e-9),
        "tokens_per_cpu_second": tokens / max(trainer.generation_cpu_seconds, 1e-9),
        "seconds_per_step": seconds / max(trainer.state.global_step, 1),
        "cpu_seconds_per_step": cpu_seconds / max(trainer.state.global_step, 1),
        "reward": sum(e["reward"] for e in logs if "reward" in e) / max(1, sum(1 for e in logs if "reward" in e)),
    }


def table(results: list[dict]) -> str:
    base = {(r["trainer"], r["buffer"]): r for r in results if r["generator"] == "hf"}
    rows = [
        "| trainer | buffer | generator | generated tokens | tokens vs plain | generation tok/s (wall) | "
        "tok/s per CPU s | s / step (wall) | CPU s / step | CPU s / step vs HF generate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {(r["trainer"], r["generator"]): r for r in results if not r["buffer"]}
    for r in results:
        hf = base.get((r["trainer"], r["buffer"]))
        ref = plain.get((r["trainer"], r["generator"]))
        tokens_ratio = f"{r['generated_tokens'] / ref['generated_tokens']:.2f}×" if ref else "–"
        step_ratio = f"{r['cpu_seconds_per_step'] / hf['cpu_seconds_per_step']:.2f}×" if hf else "–"
        rows.append(
            f"| {r['trainer']} | {'on' if r['buffer'] else 'off'} | {r['generator']} | {r['generated_tokens']:.0f} | "
            f"{tokens_ratio} | {r['tokens_per_second']:.1f} | {r['tokens_per_cpu_second']:.1f} | "
            f"{r['seconds_per_step']:.1f} | {r['cpu_seconds_per_step']:.1f} | {step_ratio} |"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--num_train", type=int, default=2, help="distinct training prompts (they recur)")
    parser.add_argument("--max_completion_length", type=int, default=16)
    parser.add_argument("--cb_blocks", type=int, default=64)
    parser.add_argument("--cb_batch_tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/benchmark-generators")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    results = []
    start = time.perf_counter()
    for trainer_name in args.trainers:
        for buffer in (False, True) if trainer_name != "grpo" else (False,):
            for generator in args.generators:  # the generators alternate: load drifts alike on both
                results.append(run_arm(trainer_name, generator, buffer, args))
                print(json.dumps(results[-1]), flush=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/generators.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = (
        f"`{command.strip()}` ({time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s in all; "
        f"SmolLM2-135M-Instruct, batch {args.batch} = {args.batch // args.k} prompts × k={args.k}, "
        f"max_completion_length {args.max_completion_length}, {args.steps} steps per arm, steps_per_generation 1, "
        f"{args.num_train} distinct prompts)\n\n{table(results)}\n"
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(report)


if __name__ == "__main__":
    main()
