"""PeftModel's API against torch PEFT on the same tiny models.

Parameter counts, multi-adapter semantics, multi-adapter folders read by torch PEFT,
merge/unload, ``named_modules`` against torch's ``named_modules()``, and a plain
``flax.linen`` model through the whole cycle.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import jpeft
from tests import parity

# --------------------------------------------------------------------------- helpers


def captured(fn) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


def torch_peft_model(pair, **lora_kwargs):
    import peft
    import torch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(pair.torch_model(), peft.LoraConfig(**lora_kwargs))


def jpeft_model(pair, **lora_kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out correction on GPT-2
        return jpeft.get_peft_model(pair.flax_model, jpeft.LoraConfig(**lora_kwargs))


def host_copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} changed"


def logits(model, inputs) -> np.ndarray:
    return np.asarray(model(**inputs).logits)


# --------------------------------------------------------------------------- print_trainable_parameters

GPT2 = ["c_attn", "c_proj"]
COUNT_CASES = {
    "gpt2-r4": ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2)),
    "gpt2-bias-lora_only": ("gpt2", dict(r=4, target_modules=GPT2, bias="lora_only")),
    "gpt2-bias-all": ("gpt2", dict(r=4, target_modules=GPT2, bias="all")),
    "gpt2-lora_bias": ("gpt2", dict(r=4, target_modules=GPT2, lora_bias=True)),
    "gpt2-dora": ("gpt2", dict(r=4, target_modules=GPT2, use_dora=True)),
    "gpt2-modules_to_save": ("gpt2", dict(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"])),
    "llama-modules_to_save-lm_head": (
        "llama",
        dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    ),
    "llama-dora": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "llama-embedding": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "llama-rank_pattern": (
        "llama",
        dict(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
    ),
    "bert-seq_cls": ("bert", dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "bert-seq_cls-bias-all": (
        "bert",
        dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all"),
    ),
    "bart-seq2seq": (
        "bart",
        dict(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_2_SEQ_LM"),
    ),
    "bart-bias-all": (
        "bart",
        dict(r=4, target_modules=["q_proj", "v_proj"], bias="all"),
    ),
}


@pytest.mark.parametrize(
    "arch,kwargs",
    list(COUNT_CASES.values()),
    ids=list(COUNT_CASES),
)
def test_print_trainable_parameters_matches_torch(arch, kwargs, tiny):
    pair = tiny(arch)
    torch_model = torch_peft_model(pair, **kwargs)
    mine = jpeft_model(pair, **kwargs)
    expected = captured(torch_model.print_trainable_parameters)
    assert expected.startswith("trainable params: ")
    assert captured(mine.print_trainable_parameters) == expected
    got = mine.get_nb_trainable_parameters()
    assert isinstance(got, tuple) and len(got) == 2
    assert got == tuple(torch_model.get_nb_trainable_parameters())


def test_print_trainable_parameters_two_adapters(tiny):
    pair = tiny("llama")
    torch_model = torch_peft_model(
        pair, r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
    )
    mine = jpeft_model(pair, r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    import peft

    torch_model.add_adapter(
        "other", peft.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"])
    )
    mine.add_adapter("other", jpeft.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]))
    # The second adapter is counted in "all" but is not trainable.
    assert captured(mine.print_trainable_parameters) == captured(torch_model.print_trainable_parameters)
    trainable, total = mine.get_nb_trainable_parameters()
    single = jpeft_model(pair, r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    assert trainable == single.get_nb_trainable_parameters()[0]
    assert total > single.get_nb_trainable_parameters()[1]
    # Switching makes the other one the trainable one, in both libraries.
    torch_model.set_adapter("other")
    mine.set_adapter("other")
    assert captured(mine.print_trainable_parameters) == captured(torch_model.print_trainable_parameters)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loaded_adapter_trainable_count(is_trainable, tiny, tmp_path):
    import peft

    pair = tiny("llama")
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    parity.torch_peft_save(pair, kwargs, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.PeftModel.from_pretrained(pair.torch_model(), tmp_path, is_trainable=is_trainable)
    mine = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path, is_trainable=is_trainable)
    assert captured(mine.print_trainable_parameters) == captured(torch_model.print_trainable_parameters)
    trainable, total = mine.get_nb_trainable_parameters()
    adapter_size = sum(x.size for x in jax.tree.leaves(mine.adapters["default"]))
    assert adapter_size == 2 * 2 * (4 * 32) + 2 * (4 * 32 + 4 * 16)  # q: 32->32, v: 32->16 (GQA)
    assert trainable == (adapter_size if is_trainable else 0)
    assert total == sum(x.size for x in jax.tree.leaves(pair.flax_model.params)) + adapter_size
    trainable_leaves = jax.tree.leaves(mine.split_params()[0])
    assert len(trainable_leaves) == (len(jax.tree.leaves(mine.adapters["default"])) if is_trainable else 0)


def test_set_adapter_makes_loaded_adapter_trainable(tiny, tmp_path):
    import peft

    pair = tiny("llama")
    mine = jpeft_model(pair, r=4, target_modules=["q_proj", "v_proj"])
    mine.add_adapter("other", jpeft.LoraConfig(r=2, target_modules=["k_proj"]))
    mine.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.PeftModel.from_pretrained(pair.torch_model(), tmp_path)
        torch_model.load_adapter(tmp_path / "other", "other")
    loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert loaded.get_nb_trainable_parameters() == tuple(torch_model.get_nb_trainable_parameters())
    torch_model.set_adapter("other")
    loaded.set_adapter("other")
    assert captured(loaded.print_trainable_parameters) == captured(torch_model.print_trainable_parameters)
    assert loaded.get_nb_trainable_parameters()[0] == 2 * (2 * 32 + 2 * 16)


# --------------------------------------------------------------------------- adapters


@pytest.fixture
def two_adapter_llama(tiny):
    pair = tiny("llama")
    model = jpeft_model(pair, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    parity.perturb_jpeft_adapter(model, "default", seed=1)
    model.add_adapter(
        "other",
        jpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"]),
        key=jax.random.key(3),
    )
    parity.perturb_jpeft_adapter(model, "other", seed=2)
    return pair, model


def test_add_set_delete_adapter_semantics(two_adapter_llama):
    pair, model = two_adapter_llama
    inputs = pair.inputs()
    base = logits(pair.flax_model, inputs)
    assert model.active_adapter == "default"
    assert model.active_adapters == ["default"]
    assert sorted(model.peft_config) == ["default", "other"]
    default_out = logits(model, inputs)
    assert np.abs(default_out - base).max() > 1e-3

    # Adding an adapter does not activate it: outputs are unchanged.
    model.add_adapter("third", jpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.active_adapter == "default"
    np.testing.assert_array_equal(logits(model, inputs), default_out)

    model.set_adapter("other")
    assert model.active_adapter == "other"
    other_out = logits(model, inputs)
    assert np.abs(other_out - default_out).max() > 1e-3
    assert np.abs(other_out - base).max() > 1e-3
    model.set_adapter("default")
    np.testing.assert_array_equal(logits(model, inputs), default_out)

    with pytest.raises(TypeError):
        model.set_adapter([])
    with pytest.raises(ValueError, match=r"'nope' not found; existing adapters: \['default', 'other', 'third'\]"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", jpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        model.delete_adapter("nope")

    # Deleting an inactive adapter keeps the active one; deleting the active one falls
    # back to the alphabetically first remaining adapter, with a warning (as PEFT).
    model.delete_adapter("third")
    assert sorted(model.peft_config) == ["default", "other"] and model.active_adapter == "default"
    with pytest.warns(UserWarning, match="active adapter is now"):
        model.delete_adapter("default")
    assert model.active_adapter == "other"
    assert sorted(model.adapters) == ["other"]
    np.testing.assert_array_equal(logits(model, inputs), other_out)


def test_disable_adapter_and_empty_active_give_base_logits(two_adapter_llama):
    pair, model = two_adapter_llama
    inputs = pair.inputs()
    base = logits(pair.flax_model, inputs)
    adapted = logits(model, inputs)
    assert np.abs(adapted - base).max() > 1e-3
    with model.disable_adapter():
        np.testing.assert_array_equal(logits(model, inputs), base)
    np.testing.assert_array_equal(logits(model, inputs), adapted)
    np.testing.assert_array_equal(
        np.asarray(model.apply(model.params, **inputs, active_adapters=[]).logits), base
    )
    other = np.asarray(model.apply(model.params, **inputs, active_adapters=["other"]).logits)
    model.set_adapter("other")
    np.testing.assert_array_equal(logits(model, inputs), other)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.apply(model.params, **inputs, active_adapters=["nope"])


def test_multi_adapter_folder_loads_in_torch_and_jpeft(two_adapter_llama, tmp_path):
    pair, model = two_adapter_llama
    inputs = pair.inputs()
    default_out = logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "default").exists()

    model.set_adapter("other")
    other_out = logits(model, inputs)

    torch_default = parity.torch_peft_load(pair, tmp_path)
    np.testing.assert_allclose(
        parity.torch_logits(torch_default, inputs), default_out, atol=parity.ATOL, rtol=0
    )
    torch_other = parity.torch_peft_load(pair, tmp_path, subfolder="other")
    np.testing.assert_allclose(parity.torch_logits(torch_other, inputs), other_out, atol=parity.ATOL, rtol=0)

    # jpeft: the subfolder by path, or by subfolder=.
    by_path = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    np.testing.assert_array_equal(logits(by_path, inputs), default_out)
    by_path.load_adapter(tmp_path / "other", "other")
    assert by_path.active_adapter == "default"
    by_path.set_adapter("other")
    np.testing.assert_array_equal(logits(by_path, inputs), other_out)

    by_sub = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    by_sub.load_adapter(tmp_path, "other", subfolder="other")
    by_sub.set_adapter("other")
    np.testing.assert_array_equal(logits(by_sub, inputs), other_out)

    direct = jpeft.PeftModel.from_pretrained(
        pair.flax_model, tmp_path, adapter_name="other", subfolder="other"
    )
    assert direct.active_adapter == "other"
    np.testing.assert_array_equal(logits(direct, inputs), other_out)


# --------------------------------------------------------------------------- merge / unload


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"])),
        ("llama", dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)),
        ("bert", dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    ],
)
def test_merge_and_unload(arch, kwargs, tiny):
    pair = tiny(arch)
    inputs = pair.inputs()
    before = host_copy(pair.flax_model.params)
    base = logits(pair.flax_model, inputs)
    model = jpeft_model(pair, **kwargs)
    parity.perturb_jpeft_adapter(model)
    unmerged = logits(model, inputs)
    assert np.abs(unmerged - base).max() > 1e-3

    merged = model.merge_and_unload()
    assert type(merged) is type(pair.flax_model)
    assert merged is not pair.flax_model
    np.testing.assert_allclose(logits(merged, inputs), unmerged, atol=1e-5, rtol=0)

    unloaded = model.unload()
    assert type(unloaded) is type(pair.flax_model)
    np.testing.assert_array_equal(logits(unloaded, inputs), base)

    # Neither wrapping, training-style param updates nor merging touched the original model.
    assert_bitwise_equal(pair.flax_model.params, before)
    np.testing.assert_array_equal(logits(pair.flax_model, inputs), base)
    # The PeftModel still computes the adapted output afterwards.
    np.testing.assert_array_equal(logits(model, inputs), unmerged)


def test_merge_two_adapters_equals_both_active(two_adapter_llama):
    pair, model = two_adapter_llama
    inputs = pair.inputs()
    both = np.asarray(model.apply(model.params, **inputs, active_adapters=["default", "other"]).logits)
    default_only = logits(model, inputs)
    assert np.abs(both - default_only).max() > 1e-3
    merged = model.merge_and_unload(adapter_names=["default", "other"])
    np.testing.assert_allclose(logits(merged, inputs), both, atol=1e-5, rtol=0)
    # Without adapter_names, only the active adapter is merged.
    np.testing.assert_allclose(logits(model.merge_and_unload(), inputs), default_only, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- named_modules

# Modules torch lists that share their weight with another module (tied), so Flax has no own params for them.
TORCH_ONLY_TIED = {
    "gpt2": {"lm_head"},
    "llama": set(),
    "bert": set(),
    "bart": {"lm_head", "model.encoder.embed_tokens", "model.decoder.embed_tokens"},
}


@pytest.mark.parametrize("arch", sorted(TORCH_ONLY_TIED))
def test_named_modules_match_torch(arch, tiny):
    import torch
    from transformers.pytorch_utils import Conv1D

    pair = tiny(arch)
    mine = {
        n: m for n, m in jpeft.named_modules(pair.flax_model).items() if m.kind in ("linear", "embedding")
    }
    torch_model = pair.torch_model()
    theirs = {
        n: m
        for n, m in torch_model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D, torch.nn.Embedding))
    }
    assert set(theirs) - set(mine) == TORCH_ONLY_TIED[arch]
    assert set(mine) - set(theirs) == set()
    for name, info in mine.items():
        module = theirs[name]
        if isinstance(module, torch.nn.Embedding):
            assert (info.kind, info.torch_type) == ("embedding", "Embedding"), name
            assert (info.in_features, info.out_features) == (module.num_embeddings, module.embedding_dim), (
                name
            )
        elif isinstance(module, Conv1D):
            assert (info.kind, info.torch_type, info.kernel_transposed) == ("linear", "Conv1D", True), name
            assert (info.in_features, info.out_features) == tuple(module.weight.shape), name
        else:
            assert (info.kind, info.torch_type, info.kernel_transposed) == ("linear", "Linear", False), name
            assert (info.in_features, info.out_features) == (module.in_features, module.out_features), name
        assert info.has_bias == (getattr(module, "bias", None) is not None), name
    # The same table through the PeftModel.
    model = jpeft_model(pair, r=2, target_modules=None)
    assert {n for n, m in model.named_modules().items() if m.kind != "other"} == set(mine)


def test_gpt2_c_attn_is_conv1d(tiny):
    info = jpeft.named_modules(tiny("gpt2").flax_model)["transformer.h.0.attn.c_attn"]
    assert info.kind == "linear"
    assert info.torch_type == "Conv1D"
    assert info.kernel_transposed is True
    assert (info.in_features, info.out_features) == (32, 96)
    assert info.param_shapes["kernel"] == (96, 32)


# --------------------------------------------------------------------------- plain flax.linen model


class TinyLinenLM(nn.Module):
    vocab: int = 40
    dim: int = 16
    hidden: int = 24

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, self.dim, name="embed")(ids)
        h = nn.gelu(nn.Dense(self.hidden, name="fc1")(h))
        h = nn.Dense(self.dim, name="fc2")(h)
        return nn.Dense(self.vocab, name="head")(h)


@pytest.fixture(scope="module")
def linen_lm():
    module = TinyLinenLM()
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, module.vocab)
    params = module.init(jax.random.key(1), ids)["params"]
    return module, params, ids


def linen_loss(apply_fn, ids):
    logits = apply_fn(ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def test_linen_named_modules(linen_lm):
    module, params, ids = linen_lm
    table = jpeft.named_modules((module, params))
    kinds = {n: (m.kind, m.in_features, m.out_features) for n, m in table.items()}
    assert kinds == {
        "embed": ("embedding", 40, 16),
        "fc1": ("linear", 16, 24),
        "fc2": ("linear", 24, 16),
        "head": ("linear", 16, 40),
    }
    traced = jpeft.named_modules(jpeft.LinenBinding(module, params, example_args=(ids,)))
    assert {n: m.type_name for n, m in traced.items()} == {
        "embed": "Embed",
        "fc1": "Dense",
        "fc2": "Dense",
        "head": "Dense",
    }


def test_linen_model_full_cycle(linen_lm, tmp_path):
    module, params, ids = linen_lm
    before = host_copy(params)
    base_out = np.asarray(module.apply({"params": params}, ids))
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "embed"])
    model = jpeft.get_peft_model((module, params), config)
    assert sorted(model.targeted_modules()) == ["embed", "fc1", "fc2"]
    # Fresh LoRA is a no-op; perturbed, it changes the output.
    np.testing.assert_array_equal(np.asarray(model(ids)), base_out)
    parity.perturb_jpeft_adapter(model)
    adapted = np.asarray(model(ids))
    assert np.abs(adapted - base_out).max() > 1e-3
    with model.disable_adapter():
        np.testing.assert_array_equal(np.asarray(model(ids)), base_out)

    # merged == unmerged; merge_and_unload gives back a (module, params) pair.
    merged_module, merged_params = model.merge_and_unload()
    assert merged_module is module
    np.testing.assert_allclose(
        np.asarray(module.apply({"params": merged_params}, ids)), adapted, atol=1e-5, rtol=0
    )
    unloaded_module, unloaded_params = model.unload()
    np.testing.assert_array_equal(
        np.asarray(unloaded_module.apply({"params": unloaded_params}, ids)), base_out
    )

    # A jitted training step over the trainable part lowers the loss.
    trainable, frozen = model.split_params()
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(trainable)

    def loss(trainable, frozen):
        return linen_loss(lambda x: model.apply(trainable, x, frozen=frozen, train=True), ids)

    @jax.jit
    def step(trainable, opt_state, frozen):
        value, grads = jax.value_and_grad(loss)(trainable, frozen)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    losses = []
    for _ in range(10):
        trainable, opt_state, value = step(trainable, opt_state, frozen)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.05, losses
    model.params = jpeft.combine(trainable, frozen)
    trained = np.asarray(model(ids))
    assert_bitwise_equal(model.base_params, before)
    assert_bitwise_equal(params, before)

    # Save / load inside jpeft is bit-exact.
    model.save_pretrained(tmp_path)
    loaded = jpeft.PeftModel.from_pretrained((module, params), tmp_path)
    assert_bitwise_equal(loaded.adapters["default"], model.adapters["default"])
    np.testing.assert_array_equal(np.asarray(loaded(ids)), trained)
    from safetensors.numpy import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.fc1.lora_A.weight" in keys
    assert "base_model.model.embed.lora_embedding_A" in keys
    assert load_file(tmp_path / "adapter_model.safetensors")["base_model.model.fc1.lora_A.weight"].shape == (
        4,
        16,
    )


def test_linen_binding_with_example_args(linen_lm):
    module, params, ids = linen_lm
    binding = jpeft.LinenBinding(module, {"params": params}, example_args=(ids,))
    model = jpeft.get_peft_model(binding, jpeft.LoraConfig(r=2, target_modules=["fc1", "head"]))
    assert sorted(model.targeted_modules()) == ["fc1", "head"]
    base_out = np.asarray(module.apply({"params": params}, ids))
    np.testing.assert_array_equal(np.asarray(model(ids)), base_out)
    parity.perturb_jpeft_adapter(model)
    out = np.asarray(model(ids))
    assert np.abs(out - base_out).max() > 1e-3
    jitted = jax.jit(lambda p, x: model.apply(p, x))(model.params, ids)
    np.testing.assert_allclose(np.asarray(jitted), out, rtol=1e-5, atol=1e-6)
    _, merged = model.merge_and_unload()
    np.testing.assert_allclose(np.asarray(module.apply({"params": merged}, ids)), out, atol=1e-5, rtol=0)
    trainable, _ = model.split_params()
    assert set(trainable["adapters"]["default"]["lora"]) == {"fc1", "head"}
