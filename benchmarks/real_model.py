"""GVPO, GPG, GSPO and TRL's GRPOTrainer on a real pretrained chat model: SmolLM2-135M-Instruct (materialised
offline by ``gvpo_trl.demo.smollm2``) on the chat addition task (``gvpo_trl.demo.chat_tasks``), identical settings.

Every arm starts from the same weights, trains for the same number of optimizer steps on the same prompts with the
same batch (``--batch`` completions = ``--batch / --k`` prompts × ``--k``), learning rate, completion length and
seed, and is evaluated before and after (mean reward of ``--k`` sampled completions for each of ``--num_eval``
held-out additions, TRL's ``evaluate`` under a fixed seed). Each algorithm keeps its own defaults otherwise (GVPO
and GSPO make 4 optimizer steps per rollout; GPG and GRPO generate for every step, GPG resamples prompts while too
few groups have reward variance). Arms: ``gvpo``, ``gvpo-lora``, ``gpg``, ``gspo``, ``grpo`` (full fine-tuning,
except ``gvpo-lora``: r=16, alpha=32 on q/k/v/o at ``--lora_lr``). ``gvpo-mixed`` (not in the default set) is the
mixed-buffer recipe of docs/mixed_buffers.md for twice the steps at half the learning rate; with ``--num_train 16``
the prompts recur often enough for history (the real-model check of docs/mixed_buffers.md).

Each arm runs in its own subprocess, so its peak memory (``ru_maxrss``; on CUDA also ``max_memory_allocated``) is
its own. Written to ``--output_dir``: ``results.json``, ``results.md`` (the table) and ``reward_curve.png``.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/real_model.py            # CPU: 5-13 min per arm, 40 in all
    python benchmarks/real_model.py --algorithms gvpo grpo --steps 10             # a shorter comparison
    python benchmarks/real_model.py --device cuda --bf16                          # GPU preset (see --help)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("gvpo", "gvpo-lora", "gpg", "gspo", "grpo", "gvpo-mixed")
#: gvpo-mixed: the earlier mixed-buffer recipe (docs/mixed_buffers.md; half of each group from history, half the
#: learning rate, β = 0.3, a drift guard) for twice the steps, so that it generates about as many tokens as gvpo.
MIXED_RECIPE = dict(buffer_history_per_group=0.5, buffer_max_staleness=32, buffer_selection="newest",
                    buffer_max_drift=0.15, gvpo_beta=0.3)  # fmt: skip
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
#: --device cuda: a larger budget that fits about 10 minutes for all arms on one recent GPU (not run: see
#: docs/real_model.md). Explicit flags override it.
GPU_PRESET = dict(steps=100, batch=32, k=4, max_completion_length=32, num_eval=32)
CPU_DEFAULTS = dict(steps=40, batch=8, k=4, max_completion_length=16, num_eval=24)


def run_arm(arm: str, args) -> dict:
    """Train and evaluate one arm in this process; returns its measurements."""
    import torch
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    import gvpo_trl
    from gvpo_trl.demo.chat_tasks import addition_reward, build_datasets
    from gvpo_trl.demo.smollm2 import materialize_smollm2

    algorithm = arm.split("-")[0]
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else gvpo_trl.TRAINERS[algorithm]
    cuda = args.device == "cuda"
    train, held_out = build_datasets(num_eval=args.num_eval, seed=args.seed)
    if args.num_train:  # fewer prompts recur sooner: the mixed buffer reuses a prompt's samples when it recurs
        train = train.select(range(min(args.num_train, len(train))))
    mixed = arm == "gvpo-mixed"
    recipe = MIXED_RECIPE if mixed else {}
    with tempfile.TemporaryDirectory() as output_dir:
        config = config_cls(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=args.num_eval * args.k,
            num_generations=args.k,
            max_completion_length=args.max_completion_length,
            temperature=1.0,
            learning_rate=args.lora_lr if arm.endswith("lora") else args.lr * (0.5 if mixed else 1.0),
            max_steps=args.steps * (2 if mixed else 1),
            logging_steps=1,
            seed=args.seed,
            bf16=args.bf16,
            gradient_checkpointing=False,
            use_cpu=not cuda,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            **recipe,
        )
        trainer = trainer_cls(
            model=materialize_smollm2(),
            reward_funcs=addition_reward,
            args=config,
            train_dataset=train,
            peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA) if arm.endswith("lora") else None,
        )

        def held_out_reward():
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
                torch.manual_seed(args.seed)
                return trainer.evaluate(eval_dataset=held_out)["eval_reward"]

        before = held_out_reward()
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        after = held_out_reward()
    logs = [e for e in trainer.state.log_history if "reward" in e and "eval_reward" not in e]
    return {
        "arm": arm,
        "learning_rate": config.learning_rate,
        "steps": trainer.state.global_step,
        "steps_per_generation": trainer.args.steps_per_generation,
        "held_out_before": before,
        "held_out_after": after,
        "train_seconds": seconds,
        "seconds_per_step": seconds / max(trainer.state.global_step, 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "curve": [(e["step"], e["reward"]) for e in logs],
        # generated tokens (running total) and the reward of the freshly generated members, per generation
        "generated_tokens": max((e.get("buffer/generated_tokens_total", 0) for e in logs), default=0),
        "fresh_curve": [
            (e["buffer/generated_tokens_total"], e.get("buffer/fresh_reward", e["reward"]))
            for e in logs
            if "buffer/generated_tokens_total" in e
        ],
    }


def write_report(results: list[dict], args, out: Path, command: str) -> None:
    rows = [
        "| arm | lr | steps | held-out reward before → after | s/step | peak RSS (MiB) |"
        + (" peak CUDA (MiB) |" if args.device == "cuda" else ""),
        "|---|---|---|---|---|---|" + ("---|" if args.device == "cuda" else ""),
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['arm']} | failed: {r['error']} |")
            continue
        rows.append(
            f"| {r['arm']} | {r['learning_rate']:g} | {r['steps']} | {r['held_out_before']:.3f} → "
            f"**{r['held_out_after']:.3f}** | {r['seconds_per_step']:.1f} | {r['peak_rss_mib']:.0f} |"
            + (f" {r['peak_cuda_mib']:.0f} |" if args.device == "cuda" else "")
        )
    header = (
        f"`{command}` ({time.strftime('%Y-%m-%d')}; device {args.device}; batch {args.batch} = "
        f"{args.batch // args.k} prompts × k={args.k}; max_completion_length {args.max_completion_length}; "
        f"{args.num_eval} held-out prompts × {args.k} samples; seed {args.seed})"
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
        print("matplotlib is not installed: no reward curve written.")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    window = 5
    for r in results:
        if "curve" not in r or not r["curve"]:
            continue
        steps, rewards = zip(*r["curve"], strict=True)
        smooth = [sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
                  for i in range(len(rewards))]  # fmt: skip
        line = ax.plot(
            steps, smooth, label=f"{r['arm']} (held-out {r['held_out_before']:.2f}→{r['held_out_after']:.2f})"
        )
        ax.scatter([r["steps"]], [r["held_out_after"]], color=line[0].get_color(), marker="*", s=80)
    ax.scatter([0], [results[0].get("held_out_before", 0)], color="gray", marker="*", s=80)
    # GVPO/GSPO log a training reward once per rollout (every 4 steps), GPG/GRPO every step
    ax.set(xlabel="optimizer step", ylabel=f"training reward (mean of last {window} logs)", ylim=(-0.02, 1.02))
    ax.set_title("SmolLM2-135M-Instruct, chat additions (★: held-out before/after)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=120)
    print(f"Written to {out}/results.md, results.json, reward_curve.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ARMS[:5]), choices=ARMS)
    parser.add_argument("--steps", type=int, help=f"optimizer steps per arm (CPU {CPU_DEFAULTS['steps']}, GPU 100)")
    parser.add_argument("--batch", type=int, help="completions per optimizer step (CPU 8, GPU 32)")
    parser.add_argument("--k", type=int, help="group size (4)")
    parser.add_argument("--max_completion_length", type=int, help="(CPU 16, GPU 32)")
    parser.add_argument("--num_eval", type=int, help="held-out prompts (CPU 24, GPU 32)")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate, full fine-tuning")
    parser.add_argument("--lora_lr", type=float, default=2e-4, help="learning rate, gvpo-lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, help="train on only the first N training prompts (all 57 by default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--output_dir", default="outputs/real_model_benchmark")
    parser.add_argument("--arm_timeout", type=float, default=3600, help="seconds before an arm's process is killed")
    parser.add_argument("--replot", action="store_true", help="rewrite the table and PNG from results.json")
    parser.add_argument("--_arm", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (GPU_PRESET if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args._arm:  # a child process: one arm
        Path(args._result).write_text(json.dumps(run_arm(args._arm, args)))
        return

    if args.replot:
        saved = json.loads((Path(args.output_dir) / "results.json").read_text())
        write_report(saved["results"], argparse.Namespace(**saved["args"]), Path(args.output_dir), saved["command"])
        return

    from gvpo_trl.demo.smollm2 import materialize_smollm2

    materialize_smollm2()  # once, before the arms (each arm then only reads it)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/real_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    passthrough = argv if argv is not None else sys.argv[1:]
    for arm in args.algorithms:
        result_path = out / f"{arm}.json"
        log_path = out / f"{arm}.log"
        cmd = [sys.executable, __file__, *passthrough, "--_arm", arm, "--_result", str(result_path)]
        print(f"[{time.strftime('%H:%M:%S')}] {arm}: {' '.join(cmd)} (log: {log_path})", flush=True)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.arm_timeout, check=False)
                error = None if proc.returncode == 0 else f"exit code {proc.returncode} (see {log_path.name})"
            except subprocess.TimeoutExpired:
                error = f"killed after {args.arm_timeout:.0f} s"
        if error is None:
            result = json.loads(result_path.read_text())
            result["wall_seconds"] = time.perf_counter() - start
        else:
            result = {"arm": arm, "error": error}
        results.append(result)
        print(f"[{time.strftime('%H:%M:%S')}] {arm}: {json.dumps({k: v for k, v in result.items() if k != 'curve'})}")
        write_report(results, args, out, command)  # after every arm, so a partial run leaves a table


if __name__ == "__main__":
    main()
