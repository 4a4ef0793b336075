"""Filling a family model from a transformers checkpoint, and writing one back.

The model is first built abstractly (``nnx.eval_shape``: no weights allocated); then each of
its parameters is read from the checkpoint one tensor at a time (memory-mapped by
:mod:`jpeft.interop.hf_checkpoint`), transposed from torch's ``(out, in)`` where needed, cast
to the requested dtype and placed: on one device, or with ``mesh`` directly into its FSDP
sharding (each device reads only its slice). With a ``quantization_config`` each linear kernel
is quantized as it is read, so the full-precision base never exists whole.

Names: a state path ``model.layers.0.self_attn.q_proj.kernel`` is the torch key
``model.layers.0.self_attn.q_proj.weight`` (``kernel`` transposed, ``embedding`` as is); with
``scan_layers`` a stacked leaf gathers ``model.layers.{i}.<rest>`` over the layers.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jpeft.errors import CheckpointError, ConfigError
from jpeft.interop.hf_checkpoint import TensorIndex
from jpeft.quant.formats import quantize
from jpeft.quant.params import DEFAULT_SKIP_MODULES, QuantizationConfig, is_skipped
from jpeft.train.sharding import fsdp_spec

# buffers older checkpoints carry; transformers drops them too
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter of the model state and where it lives in a torch checkpoint.

    Attributes:
      path: the NNX state path.
      keys: the torch key of each layer (one key unless stacked).
      transpose: ``kernel`` (torch holds ``(out, in)``).
      module: the torch module name (``model.layers.0.mlp.up_proj``; ``{i}`` for stacks).
    """

    path: tuple[Any, ...]
    keys: tuple[str, ...]
    transpose: bool
    module: str


def leaves(state: nnx.State, num_layers: int, scan_layers: bool) -> list[Leaf]:
    """Every parameter of ``state`` with its torch key(s)."""
    out = []
    for path, _var in nnx.to_flat_state(state):
        names = [str(p) for p in path]
        leaf = names[-1]
        torch_leaf = "weight" if leaf in ("kernel", "embedding") else leaf
        module = ".".join(names[:-1])
        stacked = scan_layers and names[:2] == ["model", "layers"]
        if stacked:
            rest = ".".join(names[2:-1])
            keys = tuple(f"model.layers.{i}.{rest}.{torch_leaf}" for i in range(num_layers))
            module = f"model.layers.{{i}}.{rest}"
        else:
            keys = (f"{module}.{torch_leaf}",)
        out.append(Leaf(tuple(path), keys, leaf == "kernel", module))
    return out


def _reader(index: TensorIndex, leaf: Leaf, shape: tuple[int, ...], dtype: Any) -> Callable[[Any], np.ndarray]:
    """``slice -> array`` reading only what a device's slice of this leaf needs."""
    for key in leaf.keys:
        if key not in index:
            raise CheckpointError(f"the checkpoint has no tensor `{key}`, which this model needs.")
    per_layer = shape[1:] if len(leaf.keys) > 1 else shape
    for key in leaf.keys:
        stored = tuple(index.shape(key))
        expected = tuple(reversed(per_layer)) if leaf.transpose else tuple(per_layer)
        if stored != expected:
            raise CheckpointError(
                f"tensor `{key}` has shape {stored} in the checkpoint, but the config gives {expected}: the "
                "checkpoint does not match its config.json."
            )

    def one(key: str, idx: tuple[slice, ...]) -> np.ndarray:
        array = index.read(key)
        if leaf.transpose:
            array = array.T
        return np.asarray(array[idx], dtype=dtype)

    def read(idx: Any) -> np.ndarray:
        idx = tuple(idx) if idx is not None else tuple(slice(None) for _ in shape)
        if len(leaf.keys) == 1:
            return one(leaf.keys[0], idx)
        rows = range(*idx[0].indices(len(leaf.keys)))
        return np.stack([one(leaf.keys[i], idx[1:]) for i in rows])

    return read


def fill(
    abstract: nnx.Module,
    index: TensorIndex,
    *,
    num_layers: int,
    scan_layers: bool,
    tied: bool,
    param_dtype: Any,
    mesh: Mesh | None,
    quantization: QuantizationConfig | None,
    new_modules: Mapping[str, float] | None = None,
    ignored: frozenset[str] = frozenset(),
) -> nnx.Module:
    """The module ``abstract`` (from ``nnx.eval_shape``) with every parameter read from ``index``.

    ``new_modules``: modules the checkpoint may lack (a classification head on a causal LM's
    checkpoint), initialised ``normal(std)`` with a warning, as transformers does; ``ignored``:
    checkpoint tensors this model does not use (the causal LM's ``lm_head.weight``).
    """
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)  # type: ignore[misc]
    plan = leaves(state, num_layers, scan_layers)
    flat = dict(nnx.to_flat_state(state))
    skip = quantization.llm_int8_skip_modules if quantization is not None else None
    skip = DEFAULT_SKIP_MODULES if skip is None else skip
    if quantization is not None and scan_layers:
        raise ConfigError(
            "quantization_config with scan_layers=True is not supported: quantized kernels are kept per layer; "
            "load with scan_layers=False."
        )
    values = []
    new_modules = new_modules or {}
    for leaf in plan:
        var = flat[leaf.path]
        shape, dtype = tuple(var.shape), np.dtype(param_dtype)
        if leaf.module in new_modules and not any(key in index for key in leaf.keys):
            warnings.warn(
                f"the checkpoint has no `{leaf.module}` weights: `{leaf.module}` is initialised at random "
                f"(normal, std {new_modules[leaf.module]}), as transformers does. Train it (PEFT's task_type SEQ_CLS "
                "puts it in modules_to_save).",
                stacklevel=3,
            )
            init = nnx.initializers.normal(new_modules[leaf.module])(jax.random.key(0), shape, dtype)
            values.append((leaf.path, nnx.Param(init)))
            continue
        read = _reader(index, leaf, shape, dtype)
        quantized = quantization is not None and leaf.transpose and len(shape) == 2
        quantized = quantized and not is_skipped(leaf.module, skip)
        if quantized and mesh is None:  # quantize torch's (out, in) as stored: no transposed copy either way
            assert quantization is not None
            stored = jnp.asarray(np.asarray(index.read(leaf.keys[0]), dtype=dtype))
            values.append((leaf.path, nnx.Param(_quantize_stored(stored, quantization))))
            continue
        if mesh is not None:
            sharding = NamedSharding(mesh, fsdp_spec(shape, mesh))
            value: Any = jax.make_array_from_callback(shape, sharding, read)
        else:
            value = jnp.asarray(read(None))
        if quantized:
            assert quantization is not None
            value = quantize(
                value,
                quantization.quant_type,
                quantization.blocksize,
                quantization.double_quant,
                quantization.bnb_4bit_compute_dtype,
                transpose=True,
            )
        values.append((leaf.path, nnx.Param(value)))
    _check_unused(index, plan, tied, ignored)
    return nnx.merge(graphdef, nnx.from_flat_state(values), rest)


def _quantize_stored(stored: jax.Array, config: QuantizationConfig) -> Any:
    """The kernel ``stored.T`` quantized as bitsandbytes quantizes the torch weight ``stored`` (one jitted call)."""
    return _quantize_jit(stored, config.quant_type, config.blocksize, config.double_quant, config.bnb_4bit_compute_dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_jit(stored: jax.Array, quant_type: str, blocksize: int, double_quant: bool, compute_dtype: Any) -> Any:
    # quantize(transpose=True) works on kernel.T == stored: the two transposes cancel inside this trace
    return quantize(stored.T, quant_type, blocksize, double_quant, compute_dtype, transpose=True)


def _check_unused(index: TensorIndex, plan: list[Leaf], tied: bool, ignored: frozenset[str] = frozenset()) -> None:
    used = {key for leaf in plan for key in leaf.keys}
    extra = [
        name
        for name in index.names
        if name not in used
        and name not in ignored
        and not name.endswith(IGNORED_SUFFIXES)
        and not (tied and name == "lm_head.weight")
    ]
    if extra:
        shown = ", ".join(extra[:8]) + (f", ... ({len(extra)} in all)" if len(extra) > 8 else "")
        raise CheckpointError(
            f"the checkpoint holds tensors this model does not have: {shown}. Is config.json the checkpoint's own "
            "(model_type, num_hidden_layers, attention_bias, tie_word_embeddings)?"
        )


def torch_tensors(model: nnx.Module, num_layers: int, scan_layers: bool) -> Iterator[tuple[str, np.ndarray]]:
    """The model's parameters as torch keys and arrays (``(out, in)`` weights), one at a time."""
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for leaf in leaves(state, num_layers, scan_layers):
        value = flat[leaf.path].get_value()
        if hasattr(value, "dequantize"):
            value = value.dequantize()
        array = np.asarray(jax.device_get(value))
        for i, key in enumerate(leaf.keys):
            part = array[i] if len(leaf.keys) > 1 else array
            yield key, np.ascontiguousarray(part.T if leaf.transpose else part)
