"""The contract every registered method meets, run through one table (optax-style).

Columns (one parametrized test each, one row per method in ``CONFIGS``): contract (jit == eager,
merged == unmerged and unmerge restores, grads only on trainable leaves, save/load round trip,
jpeft -> torch) | torch -> jpeft | checkpoint format. Prompt methods (``PROMPT_CONFIGS``) run a
reduced contract.

For each method, on the same tiny Llama: jit == eager, merged == unmerged (and unmerge
restores), gradients only on trainable leaves, save/load round trip bit-exact, and the
saved folder loads in torch PEFT with equal logits; torch PEFT's adapter of the same config
(perturbed, saved by peft) loads in jpeft with equal logits; and jpeft's saved folder has the
tensor keys, shapes, dtypes and ``adapter_config.json`` of torch PEFT's. Method-specific
behaviour lives in each method's own test file; this file makes sure no method skips the basics.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.core import registry
from tests import parity

CONFIGS = {
    jpeft.PeftType.LORA: lambda: jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    jpeft.PeftType.IA3: lambda: jpeft.IA3Config(
        target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
    jpeft.PeftType.VERA: lambda: jpeft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    jpeft.PeftType.ADALORA: lambda: jpeft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]
    ),
    jpeft.PeftType.LOHA: lambda: jpeft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
}


# Prompt-learning methods change the inputs, not the layers: no merge; their reduced contract is below.
PROMPT_CONFIGS = {
    jpeft.PeftType.PROMPT_TUNING: lambda: jpeft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3
    ),
    jpeft.PeftType.PREFIX_TUNING: lambda: jpeft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3
    ),
    jpeft.PeftType.P_TUNING: lambda: jpeft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16
    ),
}


def test_every_registered_method_is_in_the_table():
    assert set(registry.registered_types()) == set(CONFIGS) | set(PROMPT_CONFIGS)


@pytest.fixture(scope="module")
def pair(tiny):
    return tiny("llama")


def _model(pair, peft_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = jpeft.get_peft_model(pair.flax_model, CONFIGS[peft_type](), key=jax.random.key(3))
    parity.perturb_jpeft_adapter(model, scale=0.2)  # also moves frozen leaves: keep the real ones below
    params = model.params
    mask = model.trainable_mask()
    fresh = jpeft.get_peft_model(pair.flax_model, CONFIGS[peft_type](), key=jax.random.key(3)).params
    params["adapters"] = jax.tree.map(
        lambda p, f, m: p if m else f, params["adapters"], fresh["adapters"], mask["adapters"]
    )
    model.params = params
    return model


@pytest.mark.parametrize("peft_type", list(CONFIGS), ids=lambda t: t.value)
def test_method_contract(pair, peft_type, tmp_path):
    model = _model(pair, peft_type)
    inputs = pair.inputs()
    eager = parity.jax_logits(model, inputs)
    base = np.asarray(pair.flax_model(**inputs).logits)
    assert np.abs(eager - base).max() > 1e-3, "the adapter must change the output"

    # jit == eager
    jitted = jax.jit(functools.partial(model.apply, train=False))
    np.testing.assert_allclose(np.asarray(jitted(model.params, **inputs).logits), eager, atol=1e-6)

    # merged == unmerged; unmerge restores the base
    base_before = model.base_params
    merged = model.merge_and_unload()
    np.testing.assert_allclose(np.asarray(merged(**inputs).logits), eager, atol=1e-5)
    model.merge_adapter()
    np.testing.assert_allclose(parity.jax_logits(model, inputs), eager, atol=1e-5)
    model.unmerge_adapter()
    for restored, original in zip(
        jax.tree.leaves(model.base_params), jax.tree.leaves(base_before), strict=True
    ):
        np.testing.assert_allclose(restored, original, atol=1e-5)

    # gradients only on trainable leaves
    trainable, frozen = model.split_params()

    def loss(trainable):
        return jnp.mean(model.apply(trainable, frozen=frozen, **inputs).logits ** 2)

    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert all(leaf is None for leaf in jax.tree.leaves(grads["base"], is_leaf=lambda x: x is None))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["adapters"]))

    # save/load round trip, bit-exact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "adapter")
        loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path / "adapter")
    for got, want in zip(
        jax.tree.leaves(loaded.adapters["default"]), jax.tree.leaves(model.adapters["default"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(parity.jax_logits(loaded, inputs), eager)

    # torch PEFT loads the folder and agrees
    torch_model = parity.torch_peft_load(pair, tmp_path / "adapter")
    assert np.abs(parity.torch_logits(torch_model, inputs) - eager).max() <= parity.ATOL


@pytest.fixture(scope="module")
def torch_saved(pair, tmp_path_factory):
    """``torch_saved(peft_type)`` -> (folder, logits): torch PEFT's adapter for the row's config,
    trainable tensors perturbed, saved by peft; built once per method."""

    @functools.cache
    def build(peft_type):
        import peft
        import torch

        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(pair.torch_model(), parity.torch_peft_config(CONFIGS[peft_type]()))
        parity.perturb_torch_trainable(model, seed=1)
        model.eval()
        folder = tmp_path_factory.mktemp(f"torch-{peft_type.value}")
        model.save_pretrained(folder)
        return folder, parity.torch_logits(model, pair.inputs())

    return build


@pytest.fixture(scope="module")
def jpeft_saved(pair, tmp_path_factory):
    """``jpeft_saved(peft_type)`` -> folder: jpeft's adapter for the row (``_model``), saved; built once."""

    @functools.cache
    def build(peft_type):
        folder = tmp_path_factory.mktemp(f"jpeft-{peft_type.value}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _model(pair, peft_type).save_pretrained(folder)
        return folder

    return build


@pytest.mark.parametrize("peft_type", list(CONFIGS), ids=lambda t: t.value)
def test_torch_to_jpeft(pair, torch_saved, peft_type):
    """torch PEFT's adapter (perturbed, saved by peft) loaded by jpeft gives torch's logits."""
    folder, ref = torch_saved(peft_type)
    inputs = pair.inputs()
    assert parity.max_diff(ref, np.asarray(pair.flax_model(**inputs).logits)) > 1e-3, "no-op adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, folder)
    assert type(loaded.peft_config["default"]) is type(CONFIGS[peft_type]())
    diff = parity.assert_close(
        parity.jax_logits(loaded, inputs), ref, f"torch PEFT {peft_type.value} in jpeft"
    )
    print(f"torch -> jpeft {peft_type.value} max|diff| = {diff:.2e}")


@pytest.mark.parametrize("peft_type", list(CONFIGS), ids=lambda t: t.value)
def test_checkpoint_format(torch_saved, jpeft_saved, peft_type):
    """jpeft's folder has torch PEFT's tensor keys, shapes, dtypes and adapter_config.json."""
    torch_dir, _ = torch_saved(peft_type)
    jax_dir = jpeft_saved(peft_type)
    theirs = parity.saved_tensors(torch_dir)
    assert theirs, "torch PEFT saved no tensors"
    assert parity.saved_tensors(jax_dir) == theirs
    parity.assert_same_config(parity.saved_config(jax_dir), parity.saved_config(torch_dir))


@pytest.mark.parametrize("peft_type", list(PROMPT_CONFIGS), ids=lambda t: t.value)
def test_prompt_method_contract(pair, peft_type, tmp_path):
    model = jpeft.get_peft_model(pair.flax_model, PROMPT_CONFIGS[peft_type](), key=jax.random.key(3))
    parity.perturb_jpeft_adapter(model, scale=0.2)
    inputs = pair.inputs()
    eager = parity.jax_logits(model, inputs)
    base = np.asarray(pair.flax_model(**inputs).logits)
    nvt = model.peft_config["default"].num_virtual_tokens
    assert eager.shape[1] in (base.shape[1], base.shape[1] + nvt)
    assert np.abs(eager[:, -base.shape[1] :] - base).max() > 1e-3, "the adapter must change the output"

    jitted = jax.jit(functools.partial(model.apply, train=False))
    np.testing.assert_allclose(np.asarray(jitted(model.params, **inputs).logits), eager, atol=1e-6)
    with pytest.raises(ValueError):
        model.merge_and_unload()

    trainable, frozen = model.split_params()

    def loss(trainable):
        return jnp.mean(model.apply(trainable, frozen=frozen, **inputs).logits ** 2)

    grads = jax.grad(loss)(trainable)
    assert all(leaf is None for leaf in jax.tree.leaves(grads["base"], is_leaf=lambda x: x is None))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["adapters"]))

    model.save_pretrained(tmp_path / "adapter")
    loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path / "adapter")
    assert isinstance(loaded, jpeft.PromptLearningPeftModel)
    parity.assert_close(parity.jax_logits(loaded, inputs), eager, "jpeft reload", atol=1e-6)
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path / "adapter", is_trainable=True)
    torch_model = parity.torch_peft_load(pair, tmp_path / "adapter")
    parity.assert_close(parity.torch_logits(torch_model, inputs), eager, "torch PEFT load")
