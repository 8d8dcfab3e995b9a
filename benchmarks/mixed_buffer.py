"""Mixed buffers: held-out reward against generated tokens, fresh-only vs history in each group, over several seeds.

Trains GVPO on the offline toy task (``gvpo_trl.demo.toy``: a tiny random Llama learns "repeat the letter"), with the
settings of ``examples/train.py``'s quickstart (16 rows per step, k = 4, 10-token completions, 4 optimizer steps per
generation) except two: 64 prompts, so that a prompt recurs every 16 steps, and a constant learning rate, so that a
run's curve does not depend on its planned length. Each arm at its own best learning rate from the sweep of
``benchmarks/mixed_buffer_study.py`` (docs/mixed_buffers.md):

- ``fresh``: no buffer, every member generated, ``--steps`` optimizer steps (lr 1e-3; the quickstart's 3e-3 is worse
  here);
- ``fresh, 2 passes per batch``: no buffer, each generation batch trained on twice (``num_iterations=2``): as many
  optimizer steps per generated token as the mixed arms, without history (lr 5e-4);
- ``mixed at the fresh lr``: 2 of each group of 4 from history (:data:`MIXED`), lr 1e-3;
- ``mixed``: the same at its own best lr, 5e-4;
- ``recipe``: the documented recipe (:data:`RECIPE`, β = 0.3, lr 5e-4).

Every arm after ``fresh`` trains until it has generated ``--budget`` × the fresh-only run's tokens of the same seed
(at most ``--max-steps``). Every ``--eval-every`` optimizer steps, held-out reward: one sampled completion per prompt
on 256 prompts never trained on (fixed sampling seed, so all runs are scored alike). Reported per arm (mean ± std over
seeds):

- the target: the fresh-only runs' final held-out reward (mean of their last 3 evaluations, then over seeds);
- tokens to target: generated tokens at which the arm's held-out reward (trailing mean of 3 evaluations) first
  reaches the target, as a fraction of the fresh-only run's total tokens: per seed (mean ± std, and how many seeds
  reach it) and on the seed-mean curve. The goal is ≤ 0.6.

Writes ``mixed_buffer.md`` (the table), ``mixed_buffer.png`` (held-out and fresh-sample reward against generated
tokens, mean and spread over seeds) and ``mixed_buffer.json`` (every curve) to ``--output-dir``:

    python benchmarks/mixed_buffer.py            # 5 arms x 5 seeds, about 6 minutes on one CPU core
    python benchmarks/mixed_buffer.py --quick    # 1 seed, 200 fresh-only steps: a short look (about 40 s)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from gvpo_trl import GVPOConfig, GVPOTrainer
from gvpo_trl.buffer import BufferArgs, BufferMixin, check_buffer_config
from gvpo_trl.demo import toy


@dataclass
class BufferedGRPOConfig(GRPOConfig, BufferArgs):
    """TRL's ``GRPOConfig`` plus the mixed-buffer fields."""

    def __post_init__(self):
        super().__post_init__()
        check_buffer_config(self, type(self).__name__)


class BufferedGRPOTrainer(BufferMixin, GRPOTrainer):
    """TRL's GRPO with gvpo-trl's mixed buffer (inert, apart from its token metrics, when the buffer is off)."""


ALGORITHMS = {"gvpo": (GVPOConfig, GVPOTrainer), "grpo": (BufferedGRPOConfig, BufferedGRPOTrainer)}

# examples/train.py's quickstart settings (learning rates come from each arm), for the toy task on CPU
QUICKSTART = dict(
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
    lr_scheduler_type="constant",  # a run's curve must not depend on its planned length: buffered runs stop on tokens
)

#: 2 of each group of 4 from history at every step: about two recurrences of a prompt (every 16 steps here).
MIXED = dict(buffer_history_per_group=2, buffer_max_staleness=32, buffer_selection="newest")
#: The recipe the study selected (docs/mixed_buffers.md): MIXED, plus evicting samples that drifted more than 0.15
#: nats per token, with GVPO's β at 0.3 and half the fresh-only run's learning rate.
RECIPE = dict(MIXED, buffer_max_drift=0.15)
#: Each arm at its best learning rate from benchmarks/mixed_buffer_study.py (the first arm is the reference).
ARMS = {
    "fresh": dict(learning_rate=1e-3, buffer={}),
    "fresh, 2 passes per batch": dict(learning_rate=5e-4, buffer={}, config=dict(num_iterations=2)),
    "mixed at the fresh lr": dict(learning_rate=1e-3, buffer=MIXED),
    "mixed": dict(learning_rate=5e-4, buffer=MIXED),
    "recipe": dict(learning_rate=5e-4, buffer=RECIPE, config=dict(gvpo_beta=0.3)),
}


def eval_prompts(num_train_prompts: int, n: int = 256) -> list[str]:
    """``n`` toy prompts that are not among the training prompts (``toy.build_dataset(num_train_prompts, seed=0)``)."""
    seen = set(toy.build_dataset(num_prompts=num_train_prompts, seed=0)["prompt"])
    return [p for p in toy.build_dataset(num_prompts=4096, seed=1)["prompt"] if p not in seen][:n]


def heldout_reward(trainer, prompts: list[str], seed: int = 1234) -> float:
    """Mean reward of one sampled completion per held-out prompt (training sampling settings, fixed seed)."""
    model, tokenizer, args = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, trainer.args
    config = GenerationConfig(do_sample=True, max_new_tokens=args.max_completion_length, temperature=args.temperature,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(), torch.no_grad():  # leaves the training run's random state untouched
        torch.manual_seed(seed)
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        out = model.generate(**inputs, generation_config=config)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return sum(toy.repeat_letter_reward(prompts, texts)) / len(prompts)


#: buffer metrics recorded per generation (when logged)
RECORDED = ("historical_share", "external_share", "mean_drift", "drift_evicted", "signal_from_history", "lr_scale")


class Recorder(TrainerCallback):
    """Per generation: generated tokens so far, fresh-sample reward, historical share, drift. Every ``eval_every``
    steps (and at the start and the end): held-out reward. Stops training once ``token_budget`` tokens are spent."""

    def __init__(self, trainer, prompts, eval_every, token_budget=None, evaluate=None):
        self.trainer, self.prompts, self.eval_every, self.token_budget = trainer, prompts, eval_every, token_budget
        self.evaluate = evaluate or heldout_reward  # (trainer, prompts) -> held-out reward
        self.points, self.evals = [], []

    def _evaluate(self, step):
        if not self.evals or self.evals[-1][0] != step:
            tokens = self.trainer.buffer_stats["generated_tokens"]
            self.evals.append((step, tokens, self.evaluate(self.trainer, self.prompts)))

    def on_train_begin(self, args, state, control, **kwargs):
        self._evaluate(0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "buffer/generated_tokens_total" in logs:
            self.points.append({"step": state.global_step, "tokens": logs["buffer/generated_tokens_total"],
                                "fresh_reward": logs.get("buffer/fresh_reward", logs.get("reward")),
                                **{k: logs[f"buffer/{k}"] for k in RECORDED
                                   if f"buffer/{k}" in logs}})  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        spent = self.token_budget is not None and self.trainer.buffer_stats["generated_tokens"] >= self.token_budget
        if spent:
            control.should_training_stop = True
        if spent or state.global_step % self.eval_every == 0 or state.global_step >= state.max_steps:
            self._evaluate(state.global_step)


def train_run(spec: dict, prompts: list[str]) -> dict:
    """One run of ``spec`` (``algorithm``, ``learning_rate``, ``seed``, ``steps``, ``num_prompts``, ``eval_every``,
    ``buffer`` (config fields), optional ``token_budget`` and ``config`` (other config fields)); returns its curves."""
    config_cls, trainer_cls = ALGORITHMS[spec.get("algorithm", "gvpo")]
    config = config_cls(output_dir="outputs/mixed_buffer/run", seed=spec["seed"], max_steps=spec["steps"],
                        learning_rate=spec["learning_rate"], **{**QUICKSTART, **spec.get("config", {})},
                        **spec.get("buffer", {}))  # fmt: skip
    trainer = trainer_cls(model=toy.default_model_path(), reward_funcs=toy.repeat_letter_reward, args=config,
                          train_dataset=toy.build_dataset(num_prompts=spec["num_prompts"], seed=0))  # fmt: skip
    recorder = Recorder(trainer, prompts, spec["eval_every"], spec.get("token_budget"))
    trainer.add_callback(recorder)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    steps, tokens, heldout = (list(x) for x in zip(*recorder.evals, strict=True))
    return {"spec": spec, "eval_steps": steps, "eval_tokens": tokens, "heldout": heldout, "points": recorder.points,
            "drift_evicted": trainer.buffer_stats.get("drift_evicted", 0),
            "seconds": time.perf_counter() - start}  # fmt: skip


# --- analysis --------------------------------------------------------------------------------------------------


def trailing_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def final_heldout(run: dict, last: int = 3) -> float:
    return sum(run["heldout"][-last:]) / len(run["heldout"][-last:])


def tokens_to_reach(tokens: list[float], values: list[float], target: float, window: int = 3) -> float | None:
    """Tokens at which the trailing mean of ``window`` evaluations first reaches ``target`` (None: never)."""
    smoothed = trailing_mean(values, window)
    return next((t for i, (t, v) in enumerate(zip(tokens, smoothed, strict=True)) if i + 1 >= window and v >= target),
                None)  # fmt: skip


def mean_curve(runs: list[dict], key: str = "heldout") -> tuple[list[float], list[float], list[float]]:
    """Seed-mean curve over the evaluations all runs have: (mean tokens, mean value, std of value)."""
    n = min(len(r[key]) for r in runs)
    tokens = [statistics.fmean(r["eval_tokens"][i] for r in runs) for i in range(n)]
    values = [[r[key][i] for r in runs] for i in range(n)]
    return tokens, [statistics.fmean(v) for v in values], [statistics.pstdev(v) for v in values]


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def summarise(fresh: list[dict], runs: list[dict], budget: float = 0.6) -> dict:
    """An arm against the fresh-only runs of the same seeds (matched by seed)."""
    by_seed = {r["spec"]["seed"]: r for r in fresh}
    target = statistics.fmean(final_heldout(r) for r in fresh)
    fresh_total = statistics.fmean(r["eval_tokens"][-1] for r in fresh)
    ratios, finals, at_budget = [], [], []
    for r in runs:
        total = by_seed[r["spec"]["seed"]]["eval_tokens"][-1]
        reached = tokens_to_reach(r["eval_tokens"], r["heldout"], target)
        ratios.append(None if reached is None else reached / total)
        finals.append(final_heldout(r))
        smoothed = trailing_mean(r["heldout"], 3)
        at_budget.append(max((v for t, v in zip(r["eval_tokens"], smoothed, strict=True) if t <= budget * total),
                             default=math.nan))  # fmt: skip
    tokens, values, _ = mean_curve(runs)
    reached_mean = tokens_to_reach(tokens, values, target)
    return {
        "target": target,
        "fresh_tokens": fresh_total,
        "ratios": ratios,
        "reached": sum(x is not None for x in ratios),
        "ratio_of_mean_curve": None if reached_mean is None else reached_mean / fresh_total,
        "final_heldout": finals,
        "best_heldout_within_budget": at_budget,
        "tokens": [r["eval_tokens"][-1] / by_seed[r["spec"]["seed"]]["eval_tokens"][-1] for r in runs],
        "historical_share": [statistics.fmean(p.get("historical_share", 0.0) for p in r["points"]) for r in runs],
    }


def table(summaries: dict[str, dict], lrs: dict[str, float]) -> str:
    lines = [
        "| arm | lr | seeds reaching target | tokens to target / fresh tokens (per seed) | same, seed-mean curve "
        "| best held-out within 0.6× tokens | final held-out | tokens spent / fresh | mean historical share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in summaries.items():
        reached = [x for x in s["ratios"] if x is not None]
        ratio = mean_std(reached) + ("" if len(reached) == len(s["ratios"]) else " (of those reaching)")
        curve = "not reached" if s["ratio_of_mean_curve"] is None else f"{s['ratio_of_mean_curve']:.2f}"
        lines.append(
            f"| {arm} | {lrs[arm]:g} | {s['reached']}/{len(s['ratios'])} | {ratio} | {curve} "
            f"| {mean_std(s['best_heldout_within_budget'])} | {mean_std(s['final_heldout'])} | {mean_std(s['tokens'])} "
            f"| {mean_std(s['historical_share'])} |"
        )
    return "\n".join(lines)


def plot(groups: dict[str, list[dict]], target: float, fresh_tokens: float, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for (name, runs), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        tokens, mean, std = mean_curve(runs)
        axes[0].plot(tokens, trailing_mean(mean, 3), color=color, label=f"{name} ({len(runs)} seeds)")
        axes[0].fill_between(tokens, [m - s for m, s in zip(mean, std, strict=True)],
                             [m + s for m, s in zip(mean, std, strict=True)], color=color, alpha=0.15)  # fmt: skip
        for r in runs:
            xs = [p["tokens"] for p in r["points"]]
            axes[1].plot(xs, trailing_mean([p["fresh_reward"] for p in r["points"]], 25), color=color, alpha=0.5,
                         linewidth=0.8, label=name if r is runs[0] else None)  # fmt: skip
    for ax in axes:
        ax.axvline(0.6 * fresh_tokens, color="green", linestyle=":", linewidth=1, label="0.6 × fresh-only tokens")
        ax.set_xlabel("generated completion tokens")
    axes[0].axhline(target, color="gray", linestyle="--", linewidth=1, label="fresh-only final held-out")
    axes[0].set(ylabel="held-out reward (mean over seeds, ±1 std)", title=title)
    axes[1].set(ylabel="fresh-sample reward (trailing 25 generations)", title="every seed")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_arms(arms: dict[str, dict], seeds: list[int], args, prompts) -> dict[str, list[dict]]:
    """Every arm on every seed; every arm after the first (fresh-only) stops at ``args.budget`` × the first's tokens
    of the same seed."""
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in seeds:
        fresh = None
        for name, arm in arms.items():
            budgeted = fresh is not None
            spec = dict(algorithm=args.algorithm, learning_rate=arm["learning_rate"], seed=seed,
                        steps=args.max_steps if budgeted else args.steps, num_prompts=args.num_prompts,
                        eval_every=args.eval_every, buffer=arm["buffer"], config=arm.get("config", {}))  # fmt: skip
            if budgeted:
                spec["token_budget"] = args.budget * fresh["eval_tokens"][-1]
            run = train_run(spec, prompts)
            fresh = fresh or run
            results[name].append(run)
            print(f"{name} seed {seed}: {run['eval_steps'][-1]} steps, {run['eval_tokens'][-1]:.0f} tokens, "
                  f"final held-out {final_heldout(run):.3f}, {run['seconds']:.0f} s", flush=True)  # fmt: skip
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 200 fresh-only steps: a short look")
    parser.add_argument("--algorithm", default="gvpo", choices=sorted(ALGORITHMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=None, help=f"only these arms besides fresh: {list(ARMS)}")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of the fresh-only runs")
    parser.add_argument("--max-steps", type=int, default=1200, help="most optimizer steps of the other arms")
    parser.add_argument("--budget", type=float, default=1.0, help="other arms stop at this × fresh-only tokens")
    parser.add_argument("--num-prompts", type=int, default=64, help="training prompts (one recurs every n/4 steps)")
    parser.add_argument("--eval-every", type=int, default=20, help="optimizer steps between held-out evaluations")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny model)")
    parser.add_argument("--output-dir", default="outputs/mixed_buffer")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.max_steps = args.seeds[:1], 200, 600
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    arms = ARMS if args.algorithm == "gvpo" else {k: ARMS[k] for k in ("fresh", "mixed at the fresh lr", "mixed")}
    if args.arms:
        arms = {k: v for k, v in arms.items() if k == "fresh" or k in args.arms}
    results = run_arms(arms, args.seeds, args, eval_prompts(args.num_prompts))
    summaries = {name: summarise(results["fresh"], runs) for name, runs in results.items()}
    lrs = {name: arm["learning_rate"] for name, arm in arms.items()}
    target = summaries["fresh"]["target"]
    header = (
        f"{args.algorithm.upper()}, toy task, {args.num_prompts} prompts, k = 4, seeds {args.seeds}; fresh-only "
        f"{args.steps} steps, the other arms until they spend {args.budget:g}× its tokens. Target: fresh-only final "
        f"held-out reward {target:.3f} (mean of the last 3 evaluations, over seeds); fresh-only generated "
        f"{summaries['fresh']['fresh_tokens']:.0f} tokens."
    )
    text = header + "\n\n" + table(summaries, lrs)
    print(text)
    with open(os.path.join(args.output_dir, "mixed_buffer.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, "mixed_buffer.json"), "w") as f:
        json.dump({"args": vars(args), "arms": arms, "summaries": summaries, "results": results}, f)
    plot(results, target, summaries["fresh"]["fresh_tokens"], os.path.join(args.output_dir, "mixed_buffer.png"),
         title=f"{args.algorithm.upper()} on the toy task")  # fmt: skip
    print(f"Wrote {args.output_dir}/mixed_buffer.md, .png and .json")


if __name__ == "__main__":
    main()
