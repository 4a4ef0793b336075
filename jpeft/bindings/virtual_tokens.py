"""How prompt tuning's and P-tuning's virtual tokens reach a linen model (transformers' Flax).

The binding side of those methods, beside prefix injection (:mod:`jpeft.bindings.prefix`):
the input ids get ``num_virtual_tokens`` placeholder columns in front (the attention mask
and token types grow as PEFT's do), and while the model runs an interceptor on the word
embedding module puts the prompt rows in those positions (for encoder-decoder models, only
in the encoder's call of the shared embedding). Flax models take no ``inputs_embeds``, so
this is how the prompts enter; gradients flow into them under ``jax.grad``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax.numpy as jnp

from jpeft.bindings import family_prompts
from jpeft.bindings.protocol import Binding
from jpeft.config import TaskType


class VirtualTokenSite(Protocol):
    """What the binding needs to know of a virtual-token plan (``prompt_base.VirtualTokenPlan``)."""

    @property
    def config(self) -> Any: ...
    @property
    def num_virtual_tokens(self) -> int: ...
    @property
    def word_embeddings(self) -> str: ...
    @property
    def encoder(self) -> str | None: ...
    @property
    def embed_scale(self) -> float: ...
    @property
    def placeholder_id(self) -> int: ...


def _bound_inputs(fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``fn``'s arguments by name (positional ones named from its signature, ``**kwargs`` flattened)."""
    signature = inspect.signature(fn)
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return arguments


def _extend_inputs(plan: VirtualTokenSite, inputs: dict[str, Any]) -> dict[str, Any]:
    """Input ids, attention mask and token types with the virtual-token columns in front (as PEFT)."""
    if inputs.get("input_ids") is None:
        raise ValueError(
            f"{plan.config.peft_type.value} needs `input_ids`: transformers' Flax models take no `inputs_embeds`, "
            "so jpeft places the virtual tokens through the input ids."
        )
    nvt = plan.num_virtual_tokens
    ids = jnp.asarray(inputs["input_ids"])
    batch = ids.shape[0]
    inputs["input_ids"] = jnp.concatenate(
        [jnp.full((batch, nvt), plan.placeholder_id, ids.dtype), ids], axis=1
    )
    if inputs.get("attention_mask") is not None:
        mask = jnp.asarray(inputs["attention_mask"])
        inputs["attention_mask"] = jnp.concatenate([jnp.ones((batch, nvt), mask.dtype), mask], axis=1)
    if inputs.get("position_ids") is not None:
        warnings.warn(
            "Position ids are not supported for parameter efficient tuning. Ignoring position ids.",
            stacklevel=5,
        )
        inputs.pop("position_ids")
    if inputs.get("token_type_ids") is not None:
        if plan.config.task_type == TaskType.SEQ_CLS:
            types = jnp.asarray(inputs["token_type_ids"])
            inputs["token_type_ids"] = jnp.concatenate([jnp.zeros((batch, nvt), types.dtype), types], axis=1)
        else:
            warnings.warn(
                "Token type ids are not supported for parameter efficient tuning. Ignoring token type ids",
                stacklevel=5,
            )
            inputs.pop("token_type_ids")
    return inputs


@contextlib.contextmanager
def virtual_tokens_in_place(plan: VirtualTokenSite, prompts: Any, length: int) -> Iterator[None]:
    """Within the block, the word embedding's output for a ``length``-token input starts with the prompts.

    For encoder-decoder models only the encoder's call of the (shared) embedding is changed.
    Calls of another length (cached decoding steps) are left alone.
    """
    nvt = plan.num_virtual_tokens
    rows = prompts[:nvt]  # seq2seq: the second half of the (2 nvt, d) prompts is unused, as in PEFT
    if plan.embed_scale != 1.0:
        rows = rows / plan.embed_scale  # Flax multiplies the looked-up rows by the scale afterwards
    inside_encoder = [plan.encoder is None]

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = ".".join(context.module.path)
        if name == plan.encoder:
            outer, inside_encoder[0] = inside_encoder[0], True
            try:
                return next_fun(*args, **kwargs)
            finally:
                inside_encoder[0] = outer
        out = next_fun(*args, **kwargs)
        if name == plan.word_embeddings and inside_encoder[0] and out.ndim == 3 and out.shape[1] == length:
            virtual = jnp.broadcast_to(rows.astype(out.dtype), (out.shape[0], *rows.shape))
            out = jnp.concatenate([virtual, out[:, nvt:]], axis=1)
        return out

    with nn.intercept_methods(interceptor):
        yield


def run(
    plan: VirtualTokenSite,
    binding: Binding,
    base_params: Any,
    prompts: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    train: bool,
    dropout_rng: Any,
) -> Any:
    """The model's forward with the virtual tokens in front of the input (PEFT's prompt forward).

    Causal LM logits cover ``num_virtual_tokens + seq`` positions, as PEFT's. jpeft's own
    family models are reached through their inputs (:mod:`jpeft.bindings.family_prompts`).
    """
    if getattr(binding, "family", False):
        return family_prompts.virtual_tokens_run(
            plan, binding, base_params, prompts, args, kwargs, train=train, dropout_rng=dropout_rng
        )
    inputs = _extend_inputs(plan, _bound_inputs(binding.model.__call__, args, kwargs))
    if plan.config.task_type == TaskType.SEQ_2_SEQ_LM and inputs.get("decoder_input_ids") is None:
        raise ValueError(
            "seq2seq prompt tuning needs `decoder_input_ids` (or `labels` in a training batch, from which "
            "jpeft.train derives them); the encoder input holds the virtual tokens."
        )
    length = inputs["input_ids"].shape[1]
    with virtual_tokens_in_place(plan, prompts, length):
        return binding.run(base_params, None, frozenset(), (), inputs, train=train, dropout_rng=dropout_rng)


def generate(
    plan: VirtualTokenSite,
    binding: Binding,
    base_params: Any,
    prompts: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    """transformers' Flax ``generate`` with the virtual tokens in front of the prompt.

    Causal LMs: ``max_length`` counts the caller's ids (as in torch PEFT), and ``.sequences``
    are the caller's ids followed by the new tokens. Seq2seq: the decoder's sequences.
    """
    if getattr(binding, "family", False):
        return family_prompts.virtual_tokens_generate(plan, binding, base_params, prompts, args, kwargs)
    model = binding.model
    if not hasattr(model, "generate") or not model.can_generate():
        raise TypeError(f"{binding.class_name} cannot generate (it has no language-modelling head).")
    inputs = _extend_inputs(plan, _bound_inputs(model.generate, args, kwargs))
    nvt = plan.num_virtual_tokens
    causal = plan.config.task_type == TaskType.CAUSAL_LM
    if causal:
        generation_config = inputs.get("generation_config") or model.generation_config
        if inputs.get("max_new_tokens") is None and generation_config.max_new_tokens is None:
            inputs["max_length"] = (inputs.get("max_length") or generation_config.max_length) + nvt
    input_ids = inputs.pop("input_ids")
    with virtual_tokens_in_place(plan, prompts, input_ids.shape[1]):
        outputs = binding.generate(base_params, None, frozenset(), (input_ids,), inputs)
    if causal:
        outputs = dataclasses.replace(outputs, sequences=outputs.sequences[:, nvt:])
    return outputs
