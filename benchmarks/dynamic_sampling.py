"""What dynamic sampling (GPG's β_th, ``gvpo_trl.dynamic_sampling``) costs in generation: completion tokens generated
per completion token trained on, generation calls per optimizer step, s/step, and the reward, against TRL's
GRPOTrainer on identical settings.

Arms (each in its own subprocess, one after the other, same seed, prompts, batch and learning rate):

- ``grpo``: TRL's ``GRPOTrainer`` (trains on everything it generates: 1.00× by construction, measured anyway);
- ``gpg``: ``GPGTrainer`` with its defaults (β_th = 0.6, rounds sized from what is missing, surplus valid groups
  carried over to the next step);
- ``gpg-whole-rounds``: the same, but every extra round generates a whole generation batch of new prompts and surplus
  valid groups are discarded, as gvpo-trl did before (``round_size`` replaced by the batch size, no carry-over);
- ``gpg-off``: ``GPGTrainer`` with ``min_valid_fraction=0`` (no dynamic sampling);
- ``gvpo-ds`` / ``gspo-ds``: GVPO and GSPO with ``min_valid_fraction=0.6`` (opt-in).

Tasks: ``--task toy`` (the tiny offline Llama, "repeat the letter", 16 prompts × k=4 per step) and ``--task smollm2``
(SmolLM2-135M-Instruct materialised offline, chat additions, 2 prompts × k=4 per step as benchmarks/real_model.py).
Counted in the trainer: generated tokens are every completion token ``_generate`` returns (``buffer/generated_tokens``);
trained tokens are the completion tokens of every batch that reaches the loss; a generation call is one
``_generate``. The reward is held-out reward before/after (TRL's ``evaluate`` under a fixed seed) and the training
reward of the trained batches. Written to ``--output_dir``: ``results.json``, ``results.md``, ``reward_curve.png``.

    OMP_NUM_THREADS=1 python benchmarks/dynamic_sampling.py --task toy --steps 60
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/dynamic_sampling.py --task smollm2 --steps 40 \\
        --algorithms grpo gpg gpg-whole-rounds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("grpo", "gpg", "gpg-whole-rounds", "gpg-off", "gvpo-ds", "gspo-ds")
TASKS = {
    "toy": dict(batch=64, k=4, max_completion_length=10, lr=1e-3, num_eval=64, steps=60),
    "smollm2": dict(batch=8, k=4, max_completion_length=16, lr=1e-5, num_eval=24, steps=40),
}


def instrumented(trainer_cls):
    """``trainer_cls`` counting generation calls, generated and trained completion tokens, and trained rewards."""

    class Counting(trainer_cls):
        counts = None
        cumulative: list = []  # (step, generated, trained) after each generation batch

        def _generate(self, prompts):
            output = super()._generate(prompts)
            if self.model.training:
                self.counts["generation_calls"] += 1
                self.counts["generated_tokens"] += sum(len(ids) for ids in output[1])
            return output

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if self.model.training:
                self.counts["trained_tokens"] += int(output["completion_mask"].sum().item())
                self.counts["batches"] += 1
                self.cumulative.append((self.state.global_step, self.counts["generated_tokens"],
                                        self.counts["trained_tokens"]))  # fmt: skip
            return output

    return Counting


def task_data(task: str, seed: int, num_eval: int):
    if task == "toy":
        from gvpo_trl.demo.toy import build_dataset, default_model_path, repeat_letter_reward

        return default_model_path(), repeat_letter_reward, build_dataset(256, seed=seed), build_dataset(num_eval, 99)
    from gvpo_trl.demo.chat_tasks import addition_reward, build_datasets
    from gvpo_trl.demo.smollm2 import materialize_smollm2

    train, held_out = build_datasets(num_eval=num_eval, seed=seed)
    return materialize_smollm2(), addition_reward, train, held_out


def run_arm(arm: str, args) -> dict:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    import gvpo_trl
    import gvpo_trl.dynamic_sampling as dynamic_sampling

    algorithm = arm.split("-")[0]
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else gvpo_trl.TRAINERS[algorithm]
    extra = {"gpg-off": dict(min_valid_fraction=0.0), "gpg-whole-rounds": dict(dynamic_sampling_carry_over=False),
             "gvpo-ds": dict(min_valid_fraction=0.6),
             "gspo-ds": dict(min_valid_fraction=0.6)}.get(arm, {})  # fmt: skip
    if arm == "gpg-whole-rounds":  # the sizing gvpo-trl had before: every extra round is a whole batch
        dynamic_sampling.round_size = lambda missing, valid, seen, procs, max_groups: max_groups
    model, reward, train, held_out = task_data(args.task, args.seed, args.num_eval)
    with tempfile.TemporaryDirectory() as output_dir:
        config = config_cls(
            output_dir=output_dir, per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.num_eval,
            num_generations=args.k, max_completion_length=args.max_completion_length, learning_rate=args.lr,
            max_steps=args.steps, logging_steps=1, seed=args.seed, bf16=False, gradient_checkpointing=False,
            use_cpu=True, save_strategy="no", report_to=[], disable_tqdm=True, **extra,
        )  # fmt: skip
        trainer = instrumented(trainer_cls)(model=model, reward_funcs=reward, args=config, train_dataset=train)
        trainer.counts = dict.fromkeys(("generation_calls", "generated_tokens", "trained_tokens", "batches"), 0)

        def held_out_reward():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                return trainer.evaluate(eval_dataset=held_out)["eval_reward"]

        before = held_out_reward()
        trainer.counts, trainer.cumulative = dict.fromkeys(trainer.counts, 0), []
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        counts = dict(trainer.counts)
        after = held_out_reward()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    steps = trainer.state.global_step
    return {
        "arm": arm, "steps": steps, "held_out_before": before, "held_out_after": after,
        "seconds_per_step": seconds / max(steps, 1), **counts,
        "generated_per_trained": counts["generated_tokens"] / max(counts["trained_tokens"], 1),
        "calls_per_step": counts["generation_calls"] / max(steps, 1),
        "mean_extra_rounds": sum(e.get("dynamic_sampling/rounds", 0) for e in logs) / max(len(logs), 1),
        "mean_batch_valid_fraction": sum(e.get("dynamic_sampling/batch_valid_fraction", 0) for e in logs)
        / max(len(logs), 1),
        "curve": [(e["step"], e["reward"]) for e in logs if "reward" in e],
        # generated / trained tokens over the first n steps
        "ratio_by_step": {n: next((g / max(t, 1) for step, g, t in trainer.cumulative[::-1] if step < n), None)
                          for n in (10, 16, 40, steps)},
    }  # fmt: skip


def write_report(results: list[dict], args, out: Path, command: str) -> None:
    rows = [
        "| arm | generated / trained tokens | … over the first 10 / 16 steps | generation calls / step "
        "| extra rounds / step | batch valid fraction | s/step | held-out before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['arm']} | failed: {r['error']} |")
            continue
        valid = f"{r['mean_batch_valid_fraction']:.2f}" if r["mean_extra_rounds"] or "gpg" in r["arm"] else "–"
        early = r.get("ratio_by_step", {})
        first = " / ".join(f"{early[n]:.2f}×" if early.get(n) else "–" for n in ("10", "16"))
        rows.append(
            f"| {r['arm']} | **{r['generated_per_trained']:.2f}×** | {first} | {r['calls_per_step']:.2f} | "
            f"{r['mean_extra_rounds']:.2f} | {valid} | {r['seconds_per_step']:.2f} | "
            f"{r['held_out_before']:.3f} → {r['held_out_after']:.3f} |"
        )
    header = (
        f"`{command}` ({time.strftime('%Y-%m-%d')}; task {args.task}; {args.steps} steps; batch {args.batch} = "
        f"{args.batch // args.k} prompts × k={args.k}; lr {args.lr:g}; max_completion_length "
        f"{args.max_completion_length}; seed {args.seed})"
    )
    (out / "results.md").write_text(header + "\n\n" + "\n".join(rows) + "\n")
    (out / "results.json").write_text(
        json.dumps({"command": command, "args": vars(args), "results": results}, indent=1)
    )
    print(header + "\n\n" + "\n".join(rows))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.get("curve"):
            steps, rewards = zip(*r["curve"], strict=True)
            window = 5
            smooth = [sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
                      for i in range(len(rewards))]  # fmt: skip
            ax.plot(steps, smooth, label=f"{r['arm']} ({r['generated_per_trained']:.2f}× tokens)")
    ax.set(xlabel="optimizer step", ylabel="training reward (mean of last 5 logs)")
    ax.set_title(f"Dynamic sampling, {args.task}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="toy")
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "gpg", "gpg-whole-rounds"], choices=ARMS)
    for name in ("batch", "k", "max_completion_length", "num_eval", "steps"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir")
    parser.add_argument("--_arm", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in TASKS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args._arm:
        Path(args._result).write_text(json.dumps(run_arm(args._arm, args)))
        return
    out = Path(args.output_dir or f"outputs/dynamic_sampling_{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for arm in args.algorithms:
        result_file = out / f"{arm}.json"
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--_arm", arm,
               "--_result", str(result_file)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"arm": arm, "error": proc.stderr.strip().splitlines()[-1][:200]})
        else:
            results.append(json.loads(result_file.read_text()))
        print(f"{arm}: done", flush=True)
    command = "python benchmarks/dynamic_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(results, args, out, command.strip())


if __name__ == "__main__":
    main()
