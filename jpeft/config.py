"""Adapter configs: ``PeftConfig``, ``PeftType``, ``TaskType`` and the ``adapter_config.json`` form.

Configs are frozen, keyword-only dataclasses with PEFT's field names and defaults.
``to_dict``/``from_dict`` give exactly the JSON PEFT reads and writes. Reading a
config follows PEFT (unknown keys are dropped with a warning) with one difference
that matters: a field PEFT knows but jpeft does not implement must hold its default,
otherwise :class:`~jpeft.errors.ConfigError` is raised instead of computing something
other than what the file asks for.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

from jpeft.errors import ConfigError

# The PEFT release whose checkpoint format jpeft writes (key names, config fields).
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(enum.StrEnum):
    """PEFT's method identifiers, as written in ``adapter_config.json``."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    VERA = "VERA"
    LOHA = "LOHA"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"


class TaskType(enum.StrEnum):
    """What the wrapped model does; selects PEFT's ``PeftModelFor...`` behaviour."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Heads PEFT adds to ``modules_to_save`` for each task type (PeftModelFor... classes).
TASK_HEAD_MODULES: dict[TaskType, tuple[str, ...]] = {
    TaskType.SEQ_CLS: ("classifier", "score"),
    TaskType.TOKEN_CLS: ("classifier", "score"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}


def parse_task_type(value: Any) -> TaskType | None:
    if value is None or isinstance(value, TaskType):
        return value
    try:
        return TaskType(value)
    except ValueError:
        choices = ", ".join(t.value for t in TaskType)
        raise ConfigError(
            f"Invalid task type: {value!r}. Must be one of the following task types: {choices}."
        ) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftConfig:
    """Fields every adapter config has.

    Attributes:
      task_type: a :class:`TaskType` (or its string) or ``None``.
      base_model_name_or_path: the base model's hub id or path, written to the file.
      revision: the base model's revision.
      inference_mode: PEFT writes ``true`` on save; a loaded adapter is frozen unless
        ``is_trainable=True``.
      auto_mapping: PEFT's record of the base class when ``task_type`` is ``None``.
      peft_version: the PEFT format version; filled in on save.
    """

    peft_type: ClassVar[PeftType]
    # fields PEFT knows that jpeft accepts only at these values: {field: default}
    unsupported_fields: ClassVar[dict[str, Any]] = {}

    task_type: TaskType | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_type", parse_task_type(self.task_type))
        for name, default in self.unsupported_fields.items():
            value = getattr(self, name)
            if value != default and not (default is None and value in ({}, [])):
                raise ConfigError(
                    f"`{name}={value!r}` is a PEFT option that jpeft does not implement yet; loading or using "
                    f"this adapter would silently compute something else. Remove it (default: {default!r})."
                )

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def replace(self, **changes: Any) -> PeftConfig:
        """A copy with ``changes`` applied (configs are immutable)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, as PEFT writes it."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, frozenset, tuple)):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[field.name] = value
        out["peft_type"] = self.peft_type.value
        if out.get("peft_version") is None:
            out["peft_version"] = PEFT_FORMAT_VERSION
        return out

    def to_json_string(self) -> str:
        # PEFT writes json.dumps(indent=2, sort_keys=True).
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeftConfig:
        """Builds the config from ``adapter_config.json`` content.

        Unknown keys are dropped with a warning (as PEFT does).
        """
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type.value)
        if peft_type != cls.peft_type.value:
            raise ConfigError(
                f"`peft_type` is {peft_type!r} but {cls.__name__} expects {cls.peft_type.value!r}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {cls.__name__}, these are ignored. This "
                "probably means that you're loading a configuration file that was saved using a higher version "
                "of the library and additional parameters have been introduced since.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})
