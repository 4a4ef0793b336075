"""jpeft's own NNX models of the decoder families people fine-tune: Llama, Mistral, Qwen2, Qwen3.

Exact against transformers' torch classes (fp32 logits within 1e-5), with transformers' torch
module names, loaded from and saved to transformers checkpoints (``config.json`` + safetensors).
They are ``nnx.Module`` s: ``jpeft.get_peft_model`` adapts them through the NNX binding.
"""

from jpeft.models.auto import FAMILIES, AutoModelForCausalLM, config_from
from jpeft.models.config import DecoderConfig
from jpeft.models.decoder import CausalLM
from jpeft.models.layers import CausalLMOutput, KVCache

__all__ = [
    "FAMILIES",
    "AutoModelForCausalLM",
    "CausalLM",
    "CausalLMOutput",
    "DecoderConfig",
    "KVCache",
    "config_from",
]
