"""Does history pay under a user's own settings? GVPO on the toy task with TRL's default linear learning-rate decay
(and a 10 % warm-up), every arm at the learning rate that is best for fresh-only training (a user does not re-tune
for history), against the constant-rate setting of ``benchmarks/mixed_buffer_study.py`` (docs/mixed_buffers.md).

The toy settings of ``benchmarks/mixed_buffer.py`` (64 prompts, k = 4, 4 optimizer steps per generation, held-out
reward on 256 unseen prompts every 20 steps). Stages, each run cached in ``--output-dir``/runs.jsonl (so stages can be
split over processes with ``--seeds`` and rerun for free):

- ``lr``: fresh-only under the linear schedule at 5e-4 .. 3e-3, 400 steps: the best fresh-only rate;
- ``rules`` (``--lr`` = that rate): 2 of each group of 4 from history, chosen by age (``newest``) or by signal
  (``contrast``: rewards farthest from the prompt's latest mean; ``highest``: best rewards first), for as many steps
  as fresh-only (the user changes nothing else, and generates fewer tokens) or twice as many (about as many tokens);
  and today's recipe (newest, drift ≤ 0.15, β 0.3, half the rate, twice the steps);
- ``constant``: the same rules under a constant rate, stopped at the fresh-only run's tokens (the setting of the
  earlier study).

Reported per arm against fresh-only of the same seeds: tokens to reach the fresh-only final held-out reward (trailing
mean of 3 evaluations; per seed, and how many seeds reach it), the final held-out reward, tokens spent, and the share
of groups whose reward varies only thanks to history. Writes ``history_<stage>.md`` and ``.png``:

    python benchmarks/history_defaults.py --stage lr
    python benchmarks/history_defaults.py --stage rules --lr 1e-3
    python benchmarks/history_defaults.py --stage constant --lr 1e-3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixed_buffer import eval_prompts, final_heldout, mean_std, plot, summarise, tokens_to_reach  # noqa: E402
from mixed_buffer_study import Cache  # noqa: E402

#: TRL's default schedule, with a warm-up
DEFAULTS = dict(lr_scheduler_type="linear", warmup_steps=0.1)
CONSTANT = dict(lr_scheduler_type="constant")
HISTORY = dict(buffer_history_per_group=2, buffer_max_staleness=32)
FRESH_LRS = (5e-4, 1e-3, 2e-3, 3e-3)
SEEDS = (0, 1, 2, 3, 4)


def arm(lr, steps, buffer=None, config=None, schedule=DEFAULTS, budget=False):
    return dict(learning_rate=lr, steps=steps, buffer=buffer or {}, config={**schedule, **(config or {})},
                budget=budget)  # fmt: skip


def stage_arms(stage: str, lr: float, steps: int) -> dict[str, dict]:
    """name -> arm; the first arm is the fresh-only reference."""
    if stage == "lr":
        return {f"fresh lr {x:g}": arm(x, steps) for x in FRESH_LRS}
    if stage == "rules":
        rule = lambda name, n: arm(lr, n, dict(HISTORY, buffer_selection=name))  # noqa: E731
        rule_with = lambda name, n, **more: arm(lr, n, dict(HISTORY, buffer_selection=name, **more))  # noqa: E731
        return {
            "fresh": arm(lr, steps),
            "newest, same steps": rule("newest", steps),
            "contrast, same steps": rule("contrast", steps),
            "highest, same steps": rule("highest", steps),
            "newest, 2x steps": rule("newest", 2 * steps),
            "contrast, 2x steps": rule("contrast", 2 * steps),
            "highest, 2x steps": rule("highest", 2 * steps),
            "highest, 1 of 4, same steps": arm(
                lr, steps, dict(HISTORY, buffer_selection="highest", buffer_history_per_group=1)
            ),  # fmt: skip
            "highest, 3 of 4, same steps": arm(
                lr, steps, dict(HISTORY, buffer_selection="highest", buffer_history_per_group=3)
            ),  # fmt: skip
            "recipe (half lr, 2x steps)": arm(
                lr / 2, 2 * steps, dict(HISTORY, buffer_selection="newest", buffer_max_drift=0.15), dict(gvpo_beta=0.3)
            ),  # fmt: skip
            "highest, drift<=0.15, 2x steps": rule_with("highest", 2 * steps, buffer_max_drift=0.15),
            "highest, half lr, 2x steps": arm(lr / 2, 2 * steps, dict(HISTORY, buffer_selection="highest")),
            "highest, scaled lr, 2x steps": rule_with("highest", 2 * steps, buffer_scale_lr=True),
            "newest, scaled lr, 2x steps": rule_with("newest", 2 * steps, buffer_scale_lr=True),
        }
    if stage == "constant":
        rule = lambda name, x: arm(x, 3 * steps, dict(HISTORY, buffer_selection=name), schedule=CONSTANT,  # noqa: E731
                                   budget=True)  # fmt: skip
        return {
            "fresh (constant)": arm(lr, steps, schedule=CONSTANT),
            "newest (constant)": rule("newest", lr),
            "highest (constant)": rule("highest", lr),
            "newest, half lr (constant)": rule("newest", lr / 2),
            "highest, half lr (constant)": rule("highest", lr / 2),
            "highest, scaled lr (constant)": arm(
                lr,
                3 * steps,
                dict(HISTORY, buffer_selection="highest", buffer_scale_lr=True),
                schedule=CONSTANT,
                budget=True,
            ),  # fmt: skip
        }
    raise ValueError(stage)


def spec_of(a: dict, seed: int, args, budget_tokens=None) -> dict:
    spec = dict(algorithm="gvpo", learning_rate=a["learning_rate"], seed=seed, steps=a["steps"],
                num_prompts=args.num_prompts, eval_every=args.eval_every, buffer=a["buffer"],
                config=a["config"])  # fmt: skip
    if a["budget"]:
        spec["token_budget"] = budget_tokens
    return spec


def signal_share(run: dict) -> float:
    values = [p["signal_from_history"] for p in run["points"] if "signal_from_history" in p]
    return statistics.fmean(values) if values else 0.0


def matched_ratios(fresh_runs: list[dict], runs: list[dict]) -> list[float | None]:
    """Per seed: tokens at which the arm first reaches its own seed's fresh-only final held-out reward, as a fraction
    of that fresh-only run's tokens (None: not reached)."""
    by_seed = {r["spec"]["seed"]: r for r in fresh_runs}
    out = []
    for r in runs:
        fresh = by_seed[r["spec"]["seed"]]
        reached = tokens_to_reach(r["eval_tokens"], r["heldout"], final_heldout(fresh))
        out.append(None if reached is None else reached / fresh["eval_tokens"][-1])
    return out


def report(results: dict[str, list[dict]], title: str, path_base: str) -> str:
    fresh_runs = next(iter(results.values()))
    lines = [title, "", "| arm | lr | steps | seeds reaching fresh final | tokens to it / fresh (per seed) "
             "| seed-mean curve | seeds reaching their own seed's fresh final, tokens to it / fresh "
             "| final held-out | tokens spent / fresh | groups with signal only from history |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, runs in results.items():
        s = summarise(fresh_runs, runs)
        reached = [x for x in s["ratios"] if x is not None]
        ratio = mean_std(reached) + ("" if len(reached) == len(runs) or not reached else " (of those reaching)")
        curve = "—" if s["ratio_of_mean_curve"] is None else f"{s['ratio_of_mean_curve']:.2f}"
        steps = statistics.fmean(r["eval_steps"][-1] for r in runs)
        matched = [x for x in matched_ratios(fresh_runs, runs) if x is not None]
        matched_cell = f"{len(matched)}/{len(runs)}: {mean_std(matched)}"
        lines.append(f"| {name} | {runs[0]['spec']['learning_rate']:g} | {steps:.0f} | {s['reached']}/{len(runs)} "
                     f"| {ratio} | {curve} | {matched_cell} | {mean_std(s['final_heldout'])} | {mean_std(s['tokens'])} "
                     f"| {mean_std([signal_share(r) for r in runs])} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    with open(path_base + ".md", "w") as f:
        f.write(text + "\n")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["lr", "rules", "constant"], required=True)
    parser.add_argument("--lr", type=float, default=1e-3, help="the best fresh-only learning rate (stage lr finds it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--only", nargs="+", default=None, help="only these arms (besides the fresh-only one)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of the fresh-only runs")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--output-dir", default="outputs/history_defaults")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.output_dir, exist_ok=True)
    cache, prompts = Cache(os.path.join(args.output_dir, "runs.jsonl")), eval_prompts(args.num_prompts)
    arms = stage_arms(args.stage, args.lr, args.steps)
    names = list(arms)
    arms = {k: v for i, (k, v) in enumerate(arms.items()) if i == 0 or args.only is None or k in args.only}
    results = {name: [] for name in arms}
    for seed in args.seeds:
        fresh = None
        for name, a in arms.items():
            run = cache.run(spec_of(a, seed, args, fresh and fresh["eval_tokens"][-1]), prompts)
            fresh = fresh or run
            results[name].append(run)
            print(f"  {name:30s} seed {seed}: {run['eval_steps'][-1]:4d} steps, {run['eval_tokens'][-1]:6.0f} "
                  f"tokens, final held-out {final_heldout(run):.3f}, {run['seconds']:.0f} s", flush=True)  # fmt: skip
    base = os.path.join(args.output_dir, f"history_{args.stage}")
    target = statistics.fmean(final_heldout(r) for r in results[names[0]])
    title = (f"Toy task, stage {args.stage}, seeds {args.seeds}, {args.steps} fresh-only steps; reference: "
             f"{names[0]}, final held-out {target:.3f}.")  # fmt: skip
    report(results, title, base)
    fresh_tokens = statistics.fmean(r["eval_tokens"][-1] for r in results[names[0]])
    plot(results, target, fresh_tokens, base + ".png", title=f"toy, stage {args.stage}")


if __name__ == "__main__":
    main()
