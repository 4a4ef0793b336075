"""Placing a PeftModel's trees on a device mesh: data parallel and FSDP.

The frozen base is sharded FSDP-style (each large leaf split along one axis over the
``fsdp`` mesh axis); adapter leaves are sharded like the weights they adapt (see the
method's ``adapter_specs``); batches are split over the ``data`` axis (and ``fsdp``, so
every device gets a distinct slice). The train step itself does not change: ``jit``
follows the input shardings.

    mesh = jpeft.train.make_mesh(data=2, fsdp=4)
    params = jpeft.train.shard_params(peft_model, mesh)
    peft_model.params = params
    batch = jax.device_put(batch, jpeft.train.batch_sharding(mesh))
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpeft.core import registry
from jpeft.quant.formats import is_quantized

PyTree = Any


def make_mesh(data: int | None = None, fsdp: int = 1) -> Mesh:
    """A ``("data", "fsdp")`` mesh over all devices (``data`` defaults to what ``fsdp`` leaves).

    Axes are ``Auto``: shardings propagate through the (unannotated) model code.
    """
    count = jax.device_count()
    data = count // fsdp if data is None else data
    if data * fsdp != count:
        raise ValueError(f"data={data} x fsdp={fsdp} must equal the {count} devices.")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=auto)


def fsdp_spec(
    shape: tuple[int, ...], mesh: Mesh, axis: str | None = "fsdp", min_size: int = 1024
) -> PartitionSpec:
    """Splits the largest dimension that the ``axis`` size divides; small leaves stay replicated."""
    if axis is None or axis not in mesh.shape or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    size = mesh.shape[axis]
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % size == 0:
            return PartitionSpec(*([None] * dim), axis)
    return PartitionSpec()


def param_specs(
    peft_model: Any, mesh: Mesh, *, fsdp_axis: str | None = "fsdp", min_size: int = 1024
) -> PyTree:
    """Partition specs for ``peft_model.params``: FSDP base, adapters following their weights.

    A quantized kernel's packed codes and scales are FSDP-split like any leaf (its adapters are
    replicated); adapters of methods without a layer layout (prompt learning) are replicated.
    """

    def leaf_spec(x: Any) -> Any:
        if is_quantized(x):
            return jax.tree.map(lambda child: fsdp_spec(tuple(child.shape), mesh, fsdp_axis, min_size), x)
        return fsdp_spec(tuple(x.shape), mesh, fsdp_axis, min_size)

    base_specs = jax.tree.map(leaf_spec, peft_model.base_params, is_leaf=is_quantized)
    # what adapters follow: a quantized kernel's logical layout is not split
    logical = jax.tree.map(
        lambda x: PartitionSpec() if is_quantized(x) else x,
        base_specs,
        is_leaf=lambda x: is_quantized(x) or isinstance(x, PartitionSpec),
    )
    adapters = {}
    for name, adapter in peft_model.adapters.items():
        plan = peft_model.plan(name)
        specs = registry.method_for(plan.config.peft_type).adapter_specs
        if specs is None:
            adapters[name] = jax.tree.map(lambda _: PartitionSpec(), adapter)
        else:
            adapters[name] = specs(plan, adapter, logical)
    return {"base": base_specs, "adapters": adapters}


def param_shardings(peft_model: Any, mesh: Mesh, **kwargs: Any) -> PyTree:
    specs = param_specs(peft_model, mesh, **kwargs)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def shard_params(peft_model: Any, mesh: Mesh, **kwargs: Any) -> PyTree:
    """``peft_model.params`` placed on ``mesh`` (assign it back to ``peft_model.params``)."""
    return jax.device_put(peft_model.params, param_shardings(peft_model, mesh, **kwargs))


def batch_sharding(mesh: Mesh, axes: tuple[str, ...] = ("data", "fsdp")) -> NamedSharding:
    """Leading (batch) axis split over all of ``axes`` present in the mesh."""
    present = tuple(a for a in axes if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(present if present else None))
