"""``AutoModelForCausalLM`` and ``AutoModelForSequenceClassification``: jpeft's own family models.

    model = jpeft.models.AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B", dtype=jnp.bfloat16)
    peft_model = jpeft.get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained("out")       # config.json + safetensors that transformers' torch class loads

Supported ``model_type`` values: :data:`FAMILIES`. Other architectures (GPT-2, BERT, BART, ...)
are adapted through transformers' Flax classes (``transformers.FlaxAutoModel...``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jpeft.errors import ConfigError
from jpeft.interop import hf_checkpoint
from jpeft.models import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3
from jpeft.models.classification import SequenceClassification
from jpeft.models.config import DecoderConfig
from jpeft.models.decoder import CausalLM, DecoderBase
from jpeft.models.loading import fill
from jpeft.quant.params import QuantizationConfig

FAMILIES: Mapping[str, Callable[[Mapping[str, Any]], DecoderConfig]] = {
    "llama": llama.read_config,
    "mistral": mistral.read_config,
    "qwen2": qwen2.read_config,
    "qwen3": qwen3.read_config,
    "gemma2": gemma2.read_config,
    "gemma3_text": gemma3.read_config,
    "phi3": phi3.read_config,
}


def config_from(config: Any) -> DecoderConfig:
    """A :class:`DecoderConfig` from a ``config.json`` dict, a transformers config or a ``DecoderConfig``."""
    if isinstance(config, DecoderConfig):
        return config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    model_type = raw.get("model_type")
    reader = FAMILIES.get(model_type or "")
    if reader is None:
        raise ConfigError(
            f"jpeft.models has no {model_type!r} family; it has {', '.join(FAMILIES)}. For other architectures "
            "load transformers' Flax class (e.g. transformers.FlaxAutoModelForCausalLM) and pass it to "
            "jpeft.get_peft_model."
        )
    return reader(raw)


def _dtype(value: Any) -> Any:
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        try:
            return jnp.dtype(name)
        except TypeError as err:
            raise ConfigError(f"unknown dtype {value!r}; use jnp.float32, jnp.bfloat16 or jnp.float16.") from err
    return jnp.dtype(value)


def _with_labels(cfg: DecoderConfig, num_labels: int | None) -> DecoderConfig:
    if num_labels is None:
        return cfg
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ConfigError(f"num_labels must be a positive integer, got {num_labels!r}.")
    return dataclasses.replace(cfg, num_labels=num_labels)


def _from_config(
    cls: type[DecoderBase],
    config: Any,
    key: Any,
    dtype: Any,
    param_dtype: Any,
    scan_layers: bool,
    num_labels: int | None = None,
) -> Any:
    cfg = _with_labels(config_from(config), num_labels)
    dtype, param_dtype = _dtype(dtype), _dtype(param_dtype)
    return cls(
        cfg, rngs=nnx.Rngs(key), dtype=dtype, param_dtype=param_dtype or dtype or jnp.float32, scan_layers=scan_layers
    )


def _from_pretrained(
    cls: type[DecoderBase],
    path_or_hub_id: str | os.PathLike,
    *,
    dtype: Any,
    param_dtype: Any,
    mesh: Mesh | None,
    quantization_config: QuantizationConfig | None,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    scan_layers: bool,
    num_labels: int | None = None,
) -> Any:
    folder = hf_checkpoint.resolve_model_folder(path_or_hub_id, revision=revision, token=token, cache_dir=cache_dir)
    cfg = _with_labels(config_from(hf_checkpoint.read_model_config(folder)), num_labels)
    dtype, param_dtype = _dtype(dtype), _dtype(param_dtype)
    param_dtype = param_dtype or dtype or jnp.float32
    index = hf_checkpoint.open_checkpoint(folder)
    abstract = nnx.eval_shape(
        lambda: cls(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    )
    classifier = cls is SequenceClassification
    model = fill(
        abstract,
        index,
        num_layers=cfg.num_hidden_layers,
        scan_layers=scan_layers,
        tied=cfg.tie_word_embeddings,
        param_dtype=param_dtype,
        mesh=mesh,
        quantization=quantization_config,
        new_modules={"score": cfg.initializer_range} if classifier else None,
        ignored=frozenset({"lm_head.weight"}) if classifier else frozenset(),
    )
    assert isinstance(model, cls)
    model.name_or_path = os.fspath(path_or_hub_id)
    return model


class AutoModelForCausalLM:
    """Builds a :class:`~jpeft.models.decoder.CausalLM` of the family its config names."""

    @staticmethod
    def from_config(
        config: Any,
        *,
        key: jax.Array | int = 0,
        dtype: Any = None,
        param_dtype: Any = None,
        scan_layers: bool = False,
    ) -> CausalLM:
        """A randomly initialised model (normal(``initializer_range``) weights, norms at their identity).

        Args:
          config: ``config.json`` as a dict, a transformers config, or a ``DecoderConfig``.
          key: PRNG key (or seed) of the init.
          dtype: compute dtype (default: the params'); also the param dtype unless ``param_dtype``.
          param_dtype: storage dtype of the weights (default float32).
          scan_layers: stack the blocks and run them with ``nnx.scan`` (one block compiled).
        """
        model: CausalLM = _from_config(CausalLM, config, key, dtype, param_dtype, scan_layers)
        return model

    @staticmethod
    def from_pretrained(
        path_or_hub_id: str | os.PathLike,
        *,
        dtype: Any = None,
        param_dtype: Any = None,
        mesh: Mesh | None = None,
        quantization_config: QuantizationConfig | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        scan_layers: bool = False,
    ) -> CausalLM:
        """A causal LM with the weights of a transformers checkpoint (``config.json`` + safetensors).

        Args:
          path_or_hub_id: a local folder or a Hub repo id (downloaded to the HF cache; offline with
            ``HF_HUB_OFFLINE=1``). Safetensors only: a pickle checkpoint is refused.
          dtype: compute dtype (and param dtype unless ``param_dtype``); stored tensors of any
            dtype are cast. Default: float32 params, as transformers' ``from_pretrained``.
          param_dtype: storage dtype of the weights.
          mesh: place each weight directly in its FSDP sharding on this mesh (axis ``fsdp``).
          quantization_config: quantize each linear kernel as it is read (QLoRA's NF4/FP4/int8
            base; heads and embeddings stay as they are).
          revision, token, cache_dir: Hub download options.
          scan_layers: stack the blocks and run them with ``nnx.scan`` (one block compiled).
        """
        model: CausalLM = _from_pretrained(
            CausalLM, path_or_hub_id, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
            quantization_config=quantization_config, revision=revision, token=token, cache_dir=cache_dir,
            scan_layers=scan_layers,
        )
        return model



class AutoModelForSequenceClassification:
    """Builds a :class:`~jpeft.models.classification.SequenceClassification` of the family its config names.

    Example:
      >>> model = jpeft.models.AutoModelForSequenceClassification.from_pretrained("Qwen/Qwen3-0.6B", num_labels=3)
      >>> peft_model = jpeft.get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8))  # `score` is trained too
    """

    @staticmethod
    def from_config(
        config: Any,
        *,
        key: jax.Array | int = 0,
        dtype: Any = None,
        param_dtype: Any = None,
        scan_layers: bool = False,
        num_labels: int | None = None,
    ) -> SequenceClassification:
        """A randomly initialised classifier (arguments as :meth:`AutoModelForCausalLM.from_config`).

        ``num_labels`` overrides the config's (``id2label``'s length, default 2).
        """
        model: SequenceClassification = _from_config(
            SequenceClassification, config, key, dtype, param_dtype, scan_layers, num_labels=num_labels
        )
        return model

    @staticmethod
    def from_pretrained(
        path_or_hub_id: str | os.PathLike,
        *,
        num_labels: int | None = None,
        dtype: Any = None,
        param_dtype: Any = None,
        mesh: Mesh | None = None,
        quantization_config: QuantizationConfig | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        scan_layers: bool = False,
    ) -> SequenceClassification:
        """A classifier with the weights of a transformers checkpoint.

        The checkpoint is a ``...ForSequenceClassification`` one, or a causal LM's: its
        ``lm_head`` is dropped and ``score`` initialised at random with a warning, as
        transformers does. ``num_labels`` sets the outputs of ``score`` (default: the
        config's); the other arguments are :meth:`AutoModelForCausalLM.from_pretrained`'s.
        """
        model: SequenceClassification = _from_pretrained(
            SequenceClassification, path_or_hub_id, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
            quantization_config=quantization_config, revision=revision, token=token, cache_dir=cache_dir,
            scan_layers=scan_layers, num_labels=num_labels,
        )
        return model

