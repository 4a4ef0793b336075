"""LoRA: low-rank adaptation, with DoRA, rsLoRA, PiSSA and OLoRA options.

``y = W x + (alpha / r) * B A dropout(x)``; only ``A`` (r x in) and ``B`` (out x r)
train. Embeddings get ``(alpha / r) * B A[ids]`` (no dropout). DoRA rescales the
adapted weight per output feature by a trained magnitude ``m / ||W + s B A||``.

Adapter tree (Flax orientation, so ``x @ A @ B`` needs no transposes)::

    {"lora": {module: {"lora_A": (in, r), "lora_B": (r, out),
                       ["lora_B_bias": (out,)], ["lora_magnitude_vector": (out,)]}},
     "modules_to_save": {module: subtree}, "bias": {leaf path: array}}

For embeddings ``lora_A`` is ``(num_embeddings, r)`` and ``lora_B`` ``(r, dim)``.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
  Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024.
  Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023.
  Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation", 2024.
  Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", 2024.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.config import PeftConfig, PeftType
from jpeft.core import registry
from jpeft.core.modules import ModuleInfo
from jpeft.core.targets import get_pattern_key
from jpeft.core.tree import PyTree, count_params, get_path, set_path
from jpeft.errors import ConfigError
from jpeft.quant.formats import is_quantized
from jpeft.quant.loftq import loftq_init
from jpeft.tuners import base, lowrank

_INITS = ("gaussian", "pissa", "olora", "loftq")
# PEFT's save_embedding_layers="auto" saves the base weights of these when targeted.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(PeftConfig):
    """PEFT's ``LoraConfig``: the same fields, defaults and meanings.

    Attributes:
      r: rank of the update.
      target_modules: module names or suffixes (list), a regex matched against the
        whole name (string), ``"all-linear"``, or ``None`` for PEFT's default for the
        model type.
      exclude_modules: names/suffixes (list) or a full-match regex (string) to skip.
      lora_alpha: scaling numerator: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
        ``use_rslora``).
      lora_dropout: dropout on the input of ``A`` in training.
      fan_in_fan_out: PEFT's flag for ``Conv1D`` (GPT-2) targets; set automatically.
      bias: ``"none"``, ``"all"`` (every parameter named ``*bias*`` trains) or
        ``"lora_only"`` (the targeted layers' biases train).
      use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
      modules_to_save: modules (matched by name ending) trained in full and saved.
      init_lora_weights: ``True`` (A Kaiming-uniform, B zero), ``"gaussian"``,
        ``False`` (both random: not a no-op), ``"pissa"``/``"pissa_niter_K"`` or
        ``"olora"`` (both also rewrite the base weights).
      layers_to_transform, layers_pattern: restrict list targets to layer indexes.
      rank_pattern, alpha_pattern: per-module ``r`` / ``lora_alpha`` by name regex.
      use_dora: weight-decomposed LoRA (trained magnitude per output feature).
      lora_bias: a trainable bias on ``B``.

    Example:
      >>> config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    """

    peft_type: ClassVar[PeftType] = PeftType.LORA
    unsupported_fields: ClassVar[dict[str, Any]] = {
        "megatron_config": None,
        "trainable_token_indices": None,
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "monteclora_config": None,
        "layer_replication": None,
        "target_parameters": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        "ensure_weight_tying": False,
    }

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: dict | LoftQConfig = dataclasses.field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: Any = None
    lora_bias: bool = False
    target_parameters: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple, set, frozenset)):
            object.__setattr__(self, "target_modules", list(dict.fromkeys(self.target_modules)))
        if isinstance(self.exclude_modules, (tuple, set, frozenset)):
            object.__setattr__(self, "exclude_modules", list(self.exclude_modules))
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", list(self.modules_to_save))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {self.r!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"`bias` must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if isinstance(self.target_modules, str) and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise ConfigError(
                "`layers_to_transform` and `layers_pattern` apply only when `target_modules` is a list; a regex "
                "string already selects whole names. Put the layer index in the regex or pass a list."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified "
                "(the indexes of the layers to adapt)."
            )
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"`lora_bias=True` works only with `init_lora_weights` True or False (as in PEFT), got "
                f"{self.init_lora_weights!r}; drop one of the two."
            )
        if self.use_dora and self.lora_bias:
            raise ConfigError(
                "`use_dora=True` cannot be combined with `lora_bias=True` (as in PEFT); pick one."
            )
        loftq = self.loftq_config
        if isinstance(loftq, LoftQConfig):
            loftq = loftq.to_dict()
        loftq = dict(loftq or {})
        if loftq and self.init_lora_weights != "loftq":
            warnings.warn(
                "`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                stacklevel=3,
            )
            loftq = {}
        if self.init_lora_weights == "loftq":
            if not loftq:
                raise ConfigError(
                    "`loftq_config` must be specified when `init_lora_weights` is 'loftq', e.g. "
                    "loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)."
                )
            LoftQConfig(**loftq)  # validates
        object.__setattr__(self, "loftq_config", loftq)
        init = self.init_lora_weights
        if not (
            isinstance(init, bool)
            or init in _INITS
            or (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init))
        ):
            raise ConfigError(
                f"`init_lora_weights={init!r}` is not supported by jpeft. Use True, False, 'gaussian', 'pissa', "
                "'pissa_niter_K', 'olora' or 'loftq' (EVA, CorDA, LoRA-GA and orthogonal inits are not implemented)."
            )
        for pattern_field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, pattern_field):
                try:
                    re.compile(key)
                except re.error as err:
                    raise ConfigError(f"`{pattern_field}` key {key!r} is not a valid regex: {err}.") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoftQConfig:
    """PEFT's ``LoftQConfig``: pass it as ``LoraConfig(init_lora_weights="loftq", loftq_config=...)``.

    LoftQ alternates quantizing the weight and a rank-``r`` SVD of what quantization lost;
    the base weight becomes the dequantized ``Q`` and ``B A`` the low-rank correction, so
    ``W ~ Q + B A`` (exactly PEFT's algorithm; the LoRA scaling is not compensated, so use
    ``lora_alpha == r`` as PEFT's example does).

    Attributes:
      loftq_bits: 4 (NF4, bitsandbytes' blocks of 64) or 8 (int8 rows).
      loftq_iter: alternating steps.
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8):
            raise ConfigError(f"`loftq_bits` must be 4 or 8 (as PEFT), got {self.loftq_bits!r}.")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ConfigError(f"`loftq_iter` must be an int >= 1, got {self.loftq_iter!r}.")

    def to_dict(self) -> dict[str, int]:
        return {"loftq_bits": self.loftq_bits, "loftq_iter": self.loftq_iter}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static facts about one adapted layer (never traced)."""

    info: ModuleInfo
    index: int
    r: int
    alpha: float
    scaling: float


@dataclasses.dataclass(frozen=True)
class LoraPlan:
    """One LoRA adapter resolved against one model."""

    config: LoraConfig
    layers: dict[str, LayerPlan]
    modules: Mapping[str, ModuleInfo]
    modules_to_save: tuple[str, ...]
    bias_leaves: tuple[tuple[str, ...], ...]

    @property
    def hooked(self) -> frozenset[str]:
        return frozenset(self.layers)


# --------------------------------------------------------------------------- resolve


def prepare(config: LoraConfig, binding: Any) -> LoraPlan:
    """Resolves targets, ranks and scalings of ``config`` on the model behind ``binding``.

    The returned plan's config is what gets saved: ``"all-linear"`` expanded, long
    target lists compacted, task heads added to ``modules_to_save``, ``fan_in_fan_out``
    corrected for ``Conv1D`` targets; exactly the changes PEFT makes.
    """
    modules: Mapping[str, ModuleInfo] = binding.modules
    config, targeted = base.resolve_targets(config, binding)

    conv1d = [modules[n].torch_type == "Conv1D" for n in targeted if modules[n].kind == "linear"]
    if any(conv1d) and not config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
            stacklevel=3,
        )
        config = dataclasses.replace(config, fan_in_fan_out=True)
    elif conv1d and not any(conv1d) and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to "
            "False.",
            stacklevel=3,
        )
        config = dataclasses.replace(config, fan_in_fan_out=False)

    layers: dict[str, LayerPlan] = {}
    used_rank_keys: set[str] = set()
    used_alpha_keys: set[str] = set()
    for index, name in enumerate(targeted):
        info = modules[name]
        rank_key = get_pattern_key(list(config.rank_pattern), name)
        alpha_key = get_pattern_key(list(config.alpha_pattern), name)
        r = config.rank_pattern[rank_key] if rank_key is not None else config.r
        alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha
        if rank_key is not None:
            used_rank_keys.add(rank_key)
        if alpha_key is not None:
            used_alpha_keys.add(alpha_key)
        if info.kind == "embedding" and config.lora_bias:
            raise ConfigError(
                f"lora_bias=True is not supported for embedding layers ({name}); set lora_bias=False."
            )
        if config.init_lora_weights == "olora" and info.torch_type == "Conv1D":
            raise ConfigError(
                f"init_lora_weights='olora' on {name} (a GPT-2 style Conv1D layer): PEFT's OLoRA ignores the "
                "transposed layout of Conv1D weights, so its result cannot be reproduced consistently. Use "
                "'pissa' or the default init for this model."
            )
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        layers[name] = LayerPlan(info=info, index=index, r=int(r), alpha=float(alpha), scaling=float(scaling))
    for pattern_field, used in (("rank_pattern", used_rank_keys), ("alpha_pattern", used_alpha_keys)):
        unused = [k for k in getattr(config, pattern_field) if k not in used]
        if unused:
            warnings.warn(
                f"The following {pattern_field} keys did not match any targeted module and were ignored: {unused}",
                RuntimeWarning,
                stacklevel=3,
            )
    if config.lora_bias:
        for name, layer in layers.items():
            if not layer.info.has_bias:
                warnings.warn(
                    f"`lora_bias=True` was passed but the targeted layer {name} ({layer.info.type_name}) has no "
                    "bias. This means that merging LoRA weights won't be possible.",
                    stacklevel=3,
                )

    modules_to_save = base.resolve_modules_to_save(config.modules_to_save, modules)
    bias_leaves = base.bias_leaves_for(
        config.bias,
        binding.params,
        targeted,
        modules,
        modules_to_save=modules_to_save,
        buffers=getattr(binding, "buffer_paths", frozenset()),
    )
    return LoraPlan(
        config=config,
        layers=layers,
        modules=modules,
        modules_to_save=tuple(modules_to_save),
        bias_leaves=tuple(bias_leaves),
    )


# --------------------------------------------------------------------------- init


def _torch_weight(kernel: jax.Array, info: ModuleInfo) -> jax.Array:
    """The layer weight as torch's ``nn.Linear`` holds it: ``(out, in)``."""
    return kernel if info.kernel_transposed else kernel.T


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _svd_lowrank(
    weight: jax.Array, r: int, niter: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Randomised rank-``r`` SVD (Halko et al.) with ``niter`` subspace iterations."""
    m, n = weight.shape
    q = min(r + 10, m, n)
    omega = jax.random.normal(key, (n, q), weight.dtype)
    basis, _ = jnp.linalg.qr(weight @ omega)
    for _ in range(niter):
        basis, _ = jnp.linalg.qr(weight.T @ basis)
        basis, _ = jnp.linalg.qr(weight @ basis)
    u_small, s, vh = jnp.linalg.svd(basis.T @ weight, full_matrices=False)
    return (basis @ u_small)[:, :r], s[:r], vh[:r]


def _init_linear(layer: LayerPlan, config: LoraConfig, kernel: jax.Array, key: jax.Array):
    """Returns ``(lora_A (in, r), lora_B (r, out), new kernel or None)``."""
    info, r, s = layer.info, layer.r, layer.scaling
    in_f, out_f = info.in_features, info.out_features
    key_a, key_b = jax.random.split(key)
    init = config.init_lora_weights
    if isinstance(init, str) and init.startswith("pissa"):
        weight = _torch_weight(kernel, info).astype(jnp.float32)  # (out, in)
        if init == "pissa":
            u, sv, vh = jnp.linalg.svd(weight, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:
            u, sv, vh = _svd_lowrank(weight, r, int(init.split("_niter_")[-1]), key_a)
        sv = sv / s
        lora_a_t = jnp.sqrt(sv)[:, None] * vh  # (r, in)
        lora_b_t = u * jnp.sqrt(sv)[None, :]  # (out, r)
        residual = weight - s * lora_b_t @ lora_a_t
        new_kernel = (residual if info.kernel_transposed else residual.T).astype(kernel.dtype)
        return lora_a_t.T, lora_b_t.T, new_kernel
    if init == "loftq":
        loftq = LoftQConfig(**config.loftq_config)
        weight = _torch_weight(kernel, info).astype(jnp.float32)  # (out, in), as PEFT quantizes it
        q, lora_a_t, lora_b_t = loftq_init(weight, bits=loftq.loftq_bits, iters=loftq.loftq_iter, rank=r)
        new_kernel = (q if info.kernel_transposed else q.T).astype(kernel.dtype)
        return lora_a_t.T, lora_b_t.T, new_kernel
    if init == "olora":
        weight = _torch_weight(kernel, info).astype(jnp.float32)
        q, rr = jnp.linalg.qr(weight)
        lora_a_t, lora_b_t = rr[:r], q[:, :r]
        residual = weight - s * lora_b_t @ lora_a_t
        new_kernel = (residual if info.kernel_transposed else residual.T).astype(kernel.dtype)
        return lora_a_t.T, lora_b_t.T, new_kernel
    if init is True:
        lora_a = _uniform(key_a, (in_f, r), 1.0 / math.sqrt(in_f))
    elif init == "gaussian":
        lora_a = jax.random.normal(key_a, (in_f, r), jnp.float32) / r
    else:  # False: both keep nn.Linear's default init
        lora_a = _uniform(key_a, (in_f, r), 1.0 / math.sqrt(in_f))
        return lora_a, _uniform(key_b, (r, out_f), 1.0 / math.sqrt(r)), None
    return lora_a, jnp.zeros((r, out_f), jnp.float32), None


def _init_embedding(layer: LayerPlan, config: LoraConfig, key: jax.Array):
    vocab, dim, r = layer.info.in_features, layer.info.out_features, layer.r
    key_a, key_b = jax.random.split(key)
    lora_b = jax.random.normal(key_b, (r, dim), jnp.float32)
    if config.init_lora_weights is False:
        return jax.random.normal(key_a, (vocab, r), jnp.float32), lora_b
    return jnp.zeros((vocab, r), jnp.float32), lora_b


def _dora_weight_norm(
    weight_io: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scaling: float
) -> jax.Array:
    """``||W + s A B||`` per output feature, for ``weight_io`` laid out ``(in, out)``."""
    adapted = weight_io.astype(lora_a.dtype) + scaling * (lora_a @ lora_b)
    return jnp.linalg.norm(adapted, axis=0)


def _weight_io(kernel: jax.Array, info: ModuleInfo) -> jax.Array:
    """The weight laid out ``(in, out)`` (embeddings: ``(vocab, dim)``)."""
    return kernel.T if info.kernel_transposed else kernel


def init_params(plan: LoraPlan, base_params: PyTree, key: jax.Array) -> tuple[dict[str, Any], PyTree | None]:
    """Creates the adapter tree; returns ``(adapter, new base params or None)``.

    PiSSA and OLoRA move the principal part of each weight into the adapter, so they
    return a new base tree (the input is not changed).
    """
    config = plan.config
    lora: dict[str, dict[str, jax.Array]] = {}
    new_base = None
    for name, layer in plan.layers.items():
        info = layer.info
        layer_key = jax.random.fold_in(key, layer.index)
        kernel = get_path(base_params, info.weight_path)
        stored = kernel  # a QuantizedArray on a quantized base: inits read the decoded weight
        if is_quantized(kernel):
            if config.init_lora_weights == "loftq":
                raise ConfigError(
                    f"init_lora_weights='loftq' on {name}, whose kernel is already quantized: LoftQ quantizes "
                    "the base itself. Apply it to the full-precision model (then `jpeft.quantize_model` "
                    "reproduces LoftQ's Q exactly)."
                )
            kernel = kernel.dequantize(kernel.dtype)
        if info.kind == "embedding":
            if config.init_lora_weights == "loftq":
                raise ConfigError(
                    f"init_lora_weights='loftq' targets embedding {name}; LoftQ applies to linear layers (PEFT's "
                    "embedding LoftQ path fails). Leave embeddings out of `target_modules`."
                )
            lora_a, lora_b = _init_embedding(layer, config, layer_key)
            entry = {"lora_A": lora_a, "lora_B": lora_b}
        else:
            lora_a, lora_b, new_kernel = _init_linear(layer, config, kernel, layer_key)
            entry = {"lora_A": lora_a, "lora_B": lora_b}
            if new_kernel is not None:
                kernel = new_kernel
                if is_quantized(stored):  # PiSSA/OLoRA residual, quantized again
                    new_kernel = stored.replace_boxed(new_kernel)
                    kernel = new_kernel.dequantize(stored.dtype)
                new_base = set_path(
                    new_base if new_base is not None else base_params, info.weight_path, new_kernel
                )
            if config.lora_bias:
                bias = (
                    _uniform(jax.random.fold_in(layer_key, 7), (info.out_features,), 1.0 / math.sqrt(layer.r))
                    if config.init_lora_weights is False
                    else jnp.zeros((info.out_features,), jnp.float32)
                )
                entry["lora_B_bias"] = bias
        if config.use_dora:
            entry["lora_magnitude_vector"] = _dora_weight_norm(
                _weight_io(kernel, info), entry["lora_A"], entry["lora_B"], layer.scaling
            )
        lora[name] = entry
    overrides = base.init_overrides(
        new_base if new_base is not None else base_params,
        plan.modules_to_save,
        plan.modules,
        plan.bias_leaves,
    )
    return {"lora": lora, **overrides}, new_base


# --------------------------------------------------------------------------- forward


def apply_overrides(base_params: PyTree, adapter: Mapping[str, Any], plan: LoraPlan) -> PyTree:
    return base.apply_overrides(base_params, adapter, plan.modules, plan.bias_leaves)


def layer_forward(
    layer: LayerPlan,
    config: LoraConfig,
    adapter: Mapping[str, Any],
    module_params: Mapping[str, jax.Array],
    x: jax.Array,
    out: jax.Array,
    *,
    train: bool,
    key: jax.Array | None,
) -> jax.Array:
    """The layer's output with this adapter's contribution added (PEFT's forward)."""
    info = layer.info
    params = adapter["lora"][info.name]
    lora_a, lora_b = params["lora_A"], params["lora_B"]
    s = layer.scaling
    if info.kind == "embedding":
        delta = jnp.take(lora_a, x, axis=0) @ lora_b * s
        if config.use_dora:
            weight = module_params[info.weight_name]
            norm = jax.lax.stop_gradient(_dora_weight_norm(weight, lora_a, lora_b, s))
            mag = params["lora_magnitude_vector"] / norm
            return (mag * out + mag * delta).astype(out.dtype)
        return (out + delta).astype(out.dtype)

    xa = x.astype(lora_a.dtype)
    dropped = train and config.lora_dropout > 0.0
    if dropped:
        xa = base.dropout(xa, config.lora_dropout, key, "lora_dropout")
    if not config.use_dora:
        # the scaling goes on the rank-r intermediate, r/out the size of the output (forward and backward)
        result = lowrank.product(xa, lora_a, lora_b, s, train=train)
        if "lora_B_bias" in params:
            result = result + params["lora_B_bias"] * s
        return (out + result).astype(out.dtype)
    lora_out = lowrank.product(xa, lora_a, lora_b, 1.0, train=train)

    weight_io = _weight_io(module_params[info.weight_name], info)
    norm = jax.lax.stop_gradient(_dora_weight_norm(weight_io, lora_a, lora_b, s))
    mag = params["lora_magnitude_vector"] / norm
    if dropped:
        base_no_bias = xa @ weight_io.astype(xa.dtype)
    else:
        base_no_bias = out - module_params["bias"] if "bias" in module_params else out
    return (out + (mag - 1) * base_no_bias + mag * lora_out * s).astype(out.dtype)


def mixed_batch_forward(
    layers: Sequence[tuple[int, LayerPlan, LoraConfig, Mapping[str, Any]]],
    module_params: Mapping[str, jax.Array],
    x: jax.Array,
    out: jax.Array,
    result: jax.Array,
    ids: jax.Array,
) -> jax.Array:
    """``result`` plus, for each example, the delta of its own adapter (a mixed batch).

    The adapters' factors are zero-padded to one rank, scaled and stacked (one extra
    zero entry stands for the base model, id ``-1``), then each example gathers its own
    ``A``/``B``: one batched low-rank product for the whole batch, however many
    adapters it mixes (static shapes, nothing recompiles when the mix changes).

    Args:
      layers: ``(adapter id, layer plan, config, adapter tree)`` for each LoRA adapter
        that targets this module.
      module_params, out: unused (the delta does not depend on the base output).
      x: the layer input, ``(batch, ..., in)`` (token ids for embeddings).
      result: the output so far.
      ids: ``(batch,)`` adapter id per example; ids of adapters not in ``layers`` add nothing.
    """
    del module_params, out
    count = max(i for i, *_ in layers) + 2  # ids 0..max, then the zero entry for -1 / absent adapters
    rank = max(layer.r for _, layer, _, _ in layers)
    first = layers[0][1].info
    dtype = jnp.result_type(*(ad["lora"][layer.info.name]["lora_A"].dtype for _, layer, _, ad in layers))
    # one (A, B, bias) per id, zero-padded to one rank and pre-scaled; absent ids add nothing
    zero_a = jnp.zeros((first.in_features, rank), dtype)  # in_features: the vocabulary for an embedding
    zero_b = jnp.zeros((rank, first.out_features), dtype)
    zero_bias = jnp.zeros((first.out_features,), dtype)
    entries = {}
    for i, layer, _, adapter in layers:
        params = adapter["lora"][layer.info.name]
        pad = rank - layer.r
        entries[i] = (
            jnp.pad(params["lora_A"].astype(dtype), ((0, 0), (0, pad))),
            jnp.pad((params["lora_B"] * layer.scaling).astype(dtype), ((0, pad), (0, 0))),
            (params["lora_B_bias"] * layer.scaling).astype(dtype) if "lora_B_bias" in params else zero_bias,
        )
    rows_a, rows_b, rows_bias = zip(
        *(entries.get(i, (zero_a, zero_b, zero_bias)) for i in range(count)), strict=True
    )
    stacked_a, stacked_b = jnp.stack(rows_a), jnp.stack(rows_b)
    has_bias = any("lora_B_bias" in ad["lora"][layer.info.name] for _, layer, _, ad in layers)
    stacked_bias = jnp.stack(rows_bias) if has_bias else None
    index = jnp.where(ids < 0, count - 1, jnp.minimum(ids, count - 1))
    b = stacked_b[index]  # (batch, rank, out)
    if first.kind == "embedding":
        rows = stacked_a[index[:, None], x.reshape(x.shape[0], -1)]  # (batch, tokens, rank)
        delta = jnp.einsum("btr,bro->bto", rows, b).reshape(*x.shape, -1)
    else:
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).astype(dtype)
        delta = jnp.einsum("bti,bir,bro->bto", flat, stacked_a[index], b).reshape(*x.shape[:-1], -1)
        if stacked_bias is not None:
            delta = delta + stacked_bias[index].reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (-1,))
    return (result + delta).astype(result.dtype)


# --------------------------------------------------------------------------- merge


def delta_weight(layer: LayerPlan, params: Mapping[str, jax.Array]) -> jax.Array:
    """``s * A B`` laid out as the Flax weight (``kernel`` or ``embedding``)."""
    delta = layer.scaling * (params["lora_A"] @ params["lora_B"])
    return delta.T if layer.info.kernel_transposed else delta


def _dora_factor(layer: LayerPlan, weight: jax.Array, lp: Mapping[str, jax.Array]) -> jax.Array:
    """``m / ||W + s A B||`` broadcast against the Flax weight's layout."""
    norm = _dora_weight_norm(_weight_io(weight, layer.info), lp["lora_A"], lp["lora_B"], layer.scaling)
    factor = lp["lora_magnitude_vector"] / norm
    return factor[:, None] if layer.info.kernel_transposed else factor[None, :]


def merge_record(base_params: PyTree, adapter: Mapping[str, Any], plan: LoraPlan) -> dict[str, Any]:
    """What :func:`unmerge` needs, taken before :func:`merge`: replaced base leaves and DoRA factors."""
    factors = {}
    if plan.config.use_dora:
        for name, layer in plan.layers.items():
            factors[name] = _dora_factor(
                layer, get_path(base_params, layer.info.weight_path), adapter["lora"][name]
            )
    originals = base.overridden_originals(base_params, plan.modules_to_save, plan.modules, plan.bias_leaves)
    return {"originals": originals, "dora_factors": factors}


def merge(base_params: PyTree, adapter: Mapping[str, Any], plan: LoraPlan) -> PyTree:
    """The base tree with this adapter folded into the weights (and overrides applied)."""
    params = apply_overrides(base_params, adapter, plan)
    for name, layer in plan.layers.items():
        info, lp = layer.info, adapter["lora"][name]
        weight = get_path(params, info.weight_path)
        merged = weight.astype(jnp.float32) + delta_weight(layer, lp)
        if plan.config.use_dora:
            merged = merged * _dora_factor(layer, weight, lp)
        params = set_path(params, info.weight_path, merged.astype(weight.dtype))
        if "lora_B_bias" in lp:
            if not info.has_bias:
                raise ValueError(
                    f"cannot merge adapter with `lora_bias=True` into {name}: the layer has no bias to merge into."
                )
            bias = get_path(params, info.bias_path)
            params = set_path(
                params, info.bias_path, (bias + layer.scaling * lp["lora_B_bias"]).astype(bias.dtype)
            )
    return params


def unmerge(params: PyTree, adapter: Mapping[str, Any], plan: LoraPlan, record: Mapping[str, Any]) -> PyTree:
    """Inverse of :func:`merge` (exact up to float rounding), given :func:`merge_record`'s output."""
    for name, layer in plan.layers.items():
        info, lp = layer.info, adapter["lora"][name]
        weight = get_path(params, info.weight_path)
        restored = weight.astype(jnp.float32)
        if plan.config.use_dora:
            restored = restored / record["dora_factors"][name]
        restored = restored - delta_weight(layer, lp)
        params = set_path(params, info.weight_path, restored.astype(weight.dtype))
        if "lora_B_bias" in lp:
            bias = get_path(params, info.bias_path)
            params = set_path(
                params, info.bias_path, (bias - layer.scaling * lp["lora_B_bias"]).astype(bias.dtype)
            )
    return base.restore(params, record["originals"])


# --------------------------------------------------------------------------- checkpoint


def key_entries(
    plan: LoraPlan, adapter: Mapping[str, Any], save_embedding_layers: bool | str = "auto"
) -> list:
    """The PEFT checkpoint layout of this adapter (see :class:`jpeft.tuners.base.KeyEntry`)."""
    entries: list[base.KeyEntry] = []
    for name, layer in plan.layers.items():
        lp = adapter["lora"][name]
        if layer.info.kind == "embedding":
            entries.append(
                base.KeyEntry(f"{name}.lora_embedding_A", "adapter", ("lora", name, "lora_A"), (1, 0))
            )
            entries.append(
                base.KeyEntry(f"{name}.lora_embedding_B", "adapter", ("lora", name, "lora_B"), (1, 0))
            )
        else:
            entries.append(
                base.KeyEntry(f"{name}.lora_A.weight", "adapter", ("lora", name, "lora_A"), (1, 0))
            )
            entries.append(
                base.KeyEntry(f"{name}.lora_B.weight", "adapter", ("lora", name, "lora_B"), (1, 0))
            )
            if "lora_B_bias" in lp:
                entries.append(base.KeyEntry(f"{name}.lora_B.bias", "adapter", ("lora", name, "lora_B_bias")))
        if "lora_magnitude_vector" in lp:
            entries.append(
                base.KeyEntry(
                    f"{name}.lora_magnitude_vector", "adapter", ("lora", name, "lora_magnitude_vector")
                )
            )
    entries += base.override_entries(
        adapter,
        plan.modules,
        plan.bias_leaves,
        set(plan.layers),
        include_wrapper_biases=plan.config.bias == "all",
    )
    for name, layer in plan.layers.items():
        if _saves_embedding(plan, name, save_embedding_layers):
            info = layer.info
            perm = (1, 0) if info.weight_name == "kernel" else None
            entries.append(base.KeyEntry(f"{name}.base_layer.weight", "base", info.weight_path, perm))
    return entries


def _saves_embedding(plan: LoraPlan, name: str, save_embedding_layers: bool | str) -> bool:
    if save_embedding_layers is False:
        return False
    is_embedding_name = any(name == n or name.endswith("." + n) for n in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        return is_embedding_name
    return is_embedding_name or plan.layers[name].info.kind == "embedding"


def counted_in_total(plan: LoraPlan, adapter: Mapping[str, Any]) -> int:
    """Parameters PEFT adds to ``all params``: LoRA weights and module copies, not biases (those are base's)."""
    return count_params(adapter["lora"]) + count_params(adapter["modules_to_save"])


registry.register(PeftType.LORA, LoraConfig, sys.modules[__name__])


# --------------------------------------------------------------------------- sharding


def adapter_specs(plan: LoraPlan, adapter: Mapping[str, Any], base_specs: PyTree) -> dict[str, Any]:
    """Partition specs for the adapter tree that follow the specs of the weights it adapts.

    ``lora_A`` is split like the weight's input axis and ``lora_B`` like its output axis
    (the rank axis is never split), so ``x @ A @ B`` needs no more communication than
    ``x @ W``. Module copies and biases take their base leaves' specs.
    """
    from jax.sharding import PartitionSpec

    def axes(spec: Any, ndim: int) -> tuple[Any, ...]:
        entries = tuple(spec) if spec is not None else ()
        return entries + (None,) * (ndim - len(entries))

    lora = {}
    for name, layer in plan.layers.items():
        info = layer.info
        weight_axes = axes(get_path(base_specs, info.weight_path), 2)
        in_axis, out_axis = weight_axes[::-1] if info.kernel_transposed else weight_axes
        specs = {"lora_A": PartitionSpec(in_axis, None), "lora_B": PartitionSpec(None, out_axis)}
        for extra in ("lora_B_bias", "lora_magnitude_vector"):
            if extra in adapter["lora"][name]:
                specs[extra] = PartitionSpec(out_axis)
        lora[name] = specs
    saved = {name: get_path(base_specs, plan.modules[name].path) for name in adapter["modules_to_save"]}
    biases = {key: get_path(base_specs, tuple(key.split("."))) for key in adapter["bias"]}
    return {"lora": lora, "modules_to_save": saved, "bias": biases}
