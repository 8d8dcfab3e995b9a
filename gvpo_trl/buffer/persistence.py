"""The mixed buffer in a checkpoint: one file beside TRL's, written with each checkpoint and read on resume."""

from __future__ import annotations

import os
from typing import Any

import torch

from .store import SampleBuffer

#: File name of the buffer state inside a checkpoint folder.
BUFFER_STATE_NAME = "gvpo_trl_buffer.pt"
#: Version of the state layout.
STATE_VERSION = 1


def buffer_state(store: SampleBuffer, stats: dict[str, int]) -> dict[str, Any]:
    """The buffer's state: plain containers and tensors (loadable with ``torch.load(weights_only=True)``)."""
    return {"version": STATE_VERSION, "buffer": store.state_dict(), "stats": dict(stats)}


def restore_buffer_state(state: dict[str, Any], store: SampleBuffer, stats: dict[str, int]) -> None:
    """Load ``state`` (from :func:`buffer_state`) into ``store`` and ``stats``."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"unknown mixed-buffer state version {state.get('version')!r}")
    store.load_state_dict(state["buffer"])
    stats.update(state["stats"])


def save_buffer(folder: str, store: SampleBuffer, stats: dict[str, int]) -> None:
    torch.save(buffer_state(store, stats), os.path.join(folder, BUFFER_STATE_NAME))


def load_buffer(checkpoint: str, store: SampleBuffer, stats: dict[str, int], *, required: bool, name: str,
                validate=None) -> None:  # fmt: skip
    """Restore the buffer from ``checkpoint``; a damaged file (or one ``validate(state)`` refuses), or a missing one
    when ``required``, is refused with a message naming the file and what to do."""
    path = os.path.join(checkpoint, BUFFER_STATE_NAME)
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(
                f"{name}: the checkpoint {checkpoint} has no mixed-buffer state ({BUFFER_STATE_NAME}), so the run "
                "cannot continue as it would have. It was written without gvpo-trl's buffer (or by a process that "
                "could not write there)."
            )
        return
    try:
        state = torch.load(path, weights_only=True)
        if validate is not None:
            validate(state)
        restore_buffer_state(state, store, stats)
    except Exception as error:  # a truncated or foreign file: unpickling errors name neither the file nor a fix
        first_line = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise ValueError(
            f"{name}: the mixed-buffer state {path} cannot be read ({type(error).__name__}: {first_line}); the file "
            "is damaged (e.g. a write cut short). Resume from an earlier checkpoint, or start fresh (no "
            "resume_from_checkpoint, or a new output_dir)."
        ) from error
