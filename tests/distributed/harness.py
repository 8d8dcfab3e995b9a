"""Pytest-side helpers for the multi-process tests: launch ``run_scenarios.py`` with ``accelerate launch`` (or plain
``python`` for 1 process), judge the launch by what it wrote, and read the results back.

A launch is judged complete when every rank wrote its ``done.rank{p}`` marker after the last run. The exit code alone
is not trusted either way: a launch can exit 0 with the wrong world size (checked by the tests from ``rank*.json``),
and rarely rank 1 aborts at interpreter exit after everything was written (``terminate called without an active
exception``: a known gloo/CPU teardown race). That signature is the only failure that is tolerated: with
complete results it is accepted, without them the launch is retried once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("run_scenarios.py")
CONFIG_DIR = REPO / "accelerate_configs"
KNOWN_EXIT_SIGNATURE = "terminate called without an active exception"
# variables of an enclosing launcher that must not leak into the launched processes
_LEAKY_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ACCELERATE_USE_CPU",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "ACCELERATE_MIXED_PRECISION",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of launched processes: 1 thread each (2 processes on 2 cores), offline, quiet."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY_ENV}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRL_EXPERIMENTAL_SILENCE="1",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra or {})
    return env


@dataclass
class RunResult:
    """What one run of the spec wrote (see ``run_scenarios.py``)."""

    dir: Path

    @cached_property
    def result(self) -> dict:
        return json.loads((self.dir / "result.json").read_text())

    @cached_property
    def ranks(self) -> list[dict]:
        files = sorted(self.dir.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        return [json.loads(p.read_text()) for p in files]

    @property
    def log_history(self) -> list[dict]:
        return self.result["log_history"]

    @property
    def step_logs(self) -> list[dict]:
        """The per-optimizer-step log entries (those with a ``loss``)."""
        return [entry for entry in self.log_history if "loss" in entry]

    def weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.dir / "final.safetensors"))

    def tensors(self) -> list[dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        path = self.dir / "tensors.safetensors"
        flat = load_file(str(path)) if path.exists() else {}
        records: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            index, name = key.split(".", 1)
            records.setdefault(int(index), {})[name] = value
        return [records[i] for i in sorted(records)]

    def probe(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.dir / "probe.safetensors"))


@dataclass
class Launch:
    """One launch of ``run_scenarios.py`` (all runs of a spec in the same processes)."""

    label: str
    out_dir: Path
    num_processes: int
    returncode: int
    log_path: Path
    attempts: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def run(self, name: str) -> RunResult:
        path = self.out_dir / name
        assert (path / "result.json").exists(), f"{self.label}: run {name!r} wrote no result ({self.log_tail()})"
        return RunResult(path)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _complete(out_dir: Path, num_processes: int) -> bool:
    return all((out_dir / f"done.rank{p}").exists() for p in range(num_processes))


def launch(
    label: str,
    spec: dict,
    work_dir: Path,
    num_processes: int,
    config_file: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
    script: Path = SCRIPT,
) -> Launch:
    """Run the spec: ``accelerate launch --config_file CONFIG --num_processes N --main_process_port PORT`` from the
    repository root (the configs name their DeepSpeed JSON relative to it), or plain ``python`` when ``config_file``
    is None (1 process). Raises ``AssertionError`` with the log tail unless the launch is judged complete."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    notes = []
    start = time.time()
    for attempt in (1, 2):
        out_dir = work_dir / f"out{attempt}"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        log_path = work_dir / f"log{attempt}.txt"
        if config_file is None:
            assert num_processes == 1
            cmd = [sys.executable, str(script), str(spec_path), str(out_dir)]
        else:
            cmd = [
                sys.executable,
                "-m",
                "accelerate.commands.accelerate_cli",
                "launch",
                "--config_file",
                str(CONFIG_DIR / config_file),
                "--num_processes",
                str(num_processes),
                "--main_process_port",
                str(free_port()),
                str(script),
                str(spec_path),
                str(out_dir),
            ]
        with open(log_path, "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=env or launch_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        text = log_path.read_text(errors="replace")
        complete = _complete(out_dir, num_processes)
        result = Launch(label, out_dir, num_processes, proc.returncode, log_path, attempt, time.time() - start, notes)
        if complete and proc.returncode == 0:
            return result
        if KNOWN_EXIT_SIGNATURE in text:
            if complete:
                notes.append(
                    f"attempt {attempt}: exit code {proc.returncode} with the known exit-time abort after all "
                    "results were written: judged by the results"
                )
                return result
            if attempt == 1:
                notes.append("attempt 1: known exit-time abort before the results were complete: retried once")
                continue
        raise AssertionError(
            f"{label}: launch failed (exit code {proc.returncode}, results {'complete' if complete else 'incomplete'}, "
            f"attempt {attempt}); command: {' '.join(cmd)}\n--- log tail ---\n{result.log_tail()}"
        )
    raise AssertionError("unreachable")
