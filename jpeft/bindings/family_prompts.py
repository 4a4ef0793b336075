"""How prompt tuning, P-tuning and prefix tuning reach jpeft's own family models (:mod:`jpeft.models`).

These models take ``attention_mask``, ``position_ids`` and a key/value ``cache``, so the prompt
methods reach them as torch PEFT reaches transformers' torch classes:

- virtual tokens (prompt tuning, P-tuning): ``num_virtual_tokens`` placeholder ids go in front
  of the input ids and a hook on the word embedding puts the prompt rows in their place; the
  attention mask is prefixed with ones and positions run ``0 .. nvt + seq - 1``.
- prefix tuning: the per-layer key/value prefixes fill cache slots ``0 .. nvt - 1``, the mask
  is prefixed with ones, and the real tokens take positions ``nvt ...`` (keys of the prefix
  are not rotated), as torch's ``DynamicCache`` holds them.

As in PEFT, virtual tokens ignore a caller's ``position_ids`` (with a warning) and generate by
cache index, while prefix tuning shifts given positions (and ``generate``'s ``cumsum(mask) - 1``)
by ``nvt``. Generation returns the caller's ids followed by the new tokens.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.errors import ConfigError

PLACEHOLDER = 0


def _inputs(
    binding: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], method: str, *, keep_positions: bool = False
) -> dict[str, Any]:
    """The model's inputs by name; refuses what the prompt method fills itself.

    ``keep_positions``: keep a caller's ``position_ids`` (prefix tuning shifts them); otherwise they
    are dropped with PEFT's warning.
    """
    kw = dict(inspect.signature(binding.model.__call__).bind_partial(*args, **kwargs).arguments)
    for name in ("params", "dropout_rng", "train"):
        if name in kw:
            raise TypeError(f"pass `{name}` to the PeftModel (apply), not among the model inputs.")
    if kw.get("cache") is not None:
        raise ValueError(f"`cache` cannot be passed to a model with {method}: the method builds the cache itself.")
    if kw.get("input_ids") is None:
        raise ValueError(f"{method} needs `input_ids`.")
    if not keep_positions and kw.pop("position_ids", None) is not None:
        warnings.warn("Position ids are not supported for prompt learning (as in PEFT); ignoring them.", stacklevel=4)
    return kw


def _mask(kw: Mapping[str, Any], batch: int, length: int, nvt: int) -> jax.Array:
    mask = kw.get("attention_mask")
    mask = jnp.ones((batch, length), jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
    return jnp.concatenate([jnp.ones((batch, nvt), jnp.int32), mask], axis=1)


# --------------------------------------------------------------------------- virtual tokens


def _prompt_hook(plan: Any, prompts: jax.Array, prefill_length: int) -> tuple[Any, frozenset[str]]:
    """``(hook, names)``: on the word embedding, the first ``nvt`` rows of a prefill become the (scaled) prompts."""
    nvt = plan.num_virtual_tokens
    if plan.embed_scale != 1.0:
        prompts = prompts * plan.embed_scale

    def hook(name: str, x: jax.Array, out: jax.Array) -> jax.Array:
        if out.ndim != 3 or out.shape[1] != prefill_length:  # decode steps: one new token, no prompt
            return out
        rows = jnp.broadcast_to(prompts.astype(out.dtype)[None], (out.shape[0], nvt, out.shape[2]))
        return jnp.concatenate([rows, out[:, nvt:]], axis=1)

    return hook, frozenset({plan.word_embeddings})


def virtual_tokens_run(
    plan: Any, binding: Any, base_params: Any, prompts: jax.Array, args: tuple, kwargs: Mapping[str, Any],
    *, train: bool, dropout_rng: jax.Array | None,
) -> Any:
    """The forward with the prompt rows in front: causal LM logits cover ``nvt + seq`` positions."""
    kw = _inputs(binding, args, kwargs, plan.config.peft_type.value)
    ids = jnp.asarray(kw.pop("input_ids"))
    batch, length = ids.shape
    nvt = plan.num_virtual_tokens
    kw["attention_mask"] = _mask(kw, batch, length, nvt)
    ids = jnp.concatenate([jnp.full((batch, nvt), PLACEHOLDER, ids.dtype), ids], axis=1)
    if getattr(binding.model, "task", None) == "SEQ_CLS":
        kw["pool_last_position"] = True  # PEFT passes inputs_embeds: transformers then pools the last position
    hook, names = _prompt_hook(plan, prompts, nvt + length)
    return binding.run(base_params, hook, names, (ids,), kw, train=train, dropout_rng=dropout_rng)


def virtual_tokens_generate(
    plan: Any, binding: Any, base_params: Any, prompts: jax.Array, args: tuple, kwargs: Mapping[str, Any]
) -> jax.Array:
    """Generation with the prompt rows in the prefill; the caller's ids followed by the new tokens."""
    from jpeft.runtime.generation import generate

    model = binding.model
    ids, mask, options = _generate_inputs(args, kwargs, model)
    batch, length = ids.shape
    nvt = plan.num_virtual_tokens
    hook, names = _prompt_hook(plan, prompts, nvt + length)

    def forward(tokens: jax.Array, full_mask: jax.Array, pos: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        del pos  # PEFT: positions by cache index
        out = binding.run(
            base_params, hook, names, (tokens,), {"attention_mask": full_mask, "cache": cache},
            train=False, dropout_rng=None,
        )
        return out.logits, out.cache

    ext_ids = jnp.concatenate([jnp.full((batch, nvt), PLACEHOLDER, ids.dtype), ids], axis=1)
    ext_mask = jnp.concatenate([jnp.ones((batch, nvt), mask.dtype), mask], axis=1)
    out = generate(forward, model.init_cache, ext_ids, ext_mask, vocab_size=model.config.vocab_size, **options)
    return jnp.concatenate([ids, out[:, nvt + length :]], axis=1)


def _generate_inputs(args: tuple, kwargs: Mapping[str, Any], model: Any) -> tuple[jax.Array, jax.Array, dict]:
    options = dict(kwargs)
    if args:
        options["input_ids"] = args[0]
        if len(args) > 1:
            options["attention_mask"] = args[1]
    ids = options.pop("input_ids", None)
    if ids is None:
        raise ValueError("generate needs `input_ids`.")
    ids = jnp.asarray(ids, jnp.int32)
    mask = options.pop("attention_mask", None)
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask, jnp.int32)
    options.setdefault("eos_token_id", model.config.eos_token_id)
    options.setdefault("pad_token_id", model.config.pad_token_id)
    switch = model.config.reencode_at
    if switch is not None and ids.shape[1] + int(options.get("max_new_tokens", 20)) > switch - 1:
        raise ValueError(
            f"generation with a prompt method up to {ids.shape[1] + int(options.get('max_new_tokens', 20))} tokens "
            f"would pass this {model.config.model_type} model's original_max_position_embeddings "
            f"({switch - 1}), where transformers re-encodes the sequence with longrope's long factors; PEFT's prompt "
            "methods do not carry through that re-encoding, so jpeft refuses it. Lower max_new_tokens."
        )
    return ids, mask, options


# --------------------------------------------------------------------------- prefix tuning


def check_prefix(binding: Any, config: Any) -> tuple[int, int, int]:
    """``(layers, kv heads, head_dim)`` of the model, checked against a filled prefix-tuning config."""
    cfg = binding.model.config
    task = getattr(binding.model, "task", "CAUSAL_LM")
    if config.task_type is None or config.task_type.value != task:
        raise ConfigError(
            f"prefix tuning on {binding.class_name} needs task_type={task!r}, got "
            f"{config.task_type.value if config.task_type else None!r}."
        )
    if int(config.num_layers) != cfg.num_hidden_layers:
        raise ConfigError(
            f"`num_layers={config.num_layers}` does not fit {binding.class_name}, which has "
            f"{cfg.num_hidden_layers} layers; leave `num_layers` unset to take it from the model."
        )
    width = cfg.num_key_value_heads * cfg.head_dim
    if int(config.token_dim) != width or int(config.num_attention_heads) != cfg.num_key_value_heads:
        raise ConfigError(
            f"prefix tuning on {binding.class_name}: the prefixes must have the key/value heads' shape "
            f"({cfg.num_key_value_heads} heads x {cfg.head_dim}), got token_dim={config.token_dim}, "
            f"num_attention_heads={config.num_attention_heads}; leave them unset to take them from the model."
        )
    return cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim


def prefilled_cache(model: Any, prefixes: list[tuple[jax.Array, jax.Array]], batch: int, capacity: int) -> Any:
    """The model's cache for ``capacity`` positions holding the prefixes in slots ``0 .. nvt - 1``."""
    nvt = prefixes[0][0].shape[0]
    empty = model.init_cache(batch, capacity)
    dtype = empty.keys[0].dtype

    def fill(rows: jax.Array) -> jax.Array:
        rows = jnp.broadcast_to(rows.astype(dtype)[None], (batch, *rows.shape))
        return jnp.pad(rows, ((0, 0), (0, capacity - nvt), (0, 0), (0, 0)))

    keys: Any = tuple(fill(k) for k, _ in prefixes)
    values: Any = tuple(fill(v) for _, v in prefixes)
    if not isinstance(empty.keys, tuple):  # scan_layers: one stacked array
        keys, values = jnp.stack(keys), jnp.stack(values)
    return type(empty)(keys=keys, values=values, index=jnp.asarray(nvt, jnp.int32))


def prefix_run(
    prefixes: list[tuple[jax.Array, jax.Array]], binding: Any, base_params: Any, args: tuple,
    kwargs: Mapping[str, Any], *, train: bool, dropout_rng: jax.Array | None,
) -> Any:
    """The forward with the prefixes in the cache; logits cover the real positions only."""
    kw = _inputs(binding, args, kwargs, "prefix tuning", keep_positions=True)
    ids = jnp.asarray(kw.pop("input_ids"))
    batch, length = ids.shape
    nvt = prefixes[0][0].shape[0]
    kw["attention_mask"] = _mask(kw, batch, length, nvt)
    kw["cache"] = prefilled_cache(binding.model, prefixes, batch, nvt + length)
    if kw.get("position_ids") is not None:  # PEFT: a caller's positions move behind the prefix
        kw["position_ids"] = jnp.asarray(kw["position_ids"]) + nvt
    return binding.run(base_params, None, frozenset(), (ids,), kw, train=train, dropout_rng=dropout_rng)


def prefix_generate(
    prefixes: list[tuple[jax.Array, jax.Array]], binding: Any, base_params: Any, args: tuple, kwargs: Mapping[str, Any]
) -> jax.Array:
    """Generation from a cache that starts with the prefixes; the caller's ids followed by the new tokens."""
    from jpeft.runtime.generation import generate

    model = binding.model
    ids, mask, options = _generate_inputs(args, kwargs, model)
    nvt = prefixes[0][0].shape[0]

    def forward(tokens: jax.Array, full_mask: jax.Array, pos: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        pos = pos + nvt  # transformers' cumsum positions, moved behind the prefix (PEFT)
        prefixed = jnp.concatenate([jnp.ones((full_mask.shape[0], nvt), full_mask.dtype), full_mask], axis=1)
        out = binding.run(
            base_params, None, frozenset(), (tokens,),
            {"attention_mask": prefixed, "position_ids": pos, "cache": cache},
            train=False, dropout_rng=None,
        )
        return out.logits, out.cache

    def init_cache(batch: int, capacity: int) -> Any:
        return prefilled_cache(model, prefixes, batch, nvt + capacity)

    return generate(forward, init_cache, ids, mask, vocab_size=model.config.vocab_size, **options)
