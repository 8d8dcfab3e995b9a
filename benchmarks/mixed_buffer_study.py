"""The study behind the mixed-buffer recipe (docs/mixed_buffers.md): which regime lets history save generation.

GVPO on the toy task (``benchmarks/mixed_buffer.py``'s settings: 64 prompts, k = 4, constant learning rate, held-out
reward every 20 steps), in stages; each run is cached in ``--output-dir``/runs.jsonl, so a stage can be rerun or
extended without redoing what is done:

- ``lr``: fresh-only and "2 of 4 from history" at learning rates from 3e-4 to 1e-2, seeds 0-2;
- ``screen``: at the mixed arm's best learning rate, one change at a time, seeds 0-1: staleness in policy space
  (``buffer_max_drift``), history schedules (``buffer_history_schedule``), a reuse cap (``buffer_max_reuse``),
  selection rules, 1 or 3 historical members, β, steps per generation;
- ``custom``: the arms of a JSON ``{name: {"learning_rate", "buffer", "config"}}``, seeds 0-2 (the candidates);
- then ``benchmarks/mixed_buffer.py`` (its arms over 5 seeds) is the confirmation.

Buffered runs stop when they have generated as many tokens as the fresh-only run of their seed. Prints, per
configuration, the held-out reward it reaches within 0.6× the fresh-only tokens and the tokens it needs to reach the
fresh-only final held-out reward (per seed), and writes ``study.md`` and ``study.png``:

    python benchmarks/mixed_buffer_study.py --stage lr
    python benchmarks/mixed_buffer_study.py --stage screen --lr 3e-3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixed_buffer import MIXED, eval_prompts, final_heldout, mean_std, plot, summarise, train_run  # noqa: E402

FRESH_LRS = (5e-4, 1e-3, 2e-3, 3e-3, 1e-2)
MIXED_LRS = (3e-4, 5e-4, 1e-3, 3e-3, 1e-2)


def screen_configs(lr: float) -> dict[str, dict]:
    """One change at a time against ``MIXED`` (name -> arm)."""
    arm = lambda buffer=None, config=None, learning_rate=lr: dict(  # noqa: E731
        learning_rate=learning_rate, buffer={**MIXED, **(buffer or {})}, config=config or {}
    )
    return {
        "mixed": arm(),
        "drift<=0.15": arm(dict(buffer_max_drift=0.15)),
        "drift<=0.25": arm(dict(buffer_max_drift=0.25)),
        "history until step 300": arm(dict(buffer_history_schedule="step", buffer_history_horizon=300)),
        "history linear to step 800": arm(dict(buffer_history_schedule="linear", buffer_history_horizon=800)),
        "3 of 4 historical": arm(dict(buffer_history_per_group=3)),
        "3 of 4, linear to step 800": arm(
            dict(buffer_history_per_group=3, buffer_history_schedule="linear", buffer_history_horizon=800)
        ),
        "1 of 4 historical": arm(dict(buffer_history_per_group=1)),
        "reuse<=1": arm(dict(buffer_max_reuse=1)),
        "staleness<=16": arm(dict(buffer_max_staleness=16)),
        "staleness<=64": arm(dict(buffer_max_staleness=64)),
        "selection uniform": arm(dict(buffer_selection="uniform")),
        "beta 0.3": arm(config=dict(gvpo_beta=0.3)),
        "beta 0.03": arm(config=dict(gvpo_beta=0.03)),
        "8 steps per generation": arm(config=dict(steps_per_generation=8)),
    }


class Cache:
    """Finished runs, one JSON line each, keyed by their spec."""

    def __init__(self, path: str):
        self.path, self.runs = path, {}
        if os.path.exists(path):
            for line in open(path):
                run = json.loads(line)
                self.runs[self.key(run["spec"])] = run

    @staticmethod
    def key(spec: dict) -> str:
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def run(self, spec: dict, prompts) -> dict:
        key = self.key(spec)
        if key not in self.runs:
            self.runs[key] = train_run(spec, prompts)
            with open(self.path, "a") as f:
                f.write(json.dumps(self.runs[key]) + "\n")
        return self.runs[key]


def run_group(cache, arms: dict[str, dict], seeds, args, prompts) -> dict[str, list[dict]]:
    results = {name: [] for name in arms}
    for seed in seeds:
        fresh = cache.run(fresh_spec(args.fresh_lr, seed, args), prompts)
        for name, arm in arms.items():
            spec = dict(algorithm="gvpo", learning_rate=arm["learning_rate"], seed=seed, steps=args.max_steps,
                        num_prompts=args.num_prompts, eval_every=args.eval_every, buffer=arm["buffer"],
                        config=arm.get("config", {}), token_budget=fresh["eval_tokens"][-1])  # fmt: skip
            if not (arm["buffer"] or arm.get("config")):  # fresh-only: a fixed number of steps
                spec = fresh_spec(arm["learning_rate"], seed, args)
            run = cache.run(spec, prompts)
            results[name].append(run)
            print(f"  {name:28s} seed {seed}: {run['eval_steps'][-1]:4d} steps, final held-out "
                  f"{final_heldout(run):.3f}, {run['seconds']:.0f} s", flush=True)  # fmt: skip
    return results


def fresh_spec(lr, seed, args) -> dict:
    return dict(algorithm="gvpo", learning_rate=lr, seed=seed, steps=args.steps, num_prompts=args.num_prompts,
                eval_every=args.eval_every, buffer={}, config={})  # fmt: skip


def report(results, fresh_runs, title, path_base) -> str:
    lines = [
        title,
        "",
        "| configuration | held-out within 0.6× fresh tokens | seeds reaching fresh final | tokens to it / fresh "
        "| final held-out (at 1.0× tokens) | mean drift (nats/token) | drift evictions |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        s = summarise(fresh_runs, runs)
        reached = [x for x in s["ratios"] if x is not None]
        drifts = [p["mean_drift"] for r in runs for p in r["points"] if "mean_drift" in p]
        drift = f"{statistics.fmean(drifts):.2f}" if drifts else "—"
        lines.append(
            f"| {name} | {mean_std(s['best_heldout_within_budget'])} | {s['reached']}/{len(runs)} "
            f"| {mean_std(reached)} | {mean_std(s['final_heldout'])} | {drift} "
            f"| {statistics.fmean(r.get('drift_evicted', 0) for r in runs):.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    with open(path_base + ".md", "w") as f:
        f.write(text + "\n")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["lr", "screen", "custom"], required=True)
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the screened configurations")
    parser.add_argument("--fresh-lr", type=float, default=3e-3, help="the fresh-only arm's best learning rate")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--only", nargs="+", default=None, help="screen only these configurations")
    parser.add_argument("--custom", default=None, help="JSON {name: arm} for --stage custom")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--max-steps", type=int, default=1200)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--output-dir", default="outputs/mixed_buffer_study")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.output_dir, exist_ok=True)
    cache, prompts = Cache(os.path.join(args.output_dir, "runs.jsonl")), eval_prompts(args.num_prompts)
    if args.stage == "lr":
        seeds = args.seeds or [0, 1, 2]
        arms = {f"fresh lr {lr:g}": dict(learning_rate=lr, buffer={}) for lr in FRESH_LRS}
        arms |= {f"mixed lr {lr:g}": dict(learning_rate=lr, buffer=MIXED) for lr in MIXED_LRS}
    elif args.stage == "screen":
        seeds = args.seeds or [0, 1]
        arms = screen_configs(args.lr)
        arms = {k: v for k, v in arms.items() if args.only is None or k in args.only}
    else:
        seeds = args.seeds or [0, 1, 2]
        arms = json.loads(args.custom)
    results = run_group(cache, arms, seeds, args, prompts)
    fresh_runs = [cache.run(fresh_spec(args.fresh_lr, seed, args), prompts) for seed in seeds]
    base = os.path.join(args.output_dir, f"study_{args.stage}")
    title = (f"Stage {args.stage}, seeds {seeds}; reference: fresh-only at lr {args.fresh_lr:g}, {args.steps} steps, "
             f"final held-out {statistics.fmean(final_heldout(r) for r in fresh_runs):.3f}.")  # fmt: skip
    report(results, fresh_runs, title, base)
    summary = summarise(fresh_runs, fresh_runs)
    plot(results, summary["target"], summary["fresh_tokens"], base + ".png", title=f"stage {args.stage}")


if __name__ == "__main__":
    main()
