"""Llama 1, 2, 3, 3.1, 3.2 (``model_type: llama``): the base of every other family here.

Honours ``rope_theta`` and every ``rope_scaling`` type of transformers' ``LlamaRotaryEmbedding``
(``linear``, ``dynamic``, ``yarn``, ``llama3``, ``longrope``), ``attention_bias`` (q, k, v and o),
``mlp_bias``, ``head_dim``, grouped-query attention, ``tie_word_embeddings``, ``rms_norm_eps``
and ``hidden_act``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jpeft.models.config import DecoderConfig, build, check_fields

DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2,
}


def read_config(raw: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Llama ``config.json`` (transformers' ``LlamaConfig`` defaults)."""
    check_fields(raw, "llama")
    bias = bool(raw.get("attention_bias", False))
    return build(
        raw,
        model_type="llama",
        torch_class_name="LlamaForCausalLM",
        head_dim_default=None,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        defaults=DEFAULTS,
    )
