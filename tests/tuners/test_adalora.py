"""AdaLoRA (``jpeft.tuners.adalora``) against torch PEFT 0.21.2.

- parity both directions on GPT-2 (Conv1D), Llama and BERT (SEQ_CLS) with perturbed A/E/B;
- the same saved keys/shapes/config and ``print_trainable_parameters`` line as PEFT;
- merge/unmerge; the orthogonality penalty equals PEFT's;
- the rank allocator, fed the same weights and gradients as PEFT's ``RankAllocator``,
  yields the same budgets, masks and rank patterns; after the final allocation both
  save the same pruned tensors and ``rank_pattern``, and each loads the other's folder.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jpeft
import jpeft.tuners.adalora as adalora
from jpeft.tuners.adalora import AdaLoraConfig
from tests import parity

_MIN_ADAPTER_EFFECT = 1e-3
_SET_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")

CASES = [
    pytest.param("gpt2", dict(init_r=6, target_r=2, total_step=20, task_type="CAUSAL_LM"), id="gpt2-default"),
    pytest.param(
        "llama",
        dict(
            init_r=4,
            target_r=2,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            total_step=10,
            task_type="CAUSAL_LM",
        ),
        id="llama-list",
    ),
    pytest.param("bert", dict(init_r=5, target_r=3, total_step=10, task_type="SEQ_CLS"), id="bert-seq_cls"),
]
ARGS = ("arch", "kwargs")


def _torch_adalora(pair, kwargs: dict, seed: int = 1, perturb: bool = True):
    import peft
    import torch

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(pair.torch_model(), peft.AdaLoraConfig(**kwargs))
    if perturb:
        parity.perturb_torch_trainable(model, seed)
    return model.eval()


def _jpeft_adalora(pair, kwargs: dict, perturb: bool = True) -> jpeft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = jpeft.get_peft_model(pair.flax_model, AdaLoraConfig(**kwargs))
    if perturb:
        parity.perturb_jpeft_adapter(model)
    return model


def _save(model, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)


def _jpeft_load(pair, folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jpeft.PeftModel.from_pretrained(pair.flax_model, folder)


def _assert_same_config(jax_cfg: dict, torch_cfg: dict) -> None:
    assert set(jax_cfg) == set(torch_cfg), set(jax_cfg) ^ set(torch_cfg)
    differing = {}
    for field, want in torch_cfg.items():
        got = jax_cfg[field]
        if field in _SET_FIELDS and isinstance(want, list):
            got, want = set(got), set(want)
        if field != "base_model_name_or_path" and got != want:
            differing[field] = (got, want)
    assert not differing, f"adapter_config.json values (jpeft, peft): {differing}"


# --------------------------------------------------------------------------- config


def test_config_checks():
    with pytest.raises(
        ValueError, match="AdaLoRA does not work when `total_step` is None, supply a value > 0."
    ):
        AdaLoraConfig()
    with pytest.raises(ValueError, match="don't allow for a budgeting phase"):
        AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match="does not support DoRA"):
        AdaLoraConfig(total_step=10, use_dora=True)
    with pytest.raises(ValueError, match="does not support LOFTQ"):
        AdaLoraConfig(total_step=10, loftq_config={"loftq_bits": 4})
    with pytest.warns(UserWarning, match="`r` is not used in AdaLora"):
        AdaLoraConfig(total_step=10, r=4)
    config = AdaLoraConfig(total_step=10, rank_pattern={"a.lora_E": [1, 0]})
    assert config.rank_pattern == {"a.lora_E": [True, False]}
    assert AdaLoraConfig.from_dict(config.to_dict()).rank_pattern == config.rank_pattern


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(ARGS, CASES)
def test_torch_to_jpeft(arch, kwargs, tiny, tmp_path):
    pair = tiny(arch)
    inputs = pair.inputs()
    torch_model = _torch_adalora(pair, kwargs)
    torch_model.save_pretrained(tmp_path)
    ref = parity.torch_logits(torch_model, inputs)
    assert parity.max_diff(ref, parity.jax_logits(pair.flax_model, inputs)) > _MIN_ADAPTER_EFFECT
    loaded = _jpeft_load(pair, tmp_path)
    parity.assert_close(parity.jax_logits(loaded, inputs), ref, "torch AdaLoRA loaded by jpeft")


@pytest.mark.parametrize(ARGS, CASES)
def test_jpeft_to_torch(arch, kwargs, tiny, tmp_path):
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_adalora(pair, kwargs)
    got = parity.jax_logits(mine, inputs)
    assert parity.max_diff(got, parity.jax_logits(pair.flax_model, inputs)) > _MIN_ADAPTER_EFFECT
    _save(mine, tmp_path)
    theirs = parity.torch_peft_load(pair, tmp_path)
    parity.assert_close(parity.torch_logits(theirs, inputs), got, "jpeft AdaLoRA loaded by torch PEFT")


@pytest.mark.parametrize(ARGS, CASES)
def test_checkpoint_format_and_counts(arch, kwargs, tiny, tmp_path):
    pair = tiny(arch)
    torch_dir, jax_dir = tmp_path / "torch", tmp_path / "jax"
    torch_model = _torch_adalora(pair, kwargs)
    torch_model.save_pretrained(torch_dir)
    mine = _jpeft_adalora(pair, kwargs)
    _save(mine, jax_dir)
    _assert_same_config(
        json.loads((jax_dir / "adapter_config.json").read_text()),
        json.loads((torch_dir / "adapter_config.json").read_text()),
    )
    jax_shapes = {k: v.shape for k, v in load_file(jax_dir / "adapter_model.safetensors").items()}
    torch_shapes = {k: v.shape for k, v in load_file(torch_dir / "adapter_model.safetensors").items()}
    assert jax_shapes == torch_shapes
    assert any(k.endswith(".lora_E") for k in jax_shapes)
    expected = parity.captured(torch_model.print_trainable_parameters)
    assert parity.captured(mine.print_trainable_parameters) == expected
    assert mine.get_nb_trainable_parameters() == tuple(torch_model.get_nb_trainable_parameters())


def test_default_init_matches_peft_statistics(tiny):
    mine = _jpeft_adalora(tiny("llama"), dict(CASES[1].values[1]), perturb=False)
    for entry in mine.adapters["default"]["adalora"].values():
        assert float(jnp.abs(entry["lora_E"]).max()) == 0.0
        assert 0.01 < float(entry["lora_A"].std()) < 0.03 and 0.01 < float(entry["lora_B"].std()) < 0.03


@pytest.mark.parametrize(ARGS, CASES)
def test_merge_unmerge(arch, kwargs, tiny):
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_adalora(pair, kwargs)
    unmerged = parity.jax_logits(mine, inputs)
    base_before = jax.tree.map(np.asarray, mine.base_params)
    parity.assert_close(parity.jax_logits(mine.merge_and_unload(), inputs), unmerged, "merge_and_unload")
    mine.merge_adapter()
    parity.assert_close(parity.jax_logits(mine, inputs), unmerged, "merge_adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine.unmerge_adapter()
    for want, got in zip(jax.tree.leaves(base_before), jax.tree.leaves(mine.base_params), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- orthogonality penalty


def _torch_orth_penalty(torch_model, inputs) -> float:
    import torch

    ids = parity.torch_inputs(inputs)
    with torch.no_grad():
        plain = torch_model.base_model.model(**ids, labels=ids["input_ids"]).loss
        with_reg = torch_model(**ids, labels=ids["input_ids"]).loss
    return float(with_reg - plain)


@pytest.mark.parametrize("arch,kwargs", [CASES[0], CASES[1]])
def test_orth_regularization_matches_peft(arch, kwargs, tiny, tmp_path):
    pair = tiny(arch)
    kwargs = {**kwargs, "orth_reg_weight": 0.3}
    torch_model = _torch_adalora(pair, kwargs)
    torch_model.save_pretrained(tmp_path)
    want = _torch_orth_penalty(torch_model, pair.inputs())
    loaded = _jpeft_load(pair, tmp_path)
    got = float(adalora.orth_regularization(loaded.adapters["default"], loaded.plan("default")))
    assert want > 0.01
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
    grad = jax.grad(adalora.orth_regularization)(loaded.adapters["default"], loaded.plan("default"))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grad))


# --------------------------------------------------------------------------- rank allocator


_ALLOC_KW = dict(
    init_r=4,
    target_r=2,
    tinit=2,
    tfinal=3,
    deltaT=2,
    total_step=14,
    beta1=0.8,
    beta2=0.7,
    lora_alpha=16,
    task_type="CAUSAL_LM",
)


def _module_of(torch_name: str, part: str) -> str:
    return torch_name.removeprefix("base_model.model.").split(f".{part}.default")[0]


def _run_allocation(arch, kwargs, tiny):
    """Drives both allocators with the same noise on weights and the same gradients."""
    import torch

    pair = tiny(arch)
    torch_model = _torch_adalora(pair, kwargs)
    mine = _jpeft_adalora(pair, kwargs, perturb=False)
    plan = mine.plan("default")
    params = {
        (_module_of(n, part), part): p
        for n, p in torch_model.named_parameters()
        for part in adalora._PARTS
        if f".{part}.default" in n
    }
    assert {m for m, _ in params} == set(plan.layers)
    # start from torch's (perturbed) weights, copied: `.numpy()` shares the tensor's memory and the loop
    # below updates the tensors in place; some jax versions alias such a buffer on the CPU
    # (jax-ml/jax#37830). A full run once failed here by exactly one step's noise.
    adapter = dict(mine.adapters["default"])
    adapter["adalora"] = {
        m: {p: jnp.asarray(params[(m, p)].detach().numpy().copy()) for p in adalora._PARTS}
        for m in plan.layers
    }
    state = adalora.allocator_init(plan, adapter)
    rng = np.random.RandomState(0)
    history = []
    for step in range(1, kwargs["total_step"] + 3):
        grads = {"adalora": {m: {} for m in plan.layers}}
        with torch.no_grad():
            for (m, p), param in sorted(params.items()):
                noise = (0.05 * rng.randn(*param.shape)).astype(np.float32)
                grad = rng.randn(*param.shape).astype(np.float32)
                param.add_(torch.from_numpy(noise))  # an "optimizer step"
                param.grad = torch.from_numpy(grad)
                adapter["adalora"][m][p] = adapter["adalora"][m][p] + noise
                grads["adalora"][m][p] = jnp.asarray(grad)
        torch_model.base_model.update_and_allocate(step)
        state, adapter = adalora.update_and_allocate(state, adapter, grads, step, plan)
        want_budget, _ = torch_model.base_model.rankallocator.budget_schedule(step)
        assert adalora.budget_schedule(plan, step)[0] == want_budget
        torch_pattern = torch_model.peft_config["default"].rank_pattern
        if torch_pattern is None:
            assert state["rank_pattern"] is None, step
        else:
            theirs = {
                k.replace(".default", "").removeprefix("base_model.model."): v
                for k, v in torch_pattern.items()
            }
            assert state["rank_pattern"] == theirs, step
        for (m, p), param in params.items():
            np.testing.assert_allclose(
                np.asarray(adapter["adalora"][m][p]),
                param.detach().numpy(),
                rtol=1e-6,
                atol=1e-6,
                err_msg=f"step {step} {m}.{p}",
            )
        history.append(state["rank_pattern"])
    mine.adapters["default"] = adapter
    return pair, torch_model, mine, state, history


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rank_allocator_matches_peft(arch, tiny):
    _, _, _, state, history = _run_allocation(arch, _ALLOC_KW, tiny)
    final = history[-1]
    n_layers = len(final)
    assert sum(sum(v) for v in final.values()) == _ALLOC_KW["target_r"] * n_layers
    assert len({tuple(sorted((k, tuple(v)) for k, v in h.items())) for h in history if h}) > 1
    assert state["budget"] == _ALLOC_KW["target_r"] * n_layers


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_pruned_save_and_load_match_peft(arch, tiny, tmp_path):
    pair, torch_model, mine, state, _ = _run_allocation(arch, _ALLOC_KW, tiny)
    inputs = pair.inputs()
    torch_model.eval()
    ref = parity.torch_logits(torch_model, inputs)
    full = parity.jax_logits(mine, inputs)
    parity.assert_close(full, ref, "after allocation, unpruned")
    mine.resize_modules_by_rank_pattern(state["rank_pattern"])
    parity.assert_close(parity.jax_logits(mine, inputs), ref, "after pruning")

    torch_dir, jax_dir = tmp_path / "torch", tmp_path / "jax"
    torch_model.save_pretrained(torch_dir)
    _save(mine, jax_dir)
    jax_cfg = json.loads((jax_dir / "adapter_config.json").read_text())
    torch_cfg = json.loads((torch_dir / "adapter_config.json").read_text())
    _assert_same_config(jax_cfg, torch_cfg)
    assert jax_cfg["rank_pattern"] == torch_cfg["rank_pattern"]
    jax_t = load_file(jax_dir / "adapter_model.safetensors")
    torch_t = load_file(torch_dir / "adapter_model.safetensors")
    assert {k: v.shape for k, v in jax_t.items()} == {k: v.shape for k, v in torch_t.items()}
    for k in torch_t:
        np.testing.assert_allclose(jax_t[k], torch_t[k], rtol=1e-6, atol=1e-6, err_msg=k)

    loaded = _jpeft_load(pair, torch_dir)
    parity.assert_close(parity.jax_logits(loaded, inputs), ref, "pruned torch folder loaded by jpeft")
    reloaded = _jpeft_load(pair, jax_dir)
    parity.assert_close(parity.jax_logits(reloaded, inputs), ref, "pruned jpeft folder loaded by jpeft")
    theirs = parity.torch_peft_load(pair, jax_dir)
    parity.assert_close(parity.torch_logits(theirs, inputs), ref, "pruned jpeft folder loaded by torch PEFT")


def test_peft_model_update_and_allocate_beside_the_train_step(tiny, tmp_path):
    """PEFT-shaped loop: train step (grads returned) then ``peft_model.update_and_allocate``; the final
    allocation prunes to the target budget and the saved folder loads in torch PEFT with equal logits."""
    import optax

    import jpeft.train as jt

    pair = tiny("gpt2")
    config = AdaLoraConfig(
        init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6, target_modules=["c_attn", "c_proj"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = jpeft.get_peft_model(pair.flax_model, config)
    inputs = pair.inputs()
    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    final = config.total_step - config.tfinal
    for step in range(final + 1):
        trainer = jt.make_train_step(model, optax.adam(1e-2), return_grads=True)
        state = trainer.init(jax.random.key(step))
        state, metrics = trainer.step(state, trainer.frozen(), batch)
        model.params = trainer.params(state)
        model.update_and_allocate(step, metrics["grads"])
        if step == final:
            pattern = model.peft_config["default"].rank_pattern
            budget = config.target_r * len(model.targeted_modules())  # c_proj matches attn and mlp
            assert pattern and sum(sum(mask) for mask in pattern.values()) == budget
            for name, layer in model.adapters["default"]["adalora"].items():
                assert layer["lora_E"].shape == (sum(pattern[f"{name}.lora_E"]), 1)  # pruned to the pattern
        else:
            assert not model.peft_config["default"].rank_pattern
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "ada")
    torch_model = parity.torch_peft_load(pair, tmp_path / "ada")
    np.testing.assert_allclose(
        parity.torch_logits(torch_model, inputs), parity.jax_logits(model, inputs), atol=parity.ATOL
    )
