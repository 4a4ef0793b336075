"""``PromptLearningPeftModel``: a ``PeftModel`` whose adapters change the model's inputs.

Prompt tuning, P-tuning and prefix tuning (methods registered with ``kind="prompt"``)
hook no layer: they put virtual tokens in front of the input (or key/value prefixes in
front of each layer's cache). This class runs their forward and ``generate`` through
the method's contract (``prompt_embeddings``, ``run``, ``generate``, ``loss_batch``);
everything else is ``PeftModel``'s, and what PEFT forbids for prompt adapters (merging,
loading one trainable, activating two at once) is refused there, by the method's kind.

As in PEFT, one prompt adapter is active at a time, a checkpoint holds the encoder's
*output* (``prompt_embeddings``) plus ``modules_to_save`` copies as ``base_model.<path>``,
a loaded adapter is inference-only, and nothing can be merged into the base weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax

from jpeft.core.method import Kind
from jpeft.core.tree import combine
from jpeft.peft_model import TRAINABLE_REFUSAL, PeftModel
from jpeft.tuners.prompt_base import PROMPT_EMBEDDINGS_KEY

__all__ = ["PROMPT_EMBEDDINGS_KEY", "TRAINABLE_REFUSAL", "PromptLearningPeftModel"]


class PromptLearningPeftModel(PeftModel):
    """A Flax model with prompt-learning adapters (prompt tuning, P-tuning, prefix tuning).

    Build it with :func:`jpeft.get_peft_model` or load one with
    :meth:`jpeft.PeftModel.from_pretrained`, which pick this class for prompt methods.
    Params are ``{"base": ..., "adapters": {name: {"prompt": encoder, ...}}}``; the active
    adapter's whole tree trains (encoder + ``modules_to_save`` copies) unless it was loaded
    for inference.

    Example:
      >>> config = jpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
      >>> peft_model = jpeft.get_peft_model(flax_gpt2, config)
      >>> logits = peft_model(input_ids).logits  # (batch, 8 + seq, vocab), as PEFT
    """

    kinds: ClassVar[frozenset[Kind]] = frozenset({"prompt"})

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

    def _prompt_call(
        self, params: Mapping[str, Any], name: str, *, train: bool, key: jax.Array | None
    ) -> tuple[Any, Any, Any, Any, jax.Array]:
        """``(method, plan, effective base params, adapter, prompts)`` for adapter ``name``."""
        method, plan = self._method(name), self._plans[name]
        adapter = params["adapters"][name]
        effective = method.apply_overrides(params["base"], adapter, plan)
        assert method.prompt_embeddings is not None  # a prompt method (checked at registration)
        return method, plan, effective, adapter, method.prompt_embeddings(plan, adapter, train=train, key=key)

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
            return self._binding.run(params["base"], None, frozenset(), args, kwargs, train=train, dropout_rng=dropout_rng)
        base_rng = prompt_rng = None
        if dropout_rng is not None:
            base_rng, prompt_rng = jax.random.split(dropout_rng)
        method, plan, effective, adapter, prompts = self._prompt_call(params, name, train=train, key=prompt_rng)
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
        name = self._active_prompt_adapter(None)
        if name is None:
            return self._binding.generate(params["base"], None, frozenset(), args, kwargs)
        method, plan, effective, adapter, prompts = self._prompt_call(params, name, train=False, key=None)
        return method.generate(plan, self._binding, effective, adapter, prompts, args, kwargs)

    def loss_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The training batch as the loss sees it (causal LM prompt tuning: labels/mask grow by ``nvt``).

        ``jpeft.train.make_train_step`` calls it before the loss; the model itself gets the
        original batch.
        """
        name = self._active_prompt_adapter(None)
        if name is None:
            return batch
        method = self._method(name)
        assert method.loss_batch is not None
        return method.loss_batch(self._plans[name], batch)

    def __repr__(self) -> str:
        lines = [f"PromptLearningPeftModel({self._binding.class_name}, active={self._active})"]
        for name, config in self.peft_config.items():
            lines.append(
                f"  {name}: {config.peft_type.value}, {config.num_virtual_tokens} virtual tokens, "  # type: ignore[attr-defined]
                f"task {config.task_type.value if config.task_type else None}"
            )
        return "\n".join(lines)

