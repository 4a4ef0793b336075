"""Which method handles which ``peft_type``.

Each tuner module ends with one ``register(...)`` call; nothing else lists methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jpeft.config import PeftConfig, PeftType
from jpeft.errors import ConfigError

_METHODS: dict[PeftType, Any] = {}
_CONFIGS: dict[PeftType, type[PeftConfig]] = {}


_MODEL_CLASSES: dict[PeftType, type] = {}


def register(
    peft_type: PeftType, config_cls: type[PeftConfig], method: Any, *, model_class: type | None = None
) -> None:
    """Registers ``method`` (a module or object with the tuner functions) for ``peft_type``.

    ``model_class``: the ``PeftModel`` subclass that wraps models for this method (prompt
    learning methods change the model's inputs, not its layers); ``None`` for ``PeftModel``.
    """
    _METHODS[peft_type] = method
    _CONFIGS[peft_type] = config_cls
    if model_class is not None:
        _MODEL_CLASSES[peft_type] = model_class


def model_class_for(peft_type: PeftType, default: type) -> type:
    """The ``PeftModel`` class for ``peft_type`` (``default`` unless the method registered one)."""
    return _MODEL_CLASSES.get(peft_type, default)


def method_for(peft_type: PeftType) -> Any:
    try:
        return _METHODS[peft_type]
    except KeyError:
        raise ConfigError(
            f"peft_type {peft_type.value!r} is a PEFT method jpeft does not implement yet; "
            f"implemented: {', '.join(t.value for t in _METHODS)}."
        ) from None


def registered_types() -> list[PeftType]:
    return list(_METHODS)


def config_from_dict(data: Mapping[str, Any]) -> PeftConfig:
    """Parses ``adapter_config.json`` content into the right config class."""
    if "peft_type" not in data:
        raise ConfigError(
            "adapter config has no `peft_type` field; a PEFT adapter_config.json names its method, "
            'e.g. "peft_type": "LORA".'
        )
    raw = data["peft_type"]
    try:
        peft_type = PeftType(raw)
    except ValueError:
        raise ConfigError(
            f"unknown `peft_type` {raw!r}; expected the exact upper-case PEFT name, one of "
            f"{', '.join(t.value for t in PeftType)}."
        ) from None
    method_for(peft_type)
    return _CONFIGS[peft_type].from_dict(data)
