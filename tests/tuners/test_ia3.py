"""IA3 (``jpeft.tuners.ia3``) against torch PEFT 0.21.2, in both directions.

Each row of ``CASES`` is one ``IA3Config`` on one tiny random model (``tests/tiny_models.py``):

- ``test_torch_to_jpeft``: torch PEFT builds the adapter, its vectors (and module copies)
  are perturbed, ``peft`` saves it, jpeft loads it: the logits agree within ``parity.ATOL``.
- ``test_jpeft_to_torch``: jpeft builds and perturbs the adapter and saves it; ``peft``
  loads it without a missing-keys warning: the logits agree.
- ``test_checkpoint_format_and_counts``: the same safetensors keys/shapes and
  ``adapter_config.json`` as PEFT's save of the same config, and the same
  ``print_trainable_parameters`` line.
- ``test_merge_unmerge``: merged == unmerged, ``unmerge_adapter`` restores the base.

Every adapter must move the logits by more than ``_MIN_ADAPTER_EFFECT``, so no check passes
because the adapter did nothing.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import jpeft
import jpeft.tuners.ia3  # noqa: F401  (registers IA3)
from jpeft.tuners.ia3 import IA3Config
from tests import parity

_MIN_ADAPTER_EFFECT = 1e-3
_CONFIG_VALUE_EXEMPT = {"base_model_name_or_path"}
_SET_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save")


def case(case_id: str, arch: str, **kwargs):
    return pytest.param(arch, kwargs, id=case_id)


CASES = [
    # GPT-2: Conv1D targets (kernel stored (out, in)); defaults c_attn + mlp.c_proj (feed-forward).
    case("gpt2-default_targets", "gpt2", task_type="CAUSAL_LM"),
    case(
        "gpt2-list-ff-exclude-modules_to_save",
        "gpt2",
        target_modules=["c_attn", "c_fc", "mlp.c_proj"],
        feedforward_modules=["c_fc", "mlp.c_proj"],
        exclude_modules=["transformer.h.0.attn.c_attn"],
        modules_to_save=["ln_f"],
        task_type="CAUSAL_LM",
    ),
    # Llama: defaults k_proj, v_proj, down_proj (feed-forward); no biases.
    case("llama-default_targets", "llama", task_type="CAUSAL_LM"),
    case(
        "llama-regex-ff_regex-exclude_regex-lm_head",
        "llama",
        target_modules=r"model\.layers\.\d\.(self_attn\.(q|o)_proj|mlp\.(up|down)_proj)",
        feedforward_modules=r".*\.mlp\.down_proj",
        exclude_modules=r"model\.layers\.0\.self_attn\.o_proj",
        modules_to_save=["lm_head"],
        init_ia3_weights=False,
    ),
    # "all-linear" expands to every Linear but lm_head; the expanded names are saved. PEFT
    # saves feedforward_modules=["down_proj", "up_proj"] beside them and then cannot load
    # its own file (subset check); jpeft saves the feed-forward targets' full names instead.
    case(
        "llama-all_linear-ff_list",
        "llama",
        target_modules="all-linear",
        feedforward_modules=["down_proj", "up_proj"],
        task_type="CAUSAL_LM",
    ),
    # BERT: defaults key, value, output.dense; the plain-endswith feed-forward match makes
    # both attention.output.dense and output.dense input-scaled. SEQ_CLS saves the classifier.
    case("bert-seq_cls-default_targets", "bert", task_type="SEQ_CLS"),
    case(
        "bert-seq_cls-list-ff-pooler",
        "bert",
        target_modules=["query", "value", "intermediate.dense"],
        feedforward_modules=["intermediate.dense"],
        modules_to_save=["pooler.dense"],
        task_type="SEQ_CLS",
    ),
    # BART: defaults q_proj, v_proj, fc2 (feed-forward), encoder and decoder.
    case("bart-seq2seq-default_targets", "bart", task_type="SEQ_2_SEQ_LM"),
]


# --------------------------------------------------------------------------- helpers


def _torch_ia3(pair, kwargs: dict, seed: int = 1):
    """A torch PEFT IA3 model with perturbed (non-trivial) trainable tensors, in eval mode."""
    import peft
    import torch

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notice on GPT-2
        model = peft.get_peft_model(pair.torch_model(), peft.IA3Config(**kwargs))
    parity.perturb_torch_trainable(model, seed)
    return model.eval()


def _jpeft_ia3(pair, kwargs: dict) -> jpeft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notice on GPT-2 (checked via the saved config)
        model = jpeft.get_peft_model(pair.flax_model, IA3Config(**kwargs))
    parity.perturb_jpeft_adapter(model)
    return model


def _save(model, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)


def _semantic(field: str, value):
    if field in _SET_FIELDS and isinstance(value, list):
        return frozenset(value)
    return value


def _assert_same_config(jax_cfg: dict, torch_cfg: dict) -> None:
    assert set(jax_cfg) == set(torch_cfg), (
        f"config keys: only jpeft {sorted(set(jax_cfg) - set(torch_cfg))}, "
        f"only peft {sorted(set(torch_cfg) - set(jax_cfg))}"
    )
    assert jax_cfg["peft_type"] == torch_cfg["peft_type"] == "IA3"
    differing = {
        field: (jax_cfg[field], torch_cfg[field])
        for field in torch_cfg
        if field not in _CONFIG_VALUE_EXEMPT
        and _semantic(field, jax_cfg[field]) != _semantic(field, torch_cfg[field])
    }
    assert not differing, f"adapter_config.json values (jpeft, peft): {differing}"
    for field in _SET_FIELDS:
        assert type(jax_cfg[field]) is type(torch_cfg[field]), (field, jax_cfg[field], torch_cfg[field])


ARGS = ("arch", "kwargs")
# Cases whose PEFT-saved config PEFT itself refuses to load (feedforward not a subset of
# the resolved target list); jpeft saves an equivalent, loadable feedforward_modules.
PEFT_UNLOADABLE = {"llama-all_linear-ff_list"}


def _case_id(request) -> str:
    return request.node.callspec.id


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(ARGS, CASES)
def test_torch_to_jpeft(arch, kwargs, tiny, tmp_path, request):
    pair = tiny(arch)
    inputs = pair.inputs()
    torch_model = _torch_ia3(pair, kwargs)
    torch_model.save_pretrained(tmp_path)
    if _case_id(request) in PEFT_UNLOADABLE:
        import peft

        with pytest.raises(ValueError, match="should be a subset of `target_modules`"):
            peft.PeftModel.from_pretrained(pair.torch_model(), tmp_path)
        with pytest.raises(jpeft.ConfigError, match="should be a subset of `target_modules`"):
            jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
        return
    ref = parity.torch_logits(torch_model, inputs)
    assert parity.max_diff(ref, parity.jax_logits(pair.flax_model, inputs)) > _MIN_ADAPTER_EFFECT, (
        "adapter is a no-op"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    parity.assert_close(parity.jax_logits(loaded, inputs), ref, "torch PEFT IA3 adapter loaded by jpeft")
    # the feed-forward layers jpeft found are the ones PEFT marked
    theirs = {
        name.removeprefix("base_model.model."): module.is_feedforward
        for name, module in torch_model.named_modules()
        if hasattr(module, "is_feedforward") and hasattr(module, "ia3_l")
    }
    mine = {name: layer.is_feedforward for name, layer in loaded.plan("default").layers.items()}
    assert mine == theirs


@pytest.mark.parametrize(ARGS, CASES)
def test_jpeft_to_torch(arch, kwargs, tiny, tmp_path):
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_ia3(pair, kwargs)
    got = parity.jax_logits(mine, inputs)
    assert parity.max_diff(got, parity.jax_logits(pair.flax_model, inputs)) > _MIN_ADAPTER_EFFECT, (
        "adapter is a no-op"
    )
    _save(mine, tmp_path)
    theirs = parity.torch_peft_load(pair, tmp_path)
    parity.assert_close(parity.torch_logits(theirs, inputs), got, "jpeft IA3 adapter loaded by torch PEFT")


@pytest.mark.parametrize(ARGS, CASES)
def test_checkpoint_format_and_counts(arch, kwargs, tiny, tmp_path, request):
    pair = tiny(arch)
    torch_dir, jax_dir = tmp_path / "torch", tmp_path / "jax"
    torch_model = _torch_ia3(pair, kwargs)
    torch_model.save_pretrained(torch_dir)
    mine = _jpeft_ia3(pair, kwargs)
    _save(mine, jax_dir)

    jax_cfg = json.loads((jax_dir / "adapter_config.json").read_text())
    torch_cfg = json.loads((torch_dir / "adapter_config.json").read_text())
    if _case_id(request) in PEFT_UNLOADABLE:
        ff = [n for n, layer in mine.plan("default").layers.items() if layer.is_feedforward]
        assert ff and set(jax_cfg["feedforward_modules"]) == set(ff) <= set(jax_cfg["target_modules"])
        jax_cfg["feedforward_modules"] = torch_cfg["feedforward_modules"]
    _assert_same_config(jax_cfg, torch_cfg)
    jax_shapes = {k: v.shape for k, v in load_file(jax_dir / "adapter_model.safetensors").items()}
    torch_shapes = {k: v.shape for k, v in load_file(torch_dir / "adapter_model.safetensors").items()}
    assert jax_shapes == torch_shapes
    assert any(k.endswith(".ia3_l") for k in jax_shapes)

    expected = parity.captured(torch_model.print_trainable_parameters)
    assert expected.startswith("trainable params: ")
    assert parity.captured(mine.print_trainable_parameters) == expected
    assert mine.get_nb_trainable_parameters() == tuple(torch_model.get_nb_trainable_parameters())


@pytest.mark.parametrize(ARGS, CASES)
def test_merge_unmerge(arch, kwargs, tiny):
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_ia3(pair, kwargs)
    unmerged = parity.jax_logits(mine, inputs)
    base_before = jax.tree.map(np.asarray, mine.base_params)

    merged_model = mine.merge_and_unload()
    assert not isinstance(merged_model, jpeft.PeftModel)
    parity.assert_close(parity.jax_logits(merged_model, inputs), unmerged, "merge_and_unload vs unmerged")

    mine.merge_adapter()
    assert mine.merged_adapters == ["default"]
    parity.assert_close(parity.jax_logits(mine, inputs), unmerged, "merge_adapter vs unmerged")
    with pytest.warns(UserWarning, match="Unmerge result can be inaccurate"):
        mine.unmerge_adapter()
    restored = jax.tree.map(np.asarray, mine.base_params)
    for (path, want), got in zip(
        jax.tree_util.tree_leaves_with_path(base_before), jax.tree.leaves(restored), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    parity.assert_close(parity.jax_logits(mine, inputs), unmerged, "after unmerge")


# --------------------------------------------------------------------------- jit, training


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_jit_matches_eager(arch, tiny):
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_ia3(pair, {"task_type": "CAUSAL_LM"})
    eager = parity.jax_logits(mine, inputs)
    jitted = jax.jit(functools.partial(mine.apply, train=False))(mine.params, **inputs).logits
    parity.assert_close(jitted, eager, "jit vs eager", atol=1e-6)


def test_training_updates_only_ia3_vectors(tiny):
    from jpeft.train import make_train_step

    pair = tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = jpeft.get_peft_model(pair.flax_model, IA3Config(task_type="CAUSAL_LM"))
    batch = {k: jnp.asarray(v) for k, v in pair.inputs(batch=4, length=8).items()}
    batch["labels"] = batch["input_ids"]

    trainable, _ = mine.split_params()
    assert all(leaf is None for leaf in jax.tree.leaves(trainable["base"], is_leaf=lambda x: x is None))
    assert set(trainable["adapters"]["default"]["ia3"]) == set(mine.targeted_modules())

    trainer = make_train_step(mine, optax.adam(1e-2))
    state = trainer.init(jax.random.key(0))
    frozen_tree = trainer.frozen()
    frozen_before = jax.tree.map(np.array, frozen_tree)
    start = {p: np.array(x) for p, x in jax.tree_util.tree_leaves_with_path(state.trainable)}  # step donates
    losses = []
    for _ in range(4):
        state, metrics = trainer.step(state, frozen_tree, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    # every vector got a non-zero gradient (Adam moved it); nothing else is in the trainable tree
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.trainable):
        assert not np.array_equal(np.asarray(leaf), np.asarray(start[path])), jax.tree_util.keystr(path)
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_tree), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert all(leaf is None for leaf in jax.tree.leaves(state.trainable["base"], is_leaf=lambda x: x is None))


def test_default_feedforward_outside_targets_saved_loadable(tiny, tmp_path):
    """Targets without feed-forward ones: PEFT saves the default ["down_proj"] (and cannot reload it)."""
    pair = tiny("llama")
    inputs = pair.inputs()
    with pytest.warns(UserWarning, match="not a subset of the resolved target_modules"):
        mine = jpeft.get_peft_model(pair.flax_model, IA3Config(target_modules=["q_proj", "v_proj"]))
    assert mine.peft_config["default"].feedforward_modules == []
    assert not any(layer.is_feedforward for layer in mine.plan("default").layers.values())
    parity.perturb_jpeft_adapter(mine)
    _save(mine, tmp_path)
    theirs = parity.torch_peft_load(pair, tmp_path)
    parity.assert_close(
        parity.torch_logits(theirs, inputs), parity.jax_logits(mine, inputs), "reloaded in torch"
    )


def test_two_adapters_multiply_on_output_scaled_layers(tiny):
    """Several active adapters multiply their vectors, as PEFT does (output-scaled layers)."""
    pair = tiny("llama")
    inputs = pair.inputs()
    kwargs = dict(target_modules=["k_proj", "v_proj"], feedforward_modules=[])
    mine = _jpeft_ia3(pair, kwargs)
    mine.add_adapter("other", IA3Config(**kwargs))
    params = mine.params
    params["adapters"]["other"] = jax.tree.map(lambda x: x * 0.5, params["adapters"]["default"])
    mine.params = params
    both = np.asarray(mine.apply(mine.params, **inputs, active_adapters=["default", "other"]).logits)

    single = jpeft.get_peft_model(pair.flax_model, IA3Config(**kwargs))
    p = single.params
    p["adapters"]["default"] = jax.tree.map(lambda x: 0.5 * x * x, params["adapters"]["default"])
    single.params = p
    parity.assert_close(both, parity.jax_logits(single, inputs), "two adapters vs product")


# --------------------------------------------------------------------------- config and errors


def test_config_defaults_and_round_trip():
    config = IA3Config()
    assert config.target_modules is None and config.feedforward_modules is None
    assert config.fan_in_fan_out is False and config.init_ia3_weights is True
    assert config.modules_to_save is None and config.exclude_modules is None
    data = IA3Config(target_modules=["k", "v"], feedforward_modules=["v"]).to_dict()
    assert data["peft_type"] == "IA3"
    assert jpeft.config_from_dict(data) == IA3Config(
        target_modules=["k", "v"], feedforward_modules=["v"], peft_version=data["peft_version"]
    )


def test_feedforward_must_be_subset_of_targets():
    import peft

    with pytest.raises(ValueError, match="subset of `target_modules`"):
        peft.IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"])
    with pytest.raises(jpeft.ConfigError, match="subset of `target_modules`"):
        IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"])
    # as in PEFT, only checked when both are lists
    IA3Config(target_modules=r".*\.(k|v)", feedforward_modules=["wo"])


def test_unknown_and_invalid_fields():
    with pytest.raises(TypeError):
        IA3Config(r=8)  # not an IA3 field (PEFT raises TypeError too)
    with pytest.warns(UserWarning, match="Unexpected keyword arguments"):
        config = jpeft.config_from_dict({"peft_type": "IA3", "target_modules": ["k"], "lora_alpha": 4})
    assert config.target_modules == ["k"] and not hasattr(config, "lora_alpha")
    with pytest.raises(jpeft.ConfigError):
        IA3Config(init_ia3_weights="yes")
    with pytest.raises(jpeft.ConfigError):
        IA3Config(feedforward_modules="(unclosed")


def test_embedding_target_rejected(tiny):
    import peft

    pair = tiny("gpt2")
    kwargs = dict(target_modules=["wte", "c_attn"], feedforward_modules=[])
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(pair.torch_model(), peft.IA3Config(**kwargs))
    with pytest.raises(jpeft.NoMatchingModuleError, match="transformer.wte"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jpeft.get_peft_model(pair.flax_model, IA3Config(**kwargs))


def test_no_defaults_for_unknown_model_type():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(nn.Dense(4, name="fc")(x))

    x = jnp.ones((2, 5))
    params = Net().init(jax.random.key(0), x)["params"]
    with pytest.raises(jpeft.ConfigError, match="Please specify `target_modules`"):
        jpeft.get_peft_model((Net(), params), IA3Config())
    with pytest.raises(jpeft.ConfigError, match="Please specify `feedforward_modules`"):
        jpeft.get_peft_model((Net(), params), IA3Config(target_modules=["fc"]))

    # explicit targets work on any model: y = W (l x) + b for fc, l (W x + b) for out
    model = jpeft.get_peft_model(
        (Net(), params), IA3Config(target_modules=["fc", "out"], feedforward_modules=["fc"])
    )
    assert model.adapters["default"]["ia3"]["fc"]["ia3_l"].shape == (1, 5)
    assert model.adapters["default"]["ia3"]["out"]["ia3_l"].shape == (3, 1)
    l_fc = jnp.linspace(0.5, 1.5, 5).reshape(1, 5)
    l_out = jnp.asarray([[2.0], [-1.0], [0.5]])
    p = model.params
    p["adapters"]["default"]["ia3"] = {"fc": {"ia3_l": l_fc}, "out": {"ia3_l": l_out}}
    model.params = p
    fc, out = params["fc"], params["out"]
    want = ((x * l_fc[0]) @ fc["kernel"] + fc["bias"]) @ out["kernel"] + out["bias"]
    want = want * l_out[:, 0]
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=1e-6, atol=1e-6)
