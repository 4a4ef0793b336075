"""LoRA: low-rank adaptation, with DoRA, rsLoRA, PiSSA and OLoRA options.

``y = W x + (alpha / r) * B A dropout(x)``; only ``A`` (r x in) and ``B`` (out x r)
train. Embeddings get ``(alpha / r) * B A[ids]`` (no dropout). DoRA rescales the
adapted weight per output feature by a trained magnitude ``m / ||W + s B A||``.

Adapter tree (Flax orientation, so ``x @ A @ B`` needs no transposes)::

    {"lora": {module: {"lora_A": (in, r), "lora_B": (r, out),
                       ["lora_B_bias": (out,)], ["lora_magnitude_vector": (out,)]}},
     "modules_to_save": {module: subtree}, "bias": {leaf path: array}}

For embeddings ``lora_A`` is ``(num_embeddings, r)`` and ``lora_B`` ``(r, dim)``.
The config is :mod:`jpeft.tuners.lora_config`; the initialisers (PiSSA, OLoRA, LoftQ, ...)
are :mod:`jpeft.tuners.lora_init`.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
  Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024.
  Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023.
  Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation", 2024.
  Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", 2024.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.config import PeftConfig, PeftType
from jpeft.core import method, registry
from jpeft.core.modules import ModuleInfo
from jpeft.core.targets import per_layer_ranks
from jpeft.core.tree import PyTree, count_params, get_path, set_path
from jpeft.errors import ConfigError
from jpeft.tuners import base, lora_conv, lora_init, lowrank

# the configs live in lora_config (lora_init needs them too); both stay importable from here
from jpeft.tuners.lora_config import LoftQConfig as LoftQConfig
from jpeft.tuners.lora_config import LoraConfig

# PEFT's save_embedding_layers="auto" saves the base weights of these when targeted.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPlan(method.LayerPlan):
    """Static facts about one adapted layer (never traced)."""

    r: int
    alpha: float
    scaling: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraPlan(method.Plan):
    """One LoRA adapter resolved against one model."""

    config: LoraConfig
    layers: Mapping[str, LayerPlan]


# --------------------------------------------------------------------------- resolve


def prepare(config: LoraConfig, binding: Any) -> LoraPlan:
    """Resolves targets, ranks and scalings of ``config`` on the model behind ``binding``.

    The returned plan's config is what gets saved: ``"all-linear"`` expanded, long
    target lists compacted, task heads added to ``modules_to_save``, ``fan_in_fan_out``
    corrected for ``Conv1D`` targets; exactly the changes PEFT makes.
    """
    modules: Mapping[str, ModuleInfo] = binding.modules
    config, targeted = base.resolve_targets(config, binding, supported_kinds=("linear", "embedding", "conv"))

    conv1d = [modules[n].torch_type == "Conv1D" for n in targeted if modules[n].kind == "linear"]
    if any(conv1d) and not config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
            stacklevel=3,
        )
        config = dataclasses.replace(config, fan_in_fan_out=True)
    elif conv1d and not any(conv1d) and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to "
            "False.",
            stacklevel=3,
        )
        config = dataclasses.replace(config, fan_in_fan_out=False)

    layers: dict[str, LayerPlan] = {}
    ranks = per_layer_ranks(targeted, config.rank_pattern, config.alpha_pattern, config.r, config.lora_alpha)
    for index, name in enumerate(targeted):
        info = modules[name]
        r, alpha = ranks[name]
        if info.kind == "conv":
            lora_conv.check(info, config)
        if info.kind == "embedding" and config.lora_bias:
            raise ConfigError(
                f"lora_bias=True is not supported for embedding layers ({name}); set lora_bias=False."
            )
        if config.init_lora_weights == "olora" and info.torch_type == "Conv1D":
            raise ConfigError(
                f"init_lora_weights='olora' on {name} (a GPT-2 style Conv1D layer): PEFT's OLoRA ignores the "
                "transposed layout of Conv1D weights, so its result cannot be reproduced consistently. Use "
                "'pissa' or the default init for this model."
            )
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        layers[name] = LayerPlan(info=info, index=index, r=int(r), alpha=float(alpha), scaling=float(scaling))
    if config.lora_bias:
        for name, layer in layers.items():
            if not layer.info.has_bias:
                warnings.warn(
                    f"`lora_bias=True` was passed but the targeted layer {name} ({layer.info.type_name}) has no "
                    "bias. This means that merging LoRA weights won't be possible.",
                    stacklevel=3,
                )

    modules_to_save = base.resolve_modules_to_save(config.modules_to_save, modules)
    bias_leaves = base.bias_leaves_for(
        config.bias,
        binding.params,
        targeted,
        modules,
        modules_to_save=modules_to_save,
        buffers=binding.buffer_paths,
    )
    return LoraPlan(
        config=config,
        layers=layers,
        modules=modules,
        modules_to_save=tuple(modules_to_save),
        bias_leaves=tuple(bias_leaves),
    )


# --------------------------------------------------------------------------- init


def init_params(plan: LoraPlan, base_params: PyTree, key: jax.Array) -> tuple[dict[str, Any], PyTree | None]:
    """Creates the adapter tree; returns ``(adapter, new base params or None)``.

    PiSSA, OLoRA and LoftQ move part of each weight into the adapter, so they return a
    new base tree (the input is not changed); see :mod:`jpeft.tuners.lora_init`.
    """
    lora: dict[str, dict[str, jax.Array]] = {}
    new_base = None
    for name, layer in plan.layers.items():
        path = layer.info.weight_path
        layer_key = jax.random.fold_in(key, layer.index)
        lora[name], new_weight = lora_init.init_layer(
            layer, plan.config, get_path(base_params, path), layer_key
        )
        if new_weight is not None:
            new_base = set_path(new_base if new_base is not None else base_params, path, new_weight)
    overrides = base.init_overrides(
        new_base if new_base is not None else base_params,
        plan.modules_to_save,
        plan.modules,
        plan.bias_leaves,
    )
    return {"lora": lora, **overrides}, new_base


# --------------------------------------------------------------------------- forward


def apply_overrides(base_params: PyTree, adapter: Mapping[str, Any], plan: LoraPlan) -> PyTree:
    return base.apply_overrides(base_params, adapter, plan.modules, plan.bias_leaves)


def layer_forward(
    layer: LayerPlan,
    config: LoraConfig,
    adapter: Mapping[str, Any],
    module_params: Mapping[str, jax.Array],
    x: jax.Array,
    out: jax.Array,
    *,
    train: bool,
    key: jax.Array | None,
) -> jax.Array:
    """The layer's output with this adapter's contribution added (PEFT's forward)."""
    info = layer.info
    assert info.weight_name is not None, info.name  # every linear and embedding module names its weight
    params = adapter["lora"][info.name]
    lora_a, lora_b = params["lora_A"], params["lora_B"]
    s = layer.scaling
    if info.kind == "conv":
        xa = x.astype(lora_a.dtype)
        if train and config.lora_dropout > 0.0:
            xa = base.dropout(xa, config.lora_dropout, key, "lora_dropout")
        result = lora_conv.contribution(info, xa, lora_a, lora_b) * s
        if "lora_B_bias" in params:
            result = result + params["lora_B_bias"] * s
        return (out + result).astype(out.dtype)
    if info.kind == "embedding":
        delta = jnp.take(lora_a, x, axis=0) @ lora_b * s
        if info.output_scale != 1.0:  # the base scales its rows after the lookup (Gemma); PEFT scales the delta too
            delta = delta * jnp.asarray(info.output_scale, delta.dtype)
        if config.use_dora:
            weight = module_params[info.weight_name]
            norm = jax.lax.stop_gradient(lora_init.dora_weight_norm(weight, lora_a, lora_b, s))
            mag = params["lora_magnitude_vector"] / norm
            return (mag * out + mag * delta).astype(out.dtype)
        return (out + delta).astype(out.dtype)

    xa = x.astype(lora_a.dtype)
    dropped = train and config.lora_dropout > 0.0
    if dropped:
        xa = base.dropout(xa, config.lora_dropout, key, "lora_dropout")
    if not config.use_dora:
        # the scaling goes on the rank-r intermediate, r/out the size of the output (forward and backward)
        result = lowrank.product(xa, lora_a, lora_b, s, train=train)
        if "lora_B_bias" in params:
            result = result + params["lora_B_bias"] * s
        return (out + result).astype(out.dtype)
    lora_out = lowrank.product(xa, lora_a, lora_b, 1.0, train=train)

    weight_io = lora_init.weight_io(module_params[info.weight_name], info)
    norm = jax.lax.stop_gradient(lora_init.dora_weight_norm(weight_io, lora_a, lora_b, s))
    mag = params["lora_magnitude_vector"] / norm
    if dropped:
        base_no_bias = xa @ weight_io.astype(xa.dtype)
    else:
        base_no_bias = out - module_params["bias"] if "bias" in module_params else out
    return (out + (mag - 1) * base_no_bias + mag * lora_out * s).astype(out.dtype)


def mixed_batch_forward(
    layers: Sequence[tuple[int, LayerPlan, LoraConfig, Mapping[str, Any]]],
    module_params: Mapping[str, jax.Array],
    x: jax.Array,
    out: jax.Array,
    result: jax.Array,
    ids: jax.Array,
) -> jax.Array:
    """``result`` plus, for each example, the delta of its own adapter (a mixed batch).

    The adapters' factors are zero-padded to one rank, scaled and stacked (one extra
    zero entry stands for the base model, id ``-1``), then each example gathers its own
    ``A``/``B``: one batched low-rank product for the whole batch, however many
    adapters it mixes (static shapes, nothing recompiles when the mix changes).

    Args:
      layers: ``(adapter id, layer plan, config, adapter tree)`` for each LoRA adapter
        that targets this module.
      module_params, out: unused (the delta does not depend on the base output).
      x: the layer input, ``(batch, ..., in)`` (token ids for embeddings).
      result: the output so far.
      ids: ``(batch,)`` adapter id per example; ids of adapters not in ``layers`` add nothing.
    """
    del module_params, out
    if layers[0][1].info.kind == "conv":
        raise ValueError(
            f"mixed batches (`adapter_names=`) are not supported on convolution {layers[0][1].info.name}; run one "
            "adapter per call."
        )
    count = max(i for i, *_ in layers) + 2  # ids 0..max, then the zero entry for -1 / absent adapters
    rank = max(layer.r for _, layer, _, _ in layers)
    first = layers[0][1].info
    dtype = jnp.result_type(*(ad["lora"][layer.info.name]["lora_A"].dtype for _, layer, _, ad in layers))
    # one (A, B, bias) per id, zero-padded to one rank and pre-scaled; absent ids add nothing
    zero_a = jnp.zeros((first.in_features, rank), dtype)  # in_features: the vocabulary for an embedding
    zero_b = jnp.zeros((rank, first.out_features), dtype)
    zero_bias = jnp.zeros((first.out_features,), dtype)
    entries = {}
    for i, layer, _, adapter in layers:
        params = adapter["lora"][layer.info.name]
        pad = rank - layer.r
        entries[i] = (
            jnp.pad(params["lora_A"].astype(dtype), ((0, 0), (0, pad))),
            jnp.pad((params["lora_B"] * layer.scaling).astype(dtype), ((0, pad), (0, 0))),
            (params["lora_B_bias"] * layer.scaling).astype(dtype) if "lora_B_bias" in params else zero_bias,
        )
    rows_a, rows_b, rows_bias = zip(
        *(entries.get(i, (zero_a, zero_b, zero_bias)) for i in range(count)), strict=True
    )
    stacked_a, stacked_b = jnp.stack(rows_a), jnp.stack(rows_b)
    has_bias = any("lora_B_bias" in ad["lora"][layer.info.name] for _, layer, _, ad in layers)
    stacked_bias = jnp.stack(rows_bias) if has_bias else None
    index = jnp.where(ids < 0, count - 1, jnp.minimum(ids, count - 1))
    b = stacked_b[index]  # (batch, rank, out)
    if first.kind == "embedding":
        rows = stacked_a[index[:, None], x.reshape(x.shape[0], -1)]  # (batch, tokens, rank)
        delta = jnp.einsum("btr,bro->bto", rows, b).reshape(*x.shape, -1)
        if first.output_scale != 1.0:
            delta = delta * jnp.asarray(first.output_scale, delta.dtype)
    else:
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).astype(dtype)
        delta = jnp.einsum("bti,bir,bro->bto", flat, stacked_a[index], b).reshape(*x.shape[:-1], -1)
        if stacked_bias is not None:
            delta = delta + stacked_bias[index].reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (-1,))
    return (result + delta).astype(result.dtype)


# --------------------------------------------------------------------------- merge


def delta_weight(layer: LayerPlan, params: Mapping[str, jax.Array]) -> jax.Array:
    """``s * A B`` laid out as the Flax weight (``kernel`` or ``embedding``; a conv's ``(*window, in, out)``)."""
    delta = layer.scaling * (params["lora_A"] @ lora_conv.pointwise(params["lora_B"]))
    return delta.T if layer.info.kernel_transposed else delta


def _dora_factor(layer: LayerPlan, weight: jax.Array, lp: Mapping[str, jax.Array]) -> jax.Array:
    """``m / ||W + s A B||`` broadcast against the Flax weight's layout."""
    norm = lora_init.dora_weight_norm(
        lora_init.weight_io(weight, layer.info), lp["lora_A"], lp["lora_B"], layer.scaling
    )
    factor = lp["lora_magnitude_vector"] / norm
    return factor[:, None] if layer.info.kernel_transposed else factor[None, :]


def merge_record(base_params: PyTree, adapter: Mapping[str, Any], plan: LoraPlan) -> dict[str, Any]:
    """What :func:`unmerge` needs, taken before :func:`merge`: replaced base leaves and DoRA factors."""
    factors = {}
    if plan.config.use_dora:
        for name, layer in plan.layers.items():
            factors[name] = _dora_factor(
                layer, get_path(base_params, layer.info.weight_path), adapter["lora"][name]
            )
    originals = base.overridden_originals(base_params, plan.modules_to_save, plan.modules, plan.bias_leaves)
    return {"originals": originals, "dora_factors": factors}


def merge(base_params: PyTree, adapter: Mapping[str, Any], plan: LoraPlan) -> PyTree:
    """The base tree with this adapter folded into the weights (and overrides applied)."""
    params = apply_overrides(base_params, adapter, plan)
    for name, layer in plan.layers.items():
        info, lp = layer.info, adapter["lora"][name]
        weight = get_path(params, info.weight_path)
        merged = weight.astype(jnp.float32) + delta_weight(layer, lp)
        if plan.config.use_dora:
            merged = merged * _dora_factor(layer, weight, lp)
        params = set_path(params, info.weight_path, merged.astype(weight.dtype))
        if "lora_B_bias" in lp:
            if not info.has_bias:
                raise ValueError(
                    f"cannot merge adapter with `lora_bias=True` into {name}: the layer has no bias to merge into."
                )
            bias = get_path(params, info.bias_path)
            params = set_path(
                params, info.bias_path, (bias + layer.scaling * lp["lora_B_bias"]).astype(bias.dtype)
            )
    return params


def unmerge(params: PyTree, adapter: Mapping[str, Any], plan: LoraPlan, record: Mapping[str, Any]) -> PyTree:
    """Inverse of :func:`merge` (exact up to float rounding), given :func:`merge_record`'s output."""
    for name, layer in plan.layers.items():
        info, lp = layer.info, adapter["lora"][name]
        weight = get_path(params, info.weight_path)
        restored = weight.astype(jnp.float32)
        if plan.config.use_dora:
            restored = restored / record["dora_factors"][name]
        restored = restored - delta_weight(layer, lp)
        params = set_path(params, info.weight_path, restored.astype(weight.dtype))
        if "lora_B_bias" in lp:
            bias = get_path(params, info.bias_path)
            params = set_path(
                params, info.bias_path, (bias - layer.scaling * lp["lora_B_bias"]).astype(bias.dtype)
            )
    return base.restore(params, record["originals"])


# --------------------------------------------------------------------------- checkpoint


def key_entries(
    plan: LoraPlan, adapter: Mapping[str, Any], save_embedding_layers: bool | str = "auto"
) -> list:
    """The PEFT checkpoint layout of this adapter (see :class:`jpeft.tuners.base.KeyEntry`)."""
    entries: list[base.KeyEntry] = []
    for name, layer in plan.layers.items():
        lp = adapter["lora"][name]
        if layer.info.kind == "embedding":
            entries.append(
                base.KeyEntry(f"{name}.lora_embedding_A", "adapter", ("lora", name, "lora_A"), (1, 0))
            )
            entries.append(
                base.KeyEntry(f"{name}.lora_embedding_B", "adapter", ("lora", name, "lora_B"), (1, 0))
            )
        else:
            perm = lora_conv.torch_perm(lp["lora_A"].ndim) if layer.info.kind == "conv" else (1, 0)
            entries.append(base.KeyEntry(f"{name}.lora_A.weight", "adapter", ("lora", name, "lora_A"), perm))
            entries.append(base.KeyEntry(f"{name}.lora_B.weight", "adapter", ("lora", name, "lora_B"), perm))
            if "lora_B_bias" in lp:
                entries.append(base.KeyEntry(f"{name}.lora_B.bias", "adapter", ("lora", name, "lora_B_bias")))
        if "lora_magnitude_vector" in lp:
            entries.append(
                base.KeyEntry(
                    f"{name}.lora_magnitude_vector", "adapter", ("lora", name, "lora_magnitude_vector")
                )
            )
    entries += base.override_entries(
        adapter,
        plan.modules,
        plan.bias_leaves,
        set(plan.layers),
        include_wrapper_biases=plan.config.bias == "all",
    )
    return entries + embedding_layer_entries(plan.layers, save_embedding_layers)


def embedding_layer_entries(
    layers: Mapping[str, method.LayerPlan], save_embedding_layers: bool | str
) -> list[base.KeyEntry]:
    """The targeted base weights PEFT's ``save_embedding_layers`` writes, as ``<name>.base_layer.weight``."""
    entries = []
    for name, layer in layers.items():
        if _saves_embedding(name, layer.info, save_embedding_layers):
            info = layer.info
            perm = (1, 0) if info.weight_name == "kernel" else None
            entries.append(base.KeyEntry(f"{name}.base_layer.weight", "base", info.weight_path, perm))
    return entries


def _saves_embedding(name: str, info: ModuleInfo, save_embedding_layers: bool | str) -> bool:
    if save_embedding_layers is False:
        return False
    is_embedding_name = any(name == n or name.endswith("." + n) for n in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        return is_embedding_name
    return is_embedding_name or info.kind == "embedding"


def counted_in_total(plan: LoraPlan, adapter: Mapping[str, Any]) -> int:
    """Parameters PEFT adds to ``all params``: LoRA weights and module copies, not biases (those are base's)."""
    return count_params(adapter["lora"]) + count_params(adapter["modules_to_save"])


# --------------------------------------------------------------------------- sharding


def adapter_specs(plan: LoraPlan, adapter: Mapping[str, Any], base_specs: PyTree) -> dict[str, Any]:
    """Partition specs for the adapter tree that follow the specs of the weights it adapts.

    ``lora_A`` is split like the weight's input axis and ``lora_B`` like its output axis
    (the rank axis is never split), so ``x @ A @ B`` needs no more communication than
    ``x @ W``. Module copies and biases take their base leaves' specs.
    """
    from jax.sharding import PartitionSpec

    lora = {}
    for name, layer in plan.layers.items():
        if layer.info.kind == "conv":  # small windowed factors: replicated
            lora[name] = {leaf: PartitionSpec() for leaf in adapter["lora"][name]}
            continue
        in_axis, out_axis = base.weight_axes(base_specs, layer.info)
        specs = {"lora_A": PartitionSpec(in_axis, None), "lora_B": PartitionSpec(None, out_axis)}
        for extra in ("lora_B_bias", "lora_magnitude_vector"):
            if extra in adapter["lora"][name]:
                specs[extra] = PartitionSpec(out_axis)
        lora[name] = specs
    return {"lora": lora, **base.override_specs(adapter, plan.modules, base_specs)}


# --------------------------------------------------------------------------- rules PeftModel asks about


def check_new_adapter(config: LoraConfig, existing: Sequence[PeftConfig]) -> None:
    """PEFT's rule: only one adapter of a model may train biases."""
    if config.bias != "none" and any(getattr(c, "bias", "none") != "none" for c in existing):
        raise ValueError(
            "LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' "
            "for all adapters."
        )


def check_mixed_batch(config: LoraConfig, adapter: Mapping[str, Any]) -> None:
    """PEFT refuses per-example adapters when DoRA is on."""
    del adapter
    if config.use_dora:
        raise ValueError("Cannot pass `adapter_names` when DoRA is enabled, as in PEFT.")


def config_for_save(config: LoraConfig) -> LoraConfig:
    """PEFT's LoftQ workflow: the saved adapter must not re-run LoftQ when loaded (its base is the
    LoftQ-replaced one, written by ``save_base_model``)."""
    if config.init_lora_weights == "loftq":
        return dataclasses.replace(config, init_lora_weights=True, loftq_config={})
    return config


def combine_adapters(*args: Any, **kwargs: Any) -> Any:
    """PEFT's ``add_weighted_adapter``; see :func:`jpeft.tuners.lora_weighted.combine_adapters`."""
    from jpeft.tuners import lora_weighted  # it builds on this module's prepare/init

    return lora_weighted.combine_adapters(*args, **kwargs)


METHOD: method.Method[LoraPlan] = method.Method(
    prepare=prepare,
    init_params=init_params,
    apply_overrides=apply_overrides,
    key_entries=key_entries,
    counted_in_total=counted_in_total,
    layer_tree="lora",
    layer_forward=layer_forward,
    merge=merge,
    merge_record=merge_record,
    unmerge=unmerge,
    mixed_batch_forward=mixed_batch_forward,
    adapter_specs=adapter_specs,
    config_for_save=config_for_save,
    check_new_adapter=check_new_adapter,
    check_mixed_batch=check_mixed_batch,
    combine_adapters=combine_adapters,
)

registry.register(PeftType.LORA, LoraConfig, METHOD, kind="layer", mixable=True)
