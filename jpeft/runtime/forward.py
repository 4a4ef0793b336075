"""One call's forward: the effective base params and the layer hook, from plans and adapters.

Pure: everything a traced call reads is an argument, so ``PeftModel.apply`` stays a pure
function of its params under ``jax.jit``/``jax.grad``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
from flax.core import meta as flax_meta

from jpeft.bindings.protocol import Hook
from jpeft.core import registry
from jpeft.core.method import Plan
from jpeft.core.tree import PyTree, get_path


class Call(NamedTuple):
    """What a binding's ``run`` needs for one call with adapters.

    Attributes:
      params: the base params with the adapters' trainable copies substituted in.
      hook: the layer hook (``None``: no layer is changed).
      names: modules whose outputs go through the hook.
      dropout_rng: the key left for the model's own dropout.
    """

    params: PyTree
    hook: Hook | None
    names: frozenset[str]
    dropout_rng: jax.Array | None


def active_in_order(plans: Mapping[str, Plan], active: Sequence[str]) -> list[str]:
    """``active`` in the order the adapters were added (the first is innermost, as PEFT's layers nest)."""
    for name in active:
        if name not in plans:
            raise ValueError(f"unknown adapter {name!r}; adapters: {list(plans)}.")
    return [name for name in plans if name in active]


def layer_key(rng: jax.Array | None, adapter_name: str, index: int) -> jax.Array | None:
    """The dropout key of one adapted layer: folded from a CRC of the adapter name and the layer index."""
    if rng is None:
        return None
    return jax.random.fold_in(jax.random.fold_in(rng, zlib.crc32(adapter_name.encode())), index)


def prepare(
    plans: Mapping[str, Plan],
    params: Mapping[str, Any],
    active: Sequence[str],
    *,
    train: bool,
    dropout_rng: jax.Array | None,
) -> Call:
    """The call of layer adapters ``active`` (in that nesting order) on ``params`` (``{"base", "adapters"}``).

    Each active adapter's method substitutes its overrides into the base; the hook runs each
    adapter's ``layer_forward`` on the layers it adapts, innermost first.
    """
    base_rng = adapter_rng = None
    if dropout_rng is not None:
        base_rng, adapter_rng = jax.random.split(dropout_rng)
    adapters = params["adapters"]
    methods = {name: registry.method_for(plans[name].config.peft_type) for name in active}
    effective = params["base"]
    for name in active:
        effective = methods[name].apply_overrides(effective, adapters[name], plans[name])
    names: frozenset[str] = frozenset().union(*(plans[n].hooked for n in active))

    def hook(module: str, x: jax.Array, out: jax.Array) -> jax.Array:
        for name in active:
            layer = plans[name].layers.get(module)
            if layer is None:
                continue
            forward = methods[name].layer_forward
            assert forward is not None  # registered as a layer method
            out = forward(
                layer,
                plans[name].config,
                adapters[name],
                flax_meta.unbox(get_path(effective, layer.info.path)),
                x,
                out,
                train=train,
                key=layer_key(adapter_rng, name, layer.index),
            )
        return out

    return Call(effective, hook, names, base_rng)
