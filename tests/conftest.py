"""Shared pytest fixtures.

Multi-process tests (``tests/test_distributed.py``) use:

- ``toy_model_dir``: the tiny offline Llama of ``gvpo_trl.demo.toy`` (``helpers.tiny_model_path``, the one toy-model
  source).
- ``torch_extensions_dir``: ONE cache directory for DeepSpeed's JIT-compiled C++ op (``deepspeed_shm_comm``, ~30 s
  to build on 2 cores), shared by every launched process, and the op built in it once before the first DeepSpeed
  launch. Honours ``$TORCH_EXTENSIONS_DIR`` when set (CI can point it at a cached path); otherwise it lives in
  pytest's cache (``.pytest_cache/d/``), keyed by Python and torch versions, so a fresh CI checkout pays the build
  once per run and a developer machine once.
- ``launch_env``: the environment for launched processes (1 thread each, offline, the extension cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The toy model is tiny: thread start-up costs more than it saves, and 2 threads on a shared 2-core machine run up to
# 20x slower than 1 (measured). Every test process, and every process it launches (``launch_env``), uses one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_model_dir() -> str:
    from .helpers import tiny_model_path

    return tiny_model_path()


def _extensions_root(config, tmp_path_factory) -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import torch

    key = f"torch_extensions_py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    return cache.mkdir(key.replace("+", "_")) if cache is not None else tmp_path_factory.mktemp("torch_extensions")


@pytest.fixture(scope="session")
def torch_extensions_dir(request, tmp_path_factory) -> Path:
    """The shared extension cache, with DeepSpeed's CPU communication op already built in it (once)."""
    pytest.importorskip("deepspeed")
    root = _extensions_root(request.config, tmp_path_factory)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root), "OMP_NUM_THREADS": "1"}
    code = (
        "from deepspeed.comm.torch import build_shm_op\nop = build_shm_op()\nprint('GVPO_TRL_SHM_OP', op is not None)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    if proc.returncode != 0 or "GVPO_TRL_SHM_OP" not in proc.stdout:
        raise RuntimeError(f"building DeepSpeed's shm op failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return root


@pytest.fixture(scope="session")
def launch_env():
    """A function ``launch_env(**extra)`` giving the environment for launched processes."""
    from tests.distributed.harness import launch_env as make

    return make
