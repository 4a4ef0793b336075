"""Gemma 2 (``model_type: gemma2``): Llama's decoder with Gemma's norms, scales and soft-caps.

- RMSNorm ``x * (1 + weight)`` in float32 (weights stored as offsets from one);
- embeddings multiplied by ``sqrt(hidden_size)`` (inside the embedding, as transformers 5 does;
  4.x multiplied a caller's ``inputs_embeds`` too, which only prompt tuning notices);
- sandwich norms around attention and MLP (``pre_/post_feedforward_layernorm``);
- attention scores scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped by
  ``attn_logit_softcapping`` before the mask (transformers applies the cap under eager attention,
  the only Gemma 2 attention transformers 5 runs by default);
- logits soft-capped by ``final_logit_softcapping``;
- even layers slide (``sliding_window``), odd ones are global, unless ``layer_types`` says;
- the MLP's activation is ``hidden_activation`` (``gelu_pytorch_tanh``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jpeft.models.config import DecoderConfig, build, check_fields, optional_positive

SOFTCAPS = frozenset({"attn_logit_softcapping", "final_logit_softcapping"})
DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
    "bos_token_id": 2, "tie_word_embeddings": True, "rope_theta": 10000.0, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
}


def gemma_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`build` arguments Gemma 2 and Gemma 3 share (``raw`` with the family's defaults)."""
    bias = bool(raw.get("attention_bias", False))
    return dict(
        head_dim_default=None,
        qkv_bias=bias,
        o_bias=bias,
        act_field="hidden_activation",
        norm_offset=True,
        embed_scale=True,
        sandwich_norms=True,
        query_pre_attn_scalar=optional_positive(raw, "query_pre_attn_scalar"),
        final_logit_softcapping=optional_positive(raw, "final_logit_softcapping"),
        sliding_window=raw.get("sliding_window"),
    )


def read_config(raw: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Gemma 2 ``config.json`` (transformers' ``Gemma2Config`` defaults)."""
    check_fields(raw, "gemma2", extra=SOFTCAPS)
    full = {**DEFAULTS, **raw}
    return build(
        full,
        model_type="gemma2",
        torch_class_name="Gemma2ForCausalLM",
        sliding_pattern=2,
        attn_logit_softcapping=optional_positive(full, "attn_logit_softcapping"),
        **gemma_fields(full),
    )
