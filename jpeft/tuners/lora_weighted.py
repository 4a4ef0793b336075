"""``add_weighted_adapter``: a new LoRA adapter combined from existing ones, as PEFT builds it.

PEFT's ``LoraModel.add_weighted_adapter`` (peft 0.21), step for step:

- The new config is a copy of the first adapter's config with ``r = lora_alpha = new rank``
  (so the scaling is 1), ``target_modules`` the union of the adapters' targets (``"(a)|(b)"``
  for regex strings) and ``rank_pattern``/``alpha_pattern`` cleared. The new adapter is added
  frozen and not active.
- ``cat``: ``A = concat_i(w_i s_i A_i)`` and ``B = concat_i(B_i)`` along the rank axis; rank
  ``sum_i r_i``. Exact: ``B A = sum_i w_i s_i B_i A_i``.
- ``svd`` and ``*_svd``: the delta weights ``s_i B_i A_i`` are merged (task arithmetic, TIES,
  DARE or magnitude pruning), then a rank-``svd_rank`` SVD gives ``B = U S`` and ``A = Vh``
  (optionally clamped at the ``svd_clamp`` quantile).
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the ``A``s and
  the ``B``s are merged separately with weights ``sqrt(|w_i s_i|)`` (the sign goes on ``A``);
  all ranks must be equal. An approximation: ``(sum a_i A_i)(sum b_i B_i)`` has cross terms.

The arithmetic runs in PEFT's (torch) layout, ``A`` as ``(r, in)`` and ``B`` as ``(out, r)``,
and the merged tensors of the ``*_svd`` types in the layout of PEFT's ``get_delta_weight``
(GPT-2 ``Conv1D`` and embeddings transposed), so magnitude pruning, the order of DARE's
masks and their shapes match PEFT's exactly.

References:
  Ilharco et al., "Editing Models with Task Arithmetic", 2023.
  Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", 2023.
  Yu et al., "Language Models are Super Mario" (DARE), 2024.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import jax
import jax.numpy as jnp

from jpeft.config import PeftType
from jpeft.core.method import AdapterState, AdapterView
from jpeft.core.tree import PyTree
from jpeft.tuners import lora, merge_utils

if TYPE_CHECKING:
    from jpeft.bindings.protocol import Binding
    from jpeft.tuners.lora import LayerPlan, LoraPlan

CombinationType = Literal[
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
COMBINATION_TYPES: tuple[str, ...] = get_args(CombinationType)
_SAME_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
_SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_DENSITY_TYPES = (
    *("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd"),
    *("magnitude_prune", "magnitude_prune_svd"),
)

# ``(module name, shape, density) -> keep mask``: called once per tensor DARE prunes.
DareMaskFn = Callable[[str, tuple[int, ...], float], jax.Array]


def combine_adapters(
    sources: Sequence[AdapterView],
    weights: Sequence[float],
    binding: Binding,
    base_params: PyTree,
    combination_type: CombinationType = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    *,
    key: jax.Array | None = None,
    svd_driver: str | None = None,
    dare_mask_fn: DareMaskFn | None = None,
) -> tuple[AdapterState, PyTree | None]:
    """A new adapter, the weighted combination of LoRA adapters ``sources`` (PEFT's ``add_weighted_adapter``).

    A pure function: ``PeftModel.add_weighted_adapter`` stores what it returns. As in PEFT, a
    single adapter always combines ``linear``, and the new adapter is frozen and not active (use
    ``set_adapter``). Its config copies the first adapter's, so ``use_rslora``, ``use_dora``
    (magnitude left at its initial value), ``modules_to_save`` (fresh copies of the base) and
    ``layers_to_transform`` come from there.

    Args:
      sources: the adapters to combine (``PeftModel``'s read-only views).
      weights: one weight per adapter; negative weights subtract.
      binding: the model's binding (the new adapter is resolved against it).
      base_params: the base params (the new adapter's init reads them).
      combination_type: ``svd``, ``linear``, ``cat``, ``ties``, ``ties_svd``, ``dare_ties``,
        ``dare_linear``, ``dare_ties_svd``, ``dare_linear_svd``, ``magnitude_prune`` or
        ``magnitude_prune_svd``. ``cat`` and ``svd`` are exact (``svd`` up to the rank cut);
        ``linear`` is a rough approximation.
      svd_rank: rank of the ``*svd`` result (default: the largest input rank).
      svd_clamp: quantile in ``[0, 1]`` of the ``U S`` and ``Vh`` entries to clamp them at.
      svd_full_matrices: passed to ``jnp.linalg.svd`` (the result is the same either way).
      density: fraction of entries kept by the ``ties``, ``dare`` and ``magnitude_prune`` types.
      majority_sign_method: ``"total"`` or ``"frequency"``, for the ``ties`` types.
      key: PRNG key for DARE's drop masks and the new adapter's (overwritten) init; default
        ``jax.random.key(0)``.
      svd_driver: PEFT's cuSOLVER option; must stay ``None`` (``jnp.linalg.svd`` has no choice).
      dare_mask_fn: explicit DARE masks instead of ``key``: called as ``fn(module, shape,
        density)`` once per pruned tensor, in PEFT's order (for each module: every adapter's
        ``lora_A`` ``(r, in)``, then every ``lora_B`` ``(out, r)``; for the ``*_svd`` types
        each delta weight in PEFT's ``get_delta_weight`` layout), returning a keep mask.

    Notes:
      PEFT quirks kept on purpose: with ``use_rslora`` the new adapter's scaling is
      ``sqrt(r)``, not 1, so its delta is ``sqrt(r)`` times the combination; for the
      equal-rank types, a layer whose rank is below ``r`` (``rank_pattern``) keeps that
      smaller rank, which a reload of the saved adapter then refuses (as in PEFT). The
      singular vectors' signs follow LAPACK (they can differ from torch's), which changes
      ``svd_clamp``'s quantile but not the unclamped ``B @ A``.

    Raises:
      ValueError: an unknown adapter or combination type, unequal ranks for the types that
        need equal ranks, two adapters with ``modules_to_save`` on the same module, a missing
        ``density``, or an ``svd_rank`` larger than a layer allows.
      TypeError: the adapters are not LoRA adapters.

    Returns:
      ``(AdapterState of the new adapter, new base params or None)`` (a PiSSA/OLoRA config
      re-runs its init, which rewrites the base, as in PEFT).

    Example:
      >>> peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="cat")
      >>> peft_model.set_adapter("ab")
    """
    resolved_type, new_rank, new_targets = _check(
        list(sources), list(weights), combination_type, svd_rank, svd_clamp, density, svd_driver
    )
    first = sources[0].config
    if isinstance(first.init_lora_weights, str) and first.init_lora_weights.startswith(("pissa", "olora")):
        warnings.warn(
            f"adapter {sources[0].name!r} uses init_lora_weights={first.init_lora_weights!r}; the combined adapter "
            "copies its config, so creating it runs that init again and rewrites the base weights, as in PEFT. "
            "Convert the adapters to plain LoRA first to keep the base unchanged.",
            stacklevel=2,
        )
    config = dataclasses.replace(
        first,
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_targets,
        alpha_pattern={},
        rank_pattern={},
    )
    key = jax.random.key(0) if key is None else key
    init_key, dare_key = jax.random.split(key)
    plan = lora.prepare(config, binding)
    adapter, new_base = lora.init_params(plan, base_params, init_key)
    combined = _fill(
        list(sources),
        plan,
        adapter,
        [float(w) for w in weights],
        resolved_type,
        new_rank,
        svd_clamp,
        svd_full_matrices,
        density,
        majority_sign_method,
        dare_key,
        dare_mask_fn,
    )
    return AdapterState(plan.config, plan, combined), new_base


def add_weighted_adapter(peft_model: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: CombinationType = "svd", **kwargs: Any) -> None:  # fmt: skip
    """``peft_model.add_weighted_adapter(...)`` as a function (arguments as :func:`combine_adapters`)."""
    peft_model.add_weighted_adapter(adapters, weights, adapter_name, combination_type, **kwargs)


# --------------------------------------------------------------------------- checks


def _check(
    sources: list[AdapterView],
    weights: list[float],
    combination_type: str,
    svd_rank: int | None,
    svd_clamp: float | None,
    density: float | None,
    svd_driver: str | None,
) -> tuple[str, int, list[str] | str]:
    """PEFT's ``_check_add_weighted_adapter``: ``(combination type, new rank, new target_modules)``."""
    adapters = [source.name for source in sources]
    configs = {source.name: source.config for source in sources}
    if len(weights) != len(adapters):
        raise ValueError(
            f"got {len(weights)} weights for {len(adapters)} adapters; pass one weight per adapter."
        )
    for adapter in adapters:
        peft_type = configs[adapter].peft_type
        if peft_type != PeftType.LORA:
            raise TypeError(
                f"add_weighted_adapter combines LoRA adapters only; adapter {adapter!r} is {peft_type.value}."
            )
        if getattr(configs[adapter], "target_parameters", None):
            raise ValueError(
                f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{adapter}')"
            )
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"Invalid combination_type: {combination_type}; use one of {list(COMBINATION_TYPES)}."
        )
    if svd_driver is not None:
        raise ValueError(
            f"svd_driver={svd_driver!r} selects a cuSOLVER routine in torch; jnp.linalg.svd has no driver "
            "choice. Leave `svd_driver` as None."
        )

    # PEFT counts every listed adapter (a name listed twice counts twice).
    copies = collections.Counter(module for source in sources for module in set(source.plan.modules_to_save))
    shared = sorted(module for module, count in copies.items() if count > 1)
    if shared:
        raise ValueError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{len(shared)} such instance(s) ({shared}). Combine adapters whose modules_to_save differ, or "
            "delete the extra copies first."
        )

    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = [
        config.r if not config.rank_pattern else max(config.r, *config.rank_pattern.values())
        for config in (configs[adapter] for adapter in adapters)
    ]
    if combination_type in _SAME_RANK_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(
                "All adapters must have the same r value when using combination_type linear, ties, dare_ties or "
                f"dare_linear (got r = {dict(zip(adapters, ranks, strict=True))}). Use combination_type 'cat' "
                "or 'svd' for adapters of different ranks."
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    if combination_type in _DENSITY_TYPES:
        if density is None:
            raise ValueError(
                f"combination_type {combination_type!r} needs `density`: the fraction of entries to keep, in "
                "[0, 1]."
            )
        if density < 0:
            raise ValueError(f"Density should be >= 0, got {density}")
    if combination_type in _SVD_TYPES and svd_clamp is not None and not 0.0 <= svd_clamp <= 1.0:
        raise ValueError(f"`svd_clamp` is a quantile and must be in [0, 1], got {svd_clamp}.")

    targets = [configs[adapter].target_modules for adapter in adapters]
    if len({isinstance(t, str) for t in targets}) > 1:
        raise ValueError(
            "all adapter configs should follow the same target modules type. "
            "Combining adapters with `target_modules` type being a mix of list/set and string is not supported."
        )
    if isinstance(targets[0], str):
        new_targets: list[str] | str = "|".join(f"({t})" for t in targets)
    else:
        new_targets = list(dict.fromkeys(name for t in targets for name in t))
    return combination_type, new_rank, new_targets


# --------------------------------------------------------------------------- combination


def _fill(
    sources_in: list[AdapterView],
    new_plan: LoraPlan,
    new_adapter: PyTree,
    weights: list[float],
    combination_type: str,
    new_rank: int,
    svd_clamp: float | None,
    svd_full_matrices: bool,
    density: float | None,
    majority_sign_method: str,
    dare_key: jax.Array,
    dare_mask_fn: DareMaskFn | None,
) -> PyTree:
    """``new_adapter`` with every layer computed from ``sources_in``."""
    adapters = [source.name for source in sources_in]
    tree = new_adapter
    lora = dict(tree["lora"])
    dare = combination_type.startswith("dare")
    for name in new_plan.layers:
        sources = [
            (source.plan.layers[name], source.adapter["lora"][name], weight)
            for source, weight in zip(sources_in, weights, strict=True)
            if name in source.plan.layers
        ]
        if not sources:
            raise ValueError(
                f"No matching LoRAs found for module {name}: the combined config (first adapter's "
                f"layers_to_transform/exclude_modules with the union of targets) adapts it but none of {adapters} "
                "does. Make the first adapter's layer selection cover all the adapters' layers."
            )
        layer = sources[0][0]
        factors = [_torch_factors(params) for _, params, _ in sources]
        lora_as, lora_bs = [a for a, _ in factors], [b for _, b in factors]
        scalings = [source.scaling for source, _, _ in sources]
        source_weights = [weight for _, _, weight in sources]
        layer_key = jax.random.fold_in(dare_key, zlib.crc32(name.encode()))

        def dare_masks(shapes: list[tuple[int, ...]], name: str = name) -> list[jax.Array] | None:
            # PEFT draws no mask when nothing is pruned (density >= 1)
            if not dare or dare_mask_fn is None or density is None or density >= 1:
                return None
            return [jnp.asarray(dare_mask_fn(name, shape, density)) for shape in shapes]

        if combination_type == "cat":
            lora_a, lora_b = _cat(lora_as, lora_bs, _f32(source_weights), _f32(scalings), new_rank=new_rank)
        elif combination_type in _SVD_TYPES:
            transposed = _delta_transposed(layer)
            out_features, in_features = lora_bs[0].shape[0], lora_as[0].shape[1]
            if new_rank > min(out_features, in_features):
                raise ValueError(
                    f"svd_rank {new_rank} is larger than module {name} allows ({out_features}x{in_features} "
                    f"weight, rank <= {min(out_features, in_features)}); pass a smaller `svd_rank`."
                )
            delta_shape = (in_features, out_features) if transposed else (out_features, in_features)
            lora_a, lora_b = _svd(
                lora_as,
                lora_bs,
                _f32(scalings),
                _f32(source_weights),
                dare_masks([delta_shape] * len(sources)),
                jax.random.fold_in(layer_key, 2),
                combination_type=combination_type,
                new_rank=new_rank,
                transposed=transposed,
                clamp=svd_clamp,
                full_matrices=svd_full_matrices,
                density=density,
                majority_sign_method=majority_sign_method,
            )
        else:
            shapes = {(a.shape, b.shape) for a, b in factors}
            if len(shapes) > 1:
                raise ValueError(
                    f"module {name} has different LoRA ranks in the adapters being combined ({sorted(shapes)}), "
                    f"so combination_type {combination_type!r} cannot add them entry by entry (their "
                    "rank_pattern differs). Use combination_type 'cat' or 'svd'."
                )
            # PEFT's weights: sqrt(|w s|), the sign on A only (computed in double, then fp32)
            magnitudes = [math.sqrt(abs(w * s)) for w, s in zip(source_weights, scalings, strict=True)]
            signs = [1 if w * s >= 0 else -1 for w, s in zip(source_weights, scalings, strict=True)]
            weights_a = [m * sign for m, sign in zip(magnitudes, signs, strict=True)]
            masks_a = dare_masks([tuple(a.shape) for a in lora_as])
            masks_b = dare_masks([tuple(b.shape) for b in lora_bs])
            lora_a, lora_b = _per_factor(
                lora_as,
                lora_bs,
                _f32(weights_a),
                _f32(magnitudes),
                masks_a,
                masks_b,
                jax.random.fold_in(layer_key, 0),
                jax.random.fold_in(layer_key, 1),
                combination_type=combination_type,
                density=density,
                majority_sign_method=majority_sign_method,
            )
        # back to the Flax layout: A (in, r), B (r, out)
        dtype = lora[name]["lora_A"].dtype
        lora[name] = {**lora[name], "lora_A": lora_a.T.astype(dtype), "lora_B": lora_b.T.astype(dtype)}
    return {**tree, "lora": lora}


def _f32(values: Sequence[float]) -> jax.Array:
    return jnp.asarray(values, jnp.float32)


def _torch_factors(params: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(A (r, in), B (out, r))`` in fp32: PEFT's layout for linear and embedding layers alike."""
    return params["lora_A"].T.astype(jnp.float32), params["lora_B"].T.astype(jnp.float32)


def _delta_transposed(layer: LayerPlan) -> bool:
    """Whether PEFT's ``get_delta_weight`` is ``(in, out)``: GPT-2 ``Conv1D`` and embeddings."""
    return layer.info.kind == "embedding" or layer.info.torch_type == "Conv1D"


# Each layer's arithmetic is one jitted function: compiled once per layer shape instead of
# once per primitive and shape, which dominates the run time on CPU.


@functools.partial(jax.jit, static_argnames=("new_rank",))
def _cat(
    lora_as: list[jax.Array],
    lora_bs: list[jax.Array],
    weights: jax.Array,
    scalings: jax.Array,
    *,
    new_rank: int,
) -> tuple[jax.Array, jax.Array]:
    lora_a = jnp.concatenate([a * weights[i] * scalings[i] for i, a in enumerate(lora_as)], axis=0)
    lora_b = jnp.concatenate(lora_bs, axis=1)
    rank = lora_a.shape[0]
    # ranks below the new rank (rank_pattern) leave zero rows, as PEFT's in-place fill does
    full_a = jnp.zeros((new_rank, lora_a.shape[1]), jnp.float32).at[:rank].set(lora_a)
    full_b = jnp.zeros((lora_b.shape[0], new_rank), jnp.float32).at[:, :rank].set(lora_b)
    return full_a, full_b


@functools.partial(
    jax.jit,
    static_argnames=(
        "combination_type",
        "new_rank",
        "transposed",
        "clamp",
        "full_matrices",
        "density",
        "majority_sign_method",
    ),
)
def _svd(
    lora_as: list[jax.Array],
    lora_bs: list[jax.Array],
    scalings: jax.Array,
    weights: jax.Array,
    masks: list[jax.Array] | None,
    key: jax.Array,
    *,
    combination_type: str,
    new_rank: int,
    transposed: bool,
    clamp: float | None,
    full_matrices: bool,
    density: float | None,
    majority_sign_method: Any,
) -> tuple[jax.Array, jax.Array]:
    deltas = []
    for i, (lora_a, lora_b) in enumerate(zip(lora_as, lora_bs, strict=True)):
        delta = (lora_b @ lora_a) * scalings[i]  # (out, in)
        deltas.append(delta.T if transposed else delta)
    if combination_type == "svd":
        delta = merge_utils.task_arithmetic(deltas, weights)
    else:
        pruning = combination_type.removesuffix("_svd")
        delta = _pruned_sum(pruning, deltas, weights, density, majority_sign_method, key, masks)
    if transposed:
        delta = delta.T
    u, s, vh = jnp.linalg.svd(delta, full_matrices=full_matrices)
    lora_b = u[:, :new_rank] * s[:new_rank][None, :]
    lora_a = vh[:new_rank, :]
    if clamp is not None:
        high = jnp.quantile(jnp.concatenate([lora_b.reshape(-1), lora_a.reshape(-1)]), clamp)
        lora_b = jnp.clip(lora_b, -high, high)
        lora_a = jnp.clip(lora_a, -high, high)
    return lora_a, lora_b


@functools.partial(jax.jit, static_argnames=("combination_type", "density", "majority_sign_method"))
def _per_factor(
    lora_as: list[jax.Array],
    lora_bs: list[jax.Array],
    weights_a: jax.Array,
    weights_b: jax.Array,
    masks_a: list[jax.Array] | None,
    masks_b: list[jax.Array] | None,
    key_a: jax.Array,
    key_b: jax.Array,
    *,
    combination_type: str,
    density: float | None,
    majority_sign_method: Any,
) -> tuple[jax.Array, jax.Array]:
    """Merges the ``A``s and the ``B``s separately, each with its own weights."""
    merged = []
    for tensors, weights, masks, key in (
        (lora_as, weights_a, masks_a, key_a),
        (lora_bs, weights_b, masks_b, key_b),
    ):
        if combination_type == "linear":
            merged.append(merge_utils.task_arithmetic(tensors, weights))
        else:
            merged.append(
                _pruned_sum(combination_type, tensors, weights, density, majority_sign_method, key, masks)
            )
    return merged[0], merged[1]


def _pruned_sum(
    pruning: str,
    tensors: list[jax.Array],
    weights: jax.Array,
    density: float | None,
    majority_sign_method: Any,
    key: jax.Array,
    masks: list[jax.Array] | None,
) -> jax.Array:
    """The weighted sum of ``tensors`` after ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune``."""
    assert density is not None  # _check requires `density` for every pruning type
    if pruning == "ties":
        return merge_utils.ties(tensors, weights, density, majority_sign_method)
    if pruning == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density, key=key, masks=masks)
    if pruning == "dare_ties":
        return merge_utils.dare_ties(tensors, weights, density, majority_sign_method, key=key, masks=masks)
    return merge_utils.magnitude_prune(tensors, weights, density)
