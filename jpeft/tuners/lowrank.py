"""The unmerged low-rank product ``((x @ a) * scale) @ b`` of LoRA-style adapters, for training.

Its value and gradients are the expression's. What differs is how the backward pass forms the
adapter's weight gradients, ``a``'s ``x.T @ dh`` and ``b``'s ``h.T @ dy``: each contracts over the
tokens, the leading axis of a large activation. Left to autodiff, XLA:CPU sends those dots to its
generic dot emitter rather than the library kernels the other matmuls use (it also copies ``dy``
transposed first), and a Llama-shaped 10M-parameter step spent ~6% of its time there. On the CPU
the backward here writes them as plain ``(r, tokens) @ (tokens, features)`` products of small
transposes, held apart from the dots by ``optimization_barrier`` so XLA cannot fold the transposes
back in; other platforms get exactly autodiff's dots (``lax.platform_dependent``).

It is a ``custom_vjp``, so forward-mode autodiff (``jax.jvp``, ``jacfwd``) cannot pass through it:
the tuners use it only for training forwards (``train=True``) and the plain expression otherwise.
"""

from __future__ import annotations

import functools
import numbers

import jax


def plain(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """The expression itself, differentiated by JAX (forward mode included)."""
    return ((x @ a) * scale) @ b


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``((x @ a) * scale) @ b`` for ``x (..., in)``, ``a (in, r)``, ``b (r, out)`` of one dtype.

    Falls back to the plain expression when the fast backward does not apply (a traced
    ``scale``, mixed dtypes, other ranks).
    """
    if (
        not isinstance(scale, numbers.Real)
        or a.ndim != 2
        or b.ndim != 2
        or x.ndim < 1
        or not (x.dtype == a.dtype == b.dtype)
    ):
        return plain(x, a, b, scale)
    return _low_rank(x, a, b, float(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    return plain(x, a, b, scale)


def _forward(x, a, b, scale):
    hs = (x @ a) * scale  # (..., r): kept for b's gradient, as autodiff would keep x @ a
    return hs @ b, (x, a, b, hs)


def _weight_grads(x2, dy2, hs2, dh):
    """``a``'s and ``b``'s gradients as autodiff writes them (``x2.T @ dh``, ``hs2.T @ dy2``)."""
    return x2.T @ dh, hs2.T @ dy2


def _weight_grads_cpu(x2, dy2, hs2, dh):
    """The same products as ``(r, n) @ (n, features)`` dots of materialised small transposes."""
    barrier = jax.lax.optimization_barrier
    da = barrier(barrier(dh.T) @ x2).T
    db = barrier(hs2.T) @ dy2
    return da, db


def _backward(scale, residuals, dy):
    x, a, b, hs = residuals
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1]).astype(b.dtype)
    hs2 = hs.reshape(-1, hs.shape[-1])
    dh = (dy2 @ b.T) * scale  # (n, r)
    da, db = jax.lax.platform_dependent(x2, dy2, hs2, dh, cpu=_weight_grads_cpu, default=_weight_grads)
    dx = (dh @ a.T).reshape(x.shape)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_low_rank.defvjp(_forward, _backward)


def product(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, *, train: bool) -> jax.Array:
    """:func:`low_rank` in training, :func:`plain` (forward-mode differentiable) otherwise."""
    return low_rank(x, a, b, scale) if train else plain(x, a, b, scale)


__all__ = ["low_rank", "plain", "product"]
