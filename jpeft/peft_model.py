"""``PeftModel``: a base model, its adapters, and PEFT's API over them.

State is three kinds of tree: the frozen base params, one adapter tree per adapter
name, and (outside, in the user's hands) optimizer state. ``params`` bundles the
first two as ``{"base": ..., "adapters": {name: ...}}``; ``apply`` is a pure function
of that bundle (or of a trainable part plus a frozen part), so it can be jitted,
differentiated and vmapped. The object itself only remembers which adapters exist
and which are active, as PEFT's ``PeftModel`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta as flax_meta

from jpeft.config import PEFT_FORMAT_VERSION, PeftConfig, TaskType
from jpeft.core import registry
from jpeft.core.modules import ModuleInfo
from jpeft.core.tree import PyTree, combine, count_params, get_path, set_path, split
from jpeft.errors import CheckpointError
from jpeft.interop import checkpoint, hub
from jpeft.quant.formats import is_quantized
from jpeft.quant.params import dequantize_params
from jpeft.tuners.base import PEFT_PREFIX, KeyEntry

_PIPELINE_TAGS = {
    TaskType.CAUSAL_LM: "text-generation",
    TaskType.SEQ_2_SEQ_LM: "text2text-generation",
    TaskType.SEQ_CLS: "text-classification",
    TaskType.TOKEN_CLS: "token-classification",
    TaskType.QUESTION_ANS: "question-answering",
    TaskType.FEATURE_EXTRACTION: "feature-extraction",
}


def bind(model: Any) -> Any:
    """Wraps a supported model in its binding.

    Accepts a transformers ``FlaxPreTrainedModel``, a ``(linen_module, params)`` pair,
    or a binding (e.g. :class:`jpeft.bindings.linen.LinenBinding`).
    """
    from jpeft.bindings.hf_flax import HFFlaxBinding, is_hf_flax_model
    from jpeft.bindings.linen import LinenBinding

    if hasattr(model, "run") and hasattr(model, "modules") and hasattr(model, "params"):
        return model
    if is_hf_flax_model(model):
        return HFFlaxBinding(model)
    if isinstance(model, tuple) and len(model) == 2:
        import flax.linen as nn

        if isinstance(model[0], nn.Module):
            return LinenBinding(model[0], model[1])
    raise TypeError(
        f"jpeft cannot adapt a {type(model).__name__}: pass a transformers Flax model (FlaxAutoModelFor...), "
        "a `(linen_module, params)` pair, or `jpeft.bindings.LinenBinding(module, params, example_args=...)`."
    )


def _read_adapter(
    model_id: str | os.PathLike,
    subfolder: str | None,
    config: PeftConfig | None,
    is_trainable: bool,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
) -> tuple[Any, PeftConfig, dict[str, np.ndarray]]:
    """``(folder, config, tensors)`` of an adapter folder or Hub repo; the config frozen unless trainable."""
    folder = hub.resolve_adapter_folder(
        model_id, subfolder, revision=revision, token=token, cache_dir=cache_dir
    )
    config = config if config is not None else registry.config_from_dict(checkpoint.read_config(folder))
    tensors = checkpoint.read_tensors(folder)
    return folder, dataclasses.replace(config, inference_mode=not is_trainable), tensors


def named_modules(model: Any) -> dict[str, ModuleInfo]:
    """The model's modules by name, with layer kind and shapes: torch's ``named_modules()`` for Flax.

    Use it to pick ``target_modules``: ``{n: m for n, m in jpeft.named_modules(model).items()
    if m.kind == "linear"}``.
    """
    if isinstance(model, PeftModel):
        return dict(model._binding.modules)
    return dict(bind(model).modules)


class PeftModel:
    """A Flax model with PEFT adapters. Build one with :func:`jpeft.get_peft_model`.

    Attributes:
      peft_config: ``{adapter name: config}`` as saved (targets resolved).
      active_adapter: the adapter trained and used (``active_adapters`` for all).
      base_model: the wrapped Flax model (transformers model or ``(module, params)``).
      params: ``{"base": base params, "adapters": {name: adapter tree}}``.
    """

    def __init__(
        self,
        model: Any,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        *,
        key: jax.Array | None = None,
    ):
        model_class = registry.model_class_for(peft_config.peft_type, PeftModel)
        if not isinstance(self, model_class):
            raise TypeError(
                f"{peft_config.peft_type.value} adapters need a {model_class.__name__}; build the model with "
                "`jpeft.get_peft_model(model, config)` or `jpeft.PeftModel.from_pretrained(model, folder)`."
            )
        self._binding = bind(model)
        self.base_params: PyTree = self._binding.params
        self.adapters: dict[str, PyTree] = {}
        self.peft_config: dict[str, PeftConfig] = {}
        self._plans: dict[str, Any] = {}
        self._active: list[str] = []
        self._disabled = False
        self._merged: dict[str, Any] = {}  # adapter name -> what unmerging it needs
        self._allocators: dict[str, Any] = {}  # AdaLoRA rank-allocator state per adapter
        # adapters frozen for inference (e.g. loaded with is_trainable=False)
        self._inference: set[str] = set()
        self.add_adapter(adapter_name, peft_config, key=key)
        self._active = [adapter_name]

    # ------------------------------------------------------------------ structure

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
        expected = jax.tree.structure(self.params)
        got = jax.tree.structure(dict(value))
        if got != expected:
            raise ValueError(
                "`params` must have the structure of `peft_model.params` ({'base': ..., 'adapters': {...}}); "
                "to update only the trained part use `peft_model.params = jpeft.combine(trainable, frozen)`."
            )
        self.base_params = value["base"]
        self.adapters = dict(value["adapters"])

    def _method(self, adapter_name: str) -> Any:
        return registry.method_for(self.peft_config[adapter_name].peft_type)

    def named_modules(self) -> dict[str, ModuleInfo]:
        return dict(self._binding.modules)

    def targeted_modules(self, adapter_name: str | None = None) -> list[str]:
        """Names of the modules the adapter changes."""
        return list(self._plans[adapter_name or self._active[0]].layers)

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, *, key: jax.Array | None = None
    ) -> None:
        """Adds a new adapter (not active, frozen), as PEFT's ``add_adapter``.

        Args:
          adapter_name: a plain folder-safe name (non-default adapters save in a
            subfolder of that name).
          peft_config: the adapter's config; same ``peft_type`` as existing adapters.
          key: PRNG key for the adapter's init (default ``jax.random.key(0)``).
        """
        checkpoint.check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise ValueError(
                f"adapter {adapter_name!r} already exists; pick another name or delete it first."
            )
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
        if getattr(peft_config, "bias", "none") != "none" and any(
            getattr(c, "bias", "none") != "none" for c in self.peft_config.values()
        ):
            raise ValueError(
                "LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' "
                "for all adapters."
            )
        method = registry.method_for(peft_config.peft_type)
        plan = method.prepare(peft_config, self._binding)
        key = jax.random.key(0) if key is None else key
        adapter, new_base = method.init_params(plan, self.base_params, key)
        config = plan.config
        if config.base_model_name_or_path is None and self._binding.name_or_path:
            config = dataclasses.replace(config, base_model_name_or_path=self._binding.name_or_path)
            plan = dataclasses.replace(plan, config=config)
        if new_base is not None:
            self.base_params = new_base
        self.adapters[adapter_name] = adapter
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
            prompt = [n for n in names if self.peft_config[n].is_prompt_learning]
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
            raise ValueError(
                f"Adapter {adapter_name} is merged into the base weights; call `unmerge_adapter()` first."
            )
        del self.adapters[adapter_name], self.peft_config[adapter_name], self._plans[adapter_name]
        self._inference.discard(adapter_name)
        if adapter_name in self._active:
            remaining = [a for a in self._active if a != adapter_name] or sorted(self.adapters)[:1]
            if remaining:
                warnings.warn(
                    f"Adapter {adapter_name} was active; active adapter is now {remaining}.", stacklevel=2
                )
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
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        density: float | None = None,
        majority_sign_method: str = "total",
        **kwargs: Any,
    ) -> None:
        """Adds ``adapter_name``: LoRA ``adapters`` combined with ``weights``, as PEFT's method.

        ``combination_type`` is one of PEFT's: ``svd`` (with ``svd_rank``), ``linear``, ``cat``,
        ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (these with ``density``)
        and their ``*_svd`` forms. DARE's random masks come from ``key=`` (a JAX PRNG key).
        The new adapter is frozen and not active. See
        :func:`jpeft.tuners.lora_weighted.add_weighted_adapter`.
        """
        from jpeft.tuners.lora_weighted import add_weighted_adapter

        add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            density=density,
            majority_sign_method=majority_sign_method,
            **kwargs,
        )

    # ------------------------------------------------------------------ trainable split

    def _is_trainable_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self._active and adapter_name not in self._inference

    def trainable_mask(self, params: Mapping[str, Any] | None = None) -> PyTree:
        """A boolean tree shaped like ``params``: ``True`` on the active adapter's leaves.

        Use it with ``optax.masked`` or ``optax.multi_transform``.
        """
        params = self.params if params is None else params

        def constant(tree: PyTree, value: bool) -> PyTree:
            return jax.tree.map(lambda _: value, tree)

        def adapter_mask(name: str, tree: PyTree) -> PyTree:
            if not self._is_trainable_adapter(name):
                return constant(tree, False)
            method_mask = getattr(self._method(name), "trainable_mask", None)
            return method_mask(self._plans[name], tree) if method_mask is not None else constant(tree, True)

        return {
            "base": constant(params["base"], False),
            "adapters": {name: adapter_mask(name, tree) for name, tree in params["adapters"].items()},
        }

    def split_params(self, params: Mapping[str, Any] | None = None) -> tuple[PyTree, PyTree]:
        """``(trainable, frozen)`` trees with ``None`` holes; ``jpeft.combine`` joins them."""
        params = self.params if params is None else params
        return split(params, self.trainable_mask(params))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` counted as PEFT counts them."""
        buffers = getattr(self._binding, "buffer_paths", frozenset())
        total = count_params(self.base_params) - sum(
            int(getattr(get_path(self.base_params, path), "size", 0)) for path in buffers
        )
        trainable = 0
        masks = self.trainable_mask()["adapters"]
        for name, adapter in self.adapters.items():
            method = self._method(name)
            total += method.counted_in_total(self._plans[name], adapter)
            if self._is_trainable_adapter(name):
                mask = masks[name]
                trainable += sum(
                    int(leaf.size)
                    for leaf, on in zip(jax.tree.leaves(adapter), jax.tree.leaves(mask), strict=True)
                    if on
                )
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------ forward

    def apply(
        self,
        params: Mapping[str, Any],
        *args: Any,
        frozen: Mapping[str, Any] | None = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
        active_adapters: Sequence[str] | None = None,
        adapter_names: Sequence[str] | jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        """Runs the model with adapters: a pure function of its arguments.

        Args:
          params: ``peft_model.params``, or the trainable part of a split when
            ``frozen`` holds the rest.
          *args, **kwargs: the base model's inputs (e.g. ``input_ids``,
            ``attention_mask``), passed through unchanged.
          frozen: the frozen part from ``split_params`` (``None`` holes elsewhere).
          train: training mode (dropout on); static under ``jit``.
          dropout_rng: key for the model's and the adapters' dropout.
          active_adapters: adapters to use (default: the active ones; ``[]``: base model).
          adapter_names: a mixed batch: one adapter name per example (``"__base__"``
            for none), as PEFT's ``adapter_names=``; or the int array
            ``peft_model.adapter_ids(names)`` (traced, so one compiled function serves
            every mix). Inference only.

        Returns:
          The base model's output (e.g. ``FlaxCausalLMOutput``).

        Example:
          >>> step = jax.jit(functools.partial(peft_model.apply, train=False))
          >>> logits = step(peft_model.params, input_ids).logits
        """
        if frozen is not None:
            params = combine(params, frozen)
        if adapter_names is not None:
            effective, hook, names = self._prepare_mixed_batch(params, adapter_names, train)
            return self._binding.run(effective, hook, names, args, kwargs, train=False, dropout_rng=None)
        effective, hook, names, base_rng = self._prepare(params, active_adapters, train, dropout_rng)
        return self._binding.run(effective, hook, names, args, kwargs, train=train, dropout_rng=base_rng)

    def loss_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The training batch as the loss sees it (prompt methods extend labels; others: unchanged)."""
        return batch

    # ------------------------------------------------------------------ mixed batches

    BASE_ADAPTER_NAME = "__base__"

    def _mixed_batch_adapters(self) -> list[str]:
        """The adapters a mixed batch may name, in id order (merged ones excluded)."""
        return [name for name in self.adapters if name not in self._merged]

    def adapter_ids(self, adapter_names: Sequence[str]) -> np.ndarray:
        """Per-example adapter ids for ``apply(..., adapter_names=ids)`` (``-1``: ``"__base__"``)."""
        order = self._mixed_batch_adapters()
        ids = []
        for name in adapter_names:
            if name == self.BASE_ADAPTER_NAME:
                ids.append(-1)
            elif name in order:
                ids.append(order.index(name))
            elif name in self._merged:
                raise ValueError(
                    f"adapter {name!r} is merged into the base weights; mixed batches need unmerged adapters "
                    "(call `unmerge_adapter()`)."
                )
            else:
                raise ValueError(
                    f"Trying to infer with non-existing adapter(s): {name!r}; existing adapters: "
                    f"{list(self.adapters)} (and '__base__' for the base model)."
                )
        return np.asarray(ids, np.int32)

    def _prepare_mixed_batch(
        self, params: Mapping[str, Any], adapter_names: Sequence[str] | jax.Array, train: bool
    ) -> tuple[PyTree, Any, frozenset[str]]:
        """The hook of a batch whose examples each use their own adapter (or none)."""
        if train:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode (train=True).")
        if self._merged:
            raise ValueError(
                f"Cannot pass `adapter_names` while adapters {list(self._merged)} are merged; call "
                "`unmerge_adapter()` first."
            )
        if isinstance(adapter_names, (list, tuple)):
            ids = jnp.asarray(self.adapter_ids(adapter_names))
        else:
            ids = jnp.asarray(adapter_names, jnp.int32)
        if ids.ndim != 1:
            raise ValueError(f"`adapter_names` must give one adapter per example, got shape {ids.shape}.")
        order = self._mixed_batch_adapters()
        for name in order:
            config = self.peft_config[name]
            if config.is_prompt_learning:
                raise ValueError(f"mixed batches are not supported for prompt-learning adapter {name!r}.")
            if getattr(config, "use_dora", False):
                raise ValueError(
                    f"Cannot pass `adapter_names` when DoRA is enabled (adapter {name!r}), as in PEFT."
                )
            adapter = params["adapters"][name]
            if adapter.get("bias"):
                raise ValueError(
                    f"adapter {name!r} trains biases (bias={config.bias!r}); mixed batches need adapters "
                    "whose biases are the base model's. Run it in its own batch (`active_adapters=[name]`)."
                )
            for module in adapter.get("modules_to_save", {}):
                if self._plans[name].modules[module].kind != "linear":
                    raise ValueError(
                        f"adapter {name!r} trains a copy of {module!r}, which is not a linear layer; mixed "
                        "batches take modules_to_save copies of linear layers (classification heads). Run "
                        "it in its own batch (`active_adapters=[name]`)."
                    )
        adapters = params["adapters"]
        plans = self._plans
        # modules_to_save copies (e.g. a classifier per adapter): each example uses its adapter's copy
        copies: dict[str, list[tuple[int, Any]]] = {}
        for i, name in enumerate(order):
            for module, subtree in adapters[name].get("modules_to_save", {}).items():
                copies.setdefault(module, []).append((i, subtree))
        names: frozenset[str] = frozenset().union(*(plans[n].hooked for n in order), copies)
        effective = params["base"]
        modules = self._binding.modules

        def hook(module: str, x: jax.Array, out: jax.Array) -> jax.Array:
            if out.shape[0] != ids.shape[0] and out.shape[0] % ids.shape[0] == 0:
                # beam search / num_return_sequences expand each example: repeat its id
                per_example = jnp.repeat(ids, out.shape[0] // ids.shape[0])
            elif out.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"`adapter_names` has {ids.shape[0]} entries but the batch has {out.shape[0]} examples; "
                    "pass one adapter name per example."
                )
            else:
                per_example = ids
            result = out
            for i, subtree in copies.get(module, ()):
                info = modules[module]
                kernel = flax_meta.unbox(subtree["kernel"]).astype(out.dtype)
                own = jnp.matmul(x.astype(out.dtype), kernel.T if info.kernel_transposed else kernel)
                if "bias" in subtree:
                    own = own + subtree["bias"].astype(out.dtype)
                chosen = (per_example == i).reshape((-1,) + (1,) * (out.ndim - 1))
                result = jnp.where(chosen, own, result)
            users = [(i, n) for i, n in enumerate(order) if module in plans[n].layers]
            by_method: dict[Any, list[tuple[int, str]]] = {}
            for i, n in users:
                by_method.setdefault(self._method(n), []).append((i, n))
            for method, group in by_method.items():
                batched = getattr(method, "mixed_batch_forward", None)
                if batched is not None:
                    layers = [(i, plans[n].layers[module], plans[n].config, adapters[n]) for i, n in group]
                    result = batched(
                        layers,
                        get_path(effective, plans[group[0][1]].layers[module].info.path),
                        x,
                        out,
                        result,
                        per_example,
                    )
                    continue
                for i, n in group:
                    layer = plans[n].layers[module]
                    own = method.layer_forward(
                        layer,
                        plans[n].config,
                        adapters[n],
                        flax_meta.unbox(get_path(effective, layer.info.path)),
                        x,
                        out,
                        train=False,
                        key=None,
                    )
                    chosen = (per_example == i).reshape((-1,) + (1,) * (out.ndim - 1))
                    result = jnp.where(chosen, own, result)
            return result

        return effective, hook, names

    def _prepare(
        self,
        params: Mapping[str, Any],
        active_adapters: Sequence[str] | None,
        train: bool,
        dropout_rng: jax.Array | None,
    ) -> tuple[PyTree, Any, frozenset[str], jax.Array | None]:
        """Effective base params, the layer hook and the hooked module names for one call."""
        if active_adapters is None:
            active_adapters = [] if self._disabled else self._active
        for name in active_adapters:
            if name not in self._plans:
                raise ValueError(f"unknown adapter {name!r}; adapters: {list(self._plans)}.")
        # adapters nest in the order they were added (the first is innermost), as PEFT's layers do
        active_adapters = [name for name in self._plans if name in active_adapters]
        # merged adapters are already in the base weights
        active_adapters = [name for name in active_adapters if name not in self._merged]
        base_rng = lora_rng = None
        if dropout_rng is not None:
            base_rng, lora_rng = jax.random.split(dropout_rng)
        adapters = params["adapters"]
        effective = params["base"]
        for name in active_adapters:
            effective = self._method(name).apply_overrides(effective, adapters[name], self._plans[name])
        names: frozenset[str] = frozenset().union(*(self._plans[n].hooked for n in active_adapters))
        plans = self._plans

        def hook(module: str, x: jax.Array, out: jax.Array) -> jax.Array:
            for name in active_adapters:
                layer = plans[name].layers.get(module)
                if layer is None:
                    continue
                key = None
                if lora_rng is not None:
                    key = jax.random.fold_in(
                        jax.random.fold_in(lora_rng, zlib.crc32(name.encode())), layer.index
                    )
                out = self._method(name).layer_forward(
                    layer,
                    plans[name].config,
                    adapters[name],
                    flax_meta.unbox(get_path(effective, layer.info.path)),
                    x,
                    out,
                    train=train,
                    key=key,
                )
            return out

        return effective, hook, names, base_rng

    def generate(
        self,
        *args: Any,
        params: Mapping[str, Any] | None = None,
        adapter_names: Sequence[str] | jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's ``generate`` with the active adapters in place (unmerged).

        Takes the arguments of transformers' Flax ``generate`` (``max_length``,
        ``do_sample``, ``prng_key``, ``num_beams``, ...). ``params`` defaults to
        ``self.params``. ``adapter_names`` (one per example, ``"__base__"`` for none)
        generates a mixed batch, each example with its own adapter.
        """
        params = self.params if params is None else params
        if adapter_names is not None:
            effective, hook, names = self._prepare_mixed_batch(params, adapter_names, False)
        else:
            effective, hook, names, _ = self._prepare(params, None, False, None)
        generate = getattr(self._binding, "generate", None)
        if generate is None:
            raise TypeError(
                f"{self._binding.class_name} has no `generate`: generation needs a transformers Flax model with a "
                "language-modelling head."
            )
        return generate(effective, hook, names, args, kwargs)

    def enable_gradient_checkpointing(self) -> None:
        """Rematerialise each repeated block (``model.layers.N``, ...) in the backward pass: less memory, more compute.

        Like :meth:`disable_adapter`, this is read when a function is traced: call it before
        jitting the train step (a function already compiled keeps what it was traced with).
        """
        self._binding.enable_gradient_checkpointing()

    def __repr__(self) -> str:
        lines = [f"PeftModel({self._binding.class_name}, active={self._active})"]
        for name, config in self.peft_config.items():
            layers = self._plans[name].layers
            lines.append(
                f"  {name}: {config.peft_type.value}, {len(layers)} modules ({', '.join(list(layers)[:3])}"
                f"{', ...' if len(layers) > 3 else ''})"
            )
        return "\n".join(lines)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply(self.params, *args, **kwargs)

    # ------------------------------------------------------------------ merge

    def get_merged_params(
        self,
        params: Mapping[str, Any] | None = None,
        adapter_names: Sequence[str] | None = None,
        *,
        dequantize: bool = False,
    ) -> PyTree:
        """Base params with the (active) adapters folded in: a pure function of ``params``.

        On a quantized base (:func:`jpeft.quantize_model`), each adapted kernel is
        dequantized, merged and quantized again with its own settings, as PEFT's
        bitsandbytes layers merge; the re-quantization rounds the merged weights. With
        ``dequantize=True`` every quantized kernel is decoded first and the result is a
        full-precision tree (no rounding beyond the original quantization).
        """
        params = self.params if params is None else params
        merged = dequantize_params(params["base"]) if dequantize else params["base"]
        names = list(adapter_names) if adapter_names is not None else self._active
        if self._merged:
            raise ValueError(
                f"adapters {list(self._merged)} are merged into the base already; call `unmerge_adapter()` first."
            )
        self._warn_if_tied_embedding(names)
        for name in names:
            merged, _ = self._merge_one(merged, name, params["adapters"][name])
        return merged

    def _merge_one(self, base: PyTree, name: str, adapter: PyTree) -> tuple[PyTree, Any]:
        """``(base with adapter ``name`` merged, merge record)``; quantized kernels are decoded and re-encoded."""
        method, plan = self._method(name), self._plans[name]
        quantized = _quantized_weights(base, plan)
        if quantized:
            warnings.warn(
                f"merging adapter {name!r} into {len(quantized)} quantized kernels: each is dequantized, merged "
                "and quantized again (as PEFT's bitsandbytes layers do), which rounds the merged weights; use "
                "`merge_and_unload(dequantize=True)` for a full-precision merged model.",
                stacklevel=3,
            )
        records = []

        def merge(dense: PyTree) -> PyTree:
            records.append(method.merge_record(dense, adapter, plan))
            return method.merge(dense, adapter, plan)

        return _on_decoded_kernels(base, plan, merge), records[0]

    def _warn_if_tied_embedding(self, names: Sequence[str]) -> None:
        tied = getattr(self._binding, "tied_embedding_names", frozenset())
        if any(layer_name in tied for n in names for layer_name in self._plans[n].layers):
            warnings.warn(
                "Merging an adapted input embedding of a model with tied word embeddings also changes its output "
                "head (they share one weight), as in PEFT; the merged model's logits differ from the unmerged ones.",
                stacklevel=3,
            )

    def update_and_allocate(self, global_step: int, grads: Mapping[str, Any]) -> None:
        """AdaLoRA's rank allocation for the active adapter (PEFT's ``base_model.update_and_allocate``).

        Call it after each optimizer step with that step's gradients: a tree shaped like
        ``peft_model.params`` (or its trainable part), or like the adapter itself. It updates
        the importance scores, masks ``lora_E`` to the step's budget, and at
        ``total_step - tfinal`` records the final ``rank_pattern`` and prunes the adapter to it
        (outputs unchanged: pruned triplets are already zero). Jitted loops use the pure
        ``jpeft.tuners.adalora.update_and_allocate`` instead.
        """
        name = self._active[0]
        method = self._method(name)
        allocate = getattr(method, "update_and_allocate", None)
        if allocate is None:
            raise TypeError(
                f"update_and_allocate is AdaLoRA's; adapter {name!r} is {self.peft_config[name].peft_type}."
            )
        if isinstance(grads, Mapping) and "adapters" in grads:
            grads = grads["adapters"][name]
        plan = self._plans[name]
        state = self._allocators.get(name) or method.allocator_init(plan, self.adapters[name])
        state, self.adapters[name] = allocate(state, self.adapters[name], grads, int(global_step), plan)
        self._allocators[name] = state
        if int(global_step) == plan.config.total_step - plan.config.tfinal:
            method.set_rank_pattern(self, state["rank_pattern"], name)
            self._allocators.pop(name)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Folds the (active) adapters into the base weights in place; calls then skip their layers.

        Faster inference with the adapter still attached; :meth:`unmerge_adapter` undoes it.
        """
        names = [
            n for n in (adapter_names if adapter_names is not None else self._active) if n not in self._merged
        ]
        self._warn_if_tied_embedding(names)
        for name in names:
            self.base_params, self._merged[name] = self._merge_one(
                self.base_params, name, self.adapters[name]
            )

    def unmerge_adapter(self) -> None:
        """Takes every merged adapter back out of the base weights (in reverse merge order)."""
        for name in reversed(list(self._merged)):
            record = self._merged.pop(name)
            method, plan = self._method(name), self._plans[name]
            # lossy on a quantized base, as PEFT's bitsandbytes unmerge
            self.base_params = _on_decoded_kernels(
                self.base_params, plan, method.unmerge, self.adapters[name], plan, record
            )

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    def merge_and_unload(
        self, adapter_names: Sequence[str] | None = None, *, dequantize: bool = False
    ) -> Any:
        """The base model with the adapters merged into its weights (a plain Flax model).

        On a quantized base the merged kernels are quantized again (rounding them, as PEFT
        does with bitsandbytes); ``dequantize=True`` returns a full-precision model instead.
        """
        return self._binding.with_params(
            self.get_merged_params(adapter_names=adapter_names, dequantize=dequantize)
        )

    def save_base_model(self, save_directory: str | os.PathLike) -> None:
        """Writes the base model as a transformers *torch* checkpoint (``config.json`` + ``model.safetensors``).

        The weights are this model's base params: LoftQ's quantized ``Q``, PiSSA/OLoRA residuals,
        quantized kernels decoded to their original dtype. With the adapter folder from
        :meth:`save_pretrained`, a torch user reproduces jpeft's outputs:
        ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)``.
        Requires a transformers Flax model; the folder is replaced atomically.
        """
        from jpeft.interop.torch_export import save_torch_checkpoint

        if not hasattr(self._binding, "torch_class_name"):
            raise TypeError(
                f"{self._binding.class_name} is not a transformers model; it has no torch checkpoint."
            )
        save_torch_checkpoint(self._binding.model, save_directory, params=dequantize_params(self.base_params))

    def unload(self) -> Any:
        """The base model without adapters (PiSSA/OLoRA bases keep their residual weights, as in PEFT)."""
        return self._binding.with_params(self.base_params)

    # ------------------------------------------------------------------ checkpoints

    def _entries(self, adapter_name: str, save_embedding_layers: bool | str = "auto") -> list[KeyEntry]:
        method = self._method(adapter_name)
        return method.key_entries(
            self._plans[adapter_name], self.adapters[adapter_name], save_embedding_layers
        )

    def get_peft_state_dict(
        self, adapter_name: str = "default", save_embedding_layers: bool | str = "auto"
    ) -> dict[str, np.ndarray]:
        """PEFT's ``get_peft_model_state_dict``: torch-layout arrays under PEFT's keys."""
        trees = {"adapter": self.adapters[adapter_name], "base": self.base_params}
        entries = self._entries(adapter_name, save_embedding_layers)
        if save_embedding_layers == "auto" and any(e.tree == "base" and e.load for e in entries):
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                stacklevel=3,
            )
        out: dict[str, np.ndarray] = {}
        for entry in entries:
            value = np.asarray(jax.device_get(get_path(trees[entry.tree], entry.path)))
            if (
                entry.tree == "adapter"
                and value.dtype != np.float32
                and jnp.issubdtype(value.dtype, jnp.floating)
            ):
                value = value.astype(np.float32)  # PEFT stores adapter weights in fp32 by default
            out[entry.file_key] = entry.to_torch(value)
        return out

    def _config_for_save(self, adapter_name: str) -> PeftConfig:
        config = self.peft_config[adapter_name]
        changes: dict[str, Any] = {"inference_mode": True}
        if getattr(config, "init_lora_weights", None) == "loftq":
            # PEFT's LoftQ workflow: the saved adapter must not re-run LoftQ when loaded; its base is the
            # LoftQ-replaced one (`save_base_model`).
            changes.update(init_lora_weights=True, loftq_config={})
        if config.task_type is None and getattr(self._binding, "torch_class_name", None):
            changes["auto_mapping"] = {
                "base_model_class": self._binding.torch_class_name,
                "parent_library": self._binding.torch_module_path,
            }
        return dataclasses.replace(config, **changes)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: Sequence[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        save_embedding_layers: bool | str = "auto",
    ) -> None:
        """Saves adapters in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``).

        The ``default`` adapter goes to ``save_directory``, others to subfolders named
        after them. All files of one call are written atomically.
        """
        if not safe_serialization:
            raise ValueError(
                "jpeft writes only safetensors (`safe_serialization=True`); PEFT's pickle format "
                "(adapter_model.bin) is unsafe to load and is not written."
            )
        if not is_main_process:
            return
        checkpoint.write_files(save_directory, self._files(selected_adapters, save_embedding_layers))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        selected_adapters: Sequence[str] | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload adapter (jpeft)",
        revision: str | None = None,
        create_pr: bool = False,
        save_embedding_layers: bool | str = "auto",
    ) -> str:
        """Uploads the adapter folder (exactly what ``save_pretrained`` writes) to a Hub model repo.

        Returns the commit URL. Authentication and endpoint follow ``huggingface_hub``
        (``token=``, ``HF_TOKEN``, ``HF_ENDPOINT``).
        """
        from jpeft.interop import hub

        files = self._files(selected_adapters, save_embedding_layers)
        return hub.push_files(
            repo_id,
            files,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )

    def _files(
        self, selected_adapters: Sequence[str] | None, save_embedding_layers: bool | str
    ) -> dict[str, bytes]:
        """Every file of a save folder, by relative path."""
        names = list(self.adapters) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(
                f"You passed an invalid `selected_adapters` arguments, current supported adapter names are "
                f"{list(self.adapters)} - got {unknown}."
            )
        files: dict[str, bytes] = {}
        for name in names:
            config = self._config_for_save(name)
            tensors = self.get_peft_state_dict(name, save_embedding_layers)
            files.update(checkpoint.adapter_files(name, config.to_json_string(), tensors))
        first = self.peft_config[names[0]] if names else None
        base_name = first.base_model_name_or_path if first else None
        tags = [first.peft_type.value.lower()] if first else []
        tags += ["transformers", "jpeft"] + ([f"base_model:adapter:{base_name}"] if base_name else [])
        files[checkpoint.MODEL_CARD_NAME] = checkpoint.model_card(
            base_model=base_name,
            tags=tags,
            pipeline_tag=_PIPELINE_TAGS.get(first.task_type) if first else None,
            peft_version=PEFT_FORMAT_VERSION,
        )
        return files

    @classmethod
    def from_pretrained(
        cls,
        model: Any,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        *,
        subfolder: str | None = None,
        key: jax.Array | None = None,
        ignore_mismatched_sizes: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> PeftModel:
        """Loads an adapter folder written by jpeft or by torch PEFT onto ``model``.

        Args:
          model: the base model (transformers Flax model or ``(module, params)``).
          model_id: the adapter folder, or a Hub repo id (downloaded through
            ``huggingface_hub``: cached, ``HF_HUB_OFFLINE`` honoured; ``revision``,
            ``token``, ``cache_dir`` passed on).
          adapter_name: the name to give it.
          is_trainable: ``False`` (default) loads it frozen, as PEFT does.
          config: use this config instead of the folder's ``adapter_config.json``.
          subfolder: the adapter's subfolder, for non-default adapters.
          key: PRNG key for inits that run before the weights are copied in.
          ignore_mismatched_sizes: skip (with a warning) tensors whose shape differs.
        """
        folder, config, tensors = _read_adapter(
            model_id, subfolder, config, is_trainable, revision, token, cache_dir
        )
        if cls is PeftModel:
            cls = registry.model_class_for(config.peft_type, PeftModel)
        cls._check_loadable(config, is_trainable)
        peft_model = cls(model, config, adapter_name, key=key)
        peft_model._load_weights(adapter_name, tensors, str(folder), ignore_mismatched_sizes)
        return peft_model

    @classmethod
    def _check_loadable(cls, config: PeftConfig, is_trainable: bool) -> None:
        """Refuses, before any work, an adapter this class cannot load as asked."""

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        *,
        subfolder: str | None = None,
        key: jax.Array | None = None,
        ignore_mismatched_sizes: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        """Loads another adapter folder under ``adapter_name`` (not made active)."""
        folder, config, tensors = _read_adapter(
            model_id, subfolder, None, is_trainable, revision, token, cache_dir
        )
        self.add_adapter(adapter_name, config, key=key)
        try:
            self._load_weights(adapter_name, tensors, str(folder), ignore_mismatched_sizes)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def _load_weights(
        self, adapter_name: str, tensors: Mapping[str, np.ndarray], source: str, ignore_mismatched_sizes: bool
    ) -> None:
        entries = self._entries(adapter_name, save_embedding_layers=True)
        trees = {"adapter": self.adapters[adapter_name], "base": self.base_params}
        required = {e.file_key for e in entries if e.tree == "adapter" and e.load}
        expected = {e.file_key for e in entries}
        missing, mismatched, skipped = [], [], []
        for entry in (e for e in entries if e.load):
            file_key = entry.file_key
            if file_key not in tensors:
                if file_key in required:
                    missing.append(file_key)
                continue
            current = get_path(trees[entry.tree], entry.path)
            want = entry.torch_shape(current.shape)
            got = tuple(tensors[file_key].shape)
            if got != want:
                if ignore_mismatched_sizes:
                    skipped.append(f"{file_key}: found shape {got} in the checkpoint and {want} in the model")
                    continue
                mismatched.append(f"{file_key}: checkpoint {got} vs model {want}")
                continue
            value = jnp.asarray(entry.from_torch(tensors[file_key]), dtype=current.dtype)
            trees[entry.tree] = set_path(trees[entry.tree], entry.path, value)
        if mismatched:
            raise CheckpointError(
                f"size mismatch loading {source!r} into adapter {adapter_name!r} (torch layout, (out, in)):\n  "
                + "\n  ".join(mismatched)
                + "\nThe adapter was trained with another rank or on another model; load it onto the base model "
                "it was trained for, or pass `ignore_mismatched_sizes=True` to skip these tensors."
            )
        if missing:
            unprefixed = [k for k in tensors if not k.startswith(PEFT_PREFIX)]
            hint = (
                f" The file's keys lack the {PEFT_PREFIX!r} prefix PEFT requires (e.g. {unprefixed[0]!r})."
                if unprefixed
                else ""
            )
            raise CheckpointError(
                f"Found missing adapter keys while loading the checkpoint {source!r}: {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}.{hint} The folder does not hold this adapter's weights "
                "(wrong base model, or a different adapter_config.json)."
            )
        if skipped:
            warnings.warn(
                "Some weights were not loaded (ignore_mismatched_sizes=True):\n" + "\n".join(skipped),
                stacklevel=3,
            )
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            warnings.warn(
                f"Unexpected keys in {source!r} were ignored: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}",
                stacklevel=3,
            )
        self.adapters[adapter_name] = trees["adapter"]
        self.base_params = trees["base"]


def _quantized_weights(base: PyTree, plan: Any) -> dict[Any, Any]:
    """``{weight path: QuantizedArray}`` for the quantized kernels of the layers ``plan`` adapts."""
    out = {}
    for layer in getattr(plan, "layers", {}).values():
        info = getattr(layer, "info", None)
        if info is None or info.weight_name is None:
            continue
        leaf = get_path(base, info.weight_path)
        if is_quantized(leaf):
            out[info.weight_path] = leaf
    return out


def _on_decoded_kernels(base: PyTree, plan: Any, change: Any, *args: Any) -> PyTree:
    """``change(base, *args)`` with the plan's quantized kernels decoded before and quantized again after."""
    quantized = _quantized_weights(base, plan)
    for path, q in quantized.items():
        base = set_path(base, path, q.dequantize(q.dtype))
    base = change(base, *args)
    for path, q in quantized.items():
        base = set_path(base, path, q.replace_boxed(get_path(base, path)))
    return base


# PEFT's PeftMixedModel takes LoRA-family methods; jpeft also mixes IA3 and VeRA (see PeftMixedModel).
_MIXABLE_TYPES = frozenset({"LORA", "ADALORA", "IA3", "VERA"})


class PeftMixedModel(PeftModel):
    """Adapters of different methods (e.g. LoRA and AdaLoRA, LoRA and IA3) in one model, active together.

    PEFT's ``PeftMixedModel``; build it with ``jpeft.get_peft_model(model, config, mixed=True)``
    and add adapters with :meth:`add_adapter` / :meth:`load_adapter`. "Mixed" means mixed
    *methods*, not mixed precision (that is ``precision=`` of :func:`jpeft.train.make_train_step`).

    As in PEFT, adapters on the same layer nest in the order they were added: the first
    added is innermost, each later one wraps it. For LoRA-family adapters this is a sum;
    an IA3 vector on a layer's *output* scales everything inside it. torch PEFT's mixed
    model accepts LoRA, LoHa, LoKr, AdaLoRA and OFT; jpeft mixes LoRA, AdaLoRA, IA3 and
    VeRA, so a LoRA + IA3 mix runs in jpeft only (each adapter still saves in PEFT's
    format and loads in torch PEFT on its own). Saving writes each adapter in PEFT's
    layout (non-default adapters in subfolders).
    """

    def __init__(self, model: Any, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any):
        _check_mixable(peft_config)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def _mixes(self, a: PeftConfig, b: PeftConfig) -> bool:
        _check_mixable(b)
        return True

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        ordered = [n for n in self.adapters if n in names]
        # IA3 on a feed-forward layer rescales the layer's input and recomputes its output, so it can only
        # be the innermost adapter of that layer.
        for position, name in enumerate(ordered):
            config = self.peft_config[name]
            if config.peft_type.value != "IA3":
                continue
            for module, layer in self._plans[name].layers.items():
                inner = [n for n in ordered[:position] if module in self._plans[n].layers]
                if getattr(layer, "is_feedforward", False) and inner:
                    raise ValueError(
                        f"IA3 adapter {name!r} scales the input of feed-forward layer {module!r}, which adapters "
                        f"{inner} (added earlier) also change; add the IA3 adapter first, or do not target "
                        f"{module!r} with both."
                    )
        super().set_adapter(adapter_name, inference_mode)


def _check_mixable(config: PeftConfig) -> None:
    if config.peft_type.value not in _MIXABLE_TYPES:
        raise ValueError(
            f"Adapter of type {config.peft_type.value} is not supported for mixed models; mixed models take "
            f"{sorted(_MIXABLE_TYPES)} adapters."
        )
