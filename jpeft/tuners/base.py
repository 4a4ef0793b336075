"""What every weight-based method shares: the checkpoint key table and base overrides.

*Overrides* are trainable copies of base leaves that an adapter carries and that are
substituted into the base tree at call time: ``modules_to_save`` copies and trainable
biases. The base tree itself is never changed, so turning an adapter off is exact.

A method describes its checkpoint as a list of :class:`KeyEntry`: PEFT key (without
``base_model.model.``), where the value lives, and how torch's layout maps to Flax's.
Save and load both read that one list, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jpeft.config import TASK_HEAD_MODULES, TaskType
from jpeft.core.architectures import default_targets
from jpeft.core.method import PEFT_PREFIX, KeyEntry
from jpeft.core.modules import ModuleInfo
from jpeft.core.targets import ALL_LINEAR, maybe_compact_targets, modules_to_save_names, select_targets
from jpeft.core.tree import Path, PyTree, get_path, iter_leaves, set_path
from jpeft.errors import ConfigError
from jpeft.interop.torch_names import torch_leaf

if TYPE_CHECKING:
    from jpeft.bindings.protocol import Binding

__all__ = ["PEFT_PREFIX", "KeyEntry"]  # re-exported: tuners build their key tables from them


def resolve_targets(
    config: Any,
    binding: Binding,
    *,
    supported_kinds: tuple[str, ...] = ("linear", "embedding"),
    defaults_of: str = "LORA",
) -> tuple[Any, list[str]]:
    """PEFT's target resolution for LoRA-style configs: ``(config as saved, targeted module names)``.

    Task heads join ``modules_to_save``; ``target_modules=None`` takes PEFT's default for the
    model type; ``"all-linear"`` expands to every linear layer except the output embedding
    (or, for ``SEQ_CLS`` without one, the classifier head); long lists are compacted.
    """
    modules: Mapping[str, ModuleInfo] = binding.modules
    changes: dict[str, Any] = {}
    heads = TASK_HEAD_MODULES.get(config.task_type) if config.task_type else None
    if heads:
        changes["modules_to_save"] = [*(config.modules_to_save or []), *heads]
    target_modules = config.target_modules
    if target_modules is None:
        target_modules = default_targets(defaults_of, binding.model_type)
        if target_modules is None:
            raise ConfigError(
                f"Please specify target_modules in peft_config: jpeft has no default for model type "
                f"{binding.model_type!r}. List the module names to adapt (see `jpeft.named_modules(model)`)."
            )
        changes["target_modules"] = list(target_modules)
    elif isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        exclude = set(binding.output_embedding_names)
        if not exclude and config.task_type == TaskType.SEQ_CLS:
            exclude.update([head for head in ("score", "classifier") if head in modules][:1])
        changes["target_modules"] = [
            name for name, info in modules.items() if info.kind == "linear" and name not in exclude
        ]
    if changes:
        config = dataclasses.replace(config, **changes)
    targeted = select_targets(config, modules, supported_kinds=supported_kinds)
    compact = maybe_compact_targets(config.target_modules, list(modules))
    if compact is not config.target_modules:
        config = dataclasses.replace(config, target_modules=compact)
    return config, targeted


def dropout(x: Any, rate: float, key: Any, option: str) -> Any:
    """Inverted dropout of the adapter's input, with an explicit key (``option`` names the config field)."""
    import jax
    import jax.numpy as jnp

    if key is None:
        raise ValueError(
            f"`{option}` > 0 in training needs a random key: pass `dropout_rng=jax.random.key(...)`."
        )
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def leaf_key(path: Path) -> str:
    """Dotted form of a leaf path: the key an override is stored under."""
    return ".".join(path)


def resolve_modules_to_save(
    modules_to_save: Sequence[str] | None, modules: Mapping[str, ModuleInfo]
) -> list[str]:
    """PEFT's ``modules_to_save`` matching; a matched module the binding cannot copy raises its refusal."""
    names = modules_to_save_names(modules_to_save, modules)
    for name in names:
        info = modules[name]
        if info.refusal and not info.param_shapes and info.kind == "other":
            raise ConfigError(f"modules_to_save: {info.refusal}")
    return names


def init_overrides(
    base_params: PyTree,
    modules_to_save: Sequence[str],
    modules: Mapping[str, ModuleInfo],
    bias_leaves: Sequence[Path],
) -> dict[str, Any]:
    """Trainable copies of the ``modules_to_save`` subtrees and of trainable bias leaves."""
    saved = {name: get_path(base_params, modules[name].path) for name in modules_to_save}
    biases = {leaf_key(path): get_path(base_params, path) for path in bias_leaves}
    return {"modules_to_save": saved, "bias": biases}


def apply_overrides(
    base_params: PyTree,
    adapter: Mapping[str, Any],
    modules: Mapping[str, ModuleInfo],
    bias_leaves: Sequence[Path],
) -> PyTree:
    """The base tree with this adapter's module copies and biases substituted in."""
    params = base_params
    for name, subtree in adapter.get("modules_to_save", {}).items():
        params = set_path(params, modules[name].path, subtree)
    biases = adapter.get("bias", {})
    for path in bias_leaves:
        params = set_path(params, path, biases[leaf_key(path)])
    return params


def overridden_originals(
    base_params: PyTree,
    modules_to_save: Sequence[str],
    modules: Mapping[str, ModuleInfo],
    bias_leaves: Sequence[Path],
) -> dict[Path, Any]:
    """The base subtrees/leaves that ``apply_overrides`` replaces, to restore them after an unmerge."""
    paths = [modules[name].path for name in modules_to_save] + list(bias_leaves)
    return {path: get_path(base_params, path) for path in paths}


def restore(params: PyTree, originals: Mapping[Path, Any]) -> PyTree:
    for path, value in originals.items():
        params = set_path(params, path, value)
    return params


def override_entries(
    adapter: Mapping[str, Any],
    modules: Mapping[str, ModuleInfo],
    bias_leaves: Sequence[Path],
    targeted: set[str],
    *,
    include_wrapper_biases: bool = False,
) -> list[KeyEntry]:
    """Checkpoint entries for module copies (full torch state) and trainable biases."""
    entries: list[KeyEntry] = []
    for name, subtree in adapter.get("modules_to_save", {}).items():
        for sub_path, leaf in iter_leaves(subtree):
            owner_path = (*modules[name].path, *sub_path[:-1])
            owner = modules.get(".".join(owner_path))
            torch_name, perm = torch_leaf(owner, sub_path[-1], np.ndim(leaf))
            prefix = ".".join((name, *sub_path[:-1]))
            entries.append(
                KeyEntry(f"{prefix}.{torch_name}", "adapter", ("modules_to_save", name, *sub_path), perm)
            )
    if include_wrapper_biases:
        # PEFT's bias="all" filter also catches the ModulesToSaveWrapper's own bias entries.
        for name, subtree in adapter.get("modules_to_save", {}).items():
            for sub_path, _ in iter_leaves(subtree):
                if sub_path[-1] != "bias":
                    continue
                inner = ".".join(sub_path)
                copy_path = ("modules_to_save", name, *sub_path)
                entries.append(KeyEntry(f"{name}.modules_to_save.{inner}", "adapter", copy_path, load=False))
                base_path = (*modules[name].path, *sub_path)
                entries.append(KeyEntry(f"{name}.original_module.{inner}", "base", base_path, load=False))
    for path in bias_leaves:
        module = ".".join(path[:-1])
        owner = modules.get(module)
        torch_name, perm = torch_leaf(owner, path[-1], 1)
        if module in targeted and path[-1] == "bias":
            key = f"{module}.base_layer.bias"
        else:
            key = f"{module}.{torch_name}" if module else torch_name
        entries.append(KeyEntry(key, "adapter", ("bias", leaf_key(path)), perm))
    return entries


def bias_leaves_for(
    bias: str,
    params: PyTree,
    targeted: Sequence[str],
    modules: Mapping[str, ModuleInfo],
    *,
    modules_to_save: Sequence[str] = (),
    buffers: Collection[Path] = frozenset(),
) -> list[Path]:
    """The base leaves PEFT makes trainable for ``bias`` (``"none"``, ``"lora_only"``, ``"all"``).

    ``"all"`` is every parameter named ``bias`` (torch ``*.bias``), except those inside a
    ``modules_to_save`` module (the module's trained copy already holds them) and leaves
    that are buffers in torch.
    """
    if bias == "none":
        return []
    if bias == "lora_only":
        return [modules[name].bias_path for name in targeted if modules[name].has_bias]
    copied = [modules[name].path for name in modules_to_save]
    # by module, so that each layer of a stacked module has its own (``layers.3.attn.q.bias``)
    owned = [info.bias_path for info in modules.values() if "bias" in info.param_shapes]
    root: list[Path] = [("bias",)] if "bias" in params else []
    return [
        path
        for path in root + owned
        if path not in buffers and not any(path[: len(prefix)] == prefix for prefix in copied)
    ]


def weight_axes(base_specs: PyTree, info: ModuleInfo) -> tuple[Any, Any]:
    """``(in axis, out axis)``: the mesh axes the layer's weight is split along, from its partition spec.

    Adapter leaves follow them (sharding them like the weight they adapt); a GPT-2 ``Conv1D``
    kernel is stored ``(out, in)``.
    """
    spec = get_path(base_specs, info.weight_path)
    entries = (tuple(spec) if spec is not None else ()) + (None, None)
    first, second = entries[:2]
    return (second, first) if info.kernel_transposed else (first, second)


def override_specs(adapter: Mapping[str, Any], modules: Mapping[str, ModuleInfo], base_specs: PyTree) -> dict[str, Any]:
    """Partition specs of an adapter's overrides: module copies and biases take their base leaves' specs."""
    saved = {name: get_path(base_specs, modules[name].path) for name in adapter.get("modules_to_save", {})}
    biases = {key: get_path(base_specs, tuple(key.split("."))) for key in adapter.get("bias", {})}
    return {"modules_to_save": saved, "bias": biases}
