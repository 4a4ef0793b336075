"""QLoRA (LoRA on a quantized base) and LoftQ through the public API, with torch PEFT on the export side."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.bindings import bind
from jpeft.core.tree import flatten, get_path
from jpeft.quant import (
    QuantizationConfig,
    dequantize_params,
    is_quantized,
    loftq_init,
    quantize,
    quantized_nbytes,
)
from tests import parity

NF4 = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _qlora(pair, config=NF4, **lora):
    base = jpeft.quantize_model(pair.flax_model, config)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[pair.arch], "init_lora_weights": False, **lora}
    return base, jpeft.get_peft_model(base, jpeft.LoraConfig(**lora), key=jax.random.key(1))


def _dense_twin(pair, base, peft_model):
    """The same LoRA adapter on the dequantized base (what the quantized model must compute)."""
    dense = bind(pair.flax_model).with_params(dequantize_params(base.params))
    twin = jpeft.get_peft_model(dense, peft_model.peft_config["default"], key=jax.random.key(1))
    twin.params = {"base": twin.base_params, "adapters": peft_model.adapters}
    return dense, twin


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_qlora_forward_equals_lora_on_the_dequantized_base(arch, tiny):
    pair = tiny(arch)
    base, model = _qlora(pair)
    quantized = [".".join(p[:-1]) for p, v in flatten(model.base_params).items() if is_quantized(v)]
    assert quantized and not any("lm_head" in n or "wte" in n for n in quantized)
    _, twin = _dense_twin(pair, base, model)
    inputs = pair.inputs()
    got = np.asarray(jax.jit(lambda p: model.apply(p, **inputs).logits)(model.params))
    parity.assert_close(got, parity.jax_logits(twin, inputs), "QLoRA vs LoRA on the decoded base")
    assert parity.max_diff(got, parity.jax_logits(pair.flax_model, inputs)) > 1e-3


def test_qlora_counts_as_peft_counts_4bit_bases(tiny):
    pair = tiny("llama")
    _, model = _qlora(pair)
    plain = jpeft.get_peft_model(pair.flax_model, model.peft_config["default"])
    # PEFT counts a Params4bit by its original elements: the totals equal the unquantized model's
    assert model.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()
    assert parity.captured(model.print_trainable_parameters) == parity.captured(
        plain.print_trainable_parameters
    )


def test_qlora_stored_base_is_small(tiny):
    pair = tiny("llama")
    config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    base = jpeft.quantize_model(pair.flax_model, config, skip_modules=["lm_head"])
    kernels = {p: v for p, v in flatten(base.params).items() if is_quantized(v)}
    dense_bf16 = sum(v.size * 2 for v in kernels.values())
    assert quantized_nbytes(kernels) <= 0.3 * dense_bf16
    # the caller's model is untouched
    assert not any(is_quantized(v) for v in jax.tree.leaves(pair.flax_model.params, is_leaf=is_quantized))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_qlora_trains_adapter_only_and_keeps_the_codes(precision, tiny):
    pair = tiny("llama")
    _, model = _qlora(pair, init_lora_weights=True)
    codes_before = {p: np.asarray(v.packed) for p, v in flatten(model.base_params).items() if is_quantized(v)}
    trainer = jpeft.train.make_train_step(model, optax.adam(1e-2), precision=precision)
    frozen = trainer.frozen()
    decoded = [v for v in jax.tree.leaves(frozen, is_leaf=is_quantized) if is_quantized(v)]
    assert decoded and all(
        v.compute_dtype == jnp.dtype(jnp.bfloat16 if precision == "bf16" else jnp.float32) for v in decoded
    )
    state = trainer.init(jax.random.key(0))
    batch = {k: v for k, v in pair.inputs(batch=4, length=8).items()}
    losses = []
    for _ in range(8):
        state, metrics = trainer.step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    model.params = trainer.params(state)
    for path, codes in codes_before.items():
        np.testing.assert_array_equal(np.asarray(get_path(model.base_params, path).packed), codes)


def test_qlora_generate_save_load_and_torch_export(tiny, tmp_path):
    pair = tiny("gpt2")
    base, model = _qlora(pair)
    _, twin = _dense_twin(pair, base, model)
    prompt = pair.inputs(batch=2, length=4)["input_ids"]
    np.testing.assert_array_equal(
        np.asarray(model.generate(prompt, max_length=10).sequences),
        np.asarray(twin.generate(prompt, max_length=10).sequences),
    )
    inputs = pair.inputs()
    want = parity.jax_logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = jpeft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    np.testing.assert_array_equal(parity.jax_logits(reloaded, inputs), want)

    # a torch user: the decoded base as a transformers checkpoint + the adapter, in torch PEFT
    import transformers

    model.save_base_model(tmp_path / "base")
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    torch_model = parity.peft_from_pretrained(torch_base, tmp_path / "adapter")
    parity.assert_close(parity.torch_logits(torch_model, inputs), want, "torch PEFT on the exported base")


def test_qlora_merge_requantizes_or_dequantizes(tiny):
    pair = tiny("llama")
    _, model = _qlora(pair)
    inputs = pair.inputs()
    unmerged = parity.jax_logits(model, inputs)
    full = model.merge_and_unload(dequantize=True)
    assert not any(is_quantized(v) for v in jax.tree.leaves(full.params, is_leaf=is_quantized))
    parity.assert_close(parity.jax_logits(full, inputs), unmerged, "dequantize=True merge")
    with pytest.warns(UserWarning, match="quantized again"):
        requantized = model.merge_and_unload()
    kernel = get_path(requantized.params, ("model", "layers", "0", "self_attn", "q_proj", "kernel"))
    assert is_quantized(kernel)
    # re-quantization rounds: off by about one quantization error, not more
    diff = parity.max_diff(parity.jax_logits(requantized, inputs), unmerged)
    base = jpeft.quantize_model(pair.flax_model, NF4)
    quantization_error = parity.max_diff(
        parity.jax_logits(base, inputs), parity.jax_logits(pair.flax_model, inputs)
    )
    assert 0 < diff < 3 * quantization_error, (diff, quantization_error)


def test_int8_base(tiny):
    pair = tiny("llama")
    base, model = _qlora(pair, QuantizationConfig(load_in_8bit=True))
    kernel = get_path(model.base_params, ("model", "layers", "0", "mlp", "down_proj", "kernel"))
    assert is_quantized(kernel) and kernel.quant_type == "int8"
    _, twin = _dense_twin(pair, base, model)
    parity.assert_close(
        parity.jax_logits(model, pair.inputs()), parity.jax_logits(twin, pair.inputs()), "int8"
    )


# --------------------------------------------------------------------------- LoftQ


def _loftq_model(pair, bits=4, iters=2, targets=("q_proj", "v_proj")):
    config = jpeft.LoraConfig(
        r=4,
        lora_alpha=4,  # LoftQ's W ~ Q + B A holds for scaling 1 (PEFT does not compensate)
        target_modules=list(targets),
        init_lora_weights="loftq",
        loftq_config=jpeft.LoftQConfig(loftq_bits=bits, loftq_iter=iters),
    )
    return jpeft.get_peft_model(pair.flax_model, config)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_init_replaces_base_and_beats_plain_quantization(bits, tiny):
    pair = tiny("llama")
    model = _loftq_model(pair, bits=bits)
    path = ("model", "layers", "0", "self_attn", "q_proj", "kernel")
    w = np.asarray(get_path(pair.flax_model.params, path)).T  # torch (out, in)
    q = np.asarray(get_path(model.base_params, path)).T
    lora = model.adapters["default"]["lora"]["model.layers.0.self_attn.q_proj"]
    ref_q, ref_a, ref_b = loftq_init(jnp.asarray(w), bits=bits, iters=2, rank=4)
    np.testing.assert_allclose(q, np.asarray(ref_q), atol=1e-6)
    np.testing.assert_allclose(np.asarray(lora["lora_A"]).T, np.asarray(ref_a), atol=1e-6)
    np.testing.assert_allclose(np.asarray(lora["lora_B"]).T, np.asarray(ref_b), atol=1e-6)
    plain_q = np.asarray(quantize(jnp.asarray(w), "nf4" if bits == 4 else "int8").dequantize(jnp.float32))
    loftq_error = np.linalg.norm(w - (q + np.asarray(lora["lora_B"]).T @ np.asarray(lora["lora_A"]).T))
    assert loftq_error < np.linalg.norm(w - plain_q)
    # the base is LoftQ's Q: quantizing it again reproduces Q exactly (QLoRA + LoftQ)
    if bits == 4:
        again = jpeft.quantize_model(
            (model.unload()), QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        )
        np.testing.assert_array_equal(np.asarray(get_path(again.params, path).dequantize(jnp.float32)).T, q)


def test_loftq_export_reproduces_outputs_in_torch_peft(tiny, tmp_path):
    import peft
    import transformers

    pair = tiny("llama")
    model = _loftq_model(pair)
    parity.perturb_jpeft_adapter(model, seed=3, scale=0.05)  # "trained"
    inputs = pair.inputs()
    want = parity.jax_logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    model.save_base_model(tmp_path / "base")
    saved = jpeft.config_from_dict(
        __import__("json").loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    )
    assert saved.init_lora_weights is True and saved.loftq_config == {}
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    torch_model = peft.PeftModel.from_pretrained(torch_base, tmp_path / "adapter").eval()
    parity.assert_close(parity.torch_logits(torch_model, inputs), want, "LoftQ export in torch PEFT")


def test_loftq_errors(tiny):
    pair = tiny("llama")
    with pytest.raises(jpeft.ConfigError, match="loftq_config` must be specified"):
        jpeft.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(jpeft.ConfigError, match="loftq_bits"):
        jpeft.LoftQConfig(loftq_bits=3)
    with pytest.warns(UserWarning, match="loftq_config` specified but will be ignored"):
        assert jpeft.LoraConfig(loftq_config={"loftq_bits": 4, "loftq_iter": 1}).loftq_config == {}
    with pytest.raises(jpeft.ConfigError, match="already quantized"):
        base = jpeft.quantize_model(pair.flax_model, NF4)
        jpeft.get_peft_model(
            base,
            jpeft.LoraConfig(
                target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=jpeft.LoftQConfig()
            ),
        )
    with pytest.raises(jpeft.ConfigError, match="embedding"):
        _loftq_model(pair, targets=("embed_tokens",))
