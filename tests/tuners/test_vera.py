"""VeRA against torch PEFT 0.21.2: projections, numeric parity both ways, format, merge, training.

- The numpy reproduction of torch's CPU generator (``jpeft.tuners._torch_rng``) equals
  torch's ``uniform_`` and PEFT's ``_kaiming_init`` bit-for-bit.
- ``test_torch_to_jpeft`` (a): torch PEFT builds a VeRA adapter, its lambdas (and module
  copies, biases) are perturbed, it is saved and jpeft loads it: logits agree within
  ``parity.ATOL``; with ``save_projection=False`` jpeft regenerated torch's projections
  bit-for-bit.
- ``test_jpeft_to_torch`` (b): jpeft builds, perturbs (never the frozen projections) and
  saves; ``peft.PeftModel.from_pretrained`` loads it without a missing-keys warning: logits
  agree. The folder has the keys, shapes and config keys/values of PEFT's own save.
- merge == unmerged, unmerge restores the base; parameter counts equal PEFT's; a train
  step changes the lambdas only; invalid input raises.
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
import jpeft.tuners.vera as vera
from jpeft.errors import CheckpointError, ConfigError, NoMatchingModuleError
from jpeft.tuners._torch_rng import TorchCPUGenerator
from jpeft.tuners.vera import VeraConfig
from tests import parity

_MIN_ADAPTER_EFFECT = 1e-3
_CONFIG_VALUE_EXEMPT = {"base_model_name_or_path"}


# --------------------------------------------------------------------------- torch RNG


@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 + 5, -3, 987654321])
def test_torch_rng_bit_exact(seed):
    import torch
    from peft.tuners.vera.model import _kaiming_init

    for shape_a, shape_b in [((8, 32), (128, 8)), ((3, 5), (7, 3)), ((64, 300), (257, 64))]:
        gen = torch.Generator("cpu").manual_seed(seed)
        want_a, want_b = _kaiming_init(shape_a, gen).numpy(), _kaiming_init(shape_b, gen).numpy()
        mine = TorchCPUGenerator(seed)
        got_a, got_b = mine.kaiming_uniform(shape_a), mine.kaiming_uniform(shape_b)
        assert got_a.dtype == np.float32 and got_a.shape == shape_a
        np.testing.assert_array_equal(got_a.view(np.uint32), want_a.view(np.uint32))
        np.testing.assert_array_equal(got_b.view(np.uint32), want_b.view(np.uint32))
    gen = torch.Generator("cpu").manual_seed(seed)
    want = torch.empty(2, 501).uniform_(-0.3, 1.7, generator=gen).numpy()
    np.testing.assert_array_equal(TorchCPUGenerator(seed).uniform_((2, 501), -0.3, 1.7), want)


# --------------------------------------------------------------------------- cases


def case(case_id: str, arch: str, **kwargs):
    return pytest.param(arch, kwargs, id=case_id)


CASES = [
    # c_attn (32->96) and c_fc (32->128): projections sized (4, 32) and (128, 4); Conv1D fix.
    case(
        "gpt2-proj", "gpt2", r=4, target_modules=["c_attn", "c_fc"], vera_dropout=0.1, task_type="CAUSAL_LM"
    ),
    # c_proj of the MLP has in=128: A is (4, 128); projections regenerated from key 7.
    case(
        "gpt2-noproj-regex",
        "gpt2",
        r=4,
        target_modules=r"transformer\.h\.\d\.(attn\.c_attn|mlp\.c_proj)",
        save_projection=False,
        projection_prng_key=7,
    ),
    case("llama-proj", "llama", r=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    case(
        "llama-noproj-layer1",
        "llama",
        r=6,
        target_modules=["k_proj", "o_proj", "up_proj"],
        save_projection=False,
        projection_prng_key=3,
        layers_to_transform=[1],
        layers_pattern="layers",
        d_initial=0.5,
    ),
    case(
        "bert-proj-vera_only",
        "bert",
        r=4,
        target_modules=["query", "value"],
        bias="vera_only",
        task_type="SEQ_CLS",
    ),
    case(
        "bert-noproj-bias_all",
        "bert",
        r=5,
        target_modules=["key", "output.dense"],
        bias="all",
        init_weights=False,
        save_projection=False,
        projection_prng_key=11,
        task_type="SEQ_CLS",
    ),
]


# --------------------------------------------------------------------------- helpers


def _torch_model(pair, kwargs, seed: int = 1):
    import peft
    import torch

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False and fan_in_fan_out notices
        model = peft.get_peft_model(pair.torch_model(), peft.VeraConfig(**kwargs))
    return model


def _jpeft_model(pair, kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = jpeft.get_peft_model(pair.flax_model, VeraConfig(**kwargs))
    messages = [str(w.message) for w in caught]
    if pair.arch == "gpt2":  # PEFT's Conv1D fix, with its warning
        assert model.peft_config["default"].fan_in_fan_out is True
        assert any("Setting fan_in_fan_out to True" in m for m in messages), messages
    if not kwargs.get("save_projection", True):
        assert any("Specified to not save vera_A and vera_B" in m for m in messages), messages
    return model


def _perturb_jpeft(model, seed: int = 1, scale: float = 0.1) -> None:
    """Noise on the trainable leaves only: the projections stay the seed's (they are buffers)."""
    params = model.params
    adapter = params["adapters"]["default"]
    mask = vera.trainable_mask(model.plan("default"), adapter)
    leaves, treedef = jax.tree.flatten(adapter)
    flags = jax.tree.leaves(mask)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [
        x + scale * jax.random.normal(k, x.shape, x.dtype) if on else x
        for x, k, on in zip(leaves, keys, flags, strict=True)
    ]
    params["adapters"]["default"] = jax.tree.unflatten(treedef, leaves)
    model.params = params


def _save_jpeft(model, folder: Path) -> None:
    model.save_pretrained(folder)


def _torch_projections(model):
    return (
        model.base_model.vera_A["default"].detach().numpy(),
        model.base_model.vera_B["default"].detach().numpy(),
    )


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _semantic(field: str, value):
    if field in ("target_modules", "modules_to_save") and isinstance(value, list):
        return sorted(value)
    return value


def _assert_same_config(mine: dict, theirs: dict) -> None:
    assert set(mine) == set(theirs), (sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine)))
    assert mine["peft_type"] == theirs["peft_type"] == "VERA"
    assert type(mine["target_modules"]) is type(theirs["target_modules"])
    differing = {
        k: (mine[k], theirs[k])
        for k in mine
        if k not in _CONFIG_VALUE_EXEMPT and _semantic(k, mine[k]) != _semantic(k, theirs[k])
    }
    assert not differing, f"adapter_config.json values (jpeft, peft): {differing}"


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("arch", "kwargs"), CASES)
def test_torch_to_jpeft(arch, kwargs, tiny, tmp_path):
    """(a) torch PEFT's VeRA (perturbed, saved by peft) loaded by jpeft gives torch's logits."""
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

    saved = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= saved) == kwargs.get("save_projection", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    adapter = mine.params["adapters"]["default"]
    want_a, want_b = _torch_projections(theirs)
    # bit-for-bit: read from the file, or regenerated from projection_prng_key
    np.testing.assert_array_equal(np.asarray(adapter["vera_A"]), want_a)
    np.testing.assert_array_equal(np.asarray(adapter["vera_B"]), want_b)
    diff = parity.assert_close(parity.jax_logits(mine, inputs), ref, "torch PEFT VeRA loaded by jpeft")
    print(f"torch -> jpeft max|diff| = {diff:.2e}")


@pytest.mark.parametrize(("arch", "kwargs"), CASES)
def test_jpeft_to_torch(arch, kwargs, tiny, tmp_path):
    """(b) jpeft's VeRA (perturbed, saved) loaded by torch PEFT gives jpeft's logits; same file format."""
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_model(pair, kwargs)
    _perturb_jpeft(mine)
    got = parity.jax_logits(mine, inputs)
    assert parity.max_diff(got, parity.jax_logits(pair.flax_model, inputs)) > _MIN_ADAPTER_EFFECT, (
        "no-op adapter"
    )
    jax_dir, torch_dir = tmp_path / "jax", tmp_path / "torch"
    _save_jpeft(mine, jax_dir)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the save_projection=False notices
        theirs = parity.torch_peft_load(pair, jax_dir)
    diff = parity.assert_close(parity.torch_logits(theirs, inputs), got, "jpeft VeRA loaded by torch PEFT")
    print(f"jpeft -> torch max|diff| = {diff:.2e}")

    reference = _torch_model(pair, kwargs)
    reference.save_pretrained(torch_dir)
    _assert_same_config(_config(jax_dir), _config(torch_dir))
    assert _shapes(jax_dir) == _shapes(torch_dir)


@pytest.mark.parametrize(("arch", "kwargs"), [CASES[0], CASES[3], CASES[5]])
def test_merge_unmerge(arch, kwargs, tiny):
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_model(pair, kwargs)
    _perturb_jpeft(mine)
    unmerged = parity.jax_logits(mine, inputs)
    base_params = mine.base_params
    merged = mine.merge_and_unload()
    assert not isinstance(merged, jpeft.PeftModel)
    parity.assert_close(parity.jax_logits(merged, inputs), unmerged, "merge_and_unload vs unmerged")

    mine.merge_adapter()
    parity.assert_close(parity.jax_logits(mine, inputs), unmerged, "merge_adapter vs unmerged")
    mine.unmerge_adapter()
    for (path, before), after in zip(
        jax.tree_util.tree_leaves_with_path(base_params), jax.tree.leaves(mine.base_params), strict=True
    ):
        parity.assert_close(after, before, f"unmerged base {jax.tree_util.keystr(path)}", atol=1e-6)
    parity.assert_close(parity.jax_logits(mine, inputs), unmerged, "after unmerge")


def test_delta_weight_matches_torch(tiny):
    """Per layer, jpeft's merge delta equals PEFT's ``get_delta_weight`` (Conv1D layout included)."""
    pair = tiny("gpt2")
    kwargs = dict(r=4, target_modules=["c_attn", "c_fc"])
    theirs = _torch_model(pair, kwargs)
    parity.perturb_torch_trainable(theirs)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mine = jpeft.PeftModel.from_pretrained(pair.flax_model, folder)
    plan, adapter = mine.plan("default"), mine.params["adapters"]["default"]
    for name, layer in plan.layers.items():
        want = theirs.base_model.model.get_submodule(name).get_delta_weight("default").detach().numpy()
        # GPT-2 Conv1D: torch's delta is (in, out) (fan_in_fan_out); Flax's FlaxConv1D kernel is (out, in)
        parity.assert_close(np.asarray(vera.delta_weight(layer, adapter)).T, want, name, atol=1e-6)


# --------------------------------------------------------------------------- counts and training


@pytest.mark.parametrize(("arch", "kwargs"), [CASES[0], CASES[5]])
def test_print_trainable_parameters(arch, kwargs, tiny, capsys):
    pair = tiny(arch)
    theirs = _torch_model(pair, kwargs)
    theirs.print_trainable_parameters()
    want = capsys.readouterr().out
    mine = _jpeft_model(pair, kwargs)
    mine.print_trainable_parameters()
    assert capsys.readouterr().out == want


def test_counted_in_total_excludes_projections(tiny):
    """``all params`` (which does not depend on the mask) equals PEFT's: projections are buffers."""
    pair = tiny("llama")
    kwargs = dict(CASES[2].values[1])
    theirs = _torch_model(pair, kwargs)
    want_trainable, want_total = theirs.get_nb_trainable_parameters()
    mine = _jpeft_model(pair, kwargs)
    _, total = mine.get_nb_trainable_parameters()
    assert total == want_total
    adapter = mine.params["adapters"]["default"]
    mask = vera.trainable_mask(mine.plan("default"), adapter)
    assert mask["vera_A"] is False and mask["vera_B"] is False
    trainable = sum(
        int(x.size) for x, on in zip(jax.tree.leaves(adapter), jax.tree.leaves(mask), strict=True) if on
    )
    assert trainable == want_trainable


def test_train_step_updates_lambdas_only(tiny):
    import optax

    from jpeft.train import make_train_step

    pair = tiny("gpt2")
    mine = _jpeft_model(pair, dict(r=4, target_modules=["c_attn"], init_weights=False))
    before = mine.params["adapters"]["default"]
    trainer = make_train_step(mine, optax.sgd(0.1))
    state = trainer.init(jax.random.key(0))
    ids = jnp.asarray(pair.inputs()["input_ids"])
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    frozen = trainer.frozen()
    for _ in range(2):
        state, metrics = trainer.step(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = trainer.params(state)["adapters"]["default"]
    np.testing.assert_array_equal(np.asarray(after["vera_A"]), np.asarray(before["vera_A"]))
    np.testing.assert_array_equal(np.asarray(after["vera_B"]), np.asarray(before["vera_B"]))
    for name, leaves in before["vera"].items():
        for leaf, value in leaves.items():
            assert parity.max_diff(after["vera"][name][leaf], value) > 0, f"{name}.{leaf} did not train"


def test_trainable_mask_and_grads_are_zero_on_projections(tiny):
    """Independent of PeftModel's mask: the loss's gradient flows to the lambdas and the projections
    only receive what an optimizer masked with ``vera.trainable_mask`` then drops."""
    pair = tiny("llama")
    mine = _jpeft_model(pair, dict(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    ids = jnp.asarray(pair.inputs()["input_ids"])

    def loss(adapter):
        params = {"base": mine.base_params, "adapters": {"default": adapter}}
        return jnp.mean(mine.apply(params, input_ids=ids).logits ** 2)

    adapter = mine.params["adapters"]["default"]
    grads = jax.grad(loss)(adapter)
    for leaves in grads["vera"].values():
        assert all(float(jnp.abs(g).max()) > 0 for g in leaves.values())
    mask = vera.trainable_mask(mine.plan("default"), adapter)
    assert jax.tree.structure(mask) == jax.tree.structure(adapter)
    assert [k for k, v in mask.items() if v is False] == ["vera_A", "vera_B"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(r=0), "positive integer"),
        (dict(r=2.5), "positive integer"),
        (dict(bias="lora_only"), "'vera_only'"),
        (dict(vera_dropout=1.0), "vera_dropout"),
        (dict(projection_prng_key="0"), "projection_prng_key"),
        (dict(init_weights="gaussian"), "init_weights"),
        (dict(target_modules=["q"], layers_pattern="layers"), "layers_to_transform"),
        (dict(target_modules=r".*q", layers_to_transform=[0]), "regex"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VeraConfig(**kwargs)


def test_config_round_trip_and_unknown_type():
    config = VeraConfig(r=16, target_modules=["q_proj"], d_initial=0.2, bias="vera_only")
    from jpeft.core import registry

    again = registry.config_from_dict(json.loads(config.to_json_string()))
    assert isinstance(again, VeraConfig)
    assert again.replace(peft_version=None) == config
    with pytest.raises(ConfigError, match="VERA"):
        jpeft.LoraConfig.from_dict({"peft_type": "VERA", "r": 4})


def test_model_errors(tiny, tmp_path):
    pair = tiny("gpt2")
    with pytest.raises(NoMatchingModuleError):
        jpeft.get_peft_model(pair.flax_model, VeraConfig(r=4, target_modules=["nope"]))
    with pytest.raises(NoMatchingModuleError, match="linear"):  # embeddings are not VeRA targets
        jpeft.get_peft_model(pair.flax_model, VeraConfig(r=4, target_modules=["wte"]))
    # save_projection=True but the file lacks the projections (PEFT raises too)
    mine = _jpeft_model(pair, dict(r=4, target_modules=["c_attn"], save_projection=False))
    mine.save_pretrained(tmp_path)
    data = _config(tmp_path)
    data["save_projection"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="base_model.vera_A"):
        jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)


def test_projection_sizes_are_over_all_targets(tiny):
    """The reference's sizes: Llama q/v/down_proj -> A (8, 64), B (32, 8); GPT-2 c_attn/c_fc -> (8, 32), (128, 8)."""
    llama = _jpeft_model(tiny("llama"), dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    adapter = llama.params["adapters"]["default"]
    assert adapter["vera_A"].shape == (8, 64) and adapter["vera_B"].shape == (32, 8)
    gpt2 = _jpeft_model(tiny("gpt2"), dict(r=8, target_modules=["c_attn", "c_fc"]))
    adapter = gpt2.params["adapters"]["default"]
    assert adapter["vera_A"].shape == (8, 32) and adapter["vera_B"].shape == (128, 8)
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(32)
    assert float(jnp.abs(adapter["vera_A"]).max()) <= bound
    # a fresh adapter is a no-op (lambda_b = 0)
    inputs = tiny("gpt2").inputs()
    parity.assert_close(
        parity.jax_logits(gpt2, inputs), parity.jax_logits(tiny("gpt2").flax_model, inputs), "init"
    )


def test_projections_helper_is_deterministic():
    a1, b1 = vera.projections(4, 10, 12, 5)
    a2, b2 = vera.projections(4, 10, 12, 5)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    np.testing.assert_array_equal(np.asarray(b1), np.asarray(b2))
    a3, _ = vera.projections(4, 10, 12, 6)
    assert not np.array_equal(np.asarray(a1), np.asarray(a3))
