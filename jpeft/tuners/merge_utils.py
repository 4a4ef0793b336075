"""Task arithmetic on adapter tensors: TIES, DARE and magnitude pruning, as PEFT computes them.

Every function takes a list of same-shaped *task tensors* (one per adapter) and a weight per
tensor, and returns one merged tensor. They are pure ``jax.numpy`` functions matching
``peft/utils/merge_utils.py`` value for value; the only randomness (DARE's drop masks) comes
from an explicit ``key`` or from masks the caller passes.

- ``task_arithmetic``: ``sum_i w_i t_i``.
- ``magnitude_prune``: keep each tensor's ``density`` fraction of largest magnitudes, then sum.
- ``ties``: magnitude pruning, a majority sign per entry, then the mean of the weighted entries
  that agree with it ("disjoint merge").
- ``dare_linear`` / ``dare_ties``: random pruning rescaled by ``1 / density`` instead of
  magnitude pruning.

References:
  Ilharco et al., "Editing Models with Task Arithmetic", 2023.
  Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", 2023.
  Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
  Free Lunch" (DARE), 2024.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

MajoritySignMethod = Literal["total", "frequency"]


def _stack_weights(weights: jax.Array | Sequence[float], stacked: jax.Array) -> jax.Array:
    """``weights`` as a float array broadcastable against ``stacked`` (task index first)."""
    weights = jnp.asarray(weights, dtype=stacked.dtype)
    if weights.shape != stacked.shape[:1]:
        raise ValueError(
            f"got {weights.shape[0] if weights.ndim else 'a scalar'} weight(s) for {stacked.shape[0]} task "
            "tensors; pass one weight per tensor."
        )
    return weights.reshape(weights.shape + (1,) * (stacked.ndim - 1))


def magnitude_based_pruning(tensor: jax.Array, density: float) -> jax.Array:
    """Keeps the ``int(density * tensor.size)`` entries of largest magnitude; zeros the rest.

    Args:
      tensor: the tensor to prune.
      density: the fraction of entries to keep, in ``[0, 1]``.

    Returns:
      ``tensor`` with all but its largest-magnitude entries set to zero.
    """
    k = int(density * tensor.size)
    flat = tensor.reshape(-1)
    if k <= 0:
        return jnp.zeros_like(tensor)
    _, keep = jax.lax.top_k(jnp.abs(flat), k)
    mask = jnp.zeros(flat.shape, tensor.dtype).at[keep].set(1)
    return tensor * mask.reshape(tensor.shape)


def random_pruning(
    tensor: jax.Array,
    density: float,
    rescale: bool,
    *,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Keeps each entry with probability ``density`` (DARE's drop step).

    Args:
      tensor: the tensor to prune.
      density: the probability of keeping an entry, in ``[0, 1]``.
      rescale: divide the kept entries by ``density`` so the expected value is unchanged.
      key: PRNG key for the Bernoulli mask (needed unless ``mask`` is given).
      mask: an explicit keep mask (``1``/``True`` keeps), shaped like ``tensor``; used
        instead of drawing one, e.g. to reproduce another implementation's draw.

    Returns:
      The pruned (and possibly rescaled) tensor.
    """
    if mask is None:
        if key is None:
            raise ValueError("random pruning needs a PRNG key: pass `key=jax.random.key(...)` (or `mask=`).")
        mask = jax.random.bernoulli(key, density, tensor.shape)
    mask = jnp.asarray(mask)
    if mask.shape != tensor.shape:
        raise ValueError(f"`mask` has shape {mask.shape} but the tensor has shape {tensor.shape}.")
    pruned = tensor * mask.astype(tensor.dtype)
    return pruned / density if rescale else pruned


def prune(
    tensor: jax.Array,
    density: float,
    method: Literal["magnitude", "random"],
    rescale: bool = False,
    *,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Prunes ``tensor`` by magnitude or at random; ``density >= 1`` keeps it whole (with a warning).

    Args:
      tensor: the tensor to prune.
      density: the fraction of entries to keep; ``>= 1`` warns and returns ``tensor``.
      method: ``"magnitude"`` (keep the largest) or ``"random"`` (DARE).
      rescale: for ``"random"``, divide the kept entries by ``density``.
      key: PRNG key for ``"random"``.
      mask: explicit keep mask for ``"random"`` (instead of ``key``).

    Returns:
      The pruned tensor.
    """
    if density >= 1:
        warnings.warn(
            f"The density {density} is greater than or equal to 1, no pruning will be performed.",
            stacklevel=2,
        )
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale, key=key, mask=mask)
    raise ValueError(f"Unknown method {method!r}; use 'magnitude' or 'random'.")


def calculate_majority_sign_mask(tensor: jax.Array, method: MajoritySignMethod = "total") -> jax.Array:
    """Where each task's entry has the elected sign; tasks are stacked on axis 0.

    The elected sign of an entry is the sign of the sum over tasks of the values
    (``"total"``) or of their signs (``"frequency"``); ties elect ``+``. Zero entries never
    agree.

    Args:
      tensor: stacked task tensors, task index first.
      method: ``"total"`` or ``"frequency"``.

    Returns:
      A boolean array shaped like ``tensor``.
    """
    sign = jnp.sign(tensor)
    if method == "total":
        sign_magnitude = tensor.sum(axis=0)
    elif method == "frequency":
        sign_magnitude = sign.sum(axis=0)
    else:
        raise ValueError(
            f'Unimplemented mask method "{method}": `majority_sign_method` must be "total" or "frequency".'
        )
    majority_sign = jnp.where(sign_magnitude >= 0, 1, -1).astype(sign.dtype)
    return sign == majority_sign


def disjoint_merge(task_tensors: jax.Array, majority_sign_mask: jax.Array) -> jax.Array:
    """The mean over tasks of the entries selected by ``majority_sign_mask`` (zero where none is).

    Args:
      task_tensors: stacked (weighted) task tensors, task index first.
      majority_sign_mask: :func:`calculate_majority_sign_mask`'s output.

    Returns:
      The merged tensor (task axis removed).
    """
    mask = majority_sign_mask.astype(task_tensors.dtype)
    mixed = (task_tensors * mask).sum(axis=0)
    return mixed / jnp.maximum(mask.sum(axis=0), 1.0)


def task_arithmetic(task_tensors: Sequence[jax.Array], weights: jax.Array | Sequence[float]) -> jax.Array:
    """``sum_i weights[i] * task_tensors[i]``.

    Args:
      task_tensors: same-shaped tensors, one per task.
      weights: one weight per task.

    Returns:
      The merged tensor.

    Example:
      >>> task_arithmetic([a, b], [0.7, 0.3])
    """
    stacked = jnp.stack(list(task_tensors), axis=0)
    return (stacked * _stack_weights(weights, stacked)).sum(axis=0)


def magnitude_prune(
    task_tensors: Sequence[jax.Array], weights: jax.Array | Sequence[float], density: float
) -> jax.Array:
    """Magnitude-prunes each task tensor to ``density``, then takes the weighted sum.

    Args:
      task_tensors: same-shaped tensors, one per task.
      weights: one weight per task.
      density: the fraction of each tensor's entries to keep.

    Returns:
      The merged tensor.
    """
    pruned = [prune(tensor, density, method="magnitude") for tensor in task_tensors]
    return task_arithmetic(pruned, weights)


def ties(
    task_tensors: Sequence[jax.Array],
    weights: jax.Array | Sequence[float],
    density: float,
    majority_sign_method: MajoritySignMethod = "total",
) -> jax.Array:
    """TIES merging: magnitude pruning, sign election, disjoint mean of the weighted tensors.

    The sign is elected on the pruned tensors *before* weighting, as PEFT does.

    Args:
      task_tensors: same-shaped tensors, one per task.
      weights: one weight per task.
      density: the fraction of each tensor's entries to keep.
      majority_sign_method: ``"total"`` or ``"frequency"``.

    Returns:
      The merged tensor.
    """
    pruned = [prune(tensor, density, method="magnitude") for tensor in task_tensors]
    return _elect_and_merge(pruned, weights, majority_sign_method)


def _dare_prune(
    task_tensors: Sequence[jax.Array],
    density: float,
    key: jax.Array | None,
    masks: Sequence[jax.Array] | None,
) -> list[jax.Array]:
    if masks is not None and len(masks) != len(task_tensors):
        raise ValueError(f"got {len(masks)} masks for {len(task_tensors)} task tensors; pass one per tensor.")
    keys: Sequence[jax.Array | None] = [None] * len(task_tensors)
    if masks is None and key is not None:
        keys = list(jax.random.split(key, len(task_tensors)))
    return [
        prune(
            tensor,
            density,
            method="random",
            rescale=True,
            key=keys[i],
            mask=None if masks is None else masks[i],
        )
        for i, tensor in enumerate(task_tensors)
    ]


def dare_linear(
    task_tensors: Sequence[jax.Array],
    weights: jax.Array | Sequence[float],
    density: float,
    *,
    key: jax.Array | None = None,
    masks: Sequence[jax.Array] | None = None,
) -> jax.Array:
    """DARE: random pruning with ``1 / density`` rescaling, then the weighted sum.

    Args:
      task_tensors: same-shaped tensors, one per task.
      weights: one weight per task.
      density: the probability of keeping each entry.
      key: PRNG key for the drop masks (split into one key per tensor).
      masks: explicit keep masks, one per tensor (instead of ``key``).

    Returns:
      The merged tensor.
    """
    return task_arithmetic(_dare_prune(task_tensors, density, key, masks), weights)


def dare_ties(
    task_tensors: Sequence[jax.Array],
    weights: jax.Array | Sequence[float],
    density: float,
    majority_sign_method: MajoritySignMethod = "total",
    *,
    key: jax.Array | None = None,
    masks: Sequence[jax.Array] | None = None,
) -> jax.Array:
    """DARE pruning followed by TIES' sign election and disjoint mean.

    Args:
      task_tensors: same-shaped tensors, one per task.
      weights: one weight per task.
      density: the probability of keeping each entry.
      majority_sign_method: ``"total"`` or ``"frequency"``.
      key: PRNG key for the drop masks (split into one key per tensor).
      masks: explicit keep masks, one per tensor (instead of ``key``).

    Returns:
      The merged tensor.
    """
    pruned = _dare_prune(task_tensors, density, key, masks)
    return _elect_and_merge(pruned, weights, majority_sign_method)


def _elect_and_merge(
    pruned: Sequence[jax.Array], weights: jax.Array | Sequence[float], method: MajoritySignMethod
) -> jax.Array:
    stacked = jnp.stack(list(pruned), axis=0)
    majority_sign_mask = calculate_majority_sign_mask(stacked, method=method)
    weighted = stacked * _stack_weights(weights, stacked)
    return disjoint_merge(weighted, majority_sign_mask)
