"""A decoder family's ``config.json``, read into one static, checked description.

:class:`DecoderConfig` holds everything the shared decoder (:mod:`jpeft.models.decoder`) needs,
already resolved per family: defaults that differ between families (Qwen3's ``head_dim``,
Mistral's sliding window), which projections carry biases, which layers slide, and the rotary
setup of each attention type. A family file (``llama.py``, ``qwen3.py``, ...) is a reader from
``config.json`` to this object; nothing downstream branches on the family.

Fields that change the math are honoured or refused with an error naming the field, never
dropped: see :func:`check_fields`. Both ``config.json`` layouts are read: transformers 4.x's
``rope_theta``/``rope_scaling`` and 5.x's ``rope_parameters``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax

from jpeft.errors import ConfigError
from jpeft.models.rope import Rope, rope_from_config

FULL, SLIDING = "full_attention", "sliding_attention"

# Fields that never change the forward math (bookkeeping, generation defaults, tokens, init).
NEUTRAL_FIELDS = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
        "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "return_dict",
        "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tie_encoder_decoder",
        "is_decoder", "is_encoder_decoder", "add_cross_attention", "tokenizer_class", "prefix", "sep_token_id",
        "decoder_start_token_id", "task_specific_params", "problem_type", "id2label", "label2id", "num_labels",
        "chunk_size_feed_forward", "pruned_heads", "finetuning_task", "cross_attention_hidden_size",
        "pretraining_tp", "max_window_layers", "use_sliding_window", "layer_types", "sliding_window",
        "rope_theta", "rope_scaling", "rope_parameters", "head_dim", "attention_bias", "mlp_bias",
        "attention_dropout", "tie_word_embeddings", "vocab_size", "hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps",
        "max_position_embeddings", "bad_words_ids", "begin_suppress_tokens", "diversity_penalty", "do_sample",
        "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
        "forced_bos_token_id", "forced_eos_token_id", "length_penalty", "max_length", "min_length",
        "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_scores",
        "remove_invalid_values", "repetition_penalty", "return_dict_in_generate", "suppress_tokens",
        "temperature", "top_k", "top_p", "typical_p", "bos_token", "eos_token", "pad_token",
        "tf_legacy_loss", "use_return_dict", "original_max_position_embeddings", "partial_rotary_factor",
        "cache_implementation", "hidden_activation", "query_pre_attn_scalar", "sliding_window_pattern",
        "rope_local_base_freq",
    }
)
# Fields that do change the math and jpeft does not implement: refused with the reason.
REFUSED_FIELDS: Mapping[str, str] = {
    "quantization_config": "pre-quantized checkpoints (GPTQ/AWQ/bitsandbytes files) are not read; load the "
    "full-precision checkpoint and pass `quantization_config=jpeft.QuantizationConfig(...)` to quantize on read",
    "use_bidirectional_attention": "bidirectional attention is not implemented; jpeft's models are causal",
    "attn_logit_softcapping": "attention soft-capping belongs to Gemma 2; transformers' class of this family does "
    "not apply it",
    "final_logit_softcapping": "final logit soft-capping belongs to Gemma; transformers' class of this family does "
    "not apply it",
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """One decoder-only model, resolved from its ``config.json`` (static and hashable).

    Attributes:
      model_type: transformers' ``model_type`` (``"llama"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"``).
      torch_class_name: the transformers torch class its checkpoints load into.
      vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
      num_key_value_heads, head_dim: shapes (``head_dim`` resolved per family).
      hidden_act: the MLP activation (transformers' name).
      rms_norm_eps: epsilon of every RMSNorm (q/k norms included).
      max_position_embeddings: positions the model was built for.
      qkv_bias, o_bias, mlp_bias: which projections carry a bias.
      qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3, Gemma 3).
      norm_offset: Gemma's RMSNorm, ``x * (1 + weight)`` in float32 (weights stored as offsets).
      embed_scale: the embedding multiplies its rows by ``sqrt(hidden_size)`` (Gemma), in the
        activations' dtype, inside the embedding module (so ``inputs_embeds`` are not scaled).
      sandwich_norms: Gemma's block: ``post_attention_layernorm`` normalises the attention output,
        ``pre_/post_feedforward_layernorm`` wrap the MLP.
      query_pre_attn_scalar: attention scores scale by its ``-0.5`` power (``None``: ``head_dim``'s).
      attn_logit_softcapping: scores become ``c * tanh(scores / c)`` before the mask (Gemma 2).
      final_logit_softcapping: the causal LM's logits become ``c * tanh(logits / c)`` (Gemma).
      fused_projections: one ``qkv_proj`` (rows q, k, v) and one ``gate_up_proj`` (rows gate, up),
        as Phi-3 stores them.
      reencode_at: generation re-encodes the whole sequence (a fresh cache) when it reaches this
        length, as transformers' Phi-3 does when longrope switches to its long factors.
      tie_word_embeddings: ``lm_head`` shares ``embed_tokens``' weight.
      layer_types: per layer, ``"full_attention"`` or ``"sliding_attention"``.
      sliding_window: keys a sliding layer sees (itself included), or ``None``.
      rope: the rotary setup of every layer (of the full-attention layers with ``rope_local``).
      rope_local: the rotary setup of the sliding layers when it differs (Gemma 3), else ``None``.
      pad_token_id, bos_token_id, eos_token_id: the special ids of ``config.json``.
      initializer_range: std of the normal init of ``from_config``.
      num_labels: outputs of a sequence-classification head (``id2label``'s length, default 2).
      raw: ``config.json`` as read (written back by ``save_pretrained``).
    """

    model_type: str
    torch_class_name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    max_position_embeddings: int
    rope: Rope
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    fused_projections: bool = False
    reencode_at: int | None = None
    rope_local: Rope | None = None
    tie_word_embeddings: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    initializer_range: float = 0.02
    num_labels: int = 2
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    # transformers-config-shaped reads, for code that reads any model's config (prompt learning)
    is_encoder_decoder = False

    def to_dict(self) -> dict[str, Any]:
        """``config.json`` as it is saved (the read dict, with this model's ``model_type``)."""
        labels = self.raw.get("id2label")
        if not isinstance(labels, Mapping) or len(labels) != self.num_labels:
            labels = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        return {
            **self.raw,
            "model_type": self.model_type,
            "head_dim": self.head_dim,
            "num_key_value_heads": self.num_key_value_heads,
            "id2label": dict(labels),
            "label2id": {v: int(k) for k, v in labels.items()},
        }

    def sliding(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (``None``: full attention)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @property
    def attention_scale(self) -> float:
        """What attention scores are multiplied by."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embedding_scale(self) -> float:
        """What the input embedding multiplies its rows by (1.0 but for Gemma)."""
        return float(self.hidden_size) ** 0.5 if self.embed_scale else 1.0


# --------------------------------------------------------------------------- reading helpers


def check_fields(raw: Mapping[str, Any], family: str, extra: frozenset[str] = frozenset()) -> None:
    """Refuses fields jpeft does not implement; warns once about fields it does not know.

    Raises:
      ConfigError: a field of :data:`REFUSED_FIELDS` is set (names the field and why).
    """
    for name, why in REFUSED_FIELDS.items():
        if raw.get(name) not in (None, False) and name not in extra:
            raise ConfigError(f"config.json field `{name}` of this {family} model is not supported: {why}.")
    no_dropout(raw, family, "attention_dropout")
    known = NEUTRAL_FIELDS | extra | REFUSED_FIELDS.keys()
    unknown = sorted(k for k in raw if k not in known and not k.startswith("_"))
    if unknown:
        warnings.warn(
            f"config.json of this {family} model has fields jpeft does not read: {', '.join(unknown)}. jpeft "
            "honours every field transformers' torch class uses for the math; these are ignored.",
            stacklevel=3,
        )


def optional_positive(raw: Mapping[str, Any], name: str) -> float | None:
    """A field that is a positive number or null (soft-caps, scalars)."""
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"config.json field `{name}` must be a positive number or null, got {value!r}.")
    return float(value)


def no_dropout(raw: Mapping[str, Any], family: str, *names: str) -> None:
    """Refuses a non-zero dropout field: jpeft's blocks have no dropout."""
    for name in names:
        if raw.get(name):
            raise ConfigError(
                f"config.json field `{name}={raw[name]}` is not supported: jpeft's {family} blocks have no dropout "
                "(released checkpoints use 0.0); set it to 0.0."
            )


def _int(raw: Mapping[str, Any], name: str, default: Any = None) -> int:
    value = raw.get(name, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json field `{name}` must be a positive integer, got {value!r}.")
    return value


def rope_fields(
    raw: Mapping[str, Any], default_theta: float = 10000.0, layer_type: str | None = None
) -> tuple[float, Mapping[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either layout (4.x top-level fields, 5.x ``rope_parameters``).

    ``layer_type``: for a model whose ``rope_parameters`` has one entry per attention type
    (Gemma 3 in 5.x), the entry to read.
    """
    params = raw.get("rope_parameters")
    if params and layer_type is not None and isinstance(params, Mapping) and layer_type in params:
        params = params[layer_type]
    if params:
        if not isinstance(params, Mapping) or FULL in params:
            raise ConfigError(
                "config.json field `rope_parameters` must be one mapping {rope_type, rope_theta, ...} for this "
                f"model, got {params!r}."
            )
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", raw.get("rope_theta", default_theta))
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return float(theta), (None if kind == "default" and len(scaling) <= 1 else scaling)
    return float(raw.get("rope_theta", default_theta)), raw.get("rope_scaling")


def layer_types_of(
    raw: Mapping[str, Any], layers: int, window: int | None, first_sliding: int = 0, pattern: int | None = None
) -> tuple[str, ...]:
    """Per-layer attention types: ``layer_types`` when given, else layers from ``first_sliding`` slide.

    ``pattern`` (Gemma): layer ``i`` is full iff ``(i + 1) % pattern == 0``; all others slide.
    """
    given = raw.get("layer_types")
    if given is not None:
        if len(given) != layers or any(t not in (FULL, SLIDING) for t in given):
            raise ConfigError(
                f"config.json field `layer_types` must list {layers} entries of {FULL!r}/{SLIDING!r}, got {given!r}."
            )
        return tuple(given)
    if pattern is not None:
        return tuple(SLIDING if window is not None and (i + 1) % pattern else FULL for i in range(layers))
    return tuple(SLIDING if window is not None and i >= first_sliding else FULL for i in range(layers))


def build(
    raw: Mapping[str, Any],
    *,
    model_type: str,
    torch_class_name: str,
    head_dim_default: int | None,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool = False,
    qk_norm: bool = False,
    sliding_window: int | None = None,
    first_sliding: int = 0,
    sliding_pattern: int | None = None,
    defaults: Mapping[str, Any] | None = None,
    act_field: str = "hidden_act",
    rope_fields_of: tuple[float, Mapping[str, Any] | None] | None = None,
    local_rope_fields: tuple[float, Mapping[str, Any] | None] | None = None,
    **family: Any,
) -> DecoderConfig:
    """The checked :class:`DecoderConfig` of one family's ``config.json`` (its defaults in ``defaults``).

    ``act_field`` names the activation's field (Gemma reads ``hidden_activation``);
    ``rope_fields_of`` is ``(rope_theta, rope_scaling)`` when not the usual fields' (:func:`rope_fields`),
    ``local_rope_fields`` the same for the sliding layers when they rotate differently (Gemma 3);
    ``family`` sets the remaining :class:`DecoderConfig` flags (``norm_offset=True``, ...).
    """
    raw = {**(defaults or {}), **raw}
    heads = _int(raw, "num_attention_heads")
    hidden = _int(raw, "hidden_size")
    kv_heads = _int(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError(
            f"config.json: `num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads` ({kv_heads})."
        )
    head_dim = raw.get("head_dim") or head_dim_default or hidden // heads
    layers = _int(raw, "num_hidden_layers")
    max_pos = _int(raw, "max_position_embeddings")

    def rope_of(theta: float, scaling: Mapping[str, Any] | None) -> Rope:
        return rope_from_config(
            rope_theta=theta,
            rope_scaling=scaling,
            head_dim=int(head_dim),
            max_position_embeddings=max_pos,
            partial_rotary_factor=float(raw.get("partial_rotary_factor", 1.0)),
            original_max_position_embeddings=raw.get("original_max_position_embeddings"),
        )

    rope = rope_of(*(rope_fields_of or rope_fields(raw)))
    local = rope_of(*local_rope_fields) if local_rope_fields is not None else rope
    act = raw.get(act_field, "silu")
    if act not in ACTIVATIONS:
        raise ConfigError(
            f"config.json field `{act_field}={act!r}` is not supported; supported: {', '.join(sorted(ACTIVATIONS))}."
        )
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ConfigError(f"config.json field `sliding_window` must be a positive integer or null, got {sliding_window!r}.")
    eos = raw.get("eos_token_id")
    return DecoderConfig(
        model_type=model_type,
        torch_class_name=torch_class_name,
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(head_dim),
        hidden_act=act,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        rope=rope,
        rope_local=None if local == rope else local,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=qk_norm,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        layer_types=layer_types_of(raw, layers, sliding_window, first_sliding, sliding_pattern),
        sliding_window=sliding_window,
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        initializer_range=float(raw.get("initializer_range", 0.02)),
        num_labels=_num_labels(raw),
        raw=dict(raw),
        **family,
    )


def _num_labels(raw: Mapping[str, Any]) -> int:
    labels = raw.get("id2label")
    if isinstance(labels, Mapping) and labels:
        return len(labels)
    return _int(raw, "num_labels", 2)


def _gelu_tanh(x: Any) -> Any:
    return jax.nn.gelu(x, approximate=True)


def _gelu(x: Any) -> Any:
    return jax.nn.gelu(x, approximate=False)


# transformers' ACT2FN names, as the MLP reads them
ACTIVATIONS: Mapping[str, Callable[[Any], Any]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": _gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "relu": jax.nn.relu,
}
