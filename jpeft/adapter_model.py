"""``AdapterModel``: which adapters a model has, which are active, and which leaves train.

The state half of :class:`jpeft.PeftModel`: the frozen base params, one adapter tree,
config and :class:`~jpeft.core.method.Plan` per adapter name, the active set, and PEFT's
API over them (``add_adapter``, ``set_adapter``, ``delete_adapter``, ``disable_adapter``,
``add_weighted_adapter``, ``trainable_mask``, ``split_params``, parameter counts). An
adapter's config and plan change only through ``_store``: methods that change an adapter
return a new :class:`~jpeft.core.method.AdapterState` and it records it. ``PeftModel`` adds
running, merging and saving; it writes only trees (``params``, loaded tensors, merged
weights) directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax

from jpeft.bindings import Binding, bind
from jpeft.config import PeftConfig
from jpeft.core import registry
from jpeft.core.method import AdapterState, AdapterView, Kind, Method, Plan
from jpeft.core.modules import ModuleInfo
from jpeft.core.tree import PyTree, count_params, get_path, split
from jpeft.interop import checkpoint

_MODEL_CLASSES: dict[Kind, type[AdapterModel]] = {}
_KIND_WORDS: dict[Kind, str] = {"layer": "layer-adapter", "prompt": "prompt-learning"}


def model_class_for(kind: Kind) -> type[AdapterModel]:
    """The model class that runs adapters of ``kind`` (``"layer"``: ``PeftModel``)."""
    return _MODEL_CLASSES[kind]


class AdapterModel:
    """A Flax model's adapters and their state; the base of :class:`jpeft.PeftModel`.

    Attributes:
      peft_config: ``{adapter name: config}`` as saved (targets resolved).
      active_adapter: the adapter trained and used (``active_adapters`` for all).
      base_model: the wrapped Flax model (transformers model or ``(module, params)``).
      params: ``{"base": base params, "adapters": {name: adapter tree}}``.
    """

    # the kinds of method (``registry.register(kind=...)``) whose adapters this class runs
    kinds: ClassVar[frozenset[Kind]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """The first subclass for a kind of method is the class built for its adapters."""
        super().__init_subclass__(**kwargs)
        for kind in cls.kinds:
            _MODEL_CLASSES.setdefault(kind, cls)

    def __init__(
        self, model: Any, peft_config: PeftConfig, adapter_name: str = "default", *, key: jax.Array | None = None
    ):
        self._binding: Binding = bind(model)
        self.base_params: PyTree = self._binding.params
        self.adapters: dict[str, PyTree] = {}
        self.peft_config: dict[str, PeftConfig] = {}
        self._plans: dict[str, Plan] = {}
        self._active: list[str] = []
        self._disabled = False
        self._merged: dict[str, Any] = {}  # adapter name -> what unmerging it needs
        self._allocators: dict[str, Any] = {}  # rank-allocator state per adapter (AdaLoRA)
        self._inference: set[str] = set()  # adapters frozen for inference (loaded with is_trainable=False)
        self.add_adapter(adapter_name, peft_config, key=key)
        self._active = [adapter_name]

    # ------------------------------------------------------------------ structure

    @property
    def binding(self) -> Binding:
        """The model system's binding (read-only: module table, forward)."""
        return self._binding

    @property
    def base_model(self) -> Any:
        return self._binding.model

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else list(self._active)  # type: ignore[return-value]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def params(self) -> dict[str, Any]:
        return {"base": self.base_params, "adapters": dict(self.adapters)}

    @params.setter
    def params(self, value: Mapping[str, Any]) -> None:
        # jaxlib's PyTreeDef stub does not declare __ne__
        if jax.tree.structure(dict(value)) != jax.tree.structure(self.params):  # type: ignore[operator]
            raise ValueError(
                "`params` must have the structure of `peft_model.params` ({'base': ..., 'adapters': {...}}); "
                "to update only the trained part use `peft_model.params = jpeft.combine(trainable, frozen)`."
            )
        self.base_params = value["base"]
        self.adapters = dict(value["adapters"])

    def plan(self, adapter_name: str | None = None) -> Plan:
        """The adapter's :class:`~jpeft.core.method.Plan`: its config resolved against this model."""
        name = adapter_name or self._active[0]
        self._check_known(name)
        return self._plans[name]

    def _method(self, adapter_name: str) -> Method[Any]:
        return registry.method_for(self.peft_config[adapter_name].peft_type)

    def named_modules(self) -> dict[str, ModuleInfo]:
        return dict(self._binding.modules)

    def targeted_modules(self, adapter_name: str | None = None) -> list[str]:
        """Names of the modules the adapter changes."""
        return list(self.plan(adapter_name).layers)

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, *, key: jax.Array | None = None) -> None:
        """Adds a new adapter (not active, frozen), as PEFT's ``add_adapter``.

        Args:
          adapter_name: a plain folder-safe name (non-default adapters save in a
            subfolder of that name).
          peft_config: the adapter's config; same ``peft_type`` as existing adapters.
          key: PRNG key for the adapter's init (default ``jax.random.key(0)``).
        """
        checkpoint.check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete it first.")
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(
                f"`peft_config` must be a jpeft config (e.g. LoraConfig), got {type(peft_config).__name__}."
            )
        for other in self.peft_config.values():
            if other.peft_type != peft_config.peft_type and not self._mixes(other, peft_config):
                raise ValueError(
                    f"Cannot combine adapters with different peft types ({other.peft_type.value} and "
                    f"{peft_config.peft_type.value}) in one PeftModel."
                )
        registration = registry.registration(peft_config.peft_type)
        if registration.kind not in self.kinds:
            takes = " and ".join(_KIND_WORDS[kind] for kind in sorted(self.kinds))
            raise TypeError(
                f"{type(self).__name__} takes {takes} configs, got {type(peft_config).__name__}: "
                f"{peft_config.peft_type.value} adapters need a {_MODEL_CLASSES[registration.kind].__name__}. "
                "Build the model with `jpeft.get_peft_model(model, config)` or "
                "`jpeft.PeftModel.from_pretrained(model, folder)`, which pick the right class."
            )
        method = registration.method
        if method.check_new_adapter is not None:
            method.check_new_adapter(peft_config, list(self.peft_config.values()))
        plan = method.prepare(peft_config, self._binding)
        adapter, new_base = method.init_params(plan, self.base_params, jax.random.key(0) if key is None else key)
        self._store(adapter_name, AdapterState(plan.config, plan, adapter), new_base)

    def _store(self, adapter_name: str, state: AdapterState, new_base: PyTree | None = None) -> None:
        """Records a new or changed adapter: the one place an adapter's config and plan are written."""
        config, plan = state.config, state.plan
        if config.base_model_name_or_path is None and self._binding.name_or_path:
            config = dataclasses.replace(config, base_model_name_or_path=self._binding.name_or_path)
            plan = dataclasses.replace(plan, config=config)
        if new_base is not None:
            self.base_params = new_base
        self.adapters[adapter_name] = state.adapter
        self.peft_config[adapter_name] = config
        self._plans[adapter_name] = plan
        if config.inference_mode:
            self._inference.add(adapter_name)

    def _mixes(self, a: PeftConfig, b: PeftConfig) -> bool:
        """Whether adapters of configs ``a`` and ``b`` may live in this model together."""
        return False

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Makes ``adapter_name`` the active adapter; trainable unless ``inference_mode`` (as PEFT).

        A list activates several adapters at once, as PEFT's ``base_model.set_adapter([...])``:
        their contributions add up (applied in the order given) and all of them train.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError("`set_adapter` takes an adapter name or a non-empty list of adapter names.")
        for name in names:
            self._check_known(name)
        if len(names) > 1:
            prompt = [n for n in names if registry.kind_of(self.peft_config[n].peft_type) == "prompt"]
            if prompt:
                raise ValueError(f"prompt-learning adapters {prompt} cannot be active with other adapters.")
        self._active = list(dict.fromkeys(names))
        for name in self._active:
            if inference_mode:
                self._inference.add(name)
            else:
                self._inference.discard(name)

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            raise ValueError(
                f"Adapter {adapter_name!r} not found; existing adapters: {list(self.adapters)}. Add or load it "
                "first (`add_adapter` / `load_adapter`)."
            )

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if adapter_name in self._merged:
            raise ValueError(f"Adapter {adapter_name} is merged into the base weights; call `unmerge_adapter()` first.")
        del self.adapters[adapter_name], self.peft_config[adapter_name], self._plans[adapter_name]
        self._inference.discard(adapter_name)
        self._allocators.pop(adapter_name, None)
        if adapter_name in self._active:
            remaining = [a for a in self._active if a != adapter_name] or sorted(self.adapters)[:1]
            if remaining:
                warnings.warn(f"Adapter {adapter_name} was active; active adapter is now {remaining}.", stacklevel=2)
            self._active = remaining

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block, calls run the base model alone (not read by already-jitted functions)."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, combination_type: str = "svd",
        **kwargs: Any,
    ) -> None:  # fmt: skip
        """Adds ``adapter_name``: ``adapters`` combined with ``weights``, as PEFT's method.

        For LoRA adapters ``combination_type`` is one of PEFT's: ``svd`` (with ``svd_rank``),
        ``linear``, ``cat``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``
        (these with ``density``) and their ``*_svd`` forms; DARE's random masks come from
        ``key=`` (a JAX PRNG key). See :func:`jpeft.tuners.lora_weighted.combine_adapters` for
        every option. The new adapter is frozen and not active.
        """
        if adapter_name in self.peft_config:
            return  # PEFT returns silently here too
        checkpoint.check_adapter_name(adapter_name)
        for name in adapters:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} does not exist; existing adapters: {sorted(self.peft_config)}.")
        if not adapters:
            raise ValueError("Found no adapter matching the names in []: pass the names of the adapters to combine.")
        method = self._method(adapters[0])
        if method.combine_adapters is None:
            raise TypeError(
                f"add_weighted_adapter combines LoRA adapters only; adapter {adapters[0]!r} is "
                f"{self.peft_config[adapters[0]].peft_type.value}."
            )
        views = [AdapterView(n, self.peft_config[n], self._plans[n], self.adapters[n]) for n in adapters]
        state, new_base = method.combine_adapters(
            views, list(weights), self._binding, self.base_params, combination_type=combination_type, **kwargs
        )
        if method.check_new_adapter is not None:
            method.check_new_adapter(state.config, list(self.peft_config.values()))
        self._store(adapter_name, state, new_base)

    # ------------------------------------------------------------------ trainable split

    def _is_trainable_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self._active and adapter_name not in self._inference

    def trainable_mask(self, params: Mapping[str, Any] | None = None) -> PyTree:
        """A boolean tree shaped like ``params``: ``True`` on the active adapter's leaves.

        Use it with ``optax.masked`` or ``optax.multi_transform``.
        """
        params = self.params if params is None else params

        def adapter_mask(name: str, tree: PyTree) -> PyTree:
            if not self._is_trainable_adapter(name):
                return jax.tree.map(lambda _: False, tree)
            method_mask = self._method(name).trainable_mask
            return method_mask(self._plans[name], tree) if method_mask else jax.tree.map(lambda _: True, tree)

        return {
            "base": jax.tree.map(lambda _: False, params["base"]),
            "adapters": {name: adapter_mask(name, tree) for name, tree in params["adapters"].items()},
        }

    def split_params(self, params: Mapping[str, Any] | None = None) -> tuple[PyTree, PyTree]:
        """``(trainable, frozen)`` trees with ``None`` holes; ``jpeft.combine`` joins them."""
        params = self.params if params is None else params
        return split(params, self.trainable_mask(params))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` counted as PEFT counts them."""
        buffers = self._binding.buffer_paths
        total = count_params(self.base_params) - sum(
            int(get_path(self.base_params, path).size) for path in buffers
        )
        trainable = 0
        masks = self.trainable_mask()["adapters"]
        for name, adapter in self.adapters.items():
            total += self._method(name).counted_in_total(self._plans[name], adapter)
            if self._is_trainable_adapter(name):
                leaves = zip(jax.tree.leaves(adapter), jax.tree.leaves(masks[name]), strict=True)
                trainable += sum(int(leaf.size) for leaf, on in leaves if on)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
