"""The binding contract: how a model system is driven by jpeft.

A binding wraps one model (a transformers Flax model, a linen module with its params,
and later an NNX module) and gives the rest of jpeft exactly this: a table of the
model's modules under their torch names, its parameter tree, and a forward that calls a
*layer hook* on the outputs of named modules. Methods and ``PeftModel`` see nothing
else of the model system. Every member below is required; where a model system has no
such thing, the binding says so with the stated empty value (``None``, an empty set,
``False``) or, for ``generate``, a ``TypeError`` naming the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax

from jpeft.core.modules import ModuleInfo
from jpeft.core.tree import Path, PyTree

# hook(module name, module input, module output[, carried]) -> the output with the adapters'
# contributions. ``carried`` is given for a stacked module only: its slice of the ``carry`` tree
# that ``run`` attached to it (see :func:`jpeft.runtime.forward.prepare`).
Hook = Callable[..., jax.Array]


@runtime_checkable
class Binding(Protocol):
    """What jpeft needs of a model system.

    Attributes:
      model: the wrapped model as the user passed it (``merge_and_unload`` returns the same
        kind of object).
      params: the model's parameter tree (plain nested dicts).
      modules: ``{torch module name: ModuleInfo}`` of every module with parameters.
      config: the model's transformers config (``None`` when it has none).
      model_type: ``config.model_type`` (``None`` when unknown): keys the per-architecture
        defaults of :mod:`jpeft.core.architectures`.
      class_name: the model's class name, for messages.
      name_or_path: where the weights came from (saved as ``base_model_name_or_path``).
      torch_class_name, torch_module_path: the torch class a checkpoint of this model loads
        into (PEFT's ``auto_mapping``), or ``None``.
      output_embedding_names: the module(s) computing vocabulary logits (kept out of
        ``"all-linear"``).
      tied_embedding_names: input embeddings the output head shares its weight with.
      buffer_paths: params that are buffers in torch (not counted, never trained).
      (a stacked module's layers are listed one by one: see :class:`~jpeft.core.modules.Stack`)
      head_output_is_logits: whether the model returns ``lm_head``'s output unchanged as its
        logits (lets the train step fuse the head with the loss).
    """

    @property
    def model(self) -> Any: ...
    @property
    def params(self) -> PyTree: ...
    @property
    def modules(self) -> Mapping[str, ModuleInfo]: ...
    @property
    def config(self) -> Any: ...
    @property
    def model_type(self) -> str | None: ...
    @property
    def class_name(self) -> str: ...
    @property
    def name_or_path(self) -> str | None: ...
    @property
    def torch_class_name(self) -> str | None: ...
    @property
    def torch_module_path(self) -> str | None: ...
    @property
    def output_embedding_names(self) -> frozenset[str]: ...
    @property
    def tied_embedding_names(self) -> frozenset[str]: ...
    @property
    def buffer_paths(self) -> frozenset[Path]: ...
    @property
    def head_output_is_logits(self) -> bool: ...

    def run(
        self,
        params: PyTree,
        hook: Hook | None,
        names: frozenset[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        train: bool,
        dropout_rng: jax.Array | None,
        carry: Mapping[str, PyTree] | None = None,
    ) -> Any:
        """The model's forward on ``params`` with ``hook`` applied to the modules in ``names``.

        ``args``/``kwargs`` are the model's own inputs; ``train`` turns its dropout on (the
        binding passes it in whatever form the model takes: ``train=``, ``deterministic=``).
        ``carry`` (stacked modules only) maps a stacked module's name to a tree whose leaves
        have the stack's leading axis: the binding makes it travel with that module's weights
        (sliced per layer by the model's own scan) and passes the slice as the hook's fourth
        argument. A binding without stacked modules never receives one.
        """
        ...

    def generate(
        self,
        params: PyTree,
        hook: Hook | None,
        names: frozenset[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        carry: Mapping[str, PyTree] | None = None,
    ) -> Any:
        """The model's own generation with the hook in place; ``TypeError`` if it cannot generate.

        ``carry`` as for :meth:`run` (given only to bindings with stacked modules).
        """
        ...

    def enable_gradient_checkpointing(self) -> None:
        """Rematerialise each repeated block in the backward pass of later traces."""
        ...

    def with_params(self, params: PyTree) -> Any:
        """A model of the user's kind holding ``params`` (the wrapped one is left unchanged)."""
        ...
