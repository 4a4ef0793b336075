"""bfloat16 matrix products that accumulate in float32, so XLA:CPU runs them on the bf16 units.

A ``bf16 x bf16 -> bf16`` dot is not one XLA:CPU's matmul library takes: the compiler widens it to
a ``float32`` dot, then rounds the result, so a bf16 model on the CPU multiplies at float32 speed.
Asked for a float32 result (``preferred_element_type``), the same dot stays in bfloat16 and runs
on the CPU's bf16 matrix instructions (AMX, AVX512-BF16): 3-5x the float32 rate on the shapes of a
small transformer (``benchmarks/README.md``). Rounding that result to bfloat16 gives what the
widened dot gave, up to the order of the float32 sums.

:func:`dot` is that form of ``lax.dot_general``; :func:`dense` is ``x @ kernel`` whose backward
takes the same form (autodiff of :func:`dot` would multiply the float32 cotangent by the widened
weight). Both apply only on the CPU (``lax.platform_dependent``): other backends already
accumulate bf16 products in float32 and write bf16 directly, so they get the plain dot.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

DotDims = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def accumulates(*operands: Any) -> bool:
    """Whether the operands are all bfloat16, the case the CPU form is for."""
    return all(getattr(x, "dtype", None) == jnp.bfloat16 for x in operands)


def dot(lhs: jax.Array, rhs: jax.Array, dims: DotDims, precision: Any = None) -> jax.Array:
    """``lax.dot_general(lhs, rhs, dims, precision)``, accumulated in float32 on the CPU for bf16 operands.

    The result has the operands' dtype, as ``lax.dot_general``'s does. Differentiable in both
    modes (its backward dots are autodiff's, in float32); use :func:`dense` where speed of the
    backward matters.
    """
    if not accumulates(lhs, rhs):
        return lax.dot_general(lhs, rhs, dims, precision=precision)

    def widened(lhs, rhs):
        return lax.dot_general(
            lhs, rhs, dims, precision=precision, preferred_element_type=jnp.float32
        ).astype(lhs.dtype)

    def plain(lhs, rhs):
        return lax.dot_general(lhs, rhs, dims, precision=precision)

    return lax.platform_dependent(lhs, rhs, cpu=widened, default=plain)


def dense(
    x: jax.Array, kernel: jax.Array, *, kernel_axis: int = 0, precision: Any = None, train: bool = True
) -> jax.Array:
    """``x`` contracted on its last axis with axis ``kernel_axis`` of a 2-D ``kernel``.

    ``kernel_axis=0`` is a Flax ``Dense`` kernel ``(in, out)``; ``1`` a torch-layout ``(out, in)``
    one (transformers' ``FlaxConv1D``). For bf16 operands in training (``train=True``) this is a
    ``custom_vjp`` whose backward dots also accumulate in float32 on the CPU; it is then
    reverse-mode only, so evaluation forwards (``train=False``) use :func:`dot`, which ``jax.jvp``
    passes through.
    """
    dims = (((x.ndim - 1,), (kernel_axis,)), ((), ()))
    if not accumulates(x, kernel) or kernel.ndim != 2 or x.ndim < 1 or not train:
        return dot(x, kernel, dims, precision)
    return _dense(x, kernel, kernel_axis, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x: jax.Array, kernel: jax.Array, kernel_axis: int, precision: Any) -> jax.Array:
    return dot(x, kernel, (((x.ndim - 1,), (kernel_axis,)), ((), ())), precision)


def _forward(x, kernel, kernel_axis, precision):
    return _dense(x, kernel, kernel_axis, precision), (x, kernel)


def _backward(kernel_axis, precision, residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    # dx = dy @ kernel.T: dy's features against the kernel's output axis
    dx = dot(dy, kernel, (((dy.ndim - 1,), (1 - kernel_axis,)), ((), ())), precision)
    # the kernel's gradient: dead code, removed by XLA, when the kernel is frozen
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    pair = (x2, dy2) if kernel_axis == 0 else (dy2, x2)
    dk = dot(*pair, (((0,), (0,)), ((), ())), precision)
    return dx, dk.astype(kernel.dtype)


_dense.defvjp(_forward, _backward)

__all__ = ["accumulates", "dense", "dot"]
