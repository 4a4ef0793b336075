"""The method contract: what a tuner file provides, and the records it works on.

A method (LoRA, IA3, prompt tuning, ...) is one file under ``jpeft/tuners/`` that ends
with one ``registry.register(PeftType.X, XConfig, Method(...), kind=...)`` call. The
:class:`Method` record lists its functions: the required ones every method has, and
optional ones whose absence means "this method does not do that" (the caller then
refuses with a clear error, or uses the stated default). Nothing in jpeft looks a
method's behaviour up by name or with ``getattr``.

A method resolves its config against a model once (``prepare``, giving a :class:`Plan`:
the static facts, never traced) and then works on plain trees: the frozen base params
and its own adapter tree. Functions are pure; state a method changes (AdaLoRA's ranks, a
weighted combination of adapters) comes back as a new :class:`AdapterState` that the
``PeftModel`` stores.

Two kinds of method exist (``kind=`` of ``register``):

- ``"layer"``: adds a contribution to targeted layers' outputs through the binding's
  layer hook (LoRA, IA3, VeRA, AdaLoRA, LoHa). Needs ``layer_forward`` and the merge trio.
- ``"prompt"``: changes the model's inputs (prompt tuning, P-tuning, prefix tuning). Needs
  ``prompt_embeddings``, ``run``, ``generate`` and ``loss_batch``; cannot be merged, is
  frozen once loaded, and one is active at a time (PEFT's rules).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, TypeVar

import numpy as np

from jpeft.core.modules import ModuleInfo
from jpeft.core.tree import Path, PyTree

if TYPE_CHECKING:
    import jax

    from jpeft.bindings.protocol import Binding
    from jpeft.config import PeftConfig

PEFT_PREFIX = "base_model.model."

Kind = Literal["layer", "prompt"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """Static facts about one adapted layer; methods subclass it with their own fields.

    Attributes:
      info: the layer's entry in the binding's module table.
      index: the layer's position among the adapter's targets (folded into per-layer keys).
    """

    info: ModuleInfo
    index: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """One adapter resolved against one model; methods subclass it with their own fields.

    Attributes:
      config: the config as saved (targets resolved, model fields filled in).
      modules: the binding's module table.
      layers: ``{module name: LayerPlan}`` of the layers the adapter hooks (empty for
        prompt methods).
      modules_to_save: resolved names of the modules trained as full copies.
      bias_leaves: base leaves the adapter trains as copies (PEFT's ``bias=``).
    """

    config: Any
    modules: Mapping[str, ModuleInfo]
    layers: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    bias_leaves: tuple[Path, ...] = ()

    @property
    def hooked(self) -> frozenset[str]:
        """Module names whose outputs the binding must hand to the layer hook."""
        return frozenset(self.layers)


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One tensor of a PEFT checkpoint.

    Attributes:
      key: the PEFT key without the ``base_model.model.`` prefix.
      tree: ``"adapter"`` for the adapter's own tree, ``"base"`` for the base params
        (PEFT's ``save_embedding_layers``).
      path: where the value lives in that tree.
      perm: axis permutation taking the Flax array to torch's layout (``None``: same).
      load: ``False`` for tensors PEFT writes but that carry nothing to load (they are
        written, and accepted without a warning when read).
      prefix: the key's prefix in the file; ``base_model.model.`` for module tensors,
        ``base_model.`` for tensors that belong to the tuner itself (VeRA's shared
        projections), ``""`` for prompt learning's ``prompt_embeddings``.
      save: ``False`` for tensors that are read into ``path`` but written from a value the
        method computes (``prompt_embeddings``: the prompt encoder's output).
    """

    key: str
    tree: Literal["adapter", "base"]
    path: Path
    perm: tuple[int, ...] | None = None
    load: bool = True
    prefix: str = PEFT_PREFIX
    save: bool = True

    @property
    def file_key(self) -> str:
        return self.prefix + self.key

    def to_torch(self, value: Any) -> np.ndarray:
        array = np.asarray(value)
        return np.ascontiguousarray(array.transpose(self.perm) if self.perm else array)

    def from_torch(self, array: np.ndarray) -> np.ndarray:
        if not self.perm:
            return array
        return array.transpose(np.argsort(self.perm))

    def torch_shape(self, flax_shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(flax_shape)
        return tuple(shape[i] for i in self.perm) if self.perm else shape


class AdapterState(NamedTuple):
    """An adapter as ``PeftModel`` stores it: what a state-changing method returns."""

    config: Any
    plan: Any
    adapter: PyTree


class AdapterView(NamedTuple):
    """A read-only view of one adapter, handed to methods that combine adapters."""

    name: str
    config: Any
    plan: Any
    adapter: PyTree


PlanT = TypeVar("PlanT", bound=Plan)

# (layer, config, adapter, weight, x, out, *, train, key) -> out: the layer's output with the
# adapter's contribution. ``weight`` is the layer's (unboxed, decoded) weight in Flax layout.
LayerForward = Callable[..., "jax.Array"]

# (layers, weight, x, out, result, per_example) -> result: every adapter of this method on one
# layer of a mixed batch at once; ``layers`` is ``[(adapter id, layer plan, config, adapter)]``.
MixedBatchForward = Callable[..., "jax.Array"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method(Generic[PlanT]):
    """The functions one method provides. Required first, then optional ones (``None``: not done).

    Required of every method:
      prepare: ``(config, binding) -> Plan``: PEFT's target resolution; the plan's config is
        what is saved.
      init_params: ``(plan, base_params, key) -> (adapter, new base params or None)``; a new
        base is returned by inits that rewrite it (PiSSA, OLoRA, LoftQ), as PEFT mutates its base.
      apply_overrides: ``(base_params, adapter, plan) -> base_params`` with the adapter's
        trainable copies (``modules_to_save``, biases) substituted in.
      key_entries: ``(plan, adapter, save_embedding_layers) -> [KeyEntry]``: the PEFT
        checkpoint layout, read by both save and load.
      counted_in_total: ``(plan, adapter) -> int``: what PEFT adds to ``all params``.

    Required of layer methods (``kind="layer"``):
      layer_tree: the adapter tree's key under which each layer's own params live, by module
        name (``adapter["lora"]["model.layers.0.self_attn.q_proj"]``). The runtime relies on it
        to stack the params of a stacked module's layers (:mod:`jpeft.runtime.forward`).
      layer_forward: see :data:`LayerForward`.
      merge, unmerge, merge_record: ``merge(base, adapter, plan) -> base``; ``merge_record``
        is taken before a merge and handed to ``unmerge(base, adapter, plan, record)``.

    Required of prompt methods (``kind="prompt"``):
      prompt_embeddings: ``(plan, adapter, *, train, key) -> (rows, token_dim)``: what PEFT
        saves as ``prompt_embeddings``, and what a loaded adapter holds.
      run: ``(plan, binding, base_params, adapter, prompts, args, kwargs, *, train,
        dropout_rng) -> output``: the model's forward with the prompts in place.
      generate: the same for the binding's ``generate``.
      loss_batch: ``(plan, batch) -> batch`` as the loss sees it (labels grow by the
        virtual tokens for causal LM prompt tuning).

    Optional:
      trainable_mask: ``(plan, adapter) -> bool tree``; default: every adapter leaf trains.
      adapter_specs: ``(plan, adapter, base_specs) -> PartitionSpec tree``: the adapter's
        sharding given its base's; default: replicated.
      config_for_save: ``(config) -> config`` as written to ``adapter_config.json``
        (LoftQ's saved config does not re-run LoftQ); default: unchanged.
      check_new_adapter: ``(config, existing configs) -> None``; raises when the new
        adapter cannot join the existing ones (LoRA: one adapter with trainable biases).
      check_mixed_batch: ``(config, adapter) -> None``; raises when the adapter cannot be
        one of a mixed batch's per-example adapters (DoRA, as PEFT).
      mixed_batch_forward: see :data:`MixedBatchForward`; default: ``layer_forward`` per
        adapter, selected per example.
      innermost_layers: ``(plan) -> module names`` where the adapter must be the innermost
        of several active adapters (IA3 scaling a feed-forward layer's input).
      combine_adapters: ``(sources, weights, new_name, binding, base_params, **options) ->
        (AdapterState, new base or None)``: PEFT's ``add_weighted_adapter``.
      allocator_init, update_and_allocate, finalize_allocation: a rank allocator (AdaLoRA):
        ``allocator_init(plan, adapter) -> state``; ``update_and_allocate(state, adapter,
        grads, step, plan) -> (state, adapter)``; ``finalize_allocation(state, step, plan,
        adapter, binding) -> AdapterState | None`` (the pruned adapter once the schedule ends).
      with_rank_pattern: ``(plan, adapter, rank_pattern, binding) -> AdapterState``: the adapter
        pruned to a rank pattern (PEFT's ``resize_modules_by_rank_pattern``).
    """

    prepare: Callable[[Any, Binding], PlanT]
    init_params: Callable[[PlanT, PyTree, jax.Array], tuple[PyTree, PyTree | None]]
    apply_overrides: Callable[[PyTree, Mapping[str, Any], PlanT], PyTree]
    key_entries: Callable[[PlanT, Mapping[str, Any], bool | str], list[KeyEntry]]
    counted_in_total: Callable[[PlanT, Mapping[str, Any]], int]
    # layer methods
    layer_tree: str | None = None
    layer_forward: LayerForward | None = None
    merge: Callable[[PyTree, Mapping[str, Any], PlanT], PyTree] | None = None
    merge_record: Callable[[PyTree, Mapping[str, Any], PlanT], Any] | None = None
    unmerge: Callable[[PyTree, Mapping[str, Any], PlanT, Any], PyTree] | None = None
    # prompt methods
    prompt_embeddings: Callable[..., jax.Array] | None = None
    run: Callable[..., Any] | None = None
    generate: Callable[..., Any] | None = None
    loss_batch: Callable[[PlanT, Mapping[str, Any]], Mapping[str, Any]] | None = None
    # optional
    trainable_mask: Callable[[PlanT, Mapping[str, Any]], PyTree] | None = None
    adapter_specs: Callable[[PlanT, Mapping[str, Any], PyTree], PyTree] | None = None
    config_for_save: Callable[[Any], Any] | None = None
    check_new_adapter: Callable[[Any, Sequence[PeftConfig]], None] | None = None
    check_mixed_batch: Callable[[Any, Mapping[str, Any]], None] | None = None
    mixed_batch_forward: MixedBatchForward | None = None
    innermost_layers: Callable[[PlanT], frozenset[str]] | None = None
    combine_adapters: Callable[..., tuple[AdapterState, PyTree | None]] | None = None
    allocator_init: Callable[[PlanT, Mapping[str, Any]], Any] | None = None
    update_and_allocate: Callable[..., tuple[Any, PyTree]] | None = None
    finalize_allocation: Callable[..., AdapterState | None] | None = None
    with_rank_pattern: Callable[..., AdapterState] | None = None

    def check(self, kind: Kind, name: str) -> None:
        """Raises ``TypeError`` when a function ``kind`` requires is missing (at registration)."""
        required = {
            "layer": ("layer_tree", "layer_forward", "merge", "merge_record", "unmerge"),
            "prompt": ("prompt_embeddings", "run", "generate", "loss_batch"),
        }[kind]
        missing = [field for field in required if getattr(self, field) is None]
        if missing:
            raise TypeError(f"method {name}: a {kind!r} method must provide {', '.join(missing)}.")
        allocator = (self.allocator_init, self.update_and_allocate, self.finalize_allocation)
        if any(f is None for f in allocator) and not all(f is None for f in allocator):
            raise TypeError(
                f"method {name}: allocator_init, update_and_allocate and finalize_allocation come together."
            )
