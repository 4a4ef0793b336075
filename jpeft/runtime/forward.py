"""One call's forward: the effective base params and the layer hook, from plans and adapters.

Pure: everything a traced call reads is an argument, so ``PeftModel.apply`` stays a pure
function of its params under ``jax.jit``/``jax.grad``.

Stacked layers (one module holding ``L`` layers' weights along a leading axis, run by
``nnx.scan``) are hooked once, under the stacked module's name. Their adapters are stored per
layer (``layers.3.self_attn.q_proj``, as PEFT's keys), and stacked for the call into a *carry*:
per adapter, each layer's own params with a leading layer axis, plus each row's position. The
binding attaches the carry to the stacked module, so the model's own scan slices it with the
weights, and hands the hook that layer's slice. Layers of a stack that an adapter does not
target (``layers_to_transform``) get zero placeholders and keep the base output.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax.core import meta as flax_meta

from jpeft.bindings.protocol import Hook
from jpeft.core import registry
from jpeft.core.method import LayerPlan, Plan
from jpeft.core.tree import PyTree, Row, get_path


class Call(NamedTuple):
    """What a binding's ``run`` needs for one call with adapters.

    Attributes:
      params: the base params with the adapters' trainable copies substituted in.
      hook: the layer hook (``None``: no layer is changed).
      names: modules whose outputs go through the hook.
      dropout_rng: the key left for the model's own dropout.
      carry: ``{stacked module name: tree}`` the binding attaches to each stacked module, so
        that it is sliced along the stack with the module's weights and handed back to the hook.
    """

    params: PyTree
    hook: Hook | None
    names: frozenset[str]
    dropout_rng: jax.Array | None
    carry: Mapping[str, PyTree] = {}


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


class StackedLayers(NamedTuple):
    """One adapter's layers in one stacked module.

    Attributes:
      ref: the plan of its first adapted layer (the others agree with it but for name and index).
      rows: each row's layer plan (``None``: a row the adapter leaves alone).
    """

    ref: Any
    rows: tuple[Any, ...]


def stacked_layers(plan: Plan) -> dict[str, StackedLayers]:
    """``{stacked module name: StackedLayers}`` of an adapter's layers that live in stacks.

    Raises ``ValueError`` when the layers of one stack differ in more than name and index
    (a rank or alpha pattern naming single layers of a stack): a stack runs one shape.
    """
    by_stack: dict[str, dict[int, LayerPlan]] = {}
    size: dict[str, int] = {}
    for layer in plan.layers.values():
        stack = layer.info.stack
        if stack is not None:
            by_stack.setdefault(stack.name, {})[stack.position] = layer
            size[stack.name] = stack.size
    out = {}
    for name, rows in by_stack.items():
        ref = rows[min(rows)]
        for layer in rows.values():
            if dataclasses.replace(layer, info=ref.info, index=ref.index) != ref:
                raise ValueError(
                    f"{layer.info.name} and {ref.info.name} are rows of one stacked module ({name}) but their "
                    "adapter settings differ (rank_pattern/alpha_pattern?). A stacked module runs one adapter "
                    "shape for all its layers: give its layers one rank and alpha."
                )
        out[name] = StackedLayers(ref, tuple(rows.get(i) for i in range(size[name])))
    return out


def stacked_params(method: Any, adapter: Mapping[str, Any], stacked: StackedLayers) -> PyTree:
    """Each row's own layer params, stacked (zeros for rows the adapter leaves alone)."""
    tree = adapter[method.layer_tree]
    ref = tree[stacked.ref.info.name]
    rows = [tree[row.info.name] if row is not None else jax.tree.map(jnp.zeros_like, ref) for row in stacked.rows]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *rows)


def stack_carry(
    plans: Mapping[str, Plan], methods: Mapping[str, Any], adapters: Mapping[str, Any], names: Sequence[str]
) -> tuple[dict[str, dict[str, StackedLayers]], dict[str, dict[str, Any]]]:
    """Each adapter's stacked layers (by stacked module), and the carry of a call: per stacked module,
    the rows' positions and each adapter's per-layer params stacked (:func:`stacked_params`)."""
    stacks = {name: stacked_layers(plans[name]) for name in names}
    carry: dict[str, dict[str, Any]] = {}
    for name in names:
        for module, stacked in stacks[name].items():
            entry = carry.setdefault(module, {"position": jnp.arange(len(stacked.rows), dtype=jnp.int32)})
            entry[name] = stacked_params(methods[name], adapters[name], stacked)
    return stacks, carry


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
    stacks, carry = stack_carry(plans, methods, adapters, active)
    names = frozenset(n for n in names if n not in stacked_names(plans, active)) | frozenset(carry)

    def run_layer(name: str, layer: Any, adapter: Mapping[str, Any], weights: Any, x, out, key) -> jax.Array:
        forward = methods[name].layer_forward
        assert forward is not None  # registered as a layer method
        return forward(layer, plans[name].config, adapter, weights, x, out, train=train, key=key)

    def hook(module: str, x: jax.Array, out: jax.Array, carried: Any = None) -> jax.Array:
        if carried is not None:
            return stacked_hook(module, x, out, carried)
        for name in active:
            layer = plans[name].layers.get(module)
            if layer is None:
                continue
            weights = flax_meta.unbox(get_path(effective, layer.info.path))
            out = run_layer(name, layer, adapters[name], weights, x, out, layer_key(adapter_rng, name, layer.index))
        return out

    def stacked_hook(module: str, x: jax.Array, out: jax.Array, carried: Mapping[str, Any]) -> jax.Array:
        position = carried["position"]
        check_position(module, position)
        for name in active:
            stacked = stacks[name].get(module)
            if stacked is None:
                continue
            ref, view, weights = stack_slice(methods[name], adapters[name], stacked, carried[name], effective, position)
            key = layer_key(adapter_rng, name, ref.index)
            key = None if key is None else jax.random.fold_in(key, position)
            new = run_layer(name, ref, view, weights, x, out, key)
            chosen = chosen_row(stacked, position)
            out = new if chosen is None else jnp.where(chosen, new, out)
        return out

    return Call(effective, hook, names, base_rng, carry)


def stack_slice(
    method: Any, adapter: Mapping[str, Any], stacked: StackedLayers, own: PyTree, effective: PyTree, position: Any
) -> tuple[Any, dict[str, Any], Any]:
    """``(layer plan, adapter view, layer weights)`` of one adapter at ``position`` (traced) of a stack.

    ``own`` is the adapter's slice of the carry: the layer's own params, which the view puts where
    the method reads them. The weights are the stacked base weights' row ``position``.
    """
    ref = stacked.ref
    view = {**adapter, method.layer_tree: {ref.info.name: own}}
    stack_path = tuple(key for key in ref.info.path if not isinstance(key, Row))
    weights = jax.tree.map(lambda leaf: leaf[position], flax_meta.unbox(get_path(effective, stack_path)))
    return ref, view, weights


def chosen_row(stacked: StackedLayers, position: Any) -> jax.Array | None:
    """Whether the adapter adapts row ``position`` of the stack (``None``: it adapts every row)."""
    if all(row is not None for row in stacked.rows):
        return None
    return jnp.asarray([row is not None for row in stacked.rows])[position]


def check_position(module: str, position: Any) -> None:
    if jnp.ndim(position) != 0:
        raise ValueError(
            f"the stacked module {module} was called with all its {jnp.shape(position)[0]} layers at once; "
            "jpeft adapts a stack whose layers are called one at a time (nnx.scan over the stack)."
        )


def stacked_names(plans: Mapping[str, Plan], active: Sequence[str]) -> frozenset[str]:
    """Per-layer names of stacked layers (the binding hooks their stack instead)."""
    return frozenset(
        layer.info.name for n in active for layer in plans[n].layers.values() if layer.info.stack is not None
    )
