"""Prefix tuning against torch PEFT on the tiny models: both checkpoint directions, gradients, generate.

Every model's torch twin runs PEFT's own prefix tuning (``past_key_values``); jpeft injects the
same prefixes through the Flax key/value cache (GPT-2, Llama, BART) or the key/value
projections (BERT). Logits, gradients and greedy tokens are compared with the torch side.
"""

from __future__ import annotations

import json
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.bindings import bind
from jpeft.bindings import prefix as prefix_binding
from jpeft.prompt_learning import PromptLearningPeftModel
from jpeft.tuners import prefix_tuning
from jpeft.tuners.prefix_tuning import PrefixTuningConfig
from tests.parity import (
    assert_close,
    perturb_jpeft_adapter,
    perturb_torch_trainable,
    torch_inputs,
    torch_logits,
    torch_peft_load,
)

TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS", "bart": "SEQ_2_SEQ_LM"}
CASES = [(arch, projection) for arch in TASKS for projection in (False, True)]
NVT = 3


def _config(arch: str, projection: bool, **kwargs) -> PrefixTuningConfig:
    return PrefixTuningConfig(
        task_type=TASKS[arch], num_virtual_tokens=NVT, prefix_projection=projection, **kwargs
    )


def _torch_prefix_model(pair, projection: bool, seed: int = 1, **kwargs):
    """Torch PEFT prefix tuning on the tiny model, every trainable tensor perturbed (non-trivial prefixes)."""
    import peft
    import torch

    torch.manual_seed(seed)
    config = peft.PrefixTuningConfig(
        task_type=TASKS[pair.arch], num_virtual_tokens=NVT, prefix_projection=projection, **kwargs
    )
    model = peft.get_peft_model(pair.torch_model(), config)
    perturb_torch_trainable(model, seed, scale=0.5)
    return model.eval()


def _saved(folder) -> tuple[dict, dict[str, tuple[int, ...]]]:
    from safetensors.numpy import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return config, {key: tuple(value.shape) for key, value in tensors.items()}


@pytest.mark.parametrize("arch,projection", CASES)
def test_torch_checkpoint_loads_with_equal_logits(tiny, tmp_path, arch, projection):
    pair = tiny(arch)
    torch_model = _torch_prefix_model(pair, projection)
    torch_model.save_pretrained(tmp_path)
    want = torch_logits(torch_model, pair.inputs())

    model = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    assert isinstance(model, PromptLearningPeftModel)
    assert set(model.adapters["default"]["prompt"]) == {"embedding"}  # the saved rows only, as PEFT
    got = np.asarray(model(**pair.inputs()).logits)
    assert got.shape == want.shape  # prefix tuning: real positions only
    assert_close(got, want, f"{arch} projection={projection} torch->jpeft logits")


@pytest.mark.parametrize("arch,projection", CASES)
def test_jpeft_checkpoint_matches_torch_save_and_loads_in_torch(tiny, tmp_path, arch, projection):
    pair = tiny(arch)
    model = jpeft.get_peft_model(pair.flax_model, _config(arch, projection), key=jax.random.key(3))
    perturb_jpeft_adapter(model, scale=0.5)
    model.save_pretrained(tmp_path / "jpeft")
    got = np.asarray(model(**pair.inputs()).logits)

    reference = _torch_prefix_model(pair, projection)
    reference.save_pretrained(tmp_path / "torch")
    jpeft_config, jpeft_shapes = _saved(tmp_path / "jpeft")
    torch_config, torch_shapes = _saved(tmp_path / "torch")
    assert jpeft_shapes == torch_shapes
    # base_model_name_or_path is the torch folder on one side and the Flax model's name on the other
    for config in (jpeft_config, torch_config):
        config.pop("base_model_name_or_path")
    assert jpeft_config == torch_config
    assert model.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()

    loaded = torch_peft_load(pair, tmp_path / "jpeft")
    assert_close(
        got, torch_logits(loaded, pair.inputs()), f"{arch} projection={projection} jpeft->torch logits"
    )


def _copy_torch_encoder(model, torch_model) -> None:
    """Gives ``model``'s adapter the torch prefix encoder's (and classifier copy's) weights."""
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    encoder = "prompt_encoder.default."
    prompt = {"embedding": state[encoder + "embedding.weight"]}
    if encoder + "transform.0.weight" in state:
        prompt["transform"] = {
            i: {
                "kernel": state[f"{encoder}transform.{i}.weight"].T,
                "bias": state[f"{encoder}transform.{i}.bias"],
            }
            for i in ("0", "2")
        }
    params = model.params
    adapter = dict(params["adapters"]["default"])
    adapter["prompt"] = jax.tree.map(jnp.asarray, prompt)
    if adapter["modules_to_save"]:
        copy = "base_model.classifier.modules_to_save.default."
        adapter["modules_to_save"] = {
            "classifier": {
                "kernel": jnp.asarray(state[copy + "weight"].T),
                "bias": jnp.asarray(state[copy + "bias"]),
            }
        }
    params["adapters"]["default"] = adapter
    model.params = params


def _torch_loss(torch_model, inputs):
    return (torch_model(**torch_inputs(inputs)).logits ** 2).mean()


@pytest.mark.parametrize("arch", list(TASKS))
def test_gradients_reach_only_the_prefix_and_equal_torch(tiny, arch):
    """jax.grad through the jitted forward: only adapter leaves train, and their gradients equal torch's."""
    pair = tiny(arch)
    torch_model = _torch_prefix_model(pair, projection=True)
    model = jpeft.get_peft_model(pair.flax_model, _config(arch, True))
    _copy_torch_encoder(model, torch_model)
    inputs = pair.inputs()

    trainable, frozen = model.split_params()
    assert all(leaf is None for leaf in jax.tree.leaves(trainable["base"], is_leaf=lambda x: x is None))

    def loss(trainable, frozen):
        return (model.apply(trainable, frozen=frozen, **inputs).logits ** 2).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable, frozen)
    adapter_grads = grads["adapters"]["default"]
    assert jax.tree.leaves(grads["base"]) == []  # the frozen base gets no gradient
    for path, leaf in jax.tree_util.tree_leaves_with_path(adapter_grads):
        assert float(jnp.abs(leaf).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"

    torch_loss = _torch_loss(torch_model, inputs)
    torch_loss.backward()
    assert_close(value, torch_loss.item(), f"{arch} loss")
    named = dict(torch_model.named_parameters())
    encoder = "prompt_encoder.default."
    prompt = adapter_grads["prompt"]
    assert_close(prompt["embedding"], named[encoder + "embedding.weight"].grad, f"{arch} embedding grad")
    for i in ("0", "2"):
        torch_kernel = named[f"{encoder}transform.{i}.weight"].grad.numpy().T
        assert_close(prompt["transform"][i]["kernel"], torch_kernel, f"{arch} transform.{i} grad")
        assert_close(
            prompt["transform"][i]["bias"], named[f"{encoder}transform.{i}.bias"].grad, f"{arch} bias grad"
        )
    if arch == "bert":
        copy = named["base_model.classifier.modules_to_save.default.weight"].grad.numpy().T
        assert_close(adapter_grads["modules_to_save"]["classifier"]["kernel"], copy, "bert classifier grad")


def _left_padded(pair):
    inputs = pair.inputs(length=5)
    inputs["attention_mask"][0, :2] = 0  # row 0 left-padded, as batched generation pads
    return inputs


def _saved_generator(pair, folder):
    """A torch PEFT prefix adapter, saved; prefixes scaled down so the base model still shapes the tokens."""
    import torch

    torch_model = _torch_prefix_model(pair, projection=False)
    with torch.no_grad():
        torch_model.prompt_encoder["default"].embedding.weight.mul_(0.1)
    torch_model.save_pretrained(folder)
    return torch_model


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_generate_equals_torch(tiny, tmp_path, arch):
    import torch

    pair = tiny(arch)
    torch_model = _saved_generator(pair, tmp_path)
    inputs = _left_padded(pair)
    with torch.no_grad():
        want = torch_model.generate(**torch_inputs(inputs), max_new_tokens=6, do_sample=False, pad_token_id=0)

    model = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    got = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(got.sequences), want.numpy())
    plain = pair.flax_model.generate(
        inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6
    )
    assert not np.array_equal(np.asarray(got.sequences), np.asarray(plain.sequences))  # the prefixes matter


@pytest.mark.slow
def test_beam_search_equals_torch(tiny, tmp_path):
    """GPT-2 (its EOS id is outside the tiny vocabulary): Flax and torch beam search treat EOS differently."""
    import torch

    pair = tiny("gpt2")
    torch_model = _saved_generator(pair, tmp_path)
    inputs = _left_padded(pair)
    with torch.no_grad():
        want = torch_model.generate(
            **torch_inputs(inputs), max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0
        )
    model = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    got = model.generate(
        inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4, num_beams=2
    )
    np.testing.assert_array_equal(np.asarray(got.sequences), want.numpy())


@pytest.mark.slow
def test_bart_greedy_generate_follows_torch_forward(tiny, tmp_path):
    """jpeft's BART generate equals greedy decoding with torch PEFT's forward (prefix positions ``nvt..``).

    Not compared with torch PEFT's own ``generate``: PeftModelForSeq2SeqLM (peft 0.21.2 with transformers
    4.57.6) leaves ``cache_position`` at 0 after prefilling the prefix, so the decoder's first steps mask most
    of the prefix and its generate disagrees with its own forward (PeftModelForCausalLM adds ``nvt``).
    """
    import torch

    pair = tiny("bart")
    torch_model = _saved_generator(pair, tmp_path)
    inputs = pair.inputs()
    inputs.pop("decoder_input_ids")
    eos, length = pair.flax_model.config.eos_token_id, 7
    decoder = torch.full((2, 1), pair.flax_model.config.decoder_start_token_id)
    with torch.no_grad():
        while decoder.shape[1] < length:
            logits = torch_model(**torch_inputs(inputs), decoder_input_ids=decoder).logits[:, -1]
            if decoder.shape[1] < length - 1:
                logits[:, eos] = -float("inf")  # min_length, as Flax's min-length processor applies it
            decoder = torch.cat([decoder, logits.argmax(-1, keepdim=True)], dim=1)

    model = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    kwargs = {"attention_mask": inputs["attention_mask"], "max_length": length, "min_length": length}
    got = np.asarray(model.generate(inputs["input_ids"], **kwargs).sequences)
    np.testing.assert_array_equal(got, decoder.numpy())
    plain = np.asarray(pair.flax_model.generate(inputs["input_ids"], **kwargs).sequences)
    assert not np.array_equal(got, plain)  # the prefixes matter


@pytest.mark.parametrize("projection", [False, True])
def test_zero_init_zeros_what_peft_zeros(tiny, projection):
    import peft

    pair = tiny("gpt2")
    torch_model = peft.get_peft_model(
        pair.torch_model(), _torch_config("gpt2", projection, init_weights="zero")
    )
    torch_zero = {
        name.removeprefix("prompt_encoder.default."): bool((param == 0).all())
        for name, param in torch_model.named_parameters()
        if name.startswith("prompt_encoder.")
    }
    torch_shapes = {
        name.removeprefix("prompt_encoder.default."): tuple(param.shape)
        for name, param in torch_model.named_parameters()
        if name.startswith("prompt_encoder.")
    }
    model = jpeft.get_peft_model(pair.flax_model, _config("gpt2", projection, init_weights="zero"))
    prompt = model.adapters["default"]["prompt"]
    jpeft_leaves = {"embedding.weight": prompt["embedding"]}
    for i, layer in prompt.get("transform", {}).items():
        jpeft_leaves[f"transform.{i}.weight"] = layer["kernel"].T
        jpeft_leaves[f"transform.{i}.bias"] = layer["bias"]
    assert {k: tuple(v.shape) for k, v in jpeft_leaves.items()} == torch_shapes
    assert {k: bool((v == 0).all()) for k, v in jpeft_leaves.items()} == torch_zero
    assert sum(torch_zero.values()) == (2 if projection else 1)
    rows = prefix_tuning.prompt_embeddings(model.plan("default"), model.adapters["default"])
    assert float(jnp.abs(rows).max()) == 0.0


def _torch_config(arch: str, projection: bool, **kwargs):
    import peft

    return peft.PrefixTuningConfig(
        task_type=TASKS[arch], num_virtual_tokens=NVT, prefix_projection=projection, **kwargs
    )


def test_random_init_follows_torch_distributions(tiny):
    """N(0, 1) embedding; torch-default Linear bounds 1/sqrt(fan_in) for kernels and biases."""
    pair = tiny("gpt2")
    model = jpeft.get_peft_model(pair.flax_model, _config("gpt2", True, encoder_hidden_size=24))
    prompt = model.adapters["default"]["prompt"]
    assert prompt["transform"]["0"]["kernel"].shape == (32, 24)
    assert prompt["transform"]["2"]["kernel"].shape == (24, 2 * 2 * 32)
    for i, fan_in in (("0", 32), ("2", 24)):
        for leaf in prompt["transform"][i].values():
            bound = float(jnp.abs(leaf).max())
            assert 0.5 / np.sqrt(fan_in) < bound <= 1.0 / np.sqrt(fan_in)
    assert 0.5 < float(jnp.std(prompt["embedding"])) < 1.5


def test_functions_drive_the_model_directly(tiny):
    """The protocol functions alone (no PeftModel) give the same logits as the model class, eager and jitted."""
    pair = tiny("llama")
    binding = bind(pair.flax_model)
    plan = prefix_tuning.prepare(_config("llama", False), binding)
    assert (plan.config.token_dim, plan.config.num_attention_heads) == (16, 2)  # GQA: key/value heads
    adapter, new_base = prefix_tuning.init_params(plan, binding.params, jax.random.key(0))
    assert new_base is None and adapter["prompt"]["embedding"].shape == (NVT, 2 * 2 * 16)
    inputs = pair.inputs()

    def forward(adapter):
        prompts = prefix_tuning.prompt_embeddings(plan, adapter, train=False, key=None)
        return prefix_tuning.run(
            plan, binding, binding.params, adapter, prompts, (), inputs, train=False, dropout_rng=None
        ).logits

    eager = np.asarray(forward(adapter))
    assert_close(jax.jit(forward)(adapter), eager, "jit vs eager")
    model = jpeft.get_peft_model(pair.flax_model, _config("llama", False), key=jax.random.key(0))
    assert_close(model(**inputs).logits, eager, "model class vs functions")
    assert not np.allclose(eager, np.asarray(pair.flax_model(**inputs).logits), atol=1e-3)
    assert prefix_tuning.loss_batch(plan, inputs) is inputs


def test_position_ids_are_shifted_by_the_prefix_length(tiny):
    """Explicit position ids get ``+ num_virtual_tokens``, as PEFT's ``_adjust_prompt_learning_kwargs``."""
    import torch

    pair = tiny("gpt2")
    torch_model = _torch_prefix_model(pair, projection=False)
    model = jpeft.get_peft_model(pair.flax_model, _config("gpt2", False))
    _copy_torch_encoder(model, torch_model)
    inputs = pair.inputs()
    positions = np.broadcast_to(np.arange(2, 2 + inputs["input_ids"].shape[1]), inputs["input_ids"].shape)
    with torch.no_grad():
        want = torch_model(**torch_inputs(inputs), position_ids=torch.tensor(positions)).logits.numpy()
    got = model(**inputs, position_ids=positions).logits
    assert_close(got, want, "gpt2 explicit position ids")


@pytest.mark.slow
def test_train_step_lowers_the_loss(tiny):
    import optax

    pair = tiny("gpt2")
    model = jpeft.get_peft_model(pair.flax_model, _config("gpt2", True))
    batch = {k: jnp.asarray(v) for k, v in pair.inputs().items()}
    trainer = jpeft.train.make_train_step(model, optax.adam(1e-2))
    state, frozen = trainer.init(jax.random.key(0)), trainer.frozen()
    losses = []
    for _ in range(5):
        state, metrics = trainer.step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    trained = trainer.params(state)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, trained["base"], model.params["base"]))


def _gradients(model, inputs):
    trainable, frozen = model.split_params()
    return jax.grad(lambda t: (model.apply(t, frozen=frozen, **inputs).logits ** 2).mean())(trainable)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch",
    [
        "gpt2",
        "llama",
        "bert",
        "bart",
    ],
)
def test_gradient_checkpointing_keeps_the_gradients(tiny, arch):
    pair = tiny(arch)
    model = jpeft.get_peft_model(pair.flax_model, _config(arch, True))
    inputs = pair.inputs()
    want = _gradients(model, inputs)
    model.enable_gradient_checkpointing()  # this PeftModel's binding only
    got = _gradients(model, inputs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(a, b, f"{arch} gradients with checkpointing")


def test_layer_groups_follow_peft_seq2seq_quirk():
    assert prefix_binding.layer_groups(3, 1, 3) == ((0, 1), (2, 3), (4, 5))
    # seq2seq: PEFT concatenates the 2L groups with themselves and splits in fours
    assert prefix_binding.layer_groups(3, 2, 3) == ((0, 1), (4, 5), (2, 3))
    assert prefix_binding.layer_groups(2, 2, 2) == ((0, 1), (0, 1))


def _fake_binding(model_type: str, class_name: str, config) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        config=config, model_type=model_type, class_name=class_name, modules={}, model=object(), params={}
    )


def test_unsupported_models_name_the_class_and_what_is_missing(tiny):
    import transformers

    neo = transformers.GPTNeoConfig(
        hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]]
    )
    binding = _fake_binding("gpt_neo", "FlaxGPTNeoForCausalLM", neo)
    with pytest.raises(jpeft.ConfigError, match="FlaxGPTNeoForCausalLM.*no prefix injection"):
        prefix_tuning.prepare(_config("gpt2", False), binding)

    pair = tiny("gpt2")
    with pytest.raises(jpeft.ConfigError, match="FlaxGPT2LMHeadModel supports task_type CAUSAL_LM"):
        prefix_tuning.prepare(
            PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2), bind(pair.flax_model)
        )
    with pytest.raises(jpeft.ConfigError, match="num_layers=3.*2 layers"):
        prefix_tuning.prepare(_config("gpt2", False, num_layers=3), bind(pair.flax_model))

    import flax.linen as nn

    dense = nn.Dense(4)
    linen = jpeft.LinenBinding(dense, dense.init(jax.random.key(0), jnp.ones((1, 4)))["params"])
    with pytest.raises(jpeft.ConfigError, match="Dense.*transformers Flax model"):
        prefix_tuning.prepare(_config("gpt2", False), linen)


def test_config_round_trip_and_checks():
    config = _config("gpt2", True, encoder_hidden_size=8, init_weights="zero")
    parsed = jpeft.config_from_dict(json.loads(config.to_json_string()))
    assert isinstance(parsed, PrefixTuningConfig) and parsed.to_dict() == config.to_dict()
    with pytest.raises(jpeft.ConfigError, match="init_weights"):
        _config("gpt2", False, init_weights="ones")
    with pytest.raises(jpeft.ConfigError, match="num_virtual_tokens"):
        PrefixTuningConfig(task_type="CAUSAL_LM")


def test_loaded_adapter_refuses_training(tiny, tmp_path):
    pair = tiny("gpt2")
    _torch_prefix_model(pair, projection=True).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
            jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path, is_trainable=True)
