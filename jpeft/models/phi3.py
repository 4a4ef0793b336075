"""Phi-3 and Phi-3.5 mini (``model_type: phi3``): Llama with fused projections and partial rotary.

- ``qkv_proj`` (rows ``[q | k | v]``) and ``gate_up_proj`` (rows ``[gate | up]``) stay fused, so
  PEFT adapters that target these names interchange with torch;
- ``partial_rotary_factor``: only the first ``head_dim * factor`` channels rotate;
- ``rope_scaling`` ``longrope`` (also spelled ``su``, or ``yarn`` in old configs, which
  transformers renames): short factors up to ``original_max_position_embeddings``, long factors
  past it, with attention scaling ``sqrt(1 + ln(max / original) / ln(original))``. Generation
  re-encodes the whole sequence once when it passes ``original_max_position_embeddings``, as
  transformers 5 does (4.x's re-encoding drops causality: a transformers bug jpeft does not copy);
- ``sliding_window`` applies to every layer when set;
- ``rms_norm_eps`` defaults to 1e-5; ``resid_pdrop``/``embd_pdrop`` must be 0 (no dropout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jpeft.errors import ConfigError
from jpeft.models.config import DecoderConfig, build, check_fields, no_dropout

DROPOUTS = ("resid_pdrop", "embd_pdrop")
DEFAULTS = {
    "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
}


def _rope_scaling(raw: Mapping[str, Any]) -> Mapping[str, Any] | None:
    scaling = raw.get("rope_scaling")
    if not isinstance(scaling, Mapping):
        return scaling
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in ("su", "yarn"):  # Phi3Config._rope_scaling_adjustment
        scaling = {k: ("longrope" if k in ("type", "rope_type") else v) for k, v in scaling.items()}
        kind = "longrope"
    if kind != "longrope":
        raise ConfigError(
            f"config.json field `rope_scaling` of a phi3 model must be of type longrope (or su), got {kind!r}: "
            "transformers' Phi-3 accepts no other."
        )
    return scaling


def read_config(raw: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Phi-3 ``config.json`` (transformers' ``Phi3Config`` defaults)."""
    check_fields(raw, "phi3", extra=frozenset(DROPOUTS))
    no_dropout(raw, "phi3", *DROPOUTS)
    full = {**DEFAULTS, **raw}
    if full.get("rope_parameters") is None:
        full["rope_scaling"] = _rope_scaling(full)
    cfg = build(
        full,
        model_type="phi3",
        torch_class_name="Phi3ForCausalLM",
        head_dim_default=None,
        qkv_bias=False,
        o_bias=False,
        sliding_window=full.get("sliding_window"),
        fused_projections=True,
    )
    if cfg.rope.rope_type == "longrope" and full.get("original_max_position_embeddings"):
        switch = int(full["original_max_position_embeddings"])
        if switch < cfg.max_position_embeddings:
            return dataclasses.replace(cfg, reencode_at=switch + 1)
    return cfg
