"""What the core knows about a model: its named modules and their weights.

A binding (HF Flax, plain linen, NNX) describes a model as a table of
:class:`ModuleInfo`, keyed by the module's name: the dot-joined path of the parent of
its weights, which for transformers' Flax models is also the torch module name
(``transformer.h.0.attn.c_attn``). Tuners only ever see this table and parameter
trees, never a model system.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from jpeft.core.tree import Path

LayerKind = Literal["linear", "embedding", "conv", "other"]


@dataclasses.dataclass(frozen=True)
class Conv:
    """A convolution's window, as the layer applies it (channels last: ``(N, *spatial, C)``).

    Attributes:
      kernel_size: the spatial window.
      strides: per spatial axis.
      padding: ``"SAME"``/``"VALID"`` or one ``(low, high)`` pair per spatial axis.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Stack:
    """Where one layer sits in a stacked module.

    A stacked module (built with ``nnx.vmap`` and run with ``nnx.scan``) holds the weights of
    ``size`` layers along a leading axis. The binding lists each of its layers as a module of
    its own, under the name a torch user sees (``layers.3.self_attn.q_proj``), whose ``path``
    selects the layer's row with a :class:`~jpeft.core.tree.Row`.

    Attributes:
      name: the stacked module's own name (``layers.self_attn.q_proj``): what the binding hooks.
      position: the layer's row in the stack.
      size: the number of stacked layers.
    """

    name: str
    position: int
    size: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModuleInfo:
    """One named module of a model.

    Attributes:
      name: dot-joined module name, e.g. ``model.layers.0.self_attn.q_proj``.
      path: the module's path in the parameter tree.
      kind: ``"linear"`` (a dense layer), ``"embedding"`` (a lookup table) or
        ``"conv"`` (a convolution, channels last) or ``"other"`` (anything else with
        parameters, e.g. a norm).
      type_name: the module's class name (``Dense``, ``FlaxConv1D``, ``Embed``, ...).
      torch_type: the torch layer the weights correspond to (``Linear``, ``Conv1D``,
        ``Embedding``), used for PEFT conventions such as ``fan_in_fan_out``.
      in_features, out_features: as torch names them. For an embedding these are the
        vocabulary size and the embedding width.
      weight_name: the leaf holding the weight (``kernel`` or ``embedding``).
      kernel_transposed: ``True`` when the Flax weight is stored ``(out, in)`` (GPT-2's
        ``FlaxConv1D``) instead of Flax's usual ``(in, out)``.
      param_shapes: shapes of the module's own leaves (not its children's); one layer's
        shapes for a stacked layer.
      stack: where the layer sits in a stacked module (``None``: not stacked).
      conv: a convolution's window (kind ``"conv"``; its weight is ``(*kernel_size, in, out)``).
      refusal: for a module the binding cannot adapt, why, and what to do (the error raised
        when a config targets it); empty when no more is known than its kind.
      output_scale: what the layer multiplies its output by after the lookup (Gemma's scaled
        embedding, ``sqrt(hidden_size)``); PEFT scales an adapter's delta on it by the same.
    """

    name: str
    path: Path
    kind: LayerKind
    type_name: str
    torch_type: str
    in_features: int | None = None
    out_features: int | None = None
    weight_name: str | None = None
    kernel_transposed: bool = False
    param_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    stack: Stack | None = None
    conv: Conv | None = None
    refusal: str = ""
    output_scale: float = 1.0

    @property
    def has_bias(self) -> bool:
        return "bias" in self.param_shapes

    @property
    def features(self) -> tuple[int, int]:
        """``(in_features, out_features)`` of a linear or embedding module (set for both kinds)."""
        assert self.in_features is not None and self.out_features is not None, self.name
        return self.in_features, self.out_features

    @property
    def weight_path(self) -> Path:
        assert self.weight_name is not None, self.name
        return (*self.path, self.weight_name)

    @property
    def bias_path(self) -> Path:
        return (*self.path, "bias")

    def describe(self) -> str:
        if self.kind == "other":
            return f"{self.name} ({self.type_name})"
        return f"{self.name} ({self.type_name} {self.in_features}->{self.out_features})"


def module_name(path: Path) -> str:
    return ".".join(path)


def format_module_table(modules: Mapping[str, ModuleInfo], limit: int | None = None) -> str:
    """A readable listing of the adaptable modules, for error messages and ``named_modules``."""
    rows = [info.describe() for info in modules.values() if info.kind != "other"]
    shown = rows if limit is None else rows[:limit]
    text = "\n".join(f"  {row}" for row in shown)
    if limit is not None and len(rows) > limit:
        text += f"\n  ... and {len(rows) - limit} more (see `jpeft.named_modules(model)`)"
    return text
