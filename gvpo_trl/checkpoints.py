"""What gvpo-trl adds to a checkpoint folder, and the check that a resume continues the run that wrote it.

Beside the model, optimizer and trainer state that transformers writes, each checkpoint holds ``gvpo_trl_run.json``:
the settings that define the run (algorithm, group size, generation batch, mixed-buffer and dynamic-sampling
settings, reward functions).
Resuming with different values would continue a different run silently (a k = 4 run resumed with k = 2 skips prompts
it never trained on; a GVPOTrainer would continue a GSPO run), so :func:`check_resume` refuses it and says what
differs. The mixed buffer writes its own state file beside it (``gvpo_trl.buffer.BUFFER_STATE_NAME``).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

#: File name of the run identity inside a checkpoint folder.
RUN_FILE = "gvpo_trl_run.json"


def checkpoint_dir(trainer: Any, trial: Any = None) -> str:
    """The folder transformers' ``Trainer._save_checkpoint`` writes the checkpoint of the current step to."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    return os.path.join(trainer._get_output_dir(trial=trial), folder)


def run_identity(trainer: Any) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the checkpoint (JSON-serialisable): the
    algorithm, the group and generation-batch sizes, every mixed-buffer and dynamic-sampling field, and the reward
    functions with their weights."""
    from dataclasses import fields

    from .buffer import BufferArgs
    from .dynamic_sampling import DynamicSamplingArgs

    args = trainer.args
    identity = {
        "algorithm": getattr(trainer, "metric_prefix", type(trainer).__name__),
        "num_generations": trainer.num_generations,
        "generation_batch_size": args.generation_batch_size,
    }
    identity.update({f.name: getattr(args, f.name, None) for f in (*fields(BufferArgs), *fields(DynamicSamplingArgs))})
    # the members per group it resolves to: a count and the equal fraction of a group are one run
    identity["buffer_history_per_group"] = getattr(trainer, "history_per_group", 0)
    identity["reward_functions"] = list(trainer.reward_func_names)
    identity["reward_weights"] = [float(w) for w in trainer.reward_weights.tolist()]
    return identity


#: The most bytes a run identity file may have (it holds a dozen settings).
MAX_RUN_FILE_BYTES = 64 * 1024


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_run_identity(path: str) -> dict[str, Any]:
    """The run identity stored at ``path``; ``ValueError`` unless it is a small JSON object of settings (strings,
    numbers, booleans, null, or flat lists of those)."""
    size = os.path.getsize(path)
    if size > MAX_RUN_FILE_BYTES:
        raise ValueError(f"{size} bytes, more than a run identity holds ({MAX_RUN_FILE_BYTES})")
    with open(path) as f:
        saved = json.load(f)
    if not isinstance(saved, dict):
        raise ValueError(f"a JSON {type(saved).__name__}, not an object of settings")
    scalar = (str, int, float, bool, type(None))
    for key, value in saved.items():
        if not isinstance(value, scalar) and not (
            isinstance(value, list) and all(isinstance(v, scalar) for v in value)
        ):
            raise ValueError(f"the setting {_clip(key, 40)!r} holds a {type(value).__name__} of nested values")
    return saved


def write_run_identity(folder: str, identity: dict[str, Any]) -> None:
    with open(os.path.join(folder, RUN_FILE), "w") as f:
        json.dump(identity, f, indent=1)


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: checkpoint X, now Y"`` for each setting that differs (keys missing on either side count)."""
    return [
        f"{_clip(key, 60)}: checkpoint {_clip(repr(saved.get(key)))}, now {_clip(repr(current.get(key)))}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def check_resume(checkpoint: str, current: dict[str, Any], name: str) -> None:
    """Raise ``ValueError`` when ``checkpoint`` was written by a run with other settings than ``current``; warn when it
    holds no run identity (written by TRL's own trainer or an older gvpo-trl), since then nothing can be checked."""
    path = os.path.join(checkpoint, RUN_FILE)
    if not os.path.exists(path):
        warnings.warn(
            f"{name}: the checkpoint {checkpoint} has no {RUN_FILE}, so gvpo-trl cannot check that it was written by a "
            "run with the same algorithm, group size and buffer settings. Resuming anyway.",
            stacklevel=3,
        )
        return
    try:
        saved = read_run_identity(path)
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(
            f"{name}: cannot read {path} ({type(error).__name__}: {_clip(str(error))}); the checkpoint is damaged. "
            "Resume from an earlier checkpoint, or start fresh (no resume_from_checkpoint, or a new output_dir)."
        ) from None
    differences = identity_differences(saved, current)
    if differences:
        raise ValueError(
            f"{name}: refusing to resume from {checkpoint}: it was written by a different run ("
            + "; ".join(differences)
            + "). Resume with the settings of that run, or start fresh: leave out resume_from_checkpoint (or use a "
            "new output_dir)."
        )
