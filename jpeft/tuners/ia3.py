"""(IA)³: learned vectors that rescale a layer's input or output.

A targeted layer gets one trained vector ``l`` and no scaling factor or dropout:

- feed-forward layers (``feedforward_modules``) scale the **input**: ``y = W (l ⊙ x) + b``;
- every other layer scales the **output, bias included**: ``y = l ⊙ (W x + b)``.

Only ``Linear`` and GPT-2 ``Conv1D`` layers can be targeted (PEFT's IA3 rejects
embeddings too). ``l`` is stored in PEFT's torch shape, so the checkpoint needs no
reshaping: ``(out, 1)`` for output scaling and ``(1, in)`` for input scaling.

Adapter tree::

    {"ia3": {module: {"ia3_l": (out, 1) or (1, in)}},
     "modules_to_save": {module: subtree}, "bias": {}}

Several active IA3 adapters multiply their vectors. On *output*-scaled layers that is
exactly what applying them one after the other gives; on *input*-scaled (feed-forward)
layers each adapter recomputes the layer from the original input, so only one active
unmerged IA3 adapter per feed-forward layer gives PEFT's result (merge the others first).

Reference:
  Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
  In-Context Learning", 2022.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.config import TASK_HEAD_MODULES, PeftConfig, PeftType, TaskType
from jpeft.core import method, registry
from jpeft.core.architectures import architecture, default_targets
from jpeft.core.modules import ModuleInfo
from jpeft.core.targets import ALL_LINEAR, select_targets
from jpeft.core.tree import PyTree, count_params, get_path, set_path
from jpeft.errors import ConfigError
from jpeft.tuners import base

# Divisor used instead of an exact zero in ``l`` when unmerging (PEFT adds it to every entry).
_UNMERGE_EPS = 1e-8


def _as_list(value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(dict.fromkeys(value))
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(PeftConfig):
    """PEFT's ``IA3Config``: the same fields, defaults and meanings.

    Attributes:
      target_modules: module names or suffixes (list), a regex matched against the
        whole name (string), ``"all-linear"``, or ``None`` for PEFT's default for the
        model type.
      exclude_modules: names/suffixes (list) or a full-match regex (string) to skip.
      feedforward_modules: the targets whose *input* is scaled. A string is a regex
        that must match the whole name; a list matches names that end with an entry
        (a plain ``endswith``, as in PEFT). ``None``: PEFT's default for the model
        type. When both are lists it must be a subset of ``target_modules``.
      fan_in_fan_out: PEFT's flag for ``Conv1D`` (GPT-2) targets; set automatically.
      modules_to_save: modules (matched by name ending) trained in full and saved.
      init_ia3_weights: ``True``: vectors of ones (a no-op); ``False``: standard normal.

    Example:
      >>> config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    """

    peft_type: ClassVar[PeftType] = PeftType.IA3

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, tuple, set, frozenset)):
                raise ConfigError(
                    f"`{name}` must be a list of module names, a regex string or None, got {type(value).__name__}."
                )
            object.__setattr__(self, name, _as_list(value))
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ConfigError(
                    f"`modules_to_save` must be a list of module names, got the string {self.modules_to_save!r}."
                )
            object.__setattr__(self, "modules_to_save", list(self.modules_to_save))
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"`init_ia3_weights` must be True or False, got {self.init_ia3_weights!r}.")
        if not isinstance(self.fan_in_fan_out, bool):
            raise ConfigError(f"`fan_in_fan_out` must be True or False, got {self.fan_in_fan_out!r}.")
        # PEFT checks this only when both are lists (sets).
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            if not set(self.feedforward_modules) <= set(self.target_modules):
                extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
                raise ConfigError(
                    f"`feedforward_modules` should be a subset of `target_modules`; not in `target_modules`: {extra}."
                )
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and not (name == "target_modules" and value.lower() == ALL_LINEAR):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ConfigError(f"`{name}` {value!r} is not a valid regex: {err}.") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPlan(method.LayerPlan):
    """Static facts about one adapted layer (never traced)."""

    is_feedforward: bool

    @property
    def shape(self) -> tuple[int, int]:
        """``ia3_l``'s shape, PEFT's: ``(1, in)`` for input scaling, ``(out, 1)`` for output scaling."""
        assert self.info.in_features is not None and self.info.out_features is not None
        return (1, self.info.in_features) if self.is_feedforward else (self.info.out_features, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Plan(method.Plan):
    """One IA3 adapter resolved against one model."""

    config: IA3Config
    layers: Mapping[str, LayerPlan]


# --------------------------------------------------------------------------- resolve


def is_feedforward(feedforward_modules: list[str] | str | None, name: str) -> bool:
    """PEFT's ``_check_target_module_feedforward``: full regex match, or a plain ``endswith``."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(entry) for entry in feedforward_modules)


def _resolved(config: IA3Config, **changes: Any) -> IA3Config:
    """``config`` with ``changes``, without re-running ``__post_init__``.

    PEFT fills in defaults and expands ``"all-linear"`` after validating the config, so
    e.g. ``feedforward_modules=["down_proj"]`` next to the expanded full names is valid.
    """
    config = copy.copy(config)
    for name, value in changes.items():
        object.__setattr__(config, name, value)
    return config


def _reloadable_feedforward(config: IA3Config, targeted: list[str]) -> IA3Config:
    """Rewrites ``feedforward_modules`` that PEFT would save but could not load again.

    PEFT checks "``feedforward_modules`` is a subset of ``target_modules``" only when an
    ``IA3Config`` is built, i.e. before it fills in defaults or expands ``"all-linear"``.
    So it saves e.g. ``target_modules=["q_proj", "v_proj"]`` with the default
    ``feedforward_modules=["down_proj"]``, or full ``all-linear`` names with
    ``["down_proj"]``, and then refuses to load its own file. jpeft saves instead an
    equivalent value that passes the check and selects the same layers: ``[]`` when no
    target is feed-forward, else the feed-forward targets' full names (when those are
    all in ``target_modules``), else a regex matching exactly those names.
    """
    ff, targets = config.feedforward_modules, config.target_modules
    if not (isinstance(ff, list) and isinstance(targets, list)) or set(ff) <= set(targets):
        return config
    names = [name for name in targeted if is_feedforward(ff, name)]
    if not names:
        new: list[str] | str = []
    elif set(names) <= set(targets):
        new = names
    else:
        new = "|".join(re.escape(name) for name in names)
    warnings.warn(
        f"feedforward_modules={ff} is not a subset of the resolved target_modules, so torch PEFT could not load the "
        f"saved adapter; saving the equivalent feedforward_modules={new!r} instead (same feed-forward layers).",
        stacklevel=4,
    )
    return _resolved(config, feedforward_modules=new)


def prepare(config: IA3Config, binding: Any) -> IA3Plan:
    """Resolves targets and feed-forward layers of ``config`` on the model behind ``binding``.

    The returned plan's config is what gets saved: default targets/feed-forward modules
    filled in, ``"all-linear"`` expanded, task heads added to ``modules_to_save``,
    ``fan_in_fan_out`` corrected for ``Conv1D`` targets; exactly the changes PEFT makes.
    """
    modules: Mapping[str, ModuleInfo] = binding.modules
    model_type = binding.model_type or ""
    changes: dict[str, Any] = {}

    heads = TASK_HEAD_MODULES.get(config.task_type) if config.task_type else None
    if heads:
        changes["modules_to_save"] = [*(config.modules_to_save or []), *heads]

    if config.target_modules is None:
        default = default_targets("IA3", model_type)
        if default is None:
            raise ConfigError(
                f"Please specify `target_modules` in `peft_config`: jpeft has no IA3 default for model type "
                f"{model_type or None!r}. List the module names to adapt (see `jpeft.named_modules(model)`)."
            )
        changes["target_modules"] = default
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        exclude = set(binding.output_embedding_names)
        if not exclude and config.task_type == TaskType.SEQ_CLS:
            for head in ("score", "classifier"):
                if head in modules:
                    exclude.add(head)
                    break
        changes["target_modules"] = [
            name for name, info in modules.items() if info.kind == "linear" and name not in exclude
        ]
    if config.feedforward_modules is None:
        row = architecture(model_type)
        if row is None or "IA3" not in row.targets:
            raise ConfigError(
                f"Please specify `feedforward_modules` in `peft_config`: jpeft has no IA3 default for model type "
                f"{model_type or None!r}. Pass the names of the targets whose input is scaled (`[]` for none)."
            )
        changes["feedforward_modules"] = list(row.feedforward)
    if changes:
        config = _resolved(config, **changes)

    # IA3 adapts Linear and Conv1D only: PEFT raises for an embedding (or any other) target.
    # PEFT never compacts IA3 target lists (they are coupled to feedforward_modules).
    targeted = select_targets(config, modules, supported_kinds=("linear",))

    conv1d = [modules[n].torch_type == "Conv1D" for n in targeted]
    if any(conv1d) and not config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
            stacklevel=3,
        )
        config = _resolved(config, fan_in_fan_out=True)
    elif not any(conv1d) and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to "
            "False.",
            stacklevel=3,
        )
        config = _resolved(config, fan_in_fan_out=False)

    config = _reloadable_feedforward(config, targeted)
    layers = {
        name: LayerPlan(
            info=modules[name], index=index, is_feedforward=is_feedforward(config.feedforward_modules, name)
        )
        for index, name in enumerate(targeted)
    }
    modules_to_save = base.resolve_modules_to_save(config.modules_to_save, modules)
    return IA3Plan(config=config, layers=layers, modules=modules, modules_to_save=tuple(modules_to_save))


# --------------------------------------------------------------------------- init


def init_params(plan: IA3Plan, base_params: PyTree, key: jax.Array) -> tuple[dict[str, Any], None]:
    """Creates the adapter tree (ones, or standard normal with ``init_ia3_weights=False``)."""
    ia3: dict[str, dict[str, jax.Array]] = {}
    for name, layer in plan.layers.items():
        if plan.config.init_ia3_weights:
            vector = jnp.ones(layer.shape, jnp.float32)
        else:
            vector = jax.random.normal(jax.random.fold_in(key, layer.index), layer.shape, jnp.float32)
        ia3[name] = {"ia3_l": vector}
    overrides = base.init_overrides(base_params, plan.modules_to_save, plan.modules, ())
    return {"ia3": ia3, **overrides}, None


# --------------------------------------------------------------------------- forward


def apply_overrides(base_params: PyTree, adapter: Mapping[str, Any], plan: IA3Plan) -> PyTree:
    return base.apply_overrides(base_params, adapter, plan.modules, ())


def _weight_io(kernel: jax.Array, info: ModuleInfo) -> jax.Array:
    """The kernel laid out ``(in, out)`` (GPT-2's ``FlaxConv1D`` stores ``(out, in)``)."""
    return kernel.T if info.kernel_transposed else kernel


def layer_forward(
    layer: LayerPlan,
    config: IA3Config,
    adapter: Mapping[str, Any],
    module_params: Mapping[str, jax.Array],
    x: jax.Array,
    out: jax.Array,
    *,
    train: bool,
    key: jax.Array | None,
) -> jax.Array:
    """The layer's output with this adapter's vector applied (PEFT's ``Linear.forward``)."""
    del config, train, key  # IA3 has no dropout and no scaling factor
    info = layer.info
    assert info.weight_name is not None, info.name  # every linear module names its weight
    vector = adapter["ia3"][info.name]["ia3_l"].reshape(-1)
    if not layer.is_feedforward:
        # y = l * (W x + b): the bias is scaled too.
        return (out * vector).astype(out.dtype)
    # y = W (l * x) + b, recomputed from the scaled input (the unused base output is
    # dropped by XLA under jit).
    scaled = (x.astype(vector.dtype) * vector).astype(x.dtype)
    weight = _weight_io(module_params[info.weight_name], info).astype(out.dtype)
    y = jnp.matmul(scaled.astype(out.dtype), weight)
    if "bias" in module_params:
        y = y + module_params["bias"].astype(out.dtype)
    return y.astype(out.dtype)


# --------------------------------------------------------------------------- merge


def _weight_factor(layer: LayerPlan, vector: jax.Array) -> jax.Array:
    """``l`` broadcast against the Flax kernel: along its input axis (feed-forward) or output axis."""
    info = layer.info
    flat = vector.reshape(-1)
    # Flax Dense kernel: (in, out); GPT-2 FlaxConv1D kernel: (out, in).
    along_rows = layer.is_feedforward != info.kernel_transposed
    return flat[:, None] if along_rows else flat[None, :]


def merge_record(base_params: PyTree, adapter: Mapping[str, Any], plan: IA3Plan) -> dict[str, Any]:
    """What :func:`unmerge` needs, taken before :func:`merge`: the replaced module copies."""
    return {"originals": base.overridden_originals(base_params, plan.modules_to_save, plan.modules, ())}


def merge(base_params: PyTree, adapter: Mapping[str, Any], plan: IA3Plan) -> PyTree:
    """The base tree with this adapter folded into the weights (and module copies applied).

    Exact: ``W`` is scaled along its input axis (feed-forward) or its output axis, and
    the bias (output scaling only) with it, as PEFT's ``merge`` does.
    """
    params = apply_overrides(base_params, adapter, plan)
    for name, layer in plan.layers.items():
        info = layer.info
        vector = adapter["ia3"][name]["ia3_l"].astype(jnp.float32)
        weight = get_path(params, info.weight_path)
        merged = weight.astype(jnp.float32) * _weight_factor(layer, vector)
        params = set_path(params, info.weight_path, merged.astype(weight.dtype))
        if not layer.is_feedforward and info.has_bias:
            bias = get_path(params, info.bias_path)
            params = set_path(
                params, info.bias_path, (bias.astype(jnp.float32) * vector.reshape(-1)).astype(bias.dtype)
            )
    return params


def unmerge(params: PyTree, adapter: Mapping[str, Any], plan: IA3Plan, record: Mapping[str, Any]) -> PyTree:
    """Inverse of :func:`merge`: divides by ``l``.

    PEFT divides by ``l + 1e-8``, which is off by a relative ``1e-8 / l`` where ``l`` is
    small; jpeft divides by ``l`` itself and uses ``1e-8`` only where ``l`` is exactly 0
    (there the merge lost the weights anyway). It warns as PEFT does: rounding (and low
    precision weights) can still leave the weights slightly off.
    """
    warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=3)
    for name, layer in plan.layers.items():
        info = layer.info
        vector = adapter["ia3"][name]["ia3_l"].astype(jnp.float32)
        vector = jnp.where(vector == 0, _UNMERGE_EPS, vector)
        weight = get_path(params, info.weight_path)
        restored = weight.astype(jnp.float32) / _weight_factor(layer, vector)
        params = set_path(params, info.weight_path, restored.astype(weight.dtype))
        if not layer.is_feedforward and info.has_bias:
            bias = get_path(params, info.bias_path)
            params = set_path(
                params, info.bias_path, (bias.astype(jnp.float32) / vector.reshape(-1)).astype(bias.dtype)
            )
    return base.restore(params, record["originals"])


# --------------------------------------------------------------------------- checkpoint


def key_entries(
    plan: IA3Plan, adapter: Mapping[str, Any], save_embedding_layers: bool | str = "auto"
) -> list:
    """The PEFT checkpoint layout: ``<module>.ia3_l`` in torch's shape, plus module copies."""
    del save_embedding_layers  # IA3 never targets embeddings
    entries = [base.KeyEntry(f"{name}.ia3_l", "adapter", ("ia3", name, "ia3_l")) for name in plan.layers]
    entries += base.override_entries(adapter, plan.modules, (), set(plan.layers))
    return entries


def counted_in_total(plan: IA3Plan, adapter: Mapping[str, Any]) -> int:
    """Parameters PEFT adds to ``all params``: the IA3 vectors and module copies."""
    return count_params(adapter["ia3"]) + count_params(adapter["modules_to_save"])


# --------------------------------------------------------------------------- sharding


def adapter_specs(plan: IA3Plan, adapter: Mapping[str, Any], base_specs: PyTree) -> dict[str, Any]:
    """Partition specs: each vector is split like the weight axis it scales."""
    from jax.sharding import PartitionSpec

    ia3 = {}
    for name, layer in plan.layers.items():
        in_axis, out_axis = base.weight_axes(base_specs, layer.info)
        spec = PartitionSpec(None, in_axis) if layer.is_feedforward else PartitionSpec(out_axis, None)
        ia3[name] = {"ia3_l": spec}
    return {"ia3": ia3, **base.override_specs(adapter, plan.modules, base_specs)}


def innermost_layers(plan: IA3Plan) -> frozenset[str]:
    """Feed-forward layers: IA3 rescales their *input* and recomputes the output, so with other
    adapters active on the same layer it must be the innermost one."""
    return frozenset(name for name, layer in plan.layers.items() if layer.is_feedforward)


METHOD: method.Method[IA3Plan] = method.Method(
    prepare=prepare,
    init_params=init_params,
    apply_overrides=apply_overrides,
    key_entries=key_entries,
    counted_in_total=counted_in_total,
    layer_tree="ia3",
    layer_forward=layer_forward,
    merge=merge,
    merge_record=merge_record,
    unmerge=unmerge,
    adapter_specs=adapter_specs,
    innermost_layers=innermost_layers,
)

registry.register(PeftType.IA3, IA3Config, METHOD, kind="layer", mixable=True)
