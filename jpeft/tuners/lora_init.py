"""LoRA's initialisers: the starting ``lora_A``/``lora_B`` and, for some, a new base weight.

``LoraConfig.init_lora_weights`` picks one, with PEFT's names and numbers:

* ``True``: ``A`` as torch ``nn.Linear``'s default (Kaiming-uniform), ``B`` zero, so the
  adapter starts as a no-op.
* ``"gaussian"``: ``A ~ N(0, 1 / r^2)``, ``B`` zero.
* ``False``: ``A`` and ``B`` both ``nn.Linear``'s default: not a no-op (PEFT's test setting).
* ``"pissa"`` / ``"pissa_niter_K"``: ``B A`` is the top-``r`` singular part of ``W`` (exact
  SVD, or a randomised one with ``K`` subspace iterations); the base keeps ``W - s B A``.
* ``"olora"``: ``B A`` from the QR decomposition of ``W``; the base keeps ``W - s B A``.
* ``"loftq"``: LoftQ (:func:`jpeft.quant.loftq.loftq_init`); the base becomes the dequantized ``Q``.

The last three read the weight as PEFT does, in torch's ``(out, in)`` layout and float32, so
they work on the dense weight: a quantized base is decoded first and its new weight
quantized again with the same settings (LoftQ, which quantizes the base itself, refuses one).
Embeddings are the other way round from linear layers, as in PEFT: ``A`` zero and ``B``
normal (``False``: both normal). DoRA's magnitude starts as ``||W + s B A||`` per output
feature, the norm its forward divides by.

References:
  Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation", 2024.
  Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", 2024.
  Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", 2023.
  Halko et al., "Finding Structure with Randomness", 2011 (the randomised SVD).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jpeft.core.modules import ModuleInfo
from jpeft.errors import ConfigError
from jpeft.quant.formats import is_quantized
from jpeft.quant.loftq import loftq_init
from jpeft.tuners import lora_conv
from jpeft.tuners.lora_config import LoftQConfig, LoraConfig

if TYPE_CHECKING:  # lora imports this module, so its plan type is only an annotation here
    from jpeft.tuners.lora import LayerPlan


# --------------------------------------------------------------------------- layout and DoRA


def torch_weight(kernel: jax.Array, info: ModuleInfo) -> jax.Array:
    """The layer weight as torch's ``nn.Linear`` holds it: ``(out, in)``."""
    return kernel if info.kernel_transposed else kernel.T


def weight_io(kernel: jax.Array, info: ModuleInfo) -> jax.Array:
    """The weight laid out ``(in, out)`` (embeddings: ``(vocab, dim)``)."""
    return kernel.T if info.kernel_transposed else kernel


def dora_weight_norm(
    weight_in_out: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scaling: float
) -> jax.Array:
    """``||W + s A B||`` per output feature, for ``weight_in_out`` laid out ``(in, out)``."""
    adapted = weight_in_out.astype(lora_a.dtype) + scaling * (lora_a @ lora_b)
    return jnp.linalg.norm(adapted, axis=0)


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


# --------------------------------------------------------------------------- fresh inits (the base stays)

# (in_features, out_features, r, key_a, key_b) -> (lora_A (in, r), lora_B (r, out))
FreshInit = Callable[[int, int, int, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _kaiming_a_zero_b(
    in_f: int, out_f: int, r: int, key_a: jax.Array, key_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``True``: ``A`` as ``nn.Linear``'s default init, ``B`` zero."""
    del key_b
    return _uniform(key_a, (in_f, r), 1.0 / math.sqrt(in_f)), jnp.zeros((r, out_f), jnp.float32)


def _gaussian_a_zero_b(
    in_f: int, out_f: int, r: int, key_a: jax.Array, key_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``"gaussian"``: ``A ~ N(0, 1 / r^2)``, ``B`` zero."""
    del key_b
    return jax.random.normal(key_a, (in_f, r), jnp.float32) / r, jnp.zeros((r, out_f), jnp.float32)


def _both_random(
    in_f: int, out_f: int, r: int, key_a: jax.Array, key_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``False``: ``A`` and ``B`` both keep ``nn.Linear``'s default init."""
    return _uniform(key_a, (in_f, r), 1.0 / math.sqrt(in_f)), _uniform(key_b, (r, out_f), 1.0 / math.sqrt(r))


# --------------------------------------------------------------------------- inits that rewrite the base

# (weight (out, in) float32, layer, config, key) -> (lora_A (r, in), lora_B (out, r), new weight (out, in)),
# all in torch's layout, as PEFT computes them
WeightInit = Callable[[jax.Array, "LayerPlan", LoraConfig, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def _svd_lowrank(
    weight: jax.Array, r: int, niter: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Randomised rank-``r`` SVD (Halko et al.) with ``niter`` subspace iterations."""
    m, n = weight.shape
    q = min(r + 10, m, n)
    omega = jax.random.normal(key, (n, q), weight.dtype)
    basis, _ = jnp.linalg.qr(weight @ omega)
    for _ in range(niter):
        basis, _ = jnp.linalg.qr(weight.T @ basis)
        basis, _ = jnp.linalg.qr(weight @ basis)
    u_small, s, vh = jnp.linalg.svd(basis.T @ weight, full_matrices=False)
    return (basis @ u_small)[:, :r], s[:r], vh[:r]


def _pissa(
    weight: jax.Array, layer: LayerPlan, config: LoraConfig, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``"pissa"`` / ``"pissa_niter_K"``: the top-``r`` singular part moves into ``B A``."""
    r, s, init = layer.r, layer.scaling, config.init_lora_weights
    if init == "pissa":
        u, sv, vh = jnp.linalg.svd(weight, full_matrices=False)
        u, sv, vh = u[:, :r], sv[:r], vh[:r]
    else:
        u, sv, vh = _svd_lowrank(weight, r, int(str(init).split("_niter_")[-1]), key)
    sv = sv / s
    lora_a_t = jnp.sqrt(sv)[:, None] * vh  # (r, in)
    lora_b_t = u * jnp.sqrt(sv)[None, :]  # (out, r)
    return lora_a_t, lora_b_t, weight - s * lora_b_t @ lora_a_t


def _olora(
    weight: jax.Array, layer: LayerPlan, config: LoraConfig, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``"olora"``: ``B`` the first ``r`` columns of ``Q``, ``A`` the first ``r`` rows of ``R``."""
    del config, key
    q, rr = jnp.linalg.qr(weight)
    lora_a_t, lora_b_t = rr[: layer.r], q[:, : layer.r]
    return lora_a_t, lora_b_t, weight - layer.scaling * lora_b_t @ lora_a_t


def _loftq(
    weight: jax.Array, layer: LayerPlan, config: LoraConfig, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``"loftq"``: the base becomes LoftQ's dequantized ``Q``."""
    del key
    loftq = config.loftq_config  # LoraConfig stores the dict form
    loftq = loftq if isinstance(loftq, LoftQConfig) else LoftQConfig(**loftq)
    q, lora_a_t, lora_b_t = loftq_init(weight, bits=loftq.loftq_bits, iters=loftq.loftq_iter, rank=layer.r)
    return lora_a_t, lora_b_t, q


# --------------------------------------------------------------------------- dispatch

_FRESH_INITS: dict[bool | str, FreshInit] = {
    True: _kaiming_a_zero_b,
    "gaussian": _gaussian_a_zero_b,
    False: _both_random,
}
_WEIGHT_INITS: dict[bool | str, WeightInit] = {"pissa": _pissa, "olora": _olora, "loftq": _loftq}


def _init_kind(init: bool | str) -> bool | str:
    """``init_lora_weights`` with ``"pissa_niter_K"`` folded into ``"pissa"``."""
    return "pissa" if isinstance(init, str) and init.startswith("pissa") else init


def init_linear(
    layer: LayerPlan, config: LoraConfig, kernel: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Returns ``(lora_A (in, r), lora_B (r, out), new kernel or None)`` for a dense ``kernel``."""
    info = layer.info
    key_a, key_b = jax.random.split(key)
    kind = _init_kind(config.init_lora_weights)
    if kind in _WEIGHT_INITS:
        weight = torch_weight(kernel, info).astype(jnp.float32)  # (out, in), as PEFT decomposes it
        lora_a_t, lora_b_t, new_weight = _WEIGHT_INITS[kind](weight, layer, config, key_a)
        new_kernel = (new_weight if info.kernel_transposed else new_weight.T).astype(kernel.dtype)
        return lora_a_t.T, lora_b_t.T, new_kernel
    in_f, out_f = info.features
    lora_a, lora_b = _FRESH_INITS[kind](in_f, out_f, layer.r, key_a, key_b)
    return lora_a, lora_b, None


def init_embedding(layer: LayerPlan, config: LoraConfig, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(lora_A (vocab, r), lora_B (r, dim))``: ``A`` zero (``False``: normal), ``B`` normal."""
    (vocab, dim), r = layer.info.features, layer.r
    key_a, key_b = jax.random.split(key)
    lora_b = jax.random.normal(key_b, (r, dim), jnp.float32)
    if config.init_lora_weights is False:
        return jax.random.normal(key_a, (vocab, r), jnp.float32), lora_b
    return jnp.zeros((vocab, r), jnp.float32), lora_b


def init_lora_bias(layer: LayerPlan, config: LoraConfig, key: jax.Array) -> jax.Array:
    """``lora_B``'s bias: zero, or ``nn.Linear``'s default init with ``init_lora_weights=False``."""
    _, out_f = layer.info.features
    if config.init_lora_weights is False:
        return _uniform(jax.random.fold_in(key, 7), (out_f,), 1.0 / math.sqrt(layer.r))
    return jnp.zeros((out_f,), jnp.float32)


def init_layer(
    layer: LayerPlan, config: LoraConfig, stored: Any, key: jax.Array
) -> tuple[dict[str, jax.Array], Any]:
    """One layer's adapter entry, and its new stored weight (or ``None`` if the base stays).

    Args:
      layer: the layer's plan.
      config: the adapter's config.
      stored: the base weight as stored: an array, or a ``QuantizedArray`` on a quantized base.
      key: this layer's key.

    Returns:
      ``({"lora_A", "lora_B", ["lora_B_bias"], ["lora_magnitude_vector"]}, new weight or None)``;
      the new weight is stored like the old one (quantized again on a quantized base).
    """
    info, loftq = layer.info, config.init_lora_weights == "loftq"
    if loftq and is_quantized(stored):
        raise ConfigError(
            f"init_lora_weights='loftq' on {info.name}, whose kernel is already quantized: LoftQ quantizes "
            "the base itself. Apply it to the full-precision model (then `jpeft.quantize_model` "
            "reproduces LoftQ's Q exactly)."
        )
    if loftq and info.kind == "embedding":
        raise ConfigError(
            f"init_lora_weights='loftq' targets embedding {info.name}; LoftQ applies to linear layers (PEFT's "
            "embedding LoftQ path fails). Leave embeddings out of `target_modules`."
        )
    kernel = (
        stored.dequantize(stored.dtype) if is_quantized(stored) else stored
    )  # inits read the decoded weight
    new_stored = None
    if info.kind == "embedding":
        lora_a, lora_b = init_embedding(layer, config, key)
        entry = {"lora_A": lora_a, "lora_B": lora_b}
    elif info.kind == "conv":
        lora_a, lora_b = lora_conv.init(info, layer.r, config.init_lora_weights, key)
        entry = {"lora_A": lora_a, "lora_B": lora_b}
        if config.lora_bias:
            entry["lora_B_bias"] = init_lora_bias(layer, config, key)
    else:
        lora_a, lora_b, new_kernel = init_linear(layer, config, kernel, key)
        entry = {"lora_A": lora_a, "lora_B": lora_b}
        if new_kernel is not None:
            new_stored = kernel = new_kernel
            if is_quantized(stored):  # PiSSA/OLoRA residual, quantized again
                new_stored = stored.replace_boxed(new_kernel)
                kernel = new_stored.dequantize(stored.dtype)
        if config.lora_bias:
            entry["lora_B_bias"] = init_lora_bias(layer, config, key)
    if config.use_dora:
        entry["lora_magnitude_vector"] = dora_weight_norm(
            weight_io(kernel, info), entry["lora_A"], entry["lora_B"], layer.scaling
        )
    return entry, new_stored
