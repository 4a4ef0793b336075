"""Bindings: how each model system is driven, behind one protocol (:class:`protocol.Binding`).

``bind(model)`` picks the binding for what the user passed.
"""

from __future__ import annotations

from typing import Any

from jpeft.bindings.protocol import Binding


def bind(model: Any) -> Binding:
    """Wraps a supported model in its binding.

    Accepts an ``nnx.Module``, a transformers ``FlaxPreTrainedModel``, a ``(linen_module, params)`` pair, or a
    binding (e.g. :class:`jpeft.bindings.linen.LinenBinding`, or any object implementing
    :class:`~jpeft.bindings.protocol.Binding`).
    """
    import flax.linen as nn
    from flax import nnx

    from jpeft.bindings.hf_flax import HFFlaxBinding, is_hf_flax_model
    from jpeft.bindings.linen import LinenBinding
    from jpeft.bindings.nnx import NNXBinding

    if isinstance(model, (HFFlaxBinding, LinenBinding, NNXBinding)):
        return model
    if isinstance(model, nnx.Module):
        return NNXBinding(model)
    if is_hf_flax_model(model):
        return HFFlaxBinding(model)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        return LinenBinding(model[0], model[1])
    if isinstance(model, Binding):  # a user's own binding: checked against the written protocol
        return model
    raise TypeError(
        f"jpeft cannot adapt a {type(model).__name__}: pass a Flax NNX module (nnx.Module), a transformers Flax "
        "model (FlaxAutoModelFor...), a `(linen_module, params)` pair, or `jpeft.LinenBinding(module, params, example_args=...)`."
    )


__all__ = ["Binding", "bind"]
