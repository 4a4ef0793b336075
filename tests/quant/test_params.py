"""QuantizationConfig and quantize_params on tiny transformers Flax models."""

import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.core.tree import flatten
from jpeft.errors import ConfigError
from jpeft.quant import QuantizationConfig, dequantize_params, is_quantized, quantize_params, quantized_nbytes


def test_config_errors_and_defaults():
    with pytest.raises(ConfigError, match="both True"):
        QuantizationConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ConfigError, match="load_in_4bit=True"):
        QuantizationConfig()
    with pytest.raises(ConfigError, match="bnb_4bit_quant_type"):
        QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")
    with pytest.raises(ConfigError, match="bnb_4bit_compute_dtype"):
        QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype="not-a-dtype")
    config = QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16")
    assert (
        config.quant_type == "fp4"
        and config.bnb_4bit_compute_dtype == jnp.bfloat16
        and config.blocksize == 64
    )
    assert QuantizationConfig(load_in_8bit=True).quant_type == "int8"


def test_llama_kernels_quantized_heads_embeddings_norms_kept(tiny):
    params = tiny("llama").flax_model.params
    before = {k: np.asarray(v).copy() for k, v in flatten(params).items()}
    config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    quantized = flatten(quantize_params(params, config))
    done = sorted(".".join(p) for p, v in quantized.items() if is_quantized(v))
    kernels = sorted(".".join(p) for p, v in before.items() if p[-1] == "kernel" and p[0] != "lm_head")
    assert done == kernels and len(done) == 14  # 7 linears x 2 layers
    for path, leaf in quantized.items():
        if not is_quantized(leaf):  # lm_head, embeddings, norms: the same arrays
            np.testing.assert_array_equal(np.asarray(leaf), before[path])
        else:
            assert leaf.shape == before[path].shape and leaf.double_quant and leaf.transposed
    for path, value in flatten(params).items():  # input untouched
        np.testing.assert_array_equal(np.asarray(value), before[path])
    dense = flatten(dequantize_params(unflat := quantize_params(params, config)))
    assert all(not is_quantized(v) for v in dense.values())
    q_proj = ("model", "layers", "0", "self_attn", "q_proj", "kernel")
    assert dense[q_proj].dtype == before[q_proj].dtype
    assert np.abs(np.asarray(dense[q_proj]) - before[q_proj]).max() <= 0.16 * np.abs(before[q_proj]).max()
    assert quantized_nbytes(unflat) < quantized_nbytes(params)


def test_skip_list_is_honoured(tiny):
    params = tiny("llama").flax_model.params
    config = QuantizationConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "mlp.down_proj"])
    quantized = flatten(quantize_params(params, config))
    names = {".".join(p[:-1]) for p, v in quantized.items() if is_quantized(v)}
    assert not any(n.endswith("down_proj") for n in names) and "lm_head" not in names
    assert "model.layers.0.mlp.up_proj" in names
    only_q = flatten(
        quantize_params(params, config, skip_modules=["lm_head", "k_proj", "v_proj", "o_proj", "mlp"])
    )
    # "mlp" is neither a module's last component nor a dot-suffix of a linear's path: they stay quantized
    names = {".".join(p[:-1]) for p, v in only_q.items() if is_quantized(v)}
    assert {n.split(".")[-1] for n in names} == {"q_proj", "gate_proj", "up_proj", "down_proj"}


def test_gpt2_conv1d_kernels(tiny):
    params = tiny("gpt2").flax_model.params
    config = QuantizationConfig(load_in_8bit=True)
    conv = {
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    quantized = flatten(quantize_params(params, config, transposed_kernels=conv))
    c_attn = quantized[("transformer", "h", "0", "attn", "c_attn", "kernel")]
    assert is_quantized(c_attn) and not c_attn.transposed and c_attn.absmax.shape == (96,)  # per output
    assert not is_quantized(quantized[("transformer", "wte", "embedding")])
