"""LoHa: low-rank Hadamard product adaptation (PEFT's ``LoHaConfig``, from LyCORIS).

The weight update of a targeted layer is the elementwise (Hadamard) product of two rank-``r``
products, in torch's ``(out, in)`` layout::

    ΔW = ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) * alpha / r
    y  = W x + b + ΔW x

``w1_a``/``w2_a`` are ``(out, r)`` and ``w1_b``/``w2_b`` are ``(r, in)``: as many parameters as a
rank-``2r`` LoRA, but ``ΔW`` can reach rank ``r²``. As PEFT does, the forward builds ``ΔW`` in
full and applies it to the input (there is no cheaper factorised form of a Hadamard product).

Init (``init_weights=True``): ``w1_a``, ``w1_b`` and ``w2_a`` Kaiming-uniform (``a=√5``, i.e.
``U(±1/√fan_in)``), ``w2_b`` zeros, so ``ΔW = 0``; ``init_weights=False`` draws ``w2_b`` the same
way (not a no-op). In training, ``rank_dropout`` zeroes output rows of ``ΔW`` and divides by the
kept fraction (no ``1/(1-p)``), and ``module_dropout`` skips the whole update with that
probability, both as PEFT does (jpeft's random streams are its own).

Only ``Linear`` (Flax ``Dense``) layers are adapted. PEFT's LoHa also adapts ``Conv1d``/``Conv2d``
but refuses GPT-2's ``Conv1D`` and embeddings; jpeft refuses all of those. The parameters are
stored in PEFT's torch shapes, so the checkpoint needs no transposes.

Adapter tree::

    {"loha": {module: {"hada_w1_a": (out, r), "hada_w1_b": (r, in),
                       "hada_w2_a": (out, r), "hada_w2_b": (r, in)}},
     "modules_to_save": {module: subtree}, "bias": {}}

References:
  Hyeon-Woo, Ye-Bin and Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
  Federated Learning", ICLR 2022.
  Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
  Evaluation", ICLR 2024 (LyCORIS).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.config import PeftConfig, PeftType
from jpeft.core import method, registry
from jpeft.core.modules import ModuleInfo
from jpeft.core.targets import check_pattern_keys, per_layer_ranks
from jpeft.core.tree import PyTree, count_params, get_path, set_path
from jpeft.errors import ConfigError
from jpeft.tuners import base

LEAVES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHaConfig(PeftConfig):
    """PEFT's ``LoHaConfig``: the same fields, defaults and meanings.

    Attributes:
      r: rank of each of the two factors.
      alpha: scaling numerator: ``scaling = alpha / r`` (not ``lora_alpha``).
      rank_dropout: in training, the probability of zeroing each output row of ``ΔW``.
      module_dropout: in training, the probability of skipping the adapter on a layer.
      use_effective_conv2d: PEFT's CP decomposition of ``k x k`` convolution kernels. It only
        concerns convolutions, which jpeft's LoHa does not adapt, so either value computes
        the same thing here (it is kept for the file).
      target_modules: module names or suffixes (list), a regex matched against the whole
        name (string), ``"all-linear"``, or ``None`` for PEFT's default for the model type
        (LoRA's table).
      exclude_modules: names/suffixes (list) or a full-match regex (string) to skip.
      init_weights: ``True``: ``w2_b = 0`` (a no-op adapter); ``False``: all four random.
      layers_to_transform, layers_pattern: restrict list targets to layer indexes.
      rank_pattern, alpha_pattern: per-module ``r`` / ``alpha`` by name regex.
      modules_to_save: modules (matched by name ending) trained in full and saved.

    Example:
      >>> config = LoHaConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    """

    peft_type: ClassVar[PeftType] = PeftType.LOHA

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                object.__setattr__(self, name, list(dict.fromkeys(value)))
            elif value is not None and not isinstance(value, str):
                raise ConfigError(
                    f"`{name}` must be a list of module names, a regex string or None, got {type(value).__name__}."
                )
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ConfigError(
                    f"`modules_to_save` must be a list of module names, got the string {self.modules_to_save!r}."
                )
            object.__setattr__(self, "modules_to_save", list(self.modules_to_save))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))

        for name, r in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise ConfigError(
                    f"`{name}` should be a positive integer value but the value passed is {r!r}."
                )
        for name, alpha in [
            ("alpha", self.alpha),
            *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()),
        ]:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                raise ConfigError(f"`{name}` must be a number, got {alpha!r}.")
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"`{name}` must be in [0, 1), got {value!r}.")
        for name in ("init_weights", "use_effective_conv2d"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified "
                "(the indexes of the layers to adapt)."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # PEFT's LoHaConfig accepts this (LoraConfig refuses it); its matching ignores the indexes.
            warnings.warn(
                "`layers_to_transform` is ignored when `target_modules` is a regex string (as in PEFT); put the "
                "layer index in the regex or pass a list of names.",
                stacklevel=3,
            )
        check_pattern_keys(rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPlan(method.LayerPlan):
    """Static facts about one adapted layer (never traced)."""

    r: int
    alpha: float
    scaling: float

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """The four factors' shapes, PEFT's (torch layout)."""
        out_f, in_f = int(self.info.out_features or 0), int(self.info.in_features or 0)
        return {
            "hada_w1_a": (out_f, self.r),
            "hada_w1_b": (self.r, in_f),
            "hada_w2_a": (out_f, self.r),
            "hada_w2_b": (self.r, in_f),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHaPlan(method.Plan):
    """One LoHa adapter resolved against one model."""

    config: LoHaConfig
    layers: Mapping[str, LayerPlan]


# --------------------------------------------------------------------------- resolve


def prepare(config: LoHaConfig, binding: Any) -> LoHaPlan:
    """Resolves the targets, ranks and scalings of ``config`` on the model behind ``binding``.

    The returned plan's config is what gets saved, with PEFT's changes: default targets
    filled in (LoHa's table is a copy of LoRA's), ``"all-linear"`` expanded, long target lists
    compacted, task heads added to ``modules_to_save``.
    """
    modules: Mapping[str, ModuleInfo] = binding.modules
    # Embeddings and convolutions (kind "embedding"/"other") are refused by select_targets.
    config, targeted = base.resolve_targets(config, binding, supported_kinds=("linear",), defaults_of="LOHA")
    not_linear = [modules[name] for name in targeted if modules[name].torch_type != "Linear"]
    if not_linear:
        raise ConfigError(
            f"LoHa cannot adapt {not_linear[0].name!r} ({not_linear[0].type_name}, torch "
            f"`{not_linear[0].torch_type}`): torch PEFT's LoHa adapts `nn.Linear` but refuses GPT-2 style "
            "`Conv1D` layers (TypeError), so it could not load the adapter. Target `Linear` layers only (see "
            "`jpeft.named_modules(model)`), or use LoRA for this model."
        )

    ranks = per_layer_ranks(targeted, config.rank_pattern, config.alpha_pattern, config.r, config.alpha)
    layers = {
        name: LayerPlan(info=modules[name], index=index, r=r, alpha=float(alpha), scaling=alpha / r)
        for index, (name, (r, alpha)) in enumerate(ranks.items())
    }
    modules_to_save = base.resolve_modules_to_save(config.modules_to_save, modules)
    return LoHaPlan(config=config, layers=layers, modules=modules, modules_to_save=tuple(modules_to_save))


# --------------------------------------------------------------------------- init


def _kaiming_uniform(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """torch's ``kaiming_uniform_(a=√5)`` on a 2-D tensor: ``U(±1/√shape[1])``."""
    bound = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_params(plan: LoHaPlan, base_params: PyTree, key: jax.Array) -> tuple[dict[str, Any], None]:
    """Creates the adapter tree (PEFT's ``reset_adapter_parameters``; ``init_weights=False``: ``_random``)."""
    loha: dict[str, dict[str, jax.Array]] = {}
    for name, layer in plan.layers.items():
        keys = jax.random.split(jax.random.fold_in(key, layer.index), len(LEAVES))
        entry = {leaf: _kaiming_uniform(k, layer.shapes[leaf]) for leaf, k in zip(LEAVES, keys, strict=True)}
        if plan.config.init_weights:
            entry["hada_w2_b"] = jnp.zeros(layer.shapes["hada_w2_b"], jnp.float32)
        loha[name] = entry
    overrides = base.init_overrides(base_params, plan.modules_to_save, plan.modules, ())
    return {"loha": loha, **overrides}, None


# --------------------------------------------------------------------------- forward


def apply_overrides(base_params: PyTree, adapter: Mapping[str, Any], plan: LoHaPlan) -> PyTree:
    return base.apply_overrides(base_params, adapter, plan.modules, ())


def delta_weight(layer: LayerPlan, params: Mapping[str, jax.Array]) -> jax.Array:
    """``ΔW = ((w1_a w1_b) ⊙ (w2_a w2_b)) · alpha / r`` in torch's ``(out, in)`` layout."""
    w1 = params["hada_w1_a"] @ params["hada_w1_b"]
    w2 = params["hada_w2_a"] @ params["hada_w2_b"]
    return (w1 * w2) * layer.scaling


def layer_forward(
    layer: LayerPlan,
    config: LoHaConfig,
    adapter: Mapping[str, Any],
    module_params: Mapping[str, jax.Array],
    x: jax.Array,
    out: jax.Array,
    *,
    train: bool,
    key: jax.Array | None,
) -> jax.Array:
    """``out + x ΔWᵀ`` (PEFT's ``Linear.forward``: the base bias is in ``out`` already).

    In training, ``rank_dropout`` keeps each output row of ``ΔW`` with probability ``1 - p``
    and divides by the kept fraction; ``module_dropout`` drops the whole term.
    """
    del module_params
    delta = delta_weight(layer, adapter["loha"][layer.info.name])  # (out, in)
    if not train or (config.rank_dropout == 0.0 and config.module_dropout == 0.0):
        return (out + x.astype(delta.dtype) @ delta.T).astype(out.dtype)
    if key is None:
        raise ValueError(
            "`rank_dropout`/`module_dropout` > 0 in training needs a random key: pass "
            "`dropout_rng=jax.random.key(...)`."
        )
    rank_key, module_key = jax.random.split(key)
    if config.rank_dropout > 0.0:
        keep = (jax.random.uniform(rank_key, (delta.shape[0],)) > config.rank_dropout).astype(delta.dtype)
        # PEFT divides by the kept fraction (0/0 = NaN when every row drops; jpeft then adds nothing).
        fraction = keep.mean()
        delta = delta * jnp.where(fraction > 0, keep / jnp.maximum(fraction, 1e-12), 0.0)[:, None]
    result = x.astype(delta.dtype) @ delta.T
    if config.module_dropout > 0.0:
        result = jnp.where(jax.random.uniform(module_key) > config.module_dropout, result, 0.0)
    return (out + result).astype(out.dtype)


# --------------------------------------------------------------------------- merge


def merge_record(base_params: PyTree, adapter: Mapping[str, Any], plan: LoHaPlan) -> dict[str, Any]:
    """What :func:`unmerge` needs, taken before :func:`merge`: the base leaves the overrides replace."""
    return {"originals": base.overridden_originals(base_params, plan.modules_to_save, plan.modules, ())}


def merge(base_params: PyTree, adapter: Mapping[str, Any], plan: LoHaPlan) -> PyTree:
    """The base tree with ``ΔW`` added to each adapted kernel (and module copies applied)."""
    params = apply_overrides(base_params, adapter, plan)
    for name, layer in plan.layers.items():
        kernel = get_path(params, layer.info.weight_path)  # Dense: (in, out)
        merged = kernel.astype(jnp.float32) + delta_weight(layer, adapter["loha"][name]).T
        params = set_path(params, layer.info.weight_path, merged.astype(kernel.dtype))
    return params


def unmerge(params: PyTree, adapter: Mapping[str, Any], plan: LoHaPlan, record: Mapping[str, Any]) -> PyTree:
    """Inverse of :func:`merge` (exact up to float rounding), given :func:`merge_record`'s output."""
    for name, layer in plan.layers.items():
        kernel = get_path(params, layer.info.weight_path)
        restored = kernel.astype(jnp.float32) - delta_weight(layer, adapter["loha"][name]).T
        params = set_path(params, layer.info.weight_path, restored.astype(kernel.dtype))
    return base.restore(params, record["originals"])


# --------------------------------------------------------------------------- checkpoint


def key_entries(
    plan: LoHaPlan, adapter: Mapping[str, Any], save_embedding_layers: bool | str = "auto"
) -> list[base.KeyEntry]:
    """The PEFT checkpoint layout: ``<module>.hada_w1_a`` etc. (no ``.weight``: ParameterDicts), torch shapes.

    ``save_embedding_layers`` is accepted for the common interface; LoHa adapts no embedding.
    """
    del save_embedding_layers
    entries = [
        base.KeyEntry(f"{name}.{leaf}", "adapter", ("loha", name, leaf))
        for name in plan.layers
        for leaf in LEAVES
    ]
    entries += base.override_entries(adapter, plan.modules, (), set(plan.layers))
    return entries


def counted_in_total(plan: LoHaPlan, adapter: Mapping[str, Any]) -> int:
    """Parameters PEFT adds to ``all params``: the four factors per layer and module copies."""
    return count_params(adapter["loha"]) + count_params(adapter["modules_to_save"])


# --------------------------------------------------------------------------- sharding


def adapter_specs(plan: LoHaPlan, adapter: Mapping[str, Any], base_specs: PyTree) -> dict[str, Any]:
    """Partition specs: ``w*_a`` split like the weight's output axis, ``w*_b`` like its input axis.

    Then ``ΔW`` (out, in) comes out sharded as the weight is; the rank axis is never split.
    """
    from jax.sharding import PartitionSpec

    loha = {}
    for name, layer in plan.layers.items():
        in_axis, out_axis = base.weight_axes(base_specs, layer.info)
        a_spec, b_spec = PartitionSpec(out_axis, None), PartitionSpec(None, in_axis)
        loha[name] = {"hada_w1_a": a_spec, "hada_w1_b": b_spec, "hada_w2_a": a_spec, "hada_w2_b": b_spec}
    return {"loha": loha, **base.override_specs(adapter, plan.modules, base_specs)}


METHOD: method.Method[LoHaPlan] = method.Method(
    prepare=prepare,
    init_params=init_params,
    apply_overrides=apply_overrides,
    key_entries=key_entries,
    counted_in_total=counted_in_total,
    layer_tree="loha",
    layer_forward=layer_forward,
    merge=merge,
    merge_record=merge_record,
    unmerge=unmerge,
    adapter_specs=adapter_specs,
)

registry.register(PeftType.LOHA, LoHaConfig, METHOD, kind="layer", mixable=True)
