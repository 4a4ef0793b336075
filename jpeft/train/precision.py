"""Mixed precision: compute in bf16/fp16, keep fp32 adapter master weights.

The frozen base is cast once to the compute dtype (it never updates, so nothing is
lost). Trainable leaves stay fp32 in the optimizer and are cast inside the loss, so
their gradients arrive in fp32. fp16 needs dynamic loss scaling (its range is small):
the loss is multiplied by ``scale`` before differentiation, gradients are divided by
it, a step with non-finite gradients is skipped and halves the scale, and every
``period`` good steps the scale doubles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jpeft.quant.formats import is_quantized

PyTree = Any


class LossScale(NamedTuple):
    scale: jax.Array
    good_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class Policy:
    """What dtype the forward runs in, and whether the loss is scaled.

    Attributes:
      compute_dtype: dtype of the base weights and adapter weights in the forward.
      loss_scaling: dynamic loss scaling (on by default for float16).
      initial_scale, period, factor: the loss-scale schedule.
    """

    compute_dtype: Any = jnp.float32
    loss_scaling: bool | None = None
    initial_scale: float = 2.0**15
    period: int = 2000
    factor: float = 2.0

    @classmethod
    def from_name(cls, name: str | Policy | None) -> Policy:
        if isinstance(name, Policy):
            return name
        dtypes = {
            None: jnp.float32,
            "fp32": jnp.float32,
            "float32": jnp.float32,
            "bf16": jnp.bfloat16,
            "bfloat16": jnp.bfloat16,
            "fp16": jnp.float16,
            "float16": jnp.float16,
        }
        if name not in dtypes:
            raise ValueError(f"unknown precision {name!r}; use 'fp32', 'bf16' or 'fp16'.")
        return cls(compute_dtype=dtypes[name])

    @property
    def scales_loss(self) -> bool:
        if self.loss_scaling is not None:
            return self.loss_scaling
        return jnp.dtype(self.compute_dtype) == jnp.float16

    def cast(self, tree: PyTree) -> PyTree:
        """Floating leaves to the compute dtype; others (ints, None holes) unchanged."""
        dtype = jnp.dtype(self.compute_dtype)

        def cast_leaf(x: Any) -> Any:
            if is_quantized(x):  # stays quantized; decodes to the compute dtype
                return dataclasses.replace(x, compute_dtype=dtype) if x.compute_dtype != dtype else x
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
                return x.astype(dtype)
            return x

        return jax.tree.map(cast_leaf, tree, is_leaf=is_quantized)

    def initial_loss_scale(self) -> LossScale | None:
        if not self.scales_loss:
            return None
        return LossScale(jnp.asarray(self.initial_scale, jnp.float32), jnp.asarray(0, jnp.int32))

    def update_loss_scale(self, state: LossScale, finite: jax.Array) -> LossScale:
        grown = state.good_steps + 1 >= self.period
        scale = jnp.where(
            finite,
            jnp.where(grown, state.scale * self.factor, state.scale),
            jnp.maximum(state.scale / self.factor, 1.0),
        )
        good = jnp.where(finite & ~grown, state.good_steps + 1, 0)
        return LossScale(scale.astype(jnp.float32), good.astype(jnp.int32))


def all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
