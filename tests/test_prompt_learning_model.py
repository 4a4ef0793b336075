"""``PromptLearningPeftModel``: the PeftModel API for prompt methods (training, loading rules, errors)."""

from __future__ import annotations

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

import jpeft
import jpeft.train.step
from jpeft.prompt_learning import TRAINABLE_REFUSAL, PromptLearningPeftModel
from jpeft.train import losses
from jpeft.tuners.p_tuning import PromptEncoderConfig
from jpeft.tuners.prompt_tuning import PromptTuningConfig
from tests import parity


def _gpt2_model(tiny, **kwargs) -> PromptLearningPeftModel:
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **kwargs)
    peft_model = jpeft.get_peft_model(tiny("gpt2").flax_model, config)
    parity.perturb_jpeft_adapter(peft_model)
    return peft_model


def test_get_peft_model_builds_the_prompt_class(tiny):
    pair = tiny("gpt2")
    for config in (
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    ):
        peft_model = jpeft.get_peft_model(pair.flax_model, config)
        assert type(peft_model) is PromptLearningPeftModel
        assert peft_model.targeted_modules() == []
        assert "virtual tokens" in repr(peft_model)
    with pytest.raises(TypeError, match="takes prompt-learning configs"):
        PromptLearningPeftModel(pair.flax_model, jpeft.LoraConfig(target_modules=["c_attn"]))


def test_apply_is_pure_and_jits(tiny):
    peft_model = _gpt2_model(tiny)
    inputs = tiny("gpt2").inputs()
    eager = peft_model.apply(peft_model.params, **inputs).logits
    jitted = jax.jit(functools.partial(peft_model.apply, train=False))(peft_model.params, **inputs).logits
    parity.assert_close(jitted, eager, "jit vs eager")
    trainable, frozen = peft_model.split_params()
    parity.assert_close(peft_model.apply(trainable, frozen=frozen, **inputs).logits, eager, "split", atol=0.0)


def test_disabled_adapter_is_the_base_model(tiny):
    pair = tiny("gpt2")
    peft_model = _gpt2_model(tiny)
    inputs = pair.inputs()
    base = parity.jax_logits(pair.flax_model, inputs)
    with peft_model.disable_adapter():
        parity.assert_close(peft_model(**inputs).logits, base, "disable_adapter", atol=0.0)
    off = peft_model.apply(peft_model.params, active_adapters=[], **inputs).logits
    parity.assert_close(off, base, "active_adapters=[]", atol=0.0)
    assert peft_model(**inputs).logits.shape[1] == 3 + inputs["input_ids"].shape[1]


def test_one_prompt_adapter_at_a_time(tiny):
    peft_model = _gpt2_model(tiny)
    peft_model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    inputs = tiny("gpt2").inputs()
    assert peft_model.apply(peft_model.params, active_adapters=["other"], **inputs).logits.shape[1] == 5 + 7
    with pytest.raises(ValueError, match="one is active at a time"):
        peft_model.apply(peft_model.params, active_adapters=["default", "other"], **inputs)
    with pytest.raises(ValueError, match="cannot be active with other adapters"):
        peft_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="not supported for prompt-learning adapters"):
        peft_model.apply(peft_model.params, adapter_names=["default", "other"], **inputs)
    peft_model.set_adapter("other")
    assert peft_model(**inputs).logits.shape[1] == 12
    peft_model.delete_adapter("other")
    assert peft_model.active_adapters == ["default"]


def test_methods_do_not_mix(tiny):
    pair = tiny("gpt2")
    peft_model = jpeft.get_peft_model(
        pair.flax_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        peft_model.add_adapter("p", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        peft_model.add_adapter("lora", jpeft.LoraConfig(target_modules=["c_attn"]))
    lora_model = jpeft.get_peft_model(pair.flax_model, jpeft.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        lora_model.add_adapter("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


def test_trainable_split_is_the_whole_active_adapter(tiny):
    pair = tiny("bert")
    peft_model = jpeft.get_peft_model(
        pair.flax_model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    )
    mask = peft_model.trainable_mask()
    assert not any(jax.tree.leaves(mask["base"]))
    assert all(jax.tree.leaves(mask["adapters"]["default"]))
    assert set(peft_model.adapters["default"]["modules_to_save"]) == {"classifier"}
    assert peft_model.get_nb_trainable_parameters()[0] == 2 * 32 + 3 * 32 + 3


def test_merging_is_refused(tiny):
    peft_model = _gpt2_model(tiny)
    for call in (
        peft_model.merge_adapter,
        peft_model.unmerge_adapter,
        peft_model.merge_and_unload,
        peft_model.get_merged_params,
    ):
        with pytest.raises(ValueError, match="cannot be merged into the base weights"):
            call()
    assert peft_model.unload() is not None


# --------------------------------------------------------------------------- inputs


def test_position_ids_are_dropped_with_peft_warning(tiny):
    peft_model = _gpt2_model(tiny)
    inputs = tiny("gpt2").inputs()
    want = peft_model(**inputs).logits
    with pytest.warns(UserWarning, match="Position ids are not supported for parameter efficient tuning"):
        got = peft_model(**inputs, position_ids=np.zeros_like(inputs["input_ids"])).logits
    parity.assert_close(got, want, "position_ids ignored", atol=0.0)


def test_seq_cls_token_type_ids_are_zero_padded_as_peft(tiny, tmp_path):
    pair = tiny("bert")
    peft_model = jpeft.get_peft_model(
        pair.flax_model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    )
    parity.perturb_jpeft_adapter(peft_model)
    peft_model.save_pretrained(tmp_path)
    torch_model = parity.torch_peft_load(pair, tmp_path)
    inputs = {**pair.inputs(), "token_type_ids": np.ones((2, 7), np.int32)}
    got = parity.jax_logits(peft_model, inputs)
    parity.assert_close(got, parity.torch_logits(torch_model, inputs), "BERT with token_type_ids")
    assert parity.max_diff(got, parity.jax_logits(peft_model, pair.inputs())) > 1e-4


def test_seq2seq_needs_decoder_inputs(tiny):
    pair = tiny("bart")
    peft_model = jpeft.get_peft_model(
        pair.flax_model, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2)
    )
    inputs = {k: v for k, v in pair.inputs().items() if k != "decoder_input_ids"}
    with pytest.raises(ValueError, match="needs `decoder_input_ids`"):
        peft_model(**inputs)


# --------------------------------------------------------------------------- unsupported models and tasks


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(4)(nn.Embed(10, 8)(ids))


def test_unsupported_models_and_tasks_are_clear_errors(tiny):
    module = _Tiny()
    params = module.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(
        jpeft.ConfigError, match="cannot adapt _Tiny: prompt learning needs a transformers Flax"
    ):
        jpeft.get_peft_model((module, params), config)
    with pytest.raises(jpeft.ConfigError, match="task_type='TOKEN_CLS' is not implemented"):
        jpeft.get_peft_model(
            tiny("bert").flax_model, PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=2)
        )
    with pytest.raises(jpeft.ConfigError, match="does not fit FlaxBartForConditionalGeneration"):
        jpeft.get_peft_model(tiny("bart").flax_model, config)
    with pytest.raises(jpeft.ConfigError, match="does not fit FlaxGPT2LMHeadModel"):
        jpeft.get_peft_model(
            tiny("gpt2").flax_model, PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2)
        )
    with pytest.raises(jpeft.ConfigError, match="`token_dim=16` differs from the width 32"):
        jpeft.get_peft_model(
            tiny("gpt2").flax_model,
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=16),
        )


# --------------------------------------------------------------------------- loading rules


def test_is_trainable_is_refused_as_peft(tiny, tmp_path):
    pair = tiny("gpt2")
    _gpt2_model(tiny).save_pretrained(tmp_path)
    for load in (jpeft.PeftModel.from_pretrained, PromptLearningPeftModel.from_pretrained):
        with pytest.raises(ValueError, match=TRAINABLE_REFUSAL):
            load(pair.flax_model, tmp_path, is_trainable=True)
    loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    with pytest.raises(ValueError, match=TRAINABLE_REFUSAL):
        loaded.load_adapter(tmp_path, "again", is_trainable=True)
    assert list(loaded.adapters) == ["default"]


def test_loaded_adapter_is_frozen_and_counted_as_peft(tiny, tmp_path):
    """PEFT counts the same 'all params'; it also leaves the loaded table's requires_grad on (a quirk:
    it prints 96 trainable), while jpeft freezes a loaded adapter entirely, as the brief requires."""
    import peft
    import torch

    pair = tiny("bert")
    torch.manual_seed(0)
    torch_model = peft.get_peft_model(
        pair.torch_model(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    )
    torch_model.save_pretrained(tmp_path)
    _, torch_total = peft.PeftModel.from_pretrained(
        pair.torch_model(), tmp_path
    ).get_nb_trainable_parameters()
    loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    assert loaded.get_nb_trainable_parameters() == (0, torch_total)
    assert not any(jax.tree.leaves(loaded.trainable_mask()))
    loaded.load_adapter(tmp_path, "second")
    assert loaded.active_adapters == ["default"] and "second" in loaded.adapters


def test_missing_or_misshapen_prompt_embeddings_are_checkpoint_errors(tiny, tmp_path):
    pair = tiny("gpt2")
    _gpt2_model(tiny).save_pretrained(tmp_path)
    save_file({"something_else": np.zeros((3, 32), np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(jpeft.CheckpointError, match="has no 'prompt_embeddings' tensor"):
        jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    save_file(
        {"prompt_embeddings": np.zeros((4, 32), np.float32)}, str(tmp_path / "adapter_model.safetensors")
    )
    with pytest.raises(jpeft.CheckpointError, match=r"found shape \(4, 32\) in the checkpoint and \(3, 32\)"):
        jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)


def test_missing_head_copy_is_a_checkpoint_error(tiny, tmp_path):
    pair = tiny("bert")
    peft_model = jpeft.get_peft_model(
        pair.flax_model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    )
    peft_model.save_pretrained(tmp_path)
    save_file(
        {"prompt_embeddings": np.zeros((2, 32), np.float32)}, str(tmp_path / "adapter_model.safetensors")
    )
    with pytest.raises(jpeft.CheckpointError, match="base_model.classifier"):
        jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)


def test_several_adapters_save_in_subfolders_that_torch_loads(tiny, tmp_path):
    pair = tiny("llama")
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    peft_model.add_adapter(
        "second", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), key=jax.random.key(3)
    )
    peft_model.save_pretrained(tmp_path)
    torch_model = parity.torch_peft_load(pair, tmp_path / "second")
    got = peft_model.apply(peft_model.params, active_adapters=["second"], **pair.inputs()).logits
    parity.assert_close(got, parity.torch_logits(torch_model, pair.inputs()), "second adapter in torch")


# --------------------------------------------------------------------------- training


def test_loss_batch_matches_peft_labels_and_loss(tiny):
    import peft
    import torch

    pair = tiny("gpt2")
    torch.manual_seed(0)
    torch_model = peft.get_peft_model(
        pair.torch_model(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ).eval()
    inputs = pair.inputs()
    inputs["attention_mask"][1, :2] = 0
    with torch.no_grad():
        want = torch_model(
            **parity.torch_inputs(inputs), labels=torch.tensor(inputs["input_ids"]).long()
        ).loss
    folder_model = jpeft.get_peft_model(
        pair.flax_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    params = folder_model.params
    params["adapters"]["default"]["prompt"]["embedding"] = jnp.asarray(
        torch_model.prompt_encoder["default"].embedding.weight.detach().numpy()
    )
    folder_model.params = params
    batch = folder_model.loss_batch({**inputs, "labels": inputs["input_ids"]})
    assert batch["labels"].shape == (2, 10) and (np.asarray(batch["labels"][:, :3]) == -100).all()
    assert (np.asarray(batch["attention_mask"][:, :3]) == 1).all()
    logits = folder_model(**inputs).logits
    # torch's loss ignores only -100 labels (padding still counts), so compare without the mask
    total, count = losses.causal_lm_loss(logits, batch["labels"])
    parity.assert_close(total / count, want.numpy(), "causal LM loss vs PEFT")
    no_labels = folder_model.loss_batch(inputs)
    np.testing.assert_array_equal(no_labels["labels"], batch["labels"])
    with folder_model.disable_adapter():
        assert folder_model.loss_batch(inputs) is inputs


_HAS_LOSS_BATCH_HOOK = "loss_batch" in inspect.getsource(jpeft.train.step)


def _eval_loss(peft_model: PromptLearningPeftModel, params, batch) -> float:
    """The task's mean loss in eval mode (no dropout), batch adjusted by ``loss_batch``."""
    task = peft_model.peft_config["default"].task_type.value
    inputs = jpeft.train.step.model_inputs(batch, peft_model.binding.config, task)
    outputs = peft_model.apply(params, **inputs)
    return float(
        losses.mean_loss(jpeft.train.step.loss_for_task(task)(outputs, peft_model.loss_batch(batch)))
    )


@pytest.mark.xfail(
    not _HAS_LOSS_BATCH_HOOK, reason="make_train_step does not call peft_model.loss_batch yet", strict=True
)
@pytest.mark.parametrize(
    "arch, config",
    [
        ("gpt2", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        ("bert", PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
        (
            "bart",
            PromptEncoderConfig(
                task_type="SEQ_2_SEQ_LM",
                num_virtual_tokens=2,
                encoder_reparameterization_type="LSTM",
                encoder_dropout=0.1,
                encoder_num_layers=2,
            ),
        ),
    ],
    ids=["gpt2-prompt", "bert-mlp", "bart-lstm"],
)
def test_training_lowers_the_loss_and_changes_only_the_adapter(tiny, arch, config):
    pair = tiny(arch)
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    inputs = pair.inputs()
    batch = dict(inputs)
    if arch == "bert":
        batch["labels"] = np.array([0, 2], np.int32)
    if arch == "bart":
        batch = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "labels": inputs["decoder_input_ids"],
        }
    trainer = jpeft.train.make_train_step(peft_model, optax.adam(1e-1))
    state, frozen = trainer.init(jax.random.key(0)), trainer.frozen()
    before = peft_model.params
    for _ in range(8):
        state, metrics = trainer.step(state, frozen, batch)
        assert np.isfinite(float(metrics["loss"]))
    after = trainer.params(state)
    loss_before, loss_after = _eval_loss(peft_model, before, batch), _eval_loss(peft_model, after, batch)
    # the tiny random BART's decoder barely reads its encoder (gradients ~1e-4), so its drop is small
    assert loss_after < loss_before - (1e-3 if arch == "bart" else 0.05), (loss_before, loss_after)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), after["base"], before["base"]))
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), after["adapters"], before["adapters"])
    assert all(jax.tree.leaves(changed["default"]["prompt"]))
    if arch == "bert":
        assert all(jax.tree.leaves(changed["default"]["modules_to_save"]))


def test_training_with_loss_batch_in_the_loss(tiny):
    """The same, wiring ``loss_batch`` into a custom loss (works whether or not the step calls it)."""
    peft_model = _gpt2_model(tiny)
    batch = {**tiny("gpt2").inputs(), "labels": tiny("gpt2").inputs()["input_ids"]}

    def loss_fn(outputs, batch):
        batch = peft_model.loss_batch(batch) if batch["labels"].shape[1] == 7 else batch
        return losses.causal_lm_loss(outputs.logits, batch["labels"], batch["attention_mask"])

    trainer = jpeft.train.make_train_step(peft_model, optax.adam(1e-1), loss_fn=loss_fn)
    state, frozen = trainer.init(jax.random.key(0)), trainer.frozen()
    before = peft_model.params
    for _ in range(8):
        state, _ = trainer.step(state, frozen, batch)
    loss_before, loss_after = (
        _eval_loss(peft_model, before, batch),
        _eval_loss(peft_model, trainer.params(state), batch),
    )
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
