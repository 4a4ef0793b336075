"""Mixed batches: each example runs with its own adapter (or none), in one traced function.

PEFT's ``adapter_names=``. The per-example adapter ids are an array, so one compiled
function serves every mix. Methods with a batched form (``mixed_batch_forward``: LoRA
stacks every adapter's factors and gathers per example) use it; others run
``layer_forward`` per adapter and each example selects its own result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta as flax_meta

from jpeft.core import registry
from jpeft.core.method import Plan
from jpeft.core.modules import ModuleInfo
from jpeft.core.tree import Row, get_path
from jpeft.runtime import forward
from jpeft.runtime.forward import Call

BASE_ADAPTER_NAME = "__base__"


def check_adapters(plans: Mapping[str, Plan], adapters: Mapping[str, Any], order: Sequence[str]) -> None:
    """Raises when one of ``order`` cannot serve a mixed batch (say so, and how to run it instead)."""
    for name in order:
        config = plans[name].config
        registration = registry.registration(config.peft_type)
        if registration.kind != "layer":
            raise ValueError(f"mixed batches are not supported for prompt-learning adapter {name!r}.")
        check = registration.method.check_mixed_batch
        if check is not None:
            try:
                check(config, adapters[name])
            except ValueError as err:
                raise ValueError(f"adapter {name!r}: {err}") from None
        if adapters[name].get("bias"):
            raise ValueError(
                f"adapter {name!r} trains biases (bias={config.bias!r}); mixed batches need adapters "
                "whose biases are the base model's. Run it in its own batch (`active_adapters=[name]`)."
            )
        for module in adapters[name].get("modules_to_save", {}):
            if plans[name].modules[module].kind != "linear":
                raise ValueError(
                    f"adapter {name!r} trains a copy of {module!r}, which is not a linear layer; mixed "
                    "batches take modules_to_save copies of linear layers (classification heads). Run "
                    "it in its own batch (`active_adapters=[name]`)."
                )


def adapter_ids(
    adapter_names: Sequence[str], order: Sequence[str], merged: Sequence[str], existing: Sequence[str]
) -> np.ndarray:
    """Per-example ids into ``order`` for ``adapter_names`` (``-1``: ``"__base__"``)."""
    ids = []
    for name in adapter_names:
        if name == BASE_ADAPTER_NAME:
            ids.append(-1)
        elif name in order:
            ids.append(order.index(name))
        elif name in merged:
            raise ValueError(
                f"adapter {name!r} is merged into the base weights; mixed batches need unmerged adapters "
                "(call `unmerge_adapter()`)."
            )
        else:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {name!r}; existing adapters: "
                f"{list(existing)} (and '__base__' for the base model)."
            )
    return np.asarray(ids, np.int32)


def _per_example(ids: jax.Array, out: jax.Array) -> jax.Array:
    """The adapter id of each row of ``out`` (beam search / num_return_sequences repeat each example)."""
    if out.shape[0] != ids.shape[0] and out.shape[0] % ids.shape[0] == 0:
        return jnp.repeat(ids, out.shape[0] // ids.shape[0])
    if out.shape[0] != ids.shape[0]:
        raise ValueError(
            f"`adapter_names` has {ids.shape[0]} entries but the batch has {out.shape[0]} examples; "
            "pass one adapter name per example."
        )
    return ids


def _select(per_example: jax.Array, i: int, own: jax.Array, result: jax.Array) -> jax.Array:
    chosen = (per_example == i).reshape((-1,) + (1,) * (result.ndim - 1))
    return jnp.where(chosen, own, result)


def _copy_forward(info: ModuleInfo, subtree: Mapping[str, Any], x: jax.Array, out: jax.Array) -> jax.Array:
    """A ``modules_to_save`` copy of a linear layer applied to ``x``."""
    kernel = flax_meta.unbox(subtree["kernel"]).astype(out.dtype)
    own = jnp.matmul(x.astype(out.dtype), kernel.T if info.kernel_transposed else kernel)
    if "bias" in subtree:
        own = own + subtree["bias"].astype(out.dtype)
    return own


def prepare(
    plans: Mapping[str, Plan],
    params: Mapping[str, Any],
    order: Sequence[str],
    ids: jax.Array | np.ndarray,
    modules: Mapping[str, ModuleInfo],
) -> Call:
    """The call of a batch whose example ``k`` uses adapter ``order[ids[k]]`` (``-1``: the base model).

    ``order`` are the adapters a mixed batch may name, in id order; check them first with
    :func:`check_adapters`.
    """
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim != 1:
        raise ValueError(f"`adapter_names` must give one adapter per example, got shape {ids.shape}.")
    adapters = params["adapters"]
    effective = params["base"]
    # modules_to_save copies (e.g. a classifier per adapter): each example uses its adapter's copy
    copies: dict[str, list[tuple[int, Any]]] = {}
    for i, name in enumerate(order):
        for module, subtree in adapters[name].get("modules_to_save", {}).items():
            copies.setdefault(module, []).append((i, subtree))
    names: frozenset[str] = frozenset().union(*(plans[n].hooked for n in order), copies)
    # stacked (scanned) modules: each adapter's per-layer params travel with the stack (runtime.forward)
    methods = {n: registry.method_for(plans[n].config.peft_type) for n in order}
    stacks, carry = forward.stack_carry(plans, methods, adapters, order)
    in_stacks = forward.stacked_names(plans, order)
    stacked_copies = sorted(m for m in copies if any(isinstance(key, Row) for key in modules[m].path))
    if stacked_copies:
        raise ValueError(
            f"modules_to_save copies inside a stacked module ({stacked_copies}) cannot serve a mixed batch; run "
            "each adapter in its own call."
        )
    names = frozenset(n for n in names if n not in in_stacks) | frozenset(carry)

    def stacked_hook(module: str, x: jax.Array, out: jax.Array, carried: Mapping[str, Any]) -> jax.Array:
        position = carried["position"]
        forward.check_position(module, position)
        per_example = _per_example(ids, out)
        result = out
        groups: dict[Any, list[tuple[int, str]]] = {}
        for i, name in enumerate(order):
            if module in stacks[name]:
                groups.setdefault(plans[name].config.peft_type, []).append((i, name))
        for group in groups.values():
            method = methods[group[0][1]]
            slices = {
                n: forward.stack_slice(method, adapters[n], stacks[n][module], carried[n], effective, position)
                for _, n in group
            }
            if method.mixed_batch_forward is not None:  # absent rows carry zero factors: they add nothing
                layers = [(i, slices[n][0], plans[n].config, slices[n][1]) for i, n in group]
                weights = slices[group[0][1]][2]
                result = method.mixed_batch_forward(layers, weights, x, out, result, per_example)
                continue
            assert method.layer_forward is not None  # a layer method (checked above)
            for i, n in group:
                ref, view, weights = slices[n]
                own = method.layer_forward(ref, plans[n].config, view, weights, x, out, train=False, key=None)
                chosen = forward.chosen_row(stacks[n][module], position)
                own = own if chosen is None else jnp.where(chosen, own, out)
                result = _select(per_example, i, own, result)
        return result

    def hook(module: str, x: jax.Array, out: jax.Array, carried: Any = None) -> jax.Array:
        if carried is not None:
            return stacked_hook(module, x, out, carried)
        per_example = _per_example(ids, out)
        result = out
        for i, subtree in copies.get(module, ()):
            result = _select(per_example, i, _copy_forward(modules[module], subtree, x, out), result)
        groups: dict[Any, list[tuple[int, str]]] = {}
        for i, name in enumerate(order):
            if module in plans[name].layers:
                groups.setdefault(plans[name].config.peft_type, []).append((i, name))
        for group in groups.values():
            method = methods[group[0][1]]
            weight_path = plans[group[0][1]].layers[module].info.path
            if method.mixed_batch_forward is not None:
                layers = [(i, plans[n].layers[module], plans[n].config, adapters[n]) for i, n in group]
                result = method.mixed_batch_forward(
                    layers, get_path(effective, weight_path), x, out, result, per_example
                )
                continue
            assert method.layer_forward is not None  # a layer method (checked above)
            for i, n in group:
                layer = plans[n].layers[module]
                own = method.layer_forward(
                    layer,
                    plans[n].config,
                    adapters[n],
                    flax_meta.unbox(get_path(effective, layer.info.path)),
                    x,
                    out,
                    train=False,
                    key=None,
                )
                result = _select(per_example, i, own, result)
        return result

    return Call(effective, hook, names, None, carry)
