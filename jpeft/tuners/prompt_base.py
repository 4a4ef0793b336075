"""What PEFT's prompt-learning methods share: the config fields and how they are filled in.

Prompt tuning, P-tuning and prefix tuning change a model's *inputs* (virtual tokens or
per-layer key/value prefixes), not its layers. Their config fields describing the model
(``num_layers``, ``token_dim``, ``num_attention_heads``, ``num_transformer_submodules``)
are filled from the model config exactly as PEFT's ``_prepare_prompt_learning_config``
does, so that the saved ``adapter_config.json`` equals PEFT's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jpeft.config import PeftConfig, PeftType, TaskType
from jpeft.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptLearningConfig(PeftConfig):
    """Fields common to the prompt-learning configs (PEFT's ``PromptLearningConfig``).

    Attributes:
      num_virtual_tokens: number of virtual tokens (required).
      token_dim: hidden size of the model's token embeddings (filled from the model).
      num_transformer_submodules: 2 for ``SEQ_2_SEQ_LM``, else 1 (filled).
      num_attention_heads: the model's attention heads (filled).
      num_layers: the model's transformer layers (filled).
      modules_to_save: extra modules trained in full and saved (task heads are added).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None or int(self.num_virtual_tokens) < 1:
            raise ConfigError(
                f"{type(self).__name__} needs `num_virtual_tokens` >= 1 (got {self.num_virtual_tokens!r})."
            )
        if self.task_type is None:
            raise ConfigError(
                f"{type(self).__name__} needs a `task_type` (e.g. task_type='CAUSAL_LM'): prompt-learning "
                "methods change the model's inputs, which depends on the task (PEFT fails with KeyError(None))."
            )

    @property
    def is_prompt_learning(self) -> bool:
        return True


def _first(model_config: Mapping[str, Any], names: tuple[str, ...], field: str) -> int:
    for name in names:
        if model_config.get(name) is not None:
            return int(model_config[name])
    raise ConfigError(
        f"could not read `{field}` from the model config (looked for {', '.join(names)}); "
        f"pass `{field}=` in the prompt-learning config."
    )


def fill_from_model_config(config: PromptLearningConfig, model_config: Any) -> PromptLearningConfig:
    """``config`` with the model-describing fields filled as PEFT fills them.

    Args:
      config: a prompt-learning config.
      model_config: the transformers config object (or its ``to_dict()``).
    """
    data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if "text_config" in data and isinstance(data["text_config"], Mapping):
        data = data["text_config"]
    changes: dict[str, Any] = {}
    num_layers = config.num_layers
    if num_layers is None:
        num_layers = getattr(model_config, "num_hidden_layers", None)
        if num_layers is None:
            num_layers = _first(data, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
        changes["num_layers"] = int(num_layers)
    token_dim = config.token_dim
    if token_dim is None:
        token_dim = _first(data, ("hidden_size", "n_embd", "d_model"), "token_dim")
        changes["token_dim"] = token_dim
    heads = config.num_attention_heads
    if heads is None:
        heads = _first(
            data, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"), "num_attention_heads"
        )
        changes["num_attention_heads"] = heads
    if config.peft_type == PeftType.PREFIX_TUNING and data.get("num_key_value_heads") is not None:
        # grouped-query attention: prefixes have the key/value heads' width (PEFT #1901)
        kv_heads = int(data["num_key_value_heads"])
        head_dim = data.get("head_dim") or token_dim // heads
        changes["token_dim"] = int(head_dim) * kv_heads
        changes["num_attention_heads"] = kv_heads
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        changes["encoder_hidden_size"] = changes.get("token_dim", token_dim)
    if config.num_transformer_submodules is None:
        changes["num_transformer_submodules"] = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    return dataclasses.replace(config, **changes) if changes else config
