"""The Makefile's tooling targets: ``make lint`` / ``make format`` need ruff alone (not the test environment), and
``make check-trl TRL=<version>`` hands the version and the pinned CPU torch to ``.ci/check_trl``."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


def test_lint_installs_only_the_pinned_ruff(tmp_path):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (ruff,) = [d for d in extras["dev"] if d.startswith("ruff")]
    for target in ("lint", "format"):
        proc = make("-n", target, f"LINT_VENV={tmp_path}/lint", f"VENV={tmp_path}/test-env")
        assert proc.returncode == 0, proc.stderr
        installs = [line for line in proc.stdout.splitlines() if " install " in line]
        assert installs == [f'{tmp_path}/lint/bin/python -m pip --quiet --disable-pip-version-check install "{ruff}"']
        assert f"{tmp_path}/test-env" not in proc.stdout  # the test environment is neither built nor used
        assert re.search(rf"^{tmp_path}/lint/bin/ruff (check|format)", proc.stdout, re.M)


def test_check_trl_passes_the_version_and_the_cpu_torch():
    proc = make("-n", "check-trl", "TRL=9.9.9")
    assert proc.returncode == 0 and ".ci/check_trl 9.9.9 torch==2.13.0" in proc.stdout, proc.stdout + proc.stderr
    proc = make("check-trl")
    assert proc.returncode != 0 and "name the TRL version: make check-trl TRL=<version>" in proc.stdout
