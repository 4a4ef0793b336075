"""Qwen2 and Qwen2.5 (``model_type: qwen2``): Llama with q/k/v biases (no o_proj bias).

Sliding windows follow transformers' ``Qwen2Config``: only with ``use_sliding_window``, on the
layers from ``max_window_layers`` on, unless ``layer_types`` lists them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jpeft.models.config import DecoderConfig, build, check_fields

DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "hidden_act": "silu",
}


def sliding_window(raw: Mapping[str, Any]) -> tuple[int | None, int]:
    """``(window or None, first sliding layer)`` as Qwen's configs resolve them."""
    window = raw.get("sliding_window", 4096) if raw.get("use_sliding_window", False) else None
    return window, int(raw.get("max_window_layers", 28))


def read_config(raw: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Qwen2 ``config.json``."""
    check_fields(raw, "qwen2")
    window, first = sliding_window(raw)
    return build(
        raw,
        model_type="qwen2",
        torch_class_name="Qwen2ForCausalLM",
        head_dim_default=None,
        qkv_bias=True,
        o_bias=False,
        sliding_window=window,
        first_sliding=first,
        defaults=DEFAULTS,
    )
