"""Quantizing a whole model's frozen base: what ``from_pretrained(quantization_config=...)`` does in torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jpeft.quant.params import QuantizationConfig, quantize_params


def quantize_model(
    model: Any, config: QuantizationConfig, *, skip_modules: Sequence[str] | None = None
) -> Any:
    """The model with its linear kernels quantized (QLoRA's frozen base), ready for ``get_peft_model``.

    Every 2-D ``kernel`` of a linear layer becomes a :class:`~jpeft.quant.QuantizedArray`
    (NF4/FP4 blocks or int8 rows, bitsandbytes' numbers and layout); embeddings, norms,
    biases and the output heads in ``skip_modules`` (default ``lm_head``, ``score``,
    ``classifier``, ``qa_outputs``, or ``config.llm_int8_skip_modules``) stay as they are.
    Quantized kernels are decoded inside the layer that uses them, in the jitted forward,
    to ``config.bnb_4bit_compute_dtype``.

    Args:
      model: a transformers Flax model or a ``(linen_module, params)`` pair; not modified.
      config: e.g. ``QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16")``.
      skip_modules: module names kept in full precision (overrides the config's list).

    Returns:
      The same kind of model holding the quantized params (a shallow copy).

    Example:
      >>> base = jpeft.quantize_model(model, QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
      >>> peft_model = jpeft.get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))
    """
    from jpeft.bindings import bind  # deferred: bindings import transformers/flax modules

    binding = bind(model)
    transposed = [name for name, info in binding.modules.items() if info.kernel_transposed]
    params = quantize_params(binding.params, config, skip_modules=skip_modules, transposed_kernels=transposed)
    return binding.with_params(params)
