"""Family models beyond parity: quantize-on-read, mesh placement, training, remat, Hub errors."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from tests import parity
from tests.models import families as fam


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("family-loading"))


def test_quantize_on_read_equals_quantizing_the_loaded_model(root):
    folder = fam.saved("qwen3", root)
    config = jpeft.QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    on_read = jpeft.models.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    kernel = on_read.model.layers[0].self_attn.q_proj.kernel.get_value()
    assert hasattr(kernel, "dequantize"), "kernels are 4-bit as read"
    assert not hasattr(on_read.lm_head.kernel.get_value(), "dequantize"), "lm_head is skipped, as in transformers"
    after = jpeft.quantize_model(jpeft.models.AutoModelForCausalLM.from_pretrained(folder), config)
    ids, mask = fam.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = jpeft.get_peft_model(on_read, jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        b = jpeft.get_peft_model(after, jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    got = np.asarray(a(ids, attention_mask=mask).logits)
    parity.assert_close(fam.real(got, mask), fam.real(np.asarray(b(ids, attention_mask=mask).logits), mask),
                        "NF4 on read vs NF4 after", atol=0)


def test_mesh_places_each_weight_in_its_fsdp_sharding(root):
    mesh = jpeft.train.make_mesh(data=2, fsdp=4)
    model = jpeft.models.AutoModelForCausalLM.from_pretrained(fam.saved("llama-default", root), mesh=mesh)
    embedding = model.model.embed_tokens.embedding.get_value()
    assert embedding.sharding.spec == jax.sharding.PartitionSpec("fsdp"), embedding.sharding
    shard = embedding.addressable_shards[0].data
    assert shard.shape == (embedding.shape[0] // 4, embedding.shape[1])
    plain = jpeft.models.AutoModelForCausalLM.from_pretrained(fam.saved("llama-default", root))
    ids, mask = fam.inputs()
    parity.assert_close(
        fam.real(np.asarray(model(ids, attention_mask=mask).logits), mask),
        fam.real(np.asarray(plain(ids, attention_mask=mask).logits), mask),
        "sharded vs single-device",
    )


@pytest.mark.parametrize("scan_layers", [False, True])
def test_lora_trains_with_make_train_step_and_remat(root, scan_layers):
    model = jpeft.models.AutoModelForCausalLM.from_pretrained(fam.saved("qwen3", root), scan_layers=scan_layers)
    ids, mask = fam.inputs()
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    losses = []
    for remat in (False, True):
        peft_model = jpeft.get_peft_model(model, jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        if remat:
            peft_model.enable_gradient_checkpointing()
        trainer = jpeft.train.make_train_step(peft_model, optax.adam(1e-2))
        state = trainer.init(jax.random.key(0))
        run = []
        for _ in range(3):
            state, metrics = trainer.step(state, trainer.frozen(), batch)
            run.append(float(metrics["loss"]))
        assert run[-1] < run[0], run
        losses.append(run)
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5)


def test_offline_hub_id_fails_fast_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(jpeft.CheckpointError, match="HF_HUB_OFFLINE"):
        jpeft.models.AutoModelForCausalLM.from_pretrained("some-org/not-cached-model", cache_dir=tmp_path)


def test_generate_refuses_ids_outside_the_vocabulary(root):
    model = jpeft.models.AutoModelForCausalLM.from_pretrained(fam.saved("llama-default", root))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(np.array([[1, 2, 500]]), max_new_tokens=2)


@pytest.mark.parametrize("name", ["qwen3", "qwen2-window-tied"])
def test_fused_loss_captures_the_head_and_equals_the_plain_loss(root, name):
    """The train step's fused LM-head loss (on by default) applies to family models, tied heads included."""
    from jpeft.bindings.linen import capture_lm_head

    model = jpeft.models.AutoModelForCausalLM.from_pretrained(fam.saved(name, root))
    ids, mask = fam.inputs()
    peft_model = jpeft.get_peft_model(model, jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with capture_lm_head() as head:
        out = peft_model(ids, attention_mask=mask)
    assert head.returned(out.logits), "the head's input came back as the logits"
    assert head.kernel.shape == (32, 96)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    runs = []
    for fused in (True, False):
        trainer = jpeft.train.make_train_step(peft_model, optax.adam(1e-2), fused_loss=fused)
        state = trainer.init(jax.random.key(0))
        losses = []
        for _ in range(2):
            state, metrics = trainer.step(state, trainer.frozen(), batch)
            losses.append(float(metrics["loss"]))
        runs.append(losses)
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5)
