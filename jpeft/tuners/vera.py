"""VeRA: vector-based random matrix adaptation.

``y = W x + λ_b ⊙ (B_s (λ_d ⊙ (A_s dropout(x))))``: one pair of frozen random
projections ``vera_A`` ``(r, max_in)`` and ``vera_B`` ``(max_out, r)`` is shared by all
adapted layers, each of which uses the slices ``A_s = vera_A[:, :in]`` and
``B_s = vera_B[:out, :]``; only the per-layer vectors ``λ_d`` ``(r,)`` and ``λ_b``
``(out,)`` train. ``max_in``/``max_out`` are taken over all targeted layers.

Adapter tree (the projections in torch's layout, so slicing matches PEFT)::

    {"vera_A": (r, max_in), "vera_B": (max_out, r),
     "vera": {module: {"vera_lambda_b": (out,), "vera_lambda_d": (r,)}},
     "modules_to_save": {module: subtree}, "bias": {leaf path: array}}

The projections are frozen buffers (``trainable_mask`` is ``False`` on them, and they
are not counted in ``all params``, as in PEFT). They are drawn exactly as PEFT draws
them: ``torch.Generator("cpu").manual_seed(projection_prng_key)`` with a Kaiming-uniform
init, reproduced bit-for-bit in numpy (:mod:`jpeft.tuners._torch_rng`), so adapters
saved with ``save_projection=False`` load identically in jpeft and torch PEFT.

Reference:
  Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.config import PeftConfig, PeftType
from jpeft.core import method, registry
from jpeft.core.modules import ModuleInfo
from jpeft.core.tree import PyTree, count_params, get_path, set_path
from jpeft.errors import ConfigError
from jpeft.tuners import base
from jpeft.tuners._torch_rng import TorchCPUGenerator

# The key prefix of tuner-level tensors (the shared projections) in a PEFT checkpoint.
TUNER_PREFIX = "base_model."


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig(PeftConfig):
    """PEFT's ``VeraConfig``: the same fields, defaults and meanings.

    Attributes:
      r: rank of the shared projections (VeRA uses far larger ranks than LoRA).
      target_modules: module names or suffixes (list), a regex matched against the
        whole name (string), ``"all-linear"``, or ``None`` for PEFT's default for the
        model type. Only linear (and GPT-2 ``Conv1D``) layers.
      projection_prng_key: seed of torch's CPU generator that draws ``vera_A`` and
        ``vera_B`` (reproduced exactly without torch).
      save_projection: write ``base_model.vera_A`` / ``base_model.vera_B`` into the
        checkpoint (``False``: they are regenerated from ``projection_prng_key``).
      vera_dropout: dropout on the layer input in training.
      d_initial: initial value of every ``vera_lambda_d`` entry.
      fan_in_fan_out: PEFT's flag for ``Conv1D`` (GPT-2) targets; set automatically.
      bias: ``"none"``, ``"all"`` or ``"vera_only"`` (the targeted layers' biases train).
      modules_to_save: modules (matched by name ending) trained in full and saved.
      init_weights: ``True``: ``λ_b = 0`` and ``λ_d = d_initial`` (a no-op adapter);
        ``False``: ``λ_b = 1`` and ``λ_d`` standard normal.
      layers_to_transform, layers_pattern: restrict list targets to layer indexes.

    Example:
      >>> config = VeraConfig(r=256, target_modules=["q_proj", "v_proj"])
    """

    peft_type: ClassVar[PeftType] = PeftType.VERA

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple, set, frozenset)):
            object.__setattr__(self, "target_modules", list(dict.fromkeys(self.target_modules)))
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", list(self.modules_to_save))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {self.r!r}.")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ConfigError(
                f"`projection_prng_key` must be an integer (the seed of torch's CPU generator), got "
                f"{self.projection_prng_key!r}."
            )
        if self.bias not in ("none", "all", "vera_only"):
            raise ConfigError(f"`bias` must be 'none', 'all' or 'vera_only', got {self.bias!r}.")
        if not isinstance(self.vera_dropout, (int, float)) or not 0.0 <= self.vera_dropout < 1.0:
            raise ConfigError(f"`vera_dropout` must be in [0, 1), got {self.vera_dropout!r}.")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"`init_weights` must be True or False, got {self.init_weights!r}.")
        if isinstance(self.target_modules, str) and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise ConfigError(
                "`layers_to_transform` and `layers_pattern` apply only when `target_modules` is a list; a regex "
                "string already selects whole names. Put the layer index in the regex or pass a list."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified "
                "(the indexes of the layers to adapt)."
            )
        if not self.save_projection:
            warnings.warn(
                "Specified to not save vera_A and vera_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPlan(method.LayerPlan):
    """Static facts about one adapted layer (never traced)."""

    r: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraPlan(method.Plan):
    """One VeRA adapter resolved against one model."""

    config: VeraConfig
    layers: Mapping[str, LayerPlan]
    max_in: int
    max_out: int


# --------------------------------------------------------------------------- resolve


def prepare(config: VeraConfig, binding: Any) -> VeraPlan:
    """Resolves the targets and the projection sizes of ``config`` on the model behind ``binding``.

    The returned plan's config is what gets saved, with PEFT's changes: ``"all-linear"``
    expanded, long target lists compacted, task heads added to ``modules_to_save``,
    ``fan_in_fan_out`` corrected for ``Conv1D`` targets.
    """
    modules: Mapping[str, ModuleInfo] = binding.modules
    config, targeted = base.resolve_targets(
        config, binding, supported_kinds=("linear",)
    )  # LoRA's defaults too

    conv1d = [modules[n].torch_type == "Conv1D" for n in targeted]
    if any(conv1d) and not config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
            stacklevel=3,
        )
        config = dataclasses.replace(config, fan_in_fan_out=True)
    elif not any(conv1d) and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to "
            "False.",
            stacklevel=3,
        )
        config = dataclasses.replace(config, fan_in_fan_out=False)

    layers = {
        name: LayerPlan(info=modules[name], index=index, r=config.r) for index, name in enumerate(targeted)
    }
    max_in = max(layer.info.features[0] for layer in layers.values())
    max_out = max(layer.info.features[1] for layer in layers.values())

    modules_to_save = base.resolve_modules_to_save(config.modules_to_save, modules)
    bias_leaves = base.bias_leaves_for(
        "lora_only" if config.bias == "vera_only" else config.bias,
        binding.params,
        targeted,
        modules,
        modules_to_save=modules_to_save,
        buffers=binding.buffer_paths,
    )
    return VeraPlan(
        config=config,
        layers=layers,
        modules=modules,
        modules_to_save=tuple(modules_to_save),
        bias_leaves=tuple(bias_leaves),
        max_in=max_in,
        max_out=max_out,
    )


# --------------------------------------------------------------------------- init


def projections(r: int, max_in: int, max_out: int, projection_prng_key: int) -> tuple[jax.Array, jax.Array]:
    """PEFT's shared ``(vera_A (r, max_in), vera_B (max_out, r))``, bit-for-bit as torch draws them."""
    generator = TorchCPUGenerator(projection_prng_key)
    vera_a = generator.kaiming_uniform((r, max_in))
    vera_b = generator.kaiming_uniform((max_out, r))
    return jnp.asarray(vera_a), jnp.asarray(vera_b)


def init_params(plan: VeraPlan, base_params: PyTree, key: jax.Array) -> tuple[dict[str, Any], None]:
    """Creates the adapter tree (``key`` is used only for ``init_weights=False``)."""
    config = plan.config
    vera_a, vera_b = projections(config.r, plan.max_in, plan.max_out, config.projection_prng_key)
    vera: dict[str, dict[str, jax.Array]] = {}
    for name, layer in plan.layers.items():
        out_f = layer.info.out_features
        if config.init_weights:
            lambda_b = jnp.zeros((out_f,), jnp.float32)
            lambda_d = jnp.full((layer.r,), config.d_initial, jnp.float32)
        else:  # PEFT's un-reset values: ones and a standard normal
            lambda_b = jnp.ones((out_f,), jnp.float32)
            lambda_d = jax.random.normal(jax.random.fold_in(key, layer.index), (layer.r,), jnp.float32)
        vera[name] = {"vera_lambda_b": lambda_b, "vera_lambda_d": lambda_d}
    overrides = base.init_overrides(base_params, plan.modules_to_save, plan.modules, plan.bias_leaves)
    return {"vera_A": vera_a, "vera_B": vera_b, "vera": vera, **overrides}, None


def trainable_mask(plan: VeraPlan, adapter: Mapping[str, Any]) -> dict[str, Any]:
    """``True`` on the leaves that train: everything but the shared projections (buffers in PEFT)."""
    mask = jax.tree.map(lambda _: True, dict(adapter))
    mask["vera_A"] = False
    mask["vera_B"] = False
    return mask


# --------------------------------------------------------------------------- forward


def apply_overrides(base_params: PyTree, adapter: Mapping[str, Any], plan: VeraPlan) -> PyTree:
    return base.apply_overrides(base_params, adapter, plan.modules, plan.bias_leaves)


def _sliced(layer: LayerPlan, adapter: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """``(A_s (r, in), B_s (out, r))``: the slices of the shared projections this layer uses."""
    info = layer.info
    return adapter["vera_A"][:, : info.in_features], adapter["vera_B"][: info.out_features, :]


def layer_forward(
    layer: LayerPlan,
    config: VeraConfig,
    adapter: Mapping[str, Any],
    module_params: Mapping[str, jax.Array],
    x: jax.Array,
    out: jax.Array,
    *,
    train: bool,
    key: jax.Array | None,
) -> jax.Array:
    """The layer's output with this adapter's contribution added (PEFT's forward)."""
    params = adapter["vera"][layer.info.name]
    lambda_b, lambda_d = params["vera_lambda_b"], params["vera_lambda_d"]
    sliced_a, sliced_b = _sliced(layer, adapter)
    xa = x.astype(lambda_d.dtype)
    if train and config.vera_dropout > 0.0:
        xa = base.dropout(xa, config.vera_dropout, key, "vera_dropout")
    hidden = lambda_d * (xa @ sliced_a.T.astype(xa.dtype))
    delta = lambda_b * (hidden @ sliced_b.T.astype(hidden.dtype))
    return (out + delta).astype(out.dtype)


# --------------------------------------------------------------------------- merge


def delta_weight(layer: LayerPlan, adapter: Mapping[str, Any]) -> jax.Array:
    """``(λ_b B_s)(λ_d A_s)`` laid out as the Flax kernel (``(in, out)``, Conv1D ``(out, in)``)."""
    params = adapter["vera"][layer.info.name]
    sliced_a, sliced_b = _sliced(layer, adapter)
    scaled_b = params["vera_lambda_b"][:, None] * sliced_b.astype(jnp.float32)  # (out, r)
    scaled_a = params["vera_lambda_d"][:, None] * sliced_a.astype(jnp.float32)  # (r, in)
    delta_oi = scaled_b @ scaled_a  # torch layout (out, in)
    return delta_oi if layer.info.kernel_transposed else delta_oi.T


def merge_record(base_params: PyTree, adapter: Mapping[str, Any], plan: VeraPlan) -> dict[str, Any]:
    """What :func:`unmerge` needs, taken before :func:`merge`: the base leaves the overrides replace."""
    originals = base.overridden_originals(base_params, plan.modules_to_save, plan.modules, plan.bias_leaves)
    return {"originals": originals}


def merge(base_params: PyTree, adapter: Mapping[str, Any], plan: VeraPlan) -> PyTree:
    """The base tree with this adapter folded into the weights (and overrides applied)."""
    params = apply_overrides(base_params, adapter, plan)
    for layer in plan.layers.values():
        weight = get_path(params, layer.info.weight_path)
        merged = weight.astype(jnp.float32) + delta_weight(layer, adapter)
        params = set_path(params, layer.info.weight_path, merged.astype(weight.dtype))
    return params


def unmerge(params: PyTree, adapter: Mapping[str, Any], plan: VeraPlan, record: Mapping[str, Any]) -> PyTree:
    """Inverse of :func:`merge` (exact up to float rounding), given :func:`merge_record`'s output."""
    for layer in plan.layers.values():
        weight = get_path(params, layer.info.weight_path)
        restored = weight.astype(jnp.float32) - delta_weight(layer, adapter)
        params = set_path(params, layer.info.weight_path, restored.astype(weight.dtype))
    return base.restore(params, record["originals"])


# --------------------------------------------------------------------------- checkpoint


def key_entries(
    plan: VeraPlan, adapter: Mapping[str, Any], save_embedding_layers: bool | str = "auto"
) -> list[base.KeyEntry]:
    """The PEFT checkpoint layout: per-layer lambdas, the projections (``save_projection``), overrides.

    ``save_embedding_layers`` is accepted for the common interface; VeRA adapts no
    embedding, so it writes nothing.
    """
    entries: list[base.KeyEntry] = []
    for name in plan.layers:
        for leaf in ("vera_lambda_b", "vera_lambda_d"):
            entries.append(base.KeyEntry(f"{name}.{leaf}", "adapter", ("vera", name, leaf)))
    if plan.config.save_projection:
        for leaf in ("vera_A", "vera_B"):
            entries.append(base.KeyEntry(leaf, "adapter", (leaf,), prefix=TUNER_PREFIX))
    entries += base.override_entries(
        adapter,
        plan.modules,
        plan.bias_leaves,
        set(plan.layers),
        include_wrapper_biases=plan.config.bias == "all",
    )
    return entries


def counted_in_total(plan: VeraPlan, adapter: Mapping[str, Any]) -> int:
    """Parameters PEFT adds to ``all params``: the lambdas and module copies (not the projections: buffers)."""
    return count_params(adapter["vera"]) + count_params(adapter["modules_to_save"])


# --------------------------------------------------------------------------- sharding


def adapter_specs(plan: VeraPlan, adapter: Mapping[str, Any], base_specs: PyTree) -> dict[str, Any]:
    """Partition specs for the adapter tree: small vectors and shared projections are replicated.

    ``λ_b`` follows the output axis of the weight it adapts; module copies and biases
    take their base leaves' specs.
    """
    from jax.sharding import PartitionSpec

    vera = {}
    for name, layer in plan.layers.items():
        _, out_axis = base.weight_axes(base_specs, layer.info)
        vera[name] = {"vera_lambda_b": PartitionSpec(out_axis), "vera_lambda_d": PartitionSpec(None)}
    return {
        "vera_A": PartitionSpec(None, None),
        "vera_B": PartitionSpec(None, None),
        "vera": vera,
        **base.override_specs(adapter, plan.modules, base_specs),
    }


METHOD: method.Method[VeraPlan] = method.Method(
    prepare=prepare,
    init_params=init_params,
    apply_overrides=apply_overrides,
    key_entries=key_entries,
    counted_in_total=counted_in_total,
    layer_tree="vera",
    layer_forward=layer_forward,
    merge=merge,
    merge_record=merge_record,
    unmerge=unmerge,
    trainable_mask=trainable_mask,
    adapter_specs=adapter_specs,
)

registry.register(PeftType.VERA, VeraConfig, METHOD, kind="layer", mixable=True)
