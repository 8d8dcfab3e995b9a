"""Compare GVPO, GPG, GSPO and TRL's own GRPOTrainer on the toy "repeat the letter" task with identical settings.

Each trainer starts from the same tiny model (gvpo_trl.demo.toy, built locally: nothing is downloaded), trains for
the same number of optimizer steps on the same prompts with per_device_train_batch_size=16, num_generations=4,
max_completion_length=10, and is evaluated (mean reward of 4 sampled completions for each of 64 held-out prompts,
TRL's ``evaluate``) before and after. Every algorithm keeps its own defaults otherwise (e.g. GVPO and GSPO make 4
optimizer steps per rollout, GPG and GRPO one), and its own learning rate (``--lr``).

    python benchmarks/compare_trainers.py                       # all four, 240 steps
    python benchmarks/compare_trainers.py --algorithms gpg gspo --steps 30 --lr gspo=0.1
    python benchmarks/compare_trainers.py --algorithms gpg --set gpg.min_valid_fraction=0   # GPG without β_th
    OMP_NUM_THREADS=1 python benchmarks/compare_trainers.py --json results.json

Time per step is the training wall time (generation included) divided by the steps; on a shared CPU it varies with
the load, so compare trainers within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

#: The best of a small sweep (3e-4 to 1e-1, seed 0) for each trainer on this task at 240 steps (docs/gpg_gspo.md).
DEFAULT_LR = {"grpo": 1e-3, "gvpo": 3e-3, "gpg": 1e-3, "gspo": 3e-3}


def build(algorithm: str, output_dir: str, steps: int, lr: float, seed: int, overrides: dict | None = None):
    from trl import GRPOConfig, GRPOTrainer

    import gvpo_trl
    from gvpo_trl.demo.toy import build_dataset, default_model_path, repeat_letter_reward

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else gvpo_trl.TRAINERS[algorithm]
    args = config_cls(
        output_dir=output_dir,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        num_generations=4,
        max_completion_length=10,
        learning_rate=lr,
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        temperature=1.0,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
        **(overrides or {}),
    )
    return trainer_cls(
        model=default_model_path(),
        reward_funcs=repeat_letter_reward,
        args=args,
        train_dataset=build_dataset(256, seed=seed),
        eval_dataset=build_dataset(64, seed=seed + 1),
    )


def run(algorithm: str, steps: int, lr: float, seed: int, overrides: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build(algorithm, output_dir, steps, lr, seed, overrides)
        before = trainer.evaluate()["eval_reward"]
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        after = trainer.evaluate()["eval_reward"]
    train_rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h and "loss" in h]
    return {
        "algorithm": algorithm,
        "lr": lr,
        "overrides": overrides or {},
        "steps": steps,
        "steps_per_generation": trainer.args.steps_per_generation,
        "eval_reward_before": before,
        "eval_reward_after": after,
        "train_reward_first5": sum(train_rewards[:5]) / max(len(train_rewards[:5]), 1),
        "train_reward_last5": sum(train_rewards[-5:]) / max(len(train_rewards[-5:]), 1),
        "seconds_per_step": seconds / steps,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "gvpo", "gpg", "gspo"], choices=list(DEFAULT_LR))
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", nargs="*", default=[], metavar="ALG=LR", help="e.g. gspo=0.1 gpg=0.003")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="ALG.FIELD=VALUE", help="config override, e.g. gpg.min_valid_fraction=0"
    )
    parser.add_argument("--json", help="also write the results to this file")
    cli = parser.parse_args(argv)
    lrs = dict(DEFAULT_LR)
    for item in cli.lr:
        name, value = item.split("=")
        lrs[name] = float(value)
    overrides = {name: {} for name in DEFAULT_LR}
    for item in cli.set:
        key, value = item.split("=", 1)
        name, field = key.split(".", 1)
        overrides[name][field] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value

    import torch

    print(f"torch threads: {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    results = []
    for name in cli.algorithms:
        results.append(run(name, cli.steps, lrs[name], cli.seed, overrides[name]))
        print("RESULT " + json.dumps(results[-1]), flush=True)  # as each run ends (the table comes at the end)
    header = f"{'algorithm':<10}{'lr':>8}{'steps/gen':>10}{'eval before':>13}{'eval after':>12}{'train first5':>14}"
    header += f"{'train last5':>13}{'s/step':>9}"
    print(header)
    for r in results:
        print(
            f"{r['algorithm']:<10}{r['lr']:>8.0e}{r['steps_per_generation']:>10}{r['eval_reward_before']:>13.3f}"
            f"{r['eval_reward_after']:>12.3f}{r['train_reward_first5']:>14.3f}{r['train_reward_last5']:>13.3f}"
            f"{r['seconds_per_step']:>9.3f}"
        )
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
