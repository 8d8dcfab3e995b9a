"""Past one machine: the multi-node launch of docs/scaling.md (DeepSpeed ZeRO-3, one ``gvpo-trl train`` per node with
its ``--machine_rank``) run as 2 nodes x 1 process on 127.0.0.1 over gloo (accelerate_configs/cpu_multi_node_2x1.yaml,
the CPU twin of multi_node_zero3.yaml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .distributed.harness import KNOWN_EXIT_SIGNATURE, free_port

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "accelerate_configs" / "cpu_multi_node_2x1.yaml"
GPU_CONFIG = ROOT / "accelerate_configs" / "multi_node_zero3.yaml"


def test_cpu_twin_differs_from_the_gpu_config_only_in_size_and_address():
    cpu, gpu = (yaml.safe_load(path.read_text()) for path in (CPU_CONFIG, GPU_CONFIG))
    assert gpu["num_machines"] == 2 and gpu["distributed_type"] == "DEEPSPEED"
    assert gpu["deepspeed_config"]["deepspeed_config_file"] == "accelerate_configs/deepspeed_zero3.json"
    assert cpu["deepspeed_config"]["deepspeed_config_file"] == "accelerate_configs/cpu_zero3.json"
    differ = {key for key in cpu.keys() | gpu.keys() if cpu.get(key) != gpu.get(key)}
    assert differ == {"deepspeed_config", "main_process_ip", "num_processes"}
    assert cpu["num_processes"] == cpu["num_machines"] == 2  # 1 process per node


@pytest.mark.distributed
def test_two_nodes_one_process_each_zero3(toy_model_dir, tmp_path, launch_env):
    out, port = tmp_path / "run", free_port()
    env = {**launch_env(), "GVPO_TRL_TOY_DIR": str(Path(toy_model_dir).parent)}
    nodes = []
    for rank in (0, 1):  # as on two machines: the same command, its own --machine_rank
        cmd = [sys.executable, "-m", "gvpo_trl", "train", "--config", "recipes/toy/gvpo.yaml", "--max_steps", "2",
               "--logging_steps", "1", "--num_eval_prompts", "0", "--output_dir", str(out), "--use_cpu", "true",
               "--accelerate_config", str(CPU_CONFIG.relative_to(ROOT)), "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]  # fmt: skip
        log = open(tmp_path / f"node{rank}.txt", "w")
        nodes.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in nodes:
        proc.wait(timeout=1200)
        log.close()
    for rank, (proc, _) in enumerate(nodes):
        text = (tmp_path / f"node{rank}.txt").read_text(errors="replace")
        assert proc.returncode == 0 or KNOWN_EXIT_SIGNATURE in text, text[-5000:]
        # each node's main process reports the global world: 2 processes, one per node
        assert "Trained GVPO for 2 steps" in text and "(2 processes)" in text, text[-3000:]
    # ZeRO-3 gathered the partitioned weights into one full checkpoint, and they moved from the initial model
    trained, initial = load_file(out / "model.safetensors"), load_file(Path(toy_model_dir) / "model.safetensors")
    assert trained.keys() == initial.keys()
    assert all(trained[k].shape == initial[k].shape for k in initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
