"""LoftQ against a plain numpy version of the published algorithm."""

import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.errors import ConfigError
from jpeft.quant import NF4_CODE, loftq_init, quantize


def numpy_nf4(x: np.ndarray, blocksize: int = 64) -> np.ndarray:
    """dequant(quant(x)): blockwise absmax, nearest NF4 value (x.size a multiple of blocksize)."""
    blocks = x.astype(np.float32).reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scaled = np.clip(blocks * (np.float32(1) / absmax), -1, 1)
    nearest = np.abs(scaled[..., None] - NF4_CODE).argmin(-1)
    return (NF4_CODE[nearest] * absmax).reshape(x.shape)


def numpy_int8(x: np.ndarray) -> np.ndarray:
    rows = x.astype(np.float16).astype(np.float32)
    absmax = np.abs(rows).max(axis=1, keepdims=True)
    return np.round(rows * (np.float32(127) / absmax)) * absmax * np.float32(1 / 127)


def numpy_loftq(w, bits, iters, rank):
    quant = numpy_nf4 if bits == 4 else numpy_int8
    res = w
    for i in range(iters):
        q = quant(res)
        u, s, vh = np.linalg.svd((w - q).astype(np.float64), full_matrices=False)
        lora_b = u[:, :rank] * np.sqrt(s[:rank])
        lora_a = np.sqrt(s[:rank])[:, None] * vh[:rank]
        if i + 1 < iters:
            res = (w - lora_b @ lora_a).astype(np.float32)
    return q, lora_a, lora_b


def weight(seed=0, shape=(48, 64)):
    return (0.02 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("iters", [1, 2, 3])
def test_matches_numpy_reference(bits, iters):
    w = weight(iters)
    q, lora_a, lora_b = loftq_init(w, bits=bits, iters=iters, rank=4)
    q_ref, a_ref, b_ref = numpy_loftq(w, bits, iters, 4)
    assert q.shape == w.shape and lora_a.shape == (4, 64) and lora_b.shape == (48, 4)
    # the reference's residual is float64, so block maxima move in the last bits (Q moves ~1e-9);
    # a code can only change where a value sits within that rounding of a code boundary
    close = np.abs(np.asarray(q) - q_ref) <= 1e-6
    assert np.mean(close) > 0.999
    if iters == 1:
        np.testing.assert_array_equal(np.asarray(q), q_ref)
    # each singular pair is defined up to its sign, which cancels in B @ A
    product = np.asarray(lora_b) @ np.asarray(lora_a)
    np.testing.assert_allclose(product, b_ref @ a_ref, atol=1e-6)  # fp32 SVD vs fp64 reference
    np.testing.assert_allclose(np.abs(np.asarray(lora_a)), np.abs(a_ref), atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_error_decreases_and_beats_plain_quantization(bits):
    w = weight(7, (64, 96))
    plain = np.linalg.norm(
        w - np.asarray(quantize(w, "nf4" if bits == 4 else "int8").dequantize(jnp.float32))
    )
    errors = []
    for iters in (1, 2, 3, 4):
        q, lora_a, lora_b = loftq_init(w, bits=bits, iters=iters, rank=8)
        errors.append(float(np.linalg.norm(w - (np.asarray(q) + np.asarray(lora_b) @ np.asarray(lora_a)))))
    assert errors[0] < plain
    assert all(b <= a * (1 + 1e-4) for a, b in zip(errors, errors[1:], strict=False)), errors


def test_return_quantized_and_dtype():
    w = jnp.asarray(weight(3), jnp.bfloat16)
    q, lora_a, lora_b, quantized = loftq_init(w, bits=4, iters=2, rank=2, return_quantized=True)
    assert q.dtype == jnp.bfloat16 and lora_a.dtype == lora_b.dtype == jnp.float32
    assert quantized.quant_type == "nf4" and quantized.shape == (48, 64)
    np.testing.assert_array_equal(np.asarray(quantized.dequantize(jnp.bfloat16)), np.asarray(q))


def test_bad_arguments():
    w = weight()
    with pytest.raises(ConfigError, match="bits"):
        loftq_init(w, bits=2, iters=1, rank=4)
    with pytest.raises(ConfigError, match="iters"):
        loftq_init(w, bits=4, iters=0, rank=4)
    with pytest.raises(ConfigError, match="rank"):
        loftq_init(w, bits=4, iters=1, rank=100)
    with pytest.raises(ConfigError, match="2-D"):
        loftq_init(w[0], bits=4, iters=1, rank=1)
