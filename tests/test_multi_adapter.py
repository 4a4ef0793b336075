"""Many adapters in one model: several active, mixed batches, mixed methods; parity with torch PEFT."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from tests import parity


def _torch_two_lora(pair, folder, *, embed: bool = False):
    """torch PEFT model with adapters "default" and "other" (non-trivial weights), saved to ``folder``."""
    import peft
    import torch

    torch.manual_seed(0)
    first = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = dict(
        r=2, lora_alpha=6, target_modules=["k_proj", "v_proj"] + (["embed_tokens"] if embed else [])
    )
    if pair.arch == "gpt2":
        first = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
        second = dict(r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = peft.get_peft_model(pair.torch_model(), peft.LoraConfig(**first))
    model.add_adapter("other", peft.LoraConfig(**second))
    for name in ("default", "other"):
        model.set_adapter(name)
        parity.perturb_torch_trainable(model, seed=3 if name == "other" else 1)
    model.set_adapter("default")
    model.eval()
    model.save_pretrained(folder)
    return model


def _jpeft_two_lora(pair, folder):
    model = jpeft.PeftModel.from_pretrained(pair.flax_model, folder)
    model.load_adapter(folder / "other", "other")
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_matches_torch_peft_and_single_adapters(arch, tiny, tmp_path):
    import torch

    pair = tiny(arch)
    torch_model = _torch_two_lora(pair, tmp_path, embed=arch == "llama")
    model = _jpeft_two_lora(pair, tmp_path)
    inputs = pair.inputs(batch=4)
    names = ["other", "__base__", "default", "other"]

    with torch.no_grad():
        want = torch_model(**parity.torch_inputs(inputs), adapter_names=names).logits.numpy()
    got = np.asarray(model(**inputs, adapter_names=names).logits)
    parity.assert_close(got, want, "mixed batch vs torch PEFT")

    # example by example, equal to running that adapter alone
    for k, name in enumerate(names):
        alone = model.apply(
            model.params, **inputs, active_adapters=[] if name == "__base__" else [name]
        ).logits
        parity.assert_close(got[k], np.asarray(alone)[k], f"example {k} ({name}) vs alone")
    # the adapters really differ, so the test can fail
    assert parity.max_diff(got[0], got[2]) > 1e-3 and parity.max_diff(got[1], got[2]) > 1e-3


def test_mixed_batch_under_jit_compiles_once(tiny, tmp_path):
    pair = tiny("llama")
    _torch_two_lora(pair, tmp_path)
    model = _jpeft_two_lora(pair, tmp_path)
    inputs = pair.inputs(batch=3)
    traces = []

    @jax.jit
    def forward(params, ids):
        traces.append(1)
        return model.apply(params, **inputs, adapter_names=ids).logits

    mixes = [["default", "other", "__base__"], ["other", "other", "default"], ["__base__"] * 3]
    for names in mixes:
        got = forward(model.params, model.adapter_ids(names))
        want = model(**inputs, adapter_names=names).logits
        parity.assert_close(got, want, f"jit mixed batch {names}")
    assert len(traces) == 1
    np.testing.assert_array_equal(model.adapter_ids(["__base__", "other"]), [-1, 1])


def test_mixed_batch_generate_equals_each_adapter_alone(tiny, tmp_path):
    pair = tiny("gpt2")
    _torch_two_lora(pair, tmp_path)
    model = _jpeft_two_lora(pair, tmp_path)
    prompt = pair.inputs(batch=3, length=4)["input_ids"]
    names = ["other", "default", "__base__"]
    mixed = np.asarray(model.generate(prompt, max_length=10, adapter_names=names).sequences)
    for k, name in enumerate(names):
        alone = jpeft.PeftModel.generate(
            model, prompt, max_length=10, params=model.params, adapter_names=[name] * 3
        ).sequences
        np.testing.assert_array_equal(mixed[k], np.asarray(alone)[k])
    model.set_adapter("other")
    np.testing.assert_array_equal(mixed[0], np.asarray(model.generate(prompt, max_length=10).sequences)[0])
    # beam search repeats each example's adapter for its beams (as PEFT)
    beams = model.generate(prompt, max_length=8, num_beams=2, adapter_names=names).sequences
    assert beams.shape == (3, 8)


def test_mixed_batch_errors(tiny, tmp_path):
    pair = tiny("llama")
    _torch_two_lora(pair, tmp_path)
    model = _jpeft_two_lora(pair, tmp_path)
    inputs = pair.inputs(batch=2)
    with pytest.raises(ValueError, match=r"non-existing adapter.*'nope'.*\['default', 'other'\]"):
        model(**inputs, adapter_names=["nope", "default"])
    with pytest.raises(ValueError, match="training mode"):
        model(**inputs, adapter_names=["default", "other"], train=True)
    with pytest.raises(ValueError, match="3 entries but the batch has 2"):
        model(**inputs, adapter_names=["default", "other", "default"])
    model.merge_adapter(["other"])
    with pytest.raises(ValueError, match="merged"):
        model(**inputs, adapter_names=["default", "other"])
    model.unmerge_adapter()
    model.add_adapter("dora", jpeft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        model(**inputs, adapter_names=["default", "other"])


def test_several_active_adapters_add_as_in_torch_peft(tiny, tmp_path):
    import torch

    pair = tiny("llama")
    torch_model = _torch_two_lora(pair, tmp_path, embed=True)
    model = _jpeft_two_lora(pair, tmp_path)
    inputs = pair.inputs()
    torch_model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        want = torch_model(**parity.torch_inputs(inputs)).logits.numpy()
    model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    parity.assert_close(parity.jax_logits(model, inputs), want, "two active adapters vs torch PEFT")
    # both train, as with PEFT's base_model.set_adapter([...])
    mask = model.trainable_mask()["adapters"]
    assert all(jax.tree.leaves(mask["default"]["lora"])) and all(jax.tree.leaves(mask["other"]["lora"]))
    # equal to merging both into the base
    merged = model.merge_and_unload()
    parity.assert_close(parity.jax_logits(merged, inputs), want, "merged pair")


def test_mixed_lora_adalora_matches_torch_peft_mixed_model(tiny, tmp_path):
    import peft
    import torch

    pair = tiny("llama")
    torch.manual_seed(0)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ada = dict(target_modules=["v_proj", "o_proj"], total_step=10, init_r=3, target_r=2)
    torch_model = peft.get_peft_model(pair.torch_model(), peft.LoraConfig(**lora), mixed=True)
    torch_model.add_adapter("ada", peft.AdaLoraConfig(**ada))
    torch_model.set_adapter(["default", "ada"])
    with torch.no_grad():
        for name, param in torch_model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.2)
    torch_model.eval()
    with torch.no_grad():
        want = torch_model(**parity.torch_inputs(pair.inputs())).logits.numpy()
    # PeftMixedModel cannot save; write each adapter through a plain PeftModel sharing the weights
    for name, config in (("default", peft.LoraConfig(**lora)), ("ada", peft.AdaLoraConfig(**ada))):
        single = peft.get_peft_model(pair.torch_model(), config)
        state = {}
        for key, value in torch_model.state_dict().items():
            parts = key.replace(".base_layer.", ".").split(".")
            if name in parts and ("lora_" in key or "ranknum" in key):
                state[".".join("default" if p == name else p for p in parts)] = value
        missing = single.load_state_dict(state, strict=False)
        assert not [k for k in missing.missing_keys if "lora_" in k]
        single.save_pretrained(tmp_path / name)

    with pytest.raises(ValueError, match="different peft types"):
        plain = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path / "default")
        plain.load_adapter(tmp_path / "ada", "ada")
    model = jpeft.PeftMixedModel.from_pretrained(pair.flax_model, tmp_path / "default")
    model.load_adapter(tmp_path / "ada", "ada")
    model.set_adapter(["default", "ada"])
    got = parity.jax_logits(model, pair.inputs())
    parity.assert_close(got, want, "LoRA + AdaLoRA mixed vs torch PeftMixedModel")
    assert parity.max_diff(got, parity.jax_logits(pair.flax_model, pair.inputs())) > 1e-3

    # saving writes each adapter in PEFT's layout; torch loads each into a PeftMixedModel
    model.save_pretrained(tmp_path / "mixed")
    reloaded = peft.PeftMixedModel.from_pretrained(pair.torch_model(), tmp_path / "mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        reloaded.load_adapter(tmp_path / "mixed" / "ada", "ada")
    reloaded.set_adapter(["default", "ada"])
    parity.assert_close(
        parity.torch_logits(reloaded.eval(), pair.inputs()), want, "torch reload of jpeft save"
    )


def test_mixed_lora_ia3_nest_in_insertion_order(tiny):
    pair = tiny("llama")
    inputs = pair.inputs()
    model = jpeft.get_peft_model(
        pair.flax_model,
        jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        mixed=True,
    )
    assert isinstance(model, jpeft.PeftMixedModel)
    model.add_adapter("ia3", jpeft.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    parity.perturb_jpeft_adapter(model, "ia3", seed=4)
    model.set_adapter(["default", "ia3"])
    got = parity.jax_logits(model, inputs)
    # IA3 (added second) wraps the LoRA layer: v = l * (W x + s B A x), i.e. merge LoRA, then IA3
    merged = model.merge_and_unload(adapter_names=["default", "ia3"])
    parity.assert_close(got, parity.jax_logits(merged, inputs), "LoRA then IA3 vs merged")
    lora_only = np.asarray(model.apply(model.params, **inputs, active_adapters=["default"]).logits)
    assert parity.max_diff(got, lora_only) > 1e-3

    # an IA3 feed-forward adapter must be innermost on its layer
    model.add_adapter("ff", jpeft.IA3Config(target_modules=["q_proj"], feedforward_modules=["q_proj"]))
    with pytest.raises(ValueError, match="add the IA3 adapter first"):
        model.set_adapter(["default", "ff"])


def test_mixed_batch_with_ia3_adapters(tiny):
    """Methods without a batched path (IA3) run per adapter and are selected per example."""
    pair = tiny("llama")
    model = jpeft.get_peft_model(pair.flax_model, jpeft.IA3Config(target_modules=["v_proj", "down_proj"]))
    parity.perturb_jpeft_adapter(model, "default", seed=1)
    model.add_adapter("b", jpeft.IA3Config(target_modules=["q_proj"], feedforward_modules=["q_proj"]))
    parity.perturb_jpeft_adapter(model, "b", seed=2)
    inputs = pair.inputs(batch=3)
    names = ["b", "default", "__base__"]
    got = np.asarray(model(**inputs, adapter_names=names).logits)
    for k, name in enumerate(names):
        alone = model.apply(
            model.params, **inputs, active_adapters=[] if name == "__base__" else [name]
        ).logits
        parity.assert_close(got[k], np.asarray(alone)[k], f"IA3 example {k}")
    assert jnp.abs(got[0] - got[1]).max() > 1e-3


def test_mixed_batch_with_classifier_copies_matches_torch_peft(tiny, tmp_path):
    """SEQ_CLS adapters each train their own classifier: every example uses its adapter's copy, as PEFT."""
    import peft
    import torch

    pair = tiny("bert")
    torch.manual_seed(0)
    first = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    second = dict(r=2, lora_alpha=4, target_modules=["key"], task_type="SEQ_CLS")
    torch_model = peft.get_peft_model(pair.torch_model(), peft.LoraConfig(**first))
    torch_model.add_adapter("other", peft.LoraConfig(**second))
    for name, seed in (("default", 1), ("other", 3)):
        torch_model.set_adapter(name)
        parity.perturb_torch_trainable(torch_model, seed=seed)
    torch_model.set_adapter("default")
    torch_model.eval()
    torch_model.save_pretrained(tmp_path)
    inputs = pair.inputs(batch=3)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        want = torch_model(**parity.torch_inputs(inputs), adapter_names=names).logits.numpy()

    model = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    model.load_adapter(tmp_path / "other", "other")
    got = np.asarray(model(**inputs, adapter_names=names).logits)
    parity.assert_close(got, want, "SEQ_CLS mixed batch vs torch PEFT")
    for k, name in enumerate(names):
        alone = model.apply(
            model.params, **inputs, active_adapters=[] if name == "__base__" else [name]
        ).logits
        parity.assert_close(got[k], np.asarray(alone)[k], f"example {k} ({name}) vs alone")
    assert parity.max_diff(got[0], got[2]) > 1e-3
