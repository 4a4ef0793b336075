"""NF4 / FP4 / int8 quantized arrays with bitsandbytes' maths, in pure JAX.

A :class:`QuantizedArray` is a pytree holding a frozen weight in 4 or 8 bits. It is made by
:func:`quantize` and turned back into a dense array by :meth:`QuantizedArray.dequantize`; both
are jittable for a fixed shape. The numbers are those of bitsandbytes 0.50 on CPU
(``bitsandbytes.functional.quantize_4bit`` and ``Int8Params``), byte for byte:

* **4 bit** (``"nf4"``, ``"fp4"``): the array (or its transpose, see ``transpose``) is flattened
  row-major and cut into blocks of ``blocksize`` values. Each block is scaled by its absolute
  maximum (``absmax``) into ``[-1, 1]`` and every value becomes the index of the nearest of the 16
  code-book values (a value exactly half-way between two codes takes the lower one). Two indices
  share a byte, the first in the high nibble. A last block shorter than ``blocksize`` is scaled by
  its own absmax (zeros pad it; they cannot change a maximum), and an odd number of values pads the
  last byte with the code of zero. With ``double_quant`` the per-block absmax values are themselves
  quantized: their mean (``nested_offset``) is subtracted and the rest is quantized in blocks of
  256 with bitsandbytes' signed 8-bit dynamic map (``nested_absmax`` holds those blocks' maxima).
* **int8** (LLM.int8's weight format): the quantized matrix ``M`` is rounded to float16 (as
  bitsandbytes' ``Int8Params`` does), and each ROW of ``M`` is scaled by its absolute maximum to
  ``round(127 * m / absmax)``. With ``transpose=False`` ``M`` is the array itself, reshaped to
  ``(shape[0], -1)`` (a torch ``nn.Linear`` weight ``(out, in)``: one scale per output
  feature); with ``transpose=True`` ``M = x.T``, so a Flax ``Dense`` kernel ``(in, out)`` also gets
  one scale per output feature (per column of the kernel).

``transpose=True`` (2-D arrays only) quantizes ``x.T`` and stores it that way; ``dequantize``
transposes back, so the result always has the original shape. Quantizing a Flax ``Dense`` kernel
``(in, out)`` with it groups blocks exactly as bitsandbytes groups the ``(out, in)`` weight of the
same layer in torch, so the dequantized weights are the same in both frameworks.

Documented differences from bitsandbytes (CPU), none of which changes a dequantized value:

* FP4 has two zero codes. bitsandbytes gives tiny positive values code 8 and tiny negative values
  and exact zeros code 0, and decodes both to ``+0.0``, so its codes cannot survive a round trip.
  Here a value that rounds to zero keeps its sign (code 0 decodes to ``-0.0``, code 8 to ``+0.0``),
  so only exact ``+0.0`` inputs get a different code (8) than in bitsandbytes, and
  ``quantize(q.dequantize(float32))`` reproduces ``q`` exactly for nf4, fp4 and int8.
* Double quantization's offset is a float32 mean whose summation order differs from torch's, so it
  may differ in the last bits (the rest of the state is then bit-identical given that offset).
  Requantizing a double-quantized array reproduces its 4-bit codes and its decoded absmax, not its
  8-bit state (the mean of the decoded absmax values is not the old mean).
* An all-zero int8 row gets codes 0 (bitsandbytes divides by zero there); a block whose absmax is
  subnormal is not bit-compatible (XLA flushes subnormals to zero).
* bitsandbytes builds the dynamic map with ``torch.linspace``; :data:`DYNAMIC_CODE` is the table it
  produced (bitsandbytes 0.50.2, torch 2.13, x86-64).

References:
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023 (NF4, double quant).
  Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", 2022.
  Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", 2016 (dynamic 8-bit map).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta as flax_meta

from jpeft.errors import ConfigError
from jpeft.quant.codebooks import CODE_BOUNDS, CODES, DYNAMIC_BOUNDS, INV_127
from jpeft.quant.codebooks import DYNAMIC_CODE as DYNAMIC_CODE  # re-exported: formats' public names
from jpeft.quant.codebooks import FP4_CODE as FP4_CODE
from jpeft.quant.codebooks import NESTED_BLOCKSIZE as NESTED_BLOCKSIZE
from jpeft.quant.codebooks import NF4_CODE as NF4_CODE

QuantType = Literal["nf4", "fp4", "int8"]
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4", "int8")


@dataclasses.dataclass(frozen=True)
class QuantizedArray(flax_meta.AxisMetadata):
    """A weight stored in 4 or 8 bits (a JAX pytree: arrays are children, the rest is static).

    It is also a Flax ``AxisMetadata`` box: a Flax module that reads it with ``self.param``
    gets the dequantized array (in :attr:`compute_dtype`), so a quantized kernel is decoded
    inside the module that uses it, one layer at a time, in the jitted forward.

    Attributes:
      packed: ``uint8[ceil(n / 2)]`` two 4-bit codes per byte (nf4/fp4), or ``int8`` codes
        shaped like the quantized matrix (int8).
      absmax: ``float32[n_blocks]`` per-block maxima (4 bit), ``uint8[n_blocks]`` with
        ``double_quant``, or ``float32[rows]`` per-row maxima (int8).
      nested_absmax: ``float32[ceil(n_blocks / 256)]`` maxima of the quantized absmax blocks
        (``double_quant`` only, else ``None``).
      nested_offset: ``float32[]`` mean subtracted from absmax before it was quantized
        (``double_quant`` only, else ``None``).
      shape: the original shape.
      dtype: the original dtype.
      quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
      blocksize: values per absmax block (4 bit; recorded but unused for int8).
      compute_dtype: what :meth:`dequantize` returns by default.
      double_quant: whether absmax is itself quantized.
      transposed: the codes describe ``x.T`` (see the module docstring).
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    nested_offset: jax.Array | None
    shape: tuple[int, ...]
    dtype: np.dtype
    quant_type: str
    blocksize: int
    compute_dtype: np.dtype
    double_quant: bool
    transposed: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements of the ORIGINAL array (what a parameter count should add)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: every array child, at its own dtype."""
        children = (self.packed, self.absmax, self.nested_absmax, self.nested_offset)
        return sum(math.prod(c.shape) * np.dtype(c.dtype).itemsize for c in children if c is not None)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The dense array, shaped like the original (jittable).

        Args:
          dtype: result dtype; ``None`` means :attr:`compute_dtype`. Values are computed in
            float32 and cast once, as bitsandbytes does.

        Returns:
          An array of shape :attr:`shape`.
        """
        dtype = self.compute_dtype if dtype is None else np.dtype(dtype)
        return _dequantize(self, dtype)

    # Flax AxisMetadata: what a module sees when it reads this parameter.
    def unbox(self) -> jax.Array:
        return self.dequantize()

    def replace_boxed(self, val: Any) -> QuantizedArray:
        """``val`` quantized with this array's settings."""
        return quantize(
            val,
            self.quant_type,
            self.blocksize,
            self.double_quant,
            self.compute_dtype,
            transpose=self.transposed,
        )

    def add_axis(self, index: int, params: dict[str, Any]) -> QuantizedArray:
        raise NotImplementedError(
            "quantized kernels inside flax.linen.scan / vmap-ed modules are not supported; quantize the "
            "model's unscanned parameters instead."
        )

    def remove_axis(self, index: int, params: dict[str, Any]) -> QuantizedArray:
        return self.add_axis(index, params)

    def block_absmax(self) -> jax.Array:
        """The float32 per-block absmax, decoded from its 8-bit form under ``double_quant``."""
        if not self.double_quant:
            return self.absmax
        return _decode_absmax(self)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: QuantizedArray, dtype: np.dtype) -> jax.Array:
    matrix_shape = _matrix_shape(q.shape, q.transposed)
    if q.quant_type == "int8":
        rows = _rows(q.packed).astype(jnp.float32)
        values = (rows * q.absmax[:, None]) * INV_127
    else:
        n = q.size
        high, low = q.packed >> 4, q.packed & 0xF
        codes = jnp.stack([high, low], axis=-1).reshape(-1)[:n]
        values = jnp.asarray(CODES[q.quant_type])[codes.astype(jnp.int32)]
        absmax = q.block_absmax()
        n_blocks = absmax.shape[0]
        values = jnp.pad(values, (0, n_blocks * q.blocksize - n))
        values = (values.reshape(n_blocks, q.blocksize) * absmax[:, None]).reshape(-1)[:n]
    values = values.reshape(matrix_shape)
    if q.transposed:
        values = values.T
    return values.reshape(q.shape).astype(dtype)


@jax.jit
def _decode_absmax(q: QuantizedArray) -> jax.Array:
    assert q.nested_absmax is not None and q.nested_offset is not None  # only called under double_quant
    codes = jnp.asarray(DYNAMIC_CODE)[q.absmax.astype(jnp.int32)]
    n = codes.shape[0]
    n_nested = q.nested_absmax.shape[0]
    codes = jnp.pad(codes, (0, n_nested * NESTED_BLOCKSIZE - n)).reshape(n_nested, NESTED_BLOCKSIZE)
    return (codes * q.nested_absmax[:, None]).reshape(-1)[:n] + q.nested_offset


jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["packed", "absmax", "nested_absmax", "nested_offset"],
    meta_fields=["shape", "dtype", "quant_type", "blocksize", "compute_dtype", "double_quant", "transposed"],
)


def is_quantized(leaf: Any) -> bool:
    """Whether ``leaf`` is a :class:`QuantizedArray` (use as ``is_leaf=`` in ``jax.tree`` calls)."""
    return isinstance(leaf, QuantizedArray)


def _matrix_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    return (shape[1], shape[0]) if transposed else shape


def _check_args(x: Any, quant_type: str, blocksize: int, double_quant: bool, transpose: bool) -> None:
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"`quant_type` must be one of {QUANT_TYPES}, got {quant_type!r}.")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ConfigError(f"`blocksize` must be a positive int (bitsandbytes uses 64), got {blocksize!r}.")
    if double_quant and quant_type == "int8":
        raise ConfigError("`double_quant` applies to 4-bit types only; int8 keeps one float32 scale per row.")
    if transpose and np.ndim(x) != 2:
        raise ConfigError(f"`transpose=True` needs a 2-D array, got shape {np.shape(x)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ConfigError(f"only floating-point arrays can be quantized, got dtype {x.dtype}.")


def _blockwise(flat: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' blockwise absmax scaling of a flat float32 vector.

    Returns the stored absmax per block and the scaled values in ``[-1, 1]`` (unpadded).
    Full blocks are multiplied by ``1 / absmax``; a short last block is divided by its absmax,
    exactly as bitsandbytes does it (the two differ in the last bit).
    """
    n = flat.shape[0]
    n_blocks = -(-n // blocksize)
    rem = n % blocksize
    blocks = jnp.pad(flat, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # bitsandbytes clamps absmax to 1e-38 first; XLA flushes that to zero, so guard explicitly.
    safe = jnp.where(absmax > 0, absmax, 1.0)
    scaled = blocks * (1.0 / safe)[:, None]
    if rem:
        scaled = scaled.at[-1].set(blocks[-1] / safe[-1])
    return absmax, jnp.clip(scaled, -1.0, 1.0).reshape(-1)[:n]


def quantize(
    x: jax.Array,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    compute_dtype: Any = jnp.bfloat16,
    *,
    transpose: bool = False,
) -> QuantizedArray:
    """Quantizes a floating-point array to NF4, FP4 or int8 as bitsandbytes does.

    Jittable for a fixed shape when every argument but ``x`` is static.

    Args:
      x: the array (any shape; 2-D with ``transpose``).
      quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
      blocksize: values per absmax block for 4-bit types (bitsandbytes allows 32 ... 4096).
      double_quant: quantize the 4-bit absmax values too (QLoRA's double quantization).
      compute_dtype: the dtype :meth:`QuantizedArray.dequantize` returns by default.
      transpose: quantize ``x.T`` (2-D only): pass it for a Flax ``Dense`` kernel ``(in, out)``
        to get bitsandbytes' result for the torch weight ``(out, in)`` of the same layer.

    Returns:
      The :class:`QuantizedArray`.

    Example:
      >>> q = quantize(jnp.ones((64, 128)), "nf4", transpose=True)
      >>> q.dequantize(jnp.float32).shape
      (64, 128)
    """
    x = jnp.asarray(x)
    _check_args(x, quant_type, blocksize, double_quant, transpose)
    return _quantize(x, quant_type, blocksize, double_quant, np.dtype(compute_dtype), transpose)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize(
    x: jax.Array,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    compute_dtype: np.dtype,
    transpose: bool,
) -> QuantizedArray:
    shape, dtype = tuple(x.shape), np.dtype(x.dtype)
    matrix = x.T if transpose else x
    make = functools.partial(
        QuantizedArray,
        shape=shape,
        dtype=dtype,
        quant_type=quant_type,
        blocksize=blocksize,
        compute_dtype=np.dtype(compute_dtype),
        double_quant=double_quant,
        transposed=transpose,
    )
    if quant_type == "int8":
        codes, row_absmax = _quantize_int8(matrix)
        return make(packed=codes, absmax=row_absmax, nested_absmax=None, nested_offset=None)

    flat = matrix.reshape(-1).astype(jnp.float32)
    absmax, scaled = _blockwise(flat, blocksize)
    bounds, order = CODE_BOUNDS[quant_type]
    codes = jnp.asarray(order)[
        jnp.searchsorted(jnp.asarray(bounds), scaled, side="left", method="compare_all")
    ]
    if quant_type == "fp4":
        codes = jnp.where((scaled == 0) & ~jnp.signbit(scaled), 8, codes)
    if codes.shape[0] % 2:
        zero_code = int(order[np.searchsorted(bounds, 0.0, side="left")])
        codes = jnp.pad(codes, (0, 1), constant_values=zero_code)
    codes = codes.astype(jnp.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return make(packed=packed, absmax=absmax, nested_absmax=None, nested_offset=None)
    # Like torch's ``absmax.mean()`` (a float32 sum divided by n); the two sums may add in a
    # different order, so the offset can differ from bitsandbytes' in the last bit.
    offset = jnp.sum(absmax) / jnp.float32(absmax.shape[0])
    absmax_codes, nested_absmax = _double_quantize(absmax, offset)
    return make(packed=packed, absmax=absmax_codes, nested_absmax=nested_absmax, nested_offset=offset)


def _double_quantize(absmax: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' 8-bit blockwise quantization (dynamic map, blocks of 256) of ``absmax - offset``.

    Returns the uint8 codes and the float32 maxima of the 256-value blocks.
    """
    nested_absmax, scaled = _blockwise(absmax - offset, NESTED_BLOCKSIZE)
    codes = jnp.searchsorted(jnp.asarray(DYNAMIC_BOUNDS), scaled, side="left", method="compare_all")
    # bitsandbytes' CPU kernel gives an all-zero block (e.g. a lone absmax minus its own mean)
    # code 0; any code decodes to 0 there, so this only keeps the bytes identical.
    zero_block = jnp.repeat(nested_absmax == 0, NESTED_BLOCKSIZE)[: codes.shape[0]]
    codes = jnp.where(zero_block, 0, codes)
    return codes.astype(jnp.uint8), nested_absmax


def _quantize_int8(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """LLM.int8 row-wise quantization of ``matrix`` after rounding it to float16 (``Int8Params``)."""
    half = _rows(matrix).astype(jnp.float16).astype(jnp.float32)
    row_absmax = jnp.max(jnp.abs(half), axis=1)
    scale = jnp.float32(127.0) / row_absmax
    codes = jnp.where(row_absmax[:, None] > 0, jnp.round(half * scale[:, None]), 0.0).astype(jnp.int8)
    return codes.reshape(matrix.shape), row_absmax


def _rows(matrix: jax.Array) -> jax.Array:
    """The int8 rows: ``(shape[0], -1)``; a 0-D or 1-D array is one row."""
    if matrix.ndim < 2:
        return matrix.reshape(1, -1)
    return matrix.reshape(matrix.shape[0], -1)
