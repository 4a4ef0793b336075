"""``HFFlaxBinding``: transformers' Flax models driven through the written ``Binding`` protocol.

- OPT, whose ``__call__`` takes ``deterministic=`` where the other families take ``train=``,
  runs every registered layer method (one table, ``OPT_CONFIGS``) with numeric parity to
  torch PEFT both ways: a torch PEFT adapter loads in jpeft, a jpeft adapter loads in torch
  PEFT, equal logits. Training mode switches OPT's dropout, and a train step runs.
- The binding's facts for each tiny architecture: module names (torch's, for every module
  with weights of its own), GPT-2's transposed ``Conv1D`` kernels, the torch class, the LM
  head, tied embeddings and torch buffers.
- A model whose ``__call__`` takes neither ``train`` nor ``deterministic`` is refused with the fix.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.bindings import Binding, bind
from jpeft.bindings.hf_flax import HFFlaxBinding
from jpeft.core import registry
from jpeft.core.tree import iter_leaves
from tests import parity, tiny_models

LAYER_METHODS = [t for t in registry.registered_types() if registry.kind_of(t) == "layer"]

# One row per layer method, keyed by PEFT's ``peft_type``: the same keyword arguments build
# PEFT's config and jpeft's. Rows without ``target_modules`` use both libraries' OPT defaults.
OPT_CONFIGS: dict[str, dict] = {
    "LORA": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]),
    "IA3": dict(),  # OPT default: q_proj, k_proj, fc2 (fc2 feed-forward: scales its input)
    "VERA": dict(r=4, target_modules=["q_proj", "v_proj", "fc2"]),  # mixed shapes: 32->32, 64->32
    "ADALORA": dict(init_r=4, target_r=2, total_step=10),  # OPT default: all six projections
    "LOHA": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "fc1"]),
}


def _ids(peft_type) -> str:
    return peft_type.value


@pytest.fixture(scope="module")
def opt(tiny):
    return tiny("opt")


@pytest.fixture(scope="module")
def opt_base_logits(opt):
    return parity.jax_logits(opt.flax_model, opt.inputs())


# --------------------------------------------------------------------------- OPT, every layer method


def test_every_layer_method_has_an_opt_row():
    assert LAYER_METHODS, "no layer method registered"
    missing = {t.value for t in LAYER_METHODS} - set(OPT_CONFIGS)
    assert not missing, f"add a row to OPT_CONFIGS for {sorted(missing)}"


@pytest.mark.parametrize("peft_type", LAYER_METHODS, ids=_ids)
def test_opt_parity_with_torch_peft(opt, opt_base_logits, peft_type, tmp_path, record_property):
    import peft
    import torch

    kwargs = OPT_CONFIGS[peft_type.value]
    torch_config, jpeft_config = parity.method_configs(peft_type, task_type="CAUSAL_LM", **kwargs)
    inputs = opt.inputs()

    # torch PEFT -> jpeft
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(opt.torch_model(), torch_config)
    parity.perturb_torch_trainable(torch_model)
    torch_model.eval()
    torch_model.save_pretrained(tmp_path / "from_torch")
    want = parity.torch_logits(torch_model, inputs)
    assert parity.max_diff(want, opt_base_logits) > 1e-3, "the torch adapter must change the output"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = jpeft.PeftModel.from_pretrained(opt.flax_model, tmp_path / "from_torch")
    assert loaded.peft_config["default"].peft_type == peft_type
    diff = parity.assert_close(
        parity.jax_logits(loaded, inputs), want, f"{peft_type.value}: torch PEFT -> jpeft"
    )
    record_property("torch_to_jpeft_max_abs_diff", diff)

    # jpeft -> torch PEFT (PEFT's "missing adapter keys" warning fails the load)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = jpeft.get_peft_model(opt.flax_model, jpeft_config, key=jax.random.key(3))
    assert set(model.targeted_modules()) == set(torch_model.base_model.targeted_module_names)
    parity.perturb_trainable(model)
    mine = parity.jax_logits(model, inputs)
    assert parity.max_diff(mine, opt_base_logits) > 1e-3, "the jpeft adapter must change the output"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "from_jpeft")
    theirs = parity.torch_logits(parity.torch_peft_load(opt, tmp_path / "from_jpeft"), inputs)
    diff = parity.assert_close(theirs, mine, f"{peft_type.value}: jpeft -> torch PEFT")
    record_property("jpeft_to_torch_max_abs_diff", diff)


@pytest.fixture(scope="module")
def opt_lora(opt):
    """LoRA without adapter dropout: any train/eval difference is OPT's own dropout."""
    config = jpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = jpeft.get_peft_model(opt.flax_model, config, key=jax.random.key(0))
    parity.perturb_trainable(model)
    return model


def test_opt_train_mode_switches_dropout(opt, opt_lora):
    assert opt.flax_model.config.dropout > 0
    inputs = opt.inputs()
    params = opt_lora.params
    evaluated = np.asarray(opt_lora.apply(params, **inputs).logits)
    np.testing.assert_array_equal(np.asarray(opt_lora.apply(params, **inputs, train=False).logits), evaluated)

    def trained(key: int, **kwargs) -> np.ndarray:
        out = opt_lora.apply(params, **inputs, train=True, dropout_rng=jax.random.key(key), **kwargs)
        return np.asarray(out.logits)

    first = trained(0)
    assert np.isfinite(first).all()
    assert parity.max_diff(first, evaluated) > 1e-3, "train=True must turn OPT's dropout on"
    np.testing.assert_array_equal(trained(0), first)  # the key decides the mask
    assert parity.max_diff(trained(1), first) > 1e-3
    # With no adapter active nothing is hooked: the difference is the base model's own dropout.
    base_eval = np.asarray(opt_lora.apply(params, **inputs, active_adapters=[]).logits)
    assert parity.max_diff(trained(0, active_adapters=[]), base_eval) > 1e-3


def test_opt_train_step(opt, opt_lora):
    inputs = opt.inputs()
    batch = {
        "input_ids": jnp.asarray(inputs["input_ids"]),
        "attention_mask": jnp.asarray(inputs["attention_mask"]),
    }
    base_before = jax.device_get(opt_lora.base_params)
    losses = {}
    for fused in (True, False):  # OPT's tied head: fused by default (head_output_is_logits)
        trainer = jpeft.train.make_train_step(opt_lora, optax.sgd(0.1), fused_loss=fused)
        state = trainer.init(jax.random.key(0))
        before = jax.device_get(state.trainable["adapters"])
        state, metrics = trainer.step(state, trainer.frozen(), batch)
        losses[fused] = float(metrics["loss"])
        assert np.isfinite(losses[fused]) and float(metrics["grad_norm"]) > 0
        assert int(state.step) == 1
        moved = [
            float(np.abs(np.asarray(a) - b).max())
            for a, b in zip(
                jax.tree.leaves(state.trainable["adapters"]), jax.tree.leaves(before), strict=True
            )
        ]
        assert max(moved) > 0, "the step must update the adapter"
    # Same key, same dropout masks: the fused and plain losses agree.
    assert abs(losses[True] - losses[False]) <= 1e-5, losses
    for (_, got), (_, want) in zip(iter_leaves(opt_lora.base_params), iter_leaves(base_before), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


# --------------------------------------------------------------------------- the binding's facts


# Per tiny architecture: torch class, whether the logits are lm_head's output unchanged, the
# output embedding modules with weights of their own, the input embeddings a tied head reuses,
# and the params that are buffers in torch.
FACTS = {
    "gpt2": ("GPT2LMHeadModel", True, set(), {"transformer.wte"}, set()),
    "llama": ("LlamaForCausalLM", True, {"lm_head"}, set(), set()),  # untied in the tiny config
    "bert": ("BertForSequenceClassification", False, set(), set(), set()),
    "bart": ("BartForConditionalGeneration", False, set(), {"model.shared"}, {("final_logits_bias",)}),
    "opt": ("OPTForCausalLM", True, set(), {"model.decoder.embed_tokens"}, set()),
}


def test_facts_cover_every_tiny_arch():
    assert set(FACTS) == set(tiny_models.ARCHS)


def _torch_modules_with_weights(torch_model) -> dict:
    """torch's ``named_modules()`` that own a weight not already owned by an earlier module (ties)."""
    seen: set[int] = set()
    found = {}
    for name, module in torch_model.named_modules():
        own = {id(p) for p in module.parameters(recurse=False)}
        if own - seen:
            found[name] = module
        seen |= own
    return found


@pytest.mark.parametrize("arch", sorted(FACTS))
def test_binding_facts(arch, tiny):
    from transformers.pytorch_utils import Conv1D

    pair = tiny(arch)
    binding = bind(pair.flax_model)
    assert type(binding) is HFFlaxBinding
    assert isinstance(binding, Binding)
    assert bind(binding) is binding
    assert binding.model is pair.flax_model
    assert binding.model_type == arch
    assert binding.class_name == pair.flax_class.__name__
    torch_class, logits, output_embeddings, tied, buffers = FACTS[arch]
    assert binding.torch_class_name == torch_class == pair.torch_class.__name__
    assert binding.torch_module_path == pair.torch_class.__module__
    assert binding.head_output_is_logits is logits
    assert binding.output_embedding_names == output_embeddings
    assert binding.tied_embedding_names == tied
    assert binding.buffer_paths == buffers
    for path in buffers:  # a root-level leaf, in no module
        assert path[0] in binding.params and path[0] not in binding.modules

    torch_model = pair.torch_model()
    theirs = _torch_modules_with_weights(torch_model)
    mine = {name: info for name, info in binding.modules.items() if info.param_shapes}
    assert set(mine) == set(theirs)
    transposed = {name for name, info in mine.items() if info.kernel_transposed}
    assert transposed == {name for name, module in theirs.items() if isinstance(module, Conv1D)}
    assert bool(transposed) == (arch == "gpt2")  # GPT-2's Conv1D stores its kernel (out, in)
    head = torch_model.get_output_embeddings()
    if tied:  # torch agrees on which input embedding the head's weight is
        assert {n for n, m in theirs.items() if getattr(m, "weight", None) is head.weight} == tied


def test_with_params_leaves_the_model_untouched(tiny):
    pair = tiny("gpt2")
    binding = bind(pair.flax_model)
    original = pair.flax_model.params
    doubled = jax.tree.map(lambda x: 2 * x, binding.params)
    copy = binding.with_params(doubled)
    assert type(copy) is type(pair.flax_model) and copy is not pair.flax_model
    assert copy.params is doubled
    assert pair.flax_model.params is original
    assert binding.params is not doubled


# --------------------------------------------------------------------------- no training-mode argument


def test_model_without_train_or_deterministic_is_refused(tiny):
    from transformers import FlaxLlamaForCausalLM

    class NoModeLlama(FlaxLlamaForCausalLM):
        def __call__(self, input_ids, attention_mask=None, params=None, dropout_rng=None):
            return super().__call__(input_ids, attention_mask, params=params, dropout_rng=dropout_rng)

    pair = tiny("llama")
    model = NoModeLlama(pair.flax_model.config, seed=0)
    model.params = pair.flax_model.params
    config = jpeft.LoraConfig(r=2, target_modules=["q_proj"])
    message = (
        r"NoModeLlama.__call__ takes neither `train` nor `deterministic`.*jpeft.LinenBinding\(model.module"
    )
    with pytest.raises(TypeError, match=message):
        bind(model)
    with pytest.raises(TypeError, match=message):
        jpeft.get_peft_model(model, config)

    # The fix the message names works: the module with its params (the caller passes its inputs).
    peft_model = jpeft.get_peft_model(jpeft.LinenBinding(model.module, model.params), config)
    inputs = pair.inputs()
    positions = np.broadcast_to(np.arange(inputs["input_ids"].shape[1]), inputs["input_ids"].shape)
    got = peft_model(inputs["input_ids"], inputs["attention_mask"], positions).logits
    np.testing.assert_allclose(np.asarray(got), parity.jax_logits(pair.flax_model, inputs), atol=1e-6)
