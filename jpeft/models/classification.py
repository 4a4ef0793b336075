"""Sequence classification over a family's decoder: transformers' ``<X>ForSequenceClassification``.

``score`` (a bias-free ``Linear(hidden, num_labels)``) is applied at every position and the
logits of the last non-padding token of each row are returned, as transformers'
``GenericForSequenceClassification``: the index is ``argmax_t(t * [input_ids[t] != pad])``, so
left and right padding both work and an all-padding row takes position 0. Without a
``pad_token_id`` a batch of one takes the last position and larger batches are refused; with
``inputs_embeds`` the last position is taken. No final soft-cap (transformers applies it in the
causal LM only).

With PEFT's ``task_type="SEQ_CLS"``, ``score`` joins ``modules_to_save`` and the adapter
interchanges with torch (``LlamaForSequenceClassification`` ...).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jpeft.models.config import DecoderConfig
from jpeft.models.decoder import DecoderBase, head
from jpeft.models.layers import KVCache

# transformers' class per family where it is not ``<X>ForCausalLM`` with the suffix changed
_TORCH_CLASSES = {"gemma3_text": "Gemma3TextForSequenceClassification"}


@flax.struct.dataclass
class SequenceClassifierOutput:
    """``logits`` ``(batch, num_labels)`` and the updated ``cache`` (or ``None``)."""

    logits: jax.Array
    cache: KVCache | None = None


def torch_class_name(config: DecoderConfig) -> str:
    """transformers' sequence-classification class of ``config``'s family."""
    name = _TORCH_CLASSES.get(config.model_type)
    return name or config.torch_class_name.replace("ForCausalLM", "ForSequenceClassification")


def pooled_index(input_ids: jax.Array | None, pad_token_id: int | None, batch: int, length: int) -> jax.Array:
    """Per row, the position whose logits classify it (transformers' rule, see the module docstring)."""
    if input_ids is None:
        return jnp.full((batch,), length - 1, jnp.int32)
    if pad_token_id is None:
        if batch != 1:
            raise ValueError(
                "sequence classification of a batch larger than one needs `pad_token_id` in the model config (to "
                "find each row's last token); set it, as transformers requires."
            )
        return jnp.full((batch,), length - 1, jnp.int32)
    positions = jnp.arange(length, dtype=jnp.int32)
    return jnp.argmax(positions * (jnp.asarray(input_ids) != pad_token_id), axis=-1).astype(jnp.int32)


class SequenceClassification(DecoderBase):
    """A family's decoder with transformers' ``score`` head (build it with
    :class:`jpeft.models.AutoModelForSequenceClassification`).

    Attributes:
      config: the resolved :class:`~jpeft.models.config.DecoderConfig` (``num_labels`` outputs).
      model: embeddings, blocks and final norm (torch's ``model.*``).
      score: ``Linear(hidden, num_labels)`` without bias.
    """

    task = "SEQ_CLS"

    def __init__(
        self,
        config: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scan_layers: bool = False,
    ):
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
        self.score = head(config, config.num_labels, (dtype, param_dtype), rngs)

    @property
    def torch_class_name(self) -> str:
        return torch_class_name(self.config)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        inputs_embeds: jax.Array | None = None,
        pool_last_position: bool = False,
    ) -> SequenceClassifierOutput:
        """Class logits ``(batch, num_labels)`` of each row (arguments as :class:`CausalLM`'s).

        ``pool_last_position``: take the last position whatever the ids (what transformers does
        when it is given ``inputs_embeds``, as PEFT's prompt tuning gives it).
        """
        h, cache = self.hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        logits = self.score(h)
        batch, length = logits.shape[:2]
        ids = None if pool_last_position else input_ids
        index = pooled_index(ids, self.config.pad_token_id, batch, length)
        pooled = jnp.take_along_axis(logits, index[:, None, None], axis=1)[:, 0]
        return SequenceClassifierOutput(logits=pooled, cache=cache)
