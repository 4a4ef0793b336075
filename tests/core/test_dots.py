"""jpeft.core.dots: bf16 products accumulated in float32 (the form XLA:CPU runs on its bf16 units)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from jpeft.core import dots
from jpeft.quant.formats import is_quantized

BF16 = jnp.bfloat16
# bf16 keeps 8 bits of mantissa: two roundings of the same f32 sum in another order differ by
# at most a unit or two in the last place, 2**-7 of the value.
BF16_RTOL = 2.0**-6


def _rand(key, shape, dtype=BF16):
    return jax.random.normal(jax.random.key(key), shape).astype(dtype)


def _close(actual, expected, rtol=BF16_RTOL):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    scale = np.max(np.abs(expected))
    assert scale > 1e-4  # a real comparison, not of zeros
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize(
    "dims, shapes",
    [
        ((((1,), (0,)), ((), ())), ((24, 32), (32, 16))),
        ((((1,), (1,)), ((), ())), ((24, 32), (16, 32))),
        ((((2,), (0,)), ((), ())), ((2, 12, 32), (32, 16))),
    ],
)
def test_dot_is_the_widened_product_rounded(dims, shapes):
    a, b = _rand(0, shapes[0]), _rand(1, shapes[1])
    got = jax.jit(lambda a, b: dots.dot(a, b, dims))(a, b)
    assert got.dtype == BF16 and got.shape == lax.dot_general(a, b, dims).shape
    reference = lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims).astype(BF16)
    _close(got, reference, rtol=2.0**-7)


def test_dot_leaves_other_dtypes_to_lax():
    a32, b32 = _rand(0, (8, 16), jnp.float32), _rand(1, (16, 4), jnp.float32)
    dims = (((1,), (0,)), ((), ()))
    jaxpr = str(jax.make_jaxpr(lambda a, b: dots.dot(a, b, dims))(a32, b32))
    assert "platform_index" not in jaxpr and "preferred_element_type=float32" not in jaxpr
    np.testing.assert_array_equal(dots.dot(a32, b32, dims), lax.dot_general(a32, b32, dims))
    mixed = dots.dot(a32.astype(BF16), b32, dims)  # mixed dtypes: lax's promotion, as before
    assert mixed.dtype == lax.dot_general(a32.astype(BF16), b32, dims).dtype


@pytest.mark.parametrize("kernel_axis", [0, 1])
@pytest.mark.parametrize("x_shape", [(3, 10, 32), (20, 32)])
def test_dense_value_and_gradients(kernel_axis, x_shape):
    x = _rand(0, x_shape)
    kernel = _rand(1, (32, 24) if kernel_axis == 0 else (24, 32))
    weight = _rand(2, (*x_shape[:-1], 24), jnp.float32)  # a non-uniform cotangent

    def loss(fn):
        return lambda x, k: jnp.sum(fn(x, k).astype(jnp.float32) * weight)

    fast = jax.jit(jax.value_and_grad(loss(lambda x, k: dots.dense(x, k, kernel_axis=kernel_axis)), (0, 1)))
    k_in = (lambda k: k) if kernel_axis == 0 else (lambda k: k.T)

    def reference(x, k):  # the same math in float32, rounded to bf16 where the layer rounds
        return (x.astype(jnp.float32) @ k_in(k).astype(jnp.float32)).astype(BF16)

    slow = jax.jit(jax.value_and_grad(loss(reference), (0, 1)))
    (v, (dx, dk)), (rv, (rdx, rdk)) = fast(x, kernel), slow(x, kernel)
    assert dx.dtype == BF16 and dk.dtype == BF16 and dk.shape == kernel.shape
    _close(v, rv)
    _close(dx, rdx)
    _close(dk, rdk)


def test_dense_training_form_is_reverse_mode_only_and_eval_form_is_not():
    x, kernel = _rand(0, (6, 32)), _rand(1, (32, 8))
    tangent = jnp.ones_like(x)
    y, dy = jax.jvp(lambda x: dots.dense(x, kernel, train=False), (x,), (tangent,))
    _close(dy, dots.dense(tangent, kernel, train=False), rtol=2.0**-7)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: dots.dense(x, kernel, train=True), (x,), (tangent,))


def test_dense_vmaps_and_takes_f32_as_plain_matmul():
    x, kernel = _rand(0, (4, 5, 32)), _rand(1, (32, 8))
    per_row = jax.vmap(lambda r: dots.dense(r, kernel))(x)
    _close(per_row, dots.dense(x, kernel), rtol=2.0**-7)
    x32, k32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
    np.testing.assert_array_equal(dots.dense(x32, k32), x32 @ k32)


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_compiled_cpu_backward_never_widens_the_kernel():
    """The point of it: no float32 copy of a bf16 kernel anywhere in the compiled step.

    The first assertion shows the check can fail: left to XLA:CPU, the same bf16 product and its
    gradient multiply a float32 copy of the kernel.
    """
    x, kernel = _rand(0, (4, 16, 32)), _rand(1, (32, 48))
    plain = _hlo(jax.grad(lambda x, k: jnp.sum((x @ k).astype(jnp.float32) ** 2)), x, kernel)
    assert "f32[32,48]" in plain
    fast = _hlo(jax.grad(lambda x, k: jnp.sum(dots.dense(x, k).astype(jnp.float32) ** 2)), x, kernel)
    assert "f32[32,48]" not in fast and "bf16[32,48]" in fast


# --------------------------------------------------------------------------- through a model


def _bf16_lora_model(pair, targets, quantized=False):
    import jpeft

    model = pair.flax_class(pair.flax_model.config, dtype=BF16, seed=0)
    model.params = jax.tree.map(lambda p: p.astype(BF16), pair.flax_model.params)
    if quantized:  # QLoRA: NF4 kernels decoded to bf16 inside the layer
        config = jpeft.QuantizationConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16"
        )
        model = jpeft.quantize_model(model, config)
    peft_model = jpeft.get_peft_model(
        model, jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    return peft_model


@pytest.mark.parametrize(
    "arch, targets, kernel, quantized",
    [
        ("llama", ["q_proj", "v_proj"], "f32[32,64]", False),
        ("gpt2", ["c_attn"], "f32[128,32]", False),
        ("llama", ["q_proj", "v_proj"], None, True),  # NF4 decodes through f32: no shape check
    ],
)
def test_bf16_model_layers_take_the_accumulating_form(tiny, monkeypatch, arch, targets, kernel, quantized):
    """A bf16 model's linear layers through jpeft: same logits and LoRA gradients as the layers'
    own code, and no widened float32 kernel in the compiled training step."""
    import jpeft
    from jpeft.bindings import linen

    pair = tiny(arch)
    peft_model = _bf16_lora_model(pair, targets, quantized)
    batch = {k: jnp.asarray(v) for k, v in pair.inputs().items()}

    def outputs():
        trainer = jpeft.train.make_train_step(peft_model, optax.sgd(0.1), precision="bf16", return_grads=True)
        state, frozen = trainer.init(jax.random.key(0)), trainer.frozen()
        params = jax.tree.map(
            lambda p: p if is_quantized(p) else p.astype(BF16), trainer.params(state), is_leaf=is_quantized
        )
        logits = jax.jit(lambda p: peft_model.apply(p, batch["input_ids"]).logits)(params)
        text = trainer.step.lower(state, frozen, batch).compile().as_text()
        _, metrics = trainer.step(state, frozen, batch)
        return logits, metrics["grads"], text

    taken = []
    real = linen._bf16_linear

    def counting(module, *args):
        out = real(module, *args)
        if out is not None:
            taken.append(".".join(module.path))
        return out

    monkeypatch.setattr(linen, "_bf16_linear", counting)
    fast_logits, fast_grads, fast_text = outputs()
    layers = {n for n, m in peft_model.named_modules().items() if m.kind == "linear" and n != "lm_head"}
    assert layers and layers <= set(taken)  # every linear layer but the head (the fused loss has it)
    monkeypatch.setattr(linen, "_bf16_linear", lambda *args: None)  # the layers' own matmuls
    plain_logits, plain_grads, plain_text = outputs()

    assert fast_logits.dtype == plain_logits.dtype == BF16
    if kernel is not None:
        assert kernel in plain_text and kernel not in fast_text
    # two bf16 models whose matmuls sum in another order: a few units in bf16's last place
    _close(fast_logits, plain_logits, rtol=2.0**-5)
    for got, want in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(plain_grads), strict=True):
        _close(got, want, rtol=2.0**-4)
