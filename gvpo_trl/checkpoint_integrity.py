"""Checkpoints that survive a crash: a checkpoint is complete or it is not used (docs/hardening.md).

Saving: the folder's completion marker (:data:`MARKER`) is removed before a save begins and written last, after every
process has finished writing, atomically (written aside, then renamed); it lists every file of the checkpoint with
its size and the optimizer that wrote ``optimizer.pt``. A save cut short (a crash, a full disk) leaves a folder
without a marker, and a failed write names the folder instead of a bare ``OSError``.

Resuming: :func:`resolve_resume` turns ``resume_from_checkpoint=True`` into the newest complete checkpoint of
``output_dir`` (saying which, and why newer ones were skipped), and refuses an explicit path to a damaged checkpoint,
naming the file and what to do, before transformers loads anything. A checkpoint without a marker (written by TRL's
own trainer or an older gvpo-trl) is judged by its files instead. :func:`loading_optimizer` names the checkpoint's
files when the optimizer state still fails to load, and :func:`check_buffer_state` bounds what a mixed-buffer state
file may hold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import warnings
from typing import Any

import torch

logger = logging.getLogger("gvpo_trl")

#: Written last into every checkpoint folder: the files the checkpoint holds and their sizes.
MARKER = "gvpo_trl_complete.json"
#: The most bytes a marker may have (one line per file).
MAX_MARKER_BYTES = 1 << 20

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_START_FRESH = "or start fresh (leave out resume_from_checkpoint, or use a new output_dir)"


# --- saving --------------------------------------------------------------------------------------------------------


def _optimizer_name(trainer: Any) -> str | None:
    optimizer = getattr(trainer, "optimizer", None)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return None if optimizer is None else type(optimizer).__name__


def checkpoint_files(folder: str) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file under ``folder`` except the marker."""
    out = {}
    for root, _, files in os.walk(folder):
        for file in files:
            path = os.path.join(root, file)
            rel = os.path.relpath(path, folder)
            if rel != MARKER and not rel.startswith(MARKER + "."):
                out[rel.replace(os.sep, "/")] = os.path.getsize(path)
    return dict(sorted(out.items()))


def write_marker(folder: str, trainer: Any) -> None:
    """Write the completion marker of ``folder`` atomically (aside, then renamed)."""
    marker = {
        "version": 1,
        "step": int(trainer.state.global_step),
        "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "optimizer": _optimizer_name(trainer),
        "save_only_model": bool(trainer.args.save_only_model),
        "files": checkpoint_files(folder),
    }
    tmp = os.path.join(folder, f"{MARKER}.tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MARKER))


@contextlib.contextmanager
def saving(folder: str, trainer: Any):
    """Around one checkpoint save: unmark ``folder`` first (a save over an existing checkpoint makes it incomplete
    until it ends), name the folder if a write fails, and mark it complete once every process has written."""
    name = type(trainer).__name__
    if trainer.args.should_save:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, MARKER))
    try:
        yield
    except Exception as error:
        if not _is_write_failure(error):
            error.add_note(f"{name}: the checkpoint {folder} is incomplete (no {MARKER}); resume skips it.")
            raise
        raise OSError(
            getattr(error, "errno", None),
            f"{name}: writing the checkpoint {folder} failed ({_short(error)}); the folder is incomplete "
            f"(it has no {MARKER}), so resume_from_checkpoint=True will skip it and take the newest complete one. "
            "Free disk space (or lower save_total_limit), then resume.",
        ) from error
    trainer.accelerator.wait_for_everyone()  # other processes write optimizer shards (DeepSpeed) or the buffer
    if trainer.args.should_save:
        write_marker(folder, trainer)


def _is_write_failure(error: BaseException) -> bool:
    """An ``OSError``, or what torch's zip writer (a ``RuntimeError``) and safetensors (a ``SafetensorError`` wrapping
    the OS error) raise for a failed write."""
    return isinstance(error, (OSError, RuntimeError)) or "SafetensorError" in type(error).__name__


# --- what a checkpoint holds ---------------------------------------------------------------------------------------


def _read_marker(folder: str) -> tuple[dict | None, str | None]:
    path = os.path.join(folder, MARKER)
    if not os.path.exists(path):
        return None, None
    try:
        if os.path.getsize(path) > MAX_MARKER_BYTES:
            raise ValueError(f"larger than {MAX_MARKER_BYTES} bytes")
        with open(path) as f:
            marker = json.load(f)
        if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
            raise ValueError("not a JSON object with a 'files' object")
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in marker["files"].items()):
            raise ValueError("'files' must map file names to sizes")
    except (OSError, ValueError, RecursionError) as error:
        return None, f"{path} cannot be read ({_short(error)})"
    return marker, None


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:160]}"


def _has_optimizer_state(folder: str) -> bool:
    entries = os.listdir(folder)
    return any(e in ("optimizer.pt", "optimizer.bin") for e in entries) or any(
        os.path.isdir(os.path.join(folder, e)) and ("optimizer" in e or e.startswith("global_step")) for e in entries
    )


def checkpoint_problems(folder: str, trainer: Any) -> list[str]:
    """What makes ``folder`` unusable for resuming ``trainer`` (each naming the file), or ``[]``."""
    from .buffer import BUFFER_STATE_NAME, buffer_enabled

    if not os.path.isdir(folder):
        return [f"{folder} is not a folder"]
    marker, unreadable = _read_marker(folder)
    if unreadable:
        return [unreadable]
    problems = []
    if marker is not None:
        for rel, size in marker["files"].items():
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                problems.append(f"{path} is missing (the checkpoint listed it when it was saved)")
            elif os.path.getsize(path) != size:
                problems.append(
                    f"{path} has {os.path.getsize(path)} bytes, {size} when it was saved (truncated or overwritten)"
                )
        if marker.get("save_only_model"):
            problems.append(
                f"{folder} was saved with save_only_model=True, so it holds no optimizer, scheduler or trainer state "
                f"to resume; load its weights as the model (model={folder!r}) in a new run"
            )
        saved, now = marker.get("optim"), str(getattr(trainer.args.optim, "value", trainer.args.optim))
        if saved is not None and saved != now:
            problems.append(
                f"{os.path.join(folder, 'optimizer.pt')} holds the state of optim={saved!r} "
                f"({marker.get('optimizer')}), this run uses optim={now!r}; resume with optim={saved!r}"
            )
    else:
        if not os.path.exists(os.path.join(folder, "trainer_state.json")):
            problems.append(f"{os.path.join(folder, 'trainer_state.json')} is missing (a save cut short?)")
        if not _has_optimizer_state(folder):
            problems.append(
                f"{os.path.join(folder, 'optimizer.pt')} is missing: resuming would restart the optimizer and the "
                "learning-rate schedule silently"
            )
        elif not os.path.exists(os.path.join(folder, "scheduler.pt")):
            problems.append(f"{os.path.join(folder, 'scheduler.pt')} is missing (the learning-rate schedule)")
        entries = os.listdir(folder)
        if not any(e in _MODEL_FILES or e.startswith(("model-", "global_step", "pytorch_model_fsdp")) for e in entries):
            problems.append(f"{folder} holds no model weights (model.safetensors)")
        if buffer_enabled(trainer.args) and not os.path.exists(os.path.join(folder, BUFFER_STATE_NAME)):
            problems.append(f"{os.path.join(folder, BUFFER_STATE_NAME)} (the mixed buffer) is missing")
    if problems:
        return problems
    return _content_problems(folder)


def _content_problems(folder: str) -> list[str]:
    """Files whose content cannot be read at all (cheap: the optimizer state is memory-mapped, not loaded)."""
    problems = []
    state = os.path.join(folder, "trainer_state.json")
    if os.path.exists(state):
        try:
            with open(state) as f:
                if not isinstance(json.load(f), dict):
                    raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError) as error:
            problems.append(f"{state} cannot be read ({_short(error)})")
    for file in ("optimizer.pt", "scheduler.pt"):
        path = os.path.join(folder, file)
        if not os.path.exists(path):
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # any unpickling or zip error: the file is damaged or not a state dict
            problems.append(f"{path} cannot be read ({_short(error)})")
    return problems


# --- resuming ------------------------------------------------------------------------------------------------------


def checkpoints_newest_first(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), e) for e in os.listdir(output_dir) if (m := _CHECKPOINT.match(e))]
    return [
        os.path.join(output_dir, e)
        for _, e in sorted(found, reverse=True)
        if os.path.isdir(os.path.join(output_dir, e))
    ]


def resolve_resume(resume_from_checkpoint: Any, trainer: Any) -> str | None:
    """The checkpoint folder to resume from (None: no resume). ``True`` takes the newest complete checkpoint of
    ``output_dir`` and says which; a path is refused if the checkpoint is damaged. Raises ``ValueError``."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    name = type(trainer).__name__
    output_dir = trainer.args.output_dir
    if resume_from_checkpoint is True:
        skipped = []
        for folder in checkpoints_newest_first(output_dir):
            problems = checkpoint_problems(folder, trainer)
            if not problems:
                if skipped:
                    warnings.warn(
                        f"{name}: resume_from_checkpoint=True skips "
                        + "; ".join(f"{os.path.basename(f)} ({p[0]})" for f, p in skipped)
                        + f", and resumes from {folder}, the newest complete checkpoint.",
                        stacklevel=3,
                    )
                logger.warning("%s: resuming from %s (the newest complete checkpoint in %s)", name, folder, output_dir)
                return folder
            skipped.append((folder, problems))
        if not skipped:
            raise ValueError(
                f"{name}: resume_from_checkpoint=True, but {output_dir} holds no checkpoint-<step> folder. Pass a "
                f"checkpoint path, {_START_FRESH}."
            )
        raise ValueError(
            f"{name}: resume_from_checkpoint=True, but no checkpoint in {output_dir} is complete: "
            + "; ".join(f"{p[0]}" for _, p in skipped)
            + f". Restore a checkpoint from a backup, {_START_FRESH}."
        )
    folder = str(resume_from_checkpoint)
    problems = checkpoint_problems(folder, trainer)
    if problems:
        parent = os.path.dirname(os.path.abspath(folder))
        complete = [
            f
            for f in checkpoints_newest_first(parent)
            if os.path.abspath(f) != os.path.abspath(folder) and not checkpoint_problems(f, trainer)
        ]
        earlier = f"resume from {complete[0]} (complete)" if complete else "resume from an earlier checkpoint"
        raise ValueError(
            f"{name}: refusing to resume from {folder}: " + "; ".join(problems) + f". The checkpoint is damaged or "
            f"incomplete: {earlier}, {_START_FRESH}."
        )
    return folder


@contextlib.contextmanager
def loading_optimizer(checkpoint: str | None, trainer: Any):
    """Around transformers' optimizer/scheduler load: a failure names the checkpoint's files, and a state of another
    optimizer (its hyperparameters replace this optimizer's, and the first step would fail deep in torch) is refused."""
    name = type(trainer).__name__
    optimizer = getattr(trainer, "optimizer", None)
    before = [set(group) for group in optimizer.param_groups] if checkpoint and optimizer is not None else None
    files = f"{os.path.join(str(checkpoint), 'optimizer.pt')} / scheduler.pt"
    try:
        yield
    except Exception as error:
        if str(error).startswith(f"{name}:"):  # already ours (the mixed-buffer state)
            raise
        raise ValueError(
            f"{name}: the optimizer or scheduler state of {checkpoint} ({files}) cannot be loaded into this run's "
            f"optimizer ({_short(error)}): it was written by another optimizer or model, or is damaged. Resume with "
            f"the settings that wrote it, from an earlier checkpoint, {_START_FRESH}."
        ) from error
    if before is not None:
        lost = sorted(set().union(*before) - set().union(*(set(g) for g in optimizer.param_groups)))
        if lost:
            raise ValueError(
                f"{name}: {files} of {checkpoint} holds the state of another optimizer (its parameter groups lack "
                f"{lost}, which {_optimizer_name(trainer)} needs). Resume with the optim that wrote it, {_START_FRESH}."
            )


# --- what a mixed-buffer state file may hold -----------------------------------------------------------------------


def check_buffer_state(state: Any, vocab_size: int | None, num_reward_funcs: int) -> None:
    """Raise ``ValueError`` saying what is wrong unless ``state`` is a mixed-buffer state: samples whose token ids lie
    in the vocabulary, with one reward per reward function and finite log-probs (<= 0), one per token."""
    if not isinstance(state, dict) or not isinstance(state.get("buffer"), dict):
        raise ValueError("not a mixed-buffer state (a dict with a 'buffer' dict)")
    buffer = state["buffer"]
    samples, next_uid = buffer.get("samples"), buffer.get("next_uid")
    if not isinstance(samples, list) or not isinstance(next_uid, int) or next_uid < 0:
        raise ValueError("the buffer needs a 'samples' list and an integer 'next_uid'")
    if not isinstance(state.get("stats", {}), dict):
        raise ValueError("'stats' must be a dict")
    uids = set()
    for i, sample in enumerate(samples):
        where = f"sample {i}"
        if not isinstance(sample, dict):
            raise ValueError(f"{where} is a {type(sample).__name__}, not a dict")
        uid, step, ids = sample.get("uid"), sample.get("step"), sample.get("completion_ids")
        if not isinstance(uid, int) or not 0 <= uid < next_uid or uid in uids:
            raise ValueError(f"{where} has uid {uid!r}: uids must be distinct integers below next_uid={next_uid}")
        uids.add(uid)
        if not isinstance(step, int) or step < 0 or not isinstance(sample.get("key"), str):
            raise ValueError(f"{where} needs a string 'key' and an integer step >= 0")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"{where} has completion_ids that are not a non-empty list of token ids")
        outside = [t for t in ids if not 0 <= t < (vocab_size or math.inf)]
        if outside:
            raise ValueError(f"{where} has token id(s) {outside[:5]} outside the vocabulary [0, {vocab_size})")
        rewards = sample.get("rewards")
        if not isinstance(rewards, list) or len(rewards) != num_reward_funcs:
            raise ValueError(f"{where} has no list of one reward per reward function ({num_reward_funcs})")
        if not all(isinstance(r, (int, float)) and not math.isinf(r) for r in rewards):
            raise ValueError(f"{where} has a reward that is not a finite number (or NaN for unscorable)")
        logps = sample.get("logps")
        if logps is not None:
            if not isinstance(logps, torch.Tensor) or logps.dim() != 1 or logps.numel() != len(ids):
                raise ValueError(f"{where}: its log-probs must be a 1-d tensor of one value per token ({len(ids)})")
            if not torch.isfinite(logps).all() or (logps > 1e-3).any():
                raise ValueError(
                    f"{where} has behaviour log-probs that are NaN, infinite or > 0 (step {step}); a NaN behaviour "
                    "log-prob would make the loss NaN"
                )
