"""P-tuning: virtual-token embeddings produced by a small trained encoder.

A table of ``num_virtual_tokens * num_transformer_submodules`` rows goes through an MLP
(``Linear -> ReLU -> Linear -> ReLU -> Linear``) or a bidirectional LSTM followed by
``Linear -> ReLU -> Linear``; the encoder's output is placed in front of the input
embeddings exactly as in prompt tuning. Only that output is saved (as
``prompt_embeddings``): a loaded adapter is a plain table and cannot resume training.

Adapter tree (Flax orientation: kernels are ``(in, out)``)::

    {"prompt": {"embedding": (rows, token_dim),
                "mlp_head": {"0": {"kernel", "bias"}, "2": ..., ["4": ...]},
                ["lstm_head": {"l0": {"kernel_ih": (in, 4H), "kernel_hh": (H, 4H),
                                      "bias_ih": (4H,), "bias_hh": (4H,)},
                               "l0_reverse": ..., "l1": ..., ...}]},
     "modules_to_save": {module: subtree}, "bias": {}}

The LSTM follows torch's ``nn.LSTM`` (gate order i, f, g, o; both biases; dropout between
layers in training), so a torch ``PromptEncoder``'s weights map over one to one
(:func:`encoder_from_torch`).

Reference:
  Liu et al., "GPT Understands, Too", 2021.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.config import PeftType
from jpeft.core import method, registry
from jpeft.core.tree import PyTree
from jpeft.errors import ConfigError
from jpeft.tuners import base, prompt_base
from jpeft.tuners.prompt_base import (
    PromptLearningConfig,
    VirtualTokenPlan,
)

_MLP_LAYERS = 2  # PEFT's default `encoder_num_layers`; the MLP always has this many hidden layers


class PromptEncoderReparameterizationType(enum.StrEnum):
    """The encoder of P-tuning (PEFT's ``PromptEncoderReparameterizationType``)."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """PEFT's ``PromptEncoderConfig``: the same fields and defaults.

    Attributes:
      encoder_reparameterization_type: ``"MLP"`` (default) or ``"LSTM"``.
      encoder_hidden_size: the encoder's hidden width (default: ``token_dim``, filled).
      encoder_num_layers: LSTM layers; ignored (with a warning) by the MLP, which always
        has two hidden layers.
      encoder_dropout: dropout between LSTM layers in training.

    Example:
      >>> config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=64)
    """

    peft_type: ClassVar[PeftType] = PeftType.P_TUNING

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = (
        PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            kind = PromptEncoderReparameterizationType(self.encoder_reparameterization_type)
        except ValueError:
            raise ConfigError(
                f"Prompt encoder type not recognized: {self.encoder_reparameterization_type!r}. Please use one of "
                "MLP (recommended) or LSTM."
            ) from None
        object.__setattr__(self, "encoder_reparameterization_type", kind)
        if isinstance(self.encoder_num_layers, bool) or int(self.encoder_num_layers) < 1:
            raise ConfigError(
                f"`encoder_num_layers` must be a positive int, got {self.encoder_num_layers!r}."
            )
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ConfigError(f"`encoder_dropout` must be in [0, 1), got {self.encoder_dropout!r}.")
        if self.encoder_hidden_size is not None and int(self.encoder_hidden_size) < 1:
            raise ConfigError(
                f"`encoder_hidden_size` must be a positive int, got {self.encoder_hidden_size!r}."
            )


# --------------------------------------------------------------------------- resolve and init


def prepare(config: PromptEncoderConfig, binding: Any) -> VirtualTokenPlan:
    """Fills ``config`` from the model (``encoder_hidden_size`` defaults to ``token_dim``).

    Raises:
      ConfigError: unsupported model or task type (names the model class).
    """
    if not isinstance(config, PromptEncoderConfig):
        raise TypeError(f"P-tuning needs a PromptEncoderConfig, got {type(config).__name__}.")
    if (
        not config.inference_mode
        and config.encoder_reparameterization_type == PromptEncoderReparameterizationType.MLP
        and config.encoder_num_layers != _MLP_LAYERS
    ):
        warnings.warn(
            f"for MLP, the argument `encoder_num_layers` is ignored. Exactly {_MLP_LAYERS} MLP layers are used.",
            stacklevel=3,
        )
    return prompt_base.prepare_virtual_tokens(config, binding)


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _linear(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    """torch ``nn.Linear``'s default init, weight and bias U(-1/sqrt(in), 1/sqrt(in)), as an (in, out) kernel."""
    k_kernel, k_bias = jax.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "kernel": _uniform(k_kernel, (fan_in, fan_out), bound),
        "bias": _uniform(k_bias, (fan_out,), bound),
    }


def _lstm_cell(key: jax.Array, fan_in: int, hidden: int) -> dict[str, jax.Array]:
    """torch ``nn.LSTM``'s default init: every weight and bias U(-1/sqrt(H), 1/sqrt(H))."""
    keys = jax.random.split(key, 4)
    bound = 1.0 / math.sqrt(hidden)
    return {
        "kernel_ih": _uniform(keys[0], (fan_in, 4 * hidden), bound),
        "kernel_hh": _uniform(keys[1], (hidden, 4 * hidden), bound),
        "bias_ih": _uniform(keys[2], (4 * hidden,), bound),
        "bias_hh": _uniform(keys[3], (4 * hidden,), bound),
    }


def init_encoder(config: PromptEncoderConfig, rows: int, key: jax.Array) -> dict[str, Any]:
    """A fresh encoder with torch's default inits (embedding N(0, 1))."""
    assert config.token_dim is not None  # prepare fills it from the model
    dim, hidden = int(config.token_dim), int(config.encoder_hidden_size or config.token_dim)
    k_embed, k_lstm, k_mlp = jax.random.split(key, 3)
    encoder: dict[str, Any] = {"embedding": jax.random.normal(k_embed, (rows, dim), jnp.float32)}
    mlp_keys = jax.random.split(k_mlp, 3)
    if config.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM:
        lstm: dict[str, Any] = {}
        for layer in range(int(config.encoder_num_layers)):
            fan_in = dim if layer == 0 else 2 * hidden
            for direction, suffix in enumerate(("", "_reverse")):
                cell_key = jax.random.fold_in(k_lstm, 2 * layer + direction)
                lstm[f"l{layer}{suffix}"] = _lstm_cell(cell_key, fan_in, hidden)
        encoder["lstm_head"] = lstm
        encoder["mlp_head"] = {
            "0": _linear(mlp_keys[0], 2 * hidden, 2 * hidden),
            "2": _linear(mlp_keys[1], 2 * hidden, dim),
        }
    else:
        encoder["mlp_head"] = {
            "0": _linear(mlp_keys[0], dim, hidden),
            "2": _linear(mlp_keys[1], hidden, hidden),
            "4": _linear(mlp_keys[2], hidden, dim),
        }
    return encoder


def init_params(plan: VirtualTokenPlan, base_params: PyTree, key: jax.Array) -> tuple[dict[str, Any], None]:
    """The prompt encoder plus ``modules_to_save`` copies.

    A loaded adapter (``inference_mode``) is only the saved encoder output: a zero table of
    ``(nvt * nts, token_dim)`` that the checkpoint's ``prompt_embeddings`` fill (as PEFT).
    """
    config = plan.config
    assert isinstance(config, PromptEncoderConfig)  # prepare refuses any other config
    rows = plan.total_virtual_tokens
    if config.inference_mode:
        assert config.token_dim is not None  # prepare fills it from the model
        encoder: dict[str, Any] = {"embedding": jnp.zeros((rows, int(config.token_dim)), jnp.float32)}
    else:
        encoder = init_encoder(config, rows, key)
    overrides = base.init_overrides(base_params, plan.modules_to_save, plan.modules, ())
    return {"prompt": encoder, **overrides}, None


def encoder_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A torch ``PromptEncoder``'s ``state_dict()`` as jpeft's ``adapter["prompt"]`` tree.

    Linear weights are transposed to ``(in, out)`` kernels; LSTM ``weight_ih_l{k}[_reverse]``
    becomes ``l{k}[_reverse]/kernel_ih`` (transposed), and so on. Use it to continue a
    torch P-tuning run in jpeft, or to compare the two encoders.
    """
    tree: dict[str, Any] = {}
    for key, value in state_dict.items():
        # a copy: `.numpy()` shares the tensor's memory, and jax on the CPU may alias a NumPy buffer
        # (jax-ml/jax#37830), so torch training on would otherwise change jpeft's tree
        array = np.array(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
        if key == "embedding.weight":
            tree["embedding"] = jnp.asarray(array)
        elif match := re.fullmatch(r"mlp_head\.(\d+)\.(weight|bias)", key):
            layer = tree.setdefault("mlp_head", {}).setdefault(match[1], {})
            layer["kernel" if match[2] == "weight" else "bias"] = jnp.asarray(
                array.T if match[2] == "weight" else array
            )
        elif match := re.fullmatch(r"lstm_head\.(weight|bias)_(ih|hh)_l(\d+)(_reverse)?", key):
            cell = tree.setdefault("lstm_head", {}).setdefault(f"l{match[3]}{match[4] or ''}", {})
            is_weight = match[1] == "weight"
            cell[f"{'kernel' if is_weight else 'bias'}_{match[2]}"] = jnp.asarray(
                array.T if is_weight else array
            )
        else:
            raise ValueError(
                f"unexpected key {key!r} in a torch PromptEncoder state dict (expected embedding.weight, "
                "mlp_head.N.weight/bias, lstm_head.weight_ih_lK...); pass `prompt_encoder[name].state_dict()`."
            )
    return tree


# --------------------------------------------------------------------------- forward


def _mlp(layers: Mapping[str, Mapping[str, jax.Array]], x: jax.Array) -> jax.Array:
    """torch ``Sequential(Linear, ReLU, Linear, ...)`` with the Linears at the (numbered) keys of ``layers``."""
    order = sorted(layers, key=int)
    for position, name in enumerate(order):
        x = x @ layers[name]["kernel"] + layers[name]["bias"]
        if position < len(order) - 1:
            x = jax.nn.relu(x)
    return x


def _lstm_direction(cell: Mapping[str, jax.Array], x: jax.Array, reverse: bool) -> jax.Array:
    """One direction of one torch LSTM layer over ``x`` ``(T, in)``; gates in torch's order i, f, g, o."""
    hidden = cell["kernel_hh"].shape[0]
    inputs = x[::-1] if reverse else x
    input_gates = inputs @ cell["kernel_ih"] + cell["bias_ih"] + cell["bias_hh"]

    def step(
        carry: tuple[jax.Array, jax.Array], gates_x: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        h, c = carry
        i, f, g, o = jnp.split(gates_x + h @ cell["kernel_hh"], 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), x.dtype)
    _, outputs = jax.lax.scan(step, (zeros, zeros), input_gates)
    return outputs[::-1] if reverse else outputs


def bidirectional_lstm(
    cells: Mapping[str, Mapping[str, jax.Array]],
    x: jax.Array,
    *,
    dropout: float = 0.0,
    train: bool = False,
    key: jax.Array | None = None,
) -> jax.Array:
    """torch's ``nn.LSTM(bidirectional=True, batch_first=True)`` output for one sequence ``(T, in)``.

    Dropout (``dropout`` > 0, training only) applies to every layer's output except the last.
    """
    num_layers = len(cells) // 2
    for layer in range(num_layers):
        forward = _lstm_direction(cells[f"l{layer}"], x, reverse=False)
        backward = _lstm_direction(cells[f"l{layer}_reverse"], x, reverse=True)
        x = jnp.concatenate([forward, backward], axis=-1)
        if train and dropout > 0.0 and layer < num_layers - 1:
            layer_key = None if key is None else jax.random.fold_in(key, layer)
            x = base.dropout(x, dropout, layer_key, "encoder_dropout")
    return x


def prompt_embeddings(
    plan: VirtualTokenPlan, adapter: Mapping[str, Any], *, train: bool = False, key: jax.Array | None = None
) -> jax.Array:
    """The encoder output ``(nvt * nts, token_dim)``: what PEFT saves as ``prompt_embeddings``.

    A loaded adapter's table is returned as is. ``key`` drives the LSTM's dropout in training.
    """
    encoder = adapter["prompt"]
    x = encoder["embedding"]
    if "mlp_head" not in encoder:
        return x
    if "lstm_head" in encoder:
        config = cast(PromptEncoderConfig, plan.config)  # this method's plans hold its config
        dropout = float(config.encoder_dropout)
        x = bidirectional_lstm(encoder["lstm_head"], x, dropout=dropout, train=train, key=key)
    return _mlp(encoder["mlp_head"], x)


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

registry.register(PeftType.P_TUNING, PromptEncoderConfig, METHOD, kind="prompt")

# PEFT calls the method P-tuning (``peft_type="P_TUNING"``); its config class is PromptEncoderConfig.
PTuningConfig = PromptEncoderConfig
