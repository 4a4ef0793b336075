"""What PEFT's prompt-learning methods share: the config fields and how they are filled in.

Prompt tuning, P-tuning and prefix tuning change a model's *inputs* (virtual tokens or
per-layer key/value prefixes), not its layers. Their config fields describing the model
(``num_layers``, ``token_dim``, ``num_attention_heads``, ``num_transformer_submodules``)
are filled from the model config exactly as PEFT's ``_prepare_prompt_learning_config``
does, so that the saved ``adapter_config.json`` equals PEFT's.

The second half is what prompt tuning and P-tuning share: resolving the word embedding,
the plan, the loss batch and the checkpoint entries. Placing the prompts while the model
runs is the binding's side (:mod:`jpeft.bindings.virtual_tokens`, beside prefix injection).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import jax.numpy as jnp

from jpeft.bindings import virtual_tokens
from jpeft.config import TASK_HEAD_MODULES, PeftConfig, PeftType, TaskType
from jpeft.core import method
from jpeft.core.architectures import ARCHITECTURES, architecture
from jpeft.core.tree import count_params, get_path
from jpeft.errors import ConfigError
from jpeft.tuners import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptLearningConfig(PeftConfig):
    """Fields common to the prompt-learning configs (PEFT's ``PromptLearningConfig``).

    Attributes:
      num_virtual_tokens: number of virtual tokens (required).
      token_dim: hidden size of the model's token embeddings (filled from the model).
      num_transformer_submodules: 2 for ``SEQ_2_SEQ_LM``, else 1 (filled).
      num_attention_heads: the model's attention heads (filled).
      num_layers: the model's transformer layers (filled).
      modules_to_save: extra modules trained in full and saved (task heads are added).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None or int(self.num_virtual_tokens) < 1:
            raise ConfigError(
                f"{type(self).__name__} needs `num_virtual_tokens` >= 1 (got {self.num_virtual_tokens!r})."
            )
        if self.task_type is None:
            raise ConfigError(
                f"{type(self).__name__} needs a `task_type` (e.g. task_type='CAUSAL_LM'): prompt-learning "
                "methods change the model's inputs, which depends on the task (PEFT fails with KeyError(None))."
            )

    @property
    def is_prompt_learning(self) -> bool:
        return True


def _first(model_config: Mapping[str, Any], names: tuple[str, ...], field: str) -> int:
    for name in names:
        if model_config.get(name) is not None:
            return int(model_config[name])
    raise ConfigError(
        f"could not read `{field}` from the model config (looked for {', '.join(names)}); "
        f"pass `{field}=` in the prompt-learning config."
    )


ConfigT = TypeVar("ConfigT", bound=PromptLearningConfig)


def fill_from_model_config(config: ConfigT, model_config: Any) -> ConfigT:
    """``config`` with the model-describing fields filled as PEFT fills them.

    Args:
      config: a prompt-learning config.
      model_config: the transformers config object (or its ``to_dict()``).
    """
    data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if "text_config" in data and isinstance(data["text_config"], Mapping):
        data = data["text_config"]
    changes: dict[str, Any] = {}
    num_layers = config.num_layers
    if num_layers is None:
        num_layers = getattr(model_config, "num_hidden_layers", None)
        if num_layers is None:
            num_layers = _first(data, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
        changes["num_layers"] = int(num_layers)
    token_dim = config.token_dim
    if token_dim is None:
        token_dim = _first(data, ("hidden_size", "n_embd", "d_model"), "token_dim")
        changes["token_dim"] = token_dim
    heads = config.num_attention_heads
    if heads is None:
        heads = _first(
            data,
            ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
            "num_attention_heads",
        )
        changes["num_attention_heads"] = heads
    if config.peft_type == PeftType.PREFIX_TUNING and data.get("num_key_value_heads") is not None:
        # grouped-query attention: prefixes have the key/value heads' width (PEFT #1901)
        kv_heads = int(data["num_key_value_heads"])
        head_dim = data.get("head_dim") or token_dim // heads
        changes["token_dim"] = int(head_dim) * kv_heads
        changes["num_attention_heads"] = kv_heads
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        changes["encoder_hidden_size"] = changes.get("token_dim", token_dim)
    if config.num_transformer_submodules is None:
        changes["num_transformer_submodules"] = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    return dataclasses.replace(config, **changes) if changes else config


# --------------------------------------------------------------------------- virtual tokens in the input
#
# Prompt tuning and P-tuning prepend ``num_virtual_tokens`` rows to the input embeddings (PEFT's
# ``cat([prompts, word_embeddings(input_ids)], 1)``). transformers' Flax models take no
# ``inputs_embeds``, so the input ids are extended with placeholder ids and, while the model
# runs, the word embedding's output rows of those placeholders are replaced by the prompts.

# Task types whose prompt handling jpeft implements (PEFT's PeftModelFor... forward for prompts).
VIRTUAL_TOKEN_TASKS = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.SEQ_2_SEQ_LM)
# Model types whose torch word embedding scales its own output (``BartScaledWordEmbedding``),
# so PEFT's prompts are not scaled while Flax scales every looked-up row after the lookup.
PROMPT_PREFIX = "base_model."  # prompt methods save module copies as ``base_model.<path>``
IGNORE_INDEX = -100
PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"  # the encoder output, as PEFT saves it


@dataclasses.dataclass(frozen=True, kw_only=True)
class VirtualTokenPlan(method.Plan):
    """A prompt-tuning or P-tuning adapter resolved against one model.

    Attributes:
      config: the config as saved (model fields filled, task heads in ``modules_to_save``).
      modules: the model's module table.
      modules_to_save: resolved names of the modules trained in full.
      word_embeddings: the module whose output takes the virtual tokens (PEFT's
        ``word_embeddings``).
      encoder: for encoder-decoder models the encoder's module name (only its call of the
        shared embedding takes the virtual tokens); ``None`` otherwise.
      embed_scale: the factor Flax applies after the lookup that torch applies inside the
        embedding module (BART with ``scale_embedding``); 1.0 for most models.
      placeholder_id: the token id that stands in for a virtual token.
    """

    config: PromptLearningConfig
    word_embeddings: str
    encoder: str | None
    embed_scale: float = 1.0
    placeholder_id: int = 0

    @property
    def num_virtual_tokens(self) -> int:
        assert self.config.num_virtual_tokens is not None  # PromptLearningConfig requires it
        return int(self.config.num_virtual_tokens)

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the prompt encoder: ``num_virtual_tokens * num_transformer_submodules``."""
        return self.num_virtual_tokens * int(self.config.num_transformer_submodules or 1)


def _vocab_size(model_config: Any) -> int | None:
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    vocab = getattr(text_config, "vocab_size", None)
    return int(vocab) if vocab is not None else None


def find_word_embeddings(binding: Any) -> str:
    """The input word embedding's module name, found as PEFT finds it.

    PEFT takes ``embeddings.word_embeddings`` when the model has it, else the first parameter
    with ``vocab_size`` rows; for transformers' Flax models that is the first embedding table
    with ``vocab_size`` rows (``transformer.wte``, ``model.embed_tokens``, ``model.shared``,
    ``bert.embeddings.word_embeddings``).
    """
    vocab = _vocab_size(binding.config)
    candidates = [
        name
        for name, info in binding.modules.items()
        if info.kind == "embedding" and (vocab is None or info.in_features == vocab)
    ]
    if "embeddings.word_embeddings" in candidates:
        return "embeddings.word_embeddings"
    if not candidates:
        raise ConfigError(
            f"prompt learning cannot find the input word embedding of {binding.class_name}: no embedding table "
            f"has vocab_size={vocab} rows. Prompt tuning and P-tuning need a model whose token ids are looked up "
            "in an embedding of the vocabulary size."
        )
    return candidates[0]


def _find_encoder(binding: Any) -> str:
    names = [name for name in binding.modules if name.rsplit(".", 1)[-1] == "encoder"]
    if not names:
        raise ConfigError(
            f"{binding.class_name} is an encoder-decoder model but jpeft finds no module named `encoder` in it; "
            "prompt tuning of seq2seq models needs the encoder to receive the virtual tokens."
        )
    return min(names, key=len)


def _embed_scale(binding: Any) -> float:
    model_config = binding.config
    if not getattr(model_config, "scale_embedding", False):
        return 1.0
    row = architecture(binding.model_type)
    if row is None or not row.scaled_embedding:
        raise ConfigError(
            f"prompt learning on {binding.class_name} with `scale_embedding=True` is not supported: jpeft does not "
            "know whether its torch embedding scales the prompts (supported: "
            f"{', '.join(sorted(n for n, a in ARCHITECTURES.items() if a.scaled_embedding))}). Use a config with scale_embedding=False."
        )
    return math.sqrt(float(model_config.d_model))


def prepare_virtual_tokens(config: PromptLearningConfig, binding: Any) -> VirtualTokenPlan:
    """Resolves a prompt-tuning/P-tuning config against a model (PEFT's ``_setup_prompt_encoder``).

    The plan's config is what gets saved: the model fields filled as PEFT fills them, task
    heads added to ``modules_to_save`` twice (PEFT's ``PeftModelFor...`` ``__init__`` and
    ``add_adapter`` both extend the list).

    Raises:
      ConfigError: the model is not a transformers Flax model, the task type is not
        supported, or the task does not fit the model (naming the model class).
    """
    method = config.peft_type.value
    model_config = binding.config
    if model_config is None:
        raise ConfigError(
            f"{method} cannot adapt {binding.class_name}: prompt learning needs a transformers Flax model (its "
            "config gives num_layers/token_dim, its word embedding takes the virtual tokens). Pass a "
            "FlaxAutoModelFor... model; an arbitrary nnx.Module or linen module does not say how it embeds tokens, "
            "so use a layer method (LoRA, IA3, ...) there."
        )
    task = config.task_type
    if task not in VIRTUAL_TOKEN_TASKS:
        raise ConfigError(
            f"{method} with task_type={task.value if task else None!r} is not implemented in jpeft; supported: "
            f"{', '.join(t.value for t in VIRTUAL_TOKEN_TASKS)}."
        )
    encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
    if encoder_decoder != (task == TaskType.SEQ_2_SEQ_LM):
        kind = "an encoder-decoder" if encoder_decoder else "a decoder-only or encoder-only"
        raise ConfigError(
            f"task_type={task.value!r} does not fit {binding.class_name}, {kind} model: use task_type="
            f"{'SEQ_2_SEQ_LM' if encoder_decoder else 'CAUSAL_LM or SEQ_CLS'}."
        )
    config = fill_from_model_config(config, model_config)
    heads = TASK_HEAD_MODULES.get(task)
    if heads:
        config = dataclasses.replace(
            config, modules_to_save=[*(config.modules_to_save or []), *heads, *heads]
        )
    word_embeddings = find_word_embeddings(binding)
    width = binding.modules[word_embeddings].out_features
    if config.token_dim != width:
        raise ConfigError(
            f"`token_dim={config.token_dim}` differs from the width {width} of {binding.class_name}'s word "
            f"embedding `{word_embeddings}`; leave `token_dim` unset to take it from the model."
        )
    pad = getattr(model_config, "pad_token_id", None)
    return VirtualTokenPlan(
        config=config,
        modules=binding.modules,
        modules_to_save=tuple(base.resolve_modules_to_save(config.modules_to_save, binding.modules)),
        word_embeddings=word_embeddings,
        encoder=_find_encoder(binding) if encoder_decoder else None,
        embed_scale=_embed_scale(binding),
        placeholder_id=1 if pad == 0 else 0,
    )


def word_embedding_rows(plan: VirtualTokenPlan, base_params: Any, ids: Any) -> Any:
    """``word_embeddings(ids)`` in float32, as PEFT's SAMPLE_VOCAB/TEXT inits read it (scale included)."""
    info = plan.modules[plan.word_embeddings]
    table = get_path(base_params, info.weight_path)
    rows = jnp.take(table, jnp.asarray(ids), axis=0).astype(jnp.float32)
    scale = plan.embed_scale * info.output_scale  # Flax's scale after the lookup, or the module's own (Gemma)
    return rows * scale if scale != 1.0 else rows


def virtual_token_loss_batch(plan: VirtualTokenPlan, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """The batch as the loss sees it: causal LM labels and mask get the virtual-token columns.

    Labels (or the input ids, which jpeft's causal loss uses when there are no labels) are
    prefixed with ``-100`` and the attention mask with ones, as PEFT's forward does; other
    task types are returned unchanged (their outputs do not grow).
    """
    if plan.config.task_type != TaskType.CAUSAL_LM:
        return batch
    nvt = plan.num_virtual_tokens
    labels = jnp.asarray(batch["labels"] if "labels" in batch else batch["input_ids"])
    out = dict(batch)
    out["labels"] = jnp.concatenate(
        [jnp.full((labels.shape[0], nvt), IGNORE_INDEX, labels.dtype), labels], axis=1
    )
    if batch.get("attention_mask") is not None:
        mask = jnp.asarray(batch["attention_mask"])
        out["attention_mask"] = jnp.concatenate([jnp.ones((mask.shape[0], nvt), mask.dtype), mask], axis=1)
    return out


def override_key_entries(plan: Any, adapter: Mapping[str, Any]) -> list[Any]:
    """Checkpoint entries of the ``modules_to_save`` copies, keyed ``base_model.<path>`` (PEFT's prompt layout)."""
    entries = base.override_entries(adapter, plan.modules, (), set())
    return [dataclasses.replace(entry, prefix=PROMPT_PREFIX) for entry in entries]


# --------------------------------------------------------------------------- shared protocol functions
# Prompt tuning and P-tuning differ only in their encoder; these protocol functions are theirs
# (imported into each method module), and prefix tuning shares the checkpoint/override ones.


def apply_overrides(base_params: Any, adapter: Mapping[str, Any], plan: Any) -> Any:
    """The base tree with this adapter's ``modules_to_save`` copies substituted in."""
    return base.apply_overrides(base_params, adapter, plan.modules, ())


def run(
    plan: VirtualTokenPlan,
    binding: Any,
    base_params: Any,
    adapter: Mapping[str, Any],
    prompts: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    train: bool,
    dropout_rng: Any,
) -> Any:
    """The model's forward with the prompt rows in front (causal LM logits: ``nvt + seq`` positions).

    Args:
      plan: the method's plan.
      binding: the model's binding.
      base_params: effective base params (``modules_to_save`` copies substituted in).
      adapter: the adapter tree (the prompts arrive in ``prompts``).
      prompts: the method's ``prompt_embeddings`` output.
      args, kwargs: the model's inputs (``input_ids`` required).
      train: training mode; dropout_rng: key for the model's dropout.
    """
    del adapter
    return virtual_tokens.run(
        plan, binding, base_params, prompts, args, kwargs, train=train, dropout_rng=dropout_rng
    )


def generate(
    plan: VirtualTokenPlan,
    binding: Any,
    base_params: Any,
    adapter: Mapping[str, Any],
    prompts: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    """transformers' Flax ``generate`` with the prompt rows in front; ``.sequences`` as torch PEFT's."""
    del adapter
    return virtual_tokens.generate(plan, binding, base_params, prompts, args, kwargs)


def loss_batch(plan: VirtualTokenPlan, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """Causal LM: labels prefixed with ``-100`` and the mask with ones; other tasks unchanged."""
    return virtual_token_loss_batch(plan, batch)


def key_entries(
    plan: Any, adapter: Mapping[str, Any], save_embedding_layers: bool | str = "auto"
) -> list[Any]:
    """``prompt_embeddings`` and the ``modules_to_save`` copies as ``base_model.<path>``."""
    del save_embedding_layers
    # written from the method's `prompt_embeddings` (the encoder output); read into the table a
    # loaded (inference) adapter holds
    rows = base.KeyEntry(PROMPT_EMBEDDINGS_KEY, "adapter", ("prompt", "embedding"), prefix="", save=False)
    return [rows, *override_key_entries(plan, adapter)]


def counted_in_total(plan: Any, adapter: Mapping[str, Any]) -> int:
    """Parameters PEFT adds to ``all params``: the whole prompt encoder and the module copies."""
    del plan
    return count_params(adapter["prompt"]) + count_params(adapter["modules_to_save"])
