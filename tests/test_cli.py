"""The ``gvpo-trl`` command line (gvpo_trl/cli.py) and the shipped recipes (recipes/): parsing as TRL's scripts do,
the CPU recipes run for a few steps, launcher flags start ``accelerate launch``."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from trl import ModelConfig, TrlParser

from gvpo_trl import TRAINERS, cli

from .distributed.harness import KNOWN_EXIT_SIGNATURE, free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))
CPU_RECIPES = [r for r in RECIPES if r.parent.name in ("toy", "SmolLM2-135M-Instruct")]
GPU_RECIPES = [r for r in RECIPES if r not in CPU_RECIPES]


def run_cli(*args, env=None, timeout=900):
    """``python -m gvpo_trl ...`` (what the ``gvpo-trl`` console script runs) from the repository root, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "gvpo_trl", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def parse(recipe, *flags):
    values = yaml.safe_load(Path(recipe).read_text())
    config_cls = cli.ALGORITHMS[values["algorithm"]][0]
    parser = TrlParser((cli.TrainScriptArguments, config_cls, ModelConfig))
    return values, parser.parse_args_and_config(["--config", str(recipe), *flags])


def test_console_script_is_the_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["gvpo-trl"].partition(":")
    assert getattr(importlib.import_module(module), name) is cli.main


def test_commands_and_usage(capsys):
    assert cli.main(["--help"]) == 0
    assert "train    train with --algorithm {gvpo,gpg,gspo,grpo}" in capsys.readouterr().out
    assert cli.main(["fit"]) == 2
    assert "gvpo-trl: unknown command 'fit'" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_compat_command_names_what_changed(capsys, monkeypatch):
    assert cli.main(["compat"]) == 0
    out = capsys.readouterr().out
    assert "gvpo-trl is tested with trl<1.17,>=1.16.0" in out and "Inside the tested range." in out
    assert "Every internal checked without training is present" in out and "CHANGED" not in out
    from trl import GRPOTrainer

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", lambda self, inputs: None)
    assert cli.main(["compat"]) == 1
    assert "CHANGED  GRPOTrainer._compute_loss('self', 'inputs') no longer starts with" in capsys.readouterr().out


def test_task_follows_the_model_flags():
    assert cli.task_of({}) == "toy"
    assert cli.task_of({"model": "smollm2"}) == "smollm2"
    assert cli.task_of({"model_name_or_path": "m", "dataset_name": "d"}) == "dataset"
    with pytest.raises(SystemExit, match="Pass both --model_name_or_path and --dataset_name"):
        cli.task_of({"dataset_name": "d"})
    with pytest.raises(SystemExit, match="--model smollm2 brings its own model"):
        cli.task_of({"model": "smollm2", "model_name_or_path": "m"})


def test_launcher_flags_go_to_accelerate_the_rest_to_training():
    argv = ["--config", "r.yaml", "--max_steps", "2", "--num_processes", "2", "--accelerate_config", "c.yaml",
            "--seed", "2"]  # fmt: skip
    from_cli = ["--num_processes", "2", "--accelerate_config", "c.yaml"]
    launcher, training = cli.launcher_arguments(argv, ["--num_machines", "1"], from_cli)
    assert launcher == ["--num_machines", "1", "--num_processes", "2", "--config_file", "c.yaml"]
    assert training == ["--config", "r.yaml", "--max_steps", "2", "--seed", "2"]


def test_solution_reward():
    completions = [
        "The answer is\n42",
        "so x = \\boxed{\\frac{1}{2}}.",
        "42 is wrong\nso it is 41",
        [{"role": "assistant", "content": "Final:  Paris "}],
        "",
    ]
    solutions = ["42", "\\frac{1}{2}", "42", "paris", "1"]
    assert cli.solution_reward(completions=completions, solution=solutions) == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_a_flag_neither_field_nor_launcher_flag_is_refused_before_launching():
    with pytest.raises(SystemExit, match=r"unknown flags \['--learnin_rate'\]: neither a field"):
        cli.main(["train", "--config", str(ROOT / "recipes/toy/gvpo.yaml"), "--learnin_rate", "1e-3"])


def test_every_algorithm_has_a_recipe_per_setting():
    assert sorted((r.parent.name, r.stem) for r in RECIPES) == sorted(
        (setting, algorithm) for setting in ("toy", "SmolLM2-135M-Instruct", "Qwen2.5-1.5B-Instruct")
        for algorithm in TRAINERS
    )  # fmt: skip


@pytest.mark.parametrize("recipe", CPU_RECIPES, ids=lambda r: f"{r.parent.name}/{r.stem}")
def test_cpu_recipes_parse_into_their_configs(recipe):
    values, (script_args, args, model_args) = parse(recipe, "--seed", "3")
    assert type(args) is TRAINERS[values["algorithm"]][0] and script_args.algorithm == values["algorithm"]
    assert args.learning_rate == float(values["learning_rate"]) and args.max_steps == values["max_steps"]
    assert args.seed == 3  # a flag overrides the file
    if recipe.parent.name == "toy":  # the toy recipes state the quickstart presets; they must not drift apart
        presets = {**cli.QUICKSTART_DEFAULTS, **cli.QUICKSTART_PER_ALGORITHM.get(values["algorithm"], {})}
    else:
        assert script_args.model == "smollm2"
        presets = {**cli.SMOLLM2_DEFAULTS, "num_eval_prompts": cli.SMOLLM2_NUM_EVAL}
    presets.pop("use_cpu")
    assert {k: values[k] if k != "learning_rate" else float(values[k]) for k in presets} == presets


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda r: r.stem)
def test_gpu_recipes_are_valid_configs(recipe):
    # every value passes the config checks (bf16 needs a GPU, hence --use_cpu here)
    values, (script_args, args, model_args) = parse(recipe, "--use_cpu", "true")
    assert type(args) is TRAINERS[values["algorithm"]][0]
    assert model_args.model_name_or_path == values["model_name_or_path"] and script_args.dataset_name
    assert args.use_vllm and args.vllm_mode == "server" and args.bf16
    assert args.per_device_train_batch_size % args.num_generations == 0  # whole groups per micro-step
    launch = " ".join(line for line in recipe.read_text().splitlines() if line.startswith("#"))
    for config in ("accelerate_configs/deepspeed_zero3.yaml", "accelerate_configs/multi_node_zero3.yaml"):
        assert config in launch and (ROOT / config).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", CPU_RECIPES, ids=lambda r: f"{r.parent.name}/{r.stem}")
def test_cpu_recipes_train_a_few_steps(recipe, toy_model_dir, tmp_path):
    values = yaml.safe_load(recipe.read_text())
    steps = 2 if recipe.parent.name == "toy" else 1
    out = tmp_path / "run"
    proc = run_cli("train", "--config", recipe.relative_to(ROOT), "--max_steps", steps, "--num_eval_prompts", 4,
                   "--output_dir", out, env={"GVPO_TRL_TOY_DIR": str(Path(toy_model_dir).parent)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"Trained {values['algorithm'].upper()} for {steps} steps" in proc.stdout
    assert "Mean reward after training" in proc.stdout
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert type(args).__name__ == TRAINERS[values["algorithm"]][0].__name__
    assert args.learning_rate == float(values["learning_rate"]) and args.output_dir == str(out)
    assert list(out.glob("*.safetensors")) and (out / "reward_curve.png").is_file()


@pytest.mark.distributed
def test_launcher_flags_start_accelerate_with_two_processes(toy_model_dir, tmp_path, launch_env):
    out = tmp_path / "run"
    proc = run_cli(
        "gspo", "--config", "recipes/toy/gspo.yaml", "--max_steps", 2, "--num_eval_prompts", 0, "--output_dir", out,
        "--use_cpu", "true", "--accelerate_config", "accelerate_configs/cpu_ddp_2proc.yaml", "--num_processes", 2,
        "--main_process_port", free_port(), env={**launch_env(), "GVPO_TRL_TOY_DIR": str(Path(toy_model_dir).parent)},
    )  # fmt: skip
    assert proc.returncode == 0 or KNOWN_EXIT_SIGNATURE in proc.stderr, proc.stderr[-5000:]
    assert "Trained GSPO for 2 steps" in proc.stdout and "(2 processes)" in proc.stdout, proc.stdout[-3000:]
