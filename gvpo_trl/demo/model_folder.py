"""A model folder written once, complete or absent: the one way the demo models (and the tests' tiny models) are
built on disk, under one cache root."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The environment variable naming the cache root (default ``~/.cache/gvpo_trl``).
CACHE_VARIABLE = "GVPO_TRL_CACHE"


def cache_root() -> Path:
    """``$GVPO_TRL_CACHE``, or ``~/.cache/gvpo_trl``."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "gvpo_trl")


def is_built(folder: str | os.PathLike, marker: str, spec: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a complete build of ``spec`` (its marker file, written last, records it)."""
    try:
        return json.loads((Path(folder) / marker).read_text()) == spec
    except (OSError, ValueError):
        return False


def build_model_folder(
    folder: str | os.PathLike, marker: str, spec: dict[str, Any], write: Callable[[Path], None], replace: bool = True
) -> str:
    """Make ``folder`` hold what ``write(tmp)`` writes, marked with ``spec``, unless it already does; return its path.

    ``write`` fills a temporary sibling folder; the marker is written last and the folder renamed into place, so a
    folder at ``folder`` is always complete (a crash leaves only a temporary folder behind). Concurrent builders each
    write their own temporary folder and the first rename wins. A folder of another build is replaced when
    ``replace``, else refused (``FileExistsError``).
    """
    folder = Path(folder).expanduser().absolute()
    if is_built(folder, marker, spec):
        return str(folder)
    if folder.exists() and any(folder.iterdir()) and not replace:
        raise FileExistsError(
            f"{folder} exists but holds no build of {spec} ({marker} missing or different): remove it."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        (tmp / marker).write_text(json.dumps(spec))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if is_built(folder, marker, spec):  # another builder finished first
            return str(folder)
        if folder.exists():  # another build (or an empty folder): move it aside, then take its place
            shutil.rmtree(folder.rename(tmp.with_name(tmp.name + "-old")), ignore_errors=True)
        os.rename(tmp, folder)  # atomic on one file system
    except OSError:
        if not is_built(folder, marker, spec):  # not a lost race with another builder
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
