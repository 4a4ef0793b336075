"""Prompt tuning: trained "soft prompt" embeddings in front of the input.

The adapter is a table of ``num_virtual_tokens * num_transformer_submodules`` rows of
width ``token_dim``; the model sees ``cat([prompt, word_embeddings(input_ids)], 1)``
(seq2seq models: the first ``num_virtual_tokens`` rows, in front of the encoder input).
The base model is frozen and unchanged.

Adapter tree::

    {"prompt": {"embedding": (nvt * nts, token_dim)},
     "modules_to_save": {module: subtree}, "bias": {}}

The checkpoint holds this table as ``prompt_embeddings`` (no prefix), plus module copies
as ``base_model.<path>``; models are wrapped in
:class:`jpeft.prompt_learning.PromptLearningPeftModel`.

Reference:
  Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", 2021.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.config import PeftType
from jpeft.core import method, registry
from jpeft.core.tree import PyTree
from jpeft.errors import ConfigError
from jpeft.tuners import base, prompt_base
from jpeft.tuners.prompt_base import (
    PromptLearningConfig,
    VirtualTokenPlan,
)


class PromptTuningInit(enum.StrEnum):
    """How the prompt rows start (PEFT's ``PromptTuningInit``)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's ``PromptTuningConfig``: the same fields, defaults and checks.

    Attributes:
      prompt_tuning_init: ``"RANDOM"`` (N(0, 1) rows), ``"SAMPLE_VOCAB"`` (rows of the word
        embedding at random token ids) or ``"TEXT"`` (the word embedding of a tokenized text,
        repeated or truncated to fit).
      prompt_tuning_init_text: the text for ``"TEXT"``.
      tokenizer_name_or_path: the tokenizer for ``"TEXT"``, loaded with
        ``transformers.AutoTokenizer.from_pretrained`` (never needed to load a saved adapter).
      tokenizer_kwargs: extra ``from_pretrained`` arguments for ``"TEXT"``
        (``trust_remote_code`` is dropped, as PEFT does).

    Example:
      >>> config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
      >>> peft_model = jpeft.get_peft_model(flax_model, config)
    """

    peft_type: ClassVar[PeftType] = PeftType.PROMPT_TUNING

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            init = PromptTuningInit(self.prompt_tuning_init)
        except ValueError:
            raise ConfigError(
                f"`prompt_tuning_init` must be one of {', '.join(i.value for i in PromptTuningInit)}, got "
                f"{self.prompt_tuning_init!r}."
            ) from None
        object.__setattr__(self, "prompt_tuning_init", init)
        if init == PromptTuningInit.TEXT and not self.tokenizer_name_or_path:
            raise ConfigError(
                f"When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be {self.tokenizer_name_or_path}: "
                "pass the tokenizer (a Hub id or local folder) that reads `prompt_tuning_init_text`."
            )
        if init == PromptTuningInit.TEXT and self.prompt_tuning_init_text is None:
            raise ConfigError(
                "When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None: pass the text whose "
                "embedding starts the prompt."
            )
        if self.tokenizer_kwargs and init != PromptTuningInit.TEXT:
            raise ConfigError(
                "tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'; remove them or use the TEXT init."
            )


# --------------------------------------------------------------------------- resolve and init


def prepare(config: PromptTuningConfig, binding: Any) -> VirtualTokenPlan:
    """Fills ``config`` from the model and finds the word embedding the prompts join.

    Raises:
      ConfigError: unsupported model or task type (names the model class).
    """
    if not isinstance(config, PromptTuningConfig):
        raise TypeError(f"prompt tuning needs a PromptTuningConfig, got {type(config).__name__}.")
    return prompt_base.prepare_virtual_tokens(config, binding)


def _text_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """PEFT's TEXT ids: the tokenized text (special tokens included), truncated or repeated to ``total``."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a checkpoint must not run code, as in PEFT
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(
            f"`prompt_tuning_init_text` {config.prompt_tuning_init_text!r} gives no tokens with tokenizer "
            f"{config.tokenizer_name_or_path!r}; use a non-empty text."
        )
    return (ids * math.ceil(total / len(ids)))[:total]


def init_params(plan: VirtualTokenPlan, base_params: PyTree, key: jax.Array) -> tuple[dict[str, Any], None]:
    """The prompt table (per ``prompt_tuning_init``) plus ``modules_to_save`` copies.

    A loaded adapter (``inference_mode``) gets zeros that the checkpoint's
    ``prompt_embeddings`` then replace; no tokenizer is read.
    """
    config = plan.config
    assert isinstance(config, PromptTuningConfig)  # prepare refuses any other config
    assert config.token_dim is not None  # prepare fills it from the model
    shape = (plan.total_virtual_tokens, int(config.token_dim))
    if config.inference_mode:
        table = jnp.zeros(shape, jnp.float32)
    elif config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
        vocab, _ = plan.modules[plan.word_embeddings].features
        ids = jax.random.randint(key, (shape[0],), 0, vocab)
        table = prompt_base.word_embedding_rows(plan, base_params, ids)
    elif config.prompt_tuning_init == PromptTuningInit.TEXT:
        table = prompt_base.word_embedding_rows(plan, base_params, _text_token_ids(config, shape[0]))
    else:
        table = jax.random.normal(key, shape, jnp.float32)
    overrides = base.init_overrides(base_params, plan.modules_to_save, plan.modules, ())
    return {"prompt": {"embedding": table}, **overrides}, None


# --------------------------------------------------------------------------- forward


def prompt_embeddings(
    plan: VirtualTokenPlan, adapter: Mapping[str, Any], *, train: bool = False, key: jax.Array | None = None
) -> jax.Array:
    """The prompt table ``(nvt * nts, token_dim)``: what PEFT saves as ``prompt_embeddings``."""
    del plan, train, key
    return adapter["prompt"]["embedding"]


# --------------------------------------------------------------------------- checkpoint


# Functions shared with the other prompt-learning methods (see prompt_base).
apply_overrides = prompt_base.apply_overrides
run = prompt_base.run
generate = prompt_base.generate
loss_batch = prompt_base.loss_batch
key_entries = prompt_base.key_entries
counted_in_total = prompt_base.counted_in_total


METHOD: method.Method[VirtualTokenPlan] = method.Method(
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

registry.register(PeftType.PROMPT_TUNING, PromptTuningConfig, METHOD, kind="prompt")
