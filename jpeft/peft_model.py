"""``PeftModel``: a base model, its adapters, and PEFT's API over them.

State is three kinds of tree: the frozen base params, one adapter tree per adapter
name, and (outside, in the user's hands) optimizer state; which adapters exist, which
are active and which leaves train is :class:`jpeft.adapter_model.AdapterModel`'s half. ``params`` bundles the
first two as ``{"base": ..., "adapters": {name: ...}}``; ``apply`` is a pure function
of that bundle (or of a trainable part plus a frozen part), so it can be jitted,
differentiated and vmapped. The object itself only remembers which adapters exist
and which are active, as PEFT's ``PeftModel`` does.

This class is the user-facing layer: what it runs lives below it, as pure functions of
(plans, adapters, active adapters): :mod:`jpeft.runtime.forward` and
:mod:`~jpeft.runtime.mixed_batch` build a call's layer hook, :mod:`~jpeft.runtime.merging`
folds adapters into the base, :mod:`jpeft.interop.peft_format` is PEFT's file layout. Each
method's own behaviour comes from its :class:`~jpeft.core.method.Method` record.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import numpy as np

from jpeft.adapter_model import AdapterModel, model_class_for
from jpeft.bindings import bind
from jpeft.config import PeftConfig
from jpeft.core import registry
from jpeft.core.method import KeyEntry, Kind
from jpeft.core.modules import ModuleInfo
from jpeft.core.tree import PyTree, combine
from jpeft.interop import checkpoint, hub, peft_format
from jpeft.quant.formats import is_quantized
from jpeft.quant.params import dequantize_params
from jpeft.runtime import forward, merging, mixed_batch

TRAINABLE_REFUSAL = peft_format.TRAINABLE_REFUSAL


def named_modules(model: Any) -> dict[str, ModuleInfo]:
    """The model's modules by name, with layer kind and shapes: torch's ``named_modules()`` for Flax.

    Use it to pick ``target_modules``: ``{n: m for n, m in jpeft.named_modules(model).items()
    if m.kind == "linear"}``.
    """
    if isinstance(model, AdapterModel):
        return model.named_modules()
    return dict(bind(model).modules)


class PeftModel(AdapterModel):
    """A Flax model with PEFT adapters. Build one with :func:`jpeft.get_peft_model`.

    Attributes:
      peft_config: ``{adapter name: config}`` as saved (targets resolved).
      active_adapter: the adapter trained and used (``active_adapters`` for all).
      base_model: the wrapped Flax model (transformers model or ``(module, params)``).
      params: ``{"base": base params, "adapters": {name: adapter tree}}``.
    """

    kinds: ClassVar[frozenset[Kind]] = frozenset({"layer"})
    BASE_ADAPTER_NAME = mixed_batch.BASE_ADAPTER_NAME

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
            call = self._mixed_batch_call(params, adapter_names, train)
            train, dropout_rng = False, None
        else:
            call = self._call(params, active_adapters, train, dropout_rng)
            dropout_rng = call.dropout_rng
        stacked = {"carry": call.carry} if call.carry else {}  # only bindings with stacked modules take it
        return self._binding.run(
            call.params, call.hook, call.names, args, kwargs, train=train, dropout_rng=dropout_rng, **stacked
        )

    def _call(
        self, params: Mapping[str, Any], active: Sequence[str] | None, train: bool, dropout_rng: jax.Array | None
    ) -> forward.Call:
        if active is None:
            active = [] if self._disabled else self._active
        # merged adapters are already in the base weights
        names = [n for n in forward.active_in_order(self._plans, active) if n not in self._merged]
        return forward.prepare(self._plans, params, names, train=train, dropout_rng=dropout_rng)

    def loss_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The training batch as the loss sees it (prompt methods extend labels; others: unchanged)."""
        return batch

    def _mixed_batch_adapters(self) -> list[str]:
        """The adapters a mixed batch may name, in id order (merged ones excluded)."""
        return [name for name in self.adapters if name not in self._merged]

    def adapter_ids(self, adapter_names: Sequence[str]) -> np.ndarray:
        """Per-example adapter ids for ``apply(..., adapter_names=ids)`` (``-1``: ``"__base__"``)."""
        return mixed_batch.adapter_ids(adapter_names, self._mixed_batch_adapters(), list(self._merged), list(self.adapters))

    def _mixed_batch_call(
        self, params: Mapping[str, Any], adapter_names: Sequence[str] | jax.Array, train: bool
    ) -> forward.Call:
        if train:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode (train=True).")
        if self._merged:
            raise ValueError(
                f"Cannot pass `adapter_names` while adapters {list(self._merged)} are merged; call "
                "`unmerge_adapter()` first."
            )
        ids = self.adapter_ids(adapter_names) if isinstance(adapter_names, (list, tuple)) else adapter_names
        order = self._mixed_batch_adapters()
        mixed_batch.check_adapters(self._plans, params["adapters"], order)
        return mixed_batch.prepare(self._plans, params, order, ids, self._binding.modules)  # type: ignore[arg-type]

    def generate(
        self,
        *args: Any,
        params: Mapping[str, Any] | None = None,
        adapter_names: Sequence[str] | jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's ``generate`` with the active adapters in place (unmerged).

        Takes the arguments of the model's ``generate``: transformers' Flax ``generate``
        (``max_length``, ``do_sample``, ``prng_key``, ``num_beams``, ...) or, for jpeft's own
        families, :func:`jpeft.runtime.generation.generate`'s (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``key``). ``params`` defaults to
        ``self.params``. ``adapter_names`` (one per example, ``"__base__"`` for none)
        generates a mixed batch, each example with its own adapter.
        """
        params = self.params if params is None else params
        if adapter_names is not None:
            call = self._mixed_batch_call(params, adapter_names, False)
        else:
            call = self._call(params, None, False, None)
        stacked = {"carry": call.carry} if call.carry else {}  # only bindings with stacked modules take it
        return self._binding.generate(call.params, call.hook, call.names, args, kwargs, **stacked)

    def enable_gradient_checkpointing(self) -> None:
        """Rematerialise each repeated block (``model.layers.N``, ...) in the backward pass: less memory, more compute.

        Like :meth:`disable_adapter`, this is read when a function is traced: call it before
        jitting the train step (a function already compiled keeps what it was traced with).
        """
        self._binding.enable_gradient_checkpointing()

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self._binding.class_name}, active={self._active})"]
        for name, config in self.peft_config.items():
            layers = self._plans[name].layers
            lines.append(
                f"  {name}: {config.peft_type.value}, {len(layers)} modules ({', '.join(list(layers)[:3])}"
                f"{', ...' if len(layers) > 3 else ''})"
            )
        return "\n".join(lines)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply(self.params, *args, **kwargs)

    # ------------------------------------------------------------------ NNX

    def module(self, *, rngs: Any = None) -> Any:
        """This model as an ``nnx.Module`` (:class:`jpeft.nnx_module.PeftModule`), for training the NNX way.

        Its trainable adapter leaves are ``nnx.LoRAParam``, so ``nnx.Optimizer(module, tx,
        wrt=nnx.LoRAParam)`` trains the adapters only; calling it computes what ``apply`` does.
        ``rngs`` (e.g. ``nnx.Rngs(dropout=0)``) feeds dropout after ``module.train()``. Bring the
        trained adapters back with :meth:`update_from_module` (or ``module.save_pretrained``).
        Only for NNX base models.
        """
        from jpeft.bindings.nnx import NNXBinding
        from jpeft.nnx_module import PeftModule

        if not isinstance(self._binding, NNXBinding):
            raise TypeError(
                f"module() gives an nnx.Module, but this PeftModel wraps a {self._binding.class_name}, not an "
                "nnx.Module: train it with `apply`/`jpeft.make_train_step` instead."
            )
        if any(is_quantized(leaf) for leaf in jax.tree.leaves(self.base_params, is_leaf=is_quantized)):
            raise ValueError(
                "module() would decode this quantized base into full precision; train a quantized NNX base "
                "with `apply`/`jpeft.make_train_step`, which decode one layer at a time."
            )
        return PeftModule(self, rngs=rngs)

    def update_from_module(self, module: Any) -> None:
        """Copies the adapters of ``module`` (from :meth:`module`, trained the NNX way) into this model."""
        from jpeft.nnx_module import PeftModule

        if not isinstance(module, PeftModule) or module.peft_model is not self:
            raise TypeError("update_from_module takes the module this PeftModel's `module()` returned.")
        trained = module.peft_params()["adapters"]

        def fill(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, Any]:
            # an empty subtree (no modules_to_save) has no variables in the module: keep ours
            return {
                key: fill(value, theirs.get(key, {})) if isinstance(value, Mapping) else theirs[key]
                for key, value in mine.items()
            }

        params = self.params
        params["adapters"] = fill(params["adapters"], trained)
        self.params = params

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
        names = list(adapter_names) if adapter_names is not None else self._active
        if self._merged:
            raise ValueError(
                f"adapters {list(self._merged)} are merged into the base already; call `unmerge_adapter()` first."
            )
        merged = dequantize_params(params["base"]) if dequantize else params["base"]
        merging.warn_if_tied_embedding(self._plans, names, self._binding.tied_embedding_names)
        for name in names:
            merged, _ = merging.merge_one(merged, name, self._plans[name], params["adapters"][name])
        return merged

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Folds the (active) adapters into the base weights in place; calls then skip their layers.

        Faster inference with the adapter still attached; :meth:`unmerge_adapter` undoes it.
        """
        requested = adapter_names if adapter_names is not None else self._active
        names = [n for n in requested if n not in self._merged]
        merging.warn_if_tied_embedding(self._plans, names, self._binding.tied_embedding_names)
        for name in names:
            self.base_params, self._merged[name] = merging.merge_one(
                self.base_params, name, self._plans[name], self.adapters[name]
            )

    def unmerge_adapter(self) -> None:
        """Takes every merged adapter back out of the base weights (in reverse merge order)."""
        for plan in self._plans.values():
            merging.mergeable(plan)  # adapters that cannot be merged (prompt learning) cannot be unmerged either
        for name in reversed(list(self._merged)):
            record = self._merged.pop(name)
            self.base_params = merging.unmerge_one(self.base_params, self._plans[name], self.adapters[name], record)

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None, *, dequantize: bool = False) -> Any:
        """The base model with the adapters merged into its weights (a plain Flax model).

        On a quantized base the merged kernels are quantized again (rounding them, as PEFT
        does with bitsandbytes); ``dequantize=True`` returns a full-precision model instead.
        """
        merged = self.get_merged_params(adapter_names=adapter_names, dequantize=dequantize)
        return self._binding.with_params(merged)

    def save_base_model(self, save_directory: str | os.PathLike) -> None:
        """Writes the base model as a transformers *torch* checkpoint (``config.json`` + ``model.safetensors``).

        The weights are this model's base params: LoftQ's quantized ``Q``, PiSSA/OLoRA residuals,
        quantized kernels decoded to their original dtype. With the adapter folder from
        :meth:`save_pretrained`, a torch user reproduces jpeft's outputs:
        ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)``.
        Requires a transformers Flax model; the folder is replaced atomically.
        """
        from jpeft.interop.torch_export import save_torch_checkpoint

        if self._binding.torch_class_name is None:
            raise TypeError(f"{self._binding.class_name} is not a transformers model; it has no torch checkpoint.")
        save_torch_checkpoint(self._binding.model, save_directory, params=dequantize_params(self.base_params))

    def unload(self) -> Any:
        """The base model without adapters (PiSSA/OLoRA bases keep their residual weights, as in PEFT)."""
        return self._binding.with_params(self.base_params)

    # ------------------------------------------------------------------ rank allocation

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
        method, plan = self._method(name), self._plans[name]
        if method.update_and_allocate is None or method.allocator_init is None:
            raise TypeError(
                f"update_and_allocate allocates ranks, which adapter {name!r} "
                f"({self.peft_config[name].peft_type.value}) does not do."
            )
        if isinstance(grads, Mapping) and "adapters" in grads:
            grads = grads["adapters"][name]
        state = self._allocators.get(name) or method.allocator_init(plan, self.adapters[name])
        state, adapter = method.update_and_allocate(state, self.adapters[name], grads, int(global_step), plan)
        self.adapters[name] = adapter
        self._allocators[name] = state
        assert method.finalize_allocation is not None  # registered together
        final = method.finalize_allocation(state, int(global_step), plan, adapter, self._binding)
        if final is not None:
            self._store(name, final)
            self._allocators.pop(name)

    def resize_modules_by_rank_pattern(self, rank_pattern: Mapping[str, list], adapter_name: str = "default") -> None:
        """Prunes the adapter to ``rank_pattern`` and records it in its config (PEFT's AdaLoRA method)."""
        self._check_known(adapter_name)
        method = self._method(adapter_name)
        if method.with_rank_pattern is None:
            raise TypeError(f"adapter {adapter_name!r} has no rank pattern to resize by.")
        state = method.with_rank_pattern(
            self._plans[adapter_name], self.adapters[adapter_name], rank_pattern, self._binding
        )
        self._store(adapter_name, state)

    # ------------------------------------------------------------------ checkpoints

    def _entries(self, adapter_name: str, save_embedding_layers: bool | str = "auto") -> list[KeyEntry]:
        method = self._method(adapter_name)
        return method.key_entries(self._plans[adapter_name], self.adapters[adapter_name], save_embedding_layers)

    def get_peft_state_dict(
        self, adapter_name: str = "default", save_embedding_layers: bool | str = "auto"
    ) -> dict[str, np.ndarray]:
        """PEFT's ``get_peft_model_state_dict``: torch-layout arrays under PEFT's keys."""
        return peft_format.adapter_state_dict(
            self._method(adapter_name),
            self._plans[adapter_name],
            {"adapter": self.adapters[adapter_name], "base": self.base_params},
            save_embedding_layers,
        )

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
        files = self._files(selected_adapters, save_embedding_layers)
        return hub.push_files(
            repo_id, files, private=private, token=token, commit_message=commit_message, revision=revision,
            create_pr=create_pr,
        )  # fmt: skip

    def _files(self, selected_adapters: Sequence[str] | None, save_embedding_layers: bool | str) -> dict[str, bytes]:
        """Every file of a save folder, by relative path."""
        names = list(self.adapters) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(
                f"You passed an invalid `selected_adapters` arguments, current supported adapter names are "
                f"{list(self.adapters)} - got {unknown}."
            )
        saved = [
            (n, peft_format.saved_config(self.peft_config[n], self._method(n), self._binding)) for n in names
        ]
        return peft_format.folder_files(
            [(n, config, self.get_peft_state_dict(n, save_embedding_layers)) for n, config in saved]
        )

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
          is_trainable: ``False`` (default) loads it frozen, as PEFT does (prompt-learning
            adapters cannot be loaded trainable, as in PEFT).
          config: use this config instead of the folder's ``adapter_config.json``.
          subfolder: the adapter's subfolder, for non-default adapters.
          key: PRNG key for inits that run before the weights are copied in.
          ignore_mismatched_sizes: skip (with a warning) tensors whose shape differs.
        """
        folder, config, tensors = peft_format.read_adapter(
            model_id, subfolder, config, is_trainable, revision=revision, token=token, cache_dir=cache_dir
        )
        if cls is PeftModel:
            cls = model_class_for(registry.kind_of(config.peft_type))  # type: ignore[assignment]
        peft_model = cls(model, config, adapter_name, key=key)
        peft_model._load_weights(adapter_name, tensors, str(folder), ignore_mismatched_sizes)
        return peft_model

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
        folder, config, tensors = peft_format.read_adapter(
            model_id, subfolder, None, is_trainable, revision=revision, token=token, cache_dir=cache_dir
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
        trees = peft_format.load_state(
            self._entries(adapter_name, save_embedding_layers=True),
            {"adapter": self.adapters[adapter_name], "base": self.base_params},
            tensors,
            source=source,
            adapter_name=adapter_name,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
        )
        self.adapters[adapter_name] = trees["adapter"]
        self.base_params = trees["base"]


