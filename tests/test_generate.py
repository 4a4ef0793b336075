"""``PeftModel.generate``: transformers' Flax ``generate`` with the adapters in place.

A non-trivial (perturbed) LoRA must generate exactly what the merged model generates,
token for token, greedy and sampled, with an attention mask and under ``jax.jit``; and
differently from the base model, which shows the adapter is really applied.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

import jpeft
from tests import parity

MAX_LENGTH = 12

TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bart": ["q_proj", "v_proj", "fc1"],
}


def _peft_model(flax_model, targets, scale=0.5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out correction on GPT-2's Conv1D
        model = jpeft.get_peft_model(flax_model, jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    parity.perturb_jpeft_adapter(model, scale=scale)
    return model


@pytest.fixture(scope="module")
def lm(tiny):
    """``lm(arch)`` -> (pair, perturbed PeftModel, merged Flax model), built once per arch."""
    cache = {}

    def get(arch):
        if arch not in cache:
            pair = tiny(arch)
            model = _peft_model(pair.flax_model, TARGETS[arch])
            cache[arch] = (pair, model, model.merge_and_unload())
        return cache[arch]

    return get


def _prompt(pair):
    """Two prompts, the first padded: left padding for decoder-only models, right padding for BART's encoder."""
    inputs = pair.inputs(batch=2, length=5, seed=3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].copy()
    if pair.arch == "bart":
        mask[0, -2:] = 0
    else:
        mask[0, :2] = 0
    return ids, mask


GREEDY = dict(max_length=MAX_LENGTH, do_sample=False)
SAMPLE = dict(max_length=MAX_LENGTH, do_sample=True, top_k=0, prng_key=jax.random.PRNGKey(7))


@pytest.fixture(scope="module")
def generated(lm):
    """``generated(arch, who, mode)``: sequences of the adapted, merged or base model (each computed once)."""
    cache = {}

    def get(arch, who, mode):
        if (arch, who, mode) not in cache:
            pair, model, merged = lm(arch)
            ids, mask = _prompt(pair)
            runner = {"peft": model, "merged": merged, "base": pair.flax_model}[who]
            kwargs = {"greedy": GREEDY, "sample": SAMPLE}[mode]
            cache[arch, who, mode] = np.asarray(runner.generate(ids, attention_mask=mask, **kwargs).sequences)
        return cache[arch, who, mode]

    return get


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart"])
def test_greedy_equals_merged_and_differs_from_base(arch, lm, generated):
    pair = lm(arch)[0]
    ids, mask = _prompt(pair)
    assert mask.min() == 0  # the attention mask matters: one prompt is padded
    adapted = generated(arch, "peft", "greedy")
    assert adapted.shape == (2, MAX_LENGTH)
    np.testing.assert_array_equal(adapted, generated(arch, "merged", "greedy"))
    assert not np.array_equal(adapted, generated(arch, "base", "greedy")), (
        "the adapter did not change generation"
    )
    if arch != "bart":  # decoder-only: the prompt is kept as the prefix
        np.testing.assert_array_equal(adapted[:, : ids.shape[1]], ids)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart"])
def test_sampling_equals_merged(arch, generated):
    adapted = generated(arch, "peft", "sample")
    np.testing.assert_array_equal(adapted, generated(arch, "merged", "sample"))
    # Sampling really sampled (not the greedy tokens).
    assert not np.array_equal(adapted, generated(arch, "peft", "greedy"))


def test_disabled_adapter_generates_like_base(lm, generated):
    pair, model, _ = lm("gpt2")
    ids, mask = _prompt(pair)
    with model.disable_adapter():
        out = np.asarray(model.generate(ids, attention_mask=mask, **GREEDY).sequences)
    np.testing.assert_array_equal(out, generated("gpt2", "base", "greedy"))


def test_generate_under_jit(lm, generated):
    """A jitted wrapper taking ``params`` gives what eager ``generate`` gives, and follows the params passed."""
    pair, model, _ = lm("gpt2")
    ids, mask = _prompt(pair)

    @jax.jit
    def run(params, ids, mask):
        return model.generate(ids, attention_mask=mask, params=params, **GREEDY).sequences

    np.testing.assert_array_equal(
        np.asarray(run(model.params, ids, mask)), generated("gpt2", "peft", "greedy")
    )

    # Zeroing the adapter through the traced params argument gives the base model's tokens (no recompile).
    params = model.params
    params["adapters"]["default"] = jax.tree.map(lambda x: x * 0, params["adapters"]["default"])
    np.testing.assert_array_equal(np.asarray(run(params, ids, mask)), generated("gpt2", "base", "greedy"))


def test_sequence_classifier_cannot_generate(tiny):
    pair = tiny("bert")
    model = jpeft.get_peft_model(
        pair.flax_model, jpeft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    ids = pair.inputs()["input_ids"]
    with pytest.raises(
        TypeError, match=r"FlaxBertForSequenceClassification.*(cannot generate|no `generate`)"
    ):
        model.generate(ids, max_length=MAX_LENGTH)
