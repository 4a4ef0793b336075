"""LoRA on convolutions, in PEFT's layout (``lora.layer.Conv{1,2,3}d``).

PEFT adapts a ``Conv`` base with two convolutions: ``lora_A`` has the base's window, stride and
padding and maps ``in -> r`` channels; ``lora_B`` is a ``1 x ... x 1`` convolution ``r -> out``.
The contribution is ``s * lora_B(lora_A(dropout(x)))``, and its merged form adds
``s * sum_r A[..., i, r] B[r, o]`` to the kernel (the composition of a windowed and a pointwise
convolution is one windowed convolution with the same stride and padding, so merging is exact).

jpeft keeps both factors in Flax's channels-last kernel layout: ``lora_A`` ``(*window, in, r)``,
``lora_B`` ``(*ones, r, out)``; torch's ``(r, in, *window)`` / ``(out, r, *ones)`` are one axis
permutation away (:func:`torch_perm`). Inputs are channels last, ``(N, *spatial, C)``, as
``nnx.Conv`` takes them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.core.modules import ModuleInfo
from jpeft.errors import ConfigError

_SPATIAL = "DHW"


def torch_perm(ndim: int) -> tuple[int, ...]:
    """The permutation of a channels-last kernel ``(*window, in, out)`` to torch's ``(out, in, *window)``."""
    n = ndim - 2
    return (n + 1, n, *range(n))


def check(info: ModuleInfo, config: Any) -> None:
    """Refuses the LoRA options PEFT's conv layer does not have (or jpeft does not reproduce) on ``info``."""
    init = config.init_lora_weights
    if config.use_dora:
        raise ConfigError(f"use_dora=True on convolution {info.name}: jpeft's DoRA adapts linear layers only.")
    if isinstance(init, str) and init != "gaussian":
        raise ConfigError(
            f"init_lora_weights={init!r} on convolution {info.name}: PiSSA, OLoRA and LoftQ decompose a "
            "linear weight; use True, False or 'gaussian' for convolutions."
        )


def init(info: ModuleInfo, r: int, init_weights: Any, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(lora_A (*window, in, r), lora_B (*ones, r, out))`` as PEFT initialises its two convolutions.

    ``True``: ``A`` torch's conv default (Kaiming-uniform, bound ``1/sqrt(fan_in)``), ``B`` zero;
    ``"gaussian"``: ``A ~ N(0, 1/r^2)``; ``False``: ``B`` also torch's default (fan-in ``r``).
    """
    assert info.conv is not None, info.name
    window = info.conv.kernel_size
    in_f, out_f = info.features
    fan_in = in_f * math.prod(window)
    key_a, key_b = jax.random.split(key)
    a_shape, b_shape = (*window, in_f, r), (*(1 for _ in window), r, out_f)
    if init_weights == "gaussian":
        lora_a = jax.random.normal(key_a, a_shape, jnp.float32) / r
    else:
        bound = 1.0 / math.sqrt(fan_in)
        lora_a = jax.random.uniform(key_a, a_shape, jnp.float32, -bound, bound)
    if init_weights is False:
        bound = 1.0 / math.sqrt(r)
        lora_b = jax.random.uniform(key_b, b_shape, jnp.float32, -bound, bound)
    else:
        lora_b = jnp.zeros(b_shape, jnp.float32)
    return lora_a, lora_b


def pointwise(lora_b: jax.Array) -> jax.Array:
    """``lora_B`` as the ``(r, out)`` matrix it is."""
    return lora_b.reshape(lora_b.shape[-2:])


def contribution(info: ModuleInfo, x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
    """``lora_B(lora_A(x))`` for a channels-last input ``(N, *spatial, in)`` (or unbatched ``(*spatial, in)``)."""
    assert info.conv is not None, info.name
    n = len(info.conv.kernel_size)
    unbatched = x.ndim == n + 1
    if unbatched:
        x = x[None]
    lead = x.shape[: x.ndim - n - 1]
    x = x.reshape((-1, *x.shape[x.ndim - n - 1 :]))  # any batch dimensions, as nnx.Conv takes them
    spatial = _SPATIAL[-n:]
    numbers = jax.lax.conv_dimension_numbers(
        x.shape, lora_a.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    )
    hidden = jax.lax.conv_general_dilated(
        x.astype(lora_a.dtype), lora_a, info.conv.strides, info.conv.padding, dimension_numbers=numbers
    )
    out = hidden @ pointwise(lora_b).astype(hidden.dtype)
    out = out.reshape((*lead, *out.shape[1:]))
    return out[0] if unbatched else out
