"""Generation with a key/value cache: one jitted prefill and a ``lax.while_loop`` of decode steps.

Follows transformers' ``generate`` where greedy results must match: position ids are
``cumsum(attention_mask) - 1`` (pads at 1), the prompt's mask grows by a one per new token,
finished rows are filled with ``pad_token_id`` (the EOS id when there is none), the loop stops
when every row has finished, and the result is the prompt followed by the new tokens.
Sampling applies temperature, then top-k, then top-p, as transformers' warpers do (its RNG
differs from JAX's, so only greedy outputs are comparable across frameworks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FROM_CONFIG: Any = object()  # a generation setting left to the model's config

# forward(input_ids, attention_mask (batch, capacity), position_ids, cache) -> (logits, cache)
Forward = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    return (int(eos_token_id),) if isinstance(eos_token_id, (int, np.integer)) else tuple(int(e) for e in eos_token_id)


def _pad_id(pad_token_id: int | None, eos_ids: tuple[int, ...]) -> int:
    """What fills finished rows: the pad id, else the first EOS id (transformers' rule), else 0."""
    if pad_token_id is not None:
        return int(pad_token_id)
    return eos_ids[0] if eos_ids else 0


def _pick(logits: jax.Array, key: jax.Array, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    logits = logits.astype(jnp.float32)
    if not do_sample:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        ranked = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted = drop_sorted.at[:, -1].set(False)
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def decode(
    forward: Forward,
    cache: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_ids: tuple[int, ...],
    pad_id: int,
    reencode_at: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(tokens (batch, prompt + max_new_tokens), steps taken)``: traceable, for use under ``jit``.

    ``reencode_at``: when the sequence reaches this length during decoding, the step runs the whole
    sequence on an empty cache instead of one token (transformers' Phi-3 longrope switch).
    """
    batch, length = input_ids.shape
    capacity = length + max_new_tokens
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    positions = jnp.cumsum(mask, axis=1) - 1
    positions = jnp.where(mask == 0, 1, positions)
    empty = cache
    if not reencodes(reencode_at, length, max_new_tokens):
        reencode_at = None
    logits, cache = forward(input_ids, mask, positions[:, :length], cache)
    key, sub = jax.random.split(key)
    first = _pick(logits[:, -1], sub, do_sample, temperature, top_k, top_p).astype(input_ids.dtype)
    tokens = jnp.concatenate([input_ids, jnp.full((batch, max_new_tokens), pad_id, input_ids.dtype)], axis=1)
    tokens = tokens.at[:, length].set(first)
    eos = jnp.asarray(eos_ids or (-1,), input_ids.dtype)
    done = jnp.isin(first, eos)

    def cond(state: tuple[Any, ...]) -> jax.Array:
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
        step, tokens, cache, done, key = state
        at = length + step - 1
        last = jax.lax.dynamic_slice_in_dim(tokens, at, 1, axis=1)
        pos = jax.lax.dynamic_slice_in_dim(positions, at, 1, axis=1)

        def one_token(cache: Any) -> tuple[jax.Array, Any]:
            logits, cache = forward(last, mask[:, :capacity], pos, cache)
            return logits[:, -1], cache

        def whole_sequence(_: Any) -> tuple[jax.Array, Any]:
            assert reencode_at is not None
            logits, cache = forward(tokens[:, :reencode_at], mask[:, :capacity], positions[:, :reencode_at], empty)
            return logits[:, -1], cache

        if reencode_at is None:
            logits, cache = one_token(cache)
        else:
            logits, cache = jax.lax.cond(at + 1 == reencode_at, whole_sequence, one_token, cache)
        key, sub = jax.random.split(key)
        nxt = _pick(logits, sub, do_sample, temperature, top_k, top_p).astype(tokens.dtype)
        nxt = jnp.where(done, pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], at + 1, axis=1)
        return step + 1, tokens, cache, done | jnp.isin(nxt, eos), key

    steps, tokens, _, _, _ = jax.lax.while_loop(cond, body, (jnp.asarray(1), tokens, cache, done, key))
    return tokens, steps


def reencodes(reencode_at: int | None, length: int, max_new_tokens: int) -> bool:
    """Whether a decode step of a ``length``-token prompt reaches ``reencode_at`` (see :func:`decode`)."""
    return reencode_at is not None and length < reencode_at <= length + max_new_tokens - 1


def check_generate_args(
    input_ids: Any, max_new_tokens: int, vocab_size: int, do_sample: bool, temperature: float, key: Any
) -> None:
    """Raises ``ValueError`` for arguments that would silently give nonsense."""
    if do_sample and key is None:
        raise ValueError("sampling (do_sample=True) needs `key=jax.random.key(...)`.")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}.")
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}.")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"input_ids hold ids outside the vocabulary [0, {vocab_size}) (min {ids.min()}, max {ids.max()})."
        )


def generate(
    forward: Forward,
    init_cache: Callable[[int, int], Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    vocab_size: int,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    key: jax.Array | None = None,
    reencode_at: int | None = None,
) -> jax.Array:
    """Prompt + new tokens for any ``forward`` (runs eagerly around one traced loop; jit the caller).

    Args:
      forward: the model's forward on ``(input_ids, attention_mask, position_ids, cache)``.
      init_cache: ``(batch, capacity) -> cache``.
      input_ids: ``(batch, prompt)``; left padding with ``attention_mask``.
      max_new_tokens: tokens to add; the loop ends earlier when every row produced an EOS.
      do_sample, temperature, top_k, top_p: sampling (``key`` then required).
      eos_token_id: one id or several; ``pad_token_id`` fills finished rows (default: the EOS).
      reencode_at: the model's ``config.reencode_at`` (see :func:`decode`).

    Returns:
      ``(batch, prompt + n)`` token ids, ``n <= max_new_tokens`` as transformers returns them.
    """
    check_generate_args(input_ids, max_new_tokens, vocab_size, do_sample, temperature, key)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    eos_ids = _eos_ids(eos_token_id)
    pad = _pad_id(pad_token_id, eos_ids)
    cache = init_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
    tokens, steps = decode(
        forward,
        cache,
        input_ids,
        jnp.asarray(attention_mask),
        key if key is not None else jax.random.key(0),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_ids=eos_ids,
        pad_id=int(pad),
        reencode_at=reencode_at,
    )
    return tokens[:, : input_ids.shape[1] + int(steps)]


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def _generate_jitted(
    graphdef: Any, state: Any, input_ids: jax.Array, attention_mask: jax.Array, key: jax.Array, settings: tuple
) -> tuple[jax.Array, jax.Array]:
    max_new_tokens, do_sample, temperature, top_k, top_p, eos_ids, pad_id, reencode_at = settings

    def forward(ids: jax.Array, mask: jax.Array, pos: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        # merged inside the loop body: the model's own nnx transforms (scan_layers) trace at this level
        out = nnx.merge(graphdef, state, copy=True)(ids, attention_mask=mask, position_ids=pos, cache=cache)
        return out.logits, out.cache

    model = nnx.merge(graphdef, state)
    cache = model.init_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
    return decode(
        forward, cache, input_ids, attention_mask, key,
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_ids=eos_ids, pad_id=pad_id, reencode_at=reencode_at,
    )


def generate_module(
    model: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: Any = FROM_CONFIG,
    pad_token_id: Any = FROM_CONFIG,
    key: jax.Array | None = None,
) -> jax.Array:
    """:meth:`CausalLM.generate`: one compile per prompt shape and settings (``jax.jit``).

    ``eos_token_id``/``pad_token_id`` default to the model config's; an explicit ``None`` means
    none (no early stop), as in transformers.
    """
    config = model.config
    check_generate_args(input_ids, max_new_tokens, config.vocab_size, do_sample, temperature, key)
    eos_ids = _eos_ids(config.eos_token_id if eos_token_id is FROM_CONFIG else eos_token_id)
    pad = _pad_id(config.pad_token_id if pad_token_id is FROM_CONFIG else pad_token_id, eos_ids)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    settings = (
        int(max_new_tokens), bool(do_sample), float(temperature), top_k, top_p, eos_ids, int(pad), config.reencode_at
    )
    graphdef, state = nnx.split(model)
    tokens, steps = _generate_jitted(graphdef, state, input_ids, mask, key if key is not None else jax.random.key(0), settings)
    return tokens[:, : input_ids.shape[1] + int(steps)]
