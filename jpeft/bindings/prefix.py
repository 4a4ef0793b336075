"""How prefix tuning's per-layer key/value prefixes reach transformers' Flax models.

Prefix tuning gives every attention layer ``nvt`` extra keys and values that all real
tokens attend to. Torch PEFT hands them to the model as ``past_key_values``; the Flax
models are reached in one of three ways, chosen per architecture:

- ``"cache"`` (decoder-only LMs: GPT-2, Llama): the model's own key/value cache (the
  ``"cache"`` collection, ``cached_key``/``cached_value``/``cache_index``) is built with
  the prefixes at positions ``0..nvt-1`` and ``cache_index = nvt``, exactly what torch's
  ``DynamicCache`` holds. Keys are stored as given (for Llama: after RoPE, as torch's
  cache), so no rotation is applied to them.
- ``"seq2seq"`` (BART): the same, on the decoder's self-attention cache only (the
  encoder and the cross-attention get no prefix, as in PEFT).
- ``"projection"`` (BERT, bidirectional, no cache in Flax): the prefixes are concatenated
  in front of the outputs of each layer's key and value projections, which is what
  torch BERT does with ``past_key_values``.

In every case the attention mask is prefixed with ones and the position ids are
shifted by ``nvt``, as torch does for a cache of length ``nvt``; outputs cover only the
real positions. The prefix arrays are computed inside the caller's function, so
gradients flow into the prefix parameters under ``jax.grad``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.bindings import family_prompts
from jpeft.bindings.linen import hooked
from jpeft.core.architectures import PrefixStyle as Style
from jpeft.core.architectures import architecture, prefix_supported
from jpeft.core.tree import PyTree, flatten, unflatten
from jpeft.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class PrefixInjection:
    """How one model receives the prefixes (static; never traced).

    Attributes:
      style: ``"cache"``, ``"seq2seq"`` or ``"projection"`` (see the module docstring).
      num_virtual_tokens: prefix length ``nvt``.
      num_heads: key/value heads of one prefix (``num_attention_heads`` of the config).
      head_dim: ``token_dim // num_heads``.
      groups: per attention layer, the ``(key, value)`` row groups of the prefix
        embedding ``E.view(nvt, 2L, H, D)`` it reads.
      projections: projection style only: ``{module name: (layer, "key" | "value")}``.
      cache_leaves: cache styles only: the model's cache entries as ``(path, dtype name,
        layer)``, read once from ``init_cache`` (``layer`` is -1 for ``cache_index``).
    """

    style: Style
    num_virtual_tokens: int
    num_heads: int
    head_dim: int
    groups: tuple[tuple[int, int], ...]
    projections: Mapping[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    cache_leaves: tuple[tuple[tuple[str, ...], str, int], ...] = ()


def _model_layers(model_config: Any, style: Style) -> int:
    """Number of attention layers that receive a prefix (decoder layers for seq2seq)."""
    names = ("decoder_layers",) if style == "seq2seq" else ("num_hidden_layers", "n_layer", "num_layers")
    for name in names:
        value = getattr(model_config, name, None)
        if value is not None:
            return int(value)
    raise ConfigError(f"could not read the number of layers ({' / '.join(names)}) from the model config.")


def layer_groups(num_layers: int, num_submodules: int, model_layers: int) -> tuple[tuple[int, int], ...]:
    """The ``(key, value)`` row groups of ``E.view(nvt, 2L, H, D)`` each model layer uses.

    Decoder-only and encoder models: layer ``l`` reads groups ``2l`` and ``2l + 1``.
    Seq2seq (``num_submodules == 2``): PEFT concatenates the groups with themselves and
    splits them in fours, so decoder layer ``l``'s self-attention reads ``4l mod 2L`` and
    the group after it (PEFT_REFERENCE.md §1.7).
    """
    if num_submodules == 2:
        total = 2 * num_layers
        return tuple(((4 * layer) % total, (4 * layer + 1) % total) for layer in range(model_layers))
    return tuple((2 * layer, 2 * layer + 1) for layer in range(model_layers))


def injection_for(binding: Any, config: Any) -> PrefixInjection:
    """How ``binding``'s model receives ``config``'s prefixes; ``ConfigError`` when it cannot.

    Args:
      binding: a :class:`jpeft.bindings.hf_flax.HFFlaxBinding`.
      config: a filled ``PrefixTuningConfig`` (``num_layers``, ``token_dim``, ... set).
    """
    class_name, model_type = binding.class_name, binding.model_type
    if getattr(binding, "family", False):
        layers, heads, head_dim = family_prompts.check_prefix(binding, config)
        return PrefixInjection(
            style="cache",
            num_virtual_tokens=int(config.num_virtual_tokens),
            num_heads=heads,
            head_dim=head_dim,
            groups=layer_groups(int(config.num_layers), int(config.num_transformer_submodules or 1), layers),
        )
    row = architecture(model_type)
    arch = row.prefix if row is not None else None
    if arch is None or binding.config is None:
        raise ConfigError(
            f"prefix tuning cannot inject key/value prefixes into {class_name} (model type {model_type!r}): jpeft "
            f"has no prefix injection for it. Supported (model type and task): {prefix_supported()}; use prompt tuning or "
            "LoRA for this model."
        )
    if config.task_type not in arch.tasks:
        raise ConfigError(
            f"prefix tuning on {class_name} supports task_type {', '.join(t.value for t in arch.tasks)}, got "
            f"{config.task_type!r}; jpeft has no prefix injection checked against PEFT for that combination."
        )
    model = binding.model
    needed = {"cache": ("init_cache",), "seq2seq": ("init_cache", "encode", "decode"), "projection": ()}
    missing = [name for name in needed[arch.style] if not hasattr(model, name)]
    if missing:
        raise ConfigError(
            f"prefix tuning on {class_name} needs its key/value cache, but the model has no {', '.join(missing)}; "
            f"use the transformers Flax class with a language-modelling head (e.g. Flax{model_type}ForCausalLM)."
        )
    heads = int(config.num_attention_heads)
    if config.token_dim % heads:
        raise ConfigError(
            f"`token_dim` ({config.token_dim}) must be a multiple of `num_attention_heads` ({heads}) for prefix "
            "tuning: each prefix is split into heads."
        )
    model_layers = _model_layers(binding.config, arch.style)
    if (arch.style == "seq2seq" and model_layers > config.num_layers) or (
        arch.style != "seq2seq" and model_layers != config.num_layers
    ):
        raise ConfigError(
            f"`num_layers={config.num_layers}` does not fit {class_name}, which has {model_layers} "
            f"{'decoder ' if arch.style == 'seq2seq' else ''}layers; leave `num_layers` unset to take it from the "
            "model."
        )
    nts = int(config.num_transformer_submodules or 1)
    projections: dict[str, tuple[int, str]] = {}
    if arch.style == "projection":
        assert arch.projection is not None
        pattern = re.compile(arch.projection)
        for name in binding.modules:
            match = pattern.fullmatch(name)
            if match:
                projections[name] = (int(match.group(1)), match.group(2))
        width = int(config.token_dim)
        found = {layer for layer, _ in projections.values()}
        if found != set(range(model_layers)):
            raise ConfigError(
                f"prefix tuning on {class_name}: found key/value projections for layers {sorted(found)}, expected "
                f"0..{model_layers - 1}."
            )
        for name in projections:
            if binding.modules[name].out_features != width:
                raise ConfigError(
                    f"prefix tuning on {class_name}: {name} has {binding.modules[name].out_features} outputs but "
                    f"the prefix has {width} (token_dim); leave "
                    "`token_dim`/`num_attention_heads` unset to take them from the model."
                )
    head_dim = int(config.token_dim) // heads
    cache_leaves = () if arch.style == "projection" else _cache_layout(binding, arch.style, heads, head_dim)
    return PrefixInjection(
        style=arch.style,
        num_virtual_tokens=int(config.num_virtual_tokens),
        num_heads=heads,
        head_dim=head_dim,
        groups=layer_groups(int(config.num_layers), nts, model_layers),
        projections=projections,
        cache_leaves=cache_leaves,
    )


def _cache_layout(
    binding: Any, style: Style, heads: int, head_dim: int
) -> tuple[tuple[tuple[str, ...], str, int], ...]:
    """The entries of ``model.init_cache``, read abstractly once (no compute), checked against the prefix."""
    model = binding.model
    if style == "seq2seq":
        width = binding.config.d_model

        def init() -> PyTree:
            return model.init_cache(1, 1, (jnp.zeros((1, 1, width), model.dtype),))

    else:

        def init() -> PyTree:
            return model.init_cache(1, 1)

    leaves = []
    for path, leaf in flatten(jax.eval_shape(init)).items():
        if path[-1] == "cache_index":
            leaves.append((path, jnp.dtype(leaf.dtype).name, -1))
            continue
        if tuple(leaf.shape[2:]) != (heads, head_dim):
            raise ConfigError(
                f"{binding.class_name}'s key/value cache holds (heads, head_dim) = {tuple(leaf.shape[2:])} per "
                f"position but the prefix has ({heads}, {head_dim}); leave `token_dim`/`num_attention_heads` "
                "unset to take them from the model."
            )
        leaves.append((path, jnp.dtype(leaf.dtype).name, _layer_of(path)))
    return tuple(leaves)


# --------------------------------------------------------------------------- prefixes


def layer_prefixes(injection: PrefixInjection, prompts: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Per model layer, ``(key, value)`` prefixes of shape ``(nvt, H, D)``.

    ``prompts`` is the encoder output ``(nvt, num_layers * 2 * token_dim)``, the tensor
    PEFT saves as ``prompt_embeddings``; it is viewed as ``(nvt, 2L, H, D)`` as PEFT does.
    """
    nvt = injection.num_virtual_tokens
    rows = prompts.reshape(nvt, -1, injection.num_heads, injection.head_dim)
    return [(rows[:, k], rows[:, v]) for k, v in injection.groups]


def _layer_of(path: tuple[str, ...]) -> int:
    for part in path:
        if part.isdigit():
            return int(part)
    raise ConfigError(f"cannot tell which layer the cache entry {'/'.join(path)} belongs to.")


def prefilled_cache(
    injection: PrefixInjection, prefixes: list[tuple[jax.Array, jax.Array]], batch: int, length: int
) -> dict[str, Any]:
    """The model's key/value cache for ``length`` positions, holding the prefixes at ``0..nvt-1``.

    ``cached_key``/``cached_value`` are ``(batch, length, H, D)``; ``cache_index`` is
    ``nvt``, so the real tokens are written after the prefix, as in torch's cache.

    Args:
      injection: the model's injection (cache styles).
      prefixes: :func:`layer_prefixes` output.
      batch: batch size.
      length: cache length (``nvt`` plus the longest sequence the cache must hold).
    """
    nvt = injection.num_virtual_tokens
    if length < nvt:
        raise ValueError(f"cache length {length} is shorter than num_virtual_tokens={nvt}.")
    filled = {}
    for path, dtype, layer in injection.cache_leaves:
        if layer < 0:
            filled[path] = jnp.asarray(nvt, dtype)
            continue
        key, value = prefixes[layer]
        prefix = (key if path[-1] == "cached_key" else value).astype(dtype)
        prefix = jnp.broadcast_to(prefix[None], (batch, *prefix.shape))
        rest = jnp.zeros((batch, length - nvt, *prefix.shape[2:]), dtype)
        filled[path] = jnp.concatenate([prefix, rest], axis=1)
    return unflatten(filled)


# --------------------------------------------------------------------------- forward


def _bound_arguments(fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``args``/``kwargs`` of a call to ``fn`` as one keyword dict."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"arguments do not fit {getattr(fn, '__qualname__', fn)}: {err}") from None
    return dict(bound.arguments)


def _prefixed_mask(mask: Any, batch: int, length: int, nvt: int) -> jax.Array:
    if mask is None:
        return jnp.ones((batch, nvt + length), jnp.int32)
    mask = jnp.asarray(mask)
    return jnp.concatenate([jnp.ones((batch, nvt), mask.dtype), mask], axis=1)


def _shifted_positions(positions: Any, batch: int, length: int, nvt: int) -> jax.Array:
    if positions is None:
        return jnp.broadcast_to(jnp.arange(nvt, nvt + length, dtype=jnp.int32)[None], (batch, length))
    return jnp.asarray(positions) + nvt


def _reject_cache(kw: Mapping[str, Any], name: str) -> None:
    if kw.get(name) is not None:
        raise ValueError(
            f"`{name}` cannot be passed to a prefix-tuned model: prefix tuning fills the key/value cache itself."
        )


def run(
    injection: PrefixInjection,
    binding: Any,
    base_params: PyTree,
    prompts: jax.Array,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    train: bool,
    dropout_rng: jax.Array | None,
) -> Any:
    """The model's forward with the prefixes in place; outputs cover the real positions only.

    Args:
      injection: from :func:`injection_for`.
      binding: the model's binding.
      base_params: effective base params.
      prompts: prefix embedding ``(nvt, num_layers * 2 * token_dim)``.
      args, kwargs: the model's inputs (``input_ids``, ``attention_mask``, ...).
      train: training mode (dropout on).
      dropout_rng: key for the model's dropout.

    Returns:
      The HF Flax output object (``FlaxSeq2SeqLMOutput`` for seq2seq).
    """
    prefixes = layer_prefixes(injection, prompts)
    if getattr(binding, "family", False):
        return family_prompts.prefix_run(
            prefixes, binding, base_params, args, kwargs, train=train, dropout_rng=dropout_rng
        )
    if injection.style == "seq2seq":
        return _run_seq2seq(injection, binding, base_params, prefixes, args, kwargs, train, dropout_rng)
    model = binding.model
    kw = _bound_arguments(model.__call__, args, kwargs)
    for name in ("params", "dropout_rng", "train"):
        if name in kw:
            raise TypeError(f"pass `{name}` to the PeftModel (apply), not among the model inputs.")
    _reject_cache(kw, "past_key_values")
    if kw.get("input_ids") is None:
        raise ValueError(
            "prefix tuning needs `input_ids` (transformers' Flax models take no `inputs_embeds`)."
        )
    input_ids = jnp.asarray(kw.pop("input_ids"))
    batch, length = input_ids.shape
    nvt = injection.num_virtual_tokens
    kw["attention_mask"] = _prefixed_mask(kw.get("attention_mask"), batch, length, nvt)
    kw["position_ids"] = _shifted_positions(kw.get("position_ids"), batch, length, nvt)
    if injection.style == "cache":
        kw["past_key_values"] = prefilled_cache(injection, prefixes, batch, nvt + length)
        return binding.run(
            base_params, None, frozenset(), (input_ids,), kw, train=train, dropout_rng=dropout_rng
        )

    def hook(module: str, x: jax.Array, out: jax.Array) -> jax.Array:
        layer, which = injection.projections[module]
        key, value = prefixes[layer]
        prefix = (key if which == "key" else value).reshape(nvt, -1).astype(out.dtype)
        prefix = jnp.broadcast_to(prefix[None], (out.shape[0], *prefix.shape))
        return jnp.concatenate([prefix, out], axis=1)

    names = frozenset(injection.projections)
    return binding.run(base_params, hook, names, (input_ids,), kw, train=train, dropout_rng=dropout_rng)


def _run_seq2seq(
    injection: PrefixInjection,
    binding: Any,
    base_params: PyTree,
    prefixes: list[tuple[jax.Array, jax.Array]],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    train: bool,
    dropout_rng: jax.Array | None,
) -> Any:
    """Encoder as is; decoder with the prefixes in its self-attention cache (torch's ``EncoderDecoderCache``)."""
    from transformers.modeling_flax_outputs import FlaxSeq2SeqLMOutput
    from transformers.models.bart.modeling_flax_bart import shift_tokens_right

    model = binding.model
    kw = _bound_arguments(model.__call__, args, kwargs)
    for name in ("params", "dropout_rng", "train"):
        if name in kw:
            raise TypeError(f"pass `{name}` to the PeftModel (apply), not among the model inputs.")
    if kw.get("return_dict") is False:
        raise ValueError("prefix-tuned seq2seq models return output objects; leave `return_dict` unset.")
    input_ids = jnp.asarray(kw["input_ids"])
    attention_mask = kw.get("attention_mask")
    nvt = injection.num_virtual_tokens
    common = {
        "output_attentions": kw.get("output_attentions"),
        "output_hidden_states": kw.get("output_hidden_states"),
        "train": train,
        "params": base_params,
        "dropout_rng": dropout_rng,
    }
    decoder_ids = kw.get("decoder_input_ids")
    if decoder_ids is None:
        # as the model's own __call__ (and torch BART) does
        decoder_ids = shift_tokens_right(
            input_ids, model.config.pad_token_id, decoder_start_token_id=model.config.decoder_start_token_id
        )
    decoder_ids = jnp.asarray(decoder_ids)
    batch, length = decoder_ids.shape
    with hooked(None, frozenset(), remat=binding.remat, train=train):
        encoder = model.encode(input_ids, attention_mask, kw.get("position_ids"), return_dict=True, **common)
        decoder = model.decode(
            decoder_ids,
            encoder,
            encoder_attention_mask=attention_mask,
            decoder_attention_mask=_prefixed_mask(kw.get("decoder_attention_mask"), batch, length, nvt),
            decoder_position_ids=_shifted_positions(kw.get("decoder_position_ids"), batch, length, nvt),
            past_key_values=prefilled_cache(injection, prefixes, batch, nvt + length),
            return_dict=True,
            **common,
        )
    return FlaxSeq2SeqLMOutput(
        logits=decoder.logits,
        past_key_values=decoder.past_key_values,
        decoder_hidden_states=decoder.hidden_states,
        decoder_attentions=decoder.attentions,
        cross_attentions=decoder.cross_attentions,
        encoder_last_hidden_state=encoder.last_hidden_state,
        encoder_hidden_states=encoder.hidden_states,
        encoder_attentions=encoder.attentions,
    )


# --------------------------------------------------------------------------- generate


def generate(
    injection: PrefixInjection,
    binding: Any,
    base_params: PyTree,
    prompts: jax.Array,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    """transformers' Flax ``generate`` with the prefixes in the key/value cache.

    Runs on a shallow copy of the model whose ``init_cache`` returns the prefilled cache
    (``nvt`` positions longer) and whose ``prepare_inputs_for_generation`` prefixes the
    attention mask with ones and shifts the position ids by ``nvt``, as torch PEFT's
    ``prepare_inputs_for_generation`` does. ``.sequences`` are the caller's input ids
    followed by the new tokens (seq2seq: the decoder's); greedy, sampling and beam search
    all work.
    """
    if injection.style == "projection":
        raise TypeError(
            "prefix tuning on an encoder model has no `generate` (it has no language-modelling head)."
        )
    if getattr(binding, "family", False):
        return family_prompts.prefix_generate(layer_prefixes(injection, prompts), binding, base_params, args, kwargs)
    model = binding.model
    if not model.can_generate():
        raise TypeError(f"{binding.class_name} cannot generate (it has no language-modelling head).")
    _reject_cache(kwargs, "past_key_values")
    prefixes = layer_prefixes(injection, prompts)
    nvt = injection.num_virtual_tokens
    seq2seq = injection.style == "seq2seq"
    mask_key = "decoder_attention_mask" if seq2seq else "attention_mask"
    position_key = "decoder_position_ids" if seq2seq else "position_ids"

    generating = copy.copy(model)
    original = type(model).prepare_inputs_for_generation.__get__(generating)

    def init_cache(batch_size: int, max_length: int, *encoder_outputs: Any) -> dict[str, Any]:
        return prefilled_cache(injection, prefixes, batch_size, max_length)

    @functools.wraps(original)
    def prepare_inputs_for_generation(input_ids: jax.Array, max_length: int, *rest: Any, **kw: Any) -> Any:
        inputs = original(input_ids, max_length + nvt, *rest, **kw)
        # the model's mask holds the caller's mask at 0..seq-1 and ones after it: move it behind the prefix
        mask = inputs[mask_key]
        prefix_mask = jnp.ones((mask.shape[0], nvt), mask.dtype)
        inputs[mask_key] = jnp.concatenate([prefix_mask, mask[:, :max_length]], axis=1)
        inputs[position_key] = inputs[position_key] + nvt
        return inputs

    generating.init_cache = init_cache
    generating.prepare_inputs_for_generation = prepare_inputs_for_generation
    return generating.generate(*args, params=base_params, **kwargs)
