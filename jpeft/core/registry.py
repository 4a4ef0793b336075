"""Which method handles which ``peft_type``.

Each tuner module ends with one ``register(...)`` call; nothing else lists methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jpeft.config import PeftConfig, PeftType
from jpeft.core.method import Kind, Method
from jpeft.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Registration:
    """One registered method.

    Attributes:
      peft_type: PEFT's name of the method.
      config_class: its config dataclass.
      method: its functions.
      kind: ``"layer"`` (hooks layers) or ``"prompt"`` (changes the inputs).
      mixable: whether its adapters may join adapters of other methods in a
        ``PeftMixedModel``.
    """

    peft_type: PeftType
    config_class: type[PeftConfig]
    method: Method[Any]
    kind: Kind
    mixable: bool


_REGISTRY: dict[PeftType, Registration] = {}


def register(
    peft_type: PeftType,
    config_class: type[PeftConfig],
    method: Method[Any],
    *,
    kind: Kind = "layer",
    mixable: bool = False,
) -> None:
    """Registers ``method`` for ``peft_type`` (checks that it provides what ``kind`` needs)."""
    if not isinstance(method, Method):
        raise TypeError(f"register({peft_type.value}): `method` must be a jpeft.core.method.Method.")
    if config_class.peft_type != peft_type:
        raise TypeError(
            f"register({peft_type.value}): {config_class.__name__}.peft_type is {config_class.peft_type.value}."
        )
    if kind == "prompt" and mixable:
        raise ValueError(f"register({peft_type.value}): prompt methods cannot be mixed with others.")
    method.check(kind, peft_type.value)
    _REGISTRY[peft_type] = Registration(peft_type, config_class, method, kind, mixable)


def registration(peft_type: PeftType) -> Registration:
    try:
        return _REGISTRY[peft_type]
    except KeyError:
        raise ConfigError(
            f"peft_type {peft_type.value!r} is a PEFT method jpeft does not implement yet; "
            f"implemented: {', '.join(t.value for t in _REGISTRY)}."
        ) from None


def method_for(peft_type: PeftType) -> Method[Any]:
    return registration(peft_type).method


def kind_of(peft_type: PeftType) -> Kind:
    return registration(peft_type).kind


def registered_types() -> list[PeftType]:
    return list(_REGISTRY)


def mixable_types() -> list[PeftType]:
    return [t for t, r in _REGISTRY.items() if r.mixable]


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
    return registration(peft_type).config_class.from_dict(data)
