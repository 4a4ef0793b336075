"""``PeftModel.module()``: a PEFT model as an ``nnx.Module``, for training the NNX way.

The module holds the base model (a new module of the user's class, ``nnx.Param`` leaves) and
every adapter's tree, whose trainable leaves are ``nnx.LoRAParam``: so
``nnx.Optimizer(module, tx, wrt=nnx.LoRAParam)``, ``nnx.grad(..., argnums=nnx.DiffState(0,
nnx.LoRAParam))`` and trainers that filter on ``nnx.LoRAParam`` train the adapters only.
Leaves that are never trained (VeRA's shared projections, inactive adapters) are
:class:`AdapterConstant`. Calling it runs ``PeftModel.apply`` on its own state, so both styles
compute the same function; ``module.train()``/``module.eval()`` switch dropout, drawing keys
from the ``rngs`` it was given.

``peft_model.update_from_module(module)`` (or ``module.save_pretrained(folder)``) brings the
trained adapters back into the ``PeftModel``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from jpeft.core.tree import PyTree


class AdapterConstant(nnx.Variable):
    """An adapter leaf that is not trained (not an ``nnx.LoRAParam``)."""


def _variables(tree: Mapping[str, Any], mask: Mapping[str, Any]) -> nnx.Dict:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _variables(value, mask[key])
        else:
            out[key] = nnx.LoRAParam(value) if mask[key] else AdapterConstant(value)
    return nnx.Dict(out)


class PeftModule(nnx.Module):
    """A :class:`jpeft.PeftModel` over an NNX model, as an ``nnx.Module``; build it with ``peft_model.module()``.

    Attributes:
      base: the base model, a new module of the user's class (frozen ``nnx.Param`` leaves).
      adapters: ``{adapter name: adapter tree}``; trainable leaves are ``nnx.LoRAParam``.
      deterministic: ``False`` after ``.train()``: dropout on (``.eval()`` turns it off).
      rngs: where dropout keys come from in training (``None``: no dropout).
    """

    def __init__(self, peft_model: Any, *, rngs: nnx.Rngs | None = None):
        binding = peft_model.binding
        params = peft_model.params
        self.peft_model = nnx.static(peft_model)
        self.base = binding.with_params(params["base"])
        self.adapters = _variables(params["adapters"], peft_model.trainable_mask()["adapters"])
        self.deterministic = True
        self.rngs = rngs

    def peft_params(self) -> dict[str, PyTree]:
        """This module's state as ``PeftModel.params`` (``{"base", "adapters"}``)."""
        peft_model = self.peft_model
        return {
            "base": peft_model.binding.tree_of(nnx.state(self.base, nnx.Param)),
            "adapters": nnx.to_pure_dict(nnx.state(self.adapters)),
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        train = not self.deterministic
        dropout_rng = self.rngs.dropout() if train and self.rngs is not None else None
        return self.peft_model.apply(self.peft_params(), *args, train=train, dropout_rng=dropout_rng, **kwargs)

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> None:
        """Saves the adapters as ``PeftModel.save_pretrained`` does (after copying them into it)."""
        self.peft_model.update_from_module(self)
        self.peft_model.save_pretrained(save_directory, **kwargs)

