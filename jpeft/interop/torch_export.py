"""Handing models to torch users: Flax params -> a torch ``transformers`` model and its folder.

Uses transformers' own Flax -> torch weight conversion into the torch class named
like the Flax one (``FlaxLlamaForCausalLM`` -> ``LlamaForCausalLM``), so the result
is exactly what ``transformers`` expects, tied weights included.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from jpeft.errors import JpeftError


def torch_class_for(flax_model: Any) -> type:
    import transformers

    name = type(flax_model).__name__.removeprefix("Flax")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise JpeftError(f"transformers has no torch class {name!r} matching {type(flax_model).__name__}.")
    return cls


def torch_model_from_flax(flax_model: Any, params: Any | None = None) -> Any:
    """A torch model (eval mode) holding ``params`` (default: the Flax model's own)."""
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    cls = torch_class_for(flax_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(flax_model.config)
        model = load_flax_weights_in_pytorch_model(model, params if params is not None else flax_model.params)
        model.tie_weights()
    return model.eval()


def save_torch_checkpoint(flax_model: Any, directory: str | os.PathLike, params: Any | None = None) -> Path:
    """Writes a transformers torch folder (``config.json`` + ``model.safetensors``) for the Flax model.

    The folder is written aside and moved into place, so an existing one is replaced whole or not at all.
    """
    model = torch_model_from_flax(flax_model, params)
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".jpeft-export-", dir=directory.parent))
    try:
        model.save_pretrained(staging / "model", safe_serialization=True)
        if directory.exists():
            os.replace(directory, staging / "previous")
        os.replace(staging / "model", directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
