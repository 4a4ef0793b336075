"""LoRA's configuration: PEFT's ``LoraConfig`` and ``LoftQConfig``, validated on construction.

The method itself (resolve, init, forward, merge, PEFT key map) is :mod:`jpeft.tuners.lora`,
which re-exports both classes; the initialisers that ``init_lora_weights`` names are
:mod:`jpeft.tuners.lora_init`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, ClassVar

from jpeft.config import PeftConfig, PeftType
from jpeft.core.targets import check_pattern_keys
from jpeft.errors import ConfigError

_INITS = ("gaussian", "pissa", "olora", "loftq")


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
        check_pattern_keys(rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern)


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
