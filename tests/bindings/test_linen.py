"""``LinenBinding`` and ``bind``: plain linen modules, and a user's own binding.

What ``tests/test_peft_model.py`` already runs on linen (the stock-layer module table, the
full LoRA cycle on a ``(module, params)`` pair, ``LinenBinding`` with ``example_args`` on
stock layers) is not repeated here. This file covers what the binding decides itself:

- custom layer classes, read by an abstract trace with ``example_args`` and guessed from
  2-D ``kernel``/``embedding`` shapes without;
- ``generate`` refused with a ``TypeError``; ``with_params`` leaves the binding untouched;
  non-param collections (``batch_stats``) pass through;
- ``bind``: ``(module, params)`` pairs, unsupported inputs refused naming the accepted ones,
  and a user-defined object implementing :class:`jpeft.bindings.Binding` accepted by
  ``bind`` and by ``jpeft.get_peft_model``.
"""

from __future__ import annotations

import re
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

import jpeft
from jpeft.bindings import Binding, bind
from jpeft.bindings.linen import LinenBinding
from tests import parity


class MyDense(nn.Dense):
    """A user's ``nn.Dense`` subclass: still a linear layer."""


class TransposedLinear(nn.Module):
    """A custom layer with a 2-D ``kernel`` stored ``(out, in)``: not a ``Dense``."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.features, x.shape[-1]))
        return x @ kernel.T


class CustomLM(nn.Module):
    vocab: int = 40

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, 16, name="embed")(ids)
        h = nn.gelu(MyDense(24, name="up")(h))
        h = TransposedLinear(16, name="mix")(h)
        return nn.Dense(self.vocab, name="head")(h)


@pytest.fixture(scope="module")
def custom_lm():
    module = CustomLM()
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, module.vocab)
    params = module.init(jax.random.key(1), ids)["params"]
    return module, params, ids


def _same_arrays(tree, other) -> bool:
    """The same structure holding the very same arrays (the binding keeps the user's, uncopied)."""
    return jax.tree.structure(tree) == jax.tree.structure(other) and all(
        a is b for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other), strict=True)
    )


def _kinds(binding) -> dict[str, tuple]:
    return {
        name: (info.kind, info.type_name, info.in_features, info.out_features)
        for name, info in binding.modules.items()
    }


# --------------------------------------------------------------------------- module table


def test_without_example_args_kernels_are_guessed_dense(custom_lm):
    module, params, ids = custom_lm
    binding = LinenBinding(module, params)
    assert _kinds(binding) == {
        "embed": ("embedding", "Embed", 40, 16),
        "up": ("linear", "Dense", 16, 24),
        "mix": ("linear", "Dense", 16, 24),  # the guess reads (16, 24) as Dense (in, out): wrong here
        "head": ("linear", "Dense", 16, 40),
    }
    # which is why targeting it fails at the forward, not at construction
    model = jpeft.get_peft_model(binding, jpeft.LoraConfig(r=2, target_modules=["mix"]))
    with pytest.raises(TypeError):
        model(ids)


def test_example_args_read_custom_layer_classes(custom_lm):
    module, params, ids = custom_lm
    binding = LinenBinding(module, params, example_args=(ids,))
    assert _kinds(binding) == {
        "embed": ("embedding", "Embed", 40, 16),
        "up": ("linear", "MyDense", 16, 24),  # a Dense subclass stays linear
        "mix": ("other", "TransposedLinear", None, None),
        "head": ("linear", "Dense", 16, 40),
    }
    assert binding.modules["up"].torch_type == "Linear"
    assert binding.modules["up"].kernel_transposed is False
    with pytest.raises(jpeft.NoMatchingModuleError, match="'mix', a TransposedLinear module"):
        jpeft.get_peft_model(binding, jpeft.LoraConfig(r=2, target_modules=["mix"]))
    # the subclass is adapted like a Dense
    model = jpeft.get_peft_model(binding, jpeft.LoraConfig(r=2, target_modules=["up"]))
    parity.perturb_jpeft_adapter(model)
    merged_module, merged = model.merge_and_unload()
    np.testing.assert_allclose(
        np.asarray(merged_module.apply({"params": merged}, ids)), np.asarray(model(ids)), atol=1e-5, rtol=0
    )


# --------------------------------------------------------------------------- protocol members


def test_generate_raises_type_error(custom_lm):
    module, params, ids = custom_lm
    model = jpeft.get_peft_model((module, params), jpeft.LoraConfig(r=2, target_modules=["up"]))
    with pytest.raises(
        TypeError, match=r"CustomLM has no `generate`: generation needs a transformers Flax model"
    ):
        model.generate(ids)


def test_with_params_leaves_the_binding_untouched(custom_lm):
    module, params, _ = custom_lm
    binding = LinenBinding(module, params)
    before = jax.device_get(params)
    doubled = jax.tree.map(lambda x: 2 * x, params)
    new_module, new_params = binding.with_params(doubled)
    assert new_module is module and new_params is doubled
    assert _same_arrays(binding.params, params)
    assert binding.model[0] is module and _same_arrays(binding.model[1], params)
    for got, want in zip(jax.tree.leaves(binding.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


class NormedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=True, name="norm")(nn.Dense(8, name="fc")(x))


def test_other_collections_pass_through():
    module = NormedMLP()
    x = jax.random.normal(jax.random.key(0), (3, 4))
    variables = module.init(jax.random.key(1), x)
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda s: s + 0.5, variables["batch_stats"]),  # so they matter
    }
    binding = bind((module, variables))
    assert set(binding.params) == {"fc", "norm"}
    assert set(binding.other_variables) == {"batch_stats"}
    model = jpeft.get_peft_model(binding, jpeft.LoraConfig(r=2, target_modules=["fc"]))
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(module.apply(variables, x)))


# --------------------------------------------------------------------------- bind


def test_bind_linen_pair(custom_lm):
    module, params, _ = custom_lm
    for given in (params, {"params": params}):  # the params, or init's whole variables dict
        binding = bind((module, given))
        assert type(binding) is LinenBinding and isinstance(binding, Binding)
        assert _same_arrays(binding.params, params)
        assert binding.model[0] is module and _same_arrays(binding.model[1], params)
        assert bind(binding) is binding
    assert (binding.config, binding.model_type, binding.name_or_path) == (None, None, None)
    assert (binding.torch_class_name, binding.torch_module_path) == (None, None)
    assert binding.class_name == "CustomLM"
    assert binding.head_output_is_logits is False
    assert (
        binding.output_embedding_names == binding.tied_embedding_names == binding.buffer_paths == frozenset()
    )


def _unsupported(custom_lm):
    module, params, _ = custom_lm
    return {
        "object": object(),
        "module without params": module,
        "params without module": params,
        "reversed pair": (params, module),
        "list": [module, params],
        "1-tuple": (module,),
    }


@pytest.mark.parametrize(
    "what", ["object", "module without params", "params without module", "reversed pair", "list", "1-tuple"]
)
def test_bind_refuses_unsupported_input(custom_lm, what):
    given = _unsupported(custom_lm)[what]
    message = (
        rf"jpeft cannot adapt a {type(given).__name__}: pass a Flax NNX module .*a transformers Flax model .*"
        r"a `\(linen_module, params\)` pair, or `.*LinenBinding\(module, params, example_args=\.\.\.\)`"
    )
    with pytest.raises(TypeError, match=message):
        bind(given)
    with pytest.raises(TypeError, match=message):
        jpeft.get_peft_model(given, jpeft.LoraConfig(r=2, target_modules=["up"]))


def _resolve(dotted: str):
    target = __import__(dotted.split(".")[0])
    for part in dotted.split(".")[1:]:
        target = getattr(target, part)
    return target


def test_bind_refusal_names_an_existing_class():
    with pytest.raises(TypeError) as caught:
        bind(object())
    named = re.findall(r"`(jpeft(?:\.\w+)+)\(", str(caught.value))
    assert named
    for dotted in named:
        assert _resolve(dotted) is LinenBinding, dotted


# --------------------------------------------------------------------------- a user's own binding


class DelegatingBinding:
    """A user's own binding: every member of the protocol, forwarded to a ``LinenBinding``."""

    def __init__(self, inner: LinenBinding):
        self.inner = inner
        self.runs = 0
        self.model = inner.model
        self.params = inner.params
        self.modules = inner.modules
        self.config = None
        self.model_type = None
        self.class_name = "DelegatingBinding"
        self.name_or_path = None
        self.torch_class_name = None
        self.torch_module_path = None
        self.output_embedding_names = frozenset()
        self.tied_embedding_names = frozenset()
        self.buffer_paths = frozenset()
        self.head_output_is_logits = False

    def run(self, params, hook, names, args, kwargs, *, train, dropout_rng):
        self.runs += 1
        return self.inner.run(params, hook, names, args, kwargs, train=train, dropout_rng=dropout_rng)

    def generate(self, params, hook, names, args, kwargs):
        return self.inner.generate(params, hook, names, args, kwargs)

    def enable_gradient_checkpointing(self) -> None:
        self.inner.enable_gradient_checkpointing()

    def with_params(self, params):
        return self.inner.with_params(params)


def test_user_binding_is_accepted(custom_lm, tmp_path):
    module, params, ids = custom_lm
    user = DelegatingBinding(LinenBinding(module, params, example_args=(ids,)))
    assert isinstance(user, Binding)
    assert bind(user) is user

    config = jpeft.LoraConfig(r=2, target_modules=["up", "head"])
    model = jpeft.get_peft_model(user, config)
    assert model.binding is user and model.base_model[0] is module
    assert sorted(model.targeted_modules()) == ["head", "up"]
    base_out = np.asarray(module.apply({"params": params}, ids))
    np.testing.assert_array_equal(np.asarray(model(ids)), base_out)  # fresh LoRA: a no-op
    parity.perturb_jpeft_adapter(model)
    adapted = np.asarray(model(ids))
    assert user.runs == 2
    assert parity.max_diff(adapted, base_out) > 1e-3
    model.enable_gradient_checkpointing()
    assert user.inner.remat is True
    with pytest.raises(TypeError, match="has no `generate`"):
        model.generate(ids)

    model.save_pretrained(tmp_path)
    reloaded = jpeft.PeftModel.from_pretrained(DelegatingBinding(LinenBinding(module, params)), tmp_path)
    np.testing.assert_array_equal(np.asarray(reloaded(ids)), adapted)
    merged_module, merged = model.merge_and_unload()  # through the user's with_params
    assert merged_module is module
    np.testing.assert_allclose(np.asarray(module.apply({"params": merged}, ids)), adapted, atol=1e-5, rtol=0)


def test_object_missing_protocol_members_is_refused(custom_lm):
    module, params, _ = custom_lm
    user = DelegatingBinding(LinenBinding(module, params))
    members = {name: getattr(user, name) for name in vars(user) if name not in ("inner", "runs")}
    partial = types.SimpleNamespace(**members, generate=user.generate, with_params=user.with_params)
    assert not isinstance(partial, Binding)  # no `run`, no `enable_gradient_checkpointing`
    with pytest.raises(TypeError, match="jpeft cannot adapt a SimpleNamespace"):
        bind(partial)
