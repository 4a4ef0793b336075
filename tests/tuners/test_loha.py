"""LoHa against torch PEFT 0.21.2: numeric parity both ways, file format, merge, patterns, errors.

- ``test_torch_to_jpeft`` (a): torch PEFT builds a LoHa adapter, perturbs every trainable
  tensor (``w2_b`` is no longer zero), saves it; jpeft loads it: logits agree within
  ``parity.ATOL``.
- ``test_jpeft_to_torch`` (b, c): jpeft builds, perturbs and saves; ``peft.PeftModel.from_pretrained``
  loads it without a missing-keys warning: logits agree; the folder has the keys, shapes and
  ``adapter_config.json`` keys/values of PEFT's own save of the same config.
- merge == unmerged and unmerge restores (d); per-layer ``ΔW`` equals PEFT's ``get_delta_weight``;
  ``rank_pattern``/``alpha_pattern`` give PEFT's ranks and scalings (e); init, counts, training
  dropouts; refused options raise clear errors (f).

GPT-2 is only in the error tests: its attention and MLP layers are ``Conv1D``, which torch PEFT's
LoHa refuses (``TypeError``), so jpeft refuses them too.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jpeft
from jpeft.core.tree import get_path
from jpeft.errors import ConfigError, NoMatchingModuleError
from jpeft.tuners import loha
from jpeft.tuners.loha import LoHaConfig
from tests import parity

_MIN_ADAPTER_EFFECT = 1e-3


def case(case_id: str, arch: str, **kwargs):
    return pytest.param(arch, kwargs, id=case_id)


CASES = [
    # per-layer ranks and alphas: v_proj r=2, layer 1's q_proj alpha 16 (scaling 4), down_proj 64->32
    case(
        "llama-patterns",
        "llama",
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 16},
        init_weights=False,
    ),
    # no target_modules: PEFT's LoHa default (a copy of LoRA's table: q_proj, v_proj), layer 1 only
    case("llama-default-layer1", "llama", r=3, alpha=5, layers_to_transform=[1], layers_pattern="layers"),
    # biased Linear layers, SEQ_CLS adds the classifier to modules_to_save (saved in full)
    case("bert-seqcls", "bert", r=2, alpha=4, target_modules=["query", "output.dense"], task_type="SEQ_CLS"),
]


# --------------------------------------------------------------------------- helpers


def _torch_model(pair, kwargs, seed: int = 1):
    import peft
    import torch

    torch.manual_seed(seed)
    return peft.get_peft_model(pair.torch_model(), peft.LoHaConfig(**kwargs))


def _jpeft_model(pair, kwargs, key: int = 0):
    return jpeft.get_peft_model(pair.flax_model, LoHaConfig(**kwargs), key=jax.random.key(key))


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _assert_same_config(mine: dict, theirs: dict) -> None:
    assert set(mine) == set(theirs), (sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine)))
    assert mine["peft_type"] == theirs["peft_type"] == "LOHA"

    def semantic(field: str, value):
        return (
            sorted(value)
            if field in ("target_modules", "modules_to_save") and isinstance(value, list)
            else value
        )

    differing = {
        k: (mine[k], theirs[k])
        for k in mine
        if k != "base_model_name_or_path" and semantic(k, mine[k]) != semantic(k, theirs[k])
    }
    assert not differing, f"adapter_config.json values (jpeft, peft): {differing}"


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("arch", "kwargs"), CASES)
def test_torch_to_jpeft(arch, kwargs, tiny, tmp_path):
    """(a) torch PEFT's LoHa (perturbed, saved by peft) loaded by jpeft gives torch's logits."""
    pair = tiny(arch)
    inputs = pair.inputs()
    theirs = _torch_model(pair, kwargs)
    parity.perturb_torch_trainable(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ref = parity.torch_logits(theirs, inputs)
    assert parity.max_diff(ref, parity.jax_logits(pair.flax_model, inputs)) > _MIN_ADAPTER_EFFECT, (
        "no-op adapter"
    )

    mine = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    assert set(mine.plan("default").layers) == {
        name for name, module in theirs.base_model.model.named_modules() if hasattr(module, "hada_w1_a")
    }
    diff = parity.assert_close(parity.jax_logits(mine, inputs), ref, "torch PEFT LoHa loaded by jpeft")
    print(f"torch -> jpeft {arch} max|diff| = {diff:.2e}")


@pytest.mark.parametrize(("arch", "kwargs"), CASES)
def test_jpeft_to_torch(arch, kwargs, tiny, tmp_path):
    """(b, c) jpeft's LoHa (perturbed, saved) loaded by torch PEFT gives jpeft's logits; same file format."""
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_model(pair, kwargs)
    parity.perturb_jpeft_adapter(mine)
    got = parity.jax_logits(mine, inputs)
    assert parity.max_diff(got, parity.jax_logits(pair.flax_model, inputs)) > _MIN_ADAPTER_EFFECT, (
        "no-op adapter"
    )
    jax_dir, torch_dir = tmp_path / "jax", tmp_path / "torch"
    mine.save_pretrained(jax_dir)

    theirs = parity.torch_peft_load(pair, jax_dir)  # fails on PEFT's "missing adapter keys" warning
    diff = parity.assert_close(parity.torch_logits(theirs, inputs), got, "jpeft LoHa loaded by torch PEFT")
    print(f"jpeft -> torch {arch} max|diff| = {diff:.2e}")

    _torch_model(pair, kwargs).save_pretrained(torch_dir)
    _assert_same_config(_config(jax_dir), _config(torch_dir))
    assert _shapes(jax_dir) == _shapes(torch_dir)


@pytest.mark.parametrize(("arch", "kwargs"), [CASES[0], CASES[2]])
def test_merge_unmerge(arch, kwargs, tiny):
    """(d) merge_and_unload and merge_adapter equal the unmerged forward; unmerge restores the base."""
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_model(pair, kwargs)
    parity.perturb_jpeft_adapter(mine)
    unmerged = parity.jax_logits(mine, inputs)
    base_params = mine.base_params
    merged = mine.merge_and_unload()
    assert not isinstance(merged, jpeft.PeftModel)
    diff = parity.assert_close(parity.jax_logits(merged, inputs), unmerged, "merge_and_unload vs unmerged")
    print(f"merged vs unmerged {arch} max|diff| = {diff:.2e}")

    mine.merge_adapter()
    parity.assert_close(parity.jax_logits(mine, inputs), unmerged, "merge_adapter vs unmerged")
    mine.unmerge_adapter()
    for before, after in zip(jax.tree.leaves(base_params), jax.tree.leaves(mine.base_params), strict=True):
        parity.assert_close(after, before, "unmerged base", atol=1e-6)


def test_delta_weight_and_patterns_match_torch(tiny, tmp_path):
    """(e) Per layer: PEFT's r, alpha and scaling from the patterns, and its ``get_delta_weight``."""
    pair = tiny("llama")
    kwargs = dict(CASES[0].values[1])
    theirs = _torch_model(pair, kwargs)
    parity.perturb_torch_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    mine = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    plan, adapter = mine.plan("default"), mine.params["adapters"]["default"]
    scalings = set()
    for name, layer in plan.layers.items():
        torch_layer = theirs.base_model.model.get_submodule(name)
        assert (layer.r, layer.alpha) == (torch_layer.r["default"], torch_layer.alpha["default"]), name
        assert layer.scaling == pytest.approx(torch_layer.scaling["default"]), name
        scalings.add(layer.scaling)
        want = torch_layer.get_delta_weight("default").detach().numpy()
        parity.assert_close(
            np.asarray(loha.delta_weight(layer, adapter["loha"][name])), want, name, atol=1e-6
        )
    assert scalings == {2.0, 4.0}  # alpha 8 / r 4 and 8 / 2 (v_proj), 16 / 4 (layers.1 q_proj)
    assert plan.layers["model.layers.0.self_attn.v_proj"].r == 2


def test_unmatched_pattern_warns(tiny):
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys did not match any targeted module.*nope"):
        _jpeft_model(tiny("llama"), dict(target_modules=["q_proj"], rank_pattern={"nope": 2}))


# --------------------------------------------------------------------------- init, counts, training


def test_init_is_peft_init(tiny):
    """``init_weights=True``: w2_b zero (a no-op), the rest U(±1/√fan_in); False: w2_b random too."""
    pair = tiny("llama")
    inputs = pair.inputs()
    mine = _jpeft_model(pair, dict(r=4, target_modules=["q_proj", "down_proj"]))
    np.testing.assert_array_equal(parity.jax_logits(mine, inputs), parity.jax_logits(pair.flax_model, inputs))
    for params in mine.params["adapters"]["default"]["loha"].values():
        assert not np.any(np.asarray(params["hada_w2_b"]))
        for leaf in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
            value = np.asarray(params[leaf])
            bound = 1 / math.sqrt(value.shape[1])
            assert np.abs(value).max() <= bound and np.abs(value).max() > bound / 2, leaf
    random = _jpeft_model(pair, dict(r=4, target_modules=["q_proj"], init_weights=False))
    assert parity.max_diff(parity.jax_logits(random, inputs), parity.jax_logits(pair.flax_model, inputs)) > 0


def test_print_trainable_parameters(tiny, capsys):
    pair = tiny("bert")
    kwargs = dict(CASES[2].values[1])
    _torch_model(pair, kwargs).print_trainable_parameters()
    want = capsys.readouterr().out
    _jpeft_model(pair, kwargs).print_trainable_parameters()
    assert capsys.readouterr().out == want


def test_training_dropouts(tiny):
    """rank_dropout zeroes output rows of ΔW and divides by the kept fraction; module_dropout drops it all."""
    pair = tiny("llama")
    mine = _jpeft_model(pair, dict(r=4, target_modules=["q_proj"], init_weights=False))
    plan = mine.plan("default")
    name, layer = next(iter(plan.layers.items()))
    adapter = mine.params["adapters"]["default"]
    delta = np.asarray(loha.delta_weight(layer, adapter["loha"][name]))  # (out, in)
    x = jnp.eye(delta.shape[1], dtype=jnp.float32)  # rows of x @ ΔWᵀ are ΔW's columns
    out = jnp.zeros((delta.shape[1], delta.shape[0]), jnp.float32)

    def forward(config, key, train=True):
        return np.asarray(loha.layer_forward(layer, config, adapter, {}, x, out, train=train, key=key)).T

    rank = LoHaConfig(r=4, rank_dropout=0.5)
    got = forward(rank, jax.random.key(0))
    kept = np.abs(got).sum(axis=1) > 0
    assert 0 < kept.sum() < len(kept)
    np.testing.assert_allclose(got[kept], delta[kept] * len(kept) / kept.sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(forward(rank, None, train=False), delta)  # eval: no dropout, no key needed

    module = LoHaConfig(r=4, module_dropout=0.5)
    outcomes = set()
    for seed in range(16):
        got = forward(module, jax.random.key(seed))
        if not np.any(got):
            outcomes.add("dropped")
        else:
            np.testing.assert_allclose(got, delta, rtol=1e-6, atol=1e-7)
            outcomes.add("kept")
    assert outcomes == {"dropped", "kept"}
    with pytest.raises(ValueError, match="dropout_rng"):
        forward(module, None)


def test_train_step_with_rank_dropout(tiny):
    """Jitted training with rank_dropout. From PEFT's init (w2_b = 0) only w2_b has a gradient at
    first (ΔW's gradient for the other factors is multiplied by w2_a w2_b); then every factor trains."""
    import optax

    from jpeft.train import make_train_step

    pair = tiny("llama")
    mine = _jpeft_model(pair, dict(r=4, target_modules=["q_proj", "v_proj"], rank_dropout=0.25))
    before = jax.tree.map(np.asarray, mine.params["adapters"]["default"]["loha"])
    trainer = make_train_step(mine, optax.sgd(5.0))
    state = trainer.init(jax.random.key(0))
    ids = jnp.asarray(pair.inputs()["input_ids"])
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    frozen = trainer.frozen()
    for step in range(2):
        state, metrics = trainer.step(state, frozen, batch)
        assert np.isfinite(float(metrics["loss"]))
        after = trainer.params(state)["adapters"]["default"]["loha"]
        for name, leaves in before.items():
            for leaf, value in leaves.items():
                moved = parity.max_diff(after[name][leaf], value) > 0
                assert moved == (step == 1 or leaf == "hada_w2_b"), f"step {step}: {name}.{leaf}"


def test_fsdp_sharding_follows_the_weights(tiny):
    """adapter_specs: w*_a split like the kernel's output axis, w*_b like its input axis; same logits."""
    from jax.sharding import PartitionSpec

    pair = tiny("llama")
    inputs = pair.inputs()
    mine = _jpeft_model(pair, dict(r=4, target_modules=["q_proj", "down_proj"]))
    parity.perturb_jpeft_adapter(mine)
    want = parity.jax_logits(mine, inputs)
    mesh = jpeft.train.make_mesh(data=2, fsdp=4)
    specs = jpeft.train.param_specs(mine, mesh, min_size=256)
    for name, layer in mine.plan("default").layers.items():
        in_axis, out_axis = (tuple(get_path(specs["base"], layer.info.weight_path)) + (None, None))[:2]
        assert (in_axis, out_axis) != (None, None), name  # min_size=256 splits these kernels
        got = specs["adapters"]["default"]["loha"][name]
        assert got["hada_w1_a"] == got["hada_w2_a"] == PartitionSpec(out_axis, None), name
        assert got["hada_w1_b"] == got["hada_w2_b"] == PartitionSpec(None, in_axis), name
    mine.params = jpeft.train.shard_params(mine, mesh, min_size=256)
    parity.assert_close(parity.jax_logits(mine, inputs), want, "sharded LoHa", atol=1e-6)


def test_mixed_with_lora_matches_torch(tiny, tmp_path):
    """A LoRA and a LoHa adapter active together (PEFT's PeftMixedModel) give torch's logits."""
    import peft

    pair = tiny("llama")
    inputs = pair.inputs()
    mine = jpeft.get_peft_model(
        pair.flax_model, jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), mixed=True
    )
    mine.add_adapter("loha", LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    parity.perturb_jpeft_adapter(mine, "default")
    parity.perturb_jpeft_adapter(mine, "loha", seed=2)
    mine.set_adapter(["default", "loha"])
    got = parity.jax_logits(mine, inputs)
    mine.save_pretrained(tmp_path)

    theirs = peft.PeftMixedModel.from_pretrained(pair.torch_model(), tmp_path)
    theirs.load_adapter(tmp_path / "loha", "loha")
    theirs.set_adapter(["default", "loha"])
    diff = parity.assert_close(parity.torch_logits(theirs.eval(), inputs), got, "LoRA + LoHa mixed")
    print(f"mixed LoRA + LoHa max|diff| = {diff:.2e}")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(r=0), "positive integer"),
        (dict(r=2.5), "positive integer"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
        (dict(alpha="8"), "alpha"),
        (dict(rank_dropout=1.0), "rank_dropout"),
        (dict(module_dropout=-0.1), "module_dropout"),
        (dict(init_weights="gaussian"), "init_weights"),
        (dict(target_modules=["q"], layers_pattern="layers"), "layers_to_transform"),
        (dict(alpha_pattern={"(": 2}), "not a valid regex"),
        (dict(target_modules=7), "target_modules"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoHaConfig(**kwargs)


def test_conv1d_and_embeddings_are_refused(tiny):
    """(f) GPT-2's Conv1D: torch PEFT's LoHa raises TypeError, jpeft a ConfigError naming the layer."""
    import peft

    pair = tiny("gpt2")
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(pair.torch_model(), peft.LoHaConfig(target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.attn\.c_attn.*Conv1D"):
        _jpeft_model(pair, dict(target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match="Conv1D"):
        _jpeft_model(pair, dict())  # PEFT's default for gpt2 is c_attn
    with pytest.raises(NoMatchingModuleError, match="embed_tokens"):
        _jpeft_model(tiny("llama"), dict(target_modules=["embed_tokens"]))


def test_config_round_trip_and_peft_fields():
    import peft

    config = LoHaConfig(
        r=16, alpha=32, target_modules=["q_proj"], rank_pattern={"q_proj": 4}, module_dropout=0.1
    )
    again = jpeft.config_from_dict(json.loads(config.to_json_string()))
    assert isinstance(again, LoHaConfig)
    assert again.replace(peft_version=None) == config
    theirs = peft.LoHaConfig(r=16).to_dict()
    mine = LoHaConfig(r=16).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert set(mine) == set(theirs)
    assert {k: mine[k] for k in mine if k != "peft_version"} == {
        k: (v.value if hasattr(v, "value") else v) for k, v in theirs.items() if k != "peft_version"
    }
    with pytest.raises(ConfigError, match="LOHA"):
        jpeft.LoraConfig.from_dict({"peft_type": "LOHA", "r": 4})
