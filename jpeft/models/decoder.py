"""The decoder-only causal LM shared by every family: ``<X>ForCausalLM{model: <X>Model, lm_head}``.

Module paths are transformers' torch names (``model.embed_tokens``, ``model.layers.0.self_attn.q_proj``,
``model.norm``, ``lm_head``), so PEFT's ``target_modules`` and checkpoint keys apply unchanged
through the NNX binding. A family only supplies its :class:`~jpeft.models.config.DecoderConfig`.

With ``scan_layers=True`` the blocks are one module built by ``nnx.vmap`` (weights with a
leading layer axis) and run by ``nnx.scan``: one block is compiled instead of ``L``. The NNX
binding lists its layers one by one (``model.layers.3.self_attn.q_proj``), so adapters and
their PEFT keys are per layer either way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jpeft.interop import hf_checkpoint
from jpeft.models.config import SLIDING, DecoderConfig
from jpeft.models.layers import CausalLMOutput, DecoderLayer, KVCache, RMSNorm, ScaledEmbed, attention_masks
from jpeft.models.loading import torch_tensors
from jpeft.models.rope import cos_sin

# ((cos, sin) of the full-attention layers, (cos, sin) of the sliding layers or None: the same rope)
Rotary = tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array] | None]


class DecoderModel(nnx.Module):
    """Embedding, the decoder blocks and the final norm (transformers' ``<X>Model``)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtypes: tuple[Any, Any], scan_layers: bool):
        dtype, param_dtype = dtypes
        embed: dict[str, Any] = dict(
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(cfg.initializer_range),
            rngs=rngs,
        )
        if cfg.embed_scale:
            self.embed_tokens: nnx.Embed = ScaledEmbed(
                cfg.vocab_size, cfg.hidden_size, embed_scale=cfg.embedding_scale, **embed
            )
        else:
            self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **embed)
        if scan_layers:

            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def blocks(r: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(cfg, rngs=r, dtypes=dtypes)

            self.layers: Any = blocks(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtypes=dtypes) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, offset=cfg.norm_offset)
        self.scan_layers = scan_layers
        self.sliding = tuple(t == SLIDING for t in cfg.layer_types)

    def __call__(
        self,
        x: jax.Array,
        rotary: Rotary,
        masks: tuple[jax.Array, jax.Array | None],
        cache: KVCache | None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The last hidden states (after ``norm``) of input embeddings ``x`` and the updated cache.

        ``rotary``: ``((cos, sin) of full-attention layers, (cos, sin) of sliding layers or None)``.
        """
        full, window = masks
        index = cache.index if cache is not None else 0
        if self.scan_layers:
            x, keys, values = self._scan(x, rotary, full, window, cache)
        else:
            keys_out, values_out = [], []
            for i, layer in enumerate(self.layers):
                mask = window if self.sliding[i] and window is not None else full
                cos, sin = rotary[1] if self.sliding[i] and rotary[1] is not None else rotary[0]
                kv = None if cache is None else (cache.keys[i], cache.values[i])
                x, kv = layer(x, cos, sin, mask, kv, index)
                if kv is not None:
                    keys_out.append(kv[0])
                    values_out.append(kv[1])
            keys, values = tuple(keys_out), tuple(values_out)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys=keys, values=values, index=cache.index + x.shape[1])
        return self.norm(x), new_cache

    def _scan(
        self,
        x: jax.Array,
        rotary: Rotary,
        full: jax.Array,
        window: jax.Array | None,
        cache: KVCache | None,
    ) -> tuple[jax.Array, Any, Any]:
        flags = jnp.asarray(self.sliding)
        window = full if window is None else window
        index = cache.index if cache is not None else 0
        (cos_full, sin_full), local = rotary
        cos_local, sin_local = local if local is not None else (cos_full, sin_full)

        def pick(slides: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            if local is None:
                return jnp.where(slides, window, full), cos_full, sin_full
            return jnp.where(slides, window, full), jnp.where(slides, cos_local, cos_full), jnp.where(
                slides, sin_local, sin_full
            )

        if cache is None:

            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry)
            def step(block: DecoderLayer, h: jax.Array, slides: jax.Array) -> jax.Array:
                mask, cos, sin = pick(slides)
                return block(h, cos, sin, mask, None, 0)[0]

            return step(self.layers, x, flags), None, None

        @nnx.scan(in_axes=(0, nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0, 0))
        def step_cached(
            block: DecoderLayer, h: jax.Array, slides: jax.Array, k: jax.Array, v: jax.Array
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
            mask, cos, sin = pick(slides)
            h, kv = block(h, cos, sin, mask, (k, v), index)
            assert kv is not None
            return h, kv[0], kv[1]

        return step_cached(self.layers, x, flags, cache.keys, cache.values)


def head(config: DecoderConfig, features: int, dtypes: tuple[Any, Any], rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free output projection from the hidden size (``lm_head``, ``score``), normal-initialised."""
    return nnx.Linear(
        config.hidden_size,
        features,
        use_bias=False,
        dtype=dtypes[0],
        param_dtype=dtypes[1],
        kernel_init=nnx.initializers.normal(config.initializer_range),
        rngs=rngs,
    )


class DecoderBase(nnx.Module):
    """What every head over :class:`DecoderModel` shares: inputs, positions, masks, cache, saving.

    Subclasses (:class:`CausalLM`, :class:`~jpeft.models.classification.SequenceClassification`)
    add their head and name their torch class.
    """

    task: str = ""

    def __init__(
        self,
        config: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scan_layers: bool = False,
    ):
        self.config = config
        self.model = DecoderModel(config, rngs=rngs, dtypes=(dtype, param_dtype), scan_layers=scan_layers)
        self.dtype = dtype
        self.name_or_path: str | None = None

    @property
    def torch_class_name(self) -> str:
        return self.config.torch_class_name

    def init_cache(self, batch_size: int, capacity: int, dtype: Any = None) -> KVCache:
        """An empty key/value cache for ``capacity`` positions (``dtype``: the activations' by default)."""
        cfg = self.config
        dtype = dtype or self.dtype or self.model.embed_tokens.embedding[...].dtype
        shape = (batch_size, capacity, cfg.num_key_value_heads, cfg.head_dim)
        if self.model.scan_layers:
            stacked = jnp.zeros((cfg.num_hidden_layers, *shape), dtype)
            return KVCache(keys=stacked, values=stacked, index=jnp.zeros((), jnp.int32))
        layers = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
        return KVCache(keys=layers, values=layers, index=jnp.zeros((), jnp.int32))

    def hidden_states(
        self,
        input_ids: jax.Array | None,
        attention_mask: jax.Array | None,
        position_ids: jax.Array | None,
        cache: KVCache | None,
        inputs_embeds: jax.Array | None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The final-norm hidden states ``(batch, seq, hidden)`` and the updated cache (see ``__call__``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`.")
        x = self.model.embed_tokens(input_ids) if input_ids is not None else inputs_embeds
        assert x is not None
        if self.dtype is not None:
            x = x.astype(self.dtype)
        batch, length = x.shape[:2]
        index = cache.index if cache is not None else jnp.zeros((), jnp.int32)
        keys = cache.capacity if cache is not None else length
        key_mask = _key_mask(attention_mask, batch, keys)
        table = None
        if position_ids is None:  # index + arange: within the keys' range, so cos/sin come from a table
            position_ids = jnp.broadcast_to(index + jnp.arange(length), (batch, length))
            table = keys
        cfg = self.config
        full = cos_sin(cfg.rope, position_ids, x.dtype, table)
        local = None if cfg.rope_local is None else cos_sin(cfg.rope_local, position_ids, x.dtype, table)
        masks = attention_masks(cfg, key_mask, index, length)
        return self.model(x, (full, local), masks, cache)

    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> Path:
        """Writes the model as a transformers torch checkpoint (``config.json`` + safetensors, atomic).

        Weights are saved in their dtype (quantized kernels decoded), sharded with
        ``model.safetensors.index.json`` above ``max_shard_size``; a tied model omits
        ``lm_head.weight``, as transformers does. ``<torch class>.from_pretrained(directory)`` loads it.
        """
        cfg = self.config
        dtype = self.model.embed_tokens.embedding[...].dtype
        config = {**cfg.to_dict(), "architectures": [self.torch_class_name], "torch_dtype": jnp.dtype(dtype).name}
        tensors = torch_tensors(self, cfg.num_hidden_layers, self.model.scan_layers)
        return hf_checkpoint.write_model(directory, config, tensors, max_shard_size=max_shard_size)


class CausalLM(DecoderBase):
    """A decoder-only causal LM of one family (build it with :class:`jpeft.models.AutoModelForCausalLM`).

    Attributes:
      config: the resolved :class:`~jpeft.models.config.DecoderConfig` (``config.to_dict()`` is
        its ``config.json``).
      model: embeddings, blocks and final norm (torch's ``model.*``).
      lm_head: the output projection (absent when ``tie_word_embeddings``).
      name_or_path: where the weights came from (``None`` for a fresh model).

    Example:
      >>> model = jpeft.models.AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")
      >>> out = model(input_ids, attention_mask=mask)       # out.logits (batch, seq, vocab)
      >>> ids = model.generate(input_ids, attention_mask=mask, max_new_tokens=16)
    """

    task = "CAUSAL_LM"
    # False while a fused loss computes the logits itself (it then applies the soft-cap chunk by chunk)
    apply_final_softcap = True

    def __init__(
        self,
        config: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scan_layers: bool = False,
    ):
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
        if not config.tie_word_embeddings:
            self.lm_head = head(config, config.vocab_size, (dtype, param_dtype), rngs)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> CausalLMOutput:
        """Logits of ``input_ids`` (or ``inputs_embeds``), continuing ``cache`` when given.

        Args:
          input_ids: ``(batch, seq)`` token ids.
          attention_mask: ``(batch, keys)``, 1 for real tokens: ``keys`` is ``seq`` without a
            cache; with one it covers the cache (its filled part and these tokens; shorter
            masks are padded, later slots are causally masked anyway).
          position_ids: ``(batch, seq)``; default ``index ... index + seq - 1`` as transformers'
            forward (``generate`` passes ``cumsum(mask) - 1`` for left-padded prompts).
          cache: from :meth:`init_cache` (or a previous output's ``cache``).
          inputs_embeds: ``(batch, seq, hidden)`` instead of ``input_ids`` (taken as they are:
            Gemma's embedding scale is the embedding's, as in transformers 5).
        """
        h, cache = self.hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        logits = self.model.embed_tokens.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        cap = self.config.final_logit_softcapping
        if cap is not None and self.apply_final_softcap:
            logits = jnp.tanh(logits / cap) * cap
        return CausalLMOutput(logits=logits, cache=cache)

    def generate(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, **kwargs: Any) -> jax.Array:
        """Prompt plus new tokens, as transformers' ``generate`` (jitted, with a key/value cache).

        Keyword arguments are :func:`jpeft.runtime.generation.generate`'s (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``key``).
        """
        from jpeft.runtime.generation import generate_module

        return generate_module(self, input_ids, attention_mask, **kwargs)


def _key_mask(attention_mask: jax.Array | None, batch: int, keys: int) -> jax.Array:
    if attention_mask is None:
        return jnp.ones((batch, keys), bool)
    mask = jnp.asarray(attention_mask).astype(bool)
    if mask.ndim != 2 or mask.shape[0] != batch or mask.shape[1] > keys:
        raise ValueError(
            f"attention_mask has shape {mask.shape}; expected (batch={batch}, keys<={keys}): one row per "
            "example, covering the cached and the new tokens."
        )
    if mask.shape[1] < keys:
        mask = jnp.pad(mask, ((0, 0), (0, keys - mask.shape[1])), constant_values=True)
    return mask
