"""Tiny random transformers models, the same weights in torch and in Flax.

The torch model is built from a config with a fixed seed and saved; the Flax model is
loaded from that folder with ``from_pt=True``. No network is used.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ARCHS = ("gpt2", "llama", "bert", "bart", "opt")


@dataclasses.dataclass
class TinyPair:
    arch: str
    folder: Path  # torch `save_pretrained` folder of the base model
    flax_model: Any
    torch_class: Any
    flax_class: Any

    def torch_model(self):
        """A fresh torch copy of the base model, in eval mode."""
        return self.torch_class.from_pretrained(self.folder).eval()

    def inputs(self, batch: int = 2, length: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.RandomState(seed)
        ids = rng.randint(3, self.flax_model.config.vocab_size, (batch, length)).astype(np.int32)
        mask = np.ones_like(ids)
        if self.arch == "bert":
            mask[0, -2:] = 0  # right padding; causal LMs differ in how they place left-padded positions
        out = {"input_ids": ids, "attention_mask": mask}
        if self.arch == "bart":
            out["decoder_input_ids"] = rng.randint(3, self.flax_model.config.vocab_size, (batch, 5)).astype(
                np.int32
            )
        return out


def configs():
    import transformers as tf

    return {
        "gpt2": (
            tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64),
            tf.GPT2LMHeadModel,
            tf.FlaxGPT2LMHeadModel,
        ),
        "llama": (
            tf.LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=100,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            ),
            tf.LlamaForCausalLM,
            tf.FlaxLlamaForCausalLM,
        ),
        "bert": (
            tf.BertConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=100,
                max_position_embeddings=64,
                num_labels=3,
            ),
            tf.BertForSequenceClassification,
            tf.FlaxBertForSequenceClassification,
        ),
        "bart": (
            tf.BartConfig(
                d_model=32,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                vocab_size=100,
                max_position_embeddings=64,
            ),
            tf.BartForConditionalGeneration,
            tf.FlaxBartForConditionalGeneration,
        ),
        # FlaxOPT's `__call__` takes `deterministic=`, not `train=`; dropout stays at its 0.1 default.
        "opt": (
            tf.OPTConfig(
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=100,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            ),
            tf.OPTForCausalLM,
            tf.FlaxOPTForCausalLM,
        ),
    }


def build(arch: str, folder: Path) -> TinyPair:
    import torch

    config, torch_class, flax_class = configs()[arch]
    torch.manual_seed(0)
    model = torch_class(config).eval()
    with torch.no_grad():  # BERT/BART init biases and norms to constants; randomise them
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flax_model = flax_class.from_pretrained(folder, from_pt=True)
    return TinyPair(arch, Path(folder), flax_model, torch_class, flax_class)
