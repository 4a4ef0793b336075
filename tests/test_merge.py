"""Merging adapters into the base weights and taking them back out.

``merge_adapter`` must leave the model's output unchanged (the adapter now lives in the
weights), ``unmerge_adapter`` must give back the original base weights, for every
kind of adapter state LoRA has; ``get_merged_params`` must be a pure function.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

import jpeft
from tests import parity

ATOL = 1e-5

CASES = {
    "plain": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "dora": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "lora_bias": ("gpt2", dict(target_modules=["c_attn", "c_fc"], lora_bias=True)),
    "bias_lora_only": ("gpt2", dict(target_modules=["c_attn", "c_fc"], bias="lora_only")),
    "bias_all": ("gpt2", dict(target_modules=["c_attn"], bias="all")),
    "modules_to_save": ("llama", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    "embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "seq_cls_head": ("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
}


def _model(flax_model, adapter_name="default", seed=1, key=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out correction on GPT-2's Conv1D
        model = jpeft.get_peft_model(
            flax_model, jpeft.LoraConfig(r=4, lora_alpha=8, **kwargs), adapter_name, key=key
        )
    parity.perturb_jpeft_adapter(model, adapter_name, seed=seed)
    return model


def _logits(model, inputs, **kwargs) -> np.ndarray:
    return np.asarray(model(**inputs, **kwargs).logits)


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _max_abs_diff(a, b) -> float:
    """Largest absolute difference over all leaves (trees must have the same structure and shapes)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    worst = 0.0
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        if x.size:
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return worst


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), f"{jax.tree_util.keystr(path)} changed"


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_roundtrip(case, tiny):
    arch, kwargs = CASES[case]
    pair = tiny(arch)
    inputs = pair.inputs()
    model = _model(pair.flax_model, **kwargs)
    base_before = _host(model.base_params)
    adapters_before = _host(model.adapters)
    unmerged = _logits(model, inputs)
    assert np.abs(unmerged - _logits(pair.flax_model, inputs)).max() > 1e-3, "adapter is a no-op"

    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    assert _max_abs_diff(model.base_params, base_before) > 1e-3, "merging did not change the base weights"
    np.testing.assert_allclose(_logits(model, inputs), unmerged, atol=ATOL, rtol=0)
    # Merging twice is a no-op (the adapter is already in the weights).
    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    np.testing.assert_allclose(_logits(model, inputs), unmerged, atol=ATOL, rtol=0)

    model.unmerge_adapter()
    assert model.merged_adapters == []
    assert _max_abs_diff(model.base_params, base_before) <= ATOL
    _assert_bitwise_equal(model.adapters, adapters_before)  # the adapter itself is untouched
    np.testing.assert_allclose(_logits(model, inputs), unmerged, atol=ATOL, rtol=0)


def test_several_adapters_merged_together(tiny):
    pair = tiny("llama")
    inputs = pair.inputs()
    model = _model(pair.flax_model, target_modules=["q_proj", "v_proj"])
    # "other" shares q_proj with "default" (two deltas on one weight) and adds k_proj, o_proj.
    model.add_adapter(
        "other",
        jpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj"]),
        key=jax.random.key(3),
    )
    parity.perturb_jpeft_adapter(model, "other", seed=2)
    model.add_adapter(
        "third", jpeft.LoraConfig(r=2, target_modules=["up_proj"], use_dora=False), key=jax.random.key(4)
    )
    parity.perturb_jpeft_adapter(model, "third", seed=3)
    base_before = _host(model.base_params)
    both = np.asarray(model.apply(model.params, **inputs, active_adapters=["default", "other"]).logits)
    assert np.abs(both - _logits(model, inputs)).max() > 1e-3

    model.merge_adapter(["default", "other"])
    assert model.merged_adapters == ["default", "other"]
    # Active is still only "default", but both merged adapters are in the weights.
    np.testing.assert_allclose(_logits(model, inputs), both, atol=ATOL, rtol=0)
    # A non-merged adapter still applies on top of the merged ones.
    with_third = np.asarray(
        model.apply(model.params, **inputs, active_adapters=["default", "other", "third"]).logits
    )
    model.merge_adapter(["third"])
    assert model.merged_adapters == ["default", "other", "third"]
    np.testing.assert_allclose(_logits(model, inputs), with_third, atol=ATOL, rtol=0)

    model.unmerge_adapter()  # all of them, in reverse order
    assert model.merged_adapters == []
    assert _max_abs_diff(model.base_params, base_before) <= ATOL
    np.testing.assert_allclose(
        np.asarray(model.apply(model.params, **inputs, active_adapters=["default", "other"]).logits),
        both,
        atol=ATOL,
        rtol=0,
    )


def test_merge_and_unload_while_merged_raises(tiny):
    pair = tiny("llama")
    inputs = pair.inputs()
    model = _model(pair.flax_model, target_modules=["q_proj", "v_proj"])
    expected = _logits(model.merge_and_unload(), inputs)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="unmerge"):
        model.get_merged_params()
    model.unmerge_adapter()
    np.testing.assert_allclose(_logits(model.merge_and_unload(), inputs), expected, atol=ATOL, rtol=0)


def test_get_merged_params_is_pure(tiny):
    pair = tiny("llama")
    inputs = pair.inputs()
    model = _model(pair.flax_model, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    params_before = _host(model.params)
    unmerged = _logits(model, inputs)

    merged = model.get_merged_params()
    _assert_bitwise_equal(model.params, params_before)
    assert model.merged_adapters == []
    assert _max_abs_diff(merged, params_before["base"]) > 1e-3
    np.testing.assert_array_equal(_logits(model, inputs), unmerged)
    merged_logits = np.asarray(pair.flax_model(**inputs, params=merged).logits)
    np.testing.assert_allclose(merged_logits, unmerged, atol=ATOL, rtol=0)

    # A function of the params passed, not of the object's state: it can be jitted, and it
    # merges the adapter given, here a zeroed one, which leaves the base weights as they are.
    jitted = jax.jit(model.get_merged_params)(model.params)
    assert _max_abs_diff(jitted, merged) <= ATOL
    params = model.params
    zeroed = dict(params["adapters"]["default"])
    zeroed["lora"] = jax.tree.map(np.zeros_like, zeroed["lora"])
    zeroed["modules_to_save"] = {"lm_head": params["base"]["lm_head"]}
    params["adapters"]["default"] = zeroed
    zero_merged = model.get_merged_params(params)
    assert _max_abs_diff(zero_merged, params_before["base"]) <= ATOL
    _assert_bitwise_equal(model.params, params_before)


def test_merging_tied_gpt2_embedding_warns(tiny):
    pair = tiny("gpt2")
    assert pair.flax_model.config.tie_word_embeddings
    inputs = pair.inputs()
    model = _model(pair.flax_model, target_modules=["wte"])
    unmerged = _logits(model, inputs)
    with pytest.warns(UserWarning, match="tied"):
        merged = model.merge_and_unload()
    # As the warning says: the shared weight is also the output head, so the logits change.
    assert np.abs(_logits(merged, inputs) - unmerged).max() > 1e-4
    with pytest.warns(UserWarning, match="tied"):
        model.get_merged_params()


def test_merge_adapter_tied_gpt2_embedding_warns(tiny):
    pair = tiny("gpt2")
    model = _model(pair.flax_model, target_modules=["wte"])
    with pytest.warns(UserWarning, match="tied"):
        model.merge_adapter()
