"""Byte-for-byte comparison with bitsandbytes on CPU (skipped when it is not installed)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.quant import DYNAMIC_CODE, FP4_CODE, NF4_CODE, QuantizationConfig, quantize, quantize_params
from jpeft.quant.formats import _double_quantize

bnb = pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")
F = bnb.functional

SHAPES = [(64, 128), (33, 70), (3, 5, 9)]


def normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_code_books_equal_bitsandbytes():
    np.testing.assert_array_equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(FP4_CODE, F.get_4bit_type("fp4", device="cpu").numpy())  # -0.0 == 0.0
    np.testing.assert_array_equal(DYNAMIC_CODE, F.create_dynamic_map().numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_4bit_equals_bitsandbytes(quant_type, blocksize, shape):
    x = normal(shape, seed=len(shape) + blocksize)
    packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=blocksize, quant_type=quant_type)
    q = quantize(x, quant_type, blocksize, compute_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().ravel())
    np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
    want = F.dequantize_4bit(packed, state).numpy()
    np.testing.assert_array_equal(np.asarray(q.dequantize()), want)
    # a bfloat16 weight: bitsandbytes computes in float32 and casts the result back
    packed, state = F.quantize_4bit(
        torch.from_numpy(x).bfloat16(), blocksize=blocksize, quant_type=quant_type
    )
    q = quantize(jnp.asarray(x, jnp.bfloat16), quant_type, blocksize)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().ravel())
    want = F.dequantize_4bit(packed, state).float().numpy()
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.bfloat16), np.float32), want)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(64, 128), (7,), (1025, 3)])
def test_double_quant_equals_bitsandbytes(quant_type, blocksize, shape):
    x = normal(shape, seed=3 + blocksize)
    packed, state = F.quantize_4bit(
        torch.from_numpy(x), blocksize=blocksize, quant_type=quant_type, compress_statistics=True
    )
    _, plain = F.quantize_4bit(torch.from_numpy(x), blocksize=blocksize, quant_type=quant_type)
    # Given bitsandbytes' offset, the 8-bit absmax state is identical, bit for bit.
    codes, nested = _double_quantize(jnp.asarray(plain.absmax.numpy()), jnp.float32(state.offset.item()))
    np.testing.assert_array_equal(np.asarray(codes), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(nested), state.state2.absmax.numpy())
    # End to end, the offset is a float32 mean whose summation order differs from torch's, so it
    # can differ in the last bits; everything downstream then moves by about as much.
    q = quantize(x, quant_type, blocksize, True, compute_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().ravel())
    np.testing.assert_allclose(float(q.nested_offset), state.offset.item(), rtol=1e-6)
    assert np.mean(np.asarray(q.absmax) == state.absmax.numpy()) >= 0.99
    np.testing.assert_allclose(np.asarray(q.nested_absmax), state.state2.absmax.numpy(), rtol=1e-5)
    want = F.dequantize_4bit(packed, state).numpy()
    np.testing.assert_allclose(np.asarray(q.dequantize()), want, rtol=0, atol=2e-6)


def test_int8_equals_bitsandbytes_int8params():
    w = normal((48, 80), seed=5)  # torch layout (out, in)
    param = bnb.nn.Int8Params(torch.from_numpy(w.copy()), requires_grad=False).to("cpu")
    q = quantize(w, "int8")
    np.testing.assert_array_equal(np.asarray(q.packed), param.data.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax), param.SCB.numpy())
    want = F.int8_vectorwise_dequant(param.data, param.SCB).numpy()
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), want)
    flax_kernel = quantize(w.T, "int8", transpose=True)  # (in, out): the same codes and scales
    np.testing.assert_array_equal(np.asarray(flax_kernel.packed), param.data.numpy())
    np.testing.assert_array_equal(np.asarray(flax_kernel.dequantize(jnp.float32)), want.T)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_flax_model_equals_bitsandbytes_on_the_torch_model(tiny, arch):
    """Kernels quantized in torch layout dequantize to what bitsandbytes gives the torch weights."""
    pair = tiny(arch)
    config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    conv1d = {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"}
    conv1d |= {name.replace(".0.", ".1.") for name in conv1d} | {
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_proj",
    }
    quantized = quantize_params(
        pair.flax_model.params, config, transposed_kernels=conv1d if arch == "gpt2" else ()
    )
    torch_weights = dict(pair.torch_model().named_parameters())
    name = "model.layers.0.self_attn.q_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"
    module = quantized
    for key in name.split("."):
        module = module[key]
    weight = torch_weights[name + ".weight"].detach()
    if arch == "gpt2":  # torch Conv1D stores (in, out); bitsandbytes quantizes the Linear (out, in)
        weight = weight.T.contiguous()
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(np.asarray(module["kernel"].packed), packed.numpy().ravel())
    # bitsandbytes' own CPU kernel mis-decodes rows narrower than a block (32 < 64 here; its
    # error is 3x the quantization error), so decode with its pure-torch path instead.
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    code = F.get_4bit_type("nf4", device="cpu")
    want = _dequantize_4bit_compute(
        packed.ravel(), state.absmax, code, 64, tuple(weight.shape), torch.float32
    )
    want = want.numpy()
    got = np.asarray(module["kernel"].dequantize(jnp.float32))
    np.testing.assert_array_equal(got if arch == "gpt2" else got.T, want)


@pytest.mark.xfail(
    # not strict: the mis-decode depends on the C kernel's threading, and was seen to pass under load
    strict=False, reason="bitsandbytes 0.50.2 CPU dequantize_4bit mis-decodes rows narrower than a block"
)
def test_bitsandbytes_cpu_dequantize_of_narrow_rows():
    x = torch.from_numpy(normal((32, 32), seed=11))
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(
        F.dequantize_4bit(packed, state).numpy(),
        np.asarray(quantize(x.numpy(), "nf4").dequantize(jnp.float32)),
    )
