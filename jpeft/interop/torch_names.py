"""How a Flax parameter leaf is named and laid out in torch ``transformers``.

Module names are shared between transformers' Flax and torch models; only the leaf
names and layouts differ: a Flax ``kernel`` is torch's ``weight`` transposed (for
``nn.Dense``, ``(in, out)`` vs ``(out, in)``; for GPT-2's ``FlaxConv1D``, ``(out, in)``
vs ``Conv1D``'s ``(in, out)``: a transpose both ways), ``embedding`` and LayerNorm's
``scale`` are torch's ``weight``, and conv kernels move their channel axes.
"""

from __future__ import annotations

from jpeft.core.modules import ModuleInfo


def torch_leaf(owner: ModuleInfo | None, leaf: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """Returns ``(torch leaf name, permutation Flax -> torch)`` for one leaf."""
    del owner  # the rules below depend only on the leaf; kept for layer-specific rules
    if leaf == "kernel":
        if ndim == 2:
            return "weight", (1, 0)
        if ndim >= 3:  # conv: (*spatial, in, out) -> (out, in, *spatial)
            return "weight", (ndim - 1, ndim - 2, *range(ndim - 2))
        return "weight", None
    if leaf in ("embedding", "scale"):
        return "weight", None
    return leaf, None
