"""``PeftMixedModel``: adapters of different methods in one model (PEFT's ``PeftMixedModel``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jpeft.config import PeftConfig
from jpeft.core import registry
from jpeft.peft_model import PeftModel


class PeftMixedModel(PeftModel):
    """Adapters of different methods (e.g. LoRA and AdaLoRA, LoRA and IA3) in one model, active together.

    PEFT's ``PeftMixedModel``; build it with ``jpeft.get_peft_model(model, config, mixed=True)``
    and add adapters with :meth:`add_adapter` / :meth:`load_adapter`. "Mixed" means mixed
    *methods*, not mixed precision (that is ``precision=`` of :func:`jpeft.train.make_train_step`).

    As in PEFT, adapters on the same layer nest in the order they were added: the first
    added is innermost, each later one wraps it. For LoRA-family adapters this is a sum;
    an IA3 vector on a layer's *output* scales everything inside it. torch PEFT's mixed
    model accepts LoRA, LoHa, LoKr, AdaLoRA and OFT; jpeft mixes every method registered
    ``mixable`` (LoRA, AdaLoRA, IA3, VeRA, LoHa), so a LoRA + IA3 mix runs in jpeft only
    (each adapter still saves in PEFT's format and loads in torch PEFT on its own). Saving
    writes each adapter in PEFT's layout (non-default adapters in subfolders).
    """

    def __init__(self, model: Any, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any):
        _check_mixable(peft_config)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def _mixes(self, a: PeftConfig, b: PeftConfig) -> bool:
        _check_mixable(b)
        return True

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        ordered = [n for n in self.adapters if n in names]
        # some adapters must be the innermost of a layer (IA3 rescales a feed-forward layer's input and
        # recomputes its output)
        for position, name in enumerate(ordered):
            innermost = self._method(name).innermost_layers
            if innermost is None:
                continue
            for module in innermost(self._plans[name]):
                inner = [n for n in ordered[:position] if module in self._plans[n].layers]
                if inner:
                    raise ValueError(
                        f"{self.peft_config[name].peft_type.value} adapter {name!r} scales the input of "
                        f"feed-forward layer {module!r}, which adapters {inner} (added earlier) also change; add "
                        f"the {self.peft_config[name].peft_type.value} adapter first, or do not target {module!r} "
                        "with both."
                    )
        super().set_adapter(adapter_name, inference_mode)


def _check_mixable(config: PeftConfig) -> None:
    mixable = registry.mixable_types()
    if config.peft_type not in mixable:
        raise ValueError(
            f"Adapter of type {config.peft_type.value} is not supported for mixed models; mixed models take "
            f"{sorted(t.value for t in mixable)} adapters."
        )
