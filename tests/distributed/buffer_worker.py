"""Launched by ``tests/test_buffer.py`` through ``harness.launch`` (``... buffer_worker.py SPEC.json OUT_DIR``): one
GVPO run with the mixed buffer, recording per generation round the global plan, the member kinds of the local rows,
the buffer's digest and the completion ids of the local historical members. Writes ``OUT_DIR/rank{p}.json`` and
``OUT_DIR/done.rank{p}``. With ``"kill_at"`` in the spec, the process kills itself (SIGKILL) when it saves the
checkpoint of that step, as a crashed run would."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for helpers.py

from datasets import Dataset  # noqa: E402
from helpers import cpu_args, tiny_model_path  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from gvpo_trl import GVPOConfig, GVPOTrainer  # noqa: E402
from gvpo_trl.buffer import HISTORICAL  # noqa: E402
from gvpo_trl.demo.toy import repeat_letter_reward  # noqa: E402


class Recording(GVPOTrainer):
    def _plan(self, rnd, prompts):
        super()._plan(rnd, prompts)
        plan = [[p.key, list(p.historical), p.external, p.cut] for p in rnd.plan]
        self.rec.append({"step": rnd.step, "plan": plan, "kinds": [m.kind for m in rnd.members]})

    def _finish_mixed_batch(self, rnd, output):
        super()._finish_mixed_batch(rnd, output)
        self.rec[-1]["digest"] = self.sample_buffer.digest()
        self.rec[-1]["hist_ids"] = [m.completion_ids for m in rnd.members if m.kind == HISTORICAL]


class KillOnSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    callbacks = [KillOnSave(spec["kill_at"])] if "kill_at" in spec else []
    args = cpu_args(GVPOConfig, out_dir, **spec["args"])
    trainer = Recording(
        model=tiny_model_path(),
        reward_funcs=repeat_letter_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": spec["prompts"]}),
        callbacks=callbacks,
    )
    trainer.rec = []
    trainer.train()
    rank = trainer.accelerator.process_index
    record = {"world": trainer.accelerator.num_processes, "rec": trainer.rec}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    (Path(out_dir) / f"done.rank{rank}").write_text("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
