"""Losses for the task types, with padding and label masks.

Each returns ``(sum of per-example losses, number of counted examples)`` so that
gradient accumulation can weight micro-batches by what they hold; ``mean_loss``
divides. Labels equal to ``ignore_index`` (``-100``, as in transformers) and
positions where ``attention_mask`` is 0 do not count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

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
    length = labels.shape[1]
    targets = jnp.roll(labels, -1, axis=1)
    valid = (jnp.arange(length) < length - 1)[None, :] & (targets != ignore_index)
    if attention_mask is not None:
        valid = valid & (jnp.roll(attention_mask, -1, axis=1) > 0)
    return _token_ce(logits, targets, valid)


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
