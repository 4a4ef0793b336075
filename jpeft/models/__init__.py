"""jpeft's own NNX models of the decoder families people fine-tune.

Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3, as causal LMs and as sequence
classifiers.

Exact against transformers' torch classes (fp32 logits within 1e-5), with transformers' torch
module names, loaded from and saved to transformers checkpoints (``config.json`` + safetensors).
They are ``nnx.Module`` s: ``jpeft.get_peft_model`` adapts them through the NNX binding.
"""

from jpeft.models.auto import FAMILIES, AutoModelForCausalLM, AutoModelForSequenceClassification, config_from
from jpeft.models.classification import SequenceClassification, SequenceClassifierOutput
from jpeft.models.config import DecoderConfig
from jpeft.models.decoder import CausalLM
from jpeft.models.layers import CausalLMOutput, KVCache

__all__ = [
    "FAMILIES",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "CausalLM",
    "CausalLMOutput",
    "DecoderConfig",
    "KVCache",
    "SequenceClassification",
    "SequenceClassifierOutput",
    "config_from",
]
