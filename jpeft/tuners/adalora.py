"""AdaLoRA: LoRA in SVD form whose ranks are pruned by importance during training.

``y = W x + (lora_alpha / (ranknum + 1e-5)) * B (A * E) dropout(x)`` with ``A`` (r x in),
``E`` (r x 1, the "singular values") and ``B`` (out x r); ``ranknum`` is the initial rank
(frozen, not saved). During training a rank allocator scores every singular triplet
``(A[i], E[i], B[:, i])`` by smoothed sensitivity x uncertainty and zeroes the ``E`` of the
least important ones, shrinking the total budget from ``sum(init_r)`` to ``target_r`` per
layer on a cubic schedule. An orthogonality penalty keeps ``A`` and ``B`` near-orthonormal.

Adapter tree (torch orientation, so the checkpoint needs no transposes and the
allocator's scores are computed exactly as PEFT computes them)::

    {"adalora": {module: {"lora_A": (r, in), "lora_E": (r, 1), "lora_B": (out, r)}},
     "modules_to_save": {module: subtree}, "bias": {leaf path: array}}

Training loop (PEFT adds the penalty to ``outputs.loss`` itself; here it is explicit)::

    state = adalora.allocator_init(plan, adapter)
    loss = task_loss + adalora.orth_regularization(adapter, plan)
    ...optimizer step...
    state, adapter = adalora.update_and_allocate(state, adapter, grads, step, plan)
    ...
    adalora.set_rank_pattern(peft_model, state["rank_pattern"])  # prune before saving

Reference: Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", ICLR 2023.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.config import PeftType
from jpeft.core import method, registry
from jpeft.core.architectures import architecture, default_targets
from jpeft.core.tree import PyTree, count_params, get_path, set_path
from jpeft.errors import ConfigError
from jpeft.tuners import base, lora, lowrank

if TYPE_CHECKING:
    from jpeft.bindings.protocol import Binding


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(lora.LoraConfig):
    """PEFT's ``AdaLoraConfig``: ``LoraConfig``'s fields plus the rank-allocation schedule.

    Attributes:
      target_r: the average rank per layer at the end of the budgeting phase.
      init_r: the initial rank of every layer (``r`` is ignored, as in PEFT).
      tinit: warm-up steps before any pruning.
      tfinal: final steps with a fixed rank pattern.
      deltaT: steps between two maskings during budgeting.
      beta1, beta2: EMA factors of sensitivity and uncertainty.
      orth_reg_weight: weight of the orthogonality penalty.
      total_step: total training steps (required).
      rank_pattern: ``{"<module>.lora_E": [bool] * init_r}`` written by the allocator;
        a saved adapter has only the kept triplets.
    """

    peft_type: ClassVar[PeftType] = PeftType.ADALORA

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's field name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, Any] | None = None  # type: ignore[assignment]  # masks per module, not LoRA ranks

    def __post_init__(self) -> None:
        rank_pattern = self.rank_pattern
        if self.use_dora:
            raise ConfigError("ADALORA does not support DoRA.")
        if self.loftq_config:
            raise ConfigError("ADALORA does not support LOFTQ.")
        # LoraConfig checks rank_pattern keys as regexes; AdaLoRA's are module names with lists.
        object.__setattr__(self, "rank_pattern", {})
        super().__post_init__()
        object.__setattr__(
            self,
            "rank_pattern",
            None
            if rank_pattern is None
            else {k: [bool(b) for b in v] for k, v in dict(rank_pattern).items()},
        )
        if self.r != 8:
            warnings.warn(
                "Note that `r` is not used in AdaLora and will be ignored."
                "If you intended to set the initial rank, use `init_r` instead.",
                stacklevel=3,
            )
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
        if self.orth_reg_weight < 0:
            raise ConfigError(
                f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                f"{self.orth_reg_weight}"
            )
        if self.tinit >= (self.total_step - self.tfinal):
            raise ConfigError(
                "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or "
                "increase `total_step`."
            )
        if not 0 < self.beta1 < 1 or not 0 < self.beta2 < 1:
            raise ConfigError(f"`beta1` and `beta2` must be in (0, 1), got {self.beta1} and {self.beta2}.")
        if isinstance(self.init_r, bool) or not isinstance(self.init_r, int) or self.init_r < 0:
            raise ConfigError(
                f"`init_r` should be a positive integer or 0, but the value passed is {self.init_r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPlan(method.LayerPlan):
    """Static facts about one adapted layer."""

    r: int  # current (stored) rank
    ranknum: float  # PEFT's frozen ``ranknum``: init_r (kept through pruning)
    scaling: float  # lora_alpha if > 0 else r


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraPlan(method.Plan):
    """One AdaLoRA adapter resolved against one model."""

    config: AdaLoraConfig
    layers: Mapping[str, LayerPlan]


def _pattern_key(name: str) -> str:
    return f"{name}.lora_E"


def prepare(config: AdaLoraConfig, binding: Any) -> AdaLoraPlan:
    """Resolves targets as LoRA does (AdaLoRA's defaults); ranks come from ``init_r`` / ``rank_pattern``."""
    if config.target_modules is None and architecture(binding.model_type) is not None:
        targets = default_targets("ADALORA", binding.model_type)
        if targets is None:
            raise ConfigError(
                f"Please specify `target_modules` in `peft_config`: PEFT has no AdaLoRA default for "
                f"{binding.model_type!r}."
            )
        config = dataclasses.replace(config, target_modules=targets)
    rank_pattern = config.rank_pattern
    lora_plan = lora.prepare(dataclasses.replace(config, rank_pattern={}, alpha_pattern={}), binding)
    resolved = lora_plan.config
    assert isinstance(resolved, AdaLoraConfig)  # lora.prepare only replaces fields of the config it gets
    config = dataclasses.replace(resolved, rank_pattern=rank_pattern, alpha_pattern=config.alpha_pattern)
    if isinstance(config.target_modules, list):
        # PEFT turns the list into a set (saved in arbitrary order); keep it a list.
        object.__setattr__(config, "target_modules", list(config.target_modules))
    layers: dict[str, LayerPlan] = {}
    for name, lp in lora_plan.layers.items():
        if lp.info.kind != "linear":
            raise ConfigError(
                f"Target module {name} ({lp.info.type_name}) is not supported. Currently, only "
                "`torch.nn.Linear`, `Conv1D`, and `torch.nn.Conv2d` are supported."
            )
        r = config.init_r
        ranknum = float(config.init_r)
        if rank_pattern is not None and _pattern_key(name) in rank_pattern:
            mask = rank_pattern[_pattern_key(name)]
            if len(mask) != config.init_r:
                raise ConfigError(
                    f"rank_pattern[{_pattern_key(name)!r}] has {len(mask)} entries but init_r is {config.init_r}."
                )
            r = int(sum(mask))
            if r == 0:
                ranknum = 0.0  # PEFT's update_layer(r=0) leaves ranknum 0 (the layer adds nothing)
        alpha = config.lora_alpha
        scaling = float(alpha) if alpha > 0 else float(r)
        layers[name] = LayerPlan(info=lp.info, index=lp.index, r=r, ranknum=ranknum, scaling=scaling)
    return AdaLoraPlan(
        config=config,
        layers=layers,
        modules=lora_plan.modules,
        modules_to_save=lora_plan.modules_to_save,
        bias_leaves=lora_plan.bias_leaves,
    )


# --------------------------------------------------------------------------- init


def init_params(plan: AdaLoraPlan, base_params: PyTree, key: jax.Array) -> tuple[dict[str, Any], None]:
    """E = 0, A and B ~ N(0, 0.02) (``init_lora_weights`` falsy: all three N(0, 1), as PEFT)."""
    entries: dict[str, dict[str, jax.Array]] = {}
    for name, layer in plan.layers.items():
        (in_f, out_f), r = layer.info.features, layer.r
        ka, ke, kb = jax.random.split(jax.random.fold_in(key, layer.index), 3)
        a = jax.random.normal(ka, (r, in_f), jnp.float32)
        b = jax.random.normal(kb, (out_f, r), jnp.float32)
        if plan.config.init_lora_weights:
            entries[name] = {"lora_A": 0.02 * a, "lora_E": jnp.zeros((r, 1), jnp.float32), "lora_B": 0.02 * b}
        else:
            entries[name] = {"lora_A": a, "lora_E": jax.random.normal(ke, (r, 1), jnp.float32), "lora_B": b}
    overrides = base.init_overrides(base_params, plan.modules_to_save, plan.modules, plan.bias_leaves)
    return {"adalora": entries, **overrides}, None


# --------------------------------------------------------------------------- forward


def apply_overrides(base_params: PyTree, adapter: Mapping[str, Any], plan: AdaLoraPlan) -> PyTree:
    return base.apply_overrides(base_params, adapter, plan.modules, plan.bias_leaves)


def _factor(layer: LayerPlan) -> float:
    return layer.scaling / (layer.ranknum + 1e-5)


def layer_forward(
    layer: LayerPlan,
    config: AdaLoraConfig,
    adapter: Mapping[str, Any],
    module_params: Mapping[str, jax.Array],
    x: jax.Array,
    out: jax.Array,
    *,
    train: bool,
    key: jax.Array | None,
) -> jax.Array:
    """``out + dropout(x) @ (A * E).T @ B.T * scaling / (ranknum + 1e-5)`` (PEFT's SVDLinear)."""
    params = adapter["adalora"][layer.info.name]
    a, e, b = params["lora_A"], params["lora_E"], params["lora_B"]
    xa = x.astype(a.dtype)
    if train and config.lora_dropout > 0.0:
        xa = base.dropout(xa, config.lora_dropout, key, "lora_dropout")
    delta = lowrank.product(xa, (a * e).T, b.T, _factor(layer), train=train)
    return (out + delta).astype(out.dtype)


# --------------------------------------------------------------------------- merge


def delta_weight(layer: LayerPlan, params: Mapping[str, jax.Array]) -> jax.Array:
    """``B (A * E) * scaling / (ranknum + 1e-5)`` laid out as the Flax ``kernel``."""
    delta = (params["lora_B"] @ (params["lora_A"] * params["lora_E"])) * _factor(layer)  # (out, in)
    return delta if layer.info.kernel_transposed else delta.T


def merge_record(base_params: PyTree, adapter: Mapping[str, Any], plan: AdaLoraPlan) -> dict[str, Any]:
    return {
        "originals": base.overridden_originals(
            base_params, plan.modules_to_save, plan.modules, plan.bias_leaves
        )
    }


def merge(base_params: PyTree, adapter: Mapping[str, Any], plan: AdaLoraPlan) -> PyTree:
    params = apply_overrides(base_params, adapter, plan)
    for name, layer in plan.layers.items():
        weight = get_path(params, layer.info.weight_path)
        merged = weight.astype(jnp.float32) + delta_weight(layer, adapter["adalora"][name])
        params = set_path(params, layer.info.weight_path, merged.astype(weight.dtype))
    return params


def unmerge(
    params: PyTree, adapter: Mapping[str, Any], plan: AdaLoraPlan, record: Mapping[str, Any]
) -> PyTree:
    for name, layer in plan.layers.items():
        weight = get_path(params, layer.info.weight_path)
        restored = weight.astype(jnp.float32) - delta_weight(layer, adapter["adalora"][name])
        params = set_path(params, layer.info.weight_path, restored.astype(weight.dtype))
    return base.restore(params, record["originals"])


# --------------------------------------------------------------------------- checkpoint


def key_entries(
    plan: AdaLoraPlan, adapter: Mapping[str, Any], save_embedding_layers: bool | str = "auto"
) -> list:
    """``<p>.lora_A`` (r, in), ``<p>.lora_E`` (r, 1), ``<p>.lora_B`` (out, r); no ``.weight`` suffix."""
    entries: list[base.KeyEntry] = []
    for name in plan.layers:
        for part in ("lora_A", "lora_B", "lora_E"):
            entries.append(base.KeyEntry(f"{name}.{part}", "adapter", ("adalora", name, part)))
    entries += base.override_entries(
        adapter,
        plan.modules,
        plan.bias_leaves,
        set(plan.layers),
        include_wrapper_biases=plan.config.bias == "all",
    )
    return entries + lora.embedding_layer_entries(plan.layers, save_embedding_layers)


def counted_in_total(plan: AdaLoraPlan, adapter: Mapping[str, Any]) -> int:
    """PEFT counts the adapter weights, the module copies and each layer's frozen ``ranknum``."""
    return count_params(adapter["adalora"]) + len(plan.layers) + count_params(adapter["modules_to_save"])


def adapter_specs(plan: AdaLoraPlan, adapter: Mapping[str, Any], base_specs: PyTree) -> dict[str, Any]:
    """``lora_A`` split like the weight's input axis, ``lora_B`` like its output axis; ``E`` replicated."""
    from jax.sharding import PartitionSpec

    out = {}
    for name, layer in plan.layers.items():
        in_axis, out_axis = base.weight_axes(base_specs, layer.info)
        out[name] = {
            "lora_A": PartitionSpec(None, in_axis),
            "lora_E": PartitionSpec(None, None),
            "lora_B": PartitionSpec(out_axis, None),
        }
    return {"adalora": out, **base.override_specs(adapter, plan.modules, base_specs)}


# --------------------------------------------------------------------------- orthogonality


def orth_regularization(adapter: Mapping[str, Any], plan: AdaLoraPlan) -> jax.Array:
    """``orth_reg_weight * mean(||A A^T - I||_F, ||B^T B - I||_F over all layers)`` (PEFT's forward)."""
    total = jnp.zeros((), jnp.float32)
    count = 0
    for name in plan.layers:
        params = adapter["adalora"][name]
        for cov in (params["lora_A"] @ params["lora_A"].T, params["lora_B"].T @ params["lora_B"]):
            eye = jnp.eye(cov.shape[0], dtype=cov.dtype)
            total = total + jnp.sqrt(jnp.sum(jnp.square(cov - eye)))
            count += 1
    if count == 0:
        return total
    return plan.config.orth_reg_weight * total / count


# --------------------------------------------------------------------------- rank allocator

_PARTS = ("lora_A", "lora_E", "lora_B")


def _init_budget(plan: AdaLoraPlan) -> tuple[int, int]:
    return sum(layer.r for layer in plan.layers.values()), plan.config.target_r * len(plan.layers)


def allocator_init(plan: AdaLoraPlan, adapter: Mapping[str, Any]) -> dict[str, Any]:
    """Fresh allocator state (PEFT's ``RankAllocator``): zero EMAs, full budget, no pattern yet."""
    init_bgt, target_bgt = _init_budget(plan)
    zeros = {n: {p: jnp.zeros_like(adapter["adalora"][n][p]) for p in _PARTS} for n in plan.layers}
    return {
        "exp_avg_ipt": zeros,
        "exp_avg_unc": zeros,
        "init_bgt": init_bgt,
        "target_bgt": target_bgt,
        "budget": init_bgt,
        "rank_pattern": None,
    }


def _budgeting_end(config: AdaLoraConfig) -> int:
    """``total_step - tfinal``: the step at which the final rank pattern is applied."""
    assert config.total_step is not None  # AdaLoraConfig.__post_init__ requires it
    return config.total_step - config.tfinal


def budget_schedule(plan: AdaLoraPlan, step: int) -> tuple[int, bool]:
    """``(budget, mask now?)`` at ``step``: constant, then cubic decrease, then ``target_r`` per layer."""
    config = plan.config
    init_bgt, target_bgt = _init_budget(plan)
    tinit, final = config.tinit, _budgeting_end(config)
    if step <= tinit:
        return init_bgt, False
    if step > final:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (final - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    return budget, step % config.deltaT == 0


def _update_ipt(
    state: dict[str, Any], adapter: Mapping[str, Any], grads: Mapping[str, Any], plan: AdaLoraPlan
) -> dict[str, Any]:
    b1, b2 = plan.config.beta1, plan.config.beta2
    avg_ipt: dict[str, dict[str, jax.Array]] = {}
    avg_unc: dict[str, dict[str, jax.Array]] = {}
    for n in plan.layers:
        avg_ipt[n], avg_unc[n] = {}, {}
        for p in _PARTS:
            ipt = jnp.abs(adapter["adalora"][n][p] * grads["adalora"][n][p])
            avg = b1 * state["exp_avg_ipt"][n][p] + (1 - b1) * ipt
            avg_ipt[n][p] = avg
            avg_unc[n][p] = b2 * state["exp_avg_unc"][n][p] + (1 - b2) * jnp.abs(ipt - avg)
    return {**state, "exp_avg_ipt": avg_ipt, "exp_avg_unc": avg_unc}


def _mask_to_budget(state: dict[str, Any], adapter: Mapping[str, Any], budget: int, plan):
    scores = {}
    for n in plan.layers:
        s = {p: state["exp_avg_ipt"][n][p] * state["exp_avg_unc"][n][p] for p in _PARTS}
        ipt_a = jnp.mean(s["lora_A"], axis=1)  # (r,)
        ipt_b = jnp.mean(s["lora_B"], axis=0)  # (r,)
        scores[n] = s["lora_E"].reshape(-1) + (ipt_a + ipt_b)
    k = state["init_bgt"] - budget
    all_scores = np.concatenate([np.asarray(v) for v in scores.values()])
    if not 1 <= k <= all_scores.size:
        raise ValueError(
            f"AdaLoRA cannot mask {k} of {all_scores.size} triplets (budget {budget}); torch's kthvalue fails "
            "the same way. Use a larger gap between `init_r` and `target_r` or another schedule."
        )
    threshold = np.sort(all_scores, kind="stable")[k - 1]
    pattern, entries = {}, dict(adapter["adalora"])
    for n in plan.layers:
        keep = np.asarray(scores[n]) > threshold
        pattern[_pattern_key(n)] = keep.tolist()
        entries[n] = {**entries[n], "lora_E": jnp.where(keep[:, None], entries[n]["lora_E"], 0.0)}
    return pattern, {**adapter, "adalora": entries}


def _mask_using_rank_pattern(adapter: Mapping[str, Any], pattern: Mapping[str, list], plan):
    entries = dict(adapter["adalora"])
    for n in plan.layers:
        keep = np.asarray(pattern[_pattern_key(n)], bool)
        entries[n] = {**entries[n], "lora_E": jnp.where(keep[:, None], entries[n]["lora_E"], 0.0)}
    return {**adapter, "adalora": entries}


def update_and_allocate(
    allocator_state: dict[str, Any],
    adapter: Mapping[str, Any],
    grads: Mapping[str, Any],
    step: int,
    plan: AdaLoraPlan,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """PEFT's ``AdaLoraModel.update_and_allocate(step)``, as a pure function (not jittable: ``step`` is static).

    Call it after each optimizer step with the current adapter and that step's gradients
    (trees shaped like the adapter; only ``grads["adalora"]`` is read). Returns the new
    state (``state["rank_pattern"]``: ``{"<module>.lora_E": [bool] * r}`` once a mask was
    taken; ``state["budget"]``) and the adapter with pruned ``E`` entries zeroed.
    """
    final = _budgeting_end(plan.config)
    state = dict(allocator_state)
    if step < final:
        state = _update_ipt(state, adapter, grads, plan)
        budget, mask_ind = budget_schedule(plan, step)
        state["budget"] = budget
        if mask_ind:
            pattern, adapter = _mask_to_budget(state, adapter, budget, plan)
            state["rank_pattern"] = pattern
    elif step == final:
        budget, _ = budget_schedule(plan, step)
        pattern, adapter = _mask_to_budget(state, adapter, budget, plan)
        state["budget"] = budget
        state["rank_pattern"] = pattern
        zeros = jax.tree.map(jnp.zeros_like, state["exp_avg_ipt"])
        state["exp_avg_ipt"], state["exp_avg_unc"] = zeros, zeros
    else:
        if state["rank_pattern"] is None:
            raise ValueError("no rank pattern to apply: the final allocation step was skipped.")
        adapter = _mask_using_rank_pattern(adapter, state["rank_pattern"], plan)
    return state, dict(adapter)


# --------------------------------------------------------------------------- pruning


def prune_adapter(adapter: Mapping[str, Any], plan: AdaLoraPlan, rank_pattern: Mapping[str, list]) -> dict:
    """The adapter with only the triplets ``rank_pattern`` keeps (PEFT's resize by rank pattern)."""
    entries = dict(adapter["adalora"])
    for n in plan.layers:
        key = _pattern_key(n)
        if key not in rank_pattern:
            continue
        keep = np.asarray(rank_pattern[key], bool)
        if keep.size != entries[n]["lora_E"].shape[0]:
            continue  # already pruned
        idx = np.nonzero(keep)[0]
        p = entries[n]
        entries[n] = {"lora_A": p["lora_A"][idx], "lora_E": p["lora_E"][idx], "lora_B": p["lora_B"][:, idx]}
    return {**adapter, "adalora": entries}


def with_rank_pattern(
    plan: AdaLoraPlan, adapter: Mapping[str, Any], rank_pattern: Mapping[str, list], binding: Binding
) -> method.AdapterState:
    """The adapter with ``rank_pattern`` recorded in its config and its tensors pruned to it.

    Outputs do not change (pruned triplets have ``E = 0``); saving the result writes the
    pruned tensors and the pattern exactly as PEFT does after ``update_and_allocate``.
    """
    full = {k: [bool(b) for b in v] for k, v in rank_pattern.items()}
    config = dataclasses.replace(plan.config, rank_pattern=full)
    new_plan = dataclasses.replace(prepare(config, binding), config=config)
    return method.AdapterState(config, new_plan, prune_adapter(adapter, plan, full))


def finalize_allocation(
    state: Mapping[str, Any], step: int, plan: AdaLoraPlan, adapter: Mapping[str, Any], binding: Binding
) -> method.AdapterState | None:
    """At ``total_step - tfinal`` the final rank pattern is applied (:func:`with_rank_pattern`)."""
    if step != _budgeting_end(plan.config):
        return None
    return with_rank_pattern(plan, adapter, state["rank_pattern"], binding)


METHOD: method.Method[AdaLoraPlan] = method.Method(
    prepare=prepare,
    init_params=init_params,
    apply_overrides=apply_overrides,
    key_entries=key_entries,
    counted_in_total=counted_in_total,
    layer_tree="adalora",
    layer_forward=layer_forward,
    merge=merge,
    merge_record=merge_record,
    unmerge=unmerge,
    adapter_specs=adapter_specs,
    check_new_adapter=lora.check_new_adapter,
    allocator_init=allocator_init,
    update_and_allocate=update_and_allocate,
    finalize_allocation=finalize_allocation,
    with_rank_pattern=with_rank_pattern,
)

registry.register(PeftType.ADALORA, AdaLoraConfig, METHOD, kind="layer", mixable=True)
