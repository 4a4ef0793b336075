"""``PromptLearningPeftModel``: a ``PeftModel`` whose adapters change the model's inputs.

Prompt tuning, P-tuning and prefix tuning hook no layer: they put virtual tokens in
front of the input (or key/value prefixes in front of each layer's cache). This class
is generic over them; each method module supplies the protocol functions
(``prepare``, ``init_params``, ``prompt_embeddings``, ``run``, ``generate``,
``loss_batch``, ``key_entries``, ``counted_in_total``) and registers itself with
``model_class=PromptLearningPeftModel``, so ``jpeft.get_peft_model`` and
``jpeft.PeftModel.from_pretrained`` build this class for it.

As in PEFT, one prompt adapter is active at a time, a checkpoint holds the encoder's
*output* (``prompt_embeddings``) plus ``modules_to_save`` copies as ``base_model.<path>``,
a loaded adapter is inference-only, and nothing can be merged into the base weights.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.config import PeftConfig
from jpeft.core.tree import combine
from jpeft.errors import CheckpointError
from jpeft.peft_model import PeftModel
from jpeft.tuners import base

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"
TRAINABLE_REFUSAL = "Cannot set a prompt learning adapter to trainable when loading pretrained adapter."


class PromptLearningPeftModel(PeftModel):
    """A Flax model with prompt-learning adapters (prompt tuning, P-tuning, prefix tuning).

    Build it with :func:`jpeft.get_peft_model` or load one with
    :meth:`jpeft.PeftModel.from_pretrained`; the registry picks this class for prompt
    methods. Params are ``{"base": ..., "adapters": {name: {"prompt": encoder, ...}}}``;
    the active adapter's whole tree trains (encoder + ``modules_to_save`` copies) unless
    it was loaded for inference.

    Example:
      >>> config = jpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
      >>> peft_model = jpeft.get_peft_model(flax_gpt2, config)
      >>> logits = peft_model(input_ids).logits  # (batch, 8 + seq, vocab), as PEFT
    """

    def __init__(
        self,
        model: Any,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        *,
        key: jax.Array | None = None,
    ):
        if not getattr(peft_config, "is_prompt_learning", False):
            raise TypeError(
                f"PromptLearningPeftModel takes prompt-learning configs (prompt tuning, P-tuning, prefix tuning), "
                f"got {type(peft_config).__name__}; use `jpeft.get_peft_model`, which picks the right class."
            )
        super().__init__(model, peft_config, adapter_name, key=key)

    # ------------------------------------------------------------------ forward

    def _active_prompt_adapter(self, active_adapters: Sequence[str] | str | None) -> str | None:
        """The one adapter a call uses, or ``None`` for the plain base model."""
        if active_adapters is None:
            names = [] if self._disabled else list(self._active)
        elif isinstance(active_adapters, str):
            names = [active_adapters]
        else:
            names = list(active_adapters)
        for name in names:
            if name not in self._plans:
                raise ValueError(f"unknown adapter {name!r}; adapters: {sorted(self._plans)}.")
        if len(names) > 1:
            raise ValueError(
                f"prompt-learning adapters cannot be combined: one is active at a time (got {names}). Pick one "
                "with `set_adapter(name)` or `active_adapters=[name]`."
            )
        return names[0] if names else None

    def _prompt_inputs(
        self, params: Mapping[str, Any], name: str, *, train: bool, key: jax.Array | None
    ) -> tuple[Any, Any, Any, Any, jax.Array]:
        """``(method, plan, effective base params, adapter, prompts)`` for adapter ``name``."""
        method, plan = self._method(name), self._plans[name]
        adapter = params["adapters"][name]
        effective = base.apply_overrides(params["base"], adapter, plan.modules, plan.bias_leaves)
        prompts = method.prompt_embeddings(plan, adapter, train=train, key=key)
        return method, plan, effective, adapter, prompts

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
        """Runs the model with the active prompt adapter: a pure function of its arguments.

        Args:
          params: ``peft_model.params``, or the trainable part of a split when ``frozen``
            holds the rest.
          *args, **kwargs: the base model's inputs (``input_ids`` required; ``attention_mask``,
            ``token_type_ids``, ``decoder_input_ids``, ... as the model takes them).
          frozen: the frozen part from ``split_params``.
          train: training mode (the model's and the encoder's dropout on).
          dropout_rng: key for dropout.
          active_adapters: the adapter to use (default: the active one; ``[]``: base model).
          adapter_names: PEFT's mixed batches; not available for prompt learning.

        Returns:
          The model's output. Causal LM logits cover ``num_virtual_tokens + seq`` positions
          for prompt tuning and P-tuning (as PEFT); prefix tuning covers the real positions.
        """
        if adapter_names is not None:
            raise ValueError(
                "`adapter_names` (mixed batches) is not supported for prompt-learning adapters; run one batch per "
                "adapter with `active_adapters=[name]`."
            )
        if frozen is not None:
            params = combine(params, frozen)
        name = self._active_prompt_adapter(active_adapters)
        if name is None:
            return self._binding.run(
                params["base"], None, frozenset(), args, kwargs, train=train, dropout_rng=dropout_rng
            )
        base_rng = prompt_rng = None
        if dropout_rng is not None:
            base_rng, prompt_rng = jax.random.split(dropout_rng)
        method, plan, effective, adapter, prompts = self._prompt_inputs(
            params, name, train=train, key=prompt_rng
        )
        return method.run(
            plan, self._binding, effective, adapter, prompts, args, kwargs, train=train, dropout_rng=base_rng
        )

    def generate(self, *args: Any, params: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """transformers' Flax ``generate`` with the active prompt adapter in place.

        Takes ``generate``'s arguments (``input_ids``, ``attention_mask``, ``max_new_tokens``,
        ``max_length``, ``num_beams``, ...). As torch PEFT, ``max_length`` counts the caller's
        ids, not the virtual tokens, and causal LM ``.sequences`` are the input ids followed
        by the new tokens.
        """
        params = self.params if params is None else params
        generate = getattr(self._binding, "generate", None)
        if generate is None:
            raise TypeError(f"{self._binding.class_name} has no `generate`.")
        name = self._active_prompt_adapter(None)
        if name is None:
            return generate(params["base"], None, frozenset(), args, kwargs)
        method, plan, effective, adapter, prompts = self._prompt_inputs(params, name, train=False, key=None)
        return method.generate(plan, self._binding, effective, adapter, prompts, args, kwargs)

    def loss_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The training batch as the loss sees it (causal LM prompt tuning: labels/mask grow by ``nvt``).

        ``jpeft.train.make_train_step`` calls it before the loss; the model itself gets the
        original batch.
        """
        name = self._active_prompt_adapter(None)
        if name is None:
            return batch
        return self._method(name).loss_batch(self._plans[name], batch)

    # ------------------------------------------------------------------ merge: not for prompts

    def _cannot_merge(self) -> ValueError:
        types = sorted({c.peft_type.value for c in self.peft_config.values()})
        return ValueError(
            f"prompt-learning adapters ({', '.join(types)}) cannot be merged into the base weights: they add "
            "virtual tokens (or key/value prefixes) to the model's input, not a weight change. Keep the adapter "
            "attached (`apply`/`generate`), or use `unload()` for the plain base model."
        )

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        raise self._cannot_merge()

    def unmerge_adapter(self) -> None:
        raise self._cannot_merge()

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None) -> Any:
        raise self._cannot_merge()

    def get_merged_params(
        self, params: Mapping[str, Any] | None = None, adapter_names: Sequence[str] | None = None
    ) -> Any:
        raise self._cannot_merge()

    # ------------------------------------------------------------------ checkpoints

    def get_peft_state_dict(
        self, adapter_name: str = "default", save_embedding_layers: bool | str = "auto"
    ) -> dict[str, np.ndarray]:
        """PEFT's state dict of a prompt adapter: ``prompt_embeddings`` (the encoder output, fp32)
        and the ``modules_to_save`` copies as ``base_model.<path>``."""
        out = super().get_peft_state_dict(adapter_name, save_embedding_layers)
        plan = self._plans[adapter_name]
        prompts = self._method(adapter_name).prompt_embeddings(
            plan, self.adapters[adapter_name], train=False, key=None
        )
        out[PROMPT_EMBEDDINGS_KEY] = np.ascontiguousarray(np.asarray(jax.device_get(prompts), np.float32))
        return out

    @classmethod
    def from_pretrained(
        cls,
        model: Any,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Loads a prompt adapter (jpeft's or torch PEFT's) for inference.

        Takes :meth:`jpeft.PeftModel.from_pretrained`'s arguments. The adapter is the saved
        ``prompt_embeddings`` table (the encoder is not rebuilt), as in PEFT.

        Raises:
          ValueError: ``is_trainable=True`` (PEFT refuses it for prompt learning).
        """
        if is_trainable:
            raise ValueError(TRAINABLE_REFUSAL)
        return super().from_pretrained(model, model_id, adapter_name, is_trainable, config, **kwargs)

    @classmethod
    def _check_loadable(cls, config: PeftConfig, is_trainable: bool) -> None:
        if is_trainable:
            raise ValueError(TRAINABLE_REFUSAL)

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> None:
        """Loads another prompt adapter folder under ``adapter_name`` (inference only, not made active)."""
        if is_trainable:
            raise ValueError(TRAINABLE_REFUSAL)
        super().load_adapter(model_id, adapter_name, is_trainable, **kwargs)

    def _load_weights(
        self, adapter_name: str, tensors: Mapping[str, np.ndarray], source: str, ignore_mismatched_sizes: bool
    ) -> None:
        if adapter_name not in self._inference:
            # reached through jpeft.PeftModel.from_pretrained(..., is_trainable=True)
            raise ValueError(TRAINABLE_REFUSAL)
        tensors = dict(tensors)
        if PROMPT_EMBEDDINGS_KEY not in tensors:
            raise CheckpointError(
                f"{source!r} has no {PROMPT_EMBEDDINGS_KEY!r} tensor, which every prompt-learning checkpoint "
                f"holds (keys found: {sorted(tensors)[:10]}). The folder is not a "
                f"{self.peft_config[adapter_name].peft_type.value} adapter, or its weights file is incomplete."
            )
        rows = np.asarray(tensors.pop(PROMPT_EMBEDDINGS_KEY))
        current = self.adapters[adapter_name]["prompt"]["embedding"]
        load_rows = True
        if tuple(rows.shape) != tuple(current.shape):
            message = (
                f"{PROMPT_EMBEDDINGS_KEY}: found shape {tuple(rows.shape)} in the checkpoint and "
                f"{tuple(current.shape)} in the model"
            )
            if not ignore_mismatched_sizes:
                raise CheckpointError(
                    f"size mismatch loading {source!r} into adapter {adapter_name!r}: {message}. The adapter was "
                    "saved with another num_virtual_tokens/token_dim or for another model; load it onto the base "
                    "model it was trained for."
                )
            load_rows = False
            warnings.warn(
                f"Some weights were not loaded (ignore_mismatched_sizes=True):\n{message}", stacklevel=3
            )
        super()._load_weights(adapter_name, tensors, source, ignore_mismatched_sizes)
        if load_rows:
            adapter = dict(self.adapters[adapter_name])
            adapter["prompt"] = {**adapter["prompt"], "embedding": jnp.asarray(rows, current.dtype)}
            self.adapters[adapter_name] = adapter

    def __repr__(self) -> str:
        lines = [f"PromptLearningPeftModel({self._binding.class_name}, active={self._active})"]
        for name, config in self.peft_config.items():
            lines.append(
                f"  {name}: {config.peft_type.value}, {config.num_virtual_tokens} virtual tokens, "  # type: ignore[attr-defined]
                f"task {config.task_type.value if config.task_type else None}"
            )
        return "\n".join(lines)
