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

QuantType = Literal["nf4", "fp4", "int8"]
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4", "int8")
# bitsandbytes quantizes the absmax of double quantization in blocks of 256.
NESTED_BLOCKSIZE = 256

# bitsandbytes' NF4 code book (``get_4bit_type("nf4")``): quantiles of N(0, 1), scaled to [-1, 1].
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, divided by its
# largest magnitude (12) in float32. Index 0 is -0.0 here (see the module docstring).
FP4_CODE = np.array(
    [-0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=np.float32,
) / np.float32(12.0)


def _sorted_code(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The half-way points between neighbouring sorted code values, and sorted position -> index."""
    # FP4's two zeros tie; bitsandbytes' order puts code 0 before code 8, and so does this one.
    order = np.array(sorted(range(len(code)), key=lambda i: (float(code[i]), i in (8,))), np.int32)
    values = code[order]
    return ((values[:-1] + values[1:]) / np.float32(2)).astype(np.float32), order


# bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), which quantizes the absmax
# values under double quantization: 0, 1, and in each decade 10^-6 ... 10^0 the midpoints of
# 2^i + 1 evenly spaced points of [0.1, 1] (i = 0 ... 6), with their negatives; 256 sorted values.
# Stored as float32 bit patterns because bitsandbytes builds it with ``torch.linspace``, whose
# last-bit rounding is not the textbook one (read from bitsandbytes 0.50.2 with torch 2.13 on CPU).
DYNAMIC_CODE = np.array(
    [
        0xBF7E3333,
        0xBF7A999A,
        0xBF770000,
        0xBF736666,
        0xBF6FCCCD,
        0xBF6C3333,
        0xBF68999A,
        0xBF650000,
        0xBF616666,
        0xBF5DCCCD,
        0xBF5A3333,
        0xBF56999A,
        0xBF530000,
        0xBF4F6666,
        0xBF4BCCCD,
        0xBF483333,
        0xBF44999A,
        0xBF410000,
        0xBF3D6666,
        0xBF39CCCD,
        0xBF363334,
        0xBF32999A,
        0xBF2F0000,
        0xBF2B6666,
        0xBF27CCCD,
        0xBF243334,
        0xBF20999A,
        0xBF1D0000,
        0xBF196666,
        0xBF15CCCD,
        0xBF123334,
        0xBF0E999A,
        0xBF0B0000,
        0xBF076666,
        0xBF03CCCC,
        0xBF003333,
        0xBEF93332,
        0xBEF20000,
        0xBEEACCCC,
        0xBEE3999A,
        0xBEDC6666,
        0xBED53333,
        0xBECE0000,
        0xBEC6CCCC,
        0xBEBF999A,
        0xBEB86666,
        0xBEB13333,
        0xBEAA0000,
        0xBEA2CCCC,
        0xBE9B999A,
        0xBE946666,
        0xBE8D3334,
        0xBE860000,
        0xBE7D9999,
        0xBE6F3333,
        0xBE60CCCD,
        0xBE526666,
        0xBE440000,
        0xBE35999A,
        0xBE273333,
        0xBE18CCCD,
        0xBE0A6666,
        0xBDF80000,
        0xBDDB3334,
        0xBDC9EB85,
        0xBDC428F7,
        0xBDBE6667,
        0xBDB8A3D7,
        0xBDB2E148,
        0xBDAD1EB8,
        0xBDA75C2A,
        0xBDA1999A,
        0xBD9BD70A,
        0xBD96147B,
        0xBD9051EB,
        0xBD8A8F5D,
        0xBD84CCCD,
        0xBD7E147B,
        0xBD728F5D,
        0xBD670A3D,
        0xBD5B851F,
        0xBD500000,
        0xBD447AE1,
        0xBD38F5C3,
        0xBD2D70A3,
        0xBD21EB85,
        0xBD166667,
        0xBD0AE148,
        0xBCFEB852,
        0xBCE7AE15,
        0xBCD0A3D7,
        0xBCB9999A,
        0xBCA28F5D,
        0xBC8B851F,
        0xBC68F5C3,
        0xBC3AE148,
        0xBC1F3B64,
        0xBC160418,
        0xBC0CCCCD,
        0xBC039581,
        0xBBF4BC6A,
        0xBBE24DD3,
        0xBBCFDF3B,
        0xBBBD70A4,
        0xBBAB020D,
        0xBB989374,
        0xBB8624DD,
        0xBB676C8A,
        0xBB428F5C,
        0xBB1DB22D,
        0xBAF1A9FC,
        0xBAA7EF9D,
        0xBA7765FF,
        0xBA59E83E,
        0xBA3C6A80,
        0xBA1EECC1,
        0xBA016F01,
        0xB9C7E283,
        0xB98CE705,
        0xB923D70B,
        0xB8BA1F4B,
        0xB88AEFB3,
        0xB8378034,
        0xB7B24206,
        0xB70205FF,
        0xB65A1A94,
        0xB513A3B7,
        0x00000000,
        0x3513A3B7,
        0x365A1A94,
        0x370205FF,
        0x37B24206,
        0x38378034,
        0x388AEFB3,
        0x38BA1F4B,
        0x3923D70B,
        0x398CE705,
        0x39C7E283,
        0x3A016F01,
        0x3A1EECC1,
        0x3A3C6A80,
        0x3A59E83E,
        0x3A7765FF,
        0x3AA7EF9D,
        0x3AF1A9FC,
        0x3B1DB22D,
        0x3B428F5C,
        0x3B676C8A,
        0x3B8624DD,
        0x3B989374,
        0x3BAB020D,
        0x3BBD70A4,
        0x3BCFDF3B,
        0x3BE24DD3,
        0x3BF4BC6A,
        0x3C039581,
        0x3C0CCCCD,
        0x3C160418,
        0x3C1F3B64,
        0x3C3AE148,
        0x3C68F5C3,
        0x3C8B851F,
        0x3CA28F5D,
        0x3CB9999A,
        0x3CD0A3D7,
        0x3CE7AE15,
        0x3CFEB852,
        0x3D0AE148,
        0x3D166667,
        0x3D21EB85,
        0x3D2D70A3,
        0x3D38F5C3,
        0x3D447AE1,
        0x3D500000,
        0x3D5B851F,
        0x3D670A3D,
        0x3D728F5D,
        0x3D7E147B,
        0x3D84CCCD,
        0x3D8A8F5D,
        0x3D9051EB,
        0x3D96147B,
        0x3D9BD70A,
        0x3DA1999A,
        0x3DA75C2A,
        0x3DAD1EB8,
        0x3DB2E148,
        0x3DB8A3D7,
        0x3DBE6667,
        0x3DC428F7,
        0x3DC9EB85,
        0x3DDB3334,
        0x3DF80000,
        0x3E0A6666,
        0x3E18CCCD,
        0x3E273333,
        0x3E35999A,
        0x3E440000,
        0x3E526666,
        0x3E60CCCD,
        0x3E6F3333,
        0x3E7D9999,
        0x3E860000,
        0x3E8D3334,
        0x3E946666,
        0x3E9B999A,
        0x3EA2CCCC,
        0x3EAA0000,
        0x3EB13333,
        0x3EB86666,
        0x3EBF999A,
        0x3EC6CCCC,
        0x3ECE0000,
        0x3ED53333,
        0x3EDC6666,
        0x3EE3999A,
        0x3EEACCCC,
        0x3EF20000,
        0x3EF93332,
        0x3F003333,
        0x3F03CCCC,
        0x3F076666,
        0x3F0B0000,
        0x3F0E999A,
        0x3F123334,
        0x3F15CCCD,
        0x3F196666,
        0x3F1D0000,
        0x3F20999A,
        0x3F243334,
        0x3F27CCCD,
        0x3F2B6666,
        0x3F2F0000,
        0x3F32999A,
        0x3F363334,
        0x3F39CCCD,
        0x3F3D6666,
        0x3F410000,
        0x3F44999A,
        0x3F483333,
        0x3F4BCCCD,
        0x3F4F6666,
        0x3F530000,
        0x3F56999A,
        0x3F5A3333,
        0x3F5DCCCD,
        0x3F616666,
        0x3F650000,
        0x3F68999A,
        0x3F6C3333,
        0x3F6FCCCD,
        0x3F736666,
        0x3F770000,
        0x3F7A999A,
        0x3F7E3333,
        0x3F800000,
    ],
    dtype=np.uint32,
).view(np.float32)
_BOUNDS = {"nf4": _sorted_code(NF4_CODE), "fp4": _sorted_code(FP4_CODE)}
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_DYNAMIC_BOUNDS = ((DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / np.float32(2)).astype(np.float32)
# bitsandbytes' int8 dequantization multiplies by this float32 rounding of 1/127.
_INV_127 = np.float32(7.874015718698502e-3)


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
        values = (rows * q.absmax[:, None]) * _INV_127
    else:
        n = q.size
        high, low = q.packed >> 4, q.packed & 0xF
        codes = jnp.stack([high, low], axis=-1).reshape(-1)[:n]
        values = jnp.asarray(_CODES[q.quant_type])[codes.astype(jnp.int32)]
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
    meta = dict(
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
        return QuantizedArray(packed=codes, absmax=row_absmax, nested_absmax=None, nested_offset=None, **meta)

    flat = matrix.reshape(-1).astype(jnp.float32)
    absmax, scaled = _blockwise(flat, blocksize)
    bounds, order = _BOUNDS[quant_type]
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
        return QuantizedArray(packed=packed, absmax=absmax, nested_absmax=None, nested_offset=None, **meta)
    # Like torch's ``absmax.mean()`` (a float32 sum divided by n); the two sums may add in a
    # different order, so the offset can differ from bitsandbytes' in the last bit.
    offset = jnp.sum(absmax) / jnp.float32(absmax.shape[0])
    absmax_codes, nested_absmax = _double_quantize(absmax, offset)
    return QuantizedArray(
        packed=packed,
        absmax=absmax_codes,
        nested_absmax=nested_absmax,
        nested_offset=offset,
        **meta,
    )


def _double_quantize(absmax: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' 8-bit blockwise quantization (dynamic map, blocks of 256) of ``absmax - offset``.

    Returns the uint8 codes and the float32 maxima of the 256-value blocks.
    """
    nested_absmax, scaled = _blockwise(absmax - offset, NESTED_BLOCKSIZE)
    codes = jnp.searchsorted(jnp.asarray(_DYNAMIC_BOUNDS), scaled, side="left", method="compare_all")
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
