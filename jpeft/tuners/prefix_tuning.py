"""Prefix tuning: trained key/value prefixes in every attention layer.

Each attention layer gets ``num_virtual_tokens`` extra keys and values, which all real
tokens attend to. The prefixes of all layers are one embedding ``E`` of shape
``(nvt, num_layers * 2 * token_dim)``, viewed as ``(nvt, 2L, H, D)``: layer ``l``'s keys
are group ``2l``, its values group ``2l + 1``. With ``prefix_projection`` the embedding
is ``(nvt, token_dim)`` and ``E = Linear -> tanh -> Linear`` of it (reparameterisation).
How the prefixes reach each model: :mod:`jpeft.bindings.prefix`.

Adapter tree::

    {"prompt": {"embedding": (nvt, L*2*token_dim)}                     # no projection, or loaded
     | {"prompt": {"embedding": (nvt, token_dim),
                   "transform": {"0": {"kernel": (token_dim, hidden), "bias": (hidden,)},
                                 "2": {"kernel": (hidden, L*2*token_dim), "bias": (...)}}}},
     "modules_to_save": {module: subtree}, "bias": {}}

PEFT saves only the encoder *output* ``E`` as ``prompt_embeddings``; a loaded adapter
(``inference_mode``) is just that embedding, so a projected adapter cannot resume training.

References:
  Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", 2021.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp

from jpeft.bindings import prefix as injection_lib
from jpeft.config import TASK_HEAD_MODULES, PeftType
from jpeft.core import method, registry
from jpeft.core.architectures import prefix_supported
from jpeft.core.modules import ModuleInfo
from jpeft.core.tree import PyTree
from jpeft.errors import ConfigError
from jpeft.tuners import base, prompt_base
from jpeft.tuners.prompt_base import (
    PromptLearningConfig,
    fill_from_model_config,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's ``PrefixTuningConfig``.

    Attributes:
      encoder_hidden_size: hidden width of the projection MLP (default: ``token_dim``).
      prefix_projection: reparameterise the prefixes through ``Linear -> tanh -> Linear``.
      init_weights: ``None`` (random) or ``"zero"``: zero the last projection layer, or the
        embedding without projection, so the prefixes start at zero.

    Example:
      >>> config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
    """

    peft_type: ClassVar[PeftType] = PeftType.PREFIX_TUNING

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: Literal["zero"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"`init_weights` must be None or 'zero', got {self.init_weights!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixPlan(method.Plan):
    """One prefix-tuning adapter resolved against one model."""

    config: PrefixTuningConfig
    injection: injection_lib.PrefixInjection

    @property
    def prefix_width(self) -> int:
        """Columns of the prefix embedding: ``num_layers * 2 * token_dim``."""
        num_layers, token_dim = self.config.num_layers, self.config.token_dim
        assert num_layers is not None and token_dim is not None  # prepare fills both from the model
        return int(num_layers) * 2 * int(token_dim)


def prepare(config: PrefixTuningConfig, binding: Any) -> PrefixPlan:
    """Fills ``config`` from the model and checks that its prefixes can be injected.

    The plan's config is what gets saved: ``num_layers``/``token_dim``/... filled as PEFT
    fills them (grouped-query attention: key/value heads), task heads added to
    ``modules_to_save`` twice, as PEFT's ``PeftModelFor...`` classes do for prompt methods.

    Raises:
      ConfigError: the model has no prefix injection in jpeft (names the model class).
    """
    if not isinstance(config, PrefixTuningConfig):
        raise TypeError(f"prefix tuning needs a PrefixTuningConfig, got {type(config).__name__}.")
    if binding.config is None:
        raise ConfigError(
            f"prefix tuning cannot inject key/value prefixes into {binding.class_name}: it needs a transformers "
            f"Flax model (supported model types and tasks: {prefix_supported()})."
        )
    config = fill_from_model_config(config, binding.config)
    heads = TASK_HEAD_MODULES.get(config.task_type) if config.task_type else None
    if heads:
        # PeftModelFor{SequenceClassification,...}.__init__ and its add_adapter both extend the list
        config = dataclasses.replace(
            config, modules_to_save=[*(config.modules_to_save or []), *heads, *heads]
        )
    injection = injection_lib.injection_for(binding, config)
    modules: Mapping[str, ModuleInfo] = binding.modules
    modules_to_save = base.resolve_modules_to_save(config.modules_to_save, modules)
    return PrefixPlan(
        config=config, modules=modules, modules_to_save=tuple(modules_to_save), injection=injection
    )


def _uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """torch ``nn.Linear``'s default init (weight and bias): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_params(plan: PrefixPlan, base_params: PyTree, key: jax.Array) -> tuple[dict[str, Any], None]:
    """A fresh prefix encoder (PEFT's ``PrefixEncoder``) plus ``modules_to_save`` copies.

    Embeddings start N(0, 1) and Linears as torch's default, unless ``init_weights="zero"``.
    A loaded adapter (``inference_mode``) is only the ``(nvt, L*2*token_dim)`` embedding,
    whose values the checkpoint then fills.
    """
    config = plan.config
    # PromptLearningConfig requires num_virtual_tokens; prepare fills token_dim from the model
    assert config.num_virtual_tokens is not None and config.token_dim is not None
    nvt, token_dim, width = int(config.num_virtual_tokens), int(config.token_dim), plan.prefix_width
    zero = config.init_weights == "zero"
    k_embed, k_w0, k_b0, k_w2, k_b2 = jax.random.split(key, 5)
    if config.prefix_projection and not config.inference_mode:
        hidden = int(config.encoder_hidden_size or token_dim)
        last_kernel = jnp.zeros((hidden, width)) if zero else _uniform(k_w2, (hidden, width), hidden)
        last_bias = jnp.zeros((width,)) if zero else _uniform(k_b2, (width,), hidden)
        prompt: dict[str, Any] = {
            "embedding": jax.random.normal(k_embed, (nvt, token_dim), jnp.float32),
            "transform": {
                "0": {
                    "kernel": _uniform(k_w0, (token_dim, hidden), token_dim),
                    "bias": _uniform(k_b0, (hidden,), token_dim),
                },
                "2": {"kernel": last_kernel, "bias": last_bias},
            },
        }
    elif zero or config.inference_mode:
        prompt = {"embedding": jnp.zeros((nvt, width), jnp.float32)}
    else:
        prompt = {"embedding": jax.random.normal(k_embed, (nvt, width), jnp.float32)}
    overrides = base.init_overrides(base_params, plan.modules_to_save, plan.modules, ())
    return {"prompt": prompt, **overrides}, None


def prompt_embeddings(
    plan: PrefixPlan, adapter: Mapping[str, Any], *, train: bool = False, key: jax.Array | None = None
) -> jax.Array:
    """The prefix embedding ``(nvt, num_layers * 2 * token_dim)``: what PEFT saves as ``prompt_embeddings``.

    ``train`` and ``key`` are accepted for the shared protocol; prefix tuning has no dropout.
    """
    del train, key
    prompt = adapter["prompt"]
    if "transform" not in prompt:
        return prompt["embedding"]
    first, last = prompt["transform"]["0"], prompt["transform"]["2"]
    hidden = jnp.tanh(prompt["embedding"] @ first["kernel"] + first["bias"])
    return hidden @ last["kernel"] + last["bias"]


def run(
    plan: PrefixPlan,
    binding: Any,
    base_params: PyTree,
    adapter: Mapping[str, Any],
    prompts: jax.Array,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    train: bool,
    dropout_rng: jax.Array | None,
) -> Any:
    """The model's forward with the prefixes in place (outputs cover the real positions only, as PEFT).

    Args:
      plan: from :func:`prepare`.
      binding: the model's binding.
      base_params: effective base params (``modules_to_save`` copies already substituted).
      adapter: the adapter tree (unused: ``prompts`` carries the prefixes).
      prompts: :func:`prompt_embeddings` output.
      args, kwargs: the model's inputs.
      train: training mode; dropout_rng: key for the model's dropout.
    """
    del adapter
    return injection_lib.run(
        plan.injection, binding, base_params, prompts, args, kwargs, train=train, dropout_rng=dropout_rng
    )


def generate(
    plan: PrefixPlan,
    binding: Any,
    base_params: PyTree,
    adapter: Mapping[str, Any],
    prompts: jax.Array,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    """transformers' Flax ``generate`` with the prefixes in the cache; ``.sequences`` start with the input ids."""
    del adapter
    return injection_lib.generate(plan.injection, binding, base_params, prompts, args, kwargs)


def loss_batch(plan: PrefixPlan, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """The training batch as is: prefix tuning's outputs cover only the real positions."""
    del plan
    return batch


# Protocol functions shared with the other prompt-learning methods (see prompt_base).
apply_overrides = prompt_base.apply_overrides
key_entries = prompt_base.key_entries
counted_in_total = prompt_base.counted_in_total


METHOD: method.Method[PrefixPlan] = method.Method(
    prepare=prepare,
    init_params=init_params,
    apply_overrides=apply_overrides,
    key_entries=key_entries,
    counted_in_total=counted_in_total,
    prompt_embeddings=prompt_embeddings,
    run=run,
    generate=generate,
    loss_batch=loss_batch,
)

registry.register(PeftType.PREFIX_TUNING, PrefixTuningConfig, METHOD, kind="prompt")
