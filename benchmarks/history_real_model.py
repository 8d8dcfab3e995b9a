"""History on the real model: SmolLM2-135M-Instruct (``gvpo_trl.demo.smollm2``, offline) on harder chat additions
(``gvpo_trl.demo.chat_tasks``), every arm at a user's defaults: TRL's linear
learning-rate decay with a 10 % warm-up, the same learning rate, the same number of optimizer steps. Arms:

- ``grpo``: TRL's ``GRPOTrainer`` (with the buffer's token counter only: ``BufferMixin`` with the buffer off);
- ``gvpo``: GVPO, every member generated;
- ``gvpo-history``: GVPO with 2 of each group of 4 from history, chosen by ``--selection`` (default ``highest``);
- ``gvpo-external``: GVPO with one member per group from the correct reference answer
  (``external_completions_column``: the demonstrations GVPO's Theorem 2 allows).

Every ``--eval_every`` steps: held-out reward (``--eval_samples`` sampled replies to each of ``--num_eval`` additions
never trained on, fixed sampling seed). Reported per arm, over ``--seeds``: generated tokens to reach GRPO's and
fresh GVPO's final held-out reward (trailing mean of 2 evaluations; per seed and on the seed-mean curve), the final
held-out reward, and the held-out reward of fresh GVPO at the arm's own final token count (equal tokens). Each
(arm, seed) runs in its own single-threaded subprocess, ``--jobs`` at a time, cached in ``--output_dir``/runs.jsonl.
Writes ``history_real_model.md`` and ``.png`` there:

    OMP_NUM_THREADS=1 python benchmarks/history_real_model.py --jobs 2   # 4 arms x 3 seeds x 100 steps: ~3.5 h of CPU
    OMP_NUM_THREADS=1 python benchmarks/history_real_model.py --probe    # the untrained model on candidate tasks
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixed_buffer import mean_curve, mean_std, plot, tokens_to_reach, trailing_mean  # noqa: E402
from mixed_buffer_study import Cache  # noqa: E402

ARMS = ("grpo", "gvpo", "gvpo-history", "gvpo-external")
HISTORY = dict(buffer_history_per_group=2, buffer_max_staleness=32)
WINDOW = 2  # evaluations in the trailing mean that decides "reached"


def heldout(trainer, prompts, answers, samples, seed=1234) -> float:
    """Mean reward of ``samples`` sampled replies per held-out prompt (training sampling settings, fixed seed)."""
    import torch
    from transformers import GenerationConfig

    from gvpo_trl.demo.chat_tasks import grade

    model, tok, args = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, trainer.args
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    config = GenerationConfig(do_sample=True, max_new_tokens=args.max_completion_length, temperature=args.temperature,
                              num_return_sequences=samples, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)  # fmt: skip
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        out = model.generate(**enc, generation_config=config)
    model.train(was_training)
    replies = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return statistics.fmean(grade(r, a) for r, a in zip(replies, [a for a in answers for _ in range(samples)],
                                                          strict=True))  # fmt: skip


def train_one(spec: dict) -> dict:
    """One (arm, seed) run in this process."""
    import torch
    from mixed_buffer import ALGORITHMS, Recorder
    from transformers import PrinterCallback

    import gvpo_trl
    from gvpo_trl.demo.chat_tasks import addition_reward, build_datasets
    from gvpo_trl.demo.smollm2 import materialize_smollm2

    torch.set_num_threads(1)
    arm = spec["arm"]
    config_cls, trainer_cls = ALGORITHMS["grpo"] if arm == "grpo" else gvpo_trl.TRAINERS["gvpo"]
    train, held = build_datasets(num_eval=spec["num_eval"], seed=spec["seed"], max_operand=spec["max_operand"])
    train = train.select(range(spec["num_train"]))
    extra = {}
    if arm == "gvpo-history":
        extra = dict(HISTORY, buffer_selection=spec["selection"])
    if arm == "gvpo-external":
        train = train.add_column("reference", list(train["answer"]))
        extra = dict(external_completions_column="reference", remove_unused_columns=False)
    config = config_cls(output_dir="outputs/history_real_model/run", per_device_train_batch_size=spec["batch"],
                        num_generations=spec["k"], max_completion_length=spec["max_completion_length"],
                        temperature=1.0, learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0.1,
                        max_steps=spec["steps"], logging_steps=1, seed=spec["seed"], bf16=False,
                        gradient_checkpointing=False, use_cpu=True, save_strategy="no", report_to=[],
                        disable_tqdm=True, **extra)  # fmt: skip
    trainer = trainer_cls(model=materialize_smollm2(), reward_funcs=addition_reward, args=config, train_dataset=train)
    prompts, answers = list(held["prompt"]), list(held["answer"])
    recorder = Recorder(trainer, prompts, spec["eval_every"],
                        evaluate=lambda t, p: heldout(t, p, answers, spec["eval_samples"]))  # fmt: skip
    trainer.add_callback(recorder)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    steps, tokens, values = (list(x) for x in zip(*recorder.evals, strict=True))
    return {"spec": spec, "eval_steps": steps, "eval_tokens": tokens, "heldout": values, "points": recorder.points,
            "seconds": time.perf_counter() - start}  # fmt: skip


def probe_tasks(samples: int = 4, num: int = 32, max_completion_length: int = 16) -> None:
    """The untrained model on candidate tasks: mean reward and the share of groups of ``samples`` whose rewards
    differ (a group-relative method needs those from the start)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gvpo_trl.demo.chat_tasks import build_datasets, grade
    from gvpo_trl.demo.smollm2 import materialize_smollm2

    torch.set_num_threads(1)
    path = materialize_smollm2()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    for terms, max_operand in ((2, 9), (2, 19), (3, 9)):
        _, held = build_datasets(num_eval=num, seed=0, max_operand=max_operand, terms=terms)
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in held["prompt"]]
        torch.manual_seed(0)
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(**enc, do_sample=True, temperature=1.0, max_new_tokens=max_completion_length,
                             num_return_sequences=samples, pad_token_id=tok.pad_token_id)  # fmt: skip
        replies = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        rewards = [grade(r, a) for r, a in zip(replies, [a for a in held["answer"] for _ in range(samples)],
                                                strict=True)]  # fmt: skip
        groups = [rewards[i : i + samples] for i in range(0, len(rewards), samples)]
        varied = sum(len(set(g)) > 1 for g in groups) / len(groups)
        print(f"{terms} terms, operands 1..{max_operand}: mean reward {statistics.fmean(rewards):.3f}, "
              f"groups with reward variance {varied:.2f}", flush=True)  # fmt: skip


def run_in_subprocess(spec: dict, out: str) -> dict:
    rule = f"_{spec['selection']}" if "selection" in spec else ""
    path = os.path.join(out, f"run_{spec['arm']}{rule}_{spec['seed']}.json")
    if os.path.exists(path) and os.path.getsize(path):  # finished by an earlier, interrupted invocation
        with open(path) as f:
            run = json.load(f)
        if run["spec"] == spec:
            return run
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    log = open(path + ".log", "w")
    subprocess.run([sys.executable, __file__, "--one", json.dumps(spec), "--one_out", path], env=env, check=True,
                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    with open(path) as f:
        return json.load(f)


def interpolate(tokens: list[float], values: list[float], at: float) -> float:
    """The trailing-mean curve's value at ``at`` tokens (linear between evaluations; clamped at the ends)."""
    smooth = trailing_mean(values, WINDOW)
    if at <= tokens[0]:
        return smooth[0]
    for (t0, v0), (t1, v1) in zip(zip(tokens, smooth, strict=True), zip(tokens[1:], smooth[1:], strict=True),
                                  strict=False):  # fmt: skip
        if t0 <= at <= t1:
            return v0 + (v1 - v0) * (at - t0) / max(t1 - t0, 1e-9)
    return smooth[-1]


def final(run: dict) -> float:
    return statistics.fmean(run["heldout"][-WINDOW:])


def summarise(results: dict[str, list[dict]]) -> str:
    by_seed = {arm: {r["spec"]["seed"]: r for r in runs} for arm, runs in results.items()}
    seeds = sorted(by_seed["gvpo"])
    lines = ["| arm | final held-out | tokens spent / GVPO | tokens to GRPO's final / GVPO tokens (per seed) "
             "| tokens to GVPO's final / GVPO tokens (per seed) | seed-mean curve: to GRPO's, to GVPO's "
             "| GVPO at this arm's tokens | share from history / external |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    refs = [ref for ref in ("grpo", "gvpo") if ref in by_seed]
    targets = {ref: statistics.fmean(final(by_seed[ref][s]) for s in seeds) for ref in refs}
    for arm, runs in by_seed.items():
        runs = [runs[s] for s in seeds]
        external = 1 / runs[0]["spec"]["k"] if arm == "gvpo-external" else 0.0  # one member of each group
        total = [by_seed["gvpo"][s]["eval_tokens"][-1] for s in seeds]
        cells = []
        for ref in ("grpo", "gvpo"):
            if ref not in targets:
                cells.append("—")
                continue
            ratios = [tokens_to_reach(r["eval_tokens"], r["heldout"], targets[ref], WINDOW) for r in runs]
            got = [x / t for x, t in zip(ratios, total, strict=True) if x is not None]
            cells.append(f"{len(got)}/{len(runs)} reach: {mean_std(got)}")
        tokens, mean, _ = mean_curve(runs)
        curve = []
        for ref in ("grpo", "gvpo"):
            reached = tokens_to_reach(tokens, mean, targets[ref], WINDOW) if ref in targets else None
            curve.append("—" if reached is None else f"{reached / statistics.fmean(total):.2f}")
        equal = [interpolate(by_seed["gvpo"][s]["eval_tokens"], by_seed["gvpo"][s]["heldout"], r["eval_tokens"][-1])
                 for s, r in zip(seeds, runs, strict=True)]  # fmt: skip
        share = [statistics.fmean(p.get("historical_share", 0.0) + p.get("external_share", external)
                                  for p in r["points"]) for r in runs]  # fmt: skip
        lines.append(f"| {arm} | {mean_std([final(r) for r in runs])} "
                     f"| {mean_std([r['eval_tokens'][-1] / t for r, t in zip(runs, total, strict=True)])} "
                     f"| {cells[0]} | {cells[1]} | {', '.join(curve)} | {mean_std(equal)} "
                     f"| {mean_std(share)} |")  # fmt: skip
    head = ", ".join(f"{ref} final held-out {v:.3f}" for ref, v in targets.items())
    return f"Targets (mean over seeds {seeds}): {head}.\n\n" + "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch", type=int, default=4, help="completions per optimizer step (batch / k prompts)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max_completion_length", type=int, default=16)
    parser.add_argument("--max_operand", type=int, default=9)
    parser.add_argument("--num_train", type=int, default=16, help="training prompts (one recurs every 16 steps)")
    parser.add_argument("--num_eval", type=int, default=32)
    parser.add_argument("--eval_samples", type=int, default=2)
    parser.add_argument("--eval_every", type=int, default=20)
    parser.add_argument("--selection", default="highest", help="buffer_selection of the gvpo-history arm")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output_dir", default="outputs/history_real_model")
    parser.add_argument("--probe", action="store_true", help="only the untrained model on candidate tasks")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one_out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        return probe_tasks()
    if args.one:
        with open(args.one_out, "w") as f:
            json.dump(train_one(json.loads(args.one)), f)
        return
    os.makedirs(args.output_dir, exist_ok=True)
    cache = Cache(os.path.join(args.output_dir, "runs.jsonl"))
    keys = ("steps", "lr", "batch", "k", "max_completion_length", "max_operand", "num_train", "num_eval",
            "eval_samples", "eval_every")  # fmt: skip
    specs = [dict({k: getattr(args, k) for k in keys}, arm=arm, seed=seed,
                  **({"selection": args.selection} if arm == "gvpo-history" else {}))
             for seed in args.seeds for arm in args.arms]  # fmt: skip
    todo = [s for s in specs if cache.key(s) not in cache.runs]
    print(f"{len(specs) - len(todo)} runs cached, {len(todo)} to run, {args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for spec, run in zip(todo, pool.map(lambda s: run_in_subprocess(s, args.output_dir), todo), strict=True):
            cache.runs[cache.key(spec)] = run
            with open(cache.path, "a") as f:
                f.write(json.dumps(run) + "\n")
            print(f"  {spec['arm']:14s} seed {spec['seed']}: {run['eval_tokens'][-1]:.0f} tokens, held-out "
                  f"{run['heldout'][0]:.3f} -> {final(run):.3f}, {run['seconds']:.0f} s", flush=True)  # fmt: skip
    results = {arm: [cache.runs[cache.key(s)] for s in specs if s["arm"] == arm] for arm in args.arms}
    text = (f"SmolLM2-135M-Instruct, additions 1..{args.max_operand}, {args.steps} steps, lr {args.lr:g} (linear, "
            f"10 % warm-up), {args.batch // args.k} prompts x k={args.k} per step, {args.num_train} training prompts, "
            f"held-out {args.num_eval} x {args.eval_samples}; history: {args.selection}.\n\n"
            + summarise(results))  # fmt: skip
    print(text)
    with open(os.path.join(args.output_dir, "history_real_model.md"), "w") as f:
        f.write(text + "\n")
    if "gvpo" in results:
        gvpo = results["gvpo"]
        plot(results, statistics.fmean(final(r) for r in gvpo), statistics.fmean(r["eval_tokens"][-1] for r in gvpo),
             os.path.join(args.output_dir, "history_real_model.png"), title="SmolLM2-135M-Instruct")  # fmt: skip


if __name__ == "__main__":
    main()
