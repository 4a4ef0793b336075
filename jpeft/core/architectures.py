"""Per-architecture defaults, in one table (PEFT's ``utils/constants.py``).

Keyed by ``config.model_type``. Each row says, for one architecture: the default
``target_modules`` of each method (PEFT's ``TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING``,
peft 0.21.2, for the model types with Flax implementations in transformers 4.x and jpeft's own
families), IA3's
feed-forward modules, whether its causal LM returns ``lm_head``'s output unchanged as the
logits (read in transformers 4.57's ``modeling_flax_*.py``; lets the train step fuse the
head with the loss), how prefix tuning reaches its attention, and whether its embedding
is scaled inside the torch module (prompt learning). Methods and bindings read this
table; nothing else lists architectures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from jpeft.config import TaskType

PrefixStyle = Literal["cache", "seq2seq", "projection"]


@dataclasses.dataclass(frozen=True)
class PrefixSupport:
    """How prefix tuning's key/value prefixes reach a model (checked against torch PEFT).

    Attributes:
      style: ``"cache"`` (prefilled into the causal LM's key/value cache), ``"seq2seq"``
        (the decoder self-attention cache, PEFT's quirk kept) or ``"projection"`` (added
        through the key/value projections).
      tasks: the task types implemented for it.
      projection: for ``"projection"``, a regex over module names giving
        ``(layer index, "key" | "value")``.
    """

    style: PrefixStyle
    tasks: tuple[TaskType, ...]
    projection: str | None = None


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One architecture's defaults.

    Attributes:
      targets: ``{PEFT method name: default target_modules}``; a method absent here has
        no default for the architecture (the user must name targets).
      feedforward: IA3's default ``feedforward_modules``.
      head_output_is_logits: the causal LM's ``__call__`` returns ``lm_head``'s output as
        the logits (BART-family models add ``final_logits_bias`` after the head).
      prefix: prefix tuning's injection, or ``None`` where it is not implemented.
      scaled_embedding: the torch embedding module itself multiplies by
        ``sqrt(d_model)`` when ``scale_embedding`` is set (prompt rows are then scaled).
    """

    targets: Mapping[str, tuple[str, ...]]
    feedforward: tuple[str, ...] = ()
    head_output_is_logits: bool = False
    prefix: PrefixSupport | None = None
    scaled_embedding: bool = False


def _row(
    lora: tuple[str, ...],
    ia3: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
    adalora: tuple[str, ...] | None = None,
    **rest: object,
) -> Architecture:
    """A row whose AdaLoRA default is LoRA's unless given (``()``: PEFT has none); LoHa's is LoRA's
    (PEFT's LoHa table is a copy of LoRA's)."""
    targets: dict[str, tuple[str, ...]] = {"LORA": lora, "LOHA": lora}
    adalora = lora if adalora is None else adalora
    if adalora:
        targets["ADALORA"] = adalora
    feedforward: tuple[str, ...] = ()
    if ia3 is not None:
        targets["IA3"], feedforward = ia3
    return Architecture(targets=targets, feedforward=feedforward, **rest)  # type: ignore[arg-type]


_QV = ("q_proj", "v_proj")
_BERT_PREFIX = PrefixSupport(
    "projection", (TaskType.SEQ_CLS,), projection=r"(?:.+\.)?encoder\.layer\.(\d+)\.attention\.self\.(key|value)"
)
_ALL_BART = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": _row(
        ("c_attn",),
        (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
        head_output_is_logits=True,
        prefix=PrefixSupport("cache", (TaskType.CAUSAL_LM,)),
    ),
    "llama": _row(
        _QV,
        (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
        head_output_is_logits=True,
        prefix=PrefixSupport("cache", (TaskType.CAUSAL_LM,)),
    ),
    "mistral": _row(_QV, (("k_proj", "v_proj", "down_proj"), ("down_proj",)), (), head_output_is_logits=True),
    "gemma": _row(_QV, (("q_proj", "v_proj", "down_proj"), ("down_proj",)), head_output_is_logits=True),
    "qwen2": _row(_QV, (("q_proj", "v_proj", "down_proj"), ("down_proj",))),
    "qwen3": _row(_QV, (("q_proj", "v_proj", "down_proj"), ("down_proj",))),
    "gemma2": _row(_QV, (("q_proj", "v_proj", "down_proj"), ("down_proj",))),
    "gemma3_text": _row(_QV, (("q_proj", "v_proj", "down_proj"), ("down_proj",))),
    # phi3: PEFT has no defaults (its "phi" rows are Phi-1/2): users name qkv_proj, gate_up_proj, ...
    "bert": _row(("query", "value"), (("key", "value", "output.dense"), ("output.dense",)), prefix=_BERT_PREFIX),
    "roberta": _row(
        ("query", "value"), (("key", "value", "output.dense"), ("output.dense",)), ("query", "key", "value", "dense")
    ),
    "xlm-roberta": _row(("query", "value"), adalora=()),
    "electra": _row(("query", "value"), adalora=()),
    "t5": _row(("q", "v"), (("k", "v", "wo"), ("wo",)), ("q", "k", "v", "o", "wi", "wo")),
    "mt5": _row(("q", "v"), (("k", "v", "wi_1"), ()), ("q", "k", "v", "o", "wi_0", "wi_1", "wo")),
    "bart": _row(
        _QV,
        (("q_proj", "v_proj", "fc2"), ("fc2",)),
        _ALL_BART,
        prefix=PrefixSupport("seq2seq", (TaskType.SEQ_2_SEQ_LM,)),
        scaled_embedding=True,
    ),
    "mbart": Architecture(targets={}, scaled_embedding=True),
    "gpt_neo": _row(_QV, (("q_proj", "v_proj", "c_proj"), ("c_proj",)), head_output_is_logits=True),
    "gptj": _row(_QV, (("q_proj", "v_proj", "fc_out"), ("fc_out",)), head_output_is_logits=True),
    "opt": _row(_QV, (("q_proj", "k_proj", "fc2"), ("fc2",)), _ALL_BART, head_output_is_logits=True),
    "bloom": _row(
        ("query_key_value",), (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)), head_output_is_logits=True
    ),
    "xglm": Architecture(targets={}, head_output_is_logits=True),
}


def architecture(model_type: str | None) -> Architecture | None:
    """The row of ``model_type``, or ``None`` when jpeft has no defaults for it."""
    return ARCHITECTURES.get(model_type or "")


def default_targets(method: str, model_type: str | None) -> list[str] | None:
    """PEFT's default ``target_modules`` of ``method`` (a PEFT type name) for ``model_type``."""
    row = architecture(model_type)
    targets = row.targets.get(method) if row is not None else None
    return list(targets) if targets is not None else None


def prefix_supported() -> str:
    """The architectures and tasks prefix tuning supports, for messages."""
    return ", ".join(
        f"{name} ({'/'.join(t.value for t in row.prefix.tasks)})"
        for name, row in ARCHITECTURES.items()
        if row.prefix is not None
    )
