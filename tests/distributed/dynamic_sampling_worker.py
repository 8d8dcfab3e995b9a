"""Launched by ``tests/test_dynamic_sampling.py`` through ``harness.launch`` (``... dynamic_sampling_worker.py SPEC.json
OUT_DIR``): one run of ``spec["algorithm"]`` with dynamic sampling, recording each generation round (rows, valid groups
of this process), the group sizes of each trained generation batch and the ``dynamic_sampling/*`` logs. Writes
``OUT_DIR/rank{p}.json`` and ``OUT_DIR/done.rank{p}``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for helpers.py

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import cpu_args, tiny_model_path  # noqa: E402

from gvpo_trl import TRAINERS  # noqa: E402
from gvpo_trl.columns import GROUP_ID, REWARDS  # noqa: E402
from gvpo_trl.demo.toy import repeat_letter_reward  # noqa: E402
from gvpo_trl.groups import group_sizes, zero_variance_groups  # noqa: E402


def half_dead_reward(prompts, completions, **kwargs):
    real = repeat_letter_reward(prompts, completions)
    return [0.5 if p[0] in "abcd" else r for p, r in zip(prompts, real, strict=True)]


def recording(trainer_cls):
    class Recording(trainer_cls):
        def _score_groups(self, inputs):
            output = super()._score_groups(inputs)
            valid = ~zero_variance_groups(output[REWARDS], output[GROUP_ID])
            self.rounds.append((len(inputs), int(torch.unique(output[GROUP_ID][valid]).numel())))
            return output

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if self.model.training:
                self.group_sizes.append(group_sizes(output[GROUP_ID]).tolist())
            return output

    return Recording


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    config_cls, trainer_cls = TRAINERS[spec["algorithm"]]
    trainer = recording(trainer_cls)(
        model=tiny_model_path(),
        reward_funcs=half_dead_reward,
        args=cpu_args(config_cls, out_dir, **spec["args"]),
        train_dataset=Dataset.from_dict({"prompt": spec["prompts"]}),
    )
    trainer.rounds, trainer.group_sizes = [], []
    trainer.train()
    rank = trainer.accelerator.process_index
    logs = [{k: v for k, v in h.items() if k.startswith("dynamic_sampling/")} for h in trainer.state.log_history]
    record = {"world": trainer.accelerator.num_processes, "rounds": trainer.rounds,
              "group_sizes": trainer.group_sizes, "logs": [log for log in logs if log]}  # fmt: skip
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    (Path(out_dir) / f"done.rank{rank}").write_text("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
