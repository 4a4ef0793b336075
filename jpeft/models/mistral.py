"""Mistral (``model_type: mistral``): Llama without biases, with a sliding window on every layer.

``sliding_window`` defaults to 4096 as in transformers' ``MistralConfig`` (Mistral 7B v0.1);
``null`` (v0.2 and later) means full attention. A window matters only for sequences longer
than it: a query sees the ``sliding_window`` keys ending at itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jpeft.models.config import DecoderConfig, build, check_fields

DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}


def read_config(raw: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Mistral ``config.json``."""
    check_fields(raw, "mistral")
    return build(
        raw,
        model_type="mistral",
        torch_class_name="MistralForCausalLM",
        head_dim_default=None,
        qkv_bias=False,
        o_bias=False,
        sliding_window=raw.get("sliding_window", 4096),
        defaults=DEFAULTS,
    )
