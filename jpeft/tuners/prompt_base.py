"""What PEFT's prompt-learning methods share: the config fields and how they are filled in.

Prompt tuning, P-tuning and prefix tuning change a model's *inputs* (virtual tokens or
per-layer key/value prefixes), not its layers. Their config fields describing the model
(``num_layers``, ``token_dim``, ``num_attention_heads``, ``num_transformer_submodules``)
are filled from the model config exactly as PEFT's ``_prepare_prompt_learning_config``
does, so that the saved ``adapter_config.json`` equals PEFT's.

The second half is the virtual-token machinery that prompt tuning and P-tuning share:
resolving the word embedding, extending the inputs, placing the prompts while the Flax
model runs, ``generate`` and the loss batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jpeft.config import TASK_HEAD_MODULES, PeftConfig, PeftType, TaskType
from jpeft.core.modules import ModuleInfo
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


def fill_from_model_config(config: PromptLearningConfig, model_config: Any) -> PromptLearningConfig:
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
SCALED_EMBEDDING_MODEL_TYPES = frozenset({"bart", "mbart"})
PROMPT_PREFIX = "base_model."  # prompt methods save module copies as ``base_model.<path>``
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class VirtualTokenPlan:
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
    modules: Mapping[str, ModuleInfo]
    modules_to_save: tuple[str, ...]
    word_embeddings: str
    encoder: str | None
    embed_scale: float = 1.0
    placeholder_id: int = 0
    layers: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    hooked: frozenset[str] = frozenset()
    bias_leaves: tuple[tuple[str, ...], ...] = ()

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.config.num_virtual_tokens)  # type: ignore[arg-type]

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
    if binding.model_type not in SCALED_EMBEDDING_MODEL_TYPES:
        raise ConfigError(
            f"prompt learning on {binding.class_name} with `scale_embedding=True` is not supported: jpeft does not "
            "know whether its torch embedding scales the prompts (supported: "
            f"{', '.join(sorted(SCALED_EMBEDDING_MODEL_TYPES))}). Use a config with scale_embedding=False."
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
    model_config = getattr(binding, "config", None)
    if model_config is None:
        raise ConfigError(
            f"{method} cannot adapt {binding.class_name}: prompt learning needs a transformers Flax model (its "
            "config gives num_layers/token_dim, its word embedding takes the virtual tokens). Pass a "
            "FlaxAutoModelFor... model."
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
    table = get_path(base_params, plan.modules[plan.word_embeddings].weight_path)
    rows = jnp.take(table, jnp.asarray(ids), axis=0).astype(jnp.float32)
    return rows * plan.embed_scale if plan.embed_scale != 1.0 else rows


def _bound_inputs(fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``fn``'s arguments by name (positional ones named from its signature, ``**kwargs`` flattened)."""
    signature = inspect.signature(fn)
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return arguments


def _extend_inputs(plan: VirtualTokenPlan, inputs: dict[str, Any]) -> dict[str, Any]:
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
def virtual_tokens_in_place(plan: VirtualTokenPlan, prompts: Any, length: int) -> Iterator[None]:
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


def run_virtual_tokens(
    plan: VirtualTokenPlan,
    binding: Any,
    base_params: Any,
    prompts: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    train: bool,
    dropout_rng: Any,
) -> Any:
    """The model's forward with the virtual tokens in front of the input (PEFT's prompt forward).

    Causal LM logits cover ``num_virtual_tokens + seq`` positions, as PEFT's.
    """
    inputs = _extend_inputs(plan, _bound_inputs(binding.model.__call__, args, kwargs))
    if plan.config.task_type == TaskType.SEQ_2_SEQ_LM and inputs.get("decoder_input_ids") is None:
        raise ValueError(
            "seq2seq prompt tuning needs `decoder_input_ids` (or `labels` in a training batch, from which "
            "jpeft.train derives them); the encoder input holds the virtual tokens."
        )
    length = inputs["input_ids"].shape[1]
    with virtual_tokens_in_place(plan, prompts, length):
        return binding.run(base_params, None, frozenset(), (), inputs, train=train, dropout_rng=dropout_rng)


def generate_virtual_tokens(
    plan: VirtualTokenPlan,
    binding: Any,
    base_params: Any,
    prompts: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    """transformers' Flax ``generate`` with the virtual tokens in front of the prompt.

    Causal LMs: ``max_length`` counts the caller's ids (as in torch PEFT), and ``.sequences``
    are the caller's ids followed by the new tokens. Seq2seq: the decoder's sequences.
    """
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
    return run_virtual_tokens(
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
    return generate_virtual_tokens(plan, binding, base_params, prompts, args, kwargs)


def loss_batch(plan: VirtualTokenPlan, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """Causal LM: labels prefixed with ``-100`` and the mask with ones; other tasks unchanged."""
    return virtual_token_loss_batch(plan, batch)


def key_entries(
    plan: Any, adapter: Mapping[str, Any], save_embedding_layers: bool | str = "auto"
) -> list[Any]:
    """The ``modules_to_save`` copies as ``base_model.<path>`` (the model class adds ``prompt_embeddings``)."""
    del save_embedding_layers
    return override_key_entries(plan, adapter)


def counted_in_total(plan: Any, adapter: Mapping[str, Any]) -> int:
    """Parameters PEFT adds to ``all params``: the whole prompt encoder and the module copies."""
    del plan
    return count_params(adapter["prompt"]) + count_params(adapter["modules_to_save"])
