"""``NNXBinding``: any ``nnx.Module``, with numeric parity to torch PEFT both ways.

The models are the hand-written twins of ``tests/nnx_twins.py``: an NNX Llama-shaped LM and a
torch ``nn.Module`` with the same module names and weights. Three NNX flavours: blocks in an
``nnx.List``, one stacked block run by ``nnx.scan`` (its torch twin is unrolled), and
multi-axis layers (``nnx.LinearGeneral``, ``nnx.Einsum``). For each flavour and each row of
``CONFIGS`` (every layer method, and LoRA's options): a torch PEFT adapter with non-trivial
weights loads in jpeft with equal logits, and a jpeft adapter loads in torch PEFT (its
"missing adapter keys" warning fails the test) with equal logits. fp32, max abs diff <= 1e-5.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from flax import nnx

import jpeft
from tests import nnx_twins as tw
from tests import parity

CFG = tw.TwinConfig()
FLAVOURS = {"list": tw.NNXTinyLM, "scanned": tw.NNXScannedLM, "general": tw.NNXGeneralLM}

# One row per method or LoRA option: (peft_type, keyword arguments for both libraries' configs).
CONFIGS: dict[str, tuple[str, dict]] = {
    "lora": ("LORA", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"])),
    "lora-dora": ("LORA", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "down_proj"])),
    "lora-rslora-patterns": (
        "LORA",
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj"],
             rank_pattern={"v_proj": 2}, alpha_pattern={"gate_proj": 3}),
    ),
    "lora-bias": ("LORA", dict(r=4, bias="all", lora_bias=True, target_modules=["q_proj", "k_proj"])),
    "lora-layers": (
        "LORA",
        dict(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers",
             modules_to_save=["lm_head"]),
    ),
    "ia3": ("IA3", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "vera": ("VERA", dict(r=4, target_modules=["q_proj", "o_proj"])),
    "adalora": ("ADALORA", dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj", "up_proj"])),
    "loha": ("LOHA", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
}


# Every row runs on the list model. The scanned model runs every row whose code differs on a stack
# (each method's stacked carry, per-layer biases, a partial stack, DoRA's per-layer weights); the
# multi-axis model the rows that read or write its reshaped weights and biases.
CASES = [
    *((row, "list") for row in CONFIGS),
    *((row, "scanned") for row in CONFIGS if row != "lora-rslora-patterns"),
    *((row, "general") for row in ("lora", "lora-dora", "lora-bias", "ia3")),
]


@pytest.fixture(scope="module")
def models():
    return {name: cls(CFG, rngs=nnx.Rngs(0)) for name, cls in FLAVOURS.items()}


def _torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).float().numpy()


@pytest.mark.parametrize("row,flavour", CASES, ids=[f"{r}-{f}" for r, f in CASES])
def test_parity_with_torch_peft(models, flavour, row, tmp_path, record_property):
    import peft
    import torch

    model = models[flavour]
    peft_type, kwargs = CONFIGS[row]
    torch_config, jpeft_config = parity.method_configs(peft_type, **kwargs)
    ids = tw.tiny_inputs(CFG)
    base = np.asarray(model(ids))

    # torch PEFT -> jpeft
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(tw.torch_twin(model, CFG), torch_config)
    parity.perturb_torch_trainable(torch_model)
    torch_model.eval()
    torch_model.save_pretrained(tmp_path / "from_torch")
    want = _torch_logits(torch_model, ids)
    assert parity.max_diff(want, base) > 1e-3, "the torch adapter must change the output"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = jpeft.PeftModel.from_pretrained(model, tmp_path / "from_torch")
    diff = parity.assert_close(np.asarray(loaded(ids)), want, f"{row}/{flavour}: torch PEFT -> jpeft")
    record_property("torch_to_jpeft_max_abs_diff", diff)

    # jpeft -> torch PEFT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine_model = jpeft.get_peft_model(model, jpeft_config, key=jax.random.key(3))
    assert set(mine_model.targeted_modules()) == set(torch_model.base_model.targeted_module_names)
    parity.perturb_trainable(mine_model)
    mine = np.asarray(mine_model(ids))
    assert parity.max_diff(mine, base) > 1e-3, "the jpeft adapter must change the output"
    mine_model.save_pretrained(tmp_path / "from_jpeft")
    theirs = _torch_logits(parity.peft_from_pretrained(tw.torch_twin(model, CFG), tmp_path / "from_jpeft"), ids)
    diff = parity.assert_close(theirs, mine, f"{row}/{flavour}: jpeft -> torch PEFT")
    record_property("jpeft_to_torch_max_abs_diff", diff)

    # merged weights compute the same function, in a module of the user's class
    merged = mine_model.merge_and_unload()
    assert type(merged) is type(model)
    parity.assert_close(np.asarray(merged(ids)), mine, f"{row}/{flavour}: merge_and_unload")
    parity.assert_close(np.asarray(model(ids)), base, "the user's module is unchanged", atol=0)
