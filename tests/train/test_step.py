"""``jpeft.train``: the jitted train step, gradient accumulation, losses, mixed precision,
gradient checkpointing and the full-tree masked optimizer.

Everything runs on the tiny random transformers models of ``tests/tiny_models.py``.
Tiny Llama has no dropout, so its steps are deterministic functions of the batch;
tiny GPT-2, BERT and BART have the usual 0.1 dropout, which the step keys from
``state.rng``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
import jpeft.train
from jpeft.train import (
    IGNORE_INDEX,
    Policy,
    causal_lm_loss,
    classification_loss,
    make_train_step,
    masked_optimizer,
    mean_loss,
    seq2seq_lm_loss,
    shift_tokens_right,
)

# LoRA on the attention projections.
ATTENTION = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
}


# --------------------------------------------------------------------------- helpers


def leaves_with_paths(tree, keep_none: bool = False):
    is_leaf = (lambda x: x is None) if keep_none else None
    return {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    }


def snapshot(tree):
    """Host copies of every leaf."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_bitwise_equal(a, b, what: str = "tree"):
    """Same structure, and every leaf has the same dtype, shape and bytes."""
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    la, lb = leaves_with_paths(a), leaves_with_paths(b)
    assert la.keys() == lb.keys(), what
    for key in la:
        x, y = np.asarray(la[key]), np.asarray(lb[key])
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}{key}"
        assert x.tobytes() == y.tobytes(), f"{what}{key} changed"


def assert_trees_close(a, b, atol: float, what: str = "tree"):
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    la, lb = leaves_with_paths(a), leaves_with_paths(b)
    for key in la:
        np.testing.assert_allclose(
            np.asarray(la[key]), np.asarray(lb[key]), rtol=0, atol=atol, err_msg=f"{what}{key}"
        )


def max_abs_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def lora_model(pair, targets, task_type="CAUSAL_LM", **kwargs) -> jpeft.PeftModel:
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type, **kwargs)
    return jpeft.get_peft_model(pair.flax_model, config)


def lm_batch(pair, batch: int = 4, length: int = 8, seed: int = 3) -> dict:
    return {k: jnp.asarray(v) for k, v in pair.inputs(batch=batch, length=length, seed=seed).items()}


def causal_eval_loss(peft_model):
    """Deterministic (train=False) mean next-token loss of a full params tree."""

    @jax.jit
    def loss(params, batch):
        out = peft_model.apply(params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch.get("labels", batch["input_ids"])
        return mean_loss(causal_lm_loss(out.logits, labels, batch["attention_mask"]))

    return loss


def count_remat_eqns(jaxpr) -> int:
    """Equations of the remat/checkpoint primitive, in ``jaxpr`` and every jaxpr nested in it."""

    def sub_jaxprs(value):
        if isinstance(value, jax.extend.core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jax.extend.core.Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            for item in value:
                yield from sub_jaxprs(item)

    count = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if "remat" in name or "checkpoint" in name:
            count += 1
        for value in eqn.params.values():
            for sub in sub_jaxprs(value):
                count += count_remat_eqns(sub)
    return count


# --------------------------------------------------------------------------- the train step


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_step_lowers_loss_and_keeps_frozen_tree(arch, tiny):
    pair = tiny(arch)
    peft_model = lora_model(pair, ATTENTION[arch])
    assert len(peft_model.targeted_modules()) == 2 * len(ATTENTION[arch])
    batch = lm_batch(pair)
    base_before = snapshot(peft_model.base_params)

    traces = []
    default_loss = jpeft.train.loss_for_task("CAUSAL_LM")

    def counting_loss(outputs, batch):
        traces.append(1)  # Python side effect: runs once per trace of the step
        return default_loss(outputs, batch)

    trainer = make_train_step(peft_model, optax.adam(1e-2), loss_fn=counting_loss)
    state = trainer.init(jax.random.key(0))
    frozen = trainer.frozen()
    frozen_before = snapshot(frozen)

    # The trainable tree holds the active adapter only: None holes everywhere under "base".
    base_holes = leaves_with_paths(state.trainable["base"], keep_none=True)
    assert len(base_holes) == len(jax.tree.leaves(peft_model.base_params))
    assert all(leaf is None for leaf in base_holes.values())
    assert jax.tree.structure(state.trainable["adapters"]["default"]) == jax.tree.structure(
        peft_model.adapters["default"]
    )
    # ... and the frozen tree everything else.
    assert len(jax.tree.leaves(frozen["base"])) == len(jax.tree.leaves(peft_model.base_params))
    assert jax.tree.leaves(frozen["adapters"]) == []

    eval_loss = causal_eval_loss(peft_model)
    start = float(eval_loss(trainer.params(state), batch))
    step_losses = []
    for _ in range(10):
        state, metrics = trainer.step(state, frozen, batch)
        step_losses.append(float(metrics["loss"]))
        assert all(
            leaf is None for leaf in leaves_with_paths(state.trainable["base"], keep_none=True).values()
        )
    end = float(eval_loss(trainer.params(state), batch))

    assert np.all(np.isfinite(step_losses))
    assert end < start - 0.05, (start, end, step_losses)
    assert step_losses[-1] < step_losses[0], step_losses
    assert int(state.step) == 10
    # Compiled once for ten steps of the same shapes.
    assert len(traces) == 1, f"loss traced {len(traces)} times"
    if hasattr(trainer.step, "_cache_size"):
        assert trainer.step._cache_size() == 1

    # The frozen tree (the step's argument and a fresh one) and the model's base are bitwise unchanged.
    assert_bitwise_equal(frozen, frozen_before, "frozen")
    assert_bitwise_equal(trainer.frozen(), frozen_before, "frozen()")
    assert_bitwise_equal(peft_model.base_params, base_before, "base_params")
    assert_bitwise_equal(trainer.params(state)["base"], base_before, "params(state)['base']")

    # The adapter moved; writing it back gives the model the trained loss.
    peft_model.params = trainer.params(state)
    np.testing.assert_allclose(float(eval_loss(peft_model.params, batch)), end, rtol=1e-6)
    assert_bitwise_equal(peft_model.base_params, base_before, "base_params after write-back")


# --------------------------------------------------------------------------- gradient accumulation

ROW_LENGTHS = [8, 8, 3, 8, 2, 5, 8, 4]  # micro-batches of 2 rows hold very different token counts


def padded_batch(pair) -> dict:
    rng = np.random.RandomState(11)
    vocab = pair.flax_model.config.vocab_size
    ids = rng.randint(3, vocab, (8, 8)).astype(np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(ROW_LENGTHS):
        mask[row, :length] = 1
    ids = np.where(mask > 0, ids, 0)  # padding token 0 on the right
    labels = ids.copy()
    labels[0, 1:4] = IGNORE_INDEX  # a "prompt" that does not count
    labels[3, 1:6] = IGNORE_INDEX
    labels[6, 5] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}


def micro_token_counts(batch, k: int) -> list[int]:
    labels, mask = np.asarray(batch["labels"]), np.asarray(batch["attention_mask"])
    valid = (labels[:, 1:] != IGNORE_INDEX) & (mask[:, 1:] > 0)
    return [int(c) for c in valid.reshape(k, -1, valid.shape[1]).sum(axis=(1, 2))]


def test_grad_accumulation_equals_full_batch_with_token_weighting(tiny):
    pair = tiny("llama")  # no dropout: the micro-batches see the same function as the full batch
    # Random B too, so every adapter leaf gets a gradient on the first step.
    peft_model = lora_model(pair, ATTENTION["llama"], init_lora_weights=False)
    batch = padded_batch(pair)
    counts = micro_token_counts(batch, 4)
    assert len(set(counts)) > 1, counts  # the weighting matters
    lr = 0.5

    full = make_train_step(peft_model, optax.sgd(lr), grad_accum_steps=1)
    accum = make_train_step(peft_model, optax.sgd(lr), grad_accum_steps=4)
    frozen = full.frozen()
    state0 = full.init(jax.random.key(0))
    assert_bitwise_equal(accum.init(jax.random.key(0)).trainable, state0.trainable)
    initial = jax.device_get(state0)

    s1, m1 = full.step(state0, frozen, batch)  # donates state0
    s4, m4 = accum.step(accum.init(jax.random.key(0)), frozen, batch)

    # The full-batch loss is the token-weighted mean over all counted targets.
    trainable, _ = peft_model.split_params()

    @jax.jit
    def loss_parts(tr, b):
        out = peft_model.apply(
            tr, frozen=frozen, input_ids=b["input_ids"], attention_mask=b["attention_mask"]
        )
        return causal_lm_loss(out.logits, b["labels"], b["attention_mask"])

    total, count = loss_parts(trainable, batch)
    assert float(count) == sum(counts) == float(m1["count"]) == float(m4["count"])
    np.testing.assert_allclose(float(m1["loss"]), float(total / count), rtol=1e-6)

    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert max_abs_diff(s1.trainable, initial.trainable) > 1e-3  # the step did something
    assert_trees_close(s4.trainable, s1.trainable, atol=1e-6, what="accumulated vs full")

    # A naive mean of the micro-batch means is a different loss and a different update.
    micro = [jax.tree.map(lambda x, i=i: x[2 * i : 2 * i + 2], batch) for i in range(4)]
    means = [float(mean_loss(loss_parts(trainable, b))) for b in micro]
    naive_loss = float(np.mean(means))
    assert abs(naive_loss - float(m1["loss"])) > 1e-3, (naive_loss, float(m1["loss"]))

    @jax.jit
    def micro_mean_grad(b):
        return jax.grad(lambda tr: mean_loss(loss_parts(tr, b)))(trainable)

    grads = [micro_mean_grad(b) for b in micro]
    naive_grad = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
    naive_params = jax.tree.map(lambda p, g: p - lr * g, trainable, naive_grad)
    assert max_abs_diff(naive_params, s1.trainable) > 1e-4
    # ... while weighting the micro-batch means by their token counts is the full-batch gradient.
    weighted = jax.tree.map(
        lambda *g: sum(c * x for c, x in zip(counts, g, strict=True)) / sum(counts), *grads
    )
    weighted_params = jax.tree.map(lambda p, g: p - lr * g, trainable, weighted)
    assert_trees_close(weighted_params, s1.trainable, atol=1e-6, what="token-weighted vs full")


def test_grad_accumulation_rejects_indivisible_batch(tiny):
    pair = tiny("llama")
    peft_model = lora_model(pair, ["q_proj"])
    trainer = make_train_step(peft_model, optax.sgd(0.1), grad_accum_steps=3)
    with pytest.raises(ValueError, match="micro-batches"):
        trainer.step(trainer.init(jax.random.key(0)), trainer.frozen(), lm_batch(pair, batch=4))
    with pytest.raises(ValueError, match="grad_accum_steps"):
        make_train_step(peft_model, optax.sgd(0.1), grad_accum_steps=0)


# --------------------------------------------------------------------------- losses against numpy


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_causal_lm_loss_matches_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 6, 11).astype(np.float32)
    labels = rng.randint(0, 11, (3, 6)).astype(np.int32)
    labels[0, 2] = labels[1, 4] = labels[2, 0] = IGNORE_INDEX
    mask = np.ones((3, 6), np.int32)
    mask[1, 3:] = 0
    mask[2, 5:] = 0

    def reference(use_mask: bool):
        logp = np_log_softmax(logits)
        total, count = 0.0, 0
        for b in range(3):
            for t in range(5):  # position t predicts labels[t + 1]
                target = labels[b, t + 1]
                if target == IGNORE_INDEX or (use_mask and mask[b, t + 1] == 0):
                    continue
                total -= logp[b, t, target]
                count += 1
        return total, count

    for use_mask in (True, False):
        total, count = causal_lm_loss(
            jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask) if use_mask else None
        )
        ref_total, ref_count = reference(use_mask)
        assert float(count) == ref_count
        np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
        np.testing.assert_allclose(float(mean_loss((total, count))), ref_total / ref_count, rtol=1e-5)
    assert (3 * 5 - 2) == reference(False)[1]  # labels[2, 0] is never a target (nothing predicts it)

    # bf16 logits are upcast to fp32 before the softmax.
    total, _ = causal_lm_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert total.dtype == jnp.float32


def test_seq2seq_lm_loss_matches_numpy():
    rng = np.random.RandomState(1)
    logits = rng.randn(2, 5, 7).astype(np.float32)
    labels = rng.randint(0, 7, (2, 5)).astype(np.int32)
    labels[0, 3:] = IGNORE_INDEX
    dmask = np.ones((2, 5), np.int32)
    dmask[1, 4] = 0
    logp = np_log_softmax(logits)

    for mask in (None, dmask):
        total, count = seq2seq_lm_loss(
            jnp.asarray(logits), jnp.asarray(labels), None if mask is None else jnp.asarray(mask)
        )
        ref_total, ref_count = 0.0, 0
        for b in range(2):
            for t in range(5):  # no shift: logits[t] predicts labels[t]
                if labels[b, t] == IGNORE_INDEX or (mask is not None and mask[b, t] == 0):
                    continue
                ref_total -= logp[b, t, labels[b, t]]
                ref_count += 1
        assert float(count) == ref_count
        np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)


def test_classification_loss_matches_numpy():
    rng = np.random.RandomState(2)
    # Sequence classification: (batch, classes).
    logits = rng.randn(5, 3).astype(np.float32)
    labels = np.array([0, 2, IGNORE_INDEX, 1, 2], np.int32)
    logp = np_log_softmax(logits)
    total, count = classification_loss(jnp.asarray(logits), jnp.asarray(labels))
    keep = labels != IGNORE_INDEX
    assert float(count) == keep.sum() == 4
    np.testing.assert_allclose(float(total), -logp[keep, labels[keep]].sum(), rtol=1e-5)

    # Token classification: (batch, length, classes).
    logits = rng.randn(2, 4, 3).astype(np.float32)
    labels = np.array([[0, 1, IGNORE_INDEX, IGNORE_INDEX], [2, IGNORE_INDEX, 1, 0]], np.int32)
    logp = np_log_softmax(logits)
    total, count = classification_loss(jnp.asarray(logits), jnp.asarray(labels))
    b, t = np.nonzero(labels != IGNORE_INDEX)
    assert float(count) == len(b) == 5
    np.testing.assert_allclose(float(total), -logp[b, t, labels[b, t]].sum(), rtol=1e-5)

    # Nothing counted: the mean is 0, not nan.
    empty = classification_loss(jnp.asarray(logits[:, :1]), jnp.full((2, 1), IGNORE_INDEX, jnp.int32))
    assert float(empty[1]) == 0 and float(mean_loss(empty)) == 0.0


def test_shift_tokens_right():
    labels = jnp.array([[5, 6, IGNORE_INDEX, IGNORE_INDEX], [7, 8, 9, 10]], jnp.int32)
    shifted = shift_tokens_right(labels, pad_token_id=1, decoder_start_token_id=2)
    np.testing.assert_array_equal(np.asarray(shifted), [[2, 5, 6, 1], [2, 7, 8, 9]])
    assert shifted.dtype == labels.dtype
    # transformers' own numpy helper agrees.
    from transformers.models.bart.modeling_flax_bart import shift_tokens_right as hf_shift

    np.testing.assert_array_equal(np.asarray(shifted), hf_shift(np.asarray(labels), 1, 2))


# --------------------------------------------------------------------------- other tasks


def test_seq2seq_training_on_bart_derives_decoder_inputs(tiny):
    pair = tiny("bart")
    config = pair.flax_model.config
    peft_model = lora_model(pair, ["q_proj", "v_proj"], task_type="SEQ_2_SEQ_LM")
    rng = np.random.RandomState(5)
    ids = rng.randint(3, config.vocab_size, (4, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    labels = rng.randint(3, config.vocab_size, (4, 6)).astype(np.int32)
    labels[0, 4:] = IGNORE_INDEX
    labels[2, 3:] = IGNORE_INDEX
    batch = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(mask),
        "labels": jnp.asarray(labels),
    }

    decoder_input_ids = shift_tokens_right(
        batch["labels"], config.pad_token_id, config.decoder_start_token_id
    )

    @jax.jit
    def eval_loss(params):
        out = peft_model.apply(
            params,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=decoder_input_ids,
        )
        return mean_loss(seq2seq_lm_loss(out.logits, batch["labels"]))

    trainer = make_train_step(peft_model, optax.adam(1e-2))
    state = trainer.init(jax.random.key(0))
    frozen = trainer.frozen()
    start = float(eval_loss(trainer.params(state)))
    for _ in range(10):
        state, metrics = trainer.step(state, frozen, batch)  # labels only: decoder inputs are derived
        assert float(metrics["count"]) == int((labels != IGNORE_INDEX).sum())
    end = float(eval_loss(trainer.params(state)))
    assert np.isfinite(end) and end < start - 0.05, (start, end)


def test_classification_training_on_bert(tiny):
    pair = tiny("bert")
    peft_model = lora_model(pair, ["query", "value"], task_type="SEQ_CLS")
    # PEFT's SEQ_CLS also trains the classifier head (modules_to_save).
    assert peft_model.adapters["default"]["modules_to_save"]
    inputs = pair.inputs(batch=4, length=8, seed=4)
    batch = {
        "input_ids": jnp.asarray(inputs["input_ids"]),
        "attention_mask": jnp.asarray(inputs["attention_mask"]),
        "labels": jnp.asarray([0, 2, 1, 2], jnp.int32),
    }

    @jax.jit
    def eval_loss(params):
        out = peft_model.apply(params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return mean_loss(classification_loss(out.logits, batch["labels"]))

    trainer = make_train_step(peft_model, optax.adam(1e-2))
    state = trainer.init(jax.random.key(0))
    frozen = trainer.frozen()
    start = float(eval_loss(trainer.params(state)))
    for _ in range(10):
        state, metrics = trainer.step(state, frozen, batch)
        assert float(metrics["count"]) == 4
    end = float(eval_loss(trainer.params(state)))
    assert np.isfinite(end) and end < start - 0.05, (start, end)


# --------------------------------------------------------------------------- mixed precision


def bf16_model(pair):
    """The tiny pair's Flax model computing in bf16 (transformers' ``dtype``; params stay float32)."""
    model = pair.flax_class(pair.flax_model.config, dtype=jnp.bfloat16, seed=0)
    model.params = pair.flax_model.params
    return model


def test_bf16_policy_warns_when_the_model_computes_in_float32(tiny):
    pair = tiny("llama")
    with pytest.warns(UserWarning, match="computes in its own dtype, float32.*dtype=jnp.bfloat16"):
        make_train_step(lora_model(pair, ATTENTION["llama"]), optax.adam(1e-2), precision="bf16")
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION["llama"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_train_step(jpeft.get_peft_model(bf16_model(pair), config), optax.adam(1e-2), precision="bf16")
        make_train_step(lora_model(pair, ATTENTION["llama"]), optax.adam(1e-2))  # fp32: nothing to say


def test_bf16_keeps_fp32_master_weights(tiny):
    pair = tiny("llama")
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION["llama"], task_type="CAUSAL_LM")
    peft_model = jpeft.get_peft_model(bf16_model(pair), config)
    batch = lm_batch(pair)
    trainer = make_train_step(peft_model, optax.adam(1e-2), precision="bf16")
    state = trainer.init(jax.random.key(0))
    frozen = trainer.frozen()
    assert state.loss_scale is None  # bf16 has fp32's range: no loss scaling
    frozen_leaves = jax.tree.leaves(frozen)
    assert frozen_leaves and all(x.dtype == jnp.bfloat16 for x in frozen_leaves)
    eval_loss = causal_eval_loss(peft_model)
    start = float(eval_loss(trainer.params(state), batch))
    for i in range(5):
        state, metrics = trainer.step(state, frozen, batch)
        assert np.isfinite(float(metrics["loss"]))
        if i == 0:  # the forward ran in bf16: close to the fp32 loss of the same params, not equal
            assert 0 < abs(float(metrics["loss"]) - start) < 0.05, (float(metrics["loss"]), start)
    trainable = jax.tree.leaves(state.trainable)
    assert trainable and all(x.dtype == jnp.float32 for x in trainable)
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert opt_leaves and all(x.dtype == jnp.float32 for x in opt_leaves)
    # params(state) gives the base in its own dtype, with the trained fp32 adapter.
    params = trainer.params(state)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert float(eval_loss(params, batch)) < start - 0.05


def test_fp16_loss_scaling_skips_bad_steps_and_regrows(tiny):
    pair = tiny("llama")
    peft_model = lora_model(pair, ATTENTION["llama"])
    batch = lm_batch(pair)

    by_name = make_train_step(peft_model, optax.adam(1e-2), precision="fp16").init(jax.random.key(0))
    assert float(by_name.loss_scale.scale) == 2.0**15 and int(by_name.loss_scale.good_steps) == 0

    policy = Policy(compute_dtype=jnp.float16, period=2)
    default_loss = jpeft.train.loss_for_task("CAUSAL_LM")

    def poisoned_loss(outputs, batch):
        total, count = default_loss(outputs, batch)
        return total * jnp.float32(jnp.nan), count  # every gradient is nan

    good = make_train_step(peft_model, optax.adam(1e-2), precision=policy)
    bad = make_train_step(peft_model, optax.adam(1e-2), precision=policy, loss_fn=poisoned_loss)
    frozen = good.frozen()
    assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(frozen))

    s0 = good.init(jax.random.key(0))

    def keep(state):  # the step donates its state; the test compares old and new ones
        return jax.tree.map(jnp.copy, state)

    assert float(s0.loss_scale.scale) == 2.0**15 and int(s0.loss_scale.good_steps) == 0

    s1, m1 = good.step(keep(s0), frozen, batch)
    assert np.isfinite(float(m1["loss"])) and np.isfinite(float(m1["grad_norm"]))
    assert float(s1.loss_scale.scale) == 2.0**15 and int(s1.loss_scale.good_steps) == 1
    assert max_abs_diff(s1.trainable, s0.trainable) > 0
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s1.trainable))

    s2, m2 = bad.step(keep(s1), frozen, batch)
    assert not np.isfinite(float(m2["grad_norm"]))
    assert_bitwise_equal(s2.trainable, s1.trainable, "skipped step: trainable")
    assert_bitwise_equal(s2.opt_state, s1.opt_state, "skipped step: opt_state")
    assert float(s2.loss_scale.scale) == 2.0**14 and int(s2.loss_scale.good_steps) == 0

    s3, _ = good.step(keep(s2), frozen, batch)
    assert float(s3.loss_scale.scale) == 2.0**14 and int(s3.loss_scale.good_steps) == 1
    assert max_abs_diff(s3.trainable, s2.trainable) > 0
    s4, _ = good.step(keep(s3), frozen, batch)  # `period` good steps in a row: the scale doubles
    assert float(s4.loss_scale.scale) == 2.0**15 and int(s4.loss_scale.good_steps) == 0
    s5, _ = good.step(keep(s4), frozen, batch)
    s6, _ = good.step(keep(s5), frozen, batch)
    assert float(s6.loss_scale.scale) == 2.0**16


# --------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_same_grads_one_remat_per_block(arch, tiny):
    pair = tiny(arch)
    model = pair.flax_model
    model_attrs = dict(vars(model))
    module_attrs = dict(vars(model.module))
    peft_model = lora_model(pair, ATTENTION[arch], init_lora_weights=False)
    batch = lm_batch(pair, batch=2, length=8)
    trainable, frozen = peft_model.split_params()
    key = jax.random.key(7)  # GPT-2's dropout is on: remat must recompute the same masks

    def make_loss():
        # A new function object each time: jit/make_jaxpr caches are keyed on it, and
        # `enable_gradient_checkpointing` only affects functions traced after it.
        def loss(tr):
            out = peft_model.apply(
                tr,
                frozen=frozen,
                train=True,
                dropout_rng=key,
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
            )
            return mean_loss(causal_lm_loss(out.logits, batch["input_ids"], batch["attention_mask"]))

        return loss

    plain = jax.jit(jax.grad(make_loss()))(trainable)
    assert count_remat_eqns(jax.make_jaxpr(jax.grad(make_loss()))(trainable).jaxpr) == 0

    peft_model.enable_gradient_checkpointing()
    remat = jax.jit(jax.grad(make_loss()))(trainable)
    blocks = model.config.num_hidden_layers
    assert blocks == 2
    assert count_remat_eqns(jax.make_jaxpr(jax.grad(make_loss()))(trainable).jaxpr) == blocks
    assert_trees_close(remat, plain, atol=1e-6, what="remat grads")
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain)) > 1e-4

    # The user's Flax model is untouched: same attributes, and a new PeftModel on it does not remat.
    assert dict(vars(model)) == model_attrs and all(vars(model)[k] is v for k, v in model_attrs.items())
    assert all(vars(model.module)[k] is v for k, v in module_attrs.items())
    assert not getattr(model.config, "gradient_checkpointing", False)
    other = lora_model(pair, ATTENTION[arch], init_lora_weights=False)
    other_trainable, other_frozen = other.split_params()

    def other_loss(tr):
        out = other.apply(
            tr, frozen=other_frozen, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        return out.logits.sum()

    assert count_remat_eqns(jax.make_jaxpr(jax.grad(other_loss))(other_trainable).jaxpr) == 0


# --------------------------------------------------------------------------- full-tree masked optimizer


def test_masked_optimizer_keeps_base_bitwise(tiny):
    pair = tiny("llama")
    peft_model = lora_model(pair, ATTENTION["llama"])
    batch = lm_batch(pair)
    params = peft_model.params
    before = snapshot(params)
    optimizer = masked_optimizer(optax.adam(1e-2), peft_model.trainable_mask())
    opt_state = optimizer.init(params)
    loss_fn = causal_eval_loss(peft_model)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    losses = []
    for _ in range(5):
        params, opt_state, loss, grads = step(params, opt_state)
        losses.append(float(loss))
    # The base does get gradients, which are never applied.
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["base"])) > 0
    assert_bitwise_equal(params["base"], before["base"], "base")
    adapter_now, adapter_before = leaves_with_paths(params["adapters"]), leaves_with_paths(before["adapters"])
    assert all(not np.array_equal(np.asarray(v), adapter_before[k]) for k, v in adapter_now.items())
    assert losses[-1] < losses[0] - 0.05, losses


def test_global_norm_equals_optax_norm_across_shapes_and_dtypes():
    keys = jax.random.split(jax.random.key(3), 6)
    tree = {
        "a": [jax.random.normal(k, (16, 4)) for k in keys[:3]],  # one stack
        "b": {"x": jax.random.normal(keys[3], (4, 16)), "y": jax.random.normal(keys[4], (4, 16))},
        "c": jax.random.normal(keys[5], (7,)).astype(jnp.bfloat16),  # a shape of its own, bf16
    }
    expected = optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
    got = jax.jit(jpeft.train.step.global_norm)(tree)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)
    assert float(jpeft.train.step.global_norm({})) == 0.0
