"""Losses for the task types, with padding and label masks.

Each returns ``(sum of per-example losses, number of counted examples)`` so that
gradient accumulation can weight micro-batches by what they hold; ``mean_loss``
divides. Labels equal to ``ignore_index`` (``-100``, as in transformers) and
positions where ``attention_mask`` is 0 do not count.

:func:`fused_causal_lm_loss` is the causal-LM loss taken from the LM head's *input*:
it computes the logits a chunk of the vocabulary at a time (frozen head) or a slice of
the sequence at a time (trained head), so the vocabulary-wide ``(batch, length, vocab)``
logits and their gradient never exist whole.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jpeft.core import dots

IGNORE_INDEX = -100


def _token_ce(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    safe_labels = jnp.where(valid, labels, 0)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
    valid = valid.astype(jnp.float32)
    return jnp.sum(per_token * valid), jnp.sum(valid)


def causal_lm_loss(
    logits: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy: position ``t`` predicts ``labels[t + 1]``.

    Args:
      logits: ``(batch, length, vocab)``.
      labels: ``(batch, length)`` token ids (usually the input ids), ``ignore_index`` to skip.
      attention_mask: ``(batch, length)``; 0 marks padding, whose targets do not count.
    """
    # Shift the (small) labels left instead of slicing the (vocab-wide) logits: the slice
    # would copy the whole logits tensor forward and pad it back in the backward pass.
    targets, valid = _causal_targets(labels, attention_mask, ignore_index)
    return _token_ce(logits, targets, valid)


def _causal_targets(
    labels: jax.Array, attention_mask: jax.Array | None = None, ignore_index: int = IGNORE_INDEX
) -> tuple[jax.Array, jax.Array]:
    """``(targets, valid)``: the next token of each position (0 where not counted) and whether it counts."""
    length = labels.shape[1]
    targets = jnp.roll(labels, -1, axis=1)
    valid = (jnp.arange(length) < length - 1)[None, :] & (targets != ignore_index)
    if attention_mask is not None:
        valid = valid & (jnp.roll(attention_mask, -1, axis=1) > 0)
    return jnp.where(valid, targets, 0), valid


# The fused loss's default slice: about FUSED_CHUNK_BYTES of f32 logits, but never fewer than
# FUSED_MIN_TOKENS tokens, because every slice reads the whole head weight again, twice (its two
# matmuls). On a 2-core Zen 5 each extra slice of GPT-2 10M's head (16 MiB) cost about 1.5 ms, so
# 256 tokens keeps that to a few percent of the loss. On GPUs and TPUs the head's matmuls need more
# rows to stay compute-bound (an H100-class chip does ~300 flops per byte of bandwidth): 4096 is
# chosen from that ratio, not measured; ``chunk_size`` / ``make_train_step(fused_loss_tokens=...)``
# overrides it.
FUSED_CHUNK_BYTES = 8 << 20
FUSED_MIN_TOKENS = {"cpu": 256}
FUSED_MIN_TOKENS_ACCELERATOR = 4096
# With a frozen head the loss walks the vocabulary instead, reading the head weight once in all:
# chunks of about FUSED_CHUNK_BYTES of f32 logits, at least FUSED_MIN_COLUMNS columns. On a 2-core
# Xeon (benchmarks/bench_loss.py), 2048-4096 columns ran alike at 512 tokens and 1024 was up to 6%
# slower at 10M-parameter shapes (loop overhead), 2% faster at 120M; on
# accelerators each loop iteration costs several kernel launches, hence the larger floor (chosen,
# not measured).
FUSED_MIN_COLUMNS = {"cpu": 1024}
FUSED_MIN_COLUMNS_ACCELERATOR = 8192


def default_slice_tokens(vocab: int, platform: str | None = None) -> int:
    """Tokens per slice of :func:`fused_causal_lm_loss` (trained head) when ``chunk_size`` is not given."""
    platform = platform or jax.default_backend()
    least = FUSED_MIN_TOKENS.get(platform, FUSED_MIN_TOKENS_ACCELERATOR)
    return max(least, FUSED_CHUNK_BYTES // (4 * vocab))


def default_vocab_chunk(tokens: int, platform: str | None = None) -> int:
    """Vocabulary columns per chunk of :func:`fused_causal_lm_loss` (frozen head) for ``tokens`` tokens."""
    platform = platform or jax.default_backend()
    least = FUSED_MIN_COLUMNS.get(platform, FUSED_MIN_COLUMNS_ACCELERATOR)
    return max(least, FUSED_CHUNK_BYTES // (4 * max(tokens, 1)))


def fused_causal_lm_loss(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    ignore_index: int = IGNORE_INDEX,
    dtype: Any = None,
    precision: Any = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    grad_scale: jax.Array | float | None = None,
    vocab_major: bool = False,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`causal_lm_loss` of ``hidden @ kernel + bias``, without materialising the logits.

    The forward pass computes the loss and, when anything is differentiated, its gradients;
    the backward pass only scales what the forward kept. The head's matmuls run once each,
    as in the plain loss, while the largest buffer is one chunk of logits instead of two
    whole ``(batch, length, vocab)`` f32 tensors. Two ways, chosen by what is differentiated:

    * frozen head (LoRA and the other adapters leave it alone): the vocabulary is walked a
      chunk of ``vocab_chunk_size`` columns at a time, for all tokens at once, keeping a
      running max and sum of the exponentials (an online softmax) and the running
      ``softmax @ kernel.T``, rescaled as the max moves. The head weight is read once in all,
      and no weight gradient is formed.
    * trained head (``kernel`` or ``bias`` differentiated): the sequence is cut into slices
      of ``chunk_size`` positions; each slice's logits give its share of the gradients with
      respect to ``hidden``, ``kernel`` and ``bias``. Each slice reads the head weight again.

    Args:
      hidden: ``(batch, length, features)``, the LM head's input.
      kernel: ``(features, vocab)``, the head's weight as ``nn.Dense`` holds it (for tied
        embeddings, the embedding table transposed).
      labels, attention_mask, ignore_index: as :func:`causal_lm_loss`.
      bias: optional ``(vocab,)``.
      dtype: the dtype of the head's matmul (``nn.Dense``'s ``dtype``; default: promoted from
        ``hidden`` and ``kernel``). Softmax and loss are computed in f32, as the plain loss does.
      precision: the matmul's ``lax.Precision``.
      chunk_size: positions per slice when the head is trained (default:
        :func:`default_slice_tokens` divided by the batch).
      vocab_chunk_size: vocabulary columns per chunk when the head is frozen (default:
        :func:`default_vocab_chunk` of the token count); the chunks are evened out, so the
        vocabulary need not divide.
      grad_scale: the expected cotangent of the *mean* loss (sum / count): 1 for a mean loss,
        the loss scale under fp16 loss scaling. The per-token gradients are multiplied by
        ``grad_scale / count`` before they are rounded to ``dtype`` and divided back in the
        backward pass, so fp16 gradients keep their range. Any value gives the same gradients.
      vocab_major: work on ``kernel.T``, i.e. ``(vocab, features)``: set it when ``kernel`` is a
        tied embedding table transposed (then ``kernel.T`` costs nothing, while ``kernel`` itself
        would be copied). Speed only; the result is the same.
      softcap: the logits are ``softcap * tanh(logits / softcap)`` (Gemma's final soft-cap), applied
        chunk by chunk like the head itself.

    Returns:
      ``(sum of token losses, number of counted tokens)``, as :func:`causal_lm_loss`.
    """
    if hidden.ndim != 3 or kernel.ndim != 2 or hidden.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"fused_causal_lm_loss needs hidden (batch, length, features) and kernel (features, vocab); "
            f"got {hidden.shape} and {kernel.shape}."
        )
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match hidden states {hidden.shape[:2]}.")
    targets, valid = _causal_targets(labels, attention_mask, ignore_index)
    batch, length, _ = hidden.shape
    vocab = kernel.shape[1]
    if chunk_size is None:
        chunk_size = default_slice_tokens(vocab) // batch
    chunk_size = max(1, min(int(chunk_size), length))
    chunk_size = -(-length // -(-length // chunk_size))  # the same slice count with the least padding
    if vocab_chunk_size is None:
        vocab_chunk_size = default_vocab_chunk(batch * length)
    if vocab_chunk_size < 1:
        raise ValueError(f"`vocab_chunk_size` must be >= 1, got {vocab_chunk_size}.")
    width = _even_chunk(vocab, int(vocab_chunk_size))
    compute_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(hidden, kernel)
    weights = valid.astype(jnp.float32)
    count = jnp.sum(weights)
    grad_weight = jnp.asarray(1.0 if grad_scale is None else grad_scale, jnp.float32) / jnp.maximum(
        count, 1.0
    )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"`softcap` must be > 0 or None, got {softcap!r}.")
    total = _linear_cross_entropy(compute_dtype, precision, chunk_size, width, vocab_major, softcap)(
        hidden, kernel, bias, targets, weights, jax.lax.stop_gradient(grad_weight)
    )
    return total, count


def _even_chunk(vocab: int, most: int) -> int:
    """Columns per vocabulary chunk: as many chunks as ``most`` columns need, evened out (to 8s)."""
    if most >= vocab:
        return vocab
    chunks = math.ceil(vocab / most)
    return min(vocab, math.ceil(math.ceil(vocab / chunks) / 8) * 8)


def _linear_cross_entropy(
    dtype: Any, precision: Any, chunk: int, width: int, vocab_major: bool, softcap: float | None = None
) -> Any:
    """``f(hidden, kernel, bias, targets, weights, grad_weight) -> sum of weighted token CE``, custom VJP.

    With ``softcap`` the logits ``z`` become ``c * tanh(z / c)`` and their gradients take the factor
    ``1 - tanh(z / c) ** 2``.
    """

    def cap(logits: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``(capped float32 logits, d capped / d logits or None)``."""
        logits = logits.astype(jnp.float32)
        if softcap is None:
            return logits, None
        t = jnp.tanh(logits / softcap)
        return t * softcap, 1.0 - t * t

    def stream(hidden, kernel, bias, targets, weights, grad_weight, need_hidden):
        """Frozen head: online softmax over vocabulary chunks; ``(total, d_hidden or None)``."""
        batch, length, features = hidden.shape
        vocab = kernel.shape[1]
        x = hidden.reshape(batch * length, features).astype(dtype)
        t = targets.reshape(-1)
        wt = weights.reshape(-1)
        w = (kernel.T if vocab_major else kernel).astype(dtype)  # no copy for a tied head
        axis = 0 if vocab_major else 1
        fwd_dims = (((1,), (1,)), ((), ())) if vocab_major else (((1,), (0,)), ((), ()))
        bwd_dims = (((1,), (0,)), ((), ())) if vocab_major else (((1,), (1,)), ((), ()))
        b = bias.astype(dtype) if bias is not None else None
        chunks = math.ceil(vocab / width)
        overlap = chunks * width > vocab  # the last chunk starts early; its first columns are done

        def body(carry, i):
            top, total_exp, acc = carry
            start = jnp.minimum(i * width, vocab - width)
            w_chunk = lax.dynamic_slice_in_dim(w, start, width, axis=axis)
            logits = dots.dot(x, w_chunk, fwd_dims, precision)
            if b is not None:
                logits = logits + lax.dynamic_slice_in_dim(b, start, width)
            logits, slope = cap(logits)
            if overlap:
                fresh = start + lax.broadcasted_iota(jnp.int32, (1, width), 1) >= i * width
                logits = jnp.where(fresh, logits, -jnp.inf)
            new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
            exp = jnp.exp(logits - new_top[:, None])
            rescale = jnp.exp(top - new_top)
            total_exp = total_exp * rescale + jnp.sum(exp, axis=-1)
            if need_hidden:
                acc = acc * rescale[:, None] + lax.dot_general(
                    (exp if slope is None else exp * slope).astype(dtype),
                    w_chunk,
                    bwd_dims,
                    precision=precision,
                    preferred_element_type=jnp.float32,
                )
            return (new_top, total_exp, acc), None

        tokens = x.shape[0]
        init = (
            jnp.full((tokens,), -jnp.inf, jnp.float32),
            jnp.zeros((tokens,), jnp.float32),
            jnp.zeros((tokens, features), jnp.float32) if need_hidden else None,
        )
        (top, total_exp, acc), _ = lax.scan(body, init, jnp.arange(chunks))
        lse = top + jnp.log(total_exp)
        # the target's logit (and, for the gradient, its weight row) by gather, rounded as the head rounds
        w_target = (w[t] if vocab_major else jnp.take(w, t, axis=1).T).astype(jnp.float32)
        picked = jnp.sum(x.astype(jnp.float32) * w_target, axis=-1).astype(dtype)
        if b is not None:
            picked = picked + b[t]
        picked, target_slope = cap(picked)
        total = jnp.sum((lse - picked) * wt)
        d_hidden = None
        if need_hidden:
            assert acc is not None  # carried through the scan exactly when need_hidden
            if target_slope is not None:
                w_target = w_target * target_slope[:, None]
            d_hidden = (acc / total_exp[:, None] - w_target) * (wt * grad_weight)[:, None]
            d_hidden = d_hidden.reshape(batch, length, features)
        return total, d_hidden

    def run(hidden, kernel, bias, targets, weights, grad_weight, need_hidden, need_kernel, need_bias):
        batch, length, features = hidden.shape
        slices = math.ceil(length / chunk)
        pad = slices * chunk - length

        def split(x):  # (batch, length, ...) -> (slices, batch, chunk, ...)
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            return jnp.moveaxis(x.reshape(batch, slices, chunk, *x.shape[2:]), 1, 0)

        # The loop holds the weight in one layout. ``(vocab, features)`` is free for a tied head, whose
        # kernel is the embedding transposed (the two transposes cancel); a transposed copy made
        # here would be loop state: a full copy of the weight every step.
        w = (kernel.T if vocab_major else kernel).astype(dtype)
        fwd_dims = (((2,), (1,)), ((), ())) if vocab_major else (((2,), (0,)), ((), ()))
        bwd_dims = (((2,), (0,)), ((), ())) if vocab_major else (((2,), (1,)), ((), ()))
        b = bias.astype(dtype) if bias is not None else None
        need_grad = need_hidden or need_kernel or need_bias

        def body(carry, xs):
            total, d_kernel, d_bias = carry
            h, t, wt = xs
            logits = dots.dot(h.astype(dtype), w, fwd_dims, precision)
            if b is not None:
                logits = logits + b
            logits, slope = cap(logits)
            lse = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
            total = total + jnp.sum((lse - picked) * wt)
            d_hidden = None
            if need_grad:
                onehot = lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]
                d_logits = (jnp.exp(logits - lse[..., None]) - onehot) * (wt * grad_weight)[..., None]
                if slope is not None:
                    d_logits = d_logits * slope
                d_logits = d_logits.astype(dtype)
                if need_hidden:
                    d_hidden = dots.dot(d_logits, w, bwd_dims, precision)
                if need_kernel:  # accumulated in the loop's layout, transposed back once at the end
                    pair = (d_logits, h.astype(dtype)) if vocab_major else (h.astype(dtype), d_logits)
                    d_kernel = d_kernel + lax.dot_general(
                        *pair,
                        (((0, 1), (0, 1)), ((), ())),
                        precision=precision,
                        preferred_element_type=jnp.float32,
                    )
                if need_bias:
                    d_bias = d_bias + jnp.sum(d_logits.astype(jnp.float32), axis=(0, 1))
            return (total, d_kernel, d_bias), d_hidden

        init = (
            jnp.zeros((), jnp.float32),
            jnp.zeros(w.shape, jnp.float32) if need_kernel else None,
            jnp.zeros(bias.shape, jnp.float32) if need_bias else None,
        )
        (total, d_kernel, d_bias), d_hidden = lax.scan(
            body, init, (split(hidden), split(targets), split(weights))
        )
        if d_hidden is not None:
            d_hidden = jnp.moveaxis(d_hidden, 0, 1).reshape(batch, slices * chunk, features)[:, :length]
        if d_kernel is not None and vocab_major:
            d_kernel = d_kernel.T
        return total, d_hidden, d_kernel, d_bias

    @jax.custom_vjp
    def loss(hidden, kernel, bias, targets, weights, grad_weight):
        return stream(hidden, kernel, bias, targets, weights, grad_weight, False)[0]

    def fwd(hidden, kernel, bias, targets, weights, grad_weight):
        need_bias = bias is not None and bias.perturbed
        values = (
            hidden.value,
            kernel.value,
            bias.value if bias is not None else None,
            targets.value,
            weights.value,
            grad_weight.value,
        )
        if kernel.perturbed or need_bias:
            total, d_hidden, d_kernel, d_bias = run(*values, hidden.perturbed, kernel.perturbed, need_bias)
        else:  # a frozen head: walk the vocabulary
            (total, d_hidden), d_kernel, d_bias = stream(*values, hidden.perturbed), None, None
        # kept in the inputs' dtypes; the backward pass only rescales them
        d_hidden = d_hidden.astype(hidden.value.dtype) if d_hidden is not None else None
        d_kernel = d_kernel.astype(kernel.value.dtype) if d_kernel is not None else None
        d_bias = d_bias.astype(bias.value.dtype) if d_bias is not None else None
        return total, (d_hidden, d_kernel, d_bias, grad_weight.value)

    def bwd(residuals, g):
        d_hidden, d_kernel, d_bias, grad_weight = residuals
        factor = g / grad_weight

        def scaled(d):
            return None if d is None else (d.astype(jnp.float32) * factor).astype(d.dtype)

        return scaled(d_hidden), scaled(d_kernel), scaled(d_bias), None, None, None

    loss.defvjp(fwd, bwd, symbolic_zeros=True)
    return loss


def seq2seq_lm_loss(
    logits: jax.Array,
    labels: jax.Array,
    decoder_attention_mask: jax.Array | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[jax.Array, jax.Array]:
    """Decoder cross-entropy, no shift: ``logits[t]`` predicts ``labels[t]`` (decoder inputs are shifted)."""
    valid = labels != ignore_index
    if decoder_attention_mask is not None:
        valid = valid & (decoder_attention_mask > 0)
    return _token_ce(logits, labels, valid)


def classification_loss(
    logits: jax.Array, labels: jax.Array, *, ignore_index: int = IGNORE_INDEX
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy over classes: ``(batch, classes)`` (sequence) or ``(batch, length, classes)`` (tokens)."""
    valid = labels != ignore_index
    return _token_ce(logits, labels, valid)


def mean_loss(total_and_count: tuple[jax.Array, jax.Array]) -> jax.Array:
    total, count = total_and_count
    return total / jnp.maximum(count, 1.0)


def shift_tokens_right(labels: jax.Array, pad_token_id: int, decoder_start_token_id: int) -> jax.Array:
    """Decoder inputs for seq2seq training: labels shifted right, ``-100`` replaced by padding."""
    shifted = jnp.concatenate([jnp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
    return jnp.where(shifted == IGNORE_INDEX, pad_token_id, shifted)
