"""The fused LM-head cross-entropy: ``fused_causal_lm_loss`` and ``make_train_step(fused_loss=True)``.

The fused loss must be the plain loss (``causal_lm_loss`` on ``hidden @ kernel + bias``) in value
and in every gradient, for every slicing, and the train step must take it only where it applies
(a plain ``nn.Dense`` head, returned as the logits, not wrapped by an adapter).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.bindings.linen import capture_lm_head
from jpeft.train import causal_lm_loss, fused_causal_lm_loss, make_train_step, mean_loss
from tests.train.test_step import lm_batch, max_abs_diff


def _problem(batch=3, length=13, features=16, vocab=37, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (batch, length, features))
    kernel = jax.random.normal(keys[1], (features, vocab)) * 0.5
    bias = jax.random.normal(keys[2], (vocab,))
    labels = jax.random.randint(keys[3], (batch, length), 0, vocab)
    labels = labels.at[0, 4].set(-100)  # an ignored label
    mask = jnp.ones((batch, length), jnp.int32).at[1, length - 3 :].set(0)  # right padding
    return hidden, kernel, bias, labels, mask


def _plain_mean(hidden, kernel, bias, labels, mask):
    return mean_loss(causal_lm_loss(hidden @ kernel + bias, labels, mask))


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64, None])
@pytest.mark.parametrize("vocab_major", [False, True])
def test_fused_loss_equals_plain_loss_and_gradients(chunk_size, vocab_major):
    hidden, kernel, bias, labels, mask = _problem()

    def fused_mean(h, k, b):
        total, count = fused_causal_lm_loss(
            h, k, labels, mask, bias=b, chunk_size=chunk_size, vocab_major=vocab_major, grad_scale=0.02
        )
        return total / count

    want = jax.value_and_grad(_plain_mean, argnums=(0, 1, 2))(hidden, kernel, bias, labels, mask)
    got = jax.jit(jax.value_and_grad(fused_mean, argnums=(0, 1, 2)))(hidden, kernel, bias)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for name, g, w in zip(("hidden", "kernel", "bias"), got[1], want[1], strict=True):
        assert float(jnp.max(jnp.abs(w))) > 1e-3, name  # a gradient that is really there
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("vocab_chunk_size", [1, 5, 16, 36, 37, None])
@pytest.mark.parametrize("vocab_major", [False, True])
def test_frozen_head_walks_the_vocabulary_and_equals_plain(vocab_chunk_size, vocab_major):
    """With the head frozen the loss takes the vocabulary a chunk at a time (online softmax); the
    chunks are evened out, so a vocabulary of 37 is covered by overlapping chunks (5 of 8, 3 of 16,
    one of 37) whose overlap must count once."""
    hidden, kernel, bias, labels, mask = _problem(seed=3)
    hidden = hidden * 3.0  # logits spread over ~+-20, so the running max really moves
    head = kernel.T if vocab_major else kernel

    def fused_mean(h):
        total, count = fused_causal_lm_loss(
            h,
            head.T if vocab_major else head,
            labels,
            mask,
            bias=bias,
            vocab_chunk_size=vocab_chunk_size,
            vocab_major=vocab_major,
            grad_scale=0.02,
        )
        return total / count

    want = jax.value_and_grad(lambda h: _plain_mean(h, kernel, bias, labels, mask))(hidden)
    got = jax.jit(jax.value_and_grad(fused_mean))(hidden)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert float(jnp.max(jnp.abs(want[1]))) > 1e-3
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)
    # the forward alone (no gradient) takes the same walk
    np.testing.assert_allclose(jax.jit(fused_mean)(hidden), want[0], rtol=1e-6)


@pytest.mark.parametrize("trained_head", [True, False])  # sliced positions; the frozen head's vocabulary walk
def test_soft_capped_fused_loss_equals_plain(trained_head):
    """Gemma's final soft-cap ``c * tanh(z / c)``, applied chunk by chunk: value and gradients as the plain loss."""
    hidden, kernel, bias, labels, mask = _problem(seed=4)
    hidden, cap = hidden * 3.0, 2.0  # logits well past the cap, so tanh bends them

    def plain(h, k):
        return mean_loss(causal_lm_loss(jnp.tanh((h @ k + bias) / cap) * cap, labels, mask))

    def fused(h, k):
        total, count = fused_causal_lm_loss(
            h, k, labels, mask, bias=bias, softcap=cap, chunk_size=4, vocab_chunk_size=16, grad_scale=0.5
        )
        return total / count

    argnums = (0, 1) if trained_head else 0
    want = jax.value_and_grad(plain, argnums=argnums)(hidden, kernel)
    got = jax.jit(jax.value_and_grad(fused, argnums=argnums))(hidden, kernel)
    assert abs(float(want[0]) - float(_plain_mean(hidden, kernel, bias, labels, mask))) > 0.1  # the cap matters
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert float(jnp.max(jnp.abs(w))) > 1e-3
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)


def test_vocab_chunks_are_even_and_bounded():
    from jpeft.train import losses

    assert losses._even_chunk(37, 5) == 8  # 8 chunks of 5 -> evened to 5 chunks of 8
    assert losses._even_chunk(50257, 4096) == 3872  # 13 chunks, the last one overlapping by 79
    assert losses._even_chunk(16384, 4096) == 4096
    assert losses._even_chunk(1000, 4096) == 1000
    assert losses.default_vocab_chunk(512, "cpu") == losses.FUSED_CHUNK_BYTES // (4 * 512)
    assert losses.default_vocab_chunk(1 << 16, "cpu") == 1024
    assert losses.default_vocab_chunk(1 << 16, "gpu") == 8192
    hidden, kernel, _, labels, _ = _problem()
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        fused_causal_lm_loss(hidden, kernel, labels, vocab_chunk_size=0)


def test_fused_loss_counts_and_frozen_head():
    """Same (sum, count) as the plain loss; with the head frozen only ``hidden`` is differentiated."""
    hidden, kernel, bias, labels, mask = _problem(seed=1)
    total, count = fused_causal_lm_loss(hidden, kernel, labels, mask, bias=bias, chunk_size=3)
    want_total, want_count = causal_lm_loss(hidden @ kernel + bias, labels, mask)
    assert float(count) == float(want_count) == 3 * 12 - 1 - 3
    np.testing.assert_allclose(total, want_total, rtol=1e-6)

    def fused_total(h, k):
        return fused_causal_lm_loss(h, k, labels, mask, bias=bias, chunk_size=4)[0]

    grad_hidden = jax.jit(jax.grad(fused_total))
    want = jax.grad(lambda h: causal_lm_loss(h @ kernel + bias, labels, mask)[0])(hidden)
    np.testing.assert_allclose(grad_hidden(hidden, kernel), want, rtol=0, atol=1e-5)

    # A frozen head costs no weight gradient: the program has one dot fewer than when it trains.
    def dots(fn):
        return jax.jit(fn).lower(hidden, kernel).as_text().count("dot_general")

    assert dots(jax.grad(fused_total)) == 2  # logits, d_hidden
    assert dots(jax.grad(fused_total, argnums=(0, 1))) == 3  # + d_kernel


def test_fused_loss_bf16_matches_plain_in_bf16():
    hidden, kernel, bias, labels, mask = _problem(seed=2)
    h16, k16 = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    plain = jax.grad(lambda h: mean_loss(causal_lm_loss(h @ k16, labels, mask)))(h16)
    fused = jax.grad(
        lambda h: (lambda t, c: t / c)(
            *fused_causal_lm_loss(h, k16, labels, mask, chunk_size=4, grad_scale=0.03)
        )
    )(h16)
    assert fused.dtype == jnp.bfloat16
    # both round the per-token gradients to bf16 (8 bits of mantissa) before the matmul
    np.testing.assert_allclose(
        np.asarray(fused, np.float32), np.asarray(plain, np.float32), rtol=0, atol=2e-3
    )


def test_default_slice_by_platform():
    from jpeft.train import losses

    assert losses.default_slice_tokens(16384, "cpu") == 256
    assert losses.default_slice_tokens(128, "cpu") == losses.FUSED_CHUNK_BYTES // (4 * 128)
    assert losses.default_slice_tokens(128256, "gpu") == 4096


def test_fused_loss_rejects_mismatched_shapes():
    hidden, kernel, _, labels, mask = _problem()
    with pytest.raises(ValueError, match="kernel"):
        fused_causal_lm_loss(hidden, kernel.T, labels, mask)
    with pytest.raises(ValueError, match="labels"):
        fused_causal_lm_loss(hidden, kernel, labels[:, :-1], mask)


# --------------------------------------------------------------------------- in the train step


def _grads(peft_model, batch, fused, **kwargs):
    trainer = make_train_step(peft_model, optax.sgd(0.0), fused_loss=fused, return_grads=True, **kwargs)
    state = trainer.init(jax.random.key(0))
    _, metrics = trainer.step(state, trainer.frozen(), batch)
    return metrics


def _assert_same_step(peft_model, batch, **kwargs):
    plain = _grads(peft_model, batch, False, **kwargs)
    fused = _grads(peft_model, batch, True, **kwargs)
    np.testing.assert_allclose(fused["loss"], plain["loss"], rtol=1e-6)
    assert float(fused["count"]) == float(plain["count"])
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain["grads"])) > 1e-4
    assert max_abs_diff(fused["grads"], plain["grads"]) <= 1e-6
    return fused


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # untied head; tied head (the embedding transposed)
def test_train_step_fused_loss_equals_plain(arch, tiny):
    pair = tiny(arch)
    peft_model = jpeft.get_peft_model(
        pair.flax_model, jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=None, init_lora_weights=False)
    )
    batch = lm_batch(pair)
    batch["attention_mask"] = batch["attention_mask"].at[0, -2:].set(0)
    _assert_same_step(peft_model, batch)  # one slice
    # micro-batches of 2 x 8, 3 positions a slice: 3 slices, the last one padded
    _assert_same_step(peft_model, batch, grad_accum_steps=2, fused_loss_tokens=6)


def test_train_step_fused_loss_on_gemma2_applies_the_final_soft_cap(monkeypatch):
    """jpeft's Gemma 2 (tied head, final soft-cap): the fused step hands the cap to the loss, as the plain step."""
    raw = dict(model_type="gemma2", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
               sliding_window=3, final_logit_softcapping=0.5, initializer_range=0.5)
    model = jpeft.models.AutoModelForCausalLM.from_config(raw, key=1)
    peft_model = jpeft.get_peft_model(model, jpeft.LoraConfig(r=4, target_modules=None, init_lora_weights=False))
    ids = jax.random.randint(jax.random.key(2), (2, 12), 3, 96)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids).at[0, -2:].set(0)}
    logits = peft_model(ids).logits
    assert float(jnp.max(jnp.abs(logits))) <= 0.5  # the model caps its logits
    from jpeft.train import losses

    caps = []
    fused = losses.fused_causal_lm_loss
    monkeypatch.setattr(losses, "fused_causal_lm_loss", lambda *a, **k: caps.append(k["softcap"]) or fused(*a, **k))
    _assert_same_step(peft_model, batch)
    assert caps == [0.5], caps  # the fused path ran (no fallback), with the model's cap


def test_train_step_fused_loss_trains_a_saved_head(tiny):
    """``modules_to_save=["lm_head"]``: the head is trained, so the fused loss computes its gradient."""
    pair = tiny("llama")
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    metrics = _assert_same_step(jpeft.get_peft_model(pair.flax_model, config), lm_batch(pair))
    head = [g for path, g in jax.tree_util.tree_leaves_with_path(metrics["grads"]) if "lm_head" in str(path)]
    assert head and float(jnp.max(jnp.abs(head[0]))) > 1e-4


def test_train_step_lora_on_lm_head_uses_the_plain_loss(tiny):
    """An adapter wrapping ``lm_head`` needs the head's real output: the step does not capture it."""
    pair = tiny("llama")
    config = jpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False
    )
    _assert_same_step(jpeft.get_peft_model(pair.flax_model, config), lm_batch(pair))


@pytest.mark.parametrize(
    "config",
    [
        jpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        jpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    ],
    ids=["prompt", "prefix"],  # (P-tuning feeds virtual tokens the way prompt tuning does)
)
def test_train_step_fused_loss_with_prompt_methods(config, tiny):
    """Virtual tokens lengthen the outputs (or the keys); the loss batch's labels match, fused or not."""
    pair = tiny("gpt2")
    _assert_same_step(jpeft.get_peft_model(pair.flax_model, config), lm_batch(pair))


def test_train_step_fused_loss_with_gradient_checkpointing(tiny):
    pair = tiny("llama")
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=None, init_lora_weights=False)
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    peft_model.enable_gradient_checkpointing()
    _assert_same_step(peft_model, lm_batch(pair))


def test_train_step_fused_loss_saves_memory():
    """The point of it: a step whose largest buffers are the logits holds much less when fused,
    which is the default for transformers' GPT-2."""
    import transformers as tf

    config = tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=16384, n_positions=64)
    model = tf.FlaxGPT2LMHeadModel(config, seed=0)
    peft_model = jpeft.get_peft_model(model, jpeft.LoraConfig(r=4, target_modules=["c_attn"]))
    ids = jax.random.randint(jax.random.key(1), (8, 64), 0, config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    logits_bytes = 8 * 64 * config.vocab_size * 4  # 32 MiB; 2 slices of 256 tokens when fused
    peaks = {}
    for fused in (False, True):
        trainer = make_train_step(peft_model, optax.adamw(1e-3), **({} if fused else {"fused_loss": False}))
        compiled = trainer.step.lower(trainer.init(jax.random.key(0)), trainer.frozen(), batch).compile()
        peaks[fused] = compiled.memory_analysis().temp_size_in_bytes
    assert peaks[True] < peaks[False] - logits_bytes / 2, peaks
    # smaller vocabulary chunks hold less again (the head is frozen: the loss walks the vocabulary)
    trainer = make_train_step(peft_model, optax.adamw(1e-3), fused_loss_vocab_chunk=1024)
    compiled = trainer.step.lower(trainer.init(jax.random.key(0)), trainer.frozen(), batch).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < peaks[True] - logits_bytes / 8
    for name in ("fused_loss_tokens", "fused_loss_vocab_chunk"):
        with pytest.raises(ValueError, match=name):
            make_train_step(peft_model, optax.adamw(1e-3), **{name: 0})


class _Out(NamedTuple):
    logits: jax.Array


class _LinenLM(nn.Module):
    """A linen LM with an ``lm_head``; ``temperature`` changes the head's output after it (the
    way BART adds ``final_logits_bias``)."""

    temperature: float | None = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        h = nn.Embed(50, 8, name="embed")(input_ids)
        h = nn.Dense(8, name="proj")(h)
        logits = nn.Dense(50, use_bias=True, name="lm_head")(h)
        return _Out(logits if self.temperature is None else logits / self.temperature)


def _linen_lm(temperature=None):
    module = _LinenLM(temperature)
    ids = jnp.arange(12).reshape(2, 6) % 50
    params = module.init(jax.random.key(0), ids)["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    return module, params, batch


def test_fused_loss_for_a_linen_model_when_asked():
    """A user's linen LM: off by default (jpeft cannot know its head's output is the logits); with
    ``fused_loss=True`` the head (with its bias) is computed inside the loss, same gradients."""
    module, params, batch = _linen_lm()
    peft_model = jpeft.get_peft_model((module, params), jpeft.LoraConfig(r=2, target_modules=["proj"]))
    _assert_same_step(peft_model, batch)
    with capture_lm_head() as head:
        out = module.apply({"params": params}, batch["input_ids"])
    assert head.returned(out.logits) and head.bias is not None


def test_capture_sees_a_changed_head_output_and_the_step_falls_back():
    module, params, batch = _linen_lm(temperature=2.0)
    with capture_lm_head() as head:
        out = module.apply({"params": params}, batch["input_ids"])
    assert head.hidden is not None and not head.returned(out.logits)

    peft_model = jpeft.get_peft_model((module, params), jpeft.LoraConfig(r=2, target_modules=["proj"]))
    _assert_same_step(peft_model, batch)  # fused_loss=True: falls back to the plain loss, same result


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_step_fused_loss_in_low_precision(precision, tiny):
    """bf16 and fp16 (with loss scaling): the fused step's gradients are the plain step's to the
    precision of the format (both round the per-token logits gradients to it before the head's matmul)."""
    pair = tiny("llama")
    peft_model = jpeft.get_peft_model(
        pair.flax_model, jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=None, init_lora_weights=False)
    )
    batch = lm_batch(pair)
    plain = _grads(peft_model, batch, False, precision=precision)
    fused = _grads(peft_model, batch, True, precision=precision)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain["grads"]))
    assert scale > 1e-4
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(fused["grads"]))
    np.testing.assert_allclose(fused["loss"], plain["loss"], rtol=1e-2)
    # relative to the largest gradient (bf16 keeps 8 bits of mantissa, fp16 11); here one slice
    # holds the whole batch and the two run the same operations, so they agree exactly
    assert max_abs_diff(fused["grads"], plain["grads"]) <= 0.01 * scale
