"""The models the ``jpeft`` command trains: jpeft's own families first, transformers' Flax classes for the rest.

- ``builtin`` (the main job's default): a tiny Llama of :mod:`jpeft.models`, randomly initialised
  from :data:`BUILTIN_CONFIG`, with jpeft's byte tokenizer: no network.
- ``builtin-gpt2``: the earlier built-in model, a tiny transformers Flax GPT-2 (the path other
  architectures take).
- a folder or Hub id whose ``config.json`` names a family of :data:`jpeft.models.FAMILIES` loads
  into jpeft's own model; any other architecture into transformers' ``FlaxAutoModelForCausalLM``.

Also what the after-training checks need of either kind: a torch twin of the base, a sample,
and a merged transformers torch checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from jpeft.errors import JpeftError

BUILTIN = "builtin"
BUILTIN_GPT2 = "builtin-gpt2"
BUILTIN_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.1,
    "bos_token_id": 10,
    "eos_token_id": 10,
    "tie_word_embeddings": False,
}


class CliError(JpeftError):
    """A user error reported as one line."""


def _model_type(name: str) -> str | None:
    """``model_type`` of a local folder's or a Hub repo's ``config.json`` (``None`` when it has none)."""
    from jpeft.interop import hf_checkpoint

    folder = hf_checkpoint.resolve_config_folder(name)
    if not (folder / "config.json").exists():
        return None
    return hf_checkpoint.read_model_config(folder).get("model_type")


def load_causal_lm(name: str, seed: int = 0, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``builtin``, ``builtin-gpt2``, a local transformers folder, or a Hub id.

    ``dtype`` is the compute dtype (weights stay float32); ``None`` is float32.
    """
    import jax.numpy as jnp

    import jpeft.models
    from jpeft.data import ByteTokenizer

    dtype = jnp.float32 if dtype is None else dtype
    if name == BUILTIN:
        model = jpeft.models.AutoModelForCausalLM.from_config(BUILTIN_CONFIG, key=seed, dtype=dtype, param_dtype=jnp.float32)
        model.name_or_path = "jpeft-builtin-tiny-llama"
        return model, ByteTokenizer()
    warnings.filterwarnings("ignore", message="TensorFlow and JAX classes are deprecated")
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    if name == BUILTIN_GPT2:
        from transformers import FlaxGPT2LMHeadModel, GPT2Config

        config = GPT2Config(
            n_embd=128, n_layer=4, n_head=4, vocab_size=256, n_positions=128, bos_token_id=10, initializer_range=0.1,
            eos_token_id=10,
        )
        config._name_or_path = "jpeft-builtin-tiny-gpt2"
        return FlaxGPT2LMHeadModel(config, seed=seed, dtype=dtype), ByteTokenizer()
    from transformers import AutoTokenizer, FlaxAutoModelForCausalLM

    path = Path(name)
    if not path.exists() and (name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)):
        raise CliError(f"model folder {name!r} does not exist; pass a transformers folder, a Hub id, or 'builtin'.")
    try:
        if _model_type(name) in jpeft.models.FAMILIES:
            model = jpeft.models.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, param_dtype=jnp.float32)
        else:
            from_pt = path.is_dir() and not (path / "flax_model.msgpack").exists()
            model = FlaxAutoModelForCausalLM.from_pretrained(name, from_pt=from_pt, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    return model, tokenizer


def is_family(model: Any) -> bool:
    """Whether ``model`` is one of jpeft's own family models (else a transformers Flax model)."""
    from jpeft.models import CausalLM

    return isinstance(model, CausalLM)


def torch_twin(model: Any) -> Any:
    """The torch (transformers) model holding ``model``'s weights, in eval mode."""
    if not is_family(model):
        from jpeft.interop.torch_export import torch_model_from_flax

        return torch_model_from_flax(model)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="jpeft-twin-") as folder:
        model.save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder).eval()


def sample(base: Any, peft_model: Any, prompt_ids: Any, new_tokens: int, seed: int) -> Any:
    """``new_tokens`` sampled (top-k 5) after ``prompt_ids`` by ``peft_model`` on ``base``: the prompt, then them."""
    import jax
    import numpy as np

    if is_family(base):
        return peft_model.generate(
            prompt_ids, max_new_tokens=new_tokens, do_sample=True, top_k=5, key=jax.random.key(seed), eos_token_id=None
        )
    return peft_model.generate(
        prompt_ids,
        attention_mask=np.ones_like(prompt_ids),
        max_length=prompt_ids.shape[1] + new_tokens,
        do_sample=True,
        top_k=5,
        prng_key=jax.random.key(seed),
        pad_token_id=0,
    ).sequences


def save_merged(base: Any, peft_model: Any, directory: str | os.PathLike) -> None:
    """A transformers torch checkpoint of ``base`` with ``peft_model``'s adapters merged in."""
    if is_family(base):
        peft_model.merge_and_unload(dequantize=True).save_pretrained(directory)
        return
    from jpeft.interop.torch_export import save_torch_checkpoint

    save_torch_checkpoint(base, directory, params=peft_model.get_merged_params())
