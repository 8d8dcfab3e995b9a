"""Mixed buffers: reward against generated tokens, fresh-only vs half of each group from history (GVPO and GRPO).

Runs the offline quickstart task (``gvpo_trl.toy``: a tiny random Llama learns "repeat the letter"; the settings of
``examples/train.py``'s quickstart) four times with the same seed:

- GVPO fresh-only, and GVPO with ``buffer_history_per_group=0.5`` (2 of each group of 4 from history);
- GRPO (TRL's ``GRPOTrainer`` + gvpo-trl's ``BufferMixin``; with the buffer off it is TRL's GRPO unchanged), the same
  two ways. GRPO has no off-policy correction here: its historical members are treated like fresh ones.

The mixed runs are trained for ``--mixed-steps`` (default 2 × ``--steps``) so that they can spend as many generated
tokens as the fresh-only runs. Reported, per algorithm:

- the fresh-only run's final reward: the mean reward of the FRESH samples (``buffer/fresh_reward``, the current
  policy's own samples) over its last ``--window`` generations, and its generated tokens (completion tokens only);
- the generated tokens at which the mixed run's trailing mean over ``--window`` generations first reaches that
  reward, as a fraction of the fresh-only run's tokens (the target is ≤ 0.6);
- held-out rewards (``--eval-prompts`` prompts never trained on, one sampled completion each, fixed seed): the
  fresh-only run at its end, the mixed run when it has generated 0.6 × the fresh-only run's tokens, and at its end.

Writes ``mixed_buffer.md`` (the table), ``mixed_buffer.png`` (reward against generated tokens) and
``mixed_buffer.json`` (every curve) to ``--output-dir``. About 10 minutes on 2 CPU cores with the defaults:

    python benchmarks/mixed_buffer.py
    python benchmarks/mixed_buffer.py --steps 300 --algorithms gvpo   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from gvpo_trl import GVPOConfig, GVPOTrainer, toy
from gvpo_trl.buffer import BufferArgs, BufferMixin, check_buffer_config


@dataclass
class BufferedGRPOConfig(GRPOConfig, BufferArgs):
    """TRL's ``GRPOConfig`` plus the mixed-buffer fields."""

    def __post_init__(self):
        super().__post_init__()
        check_buffer_config(self, type(self).__name__)


class BufferedGRPOTrainer(BufferMixin, GRPOTrainer):
    """TRL's GRPO with gvpo-trl's mixed buffer (inert, apart from its token metrics, when the buffer is off)."""


ALGORITHMS = {"gvpo": (GVPOConfig, GVPOTrainer), "grpo": (BufferedGRPOConfig, BufferedGRPOTrainer)}

# examples/train.py's quickstart settings (flags the user did not pass), for the toy task on CPU
QUICKSTART = dict(
    learning_rate=1e-2,
    per_device_train_batch_size=16,
    num_generations=4,
    max_completion_length=10,
    temperature=1.0,
    bf16=False,
    gradient_checkpointing=False,
    use_cpu=True,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    logging_steps=1,
)


def heldout_reward(trainer, prompts: list[str], seed: int) -> float:
    """Mean reward of one sampled completion per held-out prompt (training sampling settings, fixed seed)."""
    model, tokenizer, args = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, trainer.args
    config = GenerationConfig(do_sample=True, max_new_tokens=args.max_completion_length, temperature=args.temperature,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    was_training, rewards = model.training, []
    model.eval()
    with torch.random.fork_rng(), torch.no_grad():  # leaves the training run's random state untouched
        torch.manual_seed(seed)
        for start in range(0, len(prompts), 64):
            batch = prompts[start : start + 64]
            inputs = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left").to(model.device)
            out = model.generate(**inputs, generation_config=config)
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            rewards += toy.repeat_letter_reward(batch, texts)
    model.train(was_training)
    return sum(rewards) / len(rewards)


class Recorder(TrainerCallback):
    """Per generation: cumulative generated tokens, reward of the fresh samples, historical share. Optionally scores
    the held-out prompts once the run has generated ``eval_at_tokens``."""

    def __init__(self, eval_prompts, seed, eval_at_tokens=None):
        self.trainer, self.points, self.eval_prompts, self.seed = None, [], eval_prompts, seed
        self.eval_at_tokens, self.heldout_at = eval_at_tokens, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "buffer/generated_tokens_total" in logs:
            reward = logs.get("buffer/fresh_reward", logs.get("reward"))
            self.points.append((state.global_step, logs["buffer/generated_tokens_total"], reward,
                                logs.get("buffer/historical_share", 0.0)))  # fmt: skip
            tokens = logs["buffer/generated_tokens_total"]
            if self.eval_at_tokens is not None and self.heldout_at is None and tokens >= self.eval_at_tokens:
                self.heldout_at = (tokens, heldout_reward(self.trainer, self.eval_prompts, self.seed))


def trailing_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def run(algorithm, mixed, args, train_dataset, eval_prompts, eval_at_tokens=None):
    config_cls, trainer_cls = ALGORITHMS[algorithm]
    name = f"{algorithm}-{'mixed' if mixed else 'fresh'}"
    buffer = dict(buffer_history_per_group=args.history, buffer_max_staleness=args.max_staleness) if mixed else {}
    config = config_cls(output_dir=os.path.join(args.output_dir, name), seed=args.seed,
                        max_steps=args.mixed_steps if mixed else args.steps, **QUICKSTART, **buffer)  # fmt: skip
    trainer = trainer_cls(model=toy.default_model_path(), reward_funcs=toy.repeat_letter_reward, args=config,
                          train_dataset=train_dataset)  # fmt: skip
    recorder = Recorder(eval_prompts, args.seed, eval_at_tokens)
    recorder.trainer = trainer
    trainer.add_callback(recorder)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    final_heldout = heldout_reward(trainer, eval_prompts, args.seed)
    steps, tokens, rewards, shares = (list(x) for x in zip(*recorder.points, strict=False))
    print(f"{name}: {trainer.state.global_step} steps, {tokens[-1]:.0f} generated tokens, {elapsed:.0f} s, "
          f"held-out reward {final_heldout:.3f}", flush=True)  # fmt: skip
    return {"name": name, "steps": steps, "tokens": tokens, "fresh_reward": rewards, "historical_share": shares,
            "heldout_final": final_heldout, "heldout_at": recorder.heldout_at, "seconds": elapsed}  # fmt: skip


def compare(fresh, mixed, window, budget=0.6):
    """The fresh run's final reward, and the tokens the mixed run needs to reach it (trailing means over window)."""
    target = sum(fresh["fresh_reward"][-window:]) / len(fresh["fresh_reward"][-window:])
    fresh_tokens = fresh["tokens"][-1]

    def first_reach(run):
        smoothed = trailing_mean(run["fresh_reward"], window)
        return next((t for i, (t, r) in enumerate(zip(run["tokens"], smoothed, strict=False))
                     if i + 1 >= window and r >= target - 1e-9), None)  # fmt: skip

    smoothed = trailing_mean(mixed["fresh_reward"], window)
    reached = first_reach(mixed)
    at_budget = [r for t, r in zip(mixed["tokens"], smoothed, strict=False) if t <= budget * fresh_tokens]
    return {
        "target": target,
        "fresh_tokens": fresh_tokens,
        "fresh_tokens_to_target": first_reach(fresh),  # a flat (noisy) fresh curve touches its final value early
        "mixed_tokens_to_target": reached,
        "ratio": None if reached is None else reached / fresh_tokens,
        "mixed_reward_at_budget": at_budget[-1] if at_budget else math.nan,
        "mixed_final": smoothed[-1],
        "mixed_tokens": mixed["tokens"][-1],
        "mixed_historical_share": sum(mixed["historical_share"]) / len(mixed["historical_share"]),
    }


def plot(results, comparisons, path, window):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms = list(comparisons)
    fig, axes = plt.subplots(1, len(algorithms), figsize=(6 * len(algorithms), 4.2), squeeze=False)
    for ax, algorithm in zip(axes[0], algorithms, strict=False):
        c = comparisons[algorithm]
        for kind, color in (("fresh", "tab:blue"), ("mixed", "tab:orange")):
            r = results[f"{algorithm}-{kind}"]
            label = "fresh only" if kind == "fresh" else "half of each group from history"
            ax.plot(r["tokens"], trailing_mean(r["fresh_reward"], window), color=color, label=label)
        ax.axhline(c["target"], color="gray", linestyle="--", linewidth=1, label="fresh-only final reward")
        ax.axvline(0.6 * c["fresh_tokens"], color="green", linestyle=":", linewidth=1, label="0.6 × fresh tokens")
        if c["mixed_tokens_to_target"] is not None:
            ax.plot([c["mixed_tokens_to_target"]], [c["target"]], "o", color="tab:orange")
        ax.set(xlabel="generated completion tokens", ylabel=f"reward of fresh samples (mean of {window} generations)",
               title=algorithm.upper())  # fmt: skip
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results, comparisons, args) -> str:
    lines = [
        f"Quickstart task, {args.num_prompts} training prompts, seed {args.seed}, k = 4, "
        f"{int(args.history * 4) if args.history < 1 else int(args.history)} of 4 from history "
        f"(max staleness {args.max_staleness} steps); fresh-only runs {args.steps} steps, mixed runs "
        f"{args.mixed_steps}. Rewards: fresh samples, trailing mean over {args.window} generations.",
        "",
        "| algorithm | fresh: final reward | fresh: generated tokens | fresh: tokens to first reach it "
        "| mixed: tokens to reach it "
        "| ratio (target ≤ 0.6) | mixed: reward at 0.6× tokens | held-out: fresh final "
        "| held-out: mixed at 0.6× tokens | held-out: mixed final | mixed: mean historical share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for algorithm, c in comparisons.items():
        fresh, mixed = results[f"{algorithm}-fresh"], results[f"{algorithm}-mixed"]
        at = mixed["heldout_at"]
        reached = "not reached" if c["mixed_tokens_to_target"] is None else f"{c['mixed_tokens_to_target']:.0f}"
        ratio = "—" if c["ratio"] is None else f"{c['ratio']:.2f}"
        first = c["fresh_tokens_to_target"]
        fresh_first = f"{first:.0f}" if first is not None else f"≈{c['fresh_tokens']:.0f}"
        heldout_at = "—" if at is None else f"{at[1]:.3f}"
        lines.append(
            f"| {algorithm.upper()} | {c['target']:.3f} | {c['fresh_tokens']:.0f} | {fresh_first} | {reached} "
            f"| {ratio} | {c['mixed_reward_at_budget']:.3f} | {fresh['heldout_final']:.3f} | {heldout_at} | "
            f"{mixed['heldout_final']:.3f} | {c['mixed_historical_share']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=["gvpo", "grpo"], choices=sorted(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps of the fresh-only runs")
    parser.add_argument("--mixed-steps", type=int, default=None, help="steps of the mixed runs (2 × --steps)")
    parser.add_argument("--history", type=float, default=0.5, help="buffer_history_per_group of the mixed runs")
    parser.add_argument(
        "--max-staleness",
        type=int,
        default=256,
        help="buffer_max_staleness: with 512 prompts and 4 per step a prompt recurs every ~128 steps",
    )
    parser.add_argument("--num-prompts", type=int, default=512, help="training prompts (the quickstart's 512)")
    parser.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts")
    parser.add_argument("--window", type=int, default=25, help="generations in a trailing mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is much faster for this tiny model on a busy machine)",
    )
    parser.add_argument("--output-dir", default="outputs/mixed_buffer")
    parser.add_argument("--replot", metavar="JSON", help="redo the table and plot from a saved mixed_buffer.json")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        output_dir = args.output_dir
        args = argparse.Namespace(**{**saved["args"], "output_dir": output_dir})
        results = saved["results"]
        algorithms = [name[: -len("-fresh")] for name in results if name.endswith("-fresh")]
        comparisons = {a: compare(results[f"{a}-fresh"], results[f"{a}-mixed"], args.window) for a in algorithms}
        return report(results, comparisons, args)
    args.mixed_steps = args.mixed_steps or 2 * args.steps
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)

    train_dataset = toy.build_dataset(num_prompts=args.num_prompts, seed=0)
    seen = set(train_dataset["prompt"])
    eval_prompts = [p for p in toy.build_dataset(num_prompts=4096, seed=1)["prompt"] if p not in seen]
    eval_prompts = eval_prompts[: args.eval_prompts]

    results, comparisons = {}, {}
    for algorithm in args.algorithms:
        fresh = results[f"{algorithm}-fresh"] = run(algorithm, False, args, train_dataset, eval_prompts)
        mixed = results[f"{algorithm}-mixed"] = run(algorithm, True, args, train_dataset, eval_prompts,
                                                    eval_at_tokens=0.6 * fresh["tokens"][-1])  # fmt: skip
        comparisons[algorithm] = compare(fresh, mixed, args.window)
    report(results, comparisons, args)


def report(results, comparisons, args):
    os.makedirs(args.output_dir, exist_ok=True)
    text = table(results, comparisons, args)
    print(text)
    with open(os.path.join(args.output_dir, "mixed_buffer.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, "mixed_buffer.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "comparisons": comparisons}, f, indent=1)
    plot(results, comparisons, os.path.join(args.output_dir, "mixed_buffer.png"), args.window)
    print(f"Wrote {args.output_dir}/mixed_buffer.md, .png and .json")


if __name__ == "__main__":
    main()
