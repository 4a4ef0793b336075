"""Data-parallel and FSDP training on 8 simulated CPU devices (``tests/conftest.py`` sets
``--xla_force_host_platform_device_count=8``).

The tiny models have hidden size 32, so every kernel has an axis that 8 divides; with
``min_size=256`` all kernels (and the embeddings) are FSDP-sharded. LoRA targets are
chosen so that both cases occur: kernels split on their input axis (Llama
``q_proj``/``down_proj``, GPT-2 ``mlp.c_proj``) and on their output axis (Llama
``up_proj``, GPT-2 ``c_attn``), GPT-2's Conv1D kernels being stored ``(out, in)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jpeft
import jpeft.train

MIN_SIZE = 256
TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj", "mlp.c_fc"],
}
MESHES = [(8, 1), (2, 4), (1, 8)]
STEPS = 3


@pytest.fixture(autouse=True)
def eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py must force 8 host devices before jax is imported"


def lora_model(pair, arch) -> jpeft.PeftModel:
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], task_type="CAUSAL_LM")
    return jpeft.get_peft_model(pair.flax_model, config)


def batch_for(pair) -> dict:
    inputs = pair.inputs(batch=8, length=8, seed=5)
    mask = inputs["attention_mask"]
    mask[1, 5:] = 0  # some right padding
    mask[6, 3:] = 0
    return {"input_ids": inputs["input_ids"], "attention_mask": mask}


def norm_spec(spec: PartitionSpec, ndim: int) -> tuple:
    entries = tuple(spec)
    return entries + (None,) * (ndim - len(entries))


def spec_of(array) -> tuple:
    assert isinstance(array.sharding, NamedSharding), type(array.sharding)
    return norm_spec(array.sharding.spec, array.ndim)


def get(tree, path: str):
    for part in path.split("."):
        tree = tree[part]
    return tree


def train(peft_model, batch, steps: int = STEPS):
    trainer = jpeft.train.make_train_step(peft_model, optax.sgd(1.0))
    state = trainer.init(jax.random.key(0))
    frozen = trainer.frozen()
    losses = []
    for _ in range(steps):
        state, metrics = trainer.step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return losses, state, trainer


_baselines: dict = {}


def single_device_run(pair, arch):
    if arch not in _baselines:
        peft_model = lora_model(pair, arch)
        batch = {k: jnp.asarray(v) for k, v in batch_for(pair).items()}
        losses, state, _ = train(peft_model, batch)
        _baselines[arch] = (losses, jax.device_get(state.trainable["adapters"]["default"]))
    return _baselines[arch]


def check_specs(peft_model, mesh, arch):
    """Base kernels FSDP-split over "fsdp"; lora_A like the kernel's input axis, lora_B like its output axis."""
    fsdp = mesh.shape["fsdp"]
    base = peft_model.base_params
    for path, leaf in jax.tree_util.tree_leaves_with_path(base):
        spec = spec_of(leaf)
        if leaf.size >= MIN_SIZE:
            assert spec.count("fsdp") == 1 and set(spec) <= {"fsdp", None}, (jax.tree_util.keystr(path), spec)
            dim = spec.index("fsdp")
            assert leaf.shape[dim] % fsdp == 0
            # The largest dimension the axis divides.
            assert leaf.shape[dim] == max(n for n in leaf.shape if n % fsdp == 0)
            assert leaf.addressable_shards[0].data.shape[dim] == leaf.shape[dim] // fsdp
        else:
            assert spec == (None,) * leaf.ndim, (jax.tree_util.keystr(path), spec)
        assert "data" not in spec

    modules = peft_model.named_modules()
    lora = peft_model.adapters["default"]["lora"]
    assert lora
    seen_in, seen_out = False, False
    for name, leaves in lora.items():
        info = modules[name]
        kernel = get(base, name + ".kernel")
        k_spec = spec_of(kernel)
        in_axis, out_axis = (k_spec[1], k_spec[0]) if info.kernel_transposed else (k_spec[0], k_spec[1])
        if arch == "gpt2":
            assert info.kernel_transposed  # Conv1D: (out, in)
            assert kernel.shape == (info.out_features, info.in_features)
        else:
            assert kernel.shape == (info.in_features, info.out_features)
        a, b = leaves["lora_A"], leaves["lora_B"]
        assert a.shape == (info.in_features, 4) and b.shape == (4, info.out_features)
        assert spec_of(a) == (in_axis, None), (name, spec_of(a), k_spec)
        assert spec_of(b) == (None, out_axis), (name, spec_of(b), k_spec)
        seen_in |= in_axis == "fsdp"
        seen_out |= out_axis == "fsdp"
    # Both mappings were exercised (with fsdp == 1 every kernel still names the axis).
    assert seen_in and seen_out

    # Hard-coded expectations, independent of the helper above.
    if arch == "llama":
        layer = "model.layers.0."
        assert spec_of(lora[layer + "self_attn.q_proj"]["lora_A"]) == ("fsdp", None)  # kernel (32, 32): in
        assert spec_of(lora[layer + "self_attn.q_proj"]["lora_B"]) == (None, None)
        assert spec_of(lora[layer + "mlp.up_proj"]["lora_A"]) == (None, None)  # kernel (32, 64): out
        assert spec_of(lora[layer + "mlp.up_proj"]["lora_B"]) == (None, "fsdp")
        assert spec_of(lora[layer + "mlp.down_proj"]["lora_A"]) == ("fsdp", None)  # kernel (64, 32): in
    else:
        layer = "transformer.h.0."
        assert spec_of(lora[layer + "attn.c_attn"]["lora_A"]) == (None, None)  # stored (96, 32): out
        assert spec_of(lora[layer + "attn.c_attn"]["lora_B"]) == (None, "fsdp")
        assert spec_of(lora[layer + "mlp.c_proj"]["lora_A"]) == ("fsdp", None)  # stored (32, 128): in
        assert spec_of(lora[layer + "mlp.c_proj"]["lora_B"]) == (None, None)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("data,fsdp", MESHES)
def test_param_shardings(arch, data, fsdp, tiny):
    pair = tiny(arch)
    mesh = jpeft.train.make_mesh(data=data, fsdp=fsdp)
    assert dict(mesh.shape) == {"data": data, "fsdp": fsdp}
    peft_model = lora_model(pair, arch)
    specs = jpeft.train.param_specs(peft_model, mesh, min_size=MIN_SIZE)
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)) == jax.tree.structure(
        peft_model.params
    )
    peft_model.params = jpeft.train.shard_params(peft_model, mesh, min_size=MIN_SIZE)
    check_specs(peft_model, mesh, arch)
    for leaf in jax.tree.leaves(peft_model.params):
        assert leaf.sharding.mesh == mesh and len(leaf.sharding.device_set) == 8


@pytest.mark.parametrize("data,fsdp", MESHES)
def test_sharded_training_matches_single_device(data, fsdp, tiny):
    arch = "llama"
    pair = tiny(arch)
    ref_losses, ref_adapter = single_device_run(pair, arch)

    mesh = jpeft.train.make_mesh(data=data, fsdp=fsdp)
    peft_model = lora_model(pair, arch)
    params = jpeft.train.shard_params(peft_model, mesh, min_size=MIN_SIZE)
    peft_model.params = params
    check_specs(peft_model, mesh, arch)
    batch = jax.device_put(batch_for(pair), jpeft.train.batch_sharding(mesh))
    assert spec_of(batch["input_ids"]) == (("data", "fsdp"), None)
    assert batch["input_ids"].addressable_shards[0].data.shape == (1, 8)

    losses, state, trainer = train(peft_model, batch)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    adapter = state.trainable["adapters"]["default"]
    assert jax.tree.structure(adapter) == jax.tree.structure(ref_adapter)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(adapter), jax.tree.leaves(ref_adapter), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(got), want, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )
    initial = jax.tree.leaves(lora_model(pair, arch).adapters["default"])
    moved = max(
        float(np.abs(np.asarray(g) - np.asarray(w)).max())
        for g, w in zip(jax.tree.leaves(adapter), initial, strict=True)
    )
    assert moved > 1e-3  # training did something

    # The frozen tree stays where shard_params put it.
    frozen = trainer.frozen()
    for got, want in zip(jax.tree.leaves(frozen["base"]), jax.tree.leaves(params["base"]), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


@pytest.mark.parametrize("kind", ["qlora", "prompt_tuning", "prefix_tuning"])
def test_quantized_base_and_prompt_methods_shard_and_train(kind, tiny):
    """A 4-bit base (packed codes FSDP-split) and prompt adapters (replicated) train on a mesh as on one device."""
    pair = tiny("llama")

    def build():
        if kind == "qlora":
            base = jpeft.quantize_model(
                pair.flax_model, jpeft.QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
            )
            config = jpeft.LoraConfig(r=4, target_modules=TARGETS["llama"], init_lora_weights=False)
            return jpeft.get_peft_model(base, config)
        cls = jpeft.PromptTuningConfig if kind == "prompt_tuning" else jpeft.PrefixTuningConfig
        return jpeft.get_peft_model(pair.flax_model, cls(task_type="CAUSAL_LM", num_virtual_tokens=4))

    batch = {k: jnp.asarray(v) for k, v in batch_for(pair).items()}
    want, _, _ = train(build(), batch)

    mesh = jpeft.train.make_mesh(data=2, fsdp=4)
    peft_model = build()
    peft_model.params = jpeft.train.shard_params(peft_model, mesh, min_size=MIN_SIZE)
    if kind == "qlora":
        packed = [
            v.packed
            for v in jax.tree.leaves(peft_model.base_params, is_leaf=jpeft.quant.is_quantized)
            if jpeft.quant.is_quantized(v)
        ]
        assert packed and any("fsdp" in spec_of(p) for p in packed)
    sharded = jax.device_put(batch, jpeft.train.batch_sharding(mesh))
    got, _, _ = train(peft_model, sharded)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[-1] < got[0]
