"""Launched by ``tests/test_hardening_round2.py`` through ``harness.launch`` (``... checkpoint_worker.py SPEC.json
OUT_DIR``): a 2-step-per-save GVPO run on every process, then the newest checkpoint cut short as a kill during its save
would leave it (no completion marker, no optimizer state), then a second trainer resuming with
``resume_from_checkpoint=True``. Writes ``OUT_DIR/rank{p}.json`` (the marker's file list, the steps the resumed run
trained, the warning it gave) and ``done.rank{p}``."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for helpers.py

from datasets import Dataset  # noqa: E402
from helpers import make_trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from gvpo_trl.checkpoint_integrity import MARKER  # noqa: E402
from gvpo_trl.demo.toy import build_dataset  # noqa: E402


class Steps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    run = Path(out_dir) / "run"
    dataset = Dataset.from_dict({"prompt": list(build_dataset(8)["prompt"]) * 8})
    trainer = make_trainer("gvpo", run, dataset=dataset, **spec["args"])
    trainer.train()
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    newest = run / f"checkpoint-{spec['args']['max_steps']}"
    marker = json.loads((newest / MARKER).read_text())
    trainer.accelerator.wait_for_everyone()
    if rank == 0:  # what a kill during the save of the newest checkpoint leaves
        (newest / MARKER).unlink()
        (newest / "optimizer.pt").unlink()
    trainer.accelerator.wait_for_everyone()
    resumed = make_trainer("gvpo", run, dataset=dataset, **{**spec["args"], "max_steps": spec["args"]["max_steps"] + 2})
    steps = Steps()
    resumed.add_callback(steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=True)
    skipped = [str(w.message) for w in caught if "resume_from_checkpoint=True skips" in str(w.message)]
    record = {"world": world, "marker_files": sorted(marker["files"]), "steps": steps.steps, "skipped": skipped}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    (Path(out_dir) / f"done.rank{rank}").write_text("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
