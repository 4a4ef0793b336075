"""QuantizedArray / quantize: round trips, error bounds, padding, jit, memory, and a numpy reference.

These run without bitsandbytes; test_bitsandbytes.py compares against it byte for byte.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.errors import ConfigError
from jpeft.quant import FP4_CODE, NF4_CODE, QuantizedArray, is_quantized, quantize

FORMATS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", False)]


def normal(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def leaves_equal(a: QuantizedArray, b: QuantizedArray) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# --- a plain numpy implementation of the published algorithms, written independently -------------


def numpy_quantize_4bit(x: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax over the row-major flattening, nearest code value, two codes a byte."""
    flat = x.astype(np.float32).ravel()
    codes, absmax = [], []
    for start in range(0, flat.size, blocksize):
        block = flat[start : start + blocksize]
        peak = np.float32(np.abs(block).max())
        if len(block) == blocksize:
            scaled = block * (np.float32(1) / peak)
        else:  # bitsandbytes divides the short last block
            scaled = block / peak
        scaled = np.clip(scaled, -1, 1)
        distance = np.abs(scaled[:, None] - code[None, :].astype(np.float32))
        # nearest value; of two equally near, the smaller one
        by_value = np.argsort(code, kind="stable")
        nearest = by_value[np.argmin(distance[:, by_value], axis=1)]
        # FP4 has -0 (code 0) and +0 (code 8): a value rounding to zero keeps its sign
        zero = code[nearest] == 0
        if (code == 0).sum() == 2:
            nearest = np.where(zero, np.where(np.signbit(scaled), 0, 8), nearest)
        codes.append(nearest)
        absmax.append(peak)
    codes = np.concatenate(codes)
    if codes.size % 2:
        codes = np.append(codes, by_value[np.argmin(np.abs(code[by_value]))])
    codes = codes.astype(np.uint8)
    return (codes[0::2] << 4) | codes[1::2], np.array(absmax, np.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", [((16, 64), 64), ((9, 31), 64), ((5, 70), 128), ((3, 4, 11), 32)])
def test_4bit_matches_numpy_reference(quant_type, shape, blocksize):
    x = normal(shape, seed=sum(shape))
    code = NF4_CODE if quant_type == "nf4" else FP4_CODE
    packed, absmax = numpy_quantize_4bit(x, code, blocksize)
    q = quantize(x, quant_type, blocksize, compute_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(q.packed), packed)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    n = x.size
    nibbles = np.stack([packed >> 4, packed & 15], -1).ravel()[:n]
    want = (code[nibbles] * np.repeat(absmax, blocksize)[:n]).reshape(shape)
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), want)


def test_int8_matches_numpy_reference():
    x = normal((12, 40), seed=3)
    rows = x.astype(np.float16).astype(np.float32)
    scale = np.abs(rows).max(axis=1)
    codes = np.round(rows * (np.float32(127) / scale)[:, None]).astype(np.int8)
    q = quantize(x, "int8", compute_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(q.packed), codes)
    np.testing.assert_array_equal(np.asarray(q.absmax), scale)
    want = codes.astype(np.float32) * scale[:, None] * np.float32(1 / 127)
    np.testing.assert_allclose(np.asarray(q.dequantize()), want, rtol=1e-6, atol=0)


def test_code_books_are_the_published_ones():
    assert NF4_CODE.shape == FP4_CODE.shape == (16,)
    assert np.all(np.diff(NF4_CODE) > 0) and NF4_CODE[0] == -1 and NF4_CODE[7] == 0 and NF4_CODE[-1] == 1
    np.testing.assert_allclose(NF4_CODE[8], 0.07958029955625534, rtol=0)
    # FP4 in bit order: sign bit 8, 2 exponent bits, 1 mantissa bit, scaled by 1/12
    magnitudes = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], np.float32) / np.float32(12)
    np.testing.assert_array_equal(np.abs(FP4_CODE[:8]), magnitudes)
    np.testing.assert_array_equal(FP4_CODE[8:], -FP4_CODE[:8])


@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
@pytest.mark.parametrize("transpose", [False, True])
def test_requantizing_the_dequantized_array_reproduces_it(quant_type, double_quant, transpose):
    x = normal((37, 29), seed=1)
    x[0, :5] = 0.0  # exact zeros, tiny values of both signs: FP4's two zero codes
    x[1, :3] = -0.0
    x[2, :4] = 1e-5
    x[3, :4] = -1e-5
    q = quantize(x, quant_type, 64, double_quant, transpose=transpose)
    again = quantize(q.dequantize(jnp.float32), quant_type, 64, double_quant, transpose=transpose)
    if not double_quant:
        assert leaves_equal(q, again)
        return
    # Double quantization subtracts the mean of the absmax values, which moves when they are
    # requantized, so its 8-bit state cannot repeat; the 4-bit codes and the decoded absmax do.
    np.testing.assert_array_equal(np.asarray(again.packed), np.asarray(q.packed))
    single = quantize(q.dequantize(jnp.float32), quant_type, 64, False, transpose=transpose)
    np.testing.assert_array_equal(np.asarray(single.packed), np.asarray(q.packed))
    np.testing.assert_array_equal(np.asarray(single.absmax), np.asarray(q.block_absmax()))


@pytest.mark.parametrize("quant_type,bound", [("nf4", (0.085, 0.10)), ("fp4", (0.10, 0.14))])
def test_4bit_error_on_gaussian_weights(quant_type, bound):
    x = normal((256, 512), seed=2)
    q = quantize(x, quant_type, 64)
    err = np.asarray(q.dequantize(jnp.float32)) - x
    rel = np.linalg.norm(err) / np.linalg.norm(x)
    assert bound[0] < rel < bound[1], rel  # measured: nf4 0.092, fp4 0.12
    # no value is further from its block's code than half the widest code-book gap
    code = np.sort(NF4_CODE if quant_type == "nf4" else FP4_CODE)
    half_gap = np.diff(code).max() / 2
    absmax = np.repeat(np.asarray(q.absmax), 64).reshape(x.shape)
    assert np.all(np.abs(err) <= half_gap * absmax * (1 + 1e-6))


def test_double_quant_changes_absmax_little():
    x = normal((128, 256), seed=4)
    single, double = quantize(x, "nf4", 64), quantize(x, "nf4", 64, True)
    np.testing.assert_array_equal(np.asarray(double.packed), np.asarray(single.packed))
    rel = np.abs(np.asarray(double.block_absmax()) - np.asarray(single.absmax)) / np.asarray(single.absmax)
    assert rel.max() < 0.02, rel.max()
    assert double.absmax.dtype == jnp.uint8 and double.nested_absmax.shape == (2,)


def test_int8_error_bound():
    x = normal((64, 96), seed=5, scale=0.05)
    q = quantize(x, "int8", transpose=True)  # a Flax (in, out) kernel: one scale per output column
    assert q.absmax.shape == (96,)
    err = np.abs(np.asarray(q.dequantize(jnp.float32)) - x)
    column_max = np.abs(x).max(axis=0)
    # half a step of 1/127 of the column max, plus the float16 rounding bitsandbytes applies first
    assert np.all(err <= column_max / 254 * (1 + 1e-5) + np.abs(x) * 2.0**-11)
    assert np.linalg.norm(err) / np.linalg.norm(x) < 0.01


def test_int8_zero_row_stays_zero():
    x = normal((4, 8), seed=6)
    x[2] = 0
    q = quantize(x, "int8")
    assert np.all(np.asarray(q.packed)[2] == 0)
    assert np.all(np.isfinite(np.asarray(q.dequantize())))


@pytest.mark.parametrize("shape", [(5, 13), (65,), (1,), (3, 3, 3)])
def test_size_not_a_multiple_of_the_blocksize_pads_the_last_block(shape):
    x = normal(shape, seed=7)
    q = quantize(x, "nf4", 64, compute_dtype=jnp.float32)
    n = x.size
    assert q.absmax.shape == (-(-n // 64),) and q.packed.shape == ((n + 1) // 2,)
    tail = x.ravel()[(n // 64) * 64 :]
    if tail.size:
        assert np.asarray(q.absmax)[-1] == np.abs(tail).max()  # the short block has its own absmax
    if n % 2:
        assert np.asarray(q.packed)[-1] & 15 == 7  # pad nibble: NF4's zero
    out = q.dequantize()
    assert out.shape == shape and out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - x).max() <= 0.16 * np.abs(x).max()


@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
def test_jit_equals_eager(quant_type, double_quant):
    x = normal((24, 40), seed=8)
    eager = quantize(x, quant_type, 64, double_quant, transpose=True)
    jitted = jax.jit(lambda a: quantize(a, quant_type, 64, double_quant, transpose=True))(x)
    assert leaves_equal(eager, jitted)
    deq = jax.jit(lambda q: q.dequantize(jnp.float32))(jitted)
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(eager.dequantize(jnp.float32)))


def test_pytree_metadata_and_dtypes():
    x = jnp.asarray(normal((8, 64), seed=9), jnp.bfloat16)
    q = quantize(x, "nf4", 64, compute_dtype="float32")
    assert is_quantized(q) and not is_quantized(x)
    assert q.shape == (8, 64) and q.ndim == 2 and q.size == 512 and q.dtype == jnp.bfloat16
    assert q.packed.dtype == jnp.uint8 and q.absmax.dtype == jnp.float32
    assert len(jax.tree.leaves(q)) == 2  # nested fields are None without double quant
    assert q.dequantize().dtype == jnp.float32 and q.dequantize(jnp.bfloat16).dtype == jnp.bfloat16
    assert quantize(x, "nf4").dequantize().dtype == jnp.bfloat16  # default compute dtype
    assert q.nbytes == 256 + 8 * 4


@pytest.mark.parametrize("double_quant,ratio", [(False, 0.28125), (True, 0.2579)])
def test_nf4_stored_bytes_of_a_realistic_kernel(double_quant, ratio):
    x = jnp.asarray(normal((1024, 4096), seed=10), jnp.bfloat16)
    q = quantize(x, "nf4", 64, double_quant)
    bf16_bytes = 1024 * 4096 * 2
    # 4 bits a value plus a float32 absmax per 64 (0.28125x), or a uint8 one (0.2579x)
    assert q.nbytes / bf16_bytes <= 0.3
    assert q.nbytes / bf16_bytes == pytest.approx(ratio, abs=1e-4)
    assert q.nbytes == sum(leaf.nbytes for leaf in jax.tree.leaves(q))


def test_bad_arguments_raise_clear_errors():
    x = normal((4, 8))
    with pytest.raises(ConfigError, match="quant_type"):
        quantize(x, "nf3")
    with pytest.raises(ConfigError, match="blocksize"):
        quantize(x, "nf4", 0)
    with pytest.raises(ConfigError, match="double_quant"):
        quantize(x, "int8", double_quant=True)
    with pytest.raises(ConfigError, match="transpose"):
        quantize(x[0], "nf4", transpose=True)
    with pytest.raises(ConfigError, match="floating"):
        quantize(np.ones((4, 4), np.int32))
