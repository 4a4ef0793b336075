"""Adapters folded into the base weights, and taken back out.

On a quantized base (:func:`jpeft.quantize_model`) each adapted kernel is decoded, merged
and encoded again with its own settings, as PEFT's bitsandbytes layers merge (the
re-encoding rounds the merged weights).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jpeft.core import registry
from jpeft.core.method import Method, Plan
from jpeft.core.tree import Path, PyTree, get_path, set_path
from jpeft.quant.formats import is_quantized


def mergeable(plan: Plan) -> Method[Any]:
    """The plan's method, or ``ValueError`` for methods that cannot be merged (prompt learning)."""
    registration = registry.registration(plan.config.peft_type)
    if registration.kind != "layer":
        raise ValueError(
            f"prompt-learning adapters ({plan.config.peft_type.value}) cannot be merged into the base weights: "
            "they add virtual tokens (or key/value prefixes) to the model's input, not a weight change. Keep the "
            "adapter attached (`apply`/`generate`), or use `unload()` for the plain base model."
        )
    return registration.method


def quantized_weights(base: PyTree, plan: Plan) -> dict[Path, Any]:
    """``{weight path: QuantizedArray}`` for the quantized kernels of the layers ``plan`` adapts."""
    out = {}
    for layer in plan.layers.values():
        info = layer.info
        if info.weight_name is None:
            continue
        leaf = get_path(base, info.weight_path)
        if is_quantized(leaf):
            out[info.weight_path] = leaf
    return out


def on_decoded_kernels(base: PyTree, plan: Plan, change: Callable[..., PyTree], *args: Any) -> PyTree:
    """``change(base, *args)`` with the plan's quantized kernels decoded before and quantized again after."""
    quantized = quantized_weights(base, plan)
    for path, q in quantized.items():
        base = set_path(base, path, q.dequantize(q.dtype))
    base = change(base, *args)
    for path, q in quantized.items():
        base = set_path(base, path, q.replace_boxed(get_path(base, path)))
    return base


def merge_one(base: PyTree, name: str, plan: Plan, adapter: PyTree) -> tuple[PyTree, Any]:
    """``(base with adapter ``name`` merged, the record its unmerge needs)``."""
    method = mergeable(plan)
    assert method.merge is not None and method.merge_record is not None  # a layer method
    quantized = quantized_weights(base, plan)
    if quantized:
        warnings.warn(
            f"merging adapter {name!r} into {len(quantized)} quantized kernels: each is dequantized, merged "
            "and quantized again (as PEFT's bitsandbytes layers do), which rounds the merged weights; use "
            "`merge_and_unload(dequantize=True)` for a full-precision merged model.",
            stacklevel=4,
        )
    records = []

    def merge(dense: PyTree) -> PyTree:
        records.append(method.merge_record(dense, adapter, plan))  # type: ignore[misc]
        return method.merge(dense, adapter, plan)  # type: ignore[misc]

    return on_decoded_kernels(base, plan, merge), records[0]


def unmerge_one(base: PyTree, plan: Plan, adapter: PyTree, record: Any) -> PyTree:
    """The base with a merged adapter taken back out (lossy on a quantized base, as PEFT's bitsandbytes)."""
    method = mergeable(plan)
    assert method.unmerge is not None
    return on_decoded_kernels(base, plan, method.unmerge, adapter, plan, record)


def warn_if_tied_embedding(plans: Mapping[str, Plan], names: Sequence[str], tied: frozenset[str]) -> None:
    """Merging an adapted input embedding that the output head shares also changes the head (as PEFT)."""
    if any(layer_name in tied for n in names for layer_name in plans[n].layers):
        warnings.warn(
            "Merging an adapted input embedding of a model with tied word embeddings also changes its output "
            "head (they share one weight), as in PEFT; the merged model's logits differ from the unmerged ones.",
            stacklevel=4,
        )
