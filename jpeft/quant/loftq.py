"""LoftQ: LoRA initialised so that ``Q + B A`` approximates the full-precision weight.

Alternates quantizing the part of ``W`` the low-rank term does not explain with a rank-``r`` SVD
of what quantization leaves over (PEFT's ``loftq_init``, PEFT_REFERENCE.md section 1.5)::

    res = W
    repeat iters times:
        Q = dequant(quant(res))          # NF4 in blocks of 64 (4 bit), LLM.int8 rows (8 bit)
        U S Vh = svd(W - Q);  L = U_r sqrt(S_r);  R = sqrt(S_r) Vh_r
        res = W - L R                    # skipped after the last iteration
    lora_A = R (r, in), lora_B = L (out, r), and the base weight becomes Q.

Everything runs in float32 in torch's ``(out, in)`` layout, as PEFT does. The 4-bit step is
bitsandbytes' ``Params4bit(quant_type="nf4", compress_statistics=False)`` and the 8-bit step is
``Int8Params`` (round to float16, one absmax per row, ``round(127 x / absmax)``, dequantized as
``q * absmax * (1/127)``), both reproduced exactly by :func:`jpeft.quant.formats.quantize` (CPU
bitsandbytes numbers; PEFT runs them on CUDA, whose kernels may round a value sitting exactly on a
code boundary the other way). The SVD is JAX's, so ``L`` and ``R`` agree with PEFT's to float32
rounding, up to the sign of each singular-vector pair, which cancels in ``L R``.
As in PEFT, the LoRA ``scaling`` is not compensated: ``W ~ Q + B A`` holds when ``lora_alpha == r``.

References:
  Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", 2023.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import jax
import jax.numpy as jnp

from jpeft.errors import ConfigError
from jpeft.quant.formats import QuantizedArray, quantize


def low_rank(matrix: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """``(L, R)`` with ``L = U_r sqrt(S_r)`` ``(m, r)`` and ``R = sqrt(S_r) Vh_r`` ``(r, n)``."""
    u, s, vh = jnp.linalg.svd(matrix, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@overload
def loftq_init(
    weight: Any,
    *,
    bits: int,
    iters: int,
    rank: int,
    blocksize: int = ...,
    quant_type: str = ...,
    return_quantized: Literal[False] = ...,
) -> tuple[jax.Array, jax.Array, jax.Array]: ...


@overload
def loftq_init(
    weight: Any,
    *,
    bits: int,
    iters: int,
    rank: int,
    blocksize: int = ...,
    quant_type: str = ...,
    return_quantized: Literal[True],
) -> tuple[jax.Array, jax.Array, jax.Array, QuantizedArray]: ...


def loftq_init(
    weight: Any,
    *,
    bits: int,
    iters: int,
    rank: int,
    blocksize: int = 64,
    quant_type: str = "nf4",
    return_quantized: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array, QuantizedArray]:
    """LoftQ initialisation of one weight (PEFT's ``loftq_init``). Jittable with static keywords.

    Args:
      weight: the weight in torch layout ``(out, in)`` (transpose a Flax ``Dense`` kernel first).
      bits: 4 (``quant_type``, NF4 by default, as PEFT) or 8 (int8, LLM.int8 rows).
      iters: alternating steps, at least 1 (PEFT's ``loftq_iter``).
      rank: LoRA rank ``r``.
      blocksize: 4-bit absmax block size (PEFT uses bitsandbytes' 64).
      quant_type: ``"nf4"`` or ``"fp4"`` for 4 bit; ignored for 8 bit.
      return_quantized: also return the :class:`QuantizedArray` of the final ``Q`` (quantized as
        stored, torch layout; its ``dequantize(float32)`` is the first result in float32).

    Returns:
      ``(q_dequantized, lora_A, lora_B)``: ``Q`` in ``weight``'s dtype ``(out, in)``, ``lora_A``
      ``(rank, in)`` and ``lora_B`` ``(out, rank)`` in float32, then the QuantizedArray if asked.

    Example:
      >>> q, lora_a, lora_b = loftq_init(w, bits=4, iters=2, rank=16)
      >>> adapter = {"lora_A": lora_a.T, "lora_B": lora_b.T}  # Flax (in, r), (r, out)
    """
    if bits not in (4, 8):
        raise ConfigError(f"LoftQ supports `bits` 4 (NF4) or 8 (int8), got {bits!r}.")
    if not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"LoftQ `iters` (loftq_iter) must be an int >= 1, got {iters!r}.")
    weight = jnp.asarray(weight)
    if weight.ndim != 2:
        raise ConfigError(f"LoftQ needs a 2-D weight (out, in), got shape {weight.shape}.")
    if not isinstance(rank, int) or not 1 <= rank <= min(weight.shape):
        raise ConfigError(
            f"LoftQ `rank` must be an int in [1, {min(weight.shape)}] for shape {weight.shape}, got {rank!r}."
        )
    if bits == 4 and quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"4-bit LoftQ `quant_type` must be 'nf4' or 'fp4', got {quant_type!r}.")
    quant = quant_type if bits == 4 else "int8"
    target = weight.astype(jnp.float32)
    residual = target
    for step in range(iters):
        quantized = quantize(residual, quant, blocksize, compute_dtype=jnp.float32)
        dequantized = quantized.dequantize(jnp.float32)
        lora_b, lora_a = low_rank(target - dequantized, rank)
        if step + 1 < iters:
            residual = target - lora_b @ lora_a
    result = (dequantized.astype(weight.dtype), lora_a, lora_b)
    return (*result, quantized) if return_quantized else result
