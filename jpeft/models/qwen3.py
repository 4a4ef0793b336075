"""Qwen3 (``model_type: qwen3``): Qwen2 with per-head q/k RMSNorm before RoPE and an explicit ``head_dim``.

``head_dim`` defaults to 128 (not ``hidden_size / num_attention_heads``); ``attention_bias``
covers q, k, v and o.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jpeft.models.config import DecoderConfig, build, check_fields
from jpeft.models.qwen2 import DEFAULTS, sliding_window


def read_config(raw: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Qwen3 ``config.json``."""
    check_fields(raw, "qwen3")
    window, first = sliding_window(raw)
    bias = bool(raw.get("attention_bias", False))
    return build(
        raw,
        model_type="qwen3",
        torch_class_name="Qwen3ForCausalLM",
        head_dim_default=128,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        sliding_window=window,
        first_sliding=first,
        defaults=DEFAULTS,
    )
