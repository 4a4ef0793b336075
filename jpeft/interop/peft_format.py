"""PEFT's checkpoint format: an adapter's trees to PEFT's tensors and back.

A method describes its checkpoint as :class:`~jpeft.core.method.KeyEntry` records (key,
tree, path, axis permutation); these two functions read that one table both ways, so
save and load cannot drift apart. Files themselves are written and read by
:mod:`jpeft.interop.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.config import PEFT_FORMAT_VERSION, PeftConfig, TaskType
from jpeft.core import registry
from jpeft.core.method import PEFT_PREFIX, KeyEntry, Method, Plan
from jpeft.core.tree import get_path, set_path
from jpeft.errors import CheckpointError
from jpeft.interop import checkpoint, hub

TRAINABLE_REFUSAL = "Cannot set a prompt learning adapter to trainable when loading pretrained adapter."

if TYPE_CHECKING:
    from jpeft.bindings.protocol import Binding

Trees = Mapping[str, Any]  # {"adapter": adapter tree, "base": base params}


def state_dict(entries: Sequence[KeyEntry], trees: Trees) -> dict[str, np.ndarray]:
    """PEFT's ``get_peft_model_state_dict``: torch-layout arrays under PEFT's keys.

    Adapter tensors are written in float32, as PEFT stores adapter weights by default.
    """
    out: dict[str, np.ndarray] = {}
    for entry in entries:
        if not entry.save:
            continue
        value = np.asarray(jax.device_get(get_path(trees[entry.tree], entry.path)))
        if entry.tree == "adapter" and value.dtype != np.float32 and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(np.float32)
        out[entry.file_key] = entry.to_torch(value)
    return out


def adapter_state_dict(
    method: Method[Any], plan: Plan, trees: Trees, save_embedding_layers: bool | str
) -> dict[str, np.ndarray]:
    """One adapter's PEFT state dict: its key table's tensors, plus ``prompt_embeddings`` (the
    encoder's output) for prompt methods."""
    entries = method.key_entries(plan, trees["adapter"], save_embedding_layers)
    if save_embedding_layers == "auto" and any(e.tree == "base" and e.load for e in entries):
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
            stacklevel=4,
        )
    out = state_dict(entries, trees)
    if method.prompt_embeddings is not None:
        rows = jax.device_get(method.prompt_embeddings(plan, trees["adapter"], train=False, key=None))
        computed = [e for e in entries if not e.save]
        out.update({e.file_key: np.ascontiguousarray(np.asarray(rows, np.float32)) for e in computed})
    return out


def saved_config(config: PeftConfig, method: Method[Any], binding: Binding) -> PeftConfig:
    """The config as ``adapter_config.json`` holds it: ``inference_mode``, the method's own changes
    (``config_for_save``) and, without a task type, PEFT's ``auto_mapping`` to the torch class."""
    config = dataclasses.replace(config, inference_mode=True)
    if method.config_for_save is not None:
        config = method.config_for_save(config)
    if config.task_type is None and binding.torch_class_name is not None:
        mapping = {"base_model_class": binding.torch_class_name, "parent_library": binding.torch_module_path}
        config = dataclasses.replace(config, auto_mapping=mapping)
    return config


def load_state(
    entries: Sequence[KeyEntry],
    trees: Trees,
    tensors: Mapping[str, np.ndarray],
    *,
    source: str,
    adapter_name: str,
    ignore_mismatched_sizes: bool,
) -> dict[str, Any]:
    """``trees`` with the checkpoint's tensors in place; every shape is checked before anything is replaced.

    Raises:
      CheckpointError: a tensor's shape differs from the model's (unless
        ``ignore_mismatched_sizes``, which skips it with a warning), or an adapter tensor is
        missing (PEFT's "missing adapter keys", which jpeft treats as an error).
    """
    trees = dict(trees)
    required = {e.file_key for e in entries if e.tree == "adapter" and e.load}
    expected = {e.file_key for e in entries}
    missing, mismatched, skipped = [], [], []
    for entry in (e for e in entries if e.load):
        file_key = entry.file_key
        if file_key not in tensors:
            if file_key in required:
                missing.append(file_key)
            continue
        current = get_path(trees[entry.tree], entry.path)
        want = entry.torch_shape(current.shape)
        got = tuple(tensors[file_key].shape)
        if got != want:
            if ignore_mismatched_sizes:
                skipped.append(f"{file_key}: found shape {got} in the checkpoint and {want} in the model")
                continue
            mismatched.append(f"{file_key}: found shape {got} in the checkpoint and {want} in the model")
            continue
        value = jnp.asarray(entry.from_torch(tensors[file_key]), dtype=current.dtype)
        trees[entry.tree] = set_path(trees[entry.tree], entry.path, value)
    if mismatched:
        raise CheckpointError(
            f"size mismatch loading {source!r} into adapter {adapter_name!r} (torch layout, (out, in)):\n  "
            + "\n  ".join(mismatched)
            + "\nThe adapter was trained with another rank or on another model; load it onto the base model "
            "it was trained for, or pass `ignore_mismatched_sizes=True` to skip these tensors."
        )
    computed = [e.file_key for e in entries if not e.save and e.file_key in missing]
    if computed:
        raise CheckpointError(
            f"{source!r} has no {computed[0]!r} tensor, which every prompt-learning checkpoint holds (keys "
            f"found: {sorted(tensors)[:10]}). The folder is not an adapter of this method, or its weights file "
            "is incomplete."
        )
    if missing:
        unprefixed = [k for k in tensors if k not in expected and not k.startswith(PEFT_PREFIX)]
        hint = (
            f" The file's keys lack the {PEFT_PREFIX!r} prefix PEFT requires (e.g. {unprefixed[0]!r})."
            if unprefixed
            else ""
        )
        raise CheckpointError(
            f"Found missing adapter keys while loading the checkpoint {source!r}: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}.{hint} The folder does not hold this adapter's weights "
            "(wrong base model, or a different adapter_config.json)."
        )
    if skipped:
        warnings.warn(
            "Some weights were not loaded (ignore_mismatched_sizes=True):\n" + "\n".join(skipped), stacklevel=4
        )
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        warnings.warn(
            f"Unexpected keys in {source!r} were ignored: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}",
            stacklevel=4,
        )
    return trees


_PIPELINE_TAGS = {
    TaskType.CAUSAL_LM: "text-generation",
    TaskType.SEQ_2_SEQ_LM: "text2text-generation",
    TaskType.SEQ_CLS: "text-classification",
    TaskType.TOKEN_CLS: "token-classification",
    TaskType.QUESTION_ANS: "question-answering",
    TaskType.FEATURE_EXTRACTION: "feature-extraction",
}


def folder_files(adapters: Sequence[tuple[str, PeftConfig, Mapping[str, np.ndarray]]]) -> dict[str, bytes]:
    """Every file of a PEFT save folder, by relative path: each adapter's config and tensors
    (``default`` at the root, others in subfolders) and the model card."""
    files: dict[str, bytes] = {}
    for name, config, tensors in adapters:
        files.update(checkpoint.adapter_files(name, config.to_json_string(), tensors))
    first = adapters[0][1] if adapters else None
    base_name = first.base_model_name_or_path if first else None
    tags = [first.peft_type.value.lower()] if first else []
    tags += ["transformers", "jpeft"] + ([f"base_model:adapter:{base_name}"] if base_name else [])
    files[checkpoint.MODEL_CARD_NAME] = checkpoint.model_card(
        base_model=base_name,
        tags=tags,
        pipeline_tag=_PIPELINE_TAGS.get(first.task_type) if first and first.task_type else None,
        peft_version=PEFT_FORMAT_VERSION,
    )
    return files


def read_adapter(
    model_id: str | os.PathLike, subfolder: str | None, config: PeftConfig | None, is_trainable: bool, **hub_kw: Any
) -> tuple[Any, PeftConfig, dict[str, np.ndarray]]:
    """``(folder, config, tensors)`` of an adapter folder or Hub repo; the config frozen unless trainable."""
    folder = hub.resolve_adapter_folder(model_id, subfolder, **hub_kw)
    config = config if config is not None else registry.config_from_dict(checkpoint.read_config(folder))
    if is_trainable and registry.kind_of(config.peft_type) == "prompt":
        raise ValueError(TRAINABLE_REFUSAL)  # PEFT's rule: a loaded prompt adapter is frozen
    tensors = checkpoint.read_tensors(folder)
    return folder, dataclasses.replace(config, inference_mode=not is_trainable), tensors
