"""Which NNX layer classes jpeft adapts, and how each one's weight reads as torch's ``(out, in)``.

A layer is adaptable when jpeft knows which of its weight's axes are torch's input features and
which its output features. :class:`LayerSpec` says so; :func:`register_layer` adds a class (a
custom layer is one call away), and the built-in specs cover ``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Embed``.

Methods see every adapted layer in one canonical form: a 2-D weight laid out ``(in, out)``
(``(vocab, dim)`` for an embedding), the layer's input flattened to ``(..., in)`` and its output
to ``(..., out)``. The binding reshapes (and, for an einsum whose axes are out of order,
transposes) the real weight into that view and back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

from flax import nnx

from jpeft.core.modules import Conv
from jpeft.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """How one layer's weight maps to torch's layout.

    Attributes:
      kind: ``"linear"`` (``y = x W + b``), ``"embedding"`` (a row lookup by token id) or
        ``"conv"`` (built in for ``nnx.Conv``; its window is read from the layer).
      weight: the attribute holding the weight (``kernel``, ``embedding``).
      in_axes: the weight's axes that are torch's ``in_features``, in the order the input
        holds them as its trailing axes (embedding: the vocabulary axis).
      out_axes: the weight's axes that are ``out_features``, in the order the output holds
        them as its trailing axes.
      bias: the attribute holding the bias (shape: the ``out_axes`` sizes), if any.
      torch_type: the torch layer a checkpoint calls it (``Linear``, ``Embedding``).
      conv: a convolution's window (kind ``"conv"``; its weight is ``(*window, in, out)``).
    """

    kind: Literal["linear", "embedding", "conv"]
    weight: str
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    bias: str | None = "bias"
    torch_type: str = "Linear"
    conv: Conv | None = None

    @property
    def ndim(self) -> int:
        """The rank of one layer's weight (a conv's window axes come on top of in and out)."""
        window = len(self.conv.kernel_size) if self.conv is not None else 0
        return window + len(self.in_axes) + len(self.out_axes)

    @property
    def perm(self) -> tuple[int, ...]:
        return (*self.in_axes, *self.out_axes)

    def features(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(in_features, out_features)`` of a weight of ``shape`` (one layer's, not stacked)."""
        return math.prod(shape[a] for a in self.in_axes), math.prod(shape[a] for a in self.out_axes)

    @property
    def identity(self) -> bool:
        """Whether the weight already has the layout methods read, ``(in, out)`` (a conv's
        ``(*window, in, out)``): the view is the weight itself."""
        return self.kind == "conv" or (self.in_axes == (0,) and self.out_axes == (1,))


SpecFn = Callable[[Any], LayerSpec]
_REGISTRY: dict[type, LayerSpec | SpecFn] = {}


def register_layer(cls: type, spec: LayerSpec | SpecFn) -> None:
    """Lets jpeft adapt NNX layers of class ``cls`` (and its subclasses).

    Args:
      cls: an ``nnx.Module`` subclass whose ``__call__(x, ...)`` is a linear map of ``x``'s
        trailing axes (or an embedding lookup).
      spec: its :class:`LayerSpec`, or a function of the layer instance returning one (for a
        layer whose axes depend on its settings, as ``nnx.Einsum``'s equation).

    Example:
      >>> jpeft.register_nnx_layer(MyDense, jpeft.LayerSpec("linear", "w", in_axes=(1,), out_axes=(0,)))
    """
    if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
        raise TypeError(f"register_nnx_layer takes an nnx.Module subclass, got {cls!r}.")
    _REGISTRY[cls] = spec


def spec_for(module: Any) -> LayerSpec | None:
    """The spec of ``module``'s class (nearest registered base class), or ``None``."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            spec = _REGISTRY[cls]
            return spec(module) if callable(spec) else spec
    return None


def refusal(name: str, module: Any) -> str:
    """The message for a target jpeft cannot adapt."""
    cls = type(module)
    hint = " (a transposed convolution has no PEFT layer)" if isinstance(module, nnx.ConvTranspose) else ""
    return (
        f"target module {name} is a {cls.__module__}.{cls.__qualname__}, which jpeft cannot adapt.{hint} jpeft "
        "adapts nnx.Linear, LinearGeneral, Einsum and Embed layers and registered classes. If this layer is a "
        f"linear map of its input's trailing axes, register it: `jpeft.register_nnx_layer({cls.__name__}, "
        "jpeft.LayerSpec('linear', weight='kernel', in_axes=(0,), out_axes=(1,)))` (naming its weight and which "
        "weight axes are torch's in and out features); otherwise leave it out of target_modules."
    )


# --------------------------------------------------------------------------- built-in layers


def _linear_general(module: nnx.LinearGeneral) -> LayerSpec:
    if module.batch_axis:
        raise ConfigError(
            "nnx.LinearGeneral with batch_axis has one weight per batch index, not a linear map jpeft can adapt; "
            "leave it out of target_modules."
        )
    n_in, n_out = len(module.in_features), len(module.out_features)
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    if tuple(axis) != tuple(range(-n_in, 0)):
        raise ConfigError(
            f"nnx.LinearGeneral with axis={module.axis}: jpeft adapts one that contracts its input's trailing axes "
            f"(axis={tuple(range(-n_in, 0))}); leave this one out of target_modules."
        )
    return LayerSpec("linear", "kernel", tuple(range(n_in)), tuple(range(n_in, n_in + n_out)))


def _einsum(module: nnx.Einsum) -> LayerSpec:
    """Reads an ``"x,w->y"`` equation: ``w``'s labels summed with ``x``'s trailing labels are the
    input features; the rest must be ``y``'s trailing labels (the output features)."""
    equation = module.einsum_str.replace(" ", "")
    try:
        inputs, y = equation.split("->")
        x, w = inputs.split(",")
    except ValueError:
        raise ConfigError(f"cannot read nnx.Einsum equation {module.einsum_str!r} as 'x,w->y'.") from None
    if "." in equation or len(set(w)) != len(w):
        raise ConfigError(f"nnx.Einsum {module.einsum_str!r}: ellipses and repeated labels are not supported.")
    summed = [c for c in x if c in w and c not in y]
    kept = [c for c in w if c not in summed]
    n_in, n_out = len(summed), len(kept)
    if (
        any(c in x for c in kept)  # a label shared by x, w and y: one weight per index, not one linear map
        or not summed
        or list(x[len(x) - n_in :]) != summed
        or sorted(y[len(y) - n_out :]) != sorted(kept)
    ):
        raise ConfigError(
            f"nnx.Einsum {module.einsum_str!r} is not a linear map of its input's trailing axes onto the output's "
            "trailing axes; register a LayerSpec for it with `jpeft.register_nnx_layer` or leave it out of targets."
        )
    in_axes = tuple(w.index(c) for c in summed)
    out_axes = tuple(w.index(c) for c in y[len(y) - n_out :])
    return LayerSpec("linear", "kernel", in_axes, out_axes)


def _conv(module: nnx.Conv) -> LayerSpec:
    """A channels-last convolution, kernel ``(*window, in, out)``: torch's ``Conv{1,2,3}d``."""
    n = len(module.kernel_size)
    one = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v or 1,) * n  # noqa: E731
    name = f"nnx.Conv(kernel_size={module.kernel_size})"
    if module.feature_group_count != 1 or set(one(module.kernel_dilation)) != {1} or set(one(module.input_dilation)) != {1}:
        raise ConfigError(
            f"{name} with groups or dilation: PEFT's conv LoRA ignores the base layer's dilation, so no adapter "
            "can match it across frameworks; jpeft adapts plain convolutions only. Leave it out of target_modules."
        )
    padding = module.padding
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ConfigError(f"{name} with padding={padding!r}: jpeft adapts 'SAME', 'VALID' or explicit padding.")
        pads: str | tuple[tuple[int, int], ...] = padding.upper()
    elif isinstance(padding, int):
        pads = ((padding, padding),) * n
    else:
        pads = tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)
    window = Conv(tuple(module.kernel_size), one(module.strides), pads)
    return LayerSpec("conv", "kernel", (n,), (n + 1,), torch_type=f"Conv{n}d", conv=window)


register_layer(nnx.Linear, LayerSpec("linear", "kernel", (0,), (1,)))
register_layer(nnx.Conv, _conv)
register_layer(nnx.LinearGeneral, _linear_general)
register_layer(nnx.Einsum, _einsum)
register_layer(nnx.Embed, LayerSpec("embedding", "embedding", (0,), (1,), bias=None, torch_type="Embedding"))
