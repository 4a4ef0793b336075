"""The PeftModel API on NNX modules: the NNX-style module, targeting, layers, errors.

- ``peft_model.module()`` trained with ``nnx.Optimizer(wrt=nnx.LoRAParam)`` ends with the same
  adapter as the functional path (``split_params`` + ``jax.grad`` + optax), on the list and the
  scanned twin; it saves what the functional path saves.
- Targets are the torch names (``layers.0.self_attn.q_proj``), ``"all-linear"`` leaves the
  output head out, and a user's own layer class is one ``register_nnx_layer`` call away.
- Bad input: not a module, targets matching nothing, an unsupported layer class, an adapter of
  another shape: one clear error each.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jpeft
from jpeft.errors import CheckpointError, NoMatchingModuleError
from tests import nnx_twins as tw
from tests import parity
from tests.bindings.test_nnx import CFG


@pytest.fixture(scope="module")
def tiny():
    return tw.NNXTinyLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def scanned():
    return tw.NNXScannedLM(CFG, rngs=nnx.Rngs(0))


def _loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def test_nnx_optimizer_matches_functional_path(scanned, tmp_path):
    """On the scanned model: the adapters travel through the model's own nnx.scan in both styles."""
    model = scanned
    ids = jnp.asarray(tw.tiny_inputs(CFG))
    tx = optax.adam(1e-2)
    steps = 3

    # the functional path
    peft_model = jpeft.get_peft_model(model, jpeft.LoraConfig(**LORA))
    trainable, frozen = peft_model.split_params()
    state = tx.init(trainable)

    @jax.jit
    def step(trainable, state):
        loss, grads = jax.value_and_grad(lambda t: _loss(peft_model.apply(t, ids, frozen=frozen), ids))(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    for _ in range(steps):
        trainable, state, _ = step(trainable, state)
    functional = jpeft.combine(trainable, frozen)["adapters"]

    # the NNX way, on a second PeftModel built the same way
    other = jpeft.get_peft_model(model, jpeft.LoraConfig(**LORA))
    module = other.module()
    assert isinstance(module, nnx.Module)
    lora_leaves = jax.tree.leaves(nnx.state(module, nnx.LoRAParam))
    assert len(lora_leaves) == len(jax.tree.leaves(trainable))  # the adapters, nothing of the base
    parity.assert_close(module(ids), other(ids), "module() computes what the PeftModel computes", atol=0)
    optimizer = nnx.Optimizer(module, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def nnx_step(module, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(ids), ids), argnums=nnx.DiffState(0, nnx.LoRAParam))(module)
        optimizer.update(module, grads)
        return loss

    for _ in range(steps):
        nnx_step(module, optimizer)
    module.save_pretrained(tmp_path / "nnx")  # copies the adapters into `other`, then saves
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(other.adapters), jax.tree.leaves(functional), strict=True
    ):
        parity.assert_close(got, want, f"adapter leaf {jax.tree_util.keystr(path)} after {steps} steps", atol=1e-6)
    loaded = jpeft.PeftModel.from_pretrained(model, tmp_path / "nnx")
    parity.assert_close(loaded(ids), other(ids), "the module's save loads back")


def test_module_refuses_other_bindings():
    import flax.linen as nn

    linen = nn.Dense(4)
    params = linen.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    peft_model = jpeft.get_peft_model((nn.Sequential([linen]), {"layers_0": params}),
                                      jpeft.LoraConfig(r=2, target_modules=["layers_0"]))
    with pytest.raises(TypeError, match="not an nnx.Module"):
        peft_model.module()


def test_names_are_torch_names(tiny, scanned):
    import torch

    want = {n for n, m in tw.TorchTinyLM(CFG).named_modules() if n and any(True for _ in m.parameters(recurse=False))}
    for model in (tiny, scanned):
        modules = jpeft.named_modules(model)
        with_weights = {n for n, info in modules.items() if info.param_shapes}
        assert with_weights == want
        assert modules["layers.1.self_attn.q_proj"].features == (CFG.dim, CFG.dim)
        assert modules["embed_tokens"].kind == "embedding"
    stacked = jpeft.named_modules(scanned)["layers.1.mlp.down_proj"]
    assert stacked.stack is not None and (stacked.stack.name, stacked.stack.position) == ("layers.mlp.down_proj", 1)
    del torch


def test_all_linear_leaves_out_the_head(tiny):
    peft_model = jpeft.get_peft_model(tiny, jpeft.LoraConfig(r=2, target_modules="all-linear"))
    targeted = set(peft_model.targeted_modules())
    assert "lm_head" not in targeted
    assert {f"layers.{i}.mlp.{p}" for i in range(CFG.layers) for p in ("gate_proj", "up_proj", "down_proj")} <= targeted
    assert len(targeted) == 7 * CFG.layers


def test_regex_and_exclude(scanned):
    config = jpeft.LoraConfig(r=2, target_modules=r"layers\.\d+\.self_attn\.(q|k)_proj", exclude_modules=["layers.0.self_attn.k_proj"])
    peft_model = jpeft.get_peft_model(scanned, config)
    assert set(peft_model.targeted_modules()) == {
        "layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj"
    }
    parity.perturb_trainable(peft_model)
    ids = tw.tiny_inputs(CFG)
    assert parity.max_diff(peft_model(ids), scanned(ids)) > 1e-3


class TransposedDense(nnx.Module):
    """A custom layer holding its weight torch-style, ``(out, in)``."""

    def __init__(self, n_in: int, n_out: int, *, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (n_out, n_in)) * 0.3)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.w[...].T


class TwoLayers(nnx.Module):
    def __init__(self, custom: bool, *, rngs: nnx.Rngs):
        self.proj = TransposedDense(6, 5, rngs=rngs) if custom else nnx.Linear(6, 5, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.proj(x)))


def test_registered_custom_layer(tmp_path):
    custom = TwoLayers(True, rngs=nnx.Rngs(0))
    config = jpeft.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)
    with pytest.raises(NoMatchingModuleError, match=r"TransposedDense.*register_nnx_layer"):
        jpeft.get_peft_model(custom, config)
    jpeft.register_nnx_layer(TransposedDense, jpeft.LayerSpec("linear", "w", in_axes=(1,), out_axes=(0,), bias=None))
    peft_model = jpeft.get_peft_model(custom, config)
    assert jpeft.named_modules(custom)["proj"].features == (6, 5)
    peft_model.save_pretrained(tmp_path / "a")
    # The same adapter on the stock layer with the same weight (transposed) computes the same.
    plain = TwoLayers(False, rngs=nnx.Rngs(1))
    plain.proj.kernel[...] = custom.proj.w[...].T
    plain.out.kernel[...] = custom.out.kernel[...]
    plain.out.bias[...] = custom.out.bias[...]
    loaded = jpeft.PeftModel.from_pretrained(plain, tmp_path / "a")
    x = jax.random.normal(jax.random.key(2), (2, 6))
    parity.assert_close(loaded(x), peft_model(x), "custom layer vs nnx.Linear")
    assert parity.max_diff(peft_model(x), custom(x)) > 1e-3
    merged = peft_model.merge_and_unload()
    parity.assert_close(merged(x), peft_model(x), "merged custom layer")


def test_einsum_equation_checks():
    from jpeft.bindings.nnx_layers import spec_for
    from jpeft.errors import ConfigError

    spec = spec_for(nnx.Einsum("btd,dnh->btnh", (6, 2, 3), rngs=nnx.Rngs(0)))
    assert (spec.in_axes, spec.out_axes) == ((0,), (1, 2))
    spec = spec_for(nnx.Einsum("btnh,nhd->btd", (2, 3, 6), rngs=nnx.Rngs(0)))
    assert (spec.in_axes, spec.out_axes) == ((0, 1), (2,))
    spec = spec_for(nnx.Einsum("btd,hd->bth", (3, 6), rngs=nnx.Rngs(0)))  # torch layout: (out, in)
    assert (spec.in_axes, spec.out_axes) == ((1,), (0,))
    with pytest.raises(ConfigError, match="not a linear map"):
        spec_for(nnx.Einsum("bnd,ndk->bnk", (2, 6, 3), rngs=nnx.Rngs(0)))  # one weight per head index


def test_bad_input():
    with pytest.raises(TypeError, match="nnx.Module"):
        jpeft.get_peft_model(object(), jpeft.LoraConfig(target_modules=["q"]))
    model = TwoLayers(False, rngs=nnx.Rngs(0))
    with pytest.raises(NoMatchingModuleError, match=r"(?s)not found.*proj \(Linear 6->5\)"):
        jpeft.get_peft_model(model, jpeft.LoraConfig(target_modules=["nope"]))

    class WithNorm(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(3, 4, (3, 3), rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)

    for target, cls in (("up", "ConvTranspose"), ("norm", "LayerNorm")):
        with pytest.raises(NoMatchingModuleError, match=rf"{target} is a flax.nnx.*{cls}.*register_nnx_layer"):
            jpeft.get_peft_model(WithNorm(nnx.Rngs(0)), jpeft.LoraConfig(target_modules=[target]))
    with pytest.raises(Exception, match="prompt learning needs a transformers Flax model"):
        jpeft.get_peft_model(model, jpeft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))


def test_adapter_of_another_shape_is_refused(tiny, tmp_path):
    peft_model = jpeft.get_peft_model(tiny, jpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "a")
    wider = tw.NNXTinyLM(tw.TwinConfig(dim=24, heads=4, kv_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="shape"):
        jpeft.PeftModel.from_pretrained(wider, tmp_path / "a")


@pytest.mark.parametrize("flavour", ["tiny", "scanned"])
def test_mixed_batch(request, flavour):
    """Each example with its own adapter equals that adapter alone; on the stack too, with a partial stack
    (LoRA's batched path) and IA3 (selected per example)."""
    ids = np.concatenate([tw.tiny_inputs(CFG)] * 2)[:3]
    model = request.getfixturevalue(flavour)
    peft_model = jpeft.get_peft_model(
        model, jpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), mixed=True
    )
    peft_model.add_adapter("other", jpeft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers", init_lora_weights=False
    ))
    peft_model.add_adapter("ia3", jpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    params = peft_model.params
    params["adapters"]["ia3"] = jax.tree.map(lambda v: v * 1.5, params["adapters"]["ia3"])
    peft_model.params = params
    mixed = np.asarray(peft_model(ids, adapter_names=["other", "ia3", "default"]))
    for row, name in enumerate(["other", "ia3", "default"]):
        alone = np.asarray(peft_model(ids, active_adapters=[name]))
        parity.assert_close(mixed[row], alone[row], f"{flavour} row {row}: {name}")
        assert parity.max_diff(alone[row], model(ids)[row]) > 1e-3


def test_dropout_and_train_mode(tiny):
    ids = tw.tiny_inputs(CFG)
    config = jpeft.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False)
    peft_model = jpeft.get_peft_model(tiny, config)
    params = peft_model.params
    evaluated = np.asarray(peft_model.apply(params, ids))
    first = np.asarray(peft_model.apply(params, ids, train=True, dropout_rng=jax.random.key(0)))
    assert parity.max_diff(first, evaluated) > 1e-4
    np.testing.assert_array_equal(np.asarray(peft_model.apply(params, ids, train=True, dropout_rng=jax.random.key(0))), first)


def test_qlora_on_an_nnx_base(tiny):
    ids = tw.tiny_inputs(CFG)
    base = jpeft.quantize_model(tiny, jpeft.QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    assert isinstance(base, nnx.Module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = jpeft.get_peft_model(base, jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    kernel = peft_model.base_params["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert hasattr(kernel, "dequantize"), "the base kernels stay 4-bit inside the PeftModel"
    out = np.asarray(jax.jit(peft_model.apply)(peft_model.params, ids))
    assert parity.max_diff(out, tiny(ids)) > 1e-3  # 4-bit weights
    # the adapted forward is the dequantized base model's (the adapter starts as a no-op)
    parity.assert_close(out, peft_model.merge_and_unload(dequantize=True)(ids), "QLoRA forward vs dequantized base")
    trainable, frozen = peft_model.split_params()
    grads = jax.grad(lambda t: _loss(peft_model.apply(t, ids, frozen=frozen), jnp.asarray(ids)))(trainable)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_make_train_step_and_remat(tiny):
    """jpeft's train step on an NNX model returning bare logits; rematerialised blocks give the same losses."""
    model = tiny
    ids = jnp.asarray(tw.tiny_inputs(CFG))
    losses = []
    for remat in (False, True):
        peft_model = jpeft.get_peft_model(model, jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        if remat:
            peft_model.enable_gradient_checkpointing()
        trainer = jpeft.train.make_train_step(peft_model, optax.adam(1e-2))
        state = trainer.init(jax.random.key(0))
        for _ in range(2):
            state, metrics = trainer.step(state, trainer.frozen(), {"input_ids": ids})
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses[0]) and abs(losses[0] - losses[1]) <= 1e-5, losses
