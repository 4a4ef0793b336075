"""Gemma 3 text (``model_type: gemma3_text``, ``Gemma3ForCausalLM``): Gemma 2 with q/k norms and two ropes.

Differences from Gemma 2 (:mod:`jpeft.models.gemma2`):

- per-head ``q_norm``/``k_norm`` (Gemma's ``1 + weight`` RMSNorm) before RoPE;
- five sliding layers to one global (``sliding_window_pattern``, default 6: layer ``i`` is
  global iff ``(i + 1) % 6 == 0``) unless ``layer_types`` lists them;
- global layers rotate with ``rope_theta`` (1e6) and ``rope_scaling``; sliding layers with
  ``rope_local_base_freq`` (1e4), unscaled. transformers 5's nested ``rope_parameters``
  (``full_attention``/``sliding_attention``) are read as well;
- no attention soft-capping: transformers never applies ``attn_logit_softcapping`` to Gemma 3
  (so jpeft does not either, and says so when the field is set); the final soft-cap is off by default.

The multimodal ``gemma3`` checkpoints (``Gemma3ForConditionalGeneration``) are not this family.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from jpeft.models.config import FULL, SLIDING, DecoderConfig, build, check_fields, rope_fields
from jpeft.models.gemma2 import SOFTCAPS, gemma_fields

DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
    "bos_token_id": 2, "tie_word_embeddings": True, "rope_theta": 1000000.0, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6,
}


def read_config(raw: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Gemma 3 text ``config.json`` (``Gemma3TextConfig`` defaults)."""
    check_fields(raw, "gemma3_text", extra=SOFTCAPS)
    full = {**DEFAULTS, **raw}
    if full.get("attn_logit_softcapping") is not None:
        warnings.warn(
            "config.json sets `attn_logit_softcapping` for Gemma 3; transformers' Gemma 3 never applies it, and "
            "neither does jpeft (outputs match transformers).",
            stacklevel=3,
        )
    nested = isinstance(full.get("rope_parameters"), Mapping) and SLIDING in full["rope_parameters"]
    if nested:
        local = rope_fields(full, 10000.0, layer_type=SLIDING)
    else:
        local = (float(full["rope_local_base_freq"]), None)
    pattern = full.get("sliding_window_pattern") or 6
    return build(
        full,
        model_type="gemma3_text",
        torch_class_name="Gemma3ForCausalLM",
        sliding_pattern=int(pattern),
        qk_norm=True,
        rope_fields_of=rope_fields(full, 1000000.0, layer_type=FULL),
        local_rope_fields=local,
        **gemma_fields(full),
    )
