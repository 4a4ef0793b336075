"""Quantizing the frozen base: a ``BitsAndBytesConfig``-like config and whole-tree helpers.

:func:`quantize_params` swaps every 2-D ``kernel`` leaf of a Flax parameter tree for a
:class:`~jpeft.quant.formats.QuantizedArray` (QLoRA's frozen 4-bit base, or LLM.int8's 8-bit one);
embeddings, norms, biases and the output heads stay as they are. The result is still a pytree, so
it passes through ``jax.jit`` as the ``frozen`` argument of a train step unchanged. Code that maps
over base leaves should pass ``is_leaf=is_quantized`` and call ``.dequantize()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core.tree import PyTree, flatten, unflatten
from jpeft.errors import ConfigError
from jpeft.quant.formats import QuantizedArray, is_quantized, quantize

# transformers keeps these output heads in full precision (its ``get_keys_to_not_convert``).
DEFAULT_SKIP_MODULES: tuple[str, ...] = ("lm_head", "score", "classifier", "qa_outputs")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizationConfig:
    """transformers' ``BitsAndBytesConfig`` fields that decide the numbers, with its defaults.

    Attributes:
      load_in_4bit: quantize kernels to 4 bits (``bnb_4bit_quant_type``).
      load_in_8bit: quantize kernels to int8 (LLM.int8's row-wise absmax, no outlier split).
      bnb_4bit_quant_type: ``"fp4"`` (transformers' default) or ``"nf4"`` (QLoRA's choice).
      bnb_4bit_use_double_quant: quantize the per-block absmax values as well.
      bnb_4bit_compute_dtype: dtype kernels are dequantized to for the matmul; a dtype or its
        name (``"bfloat16"``). Kept for 8 bit too.
      llm_int8_skip_modules: module names (last component or dot-suffix) kept in full precision;
        ``None`` means :data:`DEFAULT_SKIP_MODULES`. As in transformers, a list replaces the
        default rather than adding to it.
      blocksize: values per absmax block for 4 bit (bitsandbytes uses 64).
    """

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: Any = jnp.float32
    llm_int8_skip_modules: Sequence[str] | None = None
    blocksize: int = 64

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("`load_in_4bit` and `load_in_8bit` are both True; choose one.")
        if not (self.load_in_4bit or self.load_in_8bit):
            raise ConfigError("set `load_in_4bit=True` or `load_in_8bit=True` to quantize the base.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ConfigError(
                f"`bnb_4bit_quant_type` must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}."
            )
        if not isinstance(self.blocksize, int) or self.blocksize <= 0:
            raise ConfigError(
                f"`blocksize` must be a positive int (bitsandbytes uses 64), got {self.blocksize!r}."
            )
        try:
            compute_dtype = np.dtype(jnp.dtype(self.bnb_4bit_compute_dtype))
        except TypeError as err:
            raise ConfigError(
                f"`bnb_4bit_compute_dtype` {self.bnb_4bit_compute_dtype!r} is not a dtype; use e.g. 'bfloat16'."
            ) from err
        if not jnp.issubdtype(compute_dtype, jnp.floating):
            raise ConfigError(f"`bnb_4bit_compute_dtype` must be a float dtype, got {compute_dtype}.")
        object.__setattr__(self, "bnb_4bit_compute_dtype", compute_dtype)
        if isinstance(self.llm_int8_skip_modules, str):
            object.__setattr__(self, "llm_int8_skip_modules", (self.llm_int8_skip_modules,))
        elif self.llm_int8_skip_modules is not None:
            object.__setattr__(self, "llm_int8_skip_modules", tuple(self.llm_int8_skip_modules))

    @property
    def quant_type(self) -> str:
        """``"nf4"``, ``"fp4"`` or ``"int8"``."""
        return "int8" if self.load_in_8bit else self.bnb_4bit_quant_type

    @property
    def double_quant(self) -> bool:
        return self.load_in_4bit and self.bnb_4bit_use_double_quant


def is_skipped(module: str, skip_modules: Collection[str]) -> bool:
    """Whether ``module`` (dot-joined) equals a skip entry's last component or ends with ``.entry``."""
    return any(module == entry or module.endswith("." + entry) for entry in skip_modules)


def quantize_params(
    params: PyTree,
    config: QuantizationConfig,
    *,
    skip_modules: Sequence[str] | None = None,
    transposed_kernels: Collection[str] = (),
) -> PyTree:
    """Replaces each 2-D ``kernel`` of a Flax parameter tree by a :class:`QuantizedArray`.

    A kernel is kept when its module (the dot-joined path without the leaf name, e.g.
    ``transformer.h.0.attn.c_attn``) is skipped: when a skip entry equals the module's last
    component or is a dot-suffix of its path. Only ``kernel`` leaves of ndim 2 are touched, so
    embeddings (``embedding``), norms and biases stay as they are.

    Kernels are quantized in torch's layout, as bitsandbytes quantizes the same layer in torch:
    a Flax ``Dense`` kernel ``(in, out)`` is quantized transposed; a module named in
    ``transposed_kernels`` (kernel already stored ``(out, in)``, e.g. GPT-2's ``FlaxConv1D``,
    ``ModuleInfo.kernel_transposed``) as stored. Either way int8 keeps one scale per output
    feature and ``dequantize()`` gives back the kernel's own shape.

    Args:
      params: the base parameter tree (nested mappings); not modified.
      config: what to quantize to.
      skip_modules: module names to keep; ``None`` means ``config.llm_int8_skip_modules`` or,
        if that is ``None`` too, :data:`DEFAULT_SKIP_MODULES`.
      transposed_kernels: module names whose kernel is stored ``(out, in)``.

    Returns:
      A new tree (plain dicts) with the same structure.
    """
    if skip_modules is None:
        skip_modules = config.llm_int8_skip_modules
    if skip_modules is None:
        skip_modules = DEFAULT_SKIP_MODULES
    if isinstance(skip_modules, str):
        skip_modules = (skip_modules,)
    flat = dict(flatten(params))
    for path, leaf in flat.items():
        module = ".".join(path[:-1])
        if (
            path[-1] != "kernel"
            or is_quantized(leaf)
            or np.ndim(leaf) != 2
            or is_skipped(module, skip_modules)
        ):
            continue
        flat[path] = quantize(
            leaf,
            config.quant_type,
            config.blocksize,
            config.double_quant,
            config.bnb_4bit_compute_dtype,
            transpose=module not in transposed_kernels,
        )
    return unflatten(flat)


def dequantize_params(tree: PyTree) -> PyTree:
    """Every :class:`QuantizedArray` of ``tree`` turned back into a dense array of its original dtype."""
    return jax.tree.map(
        lambda leaf: leaf.dequantize(leaf.dtype) if is_quantized(leaf) else leaf, tree, is_leaf=is_quantized
    )


def quantized_nbytes(tree: PyTree) -> int:
    """Bytes a tree really stores: a :class:`QuantizedArray` counts its packed codes and scales."""
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return sum(int(leaf.nbytes) if hasattr(leaf, "nbytes") else np.asarray(leaf).nbytes for leaf in leaves)


def quantized_leaves(tree: Mapping[str, Any]) -> dict[str, QuantizedArray]:
    """``{module name: QuantizedArray}`` for every quantized kernel of a (nested-dict) tree."""
    return {".".join(path[:-1]): leaf for path, leaf in flatten(tree).items() if is_quantized(leaf)}
