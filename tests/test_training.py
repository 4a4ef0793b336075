"""The training path: jitted optax steps over the trainable part, masks, dropout, jit.

Everything runs on the tiny random transformers models of ``tests/tiny_models.py``.
The models' own dropout matters here: tiny Llama has none (``attention_dropout=0``),
tiny GPT-2 has the usual 0.1, so GPT-2 steps get a ``dropout_rng``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from tests import parity

TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj"]}


# --------------------------------------------------------------------------- helpers


def causal_lm_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """Mean next-token cross entropy over the unmasked target positions."""
    labels = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), labels)
    return (ce * mask).sum() / mask.sum()


def make_split_loss(peft_model: jpeft.PeftModel, train: bool):
    """``loss(trainable, frozen, batch, rng)`` through ``peft_model.apply(trainable, frozen=frozen)``."""

    def loss(trainable, frozen, batch, rng):
        out = peft_model.apply(
            trainable,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            frozen=frozen,
            train=train,
            dropout_rng=rng,
        )
        return causal_lm_loss(out.logits, batch)

    return loss


def leaves_with_paths(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_bitwise_equal(a, b):
    """Same structure, and every leaf has the same dtype, shape and bytes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    la, lb = leaves_with_paths(a), leaves_with_paths(b)
    assert la.keys() == lb.keys()
    for key in la:
        x, y = np.asarray(la[key]), np.asarray(lb[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), f"{key} changed"


def snapshot(tree):
    """A host copy of every leaf (so later in-place changes, if any, would show)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def batch_for(pair) -> dict:
    return {k: jnp.asarray(v) for k, v in pair.inputs(batch=2, length=8, seed=3).items()}


# --------------------------------------------------------------------------- split-params route


# The adapter tree also carries PEFT's other trainable parts: a modules_to_save copy
# (Llama's lm_head) and trainable biases (GPT-2, bias="lora_only").
TRAIN_EXTRAS = {"llama": dict(modules_to_save=["lm_head"]), "gpt2": dict(bias="lora_only")}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_jitted_train_step_over_trainable_part(arch, tiny):
    pair = tiny(arch)
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], **TRAIN_EXTRAS[arch])
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    assert peft_model.adapters["default"]["modules_to_save" if arch == "llama" else "bias"]
    batch = batch_for(pair)
    base_before = snapshot(peft_model.base_params)
    adapter_before = leaves_with_paths(snapshot(peft_model.adapters["default"]))

    trainable, frozen = peft_model.split_params()
    # The trainable tree holds the adapter only; the frozen tree everything else.
    assert jax.tree.leaves(trainable["base"]) == []
    assert all(x is None for x in jax.tree.leaves(trainable["base"], is_leaf=lambda x: x is None))
    assert jax.tree.structure(trainable["adapters"]["default"]) == jax.tree.structure(peft_model.adapters["default"])
    assert jax.tree.leaves(frozen["adapters"]["default"]) == []
    assert len(jax.tree.leaves(frozen["base"])) == len(jax.tree.leaves(peft_model.base_params))

    # GPT-2 has its own dropout (0.1): train with a key per step. Llama has none.
    needs_rng = arch == "gpt2"
    loss_fn = make_split_loss(peft_model, train=True)
    eval_loss = jax.jit(make_split_loss(peft_model, train=False))

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(trainable)
    traces = []

    @jax.jit
    def step(trainable, opt_state, frozen, batch, rng):
        traces.append(1)  # Python side effect: runs once per trace
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, grads

    start = float(eval_loss(trainable, frozen, batch, None))
    losses = []
    for i in range(8):
        rng = jax.random.fold_in(jax.random.key(42), i) if needs_rng else None
        trainable, opt_state, loss, grads = step(trainable, opt_state, frozen, batch, rng)
        losses.append(float(loss))
        if i == 0:
            # Gradients exist only where the trainable tree has leaves (the adapter).
            assert jax.tree.structure(grads) == jax.tree.structure(trainable)
            assert jax.tree.leaves(grads["base"]) == []
            grad_leaves = leaves_with_paths(grads["adapters"]["default"])
            assert grad_leaves.keys() == adapter_before.keys()
            # B starts at zero, so A gets no gradient at step 0; everything else does.
            for key, g in grad_leaves.items():
                if "lora_A" not in key:
                    assert np.abs(np.asarray(g)).max() > 0, key
    end = float(eval_loss(trainable, frozen, batch, None))

    assert len(traces) == 1, f"the train step was traced {len(traces)} times for one input shape"
    assert np.all(np.isfinite(losses))
    assert end < start - 0.05, (start, end, losses)
    assert jax.tree.leaves(trainable["base"]) == []

    # Write back: the frozen base is bitwise what it was; the adapter moved.
    peft_model.params = jpeft.combine(trainable, frozen)
    assert_bitwise_equal(peft_model.base_params, base_before)
    assert_bitwise_equal(frozen["base"], base_before)
    for key, value in leaves_with_paths(peft_model.adapters["default"]).items():
        assert not np.array_equal(np.asarray(value), adapter_before[key]), f"{key} did not train"
    # The model's own params now give the trained loss (same compiled function).
    after = eval_loss(*peft_model.split_params(), batch, None)
    np.testing.assert_allclose(float(after), end, rtol=1e-6)


def test_inactive_adapter_is_frozen_in_split(tiny):
    pair = tiny("llama")
    peft_model = jpeft.get_peft_model(pair.flax_model, jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.add_adapter("other", jpeft.LoraConfig(r=2, target_modules=["k_proj"]))
    mask = peft_model.trainable_mask()
    assert all(jax.tree.leaves(mask["adapters"]["default"]))
    assert not any(jax.tree.leaves(mask["adapters"]["other"]))
    assert not any(jax.tree.leaves(mask["base"]))
    trainable, frozen = peft_model.split_params()
    assert jax.tree.leaves(trainable["adapters"]["other"]) == []
    assert len(jax.tree.leaves(frozen["adapters"]["other"])) == len(jax.tree.leaves(peft_model.adapters["other"]))

    peft_model.set_adapter("other")
    trainable, _ = peft_model.split_params()
    assert jax.tree.leaves(trainable["adapters"]["default"]) == []
    assert len(jax.tree.leaves(trainable["adapters"]["other"])) == len(jax.tree.leaves(peft_model.adapters["other"]))


# --------------------------------------------------------------------------- optax-mask route


def _full_tree_loss(peft_model):
    def loss(params, batch):
        out = peft_model.apply(params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return causal_lm_loss(out.logits, batch)

    return loss


@pytest.mark.parametrize("route", ["multi_transform", "masked_chain"])
def test_optax_mask_route_keeps_base_bitwise(route, tiny):
    pair = tiny("llama")
    peft_model = jpeft.get_peft_model(pair.flax_model, jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = batch_for(pair)
    params = peft_model.params
    before = snapshot(params)
    mask = peft_model.trainable_mask()
    assert jax.tree.structure(mask) == jax.tree.structure(params)

    if route == "multi_transform":
        labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
        optimizer = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels)
    else:
        # optax.masked passes unmasked updates through unchanged, so the frozen part
        # needs its own set_to_zero: a full-tree gradient must never reach the base.
        inverse = jax.tree.map(lambda m: not m, mask)
        optimizer = optax.chain(optax.masked(optax.adam(1e-2), mask), optax.masked(optax.set_to_zero(), inverse))
    opt_state = optimizer.init(params)
    loss_fn = _full_tree_loss(peft_model)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads, updates

    losses = []
    for _ in range(6):
        params, opt_state, loss, grads, updates = step(params, opt_state, batch)
        losses.append(float(loss))
        # The full-tree gradient does reach the base (it is nonzero there) ...
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["base"])) > 0
        # ... but is never used for an update.
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates["base"]))

    assert losses[-1] < losses[0] - 0.05, losses
    assert_bitwise_equal(params["base"], before["base"])
    changed = {
        k: not np.array_equal(np.asarray(v), leaves_with_paths(before["adapters"])[k])
        for k, v in leaves_with_paths(params["adapters"]).items()
    }
    assert all(changed.values()), [k for k, c in changed.items() if not c]
    peft_model.params = params
    assert_bitwise_equal(peft_model.base_params, before["base"])


def test_split_combine_round_trip(tiny):
    pair = tiny("gpt2")
    peft_model = jpeft.get_peft_model(
        pair.flax_model, jpeft.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"], bias="lora_only")
    )
    peft_model.add_adapter("second", jpeft.LoraConfig(r=2, target_modules=["c_proj"]))
    params = peft_model.params
    mask = peft_model.trainable_mask()
    trainable, frozen = jpeft.split(params, mask)
    # Complementary holes: every leaf is in exactly one of the two trees.
    n_all = len(jax.tree.leaves(params))
    n_train, n_frozen = len(jax.tree.leaves(trainable)), len(jax.tree.leaves(frozen))
    assert n_train + n_frozen == n_all and n_train > 0 and n_frozen > 0
    assert n_train == len(jax.tree.leaves(params["adapters"]["default"]))
    back = jpeft.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert x is y
    # Same through the method, and in either order.
    t2, f2 = peft_model.split_params()
    for x, y in zip(jax.tree.leaves(jpeft.combine(f2, t2)), jax.tree.leaves(params), strict=True):
        assert x is y
    # Setting the combined tree back is accepted; a wrong structure is not.
    peft_model.params = back
    with pytest.raises(ValueError, match="structure"):
        peft_model.params = {"base": params["base"], "adapters": {}}


# --------------------------------------------------------------------------- dropout


@pytest.fixture(scope="module")
def dropout_model(tiny):
    pair = tiny("llama")
    assert pair.flax_model.config.attention_dropout == 0.0  # only LoRA's own dropout is random
    peft_model = jpeft.get_peft_model(
        pair.flax_model, jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    )
    parity.perturb_jpeft_adapter(peft_model)  # B != 0, so dropout on A's input shows
    return pair, peft_model


def test_lora_dropout_depends_on_rng_in_train_mode(dropout_model):
    pair, peft_model = dropout_model
    inputs = pair.inputs()
    apply = functools.partial(peft_model.apply, peft_model.params, **inputs)
    a1 = np.asarray(apply(train=True, dropout_rng=jax.random.key(1)).logits)
    a1_again = np.asarray(apply(train=True, dropout_rng=jax.random.key(1)).logits)
    a2 = np.asarray(apply(train=True, dropout_rng=jax.random.key(2)).logits)
    eval_out = np.asarray(apply(train=False).logits)
    eval_with_key = np.asarray(apply(train=False, dropout_rng=jax.random.key(1)).logits)
    np.testing.assert_array_equal(a1, a1_again)
    assert np.abs(a1 - a2).max() > 1e-3
    assert np.abs(a1 - eval_out).max() > 1e-3
    np.testing.assert_array_equal(eval_out, eval_with_key)
    np.testing.assert_array_equal(eval_out, np.asarray(peft_model(**inputs).logits))


def test_lora_dropout_without_rng_raises(dropout_model):
    pair, peft_model = dropout_model
    with pytest.raises(ValueError, match="dropout_rng"):
        peft_model.apply(peft_model.params, **pair.inputs(), train=True)


def test_zero_lora_dropout_train_mode_needs_no_rng(tiny):
    pair = tiny("llama")
    peft_model = jpeft.get_peft_model(pair.flax_model, jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    parity.perturb_jpeft_adapter(peft_model)
    inputs = pair.inputs()
    train_out = peft_model.apply(peft_model.params, **inputs, train=True).logits
    np.testing.assert_array_equal(np.asarray(train_out), np.asarray(peft_model(**inputs).logits))


# --------------------------------------------------------------------------- jit


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_jit_matches_eager(arch, tiny):
    pair = tiny(arch)
    peft_model = jpeft.get_peft_model(pair.flax_model, jpeft.LoraConfig(r=4, target_modules=TARGETS[arch]))
    parity.perturb_jpeft_adapter(peft_model)
    inputs = pair.inputs()
    eager = np.asarray(peft_model.apply(peft_model.params, **inputs).logits)
    traces = []

    def forward(params, input_ids, attention_mask):
        traces.append(1)
        return peft_model.apply(params, input_ids=input_ids, attention_mask=attention_mask, train=False).logits

    jitted = jax.jit(forward)
    got = np.asarray(jitted(peft_model.params, **inputs))
    np.testing.assert_allclose(got, eager, rtol=1e-5, atol=1e-6)
    # Adapters change outputs, and new params of the same shapes reuse the compiled function.
    base = np.asarray(pair.flax_model(**inputs).logits)
    assert np.abs(got - base).max() > 1e-3
    params2 = jax.tree.map(lambda x: x * 1.0, peft_model.params)
    jitted(params2, **inputs)
    assert len(traces) == 1
