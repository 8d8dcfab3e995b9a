"""Launched by ``tests/test_hardening.py`` through ``harness.launch`` (``... nonfinite_worker.py SPEC.json OUT_DIR``):
a GVPO run in which only the LAST process's loss turns NaN (a forward hook on its final norm, active with grad only).
Every process must stop with the same ``FloatingPointError`` before its parameters change, none waiting forever in a
collective. Writes ``OUT_DIR/rank{p}.json`` (the error, whether the parameters are unchanged) and ``done.rank{p}``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for helpers.py

from helpers import make_trainer  # noqa: E402


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    trainer = make_trainer("gvpo", out_dir, **spec["args"])
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    if rank == world - 1:
        nan = float("nan")
        trainer.model.model.norm.register_forward_hook(lambda m, i, out: out * nan if torch.is_grad_enabled() else out)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    error = None
    try:
        trainer.train()
    except FloatingPointError as caught:
        error = str(caught)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    record = {"world": world, "error": error, "unchanged": unchanged, "step": trainer.state.global_step}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    (Path(out_dir) / f"done.rank{rank}").write_text("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
