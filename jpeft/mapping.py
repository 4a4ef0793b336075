"""``get_peft_model``: the entry point, as in PEFT."""

from __future__ import annotations

from typing import Any

import jax

from jpeft.config import PeftConfig
from jpeft.core import registry
from jpeft.mixed_model import PeftMixedModel
from jpeft.peft_model import PeftModel, model_class_for
from jpeft.prompt_learning import PromptLearningPeftModel  # noqa: F401  (the class for prompt methods)


def get_peft_model(
    model: Any,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    *,
    key: jax.Array | None = None,
) -> PeftModel:
    """Wraps ``model`` with a new adapter described by ``peft_config``.

    Args:
      model: a transformers Flax model (``FlaxAutoModelFor...``, transformers 4.x), a
        ``(linen_module, params)`` pair, or a binding such as ``jpeft.LinenBinding``.
      peft_config: e.g. ``LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"])``.
      adapter_name: name of the adapter (``"default"`` saves at the folder's root).
      mixed: a :class:`~jpeft.mixed_model.PeftMixedModel`, whose adapters may be of
        different methods (e.g. LoRA + AdaLoRA, LoRA + IA3) and active together. This is
        PEFT's meaning of ``mixed``; it is not mixed precision (see ``precision=`` of
        :func:`jpeft.train.make_train_step`).
      key: PRNG key for the adapter's initialisation (default ``jax.random.key(0)``).

    Returns:
      A :class:`PeftModel`; the input model and its params are not modified.

    Example:
      >>> model = FlaxAutoModelForCausalLM.from_pretrained("gpt2")
      >>> peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["c_attn"]))
      >>> peft_model.print_trainable_parameters()
    """
    if mixed:
        return PeftMixedModel(model, peft_config, adapter_name, key=key)
    model_class = model_class_for(registry.kind_of(peft_config.peft_type))
    return model_class(model, peft_config, adapter_name, key=key)  # type: ignore[return-value]
