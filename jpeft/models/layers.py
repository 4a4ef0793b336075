"""The building blocks of jpeft's decoder families: RMSNorm, attention with a key/value cache, MLP.

Each block holds its parameters under transformers' torch names (``q_proj``, ``weight``, ...),
so the NNX binding lists them as PEFT does. Linear layers are ``nnx.Linear`` (kernel
``(in, out)``; the torch weight is its transpose), embeddings ``nnx.Embed``.

Attention runs through ``jax.nn.dot_product_attention`` on GPUs/TPUs (cuDNN flash attention where
its conditions hold) and as grouped einsums on the CPU (:func:`attend`), with a boolean mask built
once per call by
:func:`attention_masks`: causal in cache-index space, padding on keys, and the sliding window
``k > q - W`` (a query sees ``W`` keys, itself included), as transformers' masks.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jpeft.models.config import ACTIVATIONS, DecoderConfig
from jpeft.models.rope import apply_rotary


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, filled up to ``index``.

    Attributes:
      keys, values: per layer ``(batch, capacity, kv_heads, head_dim)``: a tuple of arrays,
        or one array with a leading layer axis for a model built with ``scan_layers``.
      index: positions already filled (the next token's cache index); the same for every row
        (prompts are left-padded).
    """

    keys: Any
    values: Any
    index: jax.Array

    @property
    def capacity(self) -> int:
        """Positions the cache holds (``keys[0]`` is layer 0's array either way)."""
        return int(self.keys[0].shape[1])


@flax.struct.dataclass
class CausalLMOutput:
    """A causal LM's output: ``logits`` ``(batch, seq, vocab)`` and the updated ``cache`` (or ``None``)."""

    logits: jax.Array
    cache: KVCache | None = None


class RMSNorm(nnx.Module):
    """transformers' ``LlamaRMSNorm``: normalise in float32, cast back, then scale by ``weight``.

    With ``offset`` it is Gemma's: the weight is stored as an offset from one (initialised at
    zero) and ``normed * (1 + weight)`` is taken in float32 before the cast.
    """

    def __init__(self, dim: int, eps: float, *, param_dtype: Any = jnp.float32, offset: bool = False):
        self.eps, self.offset = eps, offset
        self.weight = nnx.Param((jnp.zeros if offset else jnp.ones)((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)


class ScaledEmbed(nnx.Embed):
    """An embedding whose rows come out multiplied by ``embed_scale`` (Gemma's ``sqrt(hidden_size)``).

    The scale is rounded to the output dtype first, as transformers does; ``attend`` (a tied
    head) uses the table unscaled. PEFT's LoRA scales an adapter's embedding delta by the same
    factor (the NNX binding reads ``embed_scale``).
    """

    def __init__(self, *args: Any, embed_scale: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.embed_scale = embed_scale

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        out = super().__call__(inputs, *args, **kwargs)
        return out * jnp.asarray(self.embed_scale, out.dtype)


def _linear(cfg: DecoderConfig, fan_in: int, fan_out: int, bias: bool, rngs: nnx.Rngs, dtypes: tuple[Any, Any]) -> nnx.Linear:
    dtype, param_dtype = dtypes
    return nnx.Linear(
        fan_in,
        fan_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


def attention_masks(
    config: DecoderConfig, key_mask: jax.Array, index: jax.Array | int, length: int
) -> tuple[jax.Array, jax.Array | None]:
    """``(full, sliding)`` boolean masks ``(batch, 1, length, keys)`` for queries at ``index ...``.

    Args:
      config: the model (its sliding window, if any layer slides).
      key_mask: ``(batch, keys)``: which cache slots (or positions, without a cache) hold real tokens.
      index: the first query's cache index (0 without a cache).
      length: number of queries.
    """
    keys = key_mask.shape[1]
    q = jnp.asarray(index) + jnp.arange(length)[:, None]
    k = jnp.arange(keys)[None, :]
    full = (k <= q)[None] & key_mask[:, None, :].astype(bool)
    sliding = None
    if config.sliding_window is not None and any(config.sliding(i) for i in range(config.num_hidden_layers)):
        sliding = full & (k > q - config.sliding_window)[None]
    return full[:, None], (None if sliding is None else sliding[:, None])


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, softcap: float | None = None
) -> jax.Array:
    """Softmax attention of queries ``(B, L, H, D)`` over keys/values ``(B, S, K, D)`` (``H`` a multiple of ``K``).

    ``mask`` ``(B, 1, L, S)`` says which keys each query sees. On GPUs/TPUs this is
    ``jax.nn.dot_product_attention`` (cuDNN flash attention where it applies); on the CPU the same
    math as grouped einsums with the scale folded into the queries and an additive mask, which XLA:CPU
    runs with fewer copies (about 15% faster forward and backward). Scores and softmax are float32.
    ``softcap`` (Gemma 2): scores become ``c * tanh(scores / c)`` before the mask (einsums on
    every backend).
    """
    if jax.default_backend() != "cpu" and softcap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    b, n, h, d = q.shape
    kv = k.shape[2]
    grouped = (q * jnp.asarray(scale, q.dtype)).reshape(b, n, kv, h // kv, d)
    scores = jnp.einsum("blkgd,bskd->bkgls", grouped, k, preferred_element_type=jnp.float32)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, :, None]  # (B, 1, 1, L, S)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v)
    return out.reshape(b, n, h, d)


class Attention(nnx.Module):
    """Multi-head attention with grouped key/value heads, optional q/k norms, RoPE and a cache.

    Projections are ``q_proj``/``k_proj``/``v_proj``, or one fused ``qkv_proj`` whose output rows
    are ``[q | k | v]`` (Phi-3).
    """

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtypes: tuple[Any, Any]):
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.fused = cfg.fused_projections
        if self.fused:
            self.qkv_proj = _linear(cfg, h, (self.num_heads + 2 * self.num_kv_heads) * d, cfg.qkv_bias, rngs, dtypes)
        else:
            self.q_proj = _linear(cfg, h, self.num_heads * d, cfg.qkv_bias, rngs, dtypes)
            self.k_proj = _linear(cfg, h, self.num_kv_heads * d, cfg.qkv_bias, rngs, dtypes)
            self.v_proj = _linear(cfg, h, self.num_kv_heads * d, cfg.qkv_bias, rngs, dtypes)
        self.o_proj = _linear(cfg, self.num_heads * d, h, cfg.o_bias, rngs, dtypes)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=dtypes[1], offset=cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=dtypes[1], offset=cfg.norm_offset)
        self.qk_norm = cfg.qk_norm
        self.scale, self.softcap = cfg.attention_scale, cfg.attn_logit_softcapping

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, n, _ = x.shape
        if self.fused:
            qkv = self.qkv_proj(x)
            q_end = self.num_heads * self.head_dim
            k_end = q_end + self.num_kv_heads * self.head_dim
            q, k, v = qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, n, self.num_heads, self.head_dim)
        return q, k.reshape(b, n, self.num_kv_heads, self.head_dim), v.reshape(b, n, self.num_kv_heads, self.head_dim)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        index: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attention output ``(batch, length, hidden)`` and the layer's updated ``(keys, values)`` cache."""
        b, n, _ = x.shape
        q, k, v = self._project(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        out = attend(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim)), kv


class MLP(nnx.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``; Phi-3 fuses ``gate_up_proj`` (rows ``[gate | up]``)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtypes: tuple[Any, Any]):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.fused = cfg.fused_projections
        if self.fused:
            self.gate_up_proj = _linear(cfg, h, 2 * i, cfg.mlp_bias, rngs, dtypes)
        else:
            self.gate_proj = _linear(cfg, h, i, cfg.mlp_bias, rngs, dtypes)
            self.up_proj = _linear(cfg, h, i, cfg.mlp_bias, rngs, dtypes)
        self.down_proj = _linear(cfg, i, h, cfg.mlp_bias, rngs, dtypes)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(up * ACTIVATIONS[self.act](gate))
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """``h = x + attn(input_layernorm(x)); y = h + mlp(post_attention_layernorm(h))``.

    Gemma's sandwich (``sandwich_norms``): ``h = x + post_attention_layernorm(attn(input_layernorm(x)));
    y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``.
    """

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtypes: tuple[Any, Any]):
        self.self_attn = Attention(cfg, rngs=rngs, dtypes=dtypes)
        self.mlp = MLP(cfg, rngs=rngs, dtypes=dtypes)

        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dtypes[1], offset=cfg.norm_offset)

        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        index: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index)
        if self.sandwich:
            h = x + self.post_attention_layernorm(attn)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), kv
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), kv
